"""Named crash points for the kill -9 tests (faults D1).

``ARCHIVE_KMS_CRASH_AT`` holds comma-separated points, each ``NAME`` or ``NAME@N`` (the
N-th time this process reaches it, default 1). Reaching it sends SIGKILL to the process
itself: no ``finally``, no atexit, no flushing: exactly what a worker killed by the OOM
killer or a lost node looks like. Unset (production), ``hit`` is one dictionary lookup.

Points: ``before:<step>`` / ``after:<step>`` (after the step's side effects, before its
completion is recorded), ``copy:mid-object`` (first plaintext chunk of an object is in the
upload), ``copy:after-put`` (object committed, ledger not yet written),
``copy:after-record`` (the ledger row of the N-th object copied by this process is
durable; rows are written in batches, so the kill comes after that object's batch),
``job:chunk`` (an archive job's writer took the N-th plaintext chunk into an upload).
The same ``before:<step>`` / ``after:<step>`` points exist for every step of every flow
(rotate, erase: ADR 0025); erase also has ``erase:between-workspaces`` (one workspace's
keys destroyed, the next not yet), rotate ``rotate:after-rewrap-commit`` (the L2 re-wrapped,
not yet recorded).

``ARCHIVE_KMS_FREEZE_AT`` arms the same points with SIGSTOP instead of SIGKILL: the
process freezes there, every thread with it, until someone sends SIGCONT (a hung writer,
a paused VM: faults D5, issue 10's frozen archive writer).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

ENV = "ARCHIVE_KMS_CRASH_AT"
FREEZE_ENV = "ARCHIVE_KMS_FREEZE_AT"

_lock = threading.Lock()
_counts: dict[str, int] = {}


def _targets(env: str = ENV) -> dict[str, int]:
    raw = os.environ.get(env, "")
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        name, _, n = item.partition("@")
        out[name] = int(n) if n.isdigit() else 1
    return out


def hit(point: str, times: int = 1) -> None:
    """SIGKILL this process if ``point`` is armed in ``ARCHIVE_KMS_CRASH_AT`` and this
    reaches its armed count (SIGSTOP it if armed in ``ARCHIVE_KMS_FREEZE_AT``). ``times``
    > 1 passes the point that many times at once (a batch of ledger rows made durable
    together): the kill comes after the batch that contains the armed one."""
    if times < 1 or (ENV not in os.environ and FREEZE_ENV not in os.environ):
        return
    for env, sig in ((FREEZE_ENV, signal.SIGSTOP), (ENV, signal.SIGKILL)):
        want = _targets(env).get(point)
        if want is None:
            continue
        with _lock:
            key = f"{env}:{point}"
            before = _counts.get(key, 0)
            _counts[key] = before + times
            if not before < want <= before + times:
                continue
        logging.getLogger(__name__).warning("%s point %s reached: %s", env, point, sig.name)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), sig)


__all__ = ["ENV", "FREEZE_ENV", "hit"]
