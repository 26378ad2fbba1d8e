"""`stack up | status | down` on a real service, in a stack directory of its own.

Runs the Key Vault emulator (it starts in about a second) on a free port in a temporary
stack directory, so the suite's own stack is not touched. Proves what the foundation
promises: `up` starts and then reuses, `status` names a service stopped by hand and exits
non-zero, and a second `up` repairs it, including a hung process left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "localstack" / "stack.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stack_env(tmp_path: Path):
    env = dict(os.environ, ARCHIVE_KMS_STACK_DIR=str(tmp_path / "stack"), ARCHIVE_KMS_PORT_KEYVAULT=str(_free_port()))
    yield env
    subprocess.run(
        [sys.executable, str(STACK), "down", "--only", "keyvault"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STACK), *args, "--only", "keyvault", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _up(env: dict[str, str]) -> dict:
    r = _stack(env, "up")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"][0]


def _status(env: dict[str, str]) -> tuple[int, dict]:
    r = _stack(env, "status")
    return r.returncode, json.loads(r.stdout)[0]


def test_up_starts_then_reuses_and_status_reports_version_and_memory(stack_env):
    assert _up(stack_env)["action"] == "started"
    rc, row = _status(stack_env)
    assert rc == 0 and row["healthy"] and row["pid"] and row["rss_mb"] > 0
    assert "keyvault-emulator" in row["version"]
    assert _up(stack_env)["action"] == "reused"


def test_service_killed_by_hand_is_reported_and_up_restarts_it(stack_env):
    _up(stack_env)
    _, row = _status(stack_env)
    os.killpg(row["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        rc, row = _status(stack_env)
        if not row["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rc == 1 and not row["healthy"]
    assert row["log"].endswith("keyvault.log")
    assert _up(stack_env)["action"] == "started"
    rc, row = _status(stack_env)
    assert rc == 0 and row["healthy"]


def test_hung_service_is_replaced_by_up(stack_env):
    _up(stack_env)
    _, row = _status(stack_env)
    hung = row["pid"]
    os.kill(hung, signal.SIGSTOP)  # alive, port open, answers nothing
    try:
        rc, row = _status(stack_env)
        assert rc == 1 and not row["healthy"] and row["pid"] == hung
        pidfile = Path(stack_env["ARCHIVE_KMS_STACK_DIR"]) / "pids" / "keyvault.pid"
        old = time.time() - 3600  # started long ago, so `up` does not just wait for it
        os.utime(pidfile, (old, old))
        assert _up(stack_env)["action"] == "started"
        rc, row = _status(stack_env)
        assert rc == 0 and row["healthy"] and row["pid"] != hung
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_endpoints_json_prints_the_endpoints(stack_env):
    _up(stack_env)
    r = subprocess.run(
        [sys.executable, str(STACK), "endpoints", "--json"],
        env=stack_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    endpoints = json.loads(r.stdout)
    assert endpoints["azure_keyvault_url"].endswith(f":{stack_env['ARCHIVE_KMS_PORT_KEYVAULT']}")
    assert endpoints["state_url"].startswith("sqlite:///")
