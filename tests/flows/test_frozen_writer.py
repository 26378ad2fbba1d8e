"""A hung archive writer never blocks a migration, and never writes after it wakes up
(issue 10, defect 6), on the real services.

The writer is a real ``archive-kms archive`` process frozen by SIGSTOP in the middle of
a write (``ARCHIVE_KMS_FREEZE_AT=job:chunk@16``: the 10th MiB of a 12 MiB attachment, its
first multipart part already sent, six objects of the job stored before it). Its job
lease is 3 s.

* ``enable`` starts while it is frozen: ``pause`` fences the job once its lease expired,
  rolls back the six objects, aborts the unfinished upload and proceeds; the run
  completes and the tenant holds exactly what was archived before the job.
* SIGCONT: the writer finds its lease gone, writes nothing more (the old location stays
  empty, the new one unchanged) and exits 1 reporting ``superseded``. Sending the job
  again archives it once, into the new location.
* Support gives up a frozen job by hand (``archive-kms jobs abandon``): audited, rolled
  back once its lease ran out; the woken writer again writes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import invariants, run_plan, storage_snapshot

from archive_kms.migration import plan_enable
from archive_kms.operations.verification import verify_tenant
from archive_kms.state.port import JobState, RunState

CLI = str(Path(sys.executable).parent / "archive-kms")
LEASE_SECONDS = 3
BIG = 12 * 1024 * 1024


def job_file(folder: Path) -> Path:
    """Three records with a small attachment each, then one with a 12 MiB attachment:
    chunks 1-6 are the first six objects, 7-18 the big attachment."""
    lines = []
    for i in range(4):
        size = BIG if i == 3 else 1000
        (folder / f"a{i}.bin").write_bytes(os.urandom(size))
        lines.append(
            {
                "object_type": "Case",
                "record_id": f"500FRZ{i:012d}",
                "fields": {"Subject": f"frozen writer {i}"},
                "attachments": [{"attachment_id": f"00PFRZ{i:012d}", "file_name": f"a{i}.bin", "path": f"a{i}.bin"}],
            }
        )
    path = folder / "job.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def cli_env(settings) -> dict[str, str]:
    return {
        **os.environ,
        "ARCHIVE_KMS_STATE_URL": settings.state_url,
        "ARCHIVE_KMS_JOB_LEASE_TTL_SECONDS": str(LEASE_SECONDS),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    }


def start_frozen_writer(settings, tenant: str, job: str, path: Path) -> subprocess.Popen:
    writer = subprocess.Popen(
        [CLI, "archive", tenant, "--jsonl", str(path), "--job-id", job],
        env={**cli_env(settings), "ARCHIVE_KMS_FREEZE_AT": "job:chunk@16"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = Path(f"/proc/{writer.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return writer
        if writer.poll() is not None:
            raise AssertionError(f"the writer exited before freezing: {writer.stderr.read()[-2000:]}")
        time.sleep(0.1)
    writer.kill()
    raise AssertionError("the writer never reached its freeze point")


def wake(writer: subprocess.Popen) -> tuple[int, str, str]:
    os.kill(writer.pid, signal.SIGCONT)
    out, err = writer.communicate(timeout=120)
    return writer.returncode, out, err


def actions(p, tenant: str) -> list[str]:
    return [r.action for r in p.state.iter_audit(tenant_id=tenant)]


def test_a_frozen_writer_is_fenced_and_the_migration_proceeds(
    flow_platform, flow_settings, archived_tenant, customer_key, tmp_path
):
    p = flow_platform
    archived = archived_tenant("s3", records=6)
    t = archived.tenant_id
    job = f"{t}-frozen"
    writer = start_frozen_writer(flow_settings, t, job, job_file(tmp_path))
    try:
        source = p.location_of(t)
        assert len(storage_snapshot(p, t)) == len(archived.snapshot) + 6  # its first six objects
        assert p.state.get_job(job).state is JobState.RUNNING

        started = time.monotonic()
        out = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms"), shards=2))
        assert out.state == RunState.COMPLETED.value, out.error
        pause = p.state.get_run(out.run_id).step("pause").result
        assert pause["jobs_rolled_back"] == [
            {"job_id": job, "attempt": 1, "objects_deleted": 6, "documents_deleted": 0}
        ], pause
        assert pause["aborted_uploads"] >= 1  # the big attachment's unfinished multipart upload
        assert time.monotonic() - started < 240  # not the old 300 s wait in pause
        figures = invariants(p, t, archived.snapshot)  # exactly what was archived before the job
        assert figures["objects"] == len(archived.snapshot)
        fenced = p.state.get_job(job)
        assert fenced.state is JobState.FAILED and fenced.error.startswith("superseded: lease expired")
        assert {"job.fenced", "job.rolled_back"} <= set(actions(p, t))
    finally:
        code, _, err = wake(writer)

    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "lost its lease and stopped writing" in err
    time.sleep(1)  # anything the woken writer still sent would land by now
    assert list(p.store_for(source).list()) == []  # nothing written to the old location
    assert list(p.store_for(source).pending_uploads()) == []
    invariants(p, t, archived.snapshot)  # the new location unchanged
    assert "job.superseded" in actions(p, t)

    # The writer sends the job again: archived once, into the tenant's new location.
    again = subprocess.run(
        [CLI, "archive", t, "--jsonl", str(tmp_path / "job.jsonl"), "--job-id", job, "--json"],
        env=cli_env(flow_settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    body = json.loads(again.stdout)
    assert (body["decision"], body["records"], body["objects_written"]) == ("run", 4, 8)
    assert verify_tenant(p, t)["ok"]


def test_support_abandons_a_frozen_job(flow_platform, flow_settings, archived_tenant, tmp_path):
    p = flow_platform
    archived = archived_tenant("s3", records=4)
    t = archived.tenant_id
    job = f"{t}-hung"
    writer = start_frozen_writer(flow_settings, t, job, job_file(tmp_path))
    try:
        listed = subprocess.run(
            [CLI, "jobs", "running", t, "--json"], env=cli_env(flow_settings), capture_output=True, text=True
        )
        assert [r["job_id"] for r in json.loads(listed.stdout)] == [job]
        abandoned = subprocess.run(
            [CLI, "jobs", "abandon", t, job, "--reason", "writer hung in a write", "--actor", "support:test", "--json"],
            env=cli_env(flow_settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert abandoned.returncode == 0, abandoned.stderr[-2000:]
        body = json.loads(abandoned.stdout)
        assert (body["objects_deleted"], body["documents_deleted"]) == (6, 0)
        assert storage_snapshot(p, t) == archived.snapshot
        record = next(r for r in p.state.iter_audit(tenant_id=t) if r.action == "job.abandoned")
        assert record.actor == "support:test" and record.details["reason"] == "writer hung in a write"
        assert p.state.get_job(job).error.startswith("abandoned: by support:test")
    finally:
        code, _, err = wake(writer)
    assert code == 1 and "Traceback" not in err and "lost its lease" in err, err[-3000:]
    time.sleep(1)
    store = p.store_for(p.location_of(t))
    assert list(store.pending_uploads()) == []  # the woken writer aborted the upload it had begun
    assert storage_snapshot(p, t) == archived.snapshot  # and wrote nothing after waking
    assert verify_tenant(p, t)["ok"]
