"""The plaintext key cache: bounded lifetime (fake clock), LRU bound, purge, copies, threads."""

from __future__ import annotations

import threading
import time

import pytest
import time_machine

from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError
from archive_kms.keys.cache import KeyCache


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_entries_expire_after_ttl_and_reads_do_not_extend_them() -> None:
    clock = FakeClock()
    cache = KeyCache(ttl_seconds=60, clock=clock)
    key = SecretBytes.random()
    cache.put("t1", "l2/1", key)
    clock.t += 59.9
    assert cache.get("t1", "l2/1") == key
    clock.t += 0.1  # 60 s after put, although it was just read
    assert cache.get("t1", "l2/1") is None
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats.hits, stats.expired) == (1, 1)


def test_default_ttl_comes_from_settings() -> None:
    assert KeyCache.from_settings(Settings(key_cache_ttl_seconds=60)).ttl_seconds == 60
    assert KeyCache.from_settings(Settings(key_cache_ttl_seconds=5)).ttl_seconds == 5


def test_default_clock_is_monotonic_time() -> None:
    cache = KeyCache(ttl_seconds=0.05)
    cache.put("t1", "k", SecretBytes.random())
    assert cache.get("t1", "k") is not None
    time.sleep(0.06)
    assert cache.get("t1", "k") is None


def test_wall_clock_jumps_do_not_extend_lifetime() -> None:
    # the default clock is monotonic: setting the wall clock back must not revive entries
    with time_machine.travel(0, tick=True) as traveller:
        cache = KeyCache(ttl_seconds=0.05)
        cache.put("t1", "k", SecretBytes.random())
        time.sleep(0.06)
        traveller.move_to(-3600)
        assert cache.get("t1", "k") is None


def test_lru_bound_evicts_least_recently_used() -> None:
    cache = KeyCache(max_entries=3, clock=FakeClock())
    for i in range(3):
        cache.put("t1", f"k{i}", SecretBytes.random())
    assert cache.get("t1", "k0") is not None  # k0 now most recent
    cache.put("t1", "k3", SecretBytes.random())
    assert cache.get("t1", "k1") is None
    assert all(cache.get("t1", k) is not None for k in ("k0", "k2", "k3"))
    assert len(cache) == 3 and cache.stats().evicted == 1


def test_purge_one_tenant_or_all_and_discard() -> None:
    cache = KeyCache(clock=FakeClock())
    for tenant in ("t1", "t2"):
        for i in range(3):
            cache.put(tenant, f"k{i}", SecretBytes.random())
    assert cache.purge("t1") == 3
    assert cache.get("t1", "k0") is None and cache.get("t2", "k0") is not None
    assert cache.discard("t2", ["k0", "nope"]) == 1
    assert cache.purge() == 2
    assert len(cache) == 0


def test_cache_holds_its_own_copy() -> None:
    cache = KeyCache(clock=FakeClock())
    key = SecretBytes.random()
    cache.put("t1", "k", key)
    key.wipe()  # the caller is done with its key
    got = cache.get("t1", "k")
    assert got is not None and len(got) == 32
    got.wipe()  # wiping a returned copy does not touch the cached one
    assert cache.get("t1", "k").reveal() == cache.get("t1", "k").reveal()


def test_ttl_zero_disables_and_bad_settings_fail_early() -> None:
    cache = KeyCache(ttl_seconds=0)
    cache.put("t1", "k", SecretBytes.random())
    assert cache.get("t1", "k") is None
    for kwargs in ({"ttl_seconds": -1}, {"max_entries": 0}, {"ttl_seconds": "60"}):
        with pytest.raises(ValidationError):
            KeyCache(**kwargs)
    with pytest.raises(ValidationError):
        KeyCache().put("t1", "k", b"raw bytes")  # type: ignore[arg-type]


def test_repr_and_pickle_do_not_expose_keys() -> None:
    import pickle

    cache = KeyCache(clock=FakeClock())
    key = SecretBytes.random()
    cache.put("t1", "k", key)
    assert repr(cache) == "KeyCache(entries=1, ttl=60.0s, max_entries=4096)"
    with pytest.raises(TypeError):
        pickle.dumps(cache)


def test_thread_safety_under_contention() -> None:
    cache = KeyCache(max_entries=50, clock=FakeClock())
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                tenant = f"t{i % 4}"
                cache.put(tenant, f"k{(n * 7 + i) % 80}", SecretBytes.random())
                cache.get(tenant, f"k{i % 80}")
                if i % 250 == 0:
                    cache.purge(tenant)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) <= 50
    assert sum(len(cache._by_tenant.get(f"t{i}", ())) for i in range(4)) == len(cache)


def test_expired_keys_are_wiped_even_if_nobody_asks_for_them_again() -> None:
    """An erased DEK is refused before the cache is consulted, so its entry is never
    looked up again: expiry must still wipe it."""
    clock = FakeClock()
    cache = KeyCache(ttl_seconds=60, clock=clock)
    cache.put("acme", "l4/ws/1/1", SecretBytes(b"\x01" * 32))
    cache.put("acme", "l4/ws/2/1", SecretBytes(b"\x02" * 32))
    held = [secret for _, secret in cache._entries.values()]
    clock.t += 30
    cache.put("beta", "l2/1", SecretBytes(b"\x03" * 32))
    assert cache.sweep() == 0 and len(cache) == 3
    clock.t += 31
    assert cache.sweep() == 2 and len(cache) == 1  # only beta's, put 31 s ago, is left
    assert [s.fingerprint for s in held] == ["wiped", "wiped"]
    assert cache.stats().expired == 2


def test_the_background_sweeper_wipes_expired_keys_of_an_idle_cache() -> None:
    cache = KeyCache(ttl_seconds=0.2)
    cache.put("acme", "l2/1", SecretBytes(b"\x04" * 32))
    deadline = time.monotonic() + 10
    while len(cache) and time.monotonic() < deadline:
        time.sleep(0.1)  # no get/put: only the sweeper thread can empty it
    assert len(cache) == 0 and cache.stats().expired == 1
