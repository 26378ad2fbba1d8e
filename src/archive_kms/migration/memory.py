"""Keep the migration process's memory flat (issue #16; ADR 0019): the allocator, and
one budget for the object data the copies hold.

The copy streams every object segment by segment and part by part, so what it *holds* is
bounded (``docs/storage-layout.md``). What the process's RSS shows was not: with 16 copy
threads glibc gives threads their own malloc arenas (up to 8 per core), and its dynamic
mmap threshold soon serves the 1-8 MiB segment and part buffers from those arenas, where
freed memory stays resident and fragmented. Measured on the default mix: 242 MiB peak RSS,
against 166 MiB with the arenas capped and big buffers mapped and unmapped directly.

``limit_allocator`` does that for the current process, once: ``M_ARENA_MAX`` 2 and a fixed
``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` of 2 MiB (a fixed threshold also switches the
dynamic adjustment off; 128 KiB mapped every 1 MiB segment and cost ~5 s of CPU per GiB in
page faults). The engine calls it before running steps, and a shard task calls
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
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 2 * 1024 * 1024

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


MiB = 1024 * 1024
#: The envelope's segment (``crypto.envelope.DEFAULT_SEGMENT_SIZE``): the unit of every
#: buffer below the part.
SEGMENT = 1 * MiB
#: Segment-sized buffers one object in flight holds at its worst moment (ADR 0046): the
#: source's read chunk and the ciphertext segment cut from it, its plaintext, the
#: encryptor's segment buffer, the sealed segment, and the in-memory check's ciphertext
#: and plaintext. Each is at most the object's size: a 5 KB object holds ~35 KB, not 7 MiB.
SEGMENT_COPIES = 7
#: Per object besides its data: request and response objects, the ledger row.
OBJECT_OVERHEAD = 64 * 1024


class CopyBudget:
    """Bytes of object data the copies of this process may hold at once. Each object is
    charged before it starts, by its size from the manifest (``cost``): the part being cut
    from the stream (``min(size, part)``), for an object of several parts one more part its
    writer may be uploading itself, and ``SEGMENT_COPIES`` segment-sized buffers, each at
    most the object's size. An object larger than the whole budget runs alone. Small
    objects (most of an archive) cost a few times their size and are never held back by a
    big one that does not fit: a waiting object only blocks objects behind it in its own
    shard. The capacity is ``settings.migration_copy_buffer_mib``. What the process holds
    for object data is then at most this budget plus the store's part budget
    (``settings.migration_upload_buffer_mib``: parts of the destination store uploading in
    its threads, across the process's copies; beyond it each writer uploads its own part):
    peak RSS = floor + both (ADR 0046)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held = 0
        self._peak = 0
        self._cond = threading.Condition()

    @property
    def peak(self) -> int:
        return self._peak

    @staticmethod
    def cost(size: int, part_size: int) -> int:
        size = max(size, 0)
        parts = 2 if size > part_size else 1  # several parts: one cut, one its writer may upload
        return parts * min(size, part_size) + SEGMENT_COPIES * min(size, SEGMENT) + OBJECT_OVERHEAD

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.capacity)
        with self._cond:
            while self._held and self._held + nbytes > self.capacity:
                self._cond.wait()
            self._held += nbytes
            self._peak = max(self._peak, self._held)
        try:
            yield
        finally:
            with self._cond:
                self._held -= nbytes
                self._cond.notify_all()


_budget: CopyBudget | None = None


def copy_budget(capacity: int) -> CopyBudget:
    """The process's one ``CopyBudget``: every shard of every run in this process shares
    it. ``capacity`` (``settings.migration_copy_buffer_mib`` in bytes) is applied when it
    is created, by the first copy in the process; later calls get that budget as it is."""
    global _budget
    with _lock:
        if _budget is None:
            _budget = CopyBudget(capacity)
        return _budget


__all__ = ["CopyBudget", "copy_budget", "limit_allocator"]
