"""The cutover grace (ADR 0045): ``cleanup_source`` deletes the source no sooner than
``cutover_grace_seconds`` after cutover switched the registry, counted from that switch
(not from cleanup's own start), also when cleanup runs in a later execution."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from archive_kms.migration import execute, plan_enable, resume, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.migration.steps import REGISTRY_SWITCHED, _grace_remaining
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import RunState

TENANT = "acme"
GRACE = 0.4


def _ctx(grace: float, *, mark: float | None = None, recorded: str | None = None) -> Any:
    cutover = SimpleNamespace(result={"registry_switched_at": recorded} if recorded else {})
    run = SimpleNamespace(step=lambda name: cutover)
    return SimpleNamespace(
        plan=SimpleNamespace(cutover_grace_seconds=grace),
        marks={} if mark is None else {REGISTRY_SWITCHED: mark},
        run=lambda: run,
    )


def test_the_grace_counts_from_the_switch_this_execution_saw():
    now = time.monotonic()
    assert _grace_remaining(_ctx(1.0, mark=now - 0.25), now) == pytest.approx(0.75)
    assert _grace_remaining(_ctx(1.0, mark=now - 5.0), now) == 0.0
    assert _grace_remaining(_ctx(1.0, mark=now), now) == 1.0


def test_a_later_execution_counts_from_the_recorded_switch_and_never_waits_more_than_the_grace():
    now = datetime.now(UTC)
    long_ago = (now - timedelta(hours=1)).isoformat()
    assert _grace_remaining(_ctx(1.0, recorded=long_ago), time.monotonic()) == 0.0
    just_now = now.isoformat()
    assert 0.5 < _grace_remaining(_ctx(1.0, recorded=just_now), time.monotonic()) <= 1.0
    # A recorder's clock ahead of ours: the whole grace, never more.
    ahead = (now + timedelta(minutes=5)).isoformat()
    assert _grace_remaining(_ctx(1.0, recorded=ahead), time.monotonic()) == 1.0
    # Cut over by code that recorded no switch: the whole grace from cleanup's start.
    assert _grace_remaining(_ctx(1.0), time.monotonic()) == 1.0


def _archived() -> Platform:
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    spec = JobSpec("j-base", TENANT, "synthetic", synthetic={"count": 6, "seed": 7, "mix": "small", "workspaces": 2})
    assert submit_job(p.state, spec, p.open_archive).decision == "run"
    return p


def _watch(monkeypatch, p: Platform, fail_cleanup_once: bool) -> dict[str, Any]:
    seen: dict[str, Any] = {"deleted": []}
    real_cutover = steps_module.STEP_FUNCTIONS["cutover"]
    real_cleanup = steps_module.STEP_FUNCTIONS["cleanup_source"]

    def cutover(ctx):
        out = real_cutover(ctx)
        seen["switched"] = time.monotonic()
        return out

    def cleanup(ctx):
        if fail_cleanup_once and "failed" not in seen:
            seen["failed"] = True
            raise steps_module.TransientError("injected failure before cleanup deletes anything")
        return real_cleanup(ctx)

    real_delete = p.provisioner.delete

    def delete(loc, store):
        seen["deleted"].append(time.monotonic())
        return real_delete(loc, store)

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "cutover", cutover)
    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "cleanup_source", cleanup)
    monkeypatch.setattr(p.provisioner, "delete", delete)
    return seen


@pytest.mark.parametrize("resumed", [False, True], ids=["same-execution", "resumed"])
def test_the_source_is_deleted_no_sooner_than_the_grace_after_the_registry_switch(monkeypatch, resumed):
    p = _archived()
    plan = replace(plan_enable(p, TENANT, "byokms", "memory://customer-1"), shards=2, cutover_grace_seconds=GRACE)
    seen = _watch(monkeypatch, p, fail_cleanup_once=resumed)
    run, _ = trigger(p, plan, actor="test")
    out = execute(p, run.run_id, actor="test")
    if resumed:
        assert out.state == RunState.FAILED.value and not seen["deleted"]
        out = resume(p, run.run_id, actor="test")  # a new execution: the recorded wall-clock switch
    assert out.state == RunState.COMPLETED.value, out
    assert len(seen["deleted"]) == 1
    # The registry switched before cutover returned: the deletion waited at least the grace.
    assert seen["deleted"][0] - seen["switched"] >= GRACE - 0.01
    result = p.state.get_run(run.run_id).step("cutover").result
    switched_at = datetime.fromisoformat(result["registry_switched_at"])
    assert switched_at <= datetime.now(UTC)


def test_the_alias_swap_after_the_switch_counts_as_grace(monkeypatch):
    """Time cutover spends after switching the registry (here a slow alias swap) is not
    waited for again by cleanup: it sleeps at most the grace minus that time."""
    p = _archived()
    grace, swap = 0.6, 0.35
    plan = replace(plan_enable(p, TENANT, "byokms", "memory://customer-1"), shards=2, cutover_grace_seconds=grace)
    real_swap = p.index.swap_alias

    def slow_swap(*args, **kwargs):
        time.sleep(swap)
        return real_swap(*args, **kwargs)

    slept: list[float] = []
    monkeypatch.setattr(p.index, "swap_alias", slow_swap)
    monkeypatch.setattr(
        steps_module,
        "time",
        SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: slept.append(s) or time.sleep(s)),
    )
    run, _ = trigger(p, plan, actor="test")
    assert execute(p, run.run_id, actor="test").state == RunState.COMPLETED.value
    assert len(slept) == 1 and slept[0] <= grace - swap + 0.001, slept
