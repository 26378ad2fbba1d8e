"""Migration runs, steps and checkpoints in memory (``RunRepo``)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from archive_kms.errors import StateError
from archive_kms.state._common import RUN_MOVES, check_id, check_steps, json_object, member, step_transition
from archive_kms.state.memory.tables import MemoryTables, _copy_run, _copy_step
from archive_kms.state.port import Fence, Flow, MigrationRun, RunState, StepRecord, StepState
from archive_kms.state.schema import RUN_ID

__all__ = ["MemoryRunRepo"]


class MemoryRunRepo(MemoryTables):
    """``RunRepo`` in memory."""

    def _running_run(self, tenant_id: str) -> MigrationRun | None:
        return next((r for r in self._runs.values() if r.tenant_id == tenant_id and r.state is RunState.RUNNING), None)

    def start_run(
        self,
        tenant_id: str,
        flow: Flow,
        *,
        mode: str,
        steps: Sequence[str],
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> tuple[MigrationRun, bool]:
        flow = member(Flow, flow, "flow")
        run_id = run_id or uuid.uuid4().hex
        check_id("run id", run_id, RUN_ID)
        check_id("mode", mode, 32)
        check_steps(steps)
        body = json_object(params or {}, "run params")
        with self._lock:
            if tenant_id not in self._tenants:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            existing = self._runs.get(run_id)
            if existing is not None:
                if existing.tenant_id != tenant_id or existing.flow is not flow:
                    raise StateError(f"run id {run_id!r} is already used by another run", resource=f"run:{run_id}")
                return _copy_run(existing), False
            active = self._running_run(tenant_id)
            if active is not None:
                return _copy_run(active), False
            now = self._now()
            run = MigrationRun(
                run_id,
                tenant_id,
                flow,
                mode,
                RunState.RUNNING,
                body,
                now,
                now,
                tuple(StepRecord(run_id, name, i) for i, name in enumerate(steps)),
            )
            self._runs[run_id] = run
            return _copy_run(run), True

    def find_active_run(self, tenant_id: str) -> MigrationRun | None:
        with self._lock:
            run = self._running_run(tenant_id)
            return None if run is None else _copy_run(run)

    def get_run(self, run_id: str) -> MigrationRun | None:
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else _copy_run(run)

    def list_runs(
        self, tenant_id: str | None = None, *, states: Iterable[RunState] | None = None, limit: int = 100
    ) -> list[MigrationRun]:
        wanted = None if states is None else {member(RunState, s, "run state") for s in states}
        with self._lock:
            found = [
                r
                for r in self._runs.values()
                if (tenant_id is None or r.tenant_id == tenant_id) and (wanted is None or r.state in wanted)
            ]
            found.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
            return [_copy_run(r) for r in found[:limit]]

    def set_run_state(self, run_id: str, state: RunState, *, fence: Fence | None = None) -> MigrationRun:
        state = member(RunState, state, "run state")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if run.state is state:
                return _copy_run(run)
            if state not in RUN_MOVES[run.state]:
                raise StateError(
                    f"run {run_id!r} cannot move from {run.state.value} to {state.value}", resource=f"run:{run_id}"
                )
            if state is RunState.RUNNING and self._running_run(run.tenant_id) is not None:
                raise StateError(
                    f"run {run_id!r} cannot resume: its tenant has another running run", resource=f"run:{run_id}"
                )
            run = replace(run, state=state, updated_at=self._now())
            self._runs[run_id] = run
            return _copy_run(run)

    def update_step(
        self,
        run_id: str,
        step: str,
        state: StepState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        fence: Fence | None = None,
    ) -> StepRecord:
        state = member(StepState, state, "step state")
        body = None if result is None else json_object(result, "step result")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if run.state is not RunState.RUNNING:
                raise StateError(
                    f"run {run_id!r} is {run.state.value}; steps change only while it is running",
                    resource=f"run:{run_id}",
                )
            idx = next((i for i, s in enumerate(run.steps) if s.name == step), None)
            if idx is None:
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            cur = run.steps[idx]
            now = self._now()
            values = step_transition(cur.state.value, state, cur.attempt, body, error, now, run_id, step)
            if values is None:
                return _copy_step(cur)
            values["state"] = StepState(values["state"])
            new = replace(cur, **values)
            self._runs[run_id] = replace(run, steps=run.steps[:idx] + (new,) + run.steps[idx + 1 :], updated_at=now)
            return _copy_step(new)

    def reset_steps(self, run_id: str, from_step: str, *, fence: Fence | None = None) -> MigrationRun:
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            start = next((s.ordinal for s in run.steps if s.name == from_step), None)
            if start is None:
                raise StateError(f"run {run_id!r} has no step {from_step!r}", resource=f"run:{run_id}")
            reset = {s.name for s in run.steps if s.ordinal >= start}
            for key in [k for k in self._checkpoints if k[0] == run_id and k[1] in reset]:
                del self._checkpoints[key]
            steps = tuple(
                replace(s, state=StepState.PENDING, started_at=None, finished_at=None, result=None, error=None)
                if s.name in reset
                else s
                for s in run.steps
            )
            run = replace(run, steps=steps, updated_at=self._now())
            self._runs[run_id] = run
            return _copy_run(run)

    def save_checkpoint(
        self, run_id: str, step: str, shard: int, cursor: Mapping[str, Any], *, fence: Fence | None = None
    ) -> None:
        body = json_object(cursor, "checkpoint cursor")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if not any(s.name == step for s in run.steps):
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            self._checkpoints[(run_id, step, shard)] = body

    def load_checkpoints(self, run_id: str, step: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k[2]: copy.deepcopy(v) for k, v in self._checkpoints.items() if k[0] == run_id and k[1] == step}
