"""The stack's Prefect server runs flows: in this process and in a subprocess, each flow run
(with mapped tasks) is read back from that server by id, so neither used an ephemeral one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import requests
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect_polling import completed_task_runs

SUBPROCESS_TIMEOUT_S = 120  # a hang fails the test instead of the session


@task
def square(x: int) -> int:
    return x * x


@task
def add_one(x: int) -> int:
    return x + 1


@flow(name="prefect-server-smoke")
def smoke_flow(numbers: list[int]) -> list[int]:
    squares = square.map(numbers)
    return add_one.map(squares).result()


def _flow_run_from_server(api_url: str, flow_run_id: str) -> FlowRun:
    """Read the run straight from the stack's URL, with no Prefect client configuration."""
    resp = requests.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10)
    assert resp.status_code == 200, f"flow run {flow_run_id} not on the stack's server: {resp.status_code}"
    return FlowRun.model_validate(resp.json())


def test_flow_with_mapped_tasks_runs_on_the_stack_server(prefect_api: str) -> None:
    state = smoke_flow([1, 2, 3], return_state=True)

    assert state.is_completed()
    assert state.result() == [2, 5, 10]
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_api
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.name and flow_run.state is not None and flow_run.state.is_completed()
    assert _flow_run_from_server(prefect_api, str(flow_run_id)).state.is_completed()
    task_names = sorted(r.task_key.split("-")[0] for r in completed_task_runs(flow_run_id, expected=6))
    assert task_names == ["add_one"] * 3 + ["square"] * 3


SUBPROCESS_FLOW = textwrap.dedent("""
    import json

    from prefect import flow, task
    from prefect.client.orchestration import get_client


    @task
    def double(x: int) -> int:
        return 2 * x


    @flow(name="prefect-server-smoke-subprocess")
    def child_flow() -> list[int]:
        return double.map([1, 2]).result()


    state = child_flow(return_state=True)
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    print("RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id),
                                  "completed": state.is_completed(), "api_url": api_url}))
""")


def test_flow_in_a_subprocess_uses_the_stack_server_not_a_temporary_one(prefect_api: str, tmp_path: Path) -> None:
    script = tmp_path / "child_flow.py"
    script.write_text(SUBPROCESS_FLOW)
    assert os.environ["PREFECT_API_URL"] == prefect_api  # what the child inherits, set by the fixture

    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Starting temporary server" not in output
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result_lines) == 1, output[-4000:]
    result = json.loads(result_lines[0].removeprefix("RESULT "))
    assert result["completed"] is True
    assert result["api_url"].rstrip("/") == prefect_api
    assert _flow_run_from_server(prefect_api, result["flow_run_id"]).state.is_completed()
