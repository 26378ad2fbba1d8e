"""The key-request rate limit (``flows/limits.py``) is the fleet's from every thread.

A copy shard's thread and the key-state probe's do not inherit the flow run's Prefect
context; Prefect there sees the settings of the moment it was imported. Before, such a
thread with no API in those settings made Prefect start a temporary server of its own, so
the "fleet-wide" limit was this process's alone (and a stray server outlived the run).
These run against the stack's Prefect server; a temporary server counts as a failure.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from archive_kms.flows.limits import PrefectRequestLimiter, l1_limit_name

from archive_kms.config import Settings
from archive_kms.errors import ConfigurationError
from archive_kms.keys.limits import QuotaDomain


@pytest.fixture
def no_temporary_server(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt by Prefect to start a temporary server is recorded and refused."""
    from prefect.server.api import server

    started: list[str] = []

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        started.append(threading.current_thread().name)
        raise RuntimeError("Prefect tried to start a temporary server")

    monkeypatch.setattr(server.SubprocessASGIServer, "start", refuse)
    return started


@pytest.fixture
def domain(prefect_api: str) -> Iterator[QuotaDomain]:
    """A quota domain of its own, its limit deleted afterwards."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = QuotaDomain("aws-kms", f"test-{uuid.uuid4().hex[:8]}:000000000000")
    yield found
    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(l1_limit_name(found))
        except ObjectNotFound:
            pass


def _in_a_thread_without_an_api(call: Callable[[], None]) -> BaseException | None:
    """Run ``call`` in a new thread whose Prefect settings name no API (as a shard thread's
    do when the process imported Prefect before the API was set); its error, if any."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    errors: list[BaseException] = []

    def run() -> None:
        try:
            with temporary_settings(restore_defaults={PREFECT_API_URL}):
                call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=run, name="shard-like")
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the limiter hung"
    return errors[0] if errors else None


def _limit_on_stack(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_a_thread_without_the_flows_context_uses_the_fleets_server(
    flow_settings: Settings, prefect_api: str, domain: QuotaDomain, no_temporary_server: list[str]
) -> None:
    limiter = PrefectRequestLimiter(flow_settings.model_copy(update={"prefect_api_url": None}))  # built in the run
    assert _in_a_thread_without_an_api(lambda: limiter.acquire(domain)) is None
    assert no_temporary_server == []
    limit = _limit_on_stack(l1_limit_name(domain))  # on the stack's server, not a private one
    assert limit.limit >= 1 and limit.slot_decay_per_second > 0


def test_built_outside_a_run_it_uses_the_configured_api(
    flow_settings: Settings, prefect_api: str, domain: QuotaDomain, no_temporary_server: list[str]
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        limiter = PrefectRequestLimiter(flow_settings.model_copy(update={"prefect_api_url": prefect_api}))
    assert _in_a_thread_without_an_api(lambda: limiter.acquire(domain)) is None
    assert no_temporary_server == []
    assert _limit_on_stack(l1_limit_name(domain)).name == l1_limit_name(domain)


def test_with_no_api_anywhere_it_refuses_naming_the_setting(
    flow_settings: Settings, prefect_api: str, domain: QuotaDomain, no_temporary_server: list[str]
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        limiter = PrefectRequestLimiter(flow_settings.model_copy(update={"prefect_api_url": None}))
    error = _in_a_thread_without_an_api(lambda: limiter.acquire(domain))
    assert isinstance(error, ConfigurationError), error
    assert "PREFECT_API_URL" in str(error) and "prefect_api_url" in str(error)
    assert no_temporary_server == []
