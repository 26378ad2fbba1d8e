"""Reading what the stack's Prefect server knows about a flow run, for the tests that
run flows against it (tests/integration, tests/flows)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

TASK_RUNS_VISIBLE_TIMEOUT_S = 30  # task run states reach the server as events, a moment later


def completed_task_runs(flow_run_id: uuid.UUID, expected: int) -> list[Any]:
    """The flow run's completed task runs, polled until ``expected`` are there or the
    timeout passes (then whatever is there: the caller's assertion says what is missing)."""
    deadline = time.monotonic() + TASK_RUNS_VISIBLE_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r for r in runs if r.state is not None and r.state.is_completed()]
            if len(done) >= expected or time.monotonic() > deadline:
                return done
            time.sleep(0.5)
