"""The step engine runs any ``FlowDefinition``, not only enable/remove: a toy flow of four
steps (registered in place of a real one for the test) shows ordered steps with
checkpoints, resume after a failure, rerun from a step with the flow's own point of no
return, cancel before it, a step that waits (``StepWaiting``) and resumes, and the
``waiting`` snapshot, all on the in-memory platform (docs/adr/0025-one-step-engine-for-every-flow.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pytest

from archive_kms.errors import TransientError, ValidationError
from archive_kms.migration import engine
from archive_kms.migration.context import FlowDefinition, RunContext, StepWaiting
from archive_kms.migration.flowdef import FLOW_DEFINITIONS, definition
from archive_kms.migration.launch import snapshot
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import Flow, RunState, StepState

TENANT = "toy"
STEPS = ("first", "gate", "point", "last")


@dataclass(frozen=True)
class ToyPlan:
    tenant_id: str
    flow: str = Flow.ERASE.value
    mode: str = "managed"
    key_ref: str = "managed://platform"

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: Any) -> ToyPlan:
        return cls(**dict(params))


class Toy:
    """Step functions that record their calls; ``fail`` / ``wait`` make a step misbehave."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.wait: set[str] = set()
        self.undone: list[str] = []

    def step(self, name: str):
        def run(ctx: RunContext) -> dict[str, Any]:
            self.calls.append(name)
            if name in self.fail:
                self.fail.discard(name)
                raise TransientError(f"injected failure in {name}")
            if name in self.wait:
                raise StepWaiting(f"{name} waits for a human", {"ticket": "t-1"})
            return {"did": name}

        return run

    def functions(self) -> dict[str, Any]:
        return {name: self.step(name) for name in STEPS}

    def cancel(self, platform: Any, run: Any, plan: Any, fence: Any) -> list[str]:
        self.undone.append(run.run_id)
        return ["toy undone"]


@pytest.fixture
def toy(monkeypatch) -> Toy:
    t = Toy()
    functions = t.functions()
    monkeypatch.setitem(
        FLOW_DEFINITIONS,
        Flow.ERASE.value,
        FlowDefinition(
            flow=Flow.ERASE.value,
            steps=STEPS,
            point_of_no_return="point",
            plan_from_params=ToyPlan.from_params,
            step_functions=lambda: functions,
            cancel=t.cancel,
            summary="the toy is past its point",
        ),
    )
    return t


@pytest.fixture
def platform() -> Platform:
    p = Platform.in_memory()
    create_tenant(p, TENANT, actor="test")
    return p


def start(platform: Platform) -> str:
    run, created = engine.trigger(platform, ToyPlan(TENANT), actor="test")
    assert created
    return run.run_id


def test_a_flow_runs_its_own_steps_in_order_with_checkpoints(platform, toy):
    run_id = start(platform)
    assert [s.name for s in platform.state.get_run(run_id).steps] == list(STEPS)
    outcome = engine.execute(platform, run_id, actor="test", handle_signals=False)
    assert outcome.state == "completed" and outcome.executed == STEPS
    assert toy.calls == list(STEPS)
    run = platform.state.get_run(run_id)
    assert run.state is RunState.COMPLETED
    assert [s.result["did"] for s in run.steps] == list(STEPS)
    assert platform.state.get_lease(TENANT) is None


def test_a_failed_step_resumes_from_itself(platform, toy):
    toy.fail.add("point")
    run_id = start(platform)
    failed = engine.execute(platform, run_id, actor="test", handle_signals=False)
    assert failed.state == "failed" and "point" in failed.message
    assert platform.state.get_run(run_id).step("point").state is StepState.FAILED
    done = engine.resume(platform, run_id, actor="support", handle_signals=False)
    assert done.state == "completed" and done.executed == ("point", "last")
    assert toy.calls == ["first", "gate", "point", "point", "last"]


def test_rerun_respects_the_flows_own_point_of_no_return(platform, toy):
    toy.fail.add("last")
    run_id = start(platform)
    engine.execute(platform, run_id, actor="test", handle_signals=False)
    with pytest.raises(ValidationError, match=r"past point \(the toy is past its point\).*Rerun from last"):
        engine.rerun(platform, run_id, "gate", actor="support", handle_signals=False)
    with pytest.raises(ValidationError, match="unknown step 'copy'"):
        engine.rerun(platform, run_id, "copy", actor="support", handle_signals=False)
    done = engine.rerun(platform, run_id, "last", actor="support", handle_signals=False)
    assert done.state == "completed"


def test_cancel_before_the_point_undoes_and_after_it_is_refused(platform, toy):
    toy.fail.add("gate")
    run_id = start(platform)
    engine.execute(platform, run_id, actor="test", handle_signals=False)
    out = engine.cancel(platform, run_id, actor="support")
    assert out.state == "cancelled" and "toy undone" in out.message and toy.undone == [run_id]

    toy.fail.add("last")
    second = start(platform)
    engine.execute(platform, second, actor="test", handle_signals=False)
    with pytest.raises(ValidationError, match="has reached point.*cannot be cancelled"):
        engine.cancel(platform, second, actor="support")


def test_a_waiting_step_leaves_the_run_running_without_a_lease_and_resumes(platform, toy):
    toy.wait.add("gate")
    run_id = start(platform)
    outcome = engine.execute(platform, run_id, actor="test", handle_signals=False)
    assert outcome.state == engine.WAITING and "waits for a human" in outcome.message
    run = platform.state.get_run(run_id)
    assert run.state is RunState.RUNNING and run.step("gate").state is StepState.RUNNING
    assert platform.state.get_lease(TENANT) is None  # another process may resume it at once
    wait = engine.waiting_on(platform, run)
    assert wait is not None and wait["step"] == "gate" and wait["ticket"] == "t-1"
    snap = snapshot(platform, run_id)
    assert snap.done and snap.outcome == "waiting"

    again = engine.resume(platform, run_id, actor="test", handle_signals=False)  # still waiting: same record
    assert again.state == engine.WAITING
    assert engine.waiting_on(platform, platform.state.get_run(run_id))["since"] == wait["since"]
    waits = [r for r in platform.state.iter_audit(tenant_id=TENANT) if r.action == "run.wait"]
    assert len(waits) == 1  # audited once per wait, not once per look

    toy.wait.clear()
    done = engine.resume(platform, run_id, actor="test", handle_signals=False)
    assert done.state == "completed" and done.executed == ("gate", "point", "last")
    assert engine.waiting_on(platform, platform.state.get_run(run_id)) is None


def test_the_migration_flows_keep_their_definitions():
    enable = definition(Flow.ENABLE)
    assert enable.point_of_no_return == "cutover" and enable.steps[0] == "preflight"
    assert definition("remove").steps == enable.steps
    with pytest.raises(ValidationError, match="does not run 'revoke' flows"):
        definition(Flow.REVOKE)
