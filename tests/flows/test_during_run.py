"""What the rest of the product sees while an enable run is going (issue 6):

1. archive jobs sent during the run are deferred and land exactly once after it, in the
   tenant's new home (a job id sent twice is one job);
2. a search during the run returns exactly the pre-run data, at every step boundary and
   from a searcher thread that runs for the whole run;
3. reads never fail during cutover: a reader thread reading one record (and its
   attachments) through ``platform.open_archive`` in a loop for the whole run records
   zero errors.

The engine runs in this process (plan_enable + trigger + execute, shards in threads); a
test reaches into the run by wrapping entries of ``steps.STEP_FUNCTIONS`` (the engine
looks a step up there each time it runs it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import invariants, run_plan

from archive_kms.migration import STEPS, Hooks, plan_enable
from archive_kms.migration.steps import STEP_FUNCTIONS
from archive_kms.operations.archive import JobSpec, record_object_name, submit_job
from archive_kms.search import Query
from archive_kms.state.port import GateState, RunState

CASES = [("byokms", "s3"), ("byokv", "azure")]
IDS = [f"{m}-{c}" for m, c in CASES]


def wrap_steps(
    monkeypatch,
    names: list[str],
    *,
    before: Callable[[str], None] = lambda step: None,
    after: Callable[[str], None] = lambda step: None,
) -> None:
    """Run ``before(step)`` / ``after(step)`` around the real step functions ``names``."""
    for name in names:
        real = STEP_FUNCTIONS[name]

        def wrapper(ctx, _real=real, _name=name):
            before(_name)
            result = _real(ctx)
            after(_name)
            return result

        monkeypatch.setitem(STEP_FUNCTIONS, name, wrapper)


class StepTracker:
    """The step the run is in now (engine hooks), for labelling what a thread saw."""

    def __init__(self) -> None:
        self.step = "before-run"

    def on_step(self, step: str, state: str, result: Any) -> None:
        self.step = step if state == "running" else f"after:{step}"

    def hooks(self) -> Hooks:
        return Hooks(on_step=self.on_step)


class LoopThread(threading.Thread):
    """Calls ``action()`` until stopped; counts calls and keeps (step, error) of failures."""

    def __init__(self, action: Callable[[], None], tracker: StepTracker, *, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.action, self.tracker, self.pause = action, tracker, pause
        self.calls = 0
        self.errors: list[tuple[str, str]] = []
        self.steps_seen: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            step = self.tracker.step
            try:
                self.action()
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                self.errors.append((step, f"{type(exc).__name__}: {exc}"[:400]))
            self.calls += 1
            self.steps_seen.add(step)
            time.sleep(self.pause)  # leave the services to the run; still many calls per step

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


# --- 1. archive jobs during the run ---------------------------------------------------------------


def test_jobs_sent_during_the_run_are_deferred_and_land_once_after_it(
    flow_platform, archived_tenant, customer_key, monkeypatch
):
    p = flow_platform
    archived = archived_tenant("s3", records=20, seed=5)
    t = archived.tenant_id
    shared = p.location_of(t)
    late = JobSpec(
        f"{t}-late", t, "synthetic", synthetic={"count": 6, "seed": 5, "offset": 20, "mix": "small", "workspaces": 2}
    )
    late_records = [r for r, _ in late.materialise()]
    assert not {r.record_id for r in late_records} & {r.record_id for r in archived.records}
    seen: dict[str, Any] = {}

    def send_jobs_mid_run(step: str) -> None:
        # between pause and resume: the gate is closed, the job must be kept, not run
        seen["gate"] = p.state.gate(t).state
        seen["outcomes"] = [submit_job(p.state, late, p.open_archive).decision for _ in range(2)]
        seen["in_shared"] = [p.store_for(shared).head(record_object_name(r)) is not None for r in late_records]

    wrap_steps(monkeypatch, ["copy"], before=send_jobs_mid_run)
    outcome = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=4))

    assert outcome.state == RunState.COMPLETED.value, outcome.error
    assert seen["gate"] is GateState.PAUSED
    assert seen["outcomes"] == ["deferred", "duplicate"]
    assert seen["in_shared"] == [False] * len(late_records), "a deferred job wrote to the old location"
    resumed = p.state.get_run(outcome.run_id).step("resume").result
    assert (resumed["replayed"], resumed["duplicates"], resumed["records"]) == (1, 0, len(late_records)), resumed

    # the job landed once, at the new location and in the new index
    figures = invariants(p, t, archived.snapshot, extra_records=len(late_records))
    assert figures["documents"] == figures["records"] == archived.record_count + len(late_records)
    archive = p.open_archive(t)
    for r in late_records:
        assert archive.read_record(r.workspace_id, r.object_type, r.record_id) == r
        assert [h.record_id for h in archive.search(Query(filters={"Name": r.fields["Name"]}))] == [r.record_id]
    # sent again after the run: still one job
    assert submit_job(p.state, late, p.open_archive).decision == "duplicate"
    assert p.index.count(p.index.current_index(t)) == archived.record_count + len(late_records)


# --- 2. searches during the run -----------------------------------------------------------------


def search_view(p, tenant: str, queries: dict[str, Query]) -> dict[str, list[str]]:
    """Sorted record ids each query returns through the tenant's archive now."""
    archive = p.open_archive(tenant)
    out = {}
    for label, q in queries.items():
        result = archive.search(q)
        assert not result.failures, f"{label}: {len(result.failures)} hit(s) failed authentication"
        out[label] = sorted(h.record_id for h in result)
    return out


@pytest.mark.parametrize(("mode", "cloud"), CASES, ids=IDS)
def test_search_during_the_run_returns_the_pre_run_data(
    flow_platform, archived_tenant, customer_key, monkeypatch, mode, cloud
):
    p = flow_platform
    archived = archived_tenant(cloud, records=20, seed=8)
    t = archived.tenant_id
    first = archived.records[0]
    queries = {
        "all": Query(limit=1000),
        "word": Query(text=first.fields["Description"].split()[-1], limit=1000),
        "field": Query(filters={"Status": first.fields["Status"]}, limit=1000),
    }
    before = search_view(p, t, queries)
    assert len(before["all"]) == archived.record_count and first.record_id in before["word"]

    boundary: dict[str, dict[str, list[str]]] = {}
    wrap_steps(
        monkeypatch,
        [s for s in STEPS if s not in ("preflight", "report")],
        before=lambda step: boundary.__setitem__(f"before:{step}", search_view(p, t, queries)),
        after=lambda step: boundary.__setitem__(f"after:{step}", search_view(p, t, queries)),
    )
    tracker = StepTracker()
    differing: list[tuple[str, str]] = []

    def search_once() -> None:
        now = search_view(p, t, queries)
        if now != before:
            differing.append((tracker.step, ", ".join(k for k in queries if now[k] != before[k])))

    # Cutover moves the registry first and the alias next: an archive opened before the
    # run, searching between the two, must re-read the registry (not raise an alarm).
    stale = p.open_archive(t)
    in_window: list[list[str]] = []
    real_swap = p.index.swap_alias

    def swap_alias(*args, **kwargs):
        in_window.append(sorted(h.record_id for h in stale.search(queries["all"])))
        return real_swap(*args, **kwargs)

    monkeypatch.setattr(p.index, "swap_alias", swap_alias)
    searcher = LoopThread(search_once, tracker)
    searcher.start()
    try:
        outcome = run_plan(
            p, plan_enable(p, t, mode, customer_key(mode, cloud), cloud=cloud, shards=4), hooks=tracker.hooks()
        )
    finally:
        searcher.stop()

    assert outcome.state == RunState.COMPLETED.value, outcome.error
    assert "before:copy" in boundary and "before:build_index" in boundary and "after:cutover" in boundary
    changed = {label: [q for q in queries if view[q] != before[q]] for label, view in boundary.items()}
    assert not any(changed.values()), {k: v for k, v in changed.items() if v}
    assert in_window == [before["all"]], in_window
    assert not [r.action for r in p.state.iter_audit(tenant_id=t) if r.action.startswith("alarm.")]
    assert not searcher.errors, f"{len(searcher.errors)} failed searches of {searcher.calls}: {searcher.errors[:5]}"
    assert not differing, f"{len(differing)} searches of {searcher.calls} differed: {differing[:5]}"
    assert searcher.calls > 20 and {"copy", "build_index", "cutover"} <= searcher.steps_seen | {
        s.removeprefix("after:") for s in searcher.steps_seen
    }
    assert search_view(p, t, queries) == before  # and after it, under the new key
    invariants(p, t, archived.snapshot)


# --- 3. reads during the run, cutover included -----------------------------------------------------


@pytest.mark.parametrize(("mode", "cloud"), CASES, ids=IDS)
def test_reads_never_fail_during_the_run(flow_platform, archived_tenant, customer_key, mode, cloud):
    p = flow_platform
    archived = archived_tenant(cloud, records=20, seed=13)
    t = archived.tenant_id
    record, attachments = next((r, a) for r, a in archived.spec.materialise() if a)
    expected_attachments = {a.ref.attachment_id: b"".join(a.open()) for a in attachments}
    tracker = StepTracker()

    def read_once() -> None:
        archive = p.open_archive(t)  # the registry says where the tenant lives now
        got = archive.read_record(record.workspace_id, record.object_type, record.record_id)
        assert got == record, "the record read back differs"
        for att_id, data in expected_attachments.items():
            assert b"".join(archive.read_attachment(record.workspace_id, att_id)) == data, att_id

    reader = LoopThread(read_once, tracker)
    reader.start()
    try:
        outcome = run_plan(
            p, plan_enable(p, t, mode, customer_key(mode, cloud), cloud=cloud, shards=4), hooks=tracker.hooks()
        )
        time.sleep(0.2)  # a few reads after the run, from the new home
    finally:
        reader.stop()

    assert outcome.state == RunState.COMPLETED.value, outcome.error
    assert not reader.errors, (
        f"{len(reader.errors)} of {reader.calls} reads failed; (step, error) of the first: {reader.errors[:5]}"
    )
    steps = {s.removeprefix("after:") for s in reader.steps_seen}
    assert {"copy", "cutover", "cleanup_source"} <= steps, sorted(steps)
    assert reader.calls > 20
    invariants(p, t, archived.snapshot)
