"""A bounded cache of plaintext keys (unwrapped L2 tenant keys, L3 workspace keys, DEKs).

Bounds, so that a revoked or erased key stops being usable quickly even in a process that
missed the news:

* lifetime: an entry lives ``ttl_seconds`` from when it was put (default 60 s,
  ``Settings.key_cache_ttl_seconds``); reading it does not extend it. Expired entries are
  wiped when any operation meets them *and* by a background sweeper (one daemon thread for
  every cache of the process, each second), so an expired key does not sit in memory
  because nobody asked for it again (an erased DEK is refused before the cache is looked at);
* size: at most ``max_entries``; the least recently used entry goes first;
* ``purge(tenant)`` drops a tenant's entries at once (revocation), ``purge()`` all;
  ``discard(tenant, ids)`` drops named keys (erasure, rotation).

The cache keeps its own copy of each key and hands out fresh copies, so a caller that
``wipe()``s its key does not wipe the cached one; dropped copies are wiped (best effort).
The clock is injected (``time.monotonic`` by default; tests pass a fake). Thread-safe
with one lock: every operation is O(1) except ``purge``/``discard``, O(entries dropped).
Nothing here logs, and ``repr`` shows counts only.

The cache does not decide who may read: the keychain checks the tenant's key state before
every lookup, so a revoked tenant is refused even while entries are still here.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError

__all__ = ["CacheStats", "KeyCache"]

DEFAULT_MAX_ENTRIES = 4096
SWEEP_INTERVAL_SECONDS = 1.0

_live_caches: weakref.WeakSet[KeyCache] = weakref.WeakSet()
_sweeper_lock = threading.Lock()
_sweeper: threading.Thread | None = None


_sweeper_tick = threading.Event()  # never set: its wait() is the sweeper's sleep


def _sweep_forever() -> None:
    # Event.wait, not time.sleep: code (and tests) that replace time.sleep must not turn
    # this daemon into a busy loop.
    while not _sweeper_tick.wait(SWEEP_INTERVAL_SECONDS):
        for cache in list(_live_caches):
            cache.sweep()


def _register(cache: KeyCache) -> None:
    global _sweeper
    _live_caches.add(cache)
    with _sweeper_lock:
        if _sweeper is None or not _sweeper.is_alive():
            _sweeper = threading.Thread(target=_sweep_forever, name="akms-key-cache-sweeper", daemon=True)
            _sweeper.start()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    expired: int
    evicted: int
    purged: int


class KeyCache:
    """Plaintext keys by ``(tenant_id, key_id)`` with TTL, LRU bound and explicit purge."""

    def __init__(
        self,
        *,
        ttl_seconds: float = 60.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(ttl_seconds, (int, float)) or isinstance(ttl_seconds, bool) or ttl_seconds < 0:
            raise ValidationError(f"ttl_seconds must be a number >= 0 (0 disables caching), got {ttl_seconds!r}")
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ValidationError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self._ttl = float(ttl_seconds)
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # (tenant, key_id) -> (expires_at, secret); order = least recently used first
        self._entries: OrderedDict[tuple[str, str], tuple[float, SecretBytes]] = OrderedDict()
        self._by_tenant: dict[str, set[tuple[str, str]]] = {}
        # (expires_at, key) in put order = expiry order (one TTL for all); stale pairs are skipped
        self._expiries: deque[tuple[float, tuple[str, str]]] = deque()
        self._hits = self._misses = self._expired = self._evicted = self._purged = 0
        if self._ttl > 0:
            _register(self)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> KeyCache:
        return cls(ttl_seconds=settings.key_cache_ttl_seconds, **kwargs)

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    # --- internal (lock held) --------------------------------------------------------

    def _drop(self, k: tuple[str, str]) -> None:
        _, secret = self._entries.pop(k)
        ids = self._by_tenant.get(k[0])
        if ids is not None:
            ids.discard(k)
            if not ids:
                del self._by_tenant[k[0]]
        secret.wipe()

    def _sweep(self, now: float) -> int:
        n = 0
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, k = self._expiries.popleft()
            entry = self._entries.get(k)
            if entry is not None and entry[0] == expires_at:
                self._drop(k)
                n += 1
        self._expired += n
        return n

    # --- API -------------------------------------------------------------------------

    def sweep(self) -> int:
        """Wipe every expired entry now; returns how many (the sweeper calls this)."""
        with self._lock:
            return self._sweep(self._clock())

    def get(self, tenant_id: str, key_id: str) -> SecretBytes | None:
        """A fresh copy of the cached key, or ``None`` if absent or expired."""
        k = (tenant_id, key_id)
        with self._lock:
            now = self._clock()
            self._sweep(now)
            entry = self._entries.get(k)
            if entry is None:
                self._misses += 1
                return None
            expires_at, secret = entry
            if now >= expires_at:
                self._drop(k)
                self._expired += 1
                self._misses += 1
                return None
            self._entries.move_to_end(k)
            self._hits += 1
            return SecretBytes(secret.reveal())

    def put(self, tenant_id: str, key_id: str, key: SecretBytes) -> None:
        """Cache a copy of ``key`` for ``ttl_seconds`` from now."""
        if not isinstance(key, SecretBytes):
            raise ValidationError("the key cache stores SecretBytes only")
        if self._ttl == 0:
            return
        copy = SecretBytes(key.reveal())
        k = (tenant_id, key_id)
        with self._lock:
            now = self._clock()
            self._sweep(now)
            if k in self._entries:
                self._drop(k)
            expires_at = now + self._ttl
            self._entries[k] = (expires_at, copy)
            self._expiries.append((expires_at, k))
            self._by_tenant.setdefault(tenant_id, set()).add(k)
            while len(self._entries) > self._max:
                self._drop(next(iter(self._entries)))
                self._evicted += 1

    def discard(self, tenant_id: str, key_ids: Iterable[str]) -> int:
        """Drop the named keys of a tenant; returns how many were cached."""
        n = 0
        with self._lock:
            for key_id in key_ids:
                k = (tenant_id, key_id)
                if k in self._entries:
                    self._drop(k)
                    n += 1
            self._purged += n
        return n

    def purge(self, tenant_id: str | None = None) -> int:
        """Drop every entry of ``tenant_id`` (or of everyone); returns how many."""
        with self._lock:
            if tenant_id is None:
                keys = list(self._entries)
            else:
                keys = list(self._by_tenant.get(tenant_id, ()))
            for k in keys:
                self._drop(k)
            self._purged += len(keys)
            return len(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._expired, self._evicted, self._purged)

    def __repr__(self) -> str:
        return f"KeyCache(entries={len(self)}, ttl={self._ttl}s, max_entries={self._max})"

    def __reduce__(self) -> Any:
        raise TypeError("the key cache holds key material and cannot be pickled")
