"""Graceful stop of a migration run (faults D3).

A ``StopRequest`` is a flag that a signal handler, another thread or a Prefect hook sets.
The run notices it at its next safe point:

- between steps, and in the loops of ``pause`` and ``manifest`` (``RunContext.check``);
- in the copy and verify shards at every object boundary: no new object starts, objects
  already in flight may finish for ``STOP_GRACE_SECONDS``, after which their streams raise
  ``StopRequestedError`` and the store aborts their multipart upload.

The engine then flushes the ledger, records the step as interrupted, ends the run
``failed`` (resumable) with the stop's reason, and releases the tenant's lease, so
``archive-kms runs resume`` continues at once.

``execute`` registers its flag under the run id for the duration (``registered``), so
shard functions, which take only picklable arguments, find it with ``for_run``; and it
installs ``stop_on_signals`` when it runs in the main thread. Shards running in *other*
processes (the Dask task runner) do not see the flag: they finish their shard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence

from archive_kms.errors import TransientError

#: How long objects already in flight may take to finish after a stop was requested;
#: after that their streams are interrupted and their uploads aborted.
STOP_GRACE_SECONDS = 5.0

#: What the engine reports for a stop that came from a signal.
BY_SIGNAL = "stopped by signal"

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class StopRequestedError(TransientError):
    """The run was asked to stop (a signal, or its caller); nothing is wrong with it:
    ``resume`` continues where it stopped."""


class StopRequest:
    """A one-way flag with the reason and time it was set.

    ``set`` takes no lock, so a signal handler may call it while the interrupted thread
    is inside one of these methods (the first reason wins, give or take a race that only
    changes the wording)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason: str | None = None
        self._at: float | None = None

    def set(self, reason: str = "stop requested") -> None:
        if self._event.is_set():
            return
        self._reason, self._at = reason, time.monotonic()
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def overdue(self, grace: float | None = None) -> bool:
        """Set more than ``grace`` seconds ago (default ``STOP_GRACE_SECONDS``): objects
        still in flight are interrupted from then on."""
        at = self._at
        limit = STOP_GRACE_SECONDS if grace is None else grace
        return at is not None and time.monotonic() - at >= limit

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


# --- the flag of each run executing in this process -------------------------------------------

_lock = threading.Lock()
_runs: dict[str, StopRequest] = {}


@contextlib.contextmanager
def registered(run_id: str, stop: StopRequest) -> Iterator[StopRequest]:
    """Make ``stop`` the flag of ``run_id`` in this process while the block runs."""
    with _lock:
        previous = _runs.get(run_id)
        _runs[run_id] = stop
    try:
        yield stop
    finally:
        with _lock:
            if previous is None:
                _runs.pop(run_id, None)
            else:
                _runs[run_id] = previous


def for_run(run_id: str) -> StopRequest | None:
    """The flag of ``run_id`` if it is executing in this process."""
    with _lock:
        return _runs.get(run_id)


def request_stop(run_id: str, reason: str = "stop requested") -> bool:
    """Ask ``run_id``, executing in this process, to stop gracefully; False if it is not
    executing here. For callers that run the engine in a thread or a Prefect flow run."""
    stop = for_run(run_id)
    if stop is None:
        return False
    stop.set(reason)
    return True


# --- signals --------------------------------------------------------------------------------------


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, signals: Sequence[signal.Signals] = DEFAULT_SIGNALS) -> Iterator[bool]:
    """While the block runs, ``signals`` set ``stop`` instead of killing the process
    (SIGINT no longer raises KeyboardInterrupt); the previous handlers are restored
    afterwards. Yields False, and changes nothing, outside the main thread (Python
    delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(signum: int, _frame: object) -> None:
        name = _signal_name(signum)
        first = not stop.is_set()
        stop.set(f"{BY_SIGNAL} ({name})")
        if first:  # os.write: no lock that the interrupted code might hold (logging has some)
            os.write(
                2,
                f"archive-kms: {name} received: stopping the migration run at the next object "
                "boundary (it can be resumed)\n".encode(),
            )

    previous: dict[signal.Signals, object] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield True
    finally:
        for sig, old in previous.items():
            # None: the old handler was not installed from Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # type: ignore[arg-type]


__all__ = [
    "BY_SIGNAL",
    "STOP_GRACE_SECONDS",
    "StopRequest",
    "StopRequestedError",
    "for_run",
    "registered",
    "request_stop",
    "stop_on_signals",
]
