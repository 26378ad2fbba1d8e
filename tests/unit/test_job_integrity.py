"""Archive-job integrity in process (ADR 0020): name limits per location, the job lease's
own deadline, a writer that loses its lease mid-job, and the abandon/rollback path. The
same behaviour on the real services: tests/flows/test_frozen_writer.py,
tests/integration/test_archive_job_atomicity.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.errors import FencedError
from archive_kms.operations import archive as archive_mod
from archive_kms.operations.archive import JobSpec, abandon_running_job, submit_job
from archive_kms.operations.job_lease import JobLease, JobSupersededError
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import JobState
from archive_kms.storage import dedicated_azure_location, dedicated_s3_location, shared_s3_location
from archive_kms.storage.name_limits import name_problem, tenant_locations
from archive_kms.storage.naming import encode_name


def test_a_name_can_fit_the_dedicated_bucket_and_not_the_shared_prefix():
    dedicated = dedicated_s3_location("acme", sse_kms_key_arn=None)
    shared = shared_s3_location("acme", "archive-kms-shared")
    name = b"attachments/default/" + b"a" * (1024 - len(encode_name(b"attachments/default/")))
    assert name_problem(dedicated, name) is None
    problem = name_problem(shared, name)
    assert problem is not None and "1037 bytes" in problem.reason and "'tenants/acme/'" in problem.reason
    assert tenant_locations(dedicated, "archive-kms-shared", None) == [dedicated, shared]
    assert tenant_locations(shared, "archive-kms-shared", None) == [shared]


def test_azure_counts_characters_of_the_blob_name():
    loc = dedicated_azure_location("acme", account="devstoreaccount1")
    assert name_problem(loc, "é".encode() * 170) is None  # 340 bytes -> 1020 characters
    problem = name_problem(loc, "é".encode() * 171)
    assert problem is not None and "1026 characters" in problem.reason


class _State:
    """A lease store whose renewals answer ``expires`` or raise."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.refuse = seconds, False

    def renew_job_lease(self, job_id: str, attempt: int) -> datetime:
        if self.refuse:
            raise FencedError("taken over")
        return datetime.now(UTC) + timedelta(seconds=self.seconds)


def test_a_lease_refused_by_the_store_stops_the_writer():
    state = _State(30)
    lease = JobLease(state, "j", 1).start()
    lease.check()
    state.refuse = True
    lease._renew()
    with pytest.raises(JobSupersededError, match="taken over"):
        lease.check()
    lease.stop()


def test_a_writer_past_its_own_deadline_stops_without_asking_anyone():
    """What a process frozen past its lease finds when it wakes: the deadline is gone."""
    state = _State(0.5)
    lease = JobLease(state, "j", 1)
    lease._renew()  # no heartbeat thread: as if frozen right after the renewal
    lease.check()
    time.sleep(0.5)
    with pytest.raises(JobSupersededError, match="ran out before it could be renewed"):
        lease.check()


def _platform() -> Platform:
    p = Platform.in_memory()
    create_tenant(p, "acme", provision_storage=False)
    return p


def test_a_writer_abandoned_mid_job_stops_writing_and_its_output_is_rolled_back(monkeypatch):
    p = _platform()
    spec = JobSpec("job-a", "acme", "synthetic", synthetic={"count": 10, "seed": 2})
    real, calls = archive_mod.TenantArchive.put_object, {"n": 0}

    def abandon_after_three(self, name, ws, chunks, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # support gives the job up while it writes
            p.state.abandon_job("acme", "job-a", reason="hung", actor="support:x")
        return real(self, name, ws, chunks, **kw)

    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", abandon_after_three)
    monkeypatch.setattr("archive_kms.operations.job_lease.VERIFY_EVERY", 0.0)  # read the ledger on every check
    out = submit_job(p.state, spec, p.open_archive)
    assert out.decision == "superseded" and "abandoned" in out.message
    store = p.store_for(p.location_of("acme"))
    assert len(list(store.list())) == 3  # the fourth write was refused by the guard
    assert p.state.get_job("job-a").state is JobState.FAILED
    with pytest.raises(Exception, match="not rolled back yet"):  # no retry races the rollback
        submit_job(p.state, spec, p.open_archive)
    monkeypatch.undo()
    done = abandon_running_job(
        p.state, p.open_archive, "acme", "job-a", reason="hung", actor="support:x", sleep=lambda s: None
    )
    assert done.rollback.objects_deleted == 3 and list(store.list()) == []
    retry = submit_job(p.state, spec, p.open_archive)
    assert (retry.decision, retry.objects_already_there) == ("run", 0)
    assert [r.action for r in p.state.iter_audit(tenant_id="acme") if r.action.startswith("job.")] == [
        "job.superseded",
        "job.rolled_back",
        "job.run",
    ]
