"""The fleet's limits, as Prefect global concurrency limits (docs/adr/0033-fleet-limits.md).

Every worker, every flow-run process and every Dask worker of the fleet draws on the same
limits on the Prefect server, so the bounds hold however many machines run:

- ``archive-kms-runs``: how many migration runs execute their steps at once
  (``settings.max_concurrent_runs``). A run takes one slot after it took its tenant's lease
  and before its first step, and holds it until it ends (``run_admission``). The slot is a
  Prefect lease (60 s, renewed by Prefect while the run lives): a worker killed with
  ``kill -9`` frees it within about a minute, without anyone releasing it.
- ``archive-kms-l1:<domain>``: a rate limit (slot decay) per quota domain of a key service
  (``keys.limits``: an AWS account and region, a Key Vault, a KMIP HSM). Every request the
  flows' processes send to that service takes one slot first (``PrefectRequestLimiter``):
  at most ``rate`` requests per second, bursts of at most one second's worth.

A limit is created from the settings the first time a process needs it and left as it is
afterwards (the server's value rules; ``apply_limits`` / ``archive-kms limits apply``
sets them from the settings).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from archive_kms.config import Settings
from archive_kms.errors import ConfigurationError, KeyThrottledError, ServiceUnavailableError
from archive_kms.keys.limits import QuotaDomain, rate_for

log = logging.getLogger(__name__)

RUNS_LIMIT = "archive-kms-runs"
L1_LIMIT_PREFIX = "archive-kms-l1:"
#: Prefect's shortest concurrency lease: a killed holder's slot is free again after it.
RUN_SLOT_LEASE_SECONDS = 60.0


def l1_limit_name(domain: QuotaDomain) -> str:
    return L1_LIMIT_PREFIX + domain.name


def l1_limit_values(domain: QuotaDomain, settings: Settings) -> tuple[int, float]:
    """(slots, decay per second) of ``domain``'s rate limit: ``rate`` per second, bursts
    of one second's worth (at least one request)."""
    rate = rate_for(domain.kind, settings)
    return max(1, math.ceil(rate)), rate


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def ensure_limit(name: str, limit: int, slot_decay_per_second: float = 0.0) -> bool:
    """Create the global concurrency limit ``name`` unless it exists; True if created."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    try:
        with _client() as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=slot_decay_per_second)
            )
        log.info("created Prefect concurrency limit %s (%d slots, decay %.3g/s)", name, limit, slot_decay_per_second)
        return True
    except ObjectAlreadyExists:
        return False


def apply_limits(settings: Settings, domains: Sequence[QuotaDomain] = ()) -> list[dict[str, Any]]:
    """Set the run limit and the rate limits of ``domains`` (and of every rate limit
    already on the server) to the values ``settings`` give, creating missing ones."""
    known: list[str] = []
    with _client() as client:
        for offset in itertools.count(0, 200):  # the API pages by at most 200
            page = client.read_global_concurrency_limits(limit=200, offset=offset)
            known += [limit.name for limit in page if limit.name.startswith(L1_LIMIT_PREFIX)]
            if len(page) < 200:
                break
    wanted: dict[str, tuple[int, float]] = {RUNS_LIMIT: (settings.max_concurrent_runs, 0.0)}
    for name in known:
        kind, _, scope = name.removeprefix(L1_LIMIT_PREFIX).partition(":")
        if kind in ("aws-kms", "azure-kv", "kmip"):
            wanted[name] = l1_limit_values(QuotaDomain(kind, scope), settings)
    for domain in domains:
        wanted[l1_limit_name(domain)] = l1_limit_values(domain, settings)
    out = []
    with _client() as client:
        for name, (limit, decay) in wanted.items():
            client.upsert_global_concurrency_limit_by_name(name, limit, slot_decay_per_second=decay or None)
            out.append({"name": name, "limit": limit, "slot_decay_per_second": decay})
    return out


class PrefectRequestLimiter:
    """``keys.limits.RequestLimiter`` on Prefect rate limits, one per quota domain.

    Callable from any thread. Why that needs care: Prefect's settings live in a context
    variable, and a thread that did not inherit the flow run's context (a copy shard's, the
    key-state probe's) sees the settings the process had when it imported Prefect. If those
    name no API, Prefect quietly starts a temporary server of its own and the fleet-wide
    limit becomes this process's alone. So a request runs under the thread's own API when it
    has one, else under the API known when the limiter was built (the building context's,
    else ``prefect_api_url``), else it is refused (``ConfigurationError``)."""

    def __init__(self, settings: Settings) -> None:
        from prefect.settings import get_current_settings

        self._settings = settings
        self._api_url = get_current_settings().api.url or settings.prefect_api_url
        self._bound: tuple[Any, Any] | None = None  # (profile, Prefect settings on that API), built once
        self._ready: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "PrefectRequestLimiter()"

    @contextlib.contextmanager
    def _on_fleet_api(self) -> Iterator[None]:
        import prefect.context
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        current = prefect.context.get_settings_context()
        if current.settings.api.url:
            yield
            return
        if not self._api_url:
            raise ConfigurationError(
                "no Prefect API for the fleet's limits: set PREFECT_API_URL or prefect_api_url "
                "(ARCHIVE_KMS_PREFECT_API_URL); the limits live on the fleet's Prefect server"
            )
        with self._lock:
            if self._bound is None:  # copying Prefect's settings costs ~0.1 s: once per limiter
                updates = {PREFECT_API_URL: self._api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
                self._bound = (current.profile, current.settings.copy_with_update(updates=updates))
            profile, bound = self._bound
        with prefect.context.SettingsContext(profile=profile, settings=bound):
            yield

    def _ensure(self, domain: QuotaDomain) -> str:
        name = l1_limit_name(domain)
        with self._lock:
            if name in self._ready:
                return name
        slots, decay = l1_limit_values(domain, self._settings)
        ensure_limit(name, slots, decay)
        with self._lock:
            self._ready.add(name)
        return name

    def acquire(self, domain: QuotaDomain, requests: int = 1) -> None:
        from prefect.concurrency.sync import rate_limit

        timeout = self._settings.l1_limit_timeout_seconds
        with self._on_fleet_api():  # no API at all: ConfigurationError, not a retryable outage
            try:
                name = self._ensure(domain)
                rate_limit(name, occupy=requests, timeout_seconds=timeout, strict=True)
            except TimeoutError:
                raise KeyThrottledError(
                    f"no request slot for {domain} within {timeout:.0f} s (rate limit {l1_limit_name(domain)}): "
                    "the fleet is at its share of this key service's quota",
                    resource=domain.name,
                ) from None
            except Exception as exc:  # noqa: BLE001 - httpx / Prefect client errors: the API does not answer
                raise ServiceUnavailableError(
                    f"the Prefect API did not grant a request slot for {domain} ({type(exc).__name__}: {exc})"[:500],
                    resource=domain.name,
                ) from None


def run_admission(settings: Settings) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """The engine's ``admission``: hold one slot of ``archive-kms-runs`` while the run's
    steps execute (created with ``max_concurrent_runs`` slots if missing)."""

    @contextlib.contextmanager
    def admitted() -> Iterator[None]:
        from prefect.concurrency.sync import concurrency

        try:
            ensure_limit(RUNS_LIMIT, settings.max_concurrent_runs)
        except Exception as exc:  # noqa: BLE001 - the API does not answer
            raise ServiceUnavailableError(
                f"the Prefect API did not answer for limit {RUNS_LIMIT} ({type(exc).__name__})", resource=RUNS_LIMIT
            ) from None
        with concurrency(RUNS_LIMIT, occupy=1, lease_duration=RUN_SLOT_LEASE_SECONDS, strict=True):
            yield

    return admitted


__all__ = [
    "L1_LIMIT_PREFIX",
    "RUNS_LIMIT",
    "RUN_SLOT_LEASE_SECONDS",
    "PrefectRequestLimiter",
    "apply_limits",
    "ensure_limit",
    "l1_limit_name",
    "l1_limit_values",
    "run_admission",
]
