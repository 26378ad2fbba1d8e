"""Archive jobs arriving at a steady rate through a whole migration run (faults E1, E7):
pause -> cutover -> resume, on S3 (enable onto BYOKMS, then remove back) and on Azure
(enable onto BYOKV).

A writer thread sends a new one-record archive job every ``PERIOD`` seconds for the
whole run, and now and then sends an earlier job again (a client retrying after a lost
answer); a job whose submission raised is sent again with the same id until it is
acknowledged (run, deferred or duplicate). A reader thread reads back acknowledged
records at random all the while. The writer's history is then checked Jepsen-style
(set-full):

* every acknowledged record is in the tenant's final location exactly once, with its
  content, and in its index exactly once (``invariants`` with ``extra_records``);
* nothing is there that was never sent (no phantom), and no job ran twice;
* a record acknowledged as written (``run``) was readable from then on at every read;
  a deferred one became readable once the run replayed it (no record seen and then lost).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from flows_support import invariants

from archive_kms.domain.records import Record
from archive_kms.errors import ArchiveKmsError
from archive_kms.migration import execute, plan_enable, plan_remove, thread_shard_runner, trigger
from archive_kms.operations.archive import JobSpec, record_object_name, submit_job
from archive_kms.state.port import RunState

PERIOD = 1.0  # seconds between new jobs
RESEND = 0.2  # chance that a tick also sends an earlier job again
SEED = 0x5EED_E1


@dataclass
class Op:
    job_id: str
    record: Record
    sent_at: float
    acked_at: float | None = None
    decision: str | None = None
    attempts: int = 0


@dataclass
class History:
    ops: dict[str, Op] = field(default_factory=dict)
    resends: Counter = field(default_factory=Counter)  # decision of a resend -> count
    errors: list[str] = field(default_factory=list)
    reads: list[tuple[str, float, bool, str]] = field(default_factory=list)  # job, t, ok, step
    lock: threading.Lock = field(default_factory=threading.Lock)


class Writer(threading.Thread):
    def __init__(self, platform, tenant: str, label: str, history: History, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.p, self.tenant, self.label, self.h, self.rng = platform, tenant, label, history, rng
        self.n = 0
        self.stop_event = threading.Event()

    def _spec(self, op: Op) -> JobSpec:
        return JobSpec(op.job_id, self.tenant, "inline", (json.loads(op.record.to_json()),))

    def _send(self, op: Op) -> str:
        while True:  # a client resends the same job id until it is acknowledged
            op.attempts += 1
            try:
                return submit_job(self.p.state, self._spec(op), self.p.open_archive).decision
            except ArchiveKmsError as exc:
                with self.h.lock:
                    self.h.errors.append(f"{op.job_id}: {type(exc).__name__}: {exc}"[:300])
                if not exc.retryable and op.attempts > 3:
                    raise
                time.sleep(0.2)

    def run(self) -> None:
        while not self.stop_event.wait(PERIOD):
            self.n += 1
            record = Record(
                "Case",
                f"500W{self.label}{self.n:08d}",
                {"Name": f"writer {self.label} case {self.n:04d} of {self.tenant}", "Status": "Open"},
                (),
                "ws0" if self.n % 2 else "ws1",
            )
            op = Op(f"{self.tenant}-w{self.label}-{self.n}", record, time.monotonic())
            with self.h.lock:
                self.h.ops[op.job_id] = op
            op.decision = self._send(op)
            op.acked_at = time.monotonic()
            if self.rng.random() < RESEND:
                with self.h.lock:
                    earlier = self.rng.choice([o for o in self.h.ops.values() if o.acked_at is not None])
                decision = self._send(earlier)
                with self.h.lock:
                    self.h.resends[decision] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)


class Reader(threading.Thread):
    """Reads acknowledged records back, at random, through the tenant's archive as the
    registry says it is now (a reader of the product)."""

    def __init__(self, platform, tenant: str, history: History, rng: random.Random, step) -> None:
        super().__init__(daemon=True)
        self.p, self.tenant, self.h, self.rng, self.step = platform, tenant, history, rng, step
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.15):
            with self.h.lock:
                acked = [o for o in self.h.ops.values() if o.acked_at is not None]
            if not acked:
                continue
            op = self.rng.choice(acked)
            r = op.record
            try:
                ok = self.p.open_archive(self.tenant).read_record(r.workspace_id, r.object_type, r.record_id) == r
                why = "" if ok else "content differs"
            except ArchiveKmsError as exc:
                ok, why = False, f"{type(exc).__name__}"
            with self.h.lock:
                self.h.reads.append((op.job_id, time.monotonic(), ok, why or self.step()))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)


def set_full(platform, tenant: str, label: str, history: History) -> dict[str, int]:
    """The set-full check over the writer's history (module docstring)."""
    archive = platform.open_archive(tenant)
    store = archive.store
    acked = {j: o for j, o in history.ops.items() if o.acked_at is not None}
    assert len(acked) == len(history.ops), "a job was never acknowledged"
    lost, changed = [], []
    for op in acked.values():
        name = record_object_name(op.record)
        if store.head(name) is None:
            lost.append(op.job_id)
            continue
        r = op.record
        if archive.read_record(r.workspace_id, r.object_type, r.record_id) != r:
            changed.append(op.job_id)
    assert not lost, f"{len(lost)} acknowledged record(s) lost: {lost[:5]}"
    assert not changed, f"{len(changed)} record(s) changed: {changed[:5]}"
    writer_names = {record_object_name(o.record) for o in acked.values()}
    phantom = [
        i.name
        for i in store.list()
        if i.name.startswith(b"records/") and f"/500W{label}".encode() in i.name and i.name not in writer_names
    ]
    assert not phantom, f"records nobody sent: {phantom[:5]}"
    jobs = [platform.state.get_job(j) for j in acked]
    assert all(j is not None and j.state.value == "completed" for j in jobs), "a job did not complete"
    runs = Counter(
        r.details.get("job_id") for r in platform.state.iter_audit(tenant_id=tenant) if r.action == "job.run"
    )
    ran = {j: runs.get(j, 0) for j in acked}
    assert all(n == 1 for n in ran.values()), (
        f"jobs not run exactly once: {[(j, n) for j, n in ran.items() if n != 1][:5]}"
    )
    # Seen, then lost: a read that failed after an earlier read of the same record succeeded.
    seen: dict[str, float] = {}
    flicker = []
    for job_id, at, ok, why in sorted(history.reads, key=lambda x: x[1]):
        if ok:
            seen.setdefault(job_id, at)
        elif job_id in seen:
            flicker.append((job_id, why))
    assert not flicker, f"records seen and then not readable: {flicker[:5]}"
    # Written at once (decision run): readable from the acknowledgement on.
    unreadable = [
        (j, why) for j, at, ok, why in history.reads if not ok and acked[j].decision == "run" and at > acked[j].acked_at
    ]
    assert not unreadable, f"records acknowledged as written but not readable: {unreadable[:5]}"
    return {
        "jobs": len(acked),
        "deferred": sum(o.decision == "deferred" for o in acked.values()),
        "run_at_once": sum(o.decision == "run" for o in acked.values()),
        "resends": sum(history.resends.values()),
        "reads": len(history.reads),
        "reads_ok": sum(ok for _, _, ok, _ in history.reads),
        "retried_submissions": len(history.errors),
    }


def run_with_writers(platform, plan, label: str, fault_case, monkeypatch) -> tuple[History, dict[str, int]]:
    from archive_kms.migration import Hooks

    history = History()
    rng = random.Random(SEED + hash(label) % 1000)
    step = {"now": "before"}
    writer = Writer(platform, plan.tenant_id, label, history, rng)
    reader = Reader(platform, plan.tenant_id, history, random.Random(SEED), lambda: step["now"])
    writer.start()
    reader.start()
    time.sleep(2.5 * PERIOD)  # some jobs before the run
    run, created = trigger(platform, replace(plan, cutover_grace_seconds=0.5), actor="test")
    assert created

    def on_step(name: str, state: str, result) -> None:
        step["now"] = f"{name}:{state}"

    out = execute(
        platform, run.run_id, actor="test", shard_runner=thread_shard_runner, hooks=Hooks(on_step=on_step),
        handle_signals=False,
    )  # fmt: skip
    time.sleep(2.5 * PERIOD)  # and some after
    writer.stop()
    reader.stop()
    assert out.state == RunState.COMPLETED.value, out.error
    if history.errors:
        fault_case.note(**{f"{label}_submission_errors": history.errors[:5]})
    figures = set_full(platform, plan.tenant_id, label, history)
    assert figures["deferred"] >= 1 and figures["run_at_once"] >= 2, figures
    fault_case.note(**{label: figures})
    fault_case.injected("archive job during a run", figures["jobs"])
    fault_case.injected("client resend of a job", figures["resends"])
    return history, figures


@pytest.mark.parametrize("cloud", ["s3", "azure"])
def test_steady_writers_through_enable_and_remove(
    cloud, flow_platform, archived_tenant, customer_key, fault_case, monkeypatch
):
    """S3: enable onto BYOKMS, then remove back to shared storage, writers running all
    along. Azure: enable onto BYOKV."""
    p = flow_platform
    archived = archived_tenant(cloud, records=6, seed=83)
    t = archived.tenant_id
    mode = "byokms" if cloud == "s3" else "byokv"
    _, enable_figures = run_with_writers(
        p, plan_enable(p, t, mode, customer_key(mode, cloud), shards=2), f"{cloud}-enable", fault_case, monkeypatch
    )
    written = enable_figures["jobs"]
    invariants(p, t, archived.snapshot, extra_records=written)
    if cloud == "s3":
        _, remove_figures = run_with_writers(p, plan_remove(p, t, shards=2), f"{cloud}-remove", fault_case, monkeypatch)
        invariants(p, t, archived.snapshot, extra_records=written + remove_figures["jobs"])
