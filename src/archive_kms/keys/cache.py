"""A bounded cache of plaintext keys (unwrapped L2 tenant keys, L3 workspace keys, DEKs).

Bounds, so that a revoked or erased key stops being usable quickly even in a process that
missed the news:

* lifetime: an entry lives ``ttl_seconds`` from when it was put (default 60 s,
  ``Settings.key_cache_ttl_seconds``); reading it does not extend it. A key put with a
  ``parent`` (the key that unwrapped it) never outlives the parent's entry: its expiry is
  the earlier of its own and the parent's, so a DEK unwrapped from a cached L3 just before
  that L3 expires expires with it (the TTL does not restart at each level). Expired
  entries are wiped when any operation meets them *and* by a background sweeper (one
  daemon thread for every cache of the process, each second), so an expired key does not
  sit in memory because nobody asked for it again (an erased DEK is refused before the
  cache is looked at);
* lineage: an entry carries a ``tag`` (the keychain puts the ids and versions of the
  records above it there); ``get`` with another tag drops the entry and misses, so a key
  cached under a workspace key that was since replaced (rotation, erasure) is never
  served again;
* size: at most ``max_entries``; the least recently used entry goes first;
* ``purge(tenant)`` drops a tenant's entries at once (revocation), ``purge()`` all;
  ``discard(tenant, ids)`` drops named keys (erasure, rotation);
* ``hold(tenant, until)``: the only way an entry lives past its expiry. The keychain holds
  a tenant's entries while its key service is unreachable and the tenant's grace policy
  is ``serve-from-cache-for N s`` (docs/key-lifecycle.md); every entry of the tenant is
  held alike, so no key outlives its parent; ``release(tenant)`` ends it.

The cache keeps its own copy of each key and hands out fresh copies, so a caller that
``wipe()``s its key does not wipe the cached one; dropped copies are wiped (best effort).
The clock is injected (``time.monotonic`` by default; tests pass a fake). Thread-safe
with one lock: every operation is O(1) except ``purge``/``discard``, O(entries dropped).
Nothing here logs, and ``repr`` shows counts only.

The cache does not decide who may read: the keychain checks the tenant's key state before
every lookup, so a revoked tenant is refused even while entries are still here.
``add_sweep_hook(fn)`` runs ``fn()`` on the sweeper thread each second (the keychain
re-checks the tenants it holds keys of there, so an idle process purges a revoked
tenant's keys too); a hook that raises is logged, never kills the sweeper.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError

__all__ = ["CacheStats", "KeyCache", "add_sweep_hook"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 4096
SWEEP_INTERVAL_SECONDS = 1.0

_live_caches: weakref.WeakSet[KeyCache] = weakref.WeakSet()
_sweeper_lock = threading.Lock()
_sweeper: threading.Thread | None = None


_sweeper_tick = threading.Event()  # never set: its wait() is the sweeper's sleep
_hooks: list[weakref.WeakMethod[Callable[[], None]]] = []
_hooks_lock = threading.Lock()


def add_sweep_hook(method: Callable[[], None]) -> None:
    """Run the bound ``method`` on the sweeper thread every second for as long as its
    object lives (held weakly). It must be quick and must not block for long."""
    with _hooks_lock:
        _hooks.append(weakref.WeakMethod(method))
    _start_sweeper()


def _run_hooks() -> None:
    with _hooks_lock:
        live = [(ref, ref()) for ref in _hooks]
        _hooks[:] = [ref for ref, fn in live if fn is not None]
    for _, fn in live:
        if fn is None:
            continue
        try:
            fn()
        except Exception:
            log.warning("key cache sweep hook failed", exc_info=True)


def _sweep_forever() -> None:
    # Event.wait, not time.sleep: code (and tests) that replace time.sleep must not turn
    # this daemon into a busy loop.
    while not _sweeper_tick.wait(SWEEP_INTERVAL_SECONDS):
        for cache in list(_live_caches):
            cache.sweep()
        _run_hooks()


def _register(cache: KeyCache) -> None:
    _live_caches.add(cache)
    _start_sweeper()


def _start_sweeper() -> None:
    global _sweeper
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
    """Plaintext keys by ``(tenant_id, key_id)`` with TTL, parent-bound expiry, lineage
    tags, LRU bound, explicit purge and grace holds."""

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
        self._tags: dict[tuple[str, str], str] = {}
        self._by_tenant: dict[str, set[tuple[str, str]]] = {}
        # min-heap of (expires_at, key); stale pairs (entry gone or re-put) are skipped
        self._expiries: list[tuple[float, tuple[str, str]]] = []
        self._holds: dict[str, float] = {}  # tenant -> entries live at least until then
        self._hits = self._misses = self._expired = self._evicted = self._purged = 0
        if self._ttl > 0:
            _register(self)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> KeyCache:
        return cls(ttl_seconds=settings.key_cache_ttl_seconds, **kwargs)

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def now(self) -> float:
        """The cache's clock (monotonic seconds), the one ``expires_at`` and holds use."""
        return self._clock()

    # --- internal (lock held) --------------------------------------------------------

    def _drop(self, k: tuple[str, str]) -> None:
        _, secret = self._entries.pop(k)
        self._tags.pop(k, None)
        ids = self._by_tenant.get(k[0])
        if ids is not None:
            ids.discard(k)
            if not ids:
                del self._by_tenant[k[0]]
        secret.wipe()

    def _live_until(self, k: tuple[str, str], expires_at: float) -> float:
        return max(expires_at, self._holds.get(k[0], expires_at))

    def _sweep(self, now: float) -> int:
        n = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, k = heapq.heappop(self._expiries)
            entry = self._entries.get(k)
            if entry is None or entry[0] > now:  # gone, or put again since (with its own marker)
                continue
            held = self._holds.get(k[0])
            if held is not None and held > now:  # a grace hold: look again when it ends
                heapq.heappush(self._expiries, (held, k))
                continue
            self._drop(k)
            n += 1
        self._expired += n
        return n

    # --- API -------------------------------------------------------------------------

    def sweep(self) -> int:
        """Wipe every expired entry now; returns how many (the sweeper calls this)."""
        with self._lock:
            return self._sweep(self._clock())

    def get(self, tenant_id: str, key_id: str, *, tag: str | None = None) -> SecretBytes | None:
        """A fresh copy of the cached key, or ``None`` if absent or expired. With ``tag``,
        an entry put under another tag is dropped and missed (its lineage changed)."""
        found = self.lookup(tenant_id, key_id, tag=tag)
        return None if found is None else found[0]

    def lookup(self, tenant_id: str, key_id: str, *, tag: str | None = None) -> tuple[SecretBytes, float] | None:
        """``get``, with the entry's expiry (the cache's clock): ``(copy, expires_at)``."""
        k = (tenant_id, key_id)
        with self._lock:
            now = self._clock()
            self._sweep(now)
            entry = self._entries.get(k)
            if entry is None:
                self._misses += 1
                return None
            expires_at, secret = entry
            if now >= self._live_until(k, expires_at):
                self._drop(k)
                self._expired += 1
                self._misses += 1
                return None
            if tag is not None and self._tags.get(k, "") != tag:
                self._drop(k)
                self._purged += 1
                self._misses += 1
                return None
            self._entries.move_to_end(k)
            self._hits += 1
            return SecretBytes(secret.reveal()), expires_at

    def expiry(self, tenant_id: str, key_id: str) -> float | None:
        """When the entry expires (the cache's clock), or None if it is not cached."""
        with self._lock:
            entry = self._entries.get((tenant_id, key_id))
            return None if entry is None else entry[0]

    def put(
        self,
        tenant_id: str,
        key_id: str,
        key: SecretBytes,
        *,
        tag: str = "",
        parent: str | None = None,
        not_after: float | None = None,
    ) -> None:
        """Cache a copy of ``key`` for ``ttl_seconds`` from now, but never past the expiry
        of the tenant's cached ``parent`` entry (the key that unwrapped it) nor past
        ``not_after`` (the cache's clock). ``tag``: the key's lineage (see ``get``)."""
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
            if parent is not None:
                above = self._entries.get((tenant_id, parent))
                if above is not None:
                    expires_at = min(expires_at, above[0])
            if not_after is not None:
                expires_at = min(expires_at, not_after)
            if expires_at <= now:
                copy.wipe()
                return
            self._entries[k] = (expires_at, copy)
            self._tags[k] = tag
            heapq.heappush(self._expiries, (expires_at, k))
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
        """Drop every entry of ``tenant_id`` (or of everyone) and end its hold; returns how many."""
        with self._lock:
            if tenant_id is None:
                keys = list(self._entries)
                self._holds.clear()
            else:
                keys = list(self._by_tenant.get(tenant_id, ()))
                self._holds.pop(tenant_id, None)
            for k in keys:
                self._drop(k)
            self._purged += len(keys)
            return len(keys)

    def hold(self, tenant_id: str, until: float) -> None:
        """Keep every entry of ``tenant_id`` (present and future) at least until ``until``
        (the cache's clock); a later call moves it, ``release`` or ``purge`` ends it."""
        with self._lock:
            self._holds[tenant_id] = float(until)

    def release(self, tenant_id: str) -> None:
        """End ``tenant_id``'s hold: its entries expire as they were put (those past it go now)."""
        with self._lock:
            if self._holds.pop(tenant_id, None) is None:
                return
            now = self._clock()
            gone = [k for k in self._by_tenant.get(tenant_id, ()) if self._entries[k][0] <= now]
            for k in gone:
                self._drop(k)
            self._expired += len(gone)

    def tenants(self) -> list[str]:
        """The tenants with at least one entry (expired ones may still be counted)."""
        with self._lock:
            return list(self._by_tenant)

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
