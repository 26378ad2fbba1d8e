"""Kill -9 of the worker running an erase (and a rotate) run at its named crash points,
then a new worker resumes it (``--takeover``), on the real services (faults D1, issue #14).

The run is triggered here and executed by ``tests/flows/worker.py execute RUN`` armed with
``ARCHIVE_KMS_CRASH_AT``; the process SIGKILLs itself there, and ``worker.py resume RUN
--takeover`` finishes it. Then the end state must be exactly that of an uninterrupted run:
nothing lost (every object and document outside the scope intact), nothing of the scope
left (storage, index, keys), one signed erasure record that verifies, the evidence of the
first attempt kept, the lease released and the audit chain intact.

``make test`` runs a representative subset (each case starts two worker processes: about
10 s); ``make soak`` runs every point of every step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import es_documents
from erasure_fixtures import BUCKET_SECONDS, doc_ids, listing, two_buckets

from archive_kms.config import Settings
from archive_kms.crypto.signing import Verifier
from archive_kms.migration import trigger
from archive_kms.migration.erase import ERASE_STEPS, certificate_json, plan_erase
from archive_kms.migration.rotate import ROTATE_STEPS
from archive_kms.migration.rotation_monitor import check_rotation, observe
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.erasure_record import verify_certificate
from archive_kms.operations.rotation import confirm_rotation, issue_confirmation
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import (
    RotationState,
    RunState,
)

WORKER = Path(__file__).with_name("worker.py")
KILLED = -signal.SIGKILL

ERASE_CI_POINTS = ["after:unindex", "erase:between-workspaces", "after:delete_objects"]
ERASE_ALL_POINTS = [f"{when}:{step}" for step in ERASE_STEPS for when in ("before", "after")] + [
    "erase:between-workspaces"
]

pytestmark = pytest.mark.slow


@pytest.fixture
def flow_settings(localstack: Settings, azurite: Settings, elasticsearch: Settings, keyvault: Settings, tmp_path):
    return localstack.model_copy(
        update={
            "state_url": f"sqlite:///{tmp_path / 'state.db'}",
            "lease_ttl_seconds": 3,
            "dek_bucket_seconds": BUCKET_SECONDS,
        }
    )


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def outcome(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, f"the worker printed no outcome (exit {self.returncode}): {self.stderr[-3000:]}"
        return json.loads(lines[-1])


def worker(settings: Settings, *args: str, crash_at: str | None = None, timeout: float = 180) -> Finished:
    env = {k: v for k, v in os.environ.items() if k != "ARCHIVE_KMS_CRASH_AT"}
    env.update(
        ARCHIVE_KMS_STATE_URL=settings.state_url,
        ARCHIVE_KMS_LEASE_TTL_SECONDS=str(settings.lease_ttl_seconds),
        ARCHIVE_KMS_DEK_BUCKET_SECONDS=str(settings.dek_bucket_seconds),
        PYTHONUNBUFFERED="1",
    )
    if crash_at:
        env["ARCHIVE_KMS_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    return Finished(proc.returncode, proc.stdout, proc.stderr)


def kill_then_resume(settings: Settings, run_id: str, point: str) -> dict[str, Any]:
    killed = worker(settings, "execute", run_id, crash_at=point)
    assert killed.returncode == KILLED, f"expected SIGKILL at {point}, got {killed.returncode}: {killed.stderr[-3000:]}"
    done = worker(settings, "resume", run_id, "--takeover")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.outcome.get("state") == RunState.COMPLETED.value, done.outcome
    return done.outcome


def erase_case(flow_settings: Settings, flow_platform: Any, tid: str, point: str) -> None:
    p = flow_platform
    data = two_buckets(p, tid, cloud="s3")
    index = p.index.current_index(tid)
    run, created = trigger(p, plan_erase(p, tid, before=data.cutoff, reason=f"crash at {point}"), actor="test")
    assert created
    kill_then_resume(flow_settings, run.run_id, point)

    assert listing(p, tid) == data.new  # 0 lost, nothing of the scope left
    assert {d["_id"] for d in es_documents(p, index)} == doc_ids(p, tid, data.new_records)
    archive = p.open_archive(tid)
    for name in data.new:
        b"".join(archive.read_object(name))
    completed = p.state.get_run(run.run_id)
    check = verify_certificate(
        certificate_json(completed), Verifier.from_public_pem(p.require_signer().public_key_pem())
    )
    assert check.ok, check.reason
    # the keychain's signed records of the first attempt are in it, whichever attempt destroyed the keys
    assert check.certificate.dek_ids_destroyed >= 2 and check.certificate.storage["objects_deleted"] == len(data.old)
    records = [r for r in p.state.iter_audit(tenant_id=tid) if r.action == "erasure.record"]
    assert len(records) == 1, "one signed erasure record per run, whatever the crashes"
    assert p.state.get_lease(tid) is None
    assert p.state.verify_audit(tenant_id=tid).ok


@pytest.mark.parametrize("point", ERASE_CI_POINTS)
def test_kill_9_during_erase_then_resume_converges(flow_settings, flow_platform, new_tenant_id, point):
    erase_case(flow_settings, flow_platform, new_tenant_id(), point)


@pytest.mark.soak
@pytest.mark.parametrize("point", [p for p in ERASE_ALL_POINTS if p not in ERASE_CI_POINTS])
def test_kill_9_at_every_erase_point_then_resume_converges(flow_settings, flow_platform, new_tenant_id, point):
    erase_case(flow_settings, flow_platform, new_tenant_id(), point)


# --- rotate -------------------------------------------------------------------------------------

ROTATE_CI_POINTS = ["after:pause", "rotate:after-rewrap-commit", "after:cutover"]
ROTATE_ALL_POINTS = [f"{when}:{step}" for step in ROTATE_STEPS for when in ("before", "after")] + [
    "rotate:after-rewrap-commit"
]
#: Points the first execution reaches before it waits for the confirmation.
BEFORE_THE_WAIT = {"before:preflight", "after:preflight", "before:pause", "after:pause", "before:confirm"}


def _confirm(p: Any, tid: str) -> None:
    rotation = p.state.find_open_rotation(tid)
    assert rotation.state is RotationState.AWAITING
    conf = issue_confirmation(p, tid, rotation.rotation_id, confirmed_by="alice")
    confirm_rotation(p, conf.to_json(), tenant_id=tid, actor="test")


def rotate_case(flow_settings: Settings, flow_platform: Any, tid: str, key_ref: str, point: str) -> None:
    from archive_kms import clients
    from archive_kms.migration import engine

    p = flow_platform
    create_tenant(p, tid, cloud="s3", key_ref=key_ref, actor="test")
    spec = JobSpec(f"{tid}-a", tid, "synthetic", synthetic={"count": 8, "seed": 3, "offset": 0})
    assert submit_job(p.state, spec, p.open_archive).decision == "run"
    old_index = p.index.current_index(tid)
    assert observe(p, tid) is None
    clients.kms_client(flow_settings).rotate_key_on_demand(KeyId=key_ref.removeprefix("aws-kms://"))
    _, rotation, run = check_rotation(p, tid, actor="test")

    if point in BEFORE_THE_WAIT:
        killed = worker(flow_settings, "execute", run.run_id, crash_at=point)
    else:
        assert engine.execute(p, run.run_id, actor="test", handle_signals=False).state == engine.WAITING
        _confirm(p, tid)
        killed = worker(flow_settings, "resume", run.run_id, crash_at=point)
    assert killed.returncode == KILLED, f"expected SIGKILL at {point}, got {killed.returncode}: {killed.stderr[-3000:]}"
    done = worker(flow_settings, "resume", run.run_id, "--takeover")
    assert done.returncode == 0, done.stderr[-3000:]
    if done.outcome.get("state") == engine.WAITING:
        _confirm(p, tid)
        done = worker(flow_settings, "resume", run.run_id)
    assert done.outcome.get("state") == RunState.COMPLETED.value, done.outcome

    assert p.keychain.status(tid).l1_generation == 2  # re-wrapped exactly once
    finished = p.state.get_run(run.run_id)
    assert (finished.step("rewrap").result["provider_wraps"], finished.step("rewrap").result["provider_unwraps"]) in (
        (1, 1),
        (0, 0),  # the kill came after the keychain's commit: the rerun found it done
    )
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.COMPLETED
    assert p.index.current_index(tid) != old_index
    assert [g.index for g in p.index.list_generations(tid)] == [p.index.current_index(tid)]
    p.keychain.cache.purge(tid)
    result = p.open_archive(tid).search(Query(limit=100))
    assert not result.failures and len(result.hits) == 8  # 0 lost
    assert p.state.gate(tid).state.value == "open"
    assert p.state.get_lease(tid) is None
    assert p.state.verify_audit(tenant_id=tid).ok


@pytest.mark.parametrize("point", ROTATE_CI_POINTS)
def test_kill_9_during_rotation_then_resume_converges(flow_settings, flow_platform, new_tenant_id, customer_key, point):
    rotate_case(flow_settings, flow_platform, new_tenant_id(), customer_key("byokms", "s3"), point)


@pytest.mark.soak
@pytest.mark.parametrize("point", [p for p in ROTATE_ALL_POINTS if p not in ROTATE_CI_POINTS])
def test_kill_9_at_every_rotate_point_then_resume_converges(
    flow_settings, flow_platform, new_tenant_id, customer_key, point
):
    rotate_case(flow_settings, flow_platform, new_tenant_id(), customer_key("byokms", "s3"), point)
