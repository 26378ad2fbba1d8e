"""The lease an archive job's writer holds while it writes (ADR 0020).

The state store gives every admitted attempt a lease (``JobLeaseRepo``); this module
keeps it alive from a heartbeat thread and tells the writer, before each write, whether
it may still write. Two things end the right to write, whichever comes first:

* the store says the attempt is no longer current: a renewal is refused
  (``FencedError``), or the ledger row read every ``VERIFY_EVERY`` seconds names another
  attempt or state (taken over by a retry, fenced by a migration's ``pause`` step, or
  abandoned by support);
* the writer's own deadline passes: the lease's expiry, converted once per renewal to
  this process's monotonic clock, minus a margin. A process frozen (SIGSTOP, a VM pause,
  a long GC) past its lease finds the deadline gone when it wakes and writes nothing
  more, without asking anyone: by then the fencer may already have rolled its output
  back. (A request already on the wire when the process froze is the one thing no
  client-side check can recall; ``docs/archive-jobs.md`` says what becomes of it.)
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from archive_kms.errors import ArchiveKmsError, FencedError

log = logging.getLogger(__name__)

#: Part of the remaining lease kept as a safety margin against clock rate differences.
MARGIN = 0.2
#: How often (seconds) ``check`` also reads the job's ledger row, so an attempt taken over
#: or abandoned stops within about this long, not only at its next renewal.
VERIFY_EVERY = 1.0


class JobSupersededError(FencedError):
    """The writer lost its job's lease: it must stop writing (the job is ``superseded``)."""


class JobLease:
    """A running attempt's lease, renewed every third of its remaining time."""

    def __init__(self, state: Any, job_id: str, attempt: int, *, clock: Any = None) -> None:
        self._state, self.job_id, self.attempt = state, job_id, attempt
        self._wall = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._deadline = 0.0
        self._interval = 1.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._verified = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> JobLease:
        """Renew once now (``JobSupersededError`` if that is refused), then keep renewing."""
        self._renew()
        if self._lost is not None:
            raise JobSupersededError(self._lost, resource=f"job:{self.job_id}")
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"akms-job-lease-{self.job_id[:40]}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> JobLease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the writer's check ---------------------------------------------------------------

    def check(self) -> None:
        """``JobSupersededError`` if the writer may no longer write."""
        with self._lock:
            lost, deadline = self._lost, self._deadline
        if lost is None and time.monotonic() >= deadline:
            lost = (
                f"archive job {self.job_id} attempt {self.attempt}: its lease ran out before it could be renewed "
                "(the writer stalled or was frozen); it writes nothing more"
            )
            with self._lock:
                self._lost = self._lost or lost
        if lost is None and time.monotonic() - self._verified >= VERIFY_EVERY:
            self._verified = time.monotonic()
            lost = self._current()
        if lost is not None:
            raise JobSupersededError(lost, resource=f"job:{self.job_id}")

    def _current(self) -> str | None:
        """Why the ledger says this attempt is no longer the job's running one, or None."""
        try:
            job = self._state.get_job(self.job_id)
        except ArchiveKmsError:  # a database blip: the lease deadline still bounds the writer
            return None
        if job is not None and job.attempt == self.attempt and job.state.value == "running":
            return None
        now = (
            "gone"
            if job is None
            else f"attempt {job.attempt} is {job.state.value}{': ' + job.error if job.error else ''}"
        )
        with self._lock:
            self._lost = self._lost or f"archive job {self.job_id} attempt {self.attempt} is no longer current ({now})"
            return self._lost

    @property
    def lost(self) -> str | None:
        return self._lost

    # --- heartbeat ------------------------------------------------------------------------

    def _renew(self) -> None:
        started = time.monotonic()
        try:
            expires = self._state.renew_job_lease(self.job_id, self.attempt)
        except FencedError as e:
            with self._lock:
                self._lost = self._lost or str(e)
            return
        remaining = (expires - self._wall()).total_seconds()
        with self._lock:
            self._deadline = max(self._deadline, started + remaining * (1 - MARGIN))
            self._interval = max(remaining / 3, 0.1)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            if self._lost is not None:
                return
            try:
                self._renew()
            except ArchiveKmsError:  # a database blip: the deadline decides whether it matters
                log.warning("archive job %s: lease renewal failed; retrying", self.job_id, exc_info=True)
                self._interval = 0.5
            if self._lost is not None:
                log.error("archive job %s attempt %d lost its lease: %s", self.job_id, self.attempt, self._lost)
                return


__all__ = ["MARGIN", "VERIFY_EVERY", "JobLease", "JobSupersededError"]
