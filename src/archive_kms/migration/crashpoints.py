"""Named crash points for the kill -9 tests (faults D1).

``ARCHIVE_KMS_CRASH_AT`` holds comma-separated points, each ``NAME`` or ``NAME@N`` (the
N-th time this process reaches it, default 1). Reaching it sends SIGKILL to the process
itself: no ``finally``, no atexit, no flushing: exactly what a worker killed by the OOM
killer or a lost node looks like. Unset (production), ``hit`` is one dictionary lookup.

Points: ``before:<step>`` / ``after:<step>`` (after the step's side effects, before its
completion is recorded), ``copy:mid-object`` (first plaintext chunk of an object is in the
upload), ``copy:after-put`` (object committed, ledger not yet written),
``copy:after-record`` (the ledger row of the N-th object copied by this process is
durable; rows are written in batches, so the kill comes after that object's batch).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

ENV = "ARCHIVE_KMS_CRASH_AT"

_lock = threading.Lock()
_counts: dict[str, int] = {}


def _targets() -> dict[str, int]:
    raw = os.environ.get(ENV, "")
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        name, _, n = item.partition("@")
        out[name] = int(n) if n.isdigit() else 1
    return out


def hit(point: str, times: int = 1) -> None:
    """SIGKILL this process if ``point`` is armed and this reaches its armed count.
    ``times`` > 1 passes the point that many times at once (a batch of ledger rows made
    durable together): the kill comes after the batch that contains the armed one."""
    if ENV not in os.environ or times < 1:
        return
    want = _targets().get(point)
    if want is None:
        return
    with _lock:
        before = _counts.get(point, 0)
        _counts[point] = before + times
        if not before < want <= before + times:
            return
    logging.getLogger(__name__).warning("crash point %s reached: SIGKILL", point)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "hit"]
