"""Keep the migration process's memory flat (issue #16; ADR 0019).

The copy streams every object segment by segment and part by part, so what it *holds* is
bounded (``docs/storage-layout.md``). What the process's RSS shows was not: with 16 copy
threads glibc gives threads their own malloc arenas (up to 8 per core), and its dynamic
mmap threshold soon serves the 1-8 MiB segment and part buffers from those arenas, where
freed memory stays resident and fragmented. Measured on the default mix: 242 MiB peak RSS,
against 166 MiB with the arenas capped and big buffers mapped and unmapped directly.

``limit_allocator`` does that for the current process, once: ``M_ARENA_MAX`` 2 and a fixed
``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` of 128 KiB (a fixed threshold also switches the
dynamic adjustment off). The engine calls it before running steps, and a shard task calls
it in the process it runs in (a Dask worker). It is a no-op where the C library is not
glibc. The environment variables ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` set by an operator win: they are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024

_done = False
_lock = threading.Lock()


def limit_allocator() -> bool:
    """Apply the limits above to this process (once); True if glibc accepted them."""
    global _done
    with _lock:
        if _done:
            return True
        _done = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False  # not glibc: nothing to tune
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = True
        for env, param, value in (
            ("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENA_MAX),
            ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, MMAP_THRESHOLD),
        ):
            if env in os.environ:
                continue
            ok = bool(mallopt(param, value)) and ok
        log.debug("malloc limits applied: %s", ok)
        return ok


__all__ = ["limit_allocator"]
