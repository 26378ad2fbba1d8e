"""What this process last saw of each tenant's master key (L1) at its provider, and what a
provider outage does to the tenant's cached keys (its grace policy).

Every use of a tenant's keys (a cached L2, L3, DEK or the search material, or an unwrap)
passes :meth:`KeyStateGuard.check` first. It asks the provider for the key's state
(``KeyProvider.status()``: DescribeKey, the Key Vault key's properties, KMIP Get
Attributes) at most once per ``check_seconds`` per tenant per process, and waits at most
``timeout_seconds`` for the answer, so the cost is one status call per tenant per
interval and a read never waits longer than the timeout for it:

* **ok** (the key is enabled): go on;
* **unusable** (disabled, pending deletion or import, material expired, revoked at the
  HSM, not found, access denied): the customer took the key away. The tenant's cached keys
  are purged and ``KeyUnavailableError`` (naming the tenant, the key, its state and when
  it was seen) refuses the use. With the default 5 s interval a warm process refuses
  within 5 s (plus one status call) of the customer's change;
* **unreachable** (the status call failed with a transport error or did not answer in
  time): *not* a revocation. The tenant's :class:`GracePolicy` decides:
  ``deny-immediately`` purges and refuses with ``KeyServiceUnavailableError``;
  ``serve-from-cache-for N`` keeps serving cached keys (holding them in the cache past
  their TTL) until N s after the last successful check, then purges and refuses;
  ``alert-only`` changes nothing (cached keys serve to their normal expiry).

Transitions (ok -> unusable, ok -> unreachable, back to ok) are reported to ``on_change``
(the composition root raises and clears warnings with it). The guard never records a
revocation itself: the key-state monitor does (``operations.key_monitor``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextvars
import enum
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from archive_kms.config import setting_default
from archive_kms.errors import ArchiveKmsError, KeyServiceUnavailableError, KeyUnavailableError, ValidationError
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.port import KeyProvider, KeyState

__all__ = [
    "DEFAULT_CHECK_SECONDS",
    "DEFAULT_GRACE",
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_GRACE_SECONDS",
    "Availability",
    "GraceKind",
    "GracePolicy",
    "KeyStateGuard",
    "L1Verdict",
]

log = logging.getLogger(__name__)

# The defaults of a guard built without settings are the settings' defaults.
DEFAULT_CHECK_SECONDS: float = setting_default("key_state_check_seconds")
DEFAULT_TIMEOUT_SECONDS: float = setting_default("key_state_check_timeout_seconds")
MAX_GRACE_SECONDS = 86_400.0


class GraceKind(str, enum.Enum):
    DENY_IMMEDIATELY = "deny-immediately"
    SERVE_FROM_CACHE = "serve-from-cache-for"
    ALERT_ONLY = "alert-only"


_GRACE_TEXT = re.compile(r"^serve-from-cache-for[:= ]?(\d+(?:\.\d+)?)s?$")


@dataclass(frozen=True)
class GracePolicy:
    """What an outage of the tenant's key service does (docs/key-lifecycle.md).

    Written as ``deny-immediately``, ``alert-only`` or ``serve-from-cache-for:N`` (N
    seconds, 1..86400; ``serve-from-cache-for N``, ``=N`` and a trailing ``s`` are read too)."""

    kind: GraceKind
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind is GraceKind.SERVE_FROM_CACHE:
            if self.seconds is None or not 1 <= self.seconds <= MAX_GRACE_SECONDS:
                raise ValidationError(
                    f"grace policy serve-from-cache-for needs seconds in 1..{int(MAX_GRACE_SECONDS)}, got {self.seconds}"
                )
        elif self.seconds is not None:
            raise ValidationError(f"grace policy {self.kind.value} takes no seconds")

    @classmethod
    def parse(cls, text: str) -> GracePolicy:
        value = (text or "").strip().lower()
        if value == GraceKind.DENY_IMMEDIATELY.value:
            return cls(GraceKind.DENY_IMMEDIATELY)
        if value == GraceKind.ALERT_ONLY.value:
            return cls(GraceKind.ALERT_ONLY)
        m = _GRACE_TEXT.fullmatch(value)
        if m is None:
            raise ValidationError(
                f"grace policy {text!r}: use deny-immediately, alert-only or serve-from-cache-for:SECONDS "
                f"(1..{int(MAX_GRACE_SECONDS)})"
            )
        seconds = float(m.group(1))
        return cls(GraceKind.SERVE_FROM_CACHE, int(seconds) if seconds.is_integer() else seconds)

    def __str__(self) -> str:
        if self.kind is GraceKind.SERVE_FROM_CACHE:
            return f"{self.kind.value}:{self.seconds:g}"
        return str(self.kind.value)


DEFAULT_GRACE = GracePolicy.parse(setting_default("key_outage_grace"))


class Availability(str, enum.Enum):
    OK = "ok"  # the provider says the key is enabled
    UNUSABLE = "unusable"  # the provider says the key cannot be used (the customer's act)
    UNREACHABLE = "unreachable"  # the provider did not answer: an outage, not a revocation


@dataclass(frozen=True)
class L1Verdict:
    """What this process last learned about a tenant's master key."""

    tenant_id: str
    l1_ref: str
    availability: Availability
    state: KeyState | None  # the provider's answer; None while unreachable
    key_version: str | None
    checked_at: datetime  # wall clock, for messages and warnings
    last_ok_at: datetime | None  # the last answer "enabled" (wall clock)
    error: str | None = None  # why it was unreachable (error type and message, no key bytes)


@dataclass
class _Tenant:
    verdict: L1Verdict
    checked: float  # monotonic (the cache's clock) of the verdict
    last_ok: float | None  # monotonic of the last OK


T = TypeVar("T")

# Set as the interpreter starts shutting down (before it joins threads: the moment the
# libraries a status call uses begin to refuse new work, as concurrent.futures does).
_INTERPRETER_STOPPING = threading.Event()
(getattr(threading, "_register_atexit", None) or atexit.register)(_INTERPRETER_STOPPING.set)


class _DaemonPool:
    """A fixed set of daemon threads running submitted calls into futures.

    Not a ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so a
    status call hung on a provider that never answers (the case the timeout exists for)
    would keep a finished process alive forever. A status call has no effect to finish."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._threads = threads
        self._name = name
        self._started = 0
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        """The interpreter is shutting down: calls still running were cut short."""
        return _INTERPRETER_STOPPING.is_set()

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, call))
        with self._lock:
            if self._started < self._threads:
                self._started += 1
                threading.Thread(target=self._serve, name=f"{self._name}-{self._started}", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            future, call = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)


class KeyStateGuard:
    """Per-process, per-tenant L1 state with bounded staleness (see the module docstring).

    ``resolve`` turns an L1 reference into its provider; ``policy_for(tenant)`` returns the
    tenant's grace policy (looked up at most every ``policy_seconds``). The guard uses the
    cache's clock, so grace holds and checks share one timeline."""

    def __init__(
        self,
        resolve: Callable[[str], KeyProvider],
        cache: KeyCache,
        *,
        check_seconds: float = DEFAULT_CHECK_SECONDS,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        policy_for: Callable[[str], GracePolicy] | None = None,
        policy_seconds: float = 30.0,
        on_change: Callable[[L1Verdict, L1Verdict | None], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if check_seconds <= 0 or timeout_seconds <= 0:
            raise ValidationError("check_seconds and timeout_seconds must be > 0")
        self._resolve = resolve
        self._cache = cache
        self.check_seconds = float(check_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self._policy_for = policy_for or (lambda tenant_id: DEFAULT_GRACE)
        self._policy_seconds = policy_seconds
        self._on_change = on_change
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}
        self._inflight: dict[str, concurrent.futures.Future[L1Verdict]] = {}
        self._inflight_since: dict[str, float] = {}
        self._policies: dict[str, tuple[float, GracePolicy]] = {}
        self._pool = _DaemonPool(4, "akms-key-state")

    def __repr__(self) -> str:
        return f"KeyStateGuard(check={self.check_seconds}s, timeout={self.timeout_seconds}s)"

    # --- the check -------------------------------------------------------------------------

    def check(self, tenant_id: str, l1_ref: str) -> L1Verdict:
        """Refuse (raise) unless the tenant's keys may be used now; returns the verdict."""
        verdict, last_ok = self.current(tenant_id, l1_ref)
        assert verdict is not None  # current() with wait always has one
        self.enforce(verdict, last_ok)
        return verdict

    def current(self, tenant_id: str, l1_ref: str, *, wait: bool = True) -> tuple[L1Verdict | None, float | None]:
        """The verdict, refreshed from the provider once it is older than ``check_seconds``.

        One status call per tenant is in flight at a time, in the guard's threads. While
        it is pending a caller keeps the previous verdict (no read waits for the provider),
        until the call has been pending ``timeout_seconds``: then the service counts as
        unreachable until it answers. Only a tenant's first use in a process waits for the
        answer (at most ``timeout_seconds``); without ``wait`` it gets ``(None, None)``.

        While an outage refuses the tenant's keys (its grace policy refuses now), every use
        asks the service again (still one call in flight per tenant) and waits for an answer
        asked after it began (at most ``timeout_seconds``), so access returns with the first
        use after the service answers again, not ``check_seconds`` later."""
        now = self._cache.now()
        with self._lock:
            known = self._tenants.get(tenant_id)
            if known is not None and known.verdict.l1_ref != l1_ref:
                known = None
        refusing = known is not None and self._refuses(tenant_id, known)
        if known is not None and not refusing and now - known.checked < self.check_seconds:
            return known.verdict, known.last_ok
        if known is not None and refusing and not wait:  # the sweeper: ask in the background
            self._submit(tenant_id, l1_ref)
            return known.verdict, known.last_ok
        # How long a call has been pending is real time (monotonic), whatever the cache's clock.
        began = time.monotonic()
        deadline = began + self.timeout_seconds
        latest = known
        for _ in range(2):  # a refused use waits for an answer asked after it began
            future, since = self._submit(tenant_id, l1_ref)
            pending = time.monotonic() - since
            if known is not None and pending < self.timeout_seconds and not refusing:
                return known.verdict, known.last_ok  # the answer is on its way
            if known is not None and refusing and pending >= self.timeout_seconds:
                return known.verdict, known.last_ok  # a hung call: the refusal it earned stands
            if known is None and not wait:
                return None, None
            try:
                future.result(timeout=max(0.0, min(deadline, since + self.timeout_seconds) - time.monotonic()))
            except concurrent.futures.TimeoutError:
                with self._lock:
                    answered = self._tenants.get(tenant_id)
                if not future.done() and (
                    answered is None or answered.verdict.availability is not Availability.UNREACHABLE
                ):
                    self._settle(tenant_id, l1_ref, None, f"no answer within {self.timeout_seconds:g} s")
                with self._lock:
                    latest = self._tenants.get(tenant_id)
                break
            with self._lock:
                latest = self._tenants.get(tenant_id)
            still_down = latest is not None and latest.verdict.availability is Availability.UNREACHABLE
            if not (refusing and still_down and since < began):
                break  # else that answer was asked before this use began: ask again
        if latest is None:  # the probe raised before settling (never: it settles every outcome)
            return None, None
        return latest.verdict, latest.last_ok

    def _submit(self, tenant_id: str, l1_ref: str) -> tuple[concurrent.futures.Future[L1Verdict], float]:
        """The tenant's status call in flight (started now if none) and when it started."""
        with self._lock:
            future = self._inflight.get(tenant_id)
            if future is None:
                # The probe runs in the caller's context (contextvars): settings a caller scoped
                # to itself, such as a Prefect flow run's API for the key-request limiter, hold there too.
                context = contextvars.copy_context()
                future = self._pool.submit(lambda: context.run(self._probe, tenant_id, l1_ref))
                self._inflight[tenant_id] = future
                self._inflight_since[tenant_id] = time.monotonic()
            return future, self._inflight_since.get(tenant_id, time.monotonic())

    def _refuses(self, tenant_id: str, known: _Tenant) -> bool:
        """Whether ``known``'s verdict refuses the tenant's keys now because of an outage."""
        if known.verdict.availability is not Availability.UNREACHABLE:
            return False
        policy = self.policy(tenant_id)
        if policy.kind is GraceKind.ALERT_ONLY:
            return False
        if policy.kind is GraceKind.SERVE_FROM_CACHE and known.last_ok is not None:
            assert policy.seconds is not None
            return self._cache.now() >= known.last_ok + policy.seconds
        return True

    def verdict(self, tenant_id: str) -> L1Verdict | None:
        """The last verdict, without asking the provider."""
        with self._lock:
            known = self._tenants.get(tenant_id)
            return None if known is None else known.verdict

    def forget_policy(self, tenant_id: str) -> None:
        """Look the tenant's grace policy up again at its next use (it was just changed)."""
        with self._lock:
            self._policies.pop(tenant_id, None)

    def forget(self, tenant_id: str) -> None:
        """Drop what this process knows (after ``restore`` or a new L1): ask again next time."""
        with self._lock:
            self._tenants.pop(tenant_id, None)
            self._policies.pop(tenant_id, None)
        self._cache.release(tenant_id)

    def tenants(self) -> list[str]:
        with self._lock:
            return list(self._tenants)

    # --- internals --------------------------------------------------------------------------

    def _probe(self, tenant_id: str, l1_ref: str) -> L1Verdict:
        try:
            try:
                status = self._resolve(l1_ref).status()
            except ArchiveKmsError as exc:
                return self._settle(tenant_id, l1_ref, None, f"{type(exc).__name__}: {exc}"[:300])
            except Exception as exc:  # noqa: BLE001 - an SDK surprise is an unanswered check, not a verdict
                return self._settle(tenant_id, l1_ref, None, type(exc).__name__)
            return self._settle(tenant_id, l1_ref, status.state, None, key_version=status.key_version)
        finally:
            with self._lock:
                self._inflight.pop(tenant_id, None)
                self._inflight_since.pop(tenant_id, None)

    def _settle(
        self,
        tenant_id: str,
        l1_ref: str,
        state: KeyState | None,
        error: str | None,
        *,
        key_version: str | None = None,
    ) -> L1Verdict:
        now, wall = self._cache.now(), datetime.fromtimestamp(self._wall(), UTC)
        if state is None:
            availability = Availability.UNREACHABLE
        elif state.usable:
            availability = Availability.OK
        else:
            availability = Availability.UNUSABLE
        with self._lock:
            known = self._tenants.get(tenant_id)
            if known is not None and known.verdict.l1_ref != l1_ref:
                known = None
            last_ok = known.last_ok if known is not None else None
            last_ok_at = known.verdict.last_ok_at if known is not None else None
            if availability is Availability.OK:
                last_ok, last_ok_at = now, wall
            verdict = L1Verdict(tenant_id, l1_ref, availability, state, key_version, wall, last_ok_at, error)
            if availability is Availability.UNREACHABLE and known is not None:
                verdict = replace(verdict, key_version=known.verdict.key_version)
            self._tenants[tenant_id] = _Tenant(verdict, now, last_ok)
            previous = known.verdict if known is not None else None
        changed = previous is None or previous.availability is not availability or previous.state is not state
        if changed:
            if availability is not Availability.OK:
                log.warning(
                    "key state: tenant %s, L1 %s is %s (%s)", tenant_id, l1_ref, availability.value, state or error
                )
            elif previous is not None:
                log.warning("key state: tenant %s, L1 %s is usable again", tenant_id, l1_ref)
            if self._on_change is not None and not self._pool.stopping:
                # A probe cut short by the interpreter's shutdown (its HTTP clients refuse
                # new work then) is no answer from the provider: report nothing.
                try:
                    self._on_change(verdict, previous)
                except Exception:
                    log.warning("key state: reporting a change of tenant %s failed", tenant_id, exc_info=True)
        return verdict

    def policy(self, tenant_id: str) -> GracePolicy:
        now = self._cache.now()
        with self._lock:
            hit = self._policies.get(tenant_id)
            if hit is not None and now - hit[0] < self._policy_seconds:
                return hit[1]
        try:
            policy = self._policy_for(tenant_id)
        except Exception:
            log.warning("key state: grace policy of tenant %s unreadable", tenant_id, exc_info=True)
            policy = hit[1] if hit is not None else DEFAULT_GRACE
        with self._lock:
            self._policies[tenant_id] = (now, policy)
        return policy

    def enforce(self, verdict: L1Verdict, last_ok: float | None) -> None:
        """Purge and raise as a use of the keys would, for ``verdict``."""
        tenant_id = verdict.tenant_id
        seen = verdict.checked_at.isoformat(timespec="seconds")
        if verdict.availability is Availability.OK:
            self._cache.release(tenant_id)
            return
        if verdict.availability is Availability.UNUSABLE:
            self._cache.purge(tenant_id)
            state = verdict.state.value if verdict.state is not None else "unusable"
            raise KeyUnavailableError(
                f"tenant {tenant_id}: key revoked by the customer: its master key {verdict.l1_ref} is {state} at the "
                f"provider (seen at {seen}); reads, writes and searches are refused until the key is usable again "
                "and the tenant is restored (`archive-kms restore`)",
                resource=f"tenant:{tenant_id}",
                state=state,
            )
        policy = self.policy(tenant_id)
        why = f"key service unavailable for tenant {tenant_id} ({verdict.l1_ref}: {verdict.error}; seen at {seen})"
        if policy.kind is GraceKind.ALERT_ONLY:
            return
        if policy.kind is GraceKind.SERVE_FROM_CACHE and last_ok is not None:
            assert policy.seconds is not None
            until = last_ok + policy.seconds
            if self._cache.now() < until:
                self._cache.hold(tenant_id, until)
                return
            self._cache.purge(tenant_id)
            ok_at = verdict.last_ok_at.isoformat(timespec="seconds") if verdict.last_ok_at else "?"
            raise KeyServiceUnavailableError(
                f"{why}; grace policy {policy}: cached keys served until {policy.seconds:g} s after the last "
                f"successful check at {ok_at}, which has passed. Not a revocation: access returns when the service answers",
                resource=f"tenant:{tenant_id}",
            )
        self._cache.purge(tenant_id)
        raise KeyServiceUnavailableError(
            f"{why}; grace policy {policy} refuses meanwhile. Not a revocation: access returns when the service answers",
            resource=f"tenant:{tenant_id}",
        )
