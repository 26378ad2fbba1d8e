"""Migration runs, their steps and checkpoints on SQL (``RunRepo``). The partial unique
index "one running run per tenant" settles concurrent triggers."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from archive_kms.errors import StateError, TransientError
from archive_kms.state._common import RUN_MOVES, check_id, check_steps, json_object, member, step_transition
from archive_kms.state.port import Fence, Flow, MigrationRun, RunState, StepRecord, StepState
from archive_kms.state.schema import RUN_ID, checkpoints, run_steps, runs, tenants
from archive_kms.state.sql.database import Conflict, SqlRepository

__all__ = ["SqlRunRepo"]


class SqlRunRepo(SqlRepository):
    """``RunRepo`` on SQL."""

    def _load_run(self, conn: Connection, run_id: str) -> MigrationRun | None:
        row = conn.execute(select(runs).where(runs.c.run_id == run_id)).one_or_none()
        if row is None:
            return None
        steps = conn.execute(select(run_steps).where(run_steps.c.run_id == run_id).order_by(run_steps.c.ordinal)).all()
        return _run(row, steps)

    def _require_run(self, conn: Connection, run_id: str) -> MigrationRun:
        run = self._load_run(conn, run_id)
        if run is None:
            raise StateError(f"no run {run_id!r}", resource=f"run:{run_id}")
        return run

    def _running_run_id(self, conn: Connection, tenant_id: str) -> str | None:
        return conn.execute(
            select(runs.c.run_id).where(runs.c.tenant_id == tenant_id, runs.c.state == RunState.RUNNING.value)
        ).scalar()

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
        params = json_object(params or {}, "run params")
        for _ in range(3):  # a lost race on the unique index is re-read, not reported
            try:
                with self._tx("start run") as conn:
                    if (
                        conn.execute(select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)).scalar()
                        is None
                    ):
                        raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
                    existing = self._load_run(conn, run_id)
                    if existing is not None:
                        if existing.tenant_id != tenant_id or existing.flow is not flow:
                            raise StateError(
                                f"run id {run_id!r} is already used by another run", resource=f"run:{run_id}"
                            )
                        return existing, False
                    active = self._running_run_id(conn, tenant_id)
                    if active is not None:
                        return self._require_run(conn, active), False
                    now = self._now()
                    conn.execute(
                        insert(runs).values(
                            run_id=run_id,
                            tenant_id=tenant_id,
                            flow=flow.value,
                            mode=mode,
                            state=RunState.RUNNING.value,
                            params=params,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    conn.execute(
                        insert(run_steps),
                        [
                            {
                                "run_id": run_id,
                                "name": name,
                                "ordinal": i,
                                "state": StepState.PENDING.value,
                                "attempt": 0,
                            }
                            for i, name in enumerate(steps)
                        ],
                    )
                    return self._require_run(conn, run_id), True
            except Conflict:
                continue
        raise TransientError(
            f"start run for tenant {tenant_id!r}: lost three races in a row; retry", resource=f"tenant:{tenant_id}"
        )

    def find_active_run(self, tenant_id: str) -> MigrationRun | None:
        with self._tx("find active run", write=False) as conn:
            run_id = self._running_run_id(conn, tenant_id)
            return None if run_id is None else self._load_run(conn, run_id)

    def get_run(self, run_id: str) -> MigrationRun | None:
        with self._tx("get run", write=False) as conn:
            return self._load_run(conn, run_id)

    def list_runs(
        self, tenant_id: str | None = None, *, states: Iterable[RunState] | None = None, limit: int = 100
    ) -> list[MigrationRun]:
        q = select(runs.c.run_id)
        if tenant_id is not None:
            q = q.where(runs.c.tenant_id == tenant_id)
        if states is not None:
            q = q.where(runs.c.state.in_([member(RunState, s, "run state").value for s in states]))
        q = q.order_by(runs.c.created_at.desc(), runs.c.run_id.desc()).limit(limit)
        with self._tx("list runs", write=False) as conn:
            ids = conn.execute(q).scalars().all()
            return [self._require_run(conn, i) for i in ids]

    def set_run_state(self, run_id: str, state: RunState, *, fence: Fence | None = None) -> MigrationRun:
        state = member(RunState, state, "run state")
        try:
            with self._tx("set run state") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                run = self._require_run(conn, run_id)
                if run.state is state:
                    return run
                if state not in RUN_MOVES[run.state]:
                    raise StateError(
                        f"run {run_id!r} cannot move from {run.state.value} to {state.value}", resource=f"run:{run_id}"
                    )
                conn.execute(
                    update(runs).where(runs.c.run_id == run_id).values(state=state.value, updated_at=self._now())
                )
                return self._require_run(conn, run_id)
        except Conflict:
            raise StateError(
                f"run {run_id!r} cannot resume: its tenant has another running run", resource=f"run:{run_id}"
            ) from None

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
        result = None if result is None else json_object(result, "step result")
        with self._tx("update step") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            run_state = conn.execute(select(runs.c.state).where(runs.c.run_id == run_id)).scalar_one()
            if run_state != RunState.RUNNING.value:
                raise StateError(
                    f"run {run_id!r} is {run_state}; steps change only while it is running", resource=f"run:{run_id}"
                )
            row = conn.execute(
                select(run_steps).where(run_steps.c.run_id == run_id, run_steps.c.name == step)
            ).one_or_none()
            if row is None:
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            values = step_transition(row.state, state, row.attempt, result, error, self._now(), run_id, step)
            if values is None:
                return _step(row)
            row = conn.execute(
                update(run_steps)
                .where(run_steps.c.run_id == run_id, run_steps.c.name == step)
                .values(**values)
                .returning(*run_steps.c)
            ).one()
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(updated_at=self._now()))
            return _step(row)

    def reset_steps(self, run_id: str, from_step: str, *, fence: Fence | None = None) -> MigrationRun:
        with self._tx("reset steps") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            ordinal = conn.execute(
                select(run_steps.c.ordinal).where(run_steps.c.run_id == run_id, run_steps.c.name == from_step)
            ).scalar()
            if ordinal is None:
                raise StateError(f"run {run_id!r} has no step {from_step!r}", resource=f"run:{run_id}")
            names = (
                conn.execute(
                    select(run_steps.c.name).where(run_steps.c.run_id == run_id, run_steps.c.ordinal >= ordinal)
                )
                .scalars()
                .all()
            )
            conn.execute(delete(checkpoints).where(checkpoints.c.run_id == run_id, checkpoints.c.step.in_(names)))
            conn.execute(
                update(run_steps)
                .where(run_steps.c.run_id == run_id, run_steps.c.ordinal >= ordinal)
                .values(state=StepState.PENDING.value, started_at=None, finished_at=None, result=None, error=None)
            )
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(updated_at=self._now()))
            return self._require_run(conn, run_id)

    def save_checkpoint(
        self, run_id: str, step: str, shard: int, cursor: Mapping[str, Any], *, fence: Fence | None = None
    ) -> None:
        cursor = json_object(cursor, "checkpoint cursor")
        try:
            with self._tx("save checkpoint") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                now = self._now()
                stmt = self._insert(checkpoints).values(
                    run_id=run_id, step=step, shard=shard, cursor=cursor, updated_at=now
                )
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["run_id", "step", "shard"], set_={"cursor": cursor, "updated_at": now}
                    )
                )
        except Conflict:
            raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}") from None

    def load_checkpoints(self, run_id: str, step: str) -> dict[int, dict[str, Any]]:
        with self._tx("load checkpoints", write=False) as conn:
            rows = conn.execute(
                select(checkpoints.c.shard, checkpoints.c.cursor).where(
                    checkpoints.c.run_id == run_id, checkpoints.c.step == step
                )
            ).all()
        return {int(r.shard): dict(r.cursor) for r in rows}


def _step(r: Row[Any]) -> StepRecord:
    return StepRecord(
        run_id=r.run_id,
        name=r.name,
        ordinal=r.ordinal,
        state=StepState(r.state),
        attempt=r.attempt,
        started_at=r.started_at,
        finished_at=r.finished_at,
        result=None if r.result is None else dict(r.result),
        error=r.error,
    )


def _run(r: Row[Any], steps: Sequence[Row[Any]]) -> MigrationRun:
    return MigrationRun(
        run_id=r.run_id,
        tenant_id=r.tenant_id,
        flow=Flow(r.flow),
        mode=r.mode,
        state=RunState(r.state),
        params=dict(r.params),
        created_at=r.created_at,
        updated_at=r.updated_at,
        steps=tuple(_step(s) for s in steps),
    )
