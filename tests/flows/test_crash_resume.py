"""Kill -9 of the migration worker, a stalled worker after takeover, rerun of a completed
step and two simultaneous enables, on the real services (issue 6; faults D1, D5, D7, E3,
A5, A7).

The engine runs in worker processes (``tests/flows/worker.py``) on LocalStack S3 + KMS,
Elasticsearch and a per-test SQLite state store shared with this process. A worker armed
with a crash point (``ARCHIVE_KMS_CRASH_AT``) SIGKILLs itself there; a new worker resumes
the run, after the dead worker's lease expires or at once with ``--takeover``. Then the
run must be completed and the tenant settled (``assert_settled``): ``invariants`` (0 lost,
0 duplicated, byte-identical plaintext, index == storage, no pending uploads, lease
released, gate open), ledger == manifest == destination listing (names and etags), one
run for the tenant, and the audit chain verifies.

Every ``after:<step>`` point runs (side effects done, completion not recorded: the hardest
case); of the ``before:<step>`` points a representative subset runs (nothing of the step
happened yet, so they are the easier half; each case costs ~8-15 s: two worker processes,
a tenant and a full run). Most resumes take over at once (``--takeover``); a few wait for
the dead worker's lease to expire instead, so both ways in are exercised.

In the middle of the copy: ``copy:mid-object`` / ``copy:after-put`` / ``copy:after-record``
at the K-th object, an external SIGKILL while the ledger is half full, and
``test:after-upload-part`` (injected by worker.py): ``copy:mid-object`` fires on an object's
first plaintext chunk, before its store has started any upload, so only a kill after an
UploadPart leaves a multipart upload in flight for certain.

Cost: every case starts two or three Python processes and runs a whole migration; the file
takes ~5 min on a quiet 2-CPU machine, ~7-8 min on a busy one.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import invariants, run_plan, storage_snapshot, tenant_indices

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.domain.records import AttachmentRef, Record
from archive_kms.errors import FencedError
from archive_kms.migration import STEPS, MigrationPlan, plan_enable
from archive_kms.operations.archive import ATTACHMENT_PREFIX, JobSpec, submit_job
from archive_kms.state.port import CopyRecord, CopyStatus, RunState, StepState
from archive_kms.storage import Location

WORKER = Path(__file__).with_name("worker.py")
CLI = Path(sys.executable).with_name("archive-kms")
AFTER_UPLOAD_PART = "test:after-upload-part"  # injected by worker.py (see its docstring)
START_AT_ENV = "AKMS_WORKER_START_AT"
WORKER_LEASE_TTL_SECONDS = 3
SHARDS = 4
KILLED = -signal.SIGKILL
MiB = 1024 * 1024
#: Attachments bigger than the 8 MiB upload part: copied with multipart uploads.
BIG_ATTACHMENT_SIZES = (12 * MiB + 4321, 9 * MiB + 777)

AFTER_POINTS = [f"after:{step}" for step in STEPS]
BEFORE_POINTS = ["before:preflight", "before:cutover"]
#: Resumed after the killed worker's lease expired (no --takeover); the others take over.
EXPIRY_POINTS = {"after:bind_key", "after:copy", "after:cutover"}
MID_COPY_POINTS = ["copy:mid-object", "copy:after-put", "copy:after-record", AFTER_UPLOAD_PART, "external"]

pytestmark = pytest.mark.slow


# --- worker processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"worker exit {self.returncode}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-4000:]}"

    @property
    def outcome(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, f"the worker printed no outcome: {self.describe()}"
        return json.loads(lines[-1])


@dataclass
class Worker:
    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, timeout: float = 120) -> Finished:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"worker {self.pid} still running after {timeout} s; killed it. stderr:\n{self.err.read_text()[-4000:]}"
            )
        return Finished(rc, self.out.read_text(), self.err.read_text())


def in_this_process(args: tuple[str, ...]) -> list[str]:
    """``enable``/``remove``/``runs resume|rerun|cancel`` submit to a deployment unless given
    ``--wait``: these tests run the flow in the CLI process itself (its crash points, its
    signals, this test's own state store)."""
    flows = {("enable",), ("remove",), ("runs", "resume"), ("runs", "rerun"), ("runs", "cancel")}
    if tuple(args[:1]) in flows or tuple(args[:2]) in flows:
        return [*args, "--wait"]
    return list(args)


class Workers:
    """Starts ``worker.py`` processes on this test's state store, with a short lease."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self._env = {k: v for k, v in os.environ.items() if k != "ARCHIVE_KMS_CRASH_AT"}
        self._env.update(
            ARCHIVE_KMS_STATE_URL=settings.state_url,
            ARCHIVE_KMS_LEASE_TTL_SECONDS=str(WORKER_LEASE_TTL_SECONDS),
            PYTHONUNBUFFERED="1",
        )
        self._logs = logs
        self._started: list[Worker] = []

    def start(self, *args: str, crash_at: str | None = None, env: dict[str, str] | None = None) -> Worker:
        """``worker.py ARGS`` in a new process."""
        return self._spawn([sys.executable, str(WORKER), *args], crash_at, env)

    def run(self, *args: str, crash_at: str | None = None, timeout: float = 120) -> Finished:
        return self.start(*args, crash_at=crash_at).finish(timeout)

    def cli(self, *args: str, crash_at: str | None = None, timeout: float = 180) -> Finished:
        """The real ``archive-kms ARGS`` (Prefect flows on the stack's server), to the end."""
        return self._spawn([str(CLI), *in_this_process(args)], crash_at, None).finish(timeout)

    def _spawn(self, cmd: list[str], crash_at: str | None, env: dict[str, str] | None) -> Worker:
        n = len(self._started)
        out, err = self._logs / f"worker{n}.out", self._logs / f"worker{n}.err"
        full_env = dict(self._env, **(env or {}))
        if crash_at:
            full_env["ARCHIVE_KMS_CRASH_AT"] = crash_at
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=full_env)
        worker = Worker(proc, out, err)
        self._started.append(worker)
        return worker

    def reap(self) -> None:
        for w in self._started:
            if w.proc.poll() is None:
                os.kill(w.pid, signal.SIGCONT)  # a stopped process does not die of SIGKILL until continued
                w.proc.kill()
                w.proc.wait()


@pytest.fixture
def workers(flow_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    logs = tmp_path / "workers"
    logs.mkdir()
    w = Workers(flow_settings, logs)
    yield w
    w.reap()


def enable_args(tenant: Tenant) -> tuple[str, ...]:
    return ("enable", tenant.tenant_id, "byokms", tenant.key_ref, "--shards", str(SHARDS))


def assert_killed(finished: Finished, point: str) -> None:
    assert finished.returncode == KILLED, f"expected SIGKILL at {point}: {finished.describe()}"


def assert_completed(finished: Finished) -> dict[str, Any]:
    assert finished.returncode == 0, finished.describe()
    out = finished.outcome
    assert out.get("state") == RunState.COMPLETED.value, finished.describe()
    return out


# --- tenants ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    key_ref: str  # a fresh LocalStack KMS key (byokms)
    snapshot: dict[bytes, str]  # object name -> plaintext SHA-256 before the run


@pytest.fixture
def small_tenant(archived_tenant, customer_key) -> Callable[..., Tenant]:
    """15 records with attachments on shared S3, and a fresh customer key."""

    def make(seed: int = 11) -> Tenant:
        archived = archived_tenant("s3", records=15, seed=seed)
        return Tenant(archived.tenant_id, customer_key("byokms", "s3"), archived.snapshot)

    return make


def _big_records(tenant_id: str, files: Path) -> JobSpec:
    """An inline archive job: one record per size in BIG_ATTACHMENT_SIZES, each with one
    attachment of that many random bytes (written to ``files``)."""
    records, paths = [], {}
    for i, size in enumerate(BIG_ATTACHMENT_SIZES):
        attachment_id = f"00PBIG{i:012d}"
        path = files / f"{attachment_id}.bin"
        with path.open("wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, MiB))
                f.write(block)
                left -= len(block)
        paths[attachment_id] = str(path)
        record = Record(
            "Case",
            f"500BIG{i:012d}",
            {"Name": f"big case {i}", "Status": "Open"},
            (AttachmentRef(attachment_id, f"scan-{i}.bin", size),),
            "ws0",
        )
        records.append(json.loads(record.to_json()))
    return JobSpec(f"{tenant_id}-big", tenant_id, "inline", tuple(records), paths)


@pytest.fixture
def big_tenant(flow_platform, small_tenant, tmp_path: Path) -> Callable[[], Tenant]:
    """small_tenant plus records whose attachments need multipart uploads."""

    def make() -> Tenant:
        base = small_tenant(seed=12)
        files = tmp_path / "big"
        files.mkdir(exist_ok=True)
        out = submit_job(flow_platform.state, _big_records(base.tenant_id, files), flow_platform.open_archive)
        assert out.decision == "run" and out.attachments == len(BIG_ATTACHMENT_SIZES), out
        snapshot = storage_snapshot(flow_platform, base.tenant_id)
        assert len(snapshot) == len(base.snapshot) + 2 * len(BIG_ATTACHMENT_SIZES)
        return Tenant(base.tenant_id, base.key_ref, snapshot)

    return make


# --- observing the run -------------------------------------------------------------------------------


def the_run(platform: Any, tenant_id: str):
    runs = platform.state.list_runs(tenant_id)
    assert len(runs) == 1, f"tenant {tenant_id} has {len(runs)} runs: {[r.run_id for r in runs]}"
    return runs[0]


def destination_store(platform: Any, run) -> Any:
    return platform.store_for(MigrationPlan.from_params(run.params).destination_location)


def copied_names(platform: Any, run_id: str) -> dict[bytes, str | None]:
    """Ledger entries copied or verified: name -> destination etag."""
    return {
        c.name: c.dest_etag
        for c in platform.state.iter_copies(run_id)
        if c.status in (CopyStatus.COPIED, CopyStatus.VERIFIED)
    }


def wait_for_lease_expiry(platform: Any, tenant_id: str) -> None:
    """A killed worker never releases its lease: wait until it expires (at most one TTL
    after the last heartbeat), so a plain resume, without --takeover, may take it."""
    lease = platform.state.get_lease(tenant_id)
    assert lease is not None, "the killed worker's lease is gone: who released it?"
    left = (lease.expires_at - datetime.now(UTC)).total_seconds()
    assert left <= WORKER_LEASE_TTL_SECONDS + 0.5, f"lease runs {left:.1f} s more, longer than its TTL"
    time.sleep(max(0.0, left) + 0.3)


def assert_settled(platform: Any, tenant: Tenant, run_id: str) -> dict[str, Any]:
    """The run completed and the tenant's data is whole, single and consistent."""
    run = platform.state.get_run(run_id)
    assert run.state is RunState.COMPLETED, run.state
    assert all(s.state is StepState.COMPLETED for s in run.steps), [(s.name, s.state.value) for s in run.steps]
    assert [r.run_id for r in platform.state.list_runs(tenant.tenant_id)] == [run_id]
    facts = invariants(platform, tenant.tenant_id, tenant.snapshot)

    # ledger == manifest == destination listing, name by name and etag by etag
    manifest = {e.name for e in platform.state.iter_manifest(run_id)}
    assert manifest == set(tenant.snapshot), "the manifest is not the tenant's pre-run objects"
    ledger = list(platform.state.iter_copies(run_id))
    assert {c.status for c in ledger} == {CopyStatus.VERIFIED}, {c.status for c in ledger}
    assert len(ledger) == len(manifest) and {c.name for c in ledger} == manifest
    listing = {info.name: info.etag for info in destination_store(platform, run).list()}
    assert set(listing) == manifest
    stale = [c.name for c in ledger if c.dest_etag != listing[c.name]]
    assert not stale, f"{len(stale)} ledger etag(s) differ from the stored objects: {stale[:3]!r}"
    # The keyed plaintext digests served verify and were purged by the report (issue #11 finding 5);
    # the plaintext itself is compared with the snapshot by ``invariants``.
    assert all(c.plaintext_sha256 is None for c in ledger)

    audit = platform.state.verify_audit()
    assert audit.ok, audit
    return facts


def world(platform: Any, tenant: Tenant, run_id: str) -> dict[str, Any]:
    """Everything a migration run can change, for before/after comparisons."""
    run = platform.state.get_run(run_id)
    dest = destination_store(platform, run)
    current = platform.index.current_index(tenant.tenant_id)
    platform.index.refresh(current)
    audit = list(platform.state.iter_audit(tenant_id=tenant.tenant_id))
    return {
        "run": (
            run.state,
            [(s.name, s.state, s.attempt, s.finished_at, json.dumps(s.result, sort_keys=True)) for s in run.steps],
        ),
        "ledger": sorted(
            (c.name, c.status, c.dest_etag, c.dest_size, c.plaintext_sha256, c.error)
            for c in platform.state.iter_copies(run_id)
        ),
        "objects": sorted((i.name, i.etag, i.size) for i in dest.list()),
        "pending_uploads": sorted(u.key for u in dest.pending_uploads()),
        "tenant": platform.state.get_tenant(tenant.tenant_id),
        "index": (current, platform.index.count(current), tenant_indices(platform, tenant.tenant_id)),
        "lease": platform.state.get_lease(tenant.tenant_id),
        "gate": platform.state.gate(tenant.tenant_id),
        "audit": [(a.seq, a.action, a.actor, a.hash) for a in audit],
    }


# --- kill -9 at every step boundary ---------------------------------------------------------------


@pytest.mark.parametrize("point", AFTER_POINTS + BEFORE_POINTS)
def test_kill_at_step_boundary_then_resume(flow_platform, small_tenant, workers, point):
    p, tenant = flow_platform, small_tenant()
    step = point.split(":", 1)[1]

    killed = workers.run(*enable_args(tenant), crash_at=point)
    assert_killed(killed, point)
    run = the_run(p, tenant.tenant_id)
    assert run.state is RunState.RUNNING
    done = [s.name for s in run.steps if s.state is StepState.COMPLETED]
    assert done == list(STEPS[: STEPS.index(step)]), f"steps completed when killed {point}: {done}"
    assert run.step(step).state is StepState.RUNNING  # started, completion not recorded

    takeover = point not in EXPIRY_POINTS
    if not takeover:
        wait_for_lease_expiry(p, tenant.tenant_id)
    resumed = workers.run("resume", run.run_id, *(["--takeover"] if takeover else []))
    out = assert_completed(resumed)
    assert out["executed"] == list(STEPS[STEPS.index(step) :]), out
    assert_settled(p, tenant, run.run_id)


# --- kill -9 in the middle of the copy ------------------------------------------------------------


def stop_mid_copy(platform: Any, worker: Worker, tenant: Tenant, sig: signal.Signals, timeout: float = 90) -> str:
    """Send ``sig`` to ``worker`` once its copy has recorded some objects but not all;
    the run id."""
    total = len(tenant.snapshot)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(
                f"the worker exited (code {worker.proc.returncode}) before its copy was caught half way: "
                f"{worker.err.read_text()[-3000:]}"
            )
        run = platform.state.find_active_run(tenant.tenant_id)
        if run is not None and run.step("copy").state is StepState.RUNNING:
            counts = platform.state.copy_counts(run.run_id)
            if 0 < counts.get(CopyStatus.COPIED, 0) < total and not counts.get(CopyStatus.VERIFIED):
                os.kill(worker.pid, sig)
                return run.run_id
        time.sleep(0.02)
    pytest.fail(f"the copy was not caught half way within {timeout} s")


@pytest.mark.parametrize("point", MID_COPY_POINTS)
def test_kill_mid_copy_then_resume_redoes_only_objects_in_flight(flow_platform, big_tenant, workers, point):
    p, tenant = flow_platform, big_tenant()
    total = len(tenant.snapshot)
    if point == "external":
        worker = workers.start(*enable_args(tenant))
        stop_mid_copy(p, worker, tenant, signal.SIGKILL)
        killed = worker.finish()
    else:
        nth = 1 if point == AFTER_UPLOAD_PART else total // 2
        killed = workers.run(*enable_args(tenant), crash_at=f"{point}@{nth}")
    assert_killed(killed, point)

    run = the_run(p, tenant.tenant_id)
    assert run.step("copy").state is StepState.RUNNING
    time.sleep(0.5)  # requests the dead worker had fully sent may still be committing
    dest = destination_store(p, run)
    recorded = copied_names(p, run.run_id)
    listed = {info.name: info.etag for info in dest.list()}
    pending = list(dest.pending_uploads())
    assert len(recorded) < total, "the kill came after the copy had finished"
    assert set(recorded) <= set(listed), "the ledger records objects the destination does not have"
    if point == "copy:after-put":
        assert len(listed) > len(recorded), "killed after a put, yet every stored object is recorded"
    if point == "copy:after-record":
        assert len(recorded) >= total // 2
    if point == AFTER_UPLOAD_PART:
        big = {n for n in tenant.snapshot if n.startswith(ATTACHMENT_PREFIX) and b"00PBIG" in n}
        assert pending and {u.name for u in pending} <= big, f"no multipart upload in flight: {pending}"

    resumed = workers.run("resume", run.run_id, "--takeover")
    out = assert_completed(resumed)
    assert out["executed"][0] == "copy", out
    copy = p.state.get_run(run.run_id).step("copy").result
    # The resumed copy handled exactly what the ledger did not have; it wrote only what
    # was not committed at the kill and verified (not rewrote) what was committed but
    # unrecorded (faults A7).
    assert copy["objects"] == total - len(recorded), (copy, len(recorded), len(listed))
    assert copy["written"] == total - len(listed), (copy, len(recorded), len(listed))
    assert copy["already"] == len(listed) - len(recorded), (copy, len(recorded), len(listed))
    after = {info.name: info.etag for info in dest.list()}
    assert {n: after[n] for n in recorded} == recorded, "objects recorded before the kill were rewritten"
    assert not list(dest.pending_uploads()), "an incomplete multipart upload survived the resumed run"
    assert_settled(p, tenant, run.run_id)


# --- a stalled worker after a takeover ---------------------------------------------------------------


def _sqlite_path(settings: Settings) -> str:
    return settings.state_url.removeprefix("sqlite:///")


def _write_lock_free(db: str) -> bool:
    conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def stall_outside_a_write(worker: Worker, db: str) -> None:
    """A SIGSTOPped worker inside a SQLite write transaction would block every other
    writer (a real hazard of SQLite, not what this test is about): nudge it on until it
    stops outside one."""
    for _ in range(50):
        if _write_lock_free(db):
            return
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.03)
        os.kill(worker.pid, signal.SIGSTOP)
    pytest.fail("the stopped worker kept holding the state store's write lock")


def test_stalled_worker_cannot_write_after_takeover(flow_platform, flow_settings, big_tenant, workers):
    p, tenant = flow_platform, big_tenant()
    stale = workers.start(*enable_args(tenant))
    run_id = stop_mid_copy(p, stale, tenant, signal.SIGSTOP)
    try:
        stall_outside_a_write(stale, _sqlite_path(flow_settings))
        old = p.state.get_lease(tenant.tenant_id)
        assert old is not None and old.run_id == run_id

        taken = workers.run("resume", run_id, "--takeover")  # the stale lease is still live
        assert_completed(taken)
        assert p.state.get_lease(tenant.tenant_id) is None  # released by the new holder

        # Any write with the stalled worker's fence is refused.
        with pytest.raises(FencedError):
            p.state.update_step(run_id, "copy", StepState.RUNNING, fence=old.fence)
        some_object = next(iter(tenant.snapshot))
        with pytest.raises(FencedError):
            p.state.record_copy(run_id, CopyRecord(some_object, CopyStatus.FAILED, error="stale"), fence=old.fence)
        before = world(p, tenant, run_id)
    finally:
        os.kill(stale.pid, signal.SIGCONT)

    finished = stale.finish(timeout=60)
    assert finished.returncode == 0, finished.describe()  # it stops by itself, reporting why
    out = finished.outcome
    assert out["state"] == "superseded" and "FencedError" in (out["error"] or ""), out
    assert world(p, tenant, run_id) == before, "the stalled worker changed something after the takeover"
    assert_settled(p, tenant, run_id)


# --- support reruns a completed step ------------------------------------------------------------------


def test_rerun_of_completed_step_is_a_noop(flow_platform, small_tenant, workers):
    p, tenant = flow_platform, small_tenant()
    outcome = run_plan(p, plan_enable(p, tenant.tenant_id, "byokms", tenant.key_ref, shards=SHARDS))
    assert outcome.state == RunState.COMPLETED.value, outcome.error
    before = world(p, tenant, outcome.run_id)

    rerun = workers.run("rerun", outcome.run_id, "copy")
    assert rerun.returncode == 0, rerun.describe()
    out = rerun.outcome
    assert out["state"] == RunState.COMPLETED.value and out["executed"] == [] and out["created"] is False, out
    assert "copy" in out["message"] and "nothing changed" in out["message"], out

    after = world(p, tenant, outcome.run_id)
    assert {k: v for k, v in after.items() if k != "audit"} == {k: v for k, v in before.items() if k != "audit"}
    # the only trace: one audit record saying support asked and nothing ran (faults I6)
    new = after["audit"][len(before["audit"]) :]
    assert after["audit"][: len(before["audit"])] == before["audit"]
    assert [a[1] for a in new] == ["run.rerun.noop"], new
    assert_settled(p, tenant, outcome.run_id)


# --- two enables at the same instant -----------------------------------------------------------------


def test_two_simultaneous_enables_produce_one_run(flow_platform, small_tenant, workers):
    p, tenant = flow_platform, small_tenant()
    start_at = str(time.time() + 6)  # both workers are imported and wired by then
    racers = [workers.start(*enable_args(tenant), env={START_AT_ENV: start_at}) for _ in range(2)]
    results = [w.finish() for w in racers]
    for r in results:
        assert r.returncode == 0, r.describe()
    outs = [r.outcome for r in results]
    creators = [o for o in outs if o.get("created")]
    assert len(creators) == 1, outs
    winner, loser = creators[0], next(o for o in outs if o is not creators[0])
    assert winner["state"] == RunState.COMPLETED.value, winner
    assert loser["created"] is False and loser["run_id"] == winner["run_id"], loser
    assert "already going" in loser["message"], loser

    # one set of side effects: one run, one dedicated bucket, one start in the audit log
    run = the_run(p, tenant.tenant_id)
    assert run.run_id == winner["run_id"]
    s3 = clients.aws_client("s3", p.settings)
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"] if tenant.tenant_id in b["Name"]]
    assert buckets == [MigrationPlan.from_params(run.params).destination_location.bucket], buckets
    starts = [a for a in p.state.iter_audit(tenant_id=tenant.tenant_id) if a.action == "run.start"]
    assert len(starts) == 1, starts
    assert_settled(p, tenant, run.run_id)


# --- the same cycle through the real CLI ---------------------------------------------------------------


def test_cli_enable_killed_mid_copy_then_runs_resume(flow_platform, small_tenant, workers, prefect_api):
    """``archive-kms enable`` (a Prefect flow, shard tasks on Prefect's thread runner) is
    killed after a put whose ledger record was never written; ``archive-kms runs list``
    finds the run and ``archive-kms runs resume`` (after the lease expired) completes it."""
    p, tenant = flow_platform, small_tenant(seed=13)
    killed = workers.cli(
        "enable",
        tenant.tenant_id,
        "--mode",
        "byokms",
        "--key-ref",
        tenant.key_ref,
        "--shards",
        str(SHARDS),
        "--json",
        crash_at="copy:after-put@5",
    )
    assert_killed(killed, "copy:after-put@5")

    listed = workers.cli("runs", "list", "--tenant", tenant.tenant_id, "--json")
    assert listed.returncode == 0, listed.describe()
    rows = json.loads(listed.stdout)
    assert [(r["state"], r["current_step"]) for r in rows] == [("running", "copy")], rows
    run_id = rows[0]["run_id"]
    assert run_id == the_run(p, tenant.tenant_id).run_id

    wait_for_lease_expiry(p, tenant.tenant_id)
    resumed = workers.cli("runs", "resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.describe()
    answer = json.loads(resumed.stdout)
    assert answer["outcome"]["state"] == RunState.COMPLETED.value, answer["outcome"]
    assert answer["outcome"]["executed"][0] == "copy", answer["outcome"]
    report = answer["report"]
    assert (report["lost"], report["duplicated"], report["objects"]) == (0, 0, len(tenant.snapshot)), report
    copy = p.state.get_run(run_id).step("copy").result
    assert copy["already"] >= 1, copy  # the object put before the kill was verified, not written again
    assert_settled(p, tenant, run_id)


def test_cli_runs_cancel_after_a_kill_puts_the_tenant_back(flow_platform, small_tenant, workers, prefect_api):
    """A run killed after copying is cancelled by support (``archive-kms runs cancel --takeover``):
    the tenant key is re-bound to its original key, the dedicated bucket and new index are
    gone, the source and old index serve as before, and the tenant can be onboarded again."""
    p, tenant = flow_platform, small_tenant(seed=17)
    l1_before = p.keychain.status(tenant.tenant_id).l1_ref
    killed = workers.cli(
        "enable",
        tenant.tenant_id,
        "--mode",
        "byokms",
        "--key-ref",
        tenant.key_ref,
        "--shards",
        str(SHARDS),
        "--json",
        crash_at="after:copy",
    )
    assert_killed(killed, "after:copy")
    run = the_run(p, tenant.tenant_id)
    dest = Location.from_dict(run.params["destination"])
    assert p.provisioner.exists(dest) and p.keychain.status(tenant.tenant_id).l1_ref != l1_before

    cancelled = workers.cli("runs", "cancel", run.run_id, "--takeover", "--json")
    assert cancelled.returncode == 0, cancelled.describe()
    assert json.loads(cancelled.stdout)["outcome"]["state"] == RunState.CANCELLED.value
    assert p.state.get_run(run.run_id).state is RunState.CANCELLED
    assert p.keychain.status(tenant.tenant_id).l1_ref == l1_before
    assert not p.provisioner.exists(dest)
    assert p.index.describe_generation(run.params["old_index"]) is not None
    assert tenant_indices(p, tenant.tenant_id) == [run.params["old_index"]]
    assert storage_snapshot(p, tenant.tenant_id) == tenant.snapshot
    assert p.state.gate(tenant.tenant_id).state.value == "open"

    again = workers.cli("enable", tenant.tenant_id, "--mode", "byokms", "--key-ref", tenant.key_ref, "--json")
    assert again.returncode == 0, again.describe()
    assert json.loads(again.stdout)["outcome"]["state"] == RunState.COMPLETED.value
