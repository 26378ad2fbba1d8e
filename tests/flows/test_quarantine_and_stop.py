"""Poison objects and a graceful stop, on the real services (LocalStack S3 + KMS,
Elasticsearch, the stack's Prefect server; faults D9, A11, A12, F3, D3; ADR 0006).

Quarantine: one source object of a tenant has a byte of its stored ciphertext flipped
(raw boto3, behind the product's back) and another tenant's object is copied under the
tenant's prefix. The enable run verifies everything else and stops before cutover with
both quarantined; support waives them with ``archive-kms runs waive`` (audited) and
``archive-kms runs resume`` completes. Then I1-I5 hold for the rest, the audit chain
verifies and holds the waivers, and both poison objects are still in the source, where
the report says.

Graceful stop: the real ``archive-kms enable`` (a Prefect flow, shard tasks on Prefect's
thread runner, default fan-out) gets SIGTERM half way through the copy. It exits within
the bound, the run is failed with "stopped by signal", no multipart upload is left at the
destination, and ``archive-kms runs resume`` (no --takeover, although the lease TTL is
two minutes) completes with I1-I5 intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import invariants, storage_snapshot

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.domain.records import AttachmentRef, Record
from archive_kms.migration import MigrationPlan, plan_enable
from archive_kms.migration.quarantine import WAIVE_ACTION, Quarantine, display_name
from archive_kms.operations.archive import ATTACHMENT_PREFIX, RECORD_PREFIX, JobSpec, submit_job
from archive_kms.state.port import CopyStatus, RunState, StepState
from archive_kms.storage import Location
from archive_kms.storage.naming import object_key

CLI = Path(sys.executable).with_name("archive-kms")
#: The lease of the CLI processes: long, so a resume that works at once proves the stopped
#: run released it (with a live lease a plain resume is refused).
CLI_LEASE_TTL_SECONDS = 120
#: How long a SIGTERMed `archive-kms enable` may take to exit (default fan-out).
STOP_BOUND_SECONDS = 30
MiB = 1024 * 1024

pytestmark = pytest.mark.slow


# --- the real CLI in a subprocess ------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-4000:]}"

    def json(self) -> Any:
        return json.loads(self.stdout)


def in_this_process(args: tuple[str, ...]) -> list[str]:
    """``enable``/``remove``/``runs resume|rerun|cancel`` submit to a deployment unless given
    ``--wait``: these tests run the flow in the CLI process itself (its crash points, its
    signals, this test's own state store)."""
    flows = {("enable",), ("remove",), ("runs", "resume"), ("runs", "rerun"), ("runs", "cancel")}
    if tuple(args[:1]) in flows or tuple(args[:2]) in flows:
        return [*args, "--wait"]
    return list(args)


class Cli:
    """``archive-kms`` processes on this test's state store."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if k != "ARCHIVE_KMS_CRASH_AT"}
        self.env.update(
            ARCHIVE_KMS_STATE_URL=settings.state_url,
            ARCHIVE_KMS_LEASE_TTL_SECONDS=str(CLI_LEASE_TTL_SECONDS),
            PYTHONUNBUFFERED="1",
        )
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path, Path]:
        n = len(self.procs)
        out, err = self.logs / f"cli{n}.out", self.logs / f"cli{n}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [str(CLI), *in_this_process(args)], stdout=o, stderr=e, env={**self.env, **(env or {})}
            )
        self.procs.append(proc)
        return proc, out, err

    def run(self, *args: str, timeout: float = 240) -> Done:
        proc, out, err = self.start(*args)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"archive-kms {' '.join(args)} still running after {timeout} s:\n{err.read_text()[-3000:]}")
        return Done(rc, out.read_text(), err.read_text())

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def cli(flow_settings: Settings, tmp_path: Path):
    logs = tmp_path / "cli"
    logs.mkdir()
    c = Cli(flow_settings, logs)
    yield c
    c.reap()


# --- settled -------------------------------------------------------------------------------------------


def assert_settled_without(
    platform: Any, tenant_id: str, run_id: str, snapshot: dict[bytes, str], waived: set[bytes]
) -> dict[str, Any]:
    """Completed, and I1-I5 for everything but ``waived``: the tenant's data is whole,
    single and byte-identical, ledger verified == manifest - waived == destination listing
    (names and etags), index == records, no pending upload, lease released, gate open;
    and the audit chain verifies."""
    run = platform.state.get_run(run_id)
    assert run.state is RunState.COMPLETED, [(s.name, s.state.value, s.error) for s in run.steps]
    assert all(s.state is StepState.COMPLETED for s in run.steps)
    facts = invariants(platform, tenant_id, {n: d for n, d in snapshot.items() if n not in waived})
    manifest = {e.name for e in platform.state.iter_manifest(run_id)}
    verified = {c.name: c for c in platform.state.iter_copies(run_id, status=CopyStatus.VERIFIED)}
    dest = platform.store_for(MigrationPlan.from_params(run.params).destination_location)
    listing = {i.name: i.etag for i in dest.list()}
    assert set(verified) == manifest - waived == set(listing)
    assert all(verified[n].dest_etag == listing[n] for n in listing), "a ledger etag differs from the stored object"
    # The keyed plaintext digests served verify and were purged by the report (issue #11 finding 5);
    # the plaintext itself is compared with the snapshot by ``invariants``.
    assert all(c.plaintext_sha256 is None for c in platform.state.iter_copies(run_id))
    audit = platform.state.verify_audit()
    assert audit.ok, audit
    return facts


# --- quarantine on S3 ----------------------------------------------------------------------------------


def _s3_key(loc: Location, name: bytes) -> str:
    return object_key(loc.prefix, name)


def test_corrupt_and_foreign_sources_are_quarantined_waived_and_kept(
    flow_platform, archived_tenant, customer_key, cli, prefect_api
):
    p = flow_platform
    archived = archived_tenant("s3", records=15, seed=31)
    other = archived_tenant("s3", records=6, seed=33)
    t = archived.tenant_id
    src = p.location_of(t)
    s3 = clients.aws_client("s3", p.settings)

    # One byte of one record's stored ciphertext flipped (A12 at the source).
    corrupt = sorted(n for n in archived.snapshot if n.startswith(RECORD_PREFIX))[2]
    body = bytearray(s3.get_object(Bucket=src.bucket, Key=_s3_key(src, corrupt))["Body"].read())
    body[len(body) - 30] ^= 0x04
    s3.put_object(Bucket=src.bucket, Key=_s3_key(src, corrupt), Body=bytes(body))
    # Another tenant's object under this tenant's prefix (F3).
    other_loc = p.location_of(other.tenant_id)
    theirs = sorted(n for n in other.snapshot if n.startswith(ATTACHMENT_PREFIX))[0]
    prefix, ws, attachment_id = theirs.split(b"/", 2)
    foreign = b"/".join((prefix, ws, b"planted-" + attachment_id))
    s3.copy_object(
        Bucket=src.bucket,
        Key=_s3_key(src, foreign),
        CopySource={"Bucket": other_loc.bucket, "Key": _s3_key(other_loc, theirs)},
    )
    foreign_body = s3.get_object(Bucket=src.bucket, Key=_s3_key(src, foreign))["Body"].read()

    plan = plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=4)
    first = cli.run("enable", t, "--mode", "byokms", "--key-ref", plan.key_ref, "--shards", "4", "--json")
    assert first.returncode == 1, first.describe()
    outcome = first.json()["outcome"]
    run_id = outcome["run_id"]
    assert outcome["state"] == "failed" and outcome["message"] == "step verify failed", outcome
    assert outcome["error"].startswith("ObjectsQuarantinedError: 2 object(s) quarantined"), outcome
    assert f"archive-kms runs waive {run_id} --object NAME --reason" in outcome["error"]
    assert f"archive-kms runs rerun {run_id} --from copy" in outcome["error"]
    assert "stopped before cutover" in first.stderr, first.describe()

    # Stopped before cutover, both quarantined with their reason, everything else verified.
    run = p.state.get_run(run_id)
    assert run.state is RunState.FAILED and run.step("cutover").state is StepState.PENDING
    assert p.state.get_tenant(t).location == plan.source
    counts = p.state.copy_counts(run_id)
    assert counts == {CopyStatus.VERIFIED: len(archived.snapshot) - 1, CopyStatus.QUARANTINED: 2}, counts
    kinds = {n: Quarantine.from_error(p.state.get_copy(run_id, n).error).kind for n in (corrupt, foreign)}
    assert kinds == {corrupt: "corrupt", foreign: "foreign"}
    shown = cli.run("runs", "show", run_id, "--json")
    report = shown.json()
    assert (report["quarantined"], report["waived"]) == (2, 0), report
    assert {q["object"] for q in report["quarantine"]} == {display_name(corrupt), display_name(foreign)}

    # Support waives them, one by name and the rest with --all; each an audit record.
    one = cli.run(
        "runs",
        "waive",
        run_id,
        "--object",
        display_name(corrupt),
        "--reason",
        "INC-1: record restored from the customer's export",
        "--actor",
        "support:alice",
        "--json",
    )
    assert one.returncode == 0, one.describe()
    assert one.json()["waived"] == [display_name(corrupt)] and one.json()["remaining"] == 1
    rest = cli.run(
        "runs",
        "waive",
        run_id,
        "--all",
        "--reason",
        "INC-2: foreign object reported to security",
        "--actor",
        "support:bob",
        "--json",
    )
    assert rest.returncode == 0 and rest.json()["waived"] == [display_name(foreign)], rest.describe()

    resumed = cli.run("runs", "resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.describe()
    answer = resumed.json()
    assert answer["outcome"]["state"] == "completed", answer["outcome"]
    assert answer["outcome"]["executed"][0] == "verify", answer["outcome"]

    waived = {corrupt, foreign}
    facts = assert_settled_without(p, t, run_id, archived.snapshot, waived)
    assert facts["objects"] == len(archived.snapshot) - 1
    final = answer["report"]
    assert (final["quarantined"], final["waived"]) == (2, 2)
    assert final["quarantine_kept_at"] == src.uri
    assert final["reconciliation"].startswith(f"manifest {len(archived.snapshot) + 1} - quarantined 2 (2 waived)")
    assert final["reconciliation"].endswith("manifest records - 1 waived"), final["reconciliation"]
    assert {(q["object"], q["waived_by"], q["source"]) for q in final["quarantine"]} == {
        (display_name(corrupt), "support:alice", src.uri),
        (display_name(foreign), "support:bob", src.uri),
    }

    # The audit chain holds the waivers.
    waivers = [r for r in p.state.iter_audit(tenant_id=t) if r.action == WAIVE_ACTION]
    assert sorted((r.actor, r.details["object"], r.details["reason"], r.run_id) for r in waivers) == [
        ("support:alice", display_name(corrupt), "INC-1: record restored from the customer's export", run_id),
        ("support:bob", display_name(foreign), "INC-2: foreign object reported to security", run_id),
    ]
    assert p.state.verify_audit(tenant_id=t).ok

    # The quarantined sources still exist, byte for byte, where the report says; nothing else does.
    left = {i.name for i in p.store_for(src).list()}
    assert left == waived, left
    assert s3.get_object(Bucket=src.bucket, Key=_s3_key(src, corrupt))["Body"].read() == bytes(body)
    assert s3.get_object(Bucket=src.bucket, Key=_s3_key(src, foreign))["Body"].read() == foreign_body
    cleanup = p.state.get_run(run_id).step("cleanup_source").result
    assert (cleanup["kept"], cleanup["kept_at"]) == (2, src.uri)


# --- SIGTERM mid-copy ------------------------------------------------------------------------------------


def _stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _big_job(tenant_id: str, files: Path) -> JobSpec:
    """Two records whose attachments (> one 8 MiB part) are copied with multipart uploads."""
    records, paths = [], {}
    for i, size in enumerate((10 * MiB + 123, 9 * MiB + 45)):
        attachment_id = f"00PSTOP{i:011d}"
        path = files / f"{attachment_id}.bin"
        path.write_bytes(os.urandom(size))
        paths[attachment_id] = str(path)
        record = Record(
            "Case",
            f"500STOP{i:011d}",
            {"Name": f"stop case {i}", "Status": "Open"},
            (AttachmentRef(attachment_id, f"scan-{i}.bin", size),),
            "ws0",
        )
        records.append(json.loads(record.to_json()))
    return JobSpec(f"{tenant_id}-big", tenant_id, "inline", tuple(records), paths)


def test_sigterm_mid_copy_stops_gracefully_and_runs_resume_completes(
    flow_platform, archived_tenant, customer_key, cli, prefect_api, tmp_path
):
    p = flow_platform
    archived = archived_tenant("s3", records=120, seed=41)
    t = archived.tenant_id
    files = tmp_path / "big"
    files.mkdir()
    big = submit_job(p.state, _big_job(t, files), p.open_archive)
    assert big.decision == "run" and big.attachments == 2, big
    snapshot = storage_snapshot(p, t)
    total = len(snapshot)
    key_ref = customer_key("byokms", "s3")

    # The process freezes itself (SIGSTOP, every thread) once its first batch of ledger rows
    # is durable: the copy is caught mid-way whatever the machine's speed. SIGTERM stays
    # pending while it is stopped and is delivered on SIGCONT.
    proc, out, err = cli.start(
        "enable", t, "--mode", "byokms", "--key-ref", key_ref, "--json",  # default fan-out
        env={"ARCHIVE_KMS_FREEZE_AT": "copy:after-record@1"},
    )  # fmt: skip
    run_id, copied_at_signal = None, 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"archive-kms enable exited ({proc.returncode}) before its copy froze:\n{err.read_text()[-3000:]}"
            )
        if _stopped(proc.pid):
            run = p.state.find_active_run(t)
            assert run is not None and run.step("copy").state is StepState.RUNNING, run
            run_id, copied_at_signal = run.run_id, p.state.copy_counts(run.run_id).get(CopyStatus.COPIED, 0)
            break
        time.sleep(0.02)
    assert run_id is not None, "the copy never reached its first durable ledger batch"
    assert 0 < copied_at_signal < total, (copied_at_signal, total)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    try:
        rc = proc.wait(timeout=STOP_BOUND_SECONDS + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"archive-kms enable did not exit within {STOP_BOUND_SECONDS + 30} s of SIGTERM")
    took = time.monotonic() - signalled
    stdout, stderr = out.read_text(), err.read_text()
    assert took < STOP_BOUND_SECONDS, f"took {took:.1f} s to stop"
    assert rc == 1, f"exit {rc}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    answer = json.loads(stdout)
    assert answer["outcome"]["state"] == "failed", answer["outcome"]
    assert answer["outcome"]["message"] == "stopped by signal (SIGTERM)", answer["outcome"]
    assert "stopped by signal (SIGTERM) at step copy" in stderr and f"runs resume {run_id}" in stderr

    # Recorded as a graceful stop, not a crash.
    run = p.state.get_run(run_id)
    assert run.state is RunState.FAILED
    copy = run.step("copy")
    assert copy.state is StepState.FAILED and "stopped by signal" in copy.error, copy
    assert p.state.get_lease(t) is None, "the stopped run kept its lease"
    counts = p.state.copy_counts(run_id)
    assert set(counts) == {CopyStatus.COPIED} and copied_at_signal <= counts[CopyStatus.COPIED] < total, counts
    dest = p.store_for(MigrationPlan.from_params(run.params).destination_location)
    assert not list(dest.pending_uploads()), "a multipart upload was left open at the destination"
    recorded = {c.name for c in p.state.iter_copies(run_id)}
    assert {i.name for i in dest.list()} == recorded, "committed objects without their ledger rows"
    stops = [a for a in p.state.iter_audit(tenant_id=t) if a.action == "run.stop"]
    assert [(a.run_id, a.details["step"]) for a in stops] == [(run_id, "copy")]
    assert json.loads(cli.run("runs", "show", run_id, "--json").stdout)["state"] == "failed"

    resumed = cli.run("runs", "resume", run_id, "--json")  # no --takeover, no waiting for the 120 s lease
    assert resumed.returncode == 0, resumed.describe()
    outcome = resumed.json()["outcome"]
    assert outcome["state"] == "completed" and outcome["executed"][0] == "copy", outcome
    copy_result = p.state.get_run(run_id).step("copy").result
    assert copy_result["objects"] == total - len(recorded), (copy_result, len(recorded))
    assert_settled_without(p, t, run_id, snapshot, set())
