"""The one retry loop, on tenacity: every adapter and step that retries or polls goes
through here, and what is retried is decided by the error's type
(``ArchiveKmsError.retryable``), never by the call site.

Three shapes, one schedule (:class:`Backoff`):

* :func:`call` - run a request, retry it while it fails with a retryable error (vendor
  errors are translated first), waiting the backoff or the service's ``Retry-After``,
  whichever is longer. A ``Retry-After`` beyond ``max_retry_after`` is not waited out
  in-process: the call fails at once (still retryable) so the step is retried later.
* :func:`rounds` - repeat a round of work (a bulk request) while it leaves retryable items.
* :func:`poll` - wait until a condition holds (a bucket's configuration reads back, the
  running jobs are gone), up to a deadline on the caller's clock.

The schedule: attempt ``n`` (1-based) waits ``step = min(max_delay, base_delay * 2**(n-1))``,
with *equal jitter* ``step/2 + U[0,1) * step/2`` (half fixed, so a short burst of errors
cannot exhaust the budget early; half random, so clients spread out), or exactly ``step``
with ``jitter=False``; ``factor=1`` makes it a fixed interval. Sleep, randomness and
clocks are parameters, so tests run without waiting.

``Retry-After`` is read by :func:`retry_after_seconds` (``retry-after-ms`` /
``x-ms-retry-after-ms`` in milliseconds, as Azure sends them, or ``Retry-After`` in
seconds or as an HTTP date) and carried on the translated error as ``retry_after``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, retry_if_result

from archive_kms.errors import ArchiveKmsError, ValidationError

__all__ = ["Backoff", "call", "poll", "retry_after_of", "retry_after_seconds", "rounds"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Sleep = Callable[[float], None]
Rand = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """A retry budget and schedule (module docstring). ``max_attempts`` counts every
    attempt, the first included; ``max_retry_after`` bounds how long a service may ask us
    to wait in-process."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    jitter: bool = True
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay or self.factor < 1:
            raise ValidationError(f"invalid retry settings {self!r}")

    def delay(self, attempt: int, retry_after: float | None = None, rand: Rand = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): the backoff,
        or the service's ``retry_after`` if that is longer."""
        step = min(self.max_delay, self.base_delay * self.factor ** (attempt - 1))
        wait = step / 2 + rand() * step / 2 if self.jitter else step
        return max(wait, retry_after or 0.0)


# --- Retry-After ---------------------------------------------------------------------------


def retry_after_seconds(
    headers: Mapping[str, str] | None, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> float | None:
    """The wait a throttled response asks for, in seconds: ``retry-after-ms`` /
    ``x-ms-retry-after-ms`` (milliseconds) or ``Retry-After`` (seconds or an HTTP date,
    relative to ``now``); ``None`` if absent or unreadable. ``headers`` should be
    case-insensitive (as requests' and azure-core's are); both spellings of
    ``Retry-After`` are tried otherwise."""
    if not headers:
        return None
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                pass
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - now()).total_seconds())
    except (TypeError, ValueError):
        return None


def retry_after_of(exc: BaseException, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """``retry_after_seconds`` of a vendor exception's HTTP response (``exc.response.headers``)."""
    return retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None), now=now)


# --- the three shapes ------------------------------------------------------------------------


def _same_kind(err: ArchiveKmsError, message: str) -> ArchiveKmsError:
    """An error of ``err``'s type (so still as retryable) with a longer message."""
    try:
        out = type(err)(message, resource=err.resource)
    except TypeError:  # a subclass with another constructor: keep the type's meaning, not its class
        out = ArchiveKmsError(message, resource=err.resource)
        out.retryable = err.retryable
    return out


def call(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    translate: Callable[[BaseException], ArchiveKmsError] | None = None,
    what: str = "request",
    sleep: Sleep = time.sleep,
    rand: Rand = random.random,
    retry_on: tuple[type[ArchiveKmsError], ...] = (ArchiveKmsError,),
) -> T:
    """``fn()``, retried per ``backoff`` while it raises an error whose ``retryable`` is
    true (and, narrower, an instance of ``retry_on``: a layer that retries only what it
    can settle itself names those types; other errors pass through at once). ``translate`` turns a vendor exception into ours (an ``ArchiveKmsError`` passes
    through; without ``translate`` other exceptions propagate unretried); the ``Retry-After``
    of the vendor response, if any, is kept on the error as ``retry_after``. The last
    error is raised with "gave up after N attempts"; a ``Retry-After`` longer than
    ``backoff.max_retry_after`` is raised at once, saying so. Both stay retryable, so the
    step that made the call can be retried later."""

    def attempt() -> T:
        try:
            return fn()
        except ArchiveKmsError:
            raise
        except Exception as exc:
            if translate is None:
                raise
            err = translate(exc)
            if err is exc:
                raise
            if getattr(err, "retry_after", None) is None:
                err.retry_after = retry_after_of(exc)
            raise err from exc

    def wait(state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        return backoff.delay(state.attempt_number, getattr(err, "retry_after", None), rand)

    def stop(state: RetryCallState) -> bool:
        err = state.outcome.exception() if state.outcome else None
        asked = getattr(err, "retry_after", None)
        return state.attempt_number >= backoff.max_attempts or (asked is not None and asked > backoff.max_retry_after)

    def give_up(state: RetryCallState) -> T:
        err = state.outcome.exception()  # type: ignore[union-attr]
        assert isinstance(err, ArchiveKmsError)
        asked = err.retry_after
        if asked is not None and asked > backoff.max_retry_after:
            message = (
                f"{err} (the service asks to wait {asked:.0f} s, longer than {backoff.max_retry_after:.0f} s: "
                "retry the step later)"
            )
        else:
            message = f"{err}; gave up after {state.attempt_number} attempts"
        raise _same_kind(err, message) from err.__cause__

    def note(state: RetryCallState) -> None:
        err = state.outcome.exception()  # type: ignore[union-attr]
        cause = err.__cause__ if err is not None and err.__cause__ is not None else err
        log.info(
            "%s failed (%s), attempt %d of %d; retrying in %.2f s",
            what,
            type(cause).__name__,
            state.attempt_number,
            backoff.max_attempts,
            state.upcoming_sleep,
        )

    retrying = Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, retry_on) and e.retryable),
        stop=stop,
        wait=wait,
        sleep=sleep,
        before_sleep=note,
        retry_error_callback=give_up,
    )
    return retrying(attempt)


def rounds(
    round_fn: Callable[[], bool],
    *,
    backoff: Backoff,
    sleep: Sleep = time.sleep,
    rand: Rand = random.random,
) -> int:
    """Run ``round_fn`` until it returns False (nothing left worth retrying) or
    ``backoff.max_attempts`` rounds ran, waiting the backoff between rounds. An exception
    from a round propagates at once. Returns the number of rounds run."""
    retrying = Retrying(
        retry=retry_if_result(bool),
        stop=lambda state: state.attempt_number >= backoff.max_attempts,
        wait=lambda state: backoff.delay(state.attempt_number, None, rand),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    retrying(round_fn)
    return int(retrying.statistics["attempt_number"])


def poll(
    check: Callable[[], bool],
    *,
    timeout: float,
    backoff: Backoff,
    on_timeout: Callable[[], Exception],
    clock: Callable[[], float] = time.monotonic,
    sleep: Sleep = time.sleep,
    rand: Rand = random.random,
    wait_must_fit: bool = False,
) -> None:
    """Call ``check`` until it returns True. Gives up (raising ``on_timeout()``) once
    ``clock()`` has passed ``timeout`` seconds after the start, or, with
    ``wait_must_fit``, as soon as the next wait would end past it. Exceptions from
    ``check`` propagate at once. ``backoff.max_attempts`` is not used: the deadline is the
    budget."""
    deadline = clock() + timeout

    def stop(state: RetryCallState) -> bool:
        if wait_must_fit:
            return clock() + state.upcoming_sleep > deadline
        return clock() >= deadline

    def give_up(state: RetryCallState) -> Any:
        raise on_timeout()

    Retrying(
        retry=retry_if_result(lambda ok: not ok),
        stop=stop,
        wait=lambda state: backoff.delay(state.attempt_number, None, rand),
        sleep=sleep,
        retry_error_callback=give_up,
    )(check)
