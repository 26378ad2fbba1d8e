"""The ``archive-job/archive`` deployment's flow (flows/archive_jobs.py), run in this
process as the worker would run it, on the real services: a scheduled batch is archived
once (the same job id again is a duplicate), a batch arriving while the tenant's gate is
paused is deferred (nothing written) and replayed when the gate reopens, and bad input ends
the flow run Failed with the one-line error and nothing written."""

from __future__ import annotations

import pytest
from archive_kms.flows.archive_jobs import archive

from archive_kms.config import Settings
from archive_kms.operations.archive import replay_deferred
from archive_kms.operations.verification import verify_tenant


@pytest.fixture
def worker_env(flow_settings: Settings, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The flow builds its platform from the environment: point it at this test's state."""
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    assert Settings().state_url == flow_settings.state_url
    return flow_settings


def test_archive_job_flow_archives_once_defers_while_paused_and_refuses_bad_input(
    worker_env, flow_platform, archived_tenant
):
    p = flow_platform
    t = archived_tenant("s3", records=3)
    tid = t.tenant_id
    objects = lambda: len(list(p.store_for(p.location_of(tid)).list()))  # noqa: E731

    out = archive(tenant=tid, job_id=f"{tid}-sched-1", generate=4, seed=99)
    assert (out["decision"], out["records"]) == ("run", 4), out
    after_first = objects()
    again = archive(tenant=tid, job_id=f"{tid}-sched-1", generate=4, seed=99)
    assert again["decision"] == "duplicate" and objects() == after_first, again

    p.state.pause(tid, "run-test-pause")
    deferred = archive(tenant=tid, job_id=f"{tid}-sched-2", generate=2, seed=100, offset=4)
    assert deferred["decision"] == "deferred" and objects() == after_first, deferred
    replay_deferred(p.state, tid, "run-test-pause", p.open_archive)  # resumes the gate, replays once
    v = verify_tenant(p, tid)
    assert v["ok"] and v["records"] == 3 + 4 + 2, v

    refused = archive(tenant=tid, generate=0, return_state=True)
    assert refused.is_failed() and "exactly one of --jsonl FILE or --generate N" in refused.message
    assert "Traceback" not in refused.message
    assert verify_tenant(p, tid)["records"] == 9
