"""Shared fixtures. The service fixtures (`localstack`, `azurite`, `elasticsearch`,
`keyvault`, `kmip`, `prefect`) give Settings for a real server on loopback; any tier may
use them.

The services are started by `archive-kms stack up` (`make test` does it first). A test
never skips for a missing service: if one is down, the session fails naming it and the
command that starts it. Set ARCHIVE_KMS_TEST_AUTOSTART=1 to have the suite start the
stack itself.

Prefect: flows report to the stack's Prefect server (`prefect` service, `prefect_api`
fixture). Prefect's ephemeral mode (a temporary server started inside each process) is
switched off for the whole session, so a flow run without the fixture fails loudly instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from archive_kms.config import PROJECT_ROOT, Settings

# Set before anything imports Prefect (it reads the environment once, at import), and
# inherited by subprocesses: with no API URL a flow run raises "No Prefect API URL provided"
# instead of silently starting a temporary server (8-20 s per process, runs nobody can see).
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"


def _stack_status() -> dict[str, bool]:
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "localstack" / "stack.py"), "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {row["service"]: row["healthy"] for row in json.loads(out.stdout)}


@pytest.fixture(scope="session")
def stack() -> dict[str, bool]:
    status = _stack_status()
    if not all(status.values()) and os.environ.get("ARCHIVE_KMS_TEST_AUTOSTART") == "1":
        subprocess.run([sys.executable, str(PROJECT_ROOT / "localstack" / "stack.py"), "up"], check=False)
        status = _stack_status()
    return status


def _need(stack: dict[str, bool], name: str) -> None:
    if not stack.get(name):
        pytest.fail(
            f"service {name!r} is not healthy: run `archive-kms stack up` "
            f"(see `archive-kms stack status`; log in .stack/logs/{name}.log)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


def _service(name: str):
    """A fixture giving Settings for the real service ``name``, failing loudly if it is down."""

    @pytest.fixture(name=name)
    def fixture(stack, settings) -> Settings:
        _need(stack, name)
        return settings

    return fixture


localstack = _service("localstack")
azurite = _service("azurite")
elasticsearch = _service("elasticsearch")
keyvault = _service("keyvault")
kmip = _service("kmip")
prefect = _service("prefect")
worker = _service("worker")  # the Prefect worker for the deployments (flows/prefect.yaml)
postgres = _service("postgres")  # the stack's PostgreSQL server (the fleet trials make a database in it)


@pytest.fixture(scope="session")
def prefect_api(stack, settings) -> Iterator[str]:
    """The stack's Prefect API URL, made the API of every flow run in this session.

    Fails the session if the `prefect` service is down. Sets PREFECT_API_URL twice: in
    ``os.environ`` for subprocesses (kill -9 tests run flows in child processes), and in
    Prefect's settings context for this process, because Prefect reads the environment
    once at import and would not see a later ``os.environ`` change. Both are restored on
    teardown.

    No silent fallback to Prefect's ephemeral server: ephemeral mode is off for the whole
    session (module top), both here and in subprocesses, so a flow run that reaches no API
    URL raises instead of quietly starting a temporary server.
    """
    _need(stack, "prefect")
    if not settings.prefect_api_url:
        pytest.fail(
            "prefect_api_url is not set: run `archive-kms stack up` (it writes .stack/endpoints.json)", pytrace=False
        )
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_ENABLED")}
    os.environ.update(PREFECT_API_URL=settings.prefect_api_url, PREFECT_SERVER_EPHEMERAL_ENABLED="false")
    try:
        with temporary_settings(
            updates={PREFECT_API_URL: settings.prefect_api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
        ):
            yield settings.prefect_api_url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_collection_modifyitems(items):
    for item in items:
        if any(f"tests/{tier}/" in str(item.fspath) for tier in ("integration", "contract", "flows", "faults")):
            item.add_marker(pytest.mark.integration)


# --- exit watchdog --------------------------------------------------------------------------
# A thread nobody stops (a non-daemon executor thread blocked on a socket, a child process
# multiprocessing joins at exit) would keep the interpreter alive after the summary, and CI
# would end on its time limit with every test passed. After the session, a daemon thread
# waits EXIT_GRACE_SECONDS; if the process is still alive it names what holds it (threads
# with their stacks, child processes) and exits with the session's own status.
EXIT_GRACE_SECONDS = 60.0
_session_status: list[int] = [0]


def pytest_sessionfinish(session, exitstatus):
    _session_status[0] = int(exitstatus)


def pytest_unconfigure(config):
    import threading

    def _watch() -> None:
        import multiprocessing
        import time
        import traceback

        time.sleep(EXIT_GRACE_SECONDS)
        frames = sys._current_frames()
        lines = [f"\n[exit watchdog] the test process was still alive {EXIT_GRACE_SECONDS:g} s after the session:"]
        for thread in threading.enumerate():
            if thread is threading.current_thread():
                continue
            lines.append(f"  thread {thread.name!r} daemon={thread.daemon}")
            frame = frames.get(thread.ident or -1)
            if frame is not None:
                lines.extend("    " + row.rstrip() for row in traceback.format_stack(frame)[-6:])
        for child in multiprocessing.active_children():
            lines.append(f"  child process {child.name!r} pid={child.pid} daemon={child.daemon}")
        print("\n".join(lines), file=sys.__stderr__, flush=True)
        for stream in (sys.stdout, sys.__stdout__, sys.stderr):
            try:
                stream.flush()  # os._exit drops what is still buffered (a pipe is block-buffered)
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to lose
                pass
        os._exit(_session_status[0] or 0)

    threading.Thread(target=_watch, name="exit-watchdog", daemon=True).start()
