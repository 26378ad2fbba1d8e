"""Bounds that hold by construction (docs/key-lifecycle.md, "Bounds"): no plaintext key
outlives its parent's expiry; a cached key is served only under the lineage it was
unwrapped with; revocation and erasure are checked on every use of a cached key, within
``revocation_check_seconds``, in every "process" (a second Keychain over the same store
with its own cache); the master key's state at its provider is checked before its keys
are used (``KeyStateGuard``) with the tenant's grace policy deciding what an outage does.

The issue's measurements, as tests: a DEK served 176 s after its L1 was disabled (the TTL
restarted at each level), a floor DEK left usable by ``erase_deks_below`` in another
process's cache, and a warm process serving 58 s after the customer disabled the key.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer
from archive_kms.errors import (
    KeyDestroyedError,
    KeyNotFoundError,
    KeyServiceUnavailableError,
    KeyUnavailableError,
    ServiceUnavailableError,
    TenantRevokedError,
    ValidationError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import Keychain, parse_dek_id
from archive_kms.keys.keychain.access import (
    Availability,
    GraceKind,
    GracePolicy,
    KeyStateGuard,
)
from archive_kms.keys.keychain_store import InMemoryKeychainStore
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.port import KeyState

T0 = 1_700_000_000.0
HOUR = 3600


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class World:
    """The shared store, KMS and clock; ``process()`` makes another keychain over them."""

    def __init__(self, *, recheck: float = 0.5, guard: bool = False, policy: str = "serve-from-cache-for:60") -> None:
        self.clock = FakeClock()
        self.kms = MemoryKms()
        self.store = InMemoryKeychainStore()
        self.signer = Signer.generate()
        self.recheck, self.guard, self.policy = recheck, guard, GracePolicy.parse(policy)
        self.changes: list[tuple[Availability, Availability | None]] = []

    def process(self, *, ttl: float = 60) -> Keychain:
        cache = KeyCache(ttl_seconds=ttl, clock=self.clock)
        guard = None
        if self.guard:
            guard = KeyStateGuard(
                self.kms.provider,
                cache,
                check_seconds=5,
                timeout_seconds=1,
                policy_for=lambda tenant: self.policy,
                on_change=lambda v, prev: self.changes.append((v.availability, prev.availability if prev else None)),
            )
        return Keychain(
            self.store,
            self.kms.provider,
            self.signer,
            self.clock,
            cache,
            revocation_check_seconds=self.recheck,
            key_state_guard=guard,
        )

    def tenant(self, kc: Keychain, tenant_id: str = "acme") -> str:
        ref = self.kms.create_key(f"{tenant_id}-l1")
        kc.create_tenant(tenant_id, self.kms.provider(ref))
        return ref.removeprefix("memory://")


# --- the key cache ------------------------------------------------------------------------------


def test_a_child_key_never_outlives_its_parent_entry() -> None:
    clock = FakeClock()
    cache = KeyCache(ttl_seconds=60, clock=clock)
    cache.put("t", "l2/1", SecretBytes.random())
    clock.advance(50)
    cache.put("t", "l3/w/1", SecretBytes.random(), parent="l2/1")  # would live to +110 on its own
    cache.put("t", "l4/w/1/1", SecretBytes.random(), parent="l3/w/1")
    assert cache.expiry("t", "l3/w/1") == cache.expiry("t", "l2/1") == T0 + 60
    assert cache.expiry("t", "l4/w/1/1") == T0 + 60
    clock.advance(10)
    assert cache.get("t", "l4/w/1/1") is None and cache.get("t", "l3/w/1") is None and len(cache) == 0


def test_a_key_cached_under_another_lineage_is_dropped_not_served() -> None:
    cache = KeyCache(clock=FakeClock())
    cache.put("t", "l4/w/1/1", SecretBytes(b"\x01" * 32), tag="l3/w/1#1")
    assert cache.get("t", "l4/w/1/1", tag="l3/w/2#1") is None  # the workspace key was replaced
    assert cache.get("t", "l4/w/1/1", tag="l3/w/1#1") is None  # and the entry is gone for good


def test_a_grace_hold_keeps_a_tenants_entries_past_their_ttl_until_released() -> None:
    clock = FakeClock()
    cache = KeyCache(ttl_seconds=60, clock=clock)
    cache.put("t", "l2/1", SecretBytes.random())
    cache.put("u", "l2/1", SecretBytes.random())
    cache.hold("t", T0 + 300)
    clock.advance(120)
    assert cache.sweep() == 1  # u's expired; t's is held
    assert cache.get("t", "l2/1") is not None
    cache.release("t")
    assert cache.get("t", "l2/1") is None and len(cache) == 0


# --- bounds across processes -------------------------------------------------------------------


def test_the_ttl_does_not_restart_at_each_level_after_the_l1_is_disabled() -> None:
    """Issue #13: a DEK was served 176 s after the L1 was disabled (each level got a fresh
    TTL from its cached parent). Now every key dies with the L2 it hangs under."""
    w = World(recheck=0.0)
    kc = w.process()
    name = w.tenant(kc)
    dek = kc.dek_for_encrypt("acme", "org-1").dek_id  # L2, L3 and the DEK cached at T0
    w.clock.advance(55)
    kc.cache.discard("acme", [dek])  # the DEK alone is unwrapped again at +55, from the cached L3
    kc.dek_by_id("acme", dek)
    w.kms.disable(name)  # the customer disables the L1 at +55
    w.clock.advance(6)  # +61: the L2 expired, so did everything under it
    with pytest.raises(KeyUnavailableError):
        kc.dek_by_id("acme", dek)


def test_revocation_reaches_another_warm_process_within_the_recheck_bound_and_purges_it() -> None:
    w = World(recheck=0.5)
    a, b = w.process(), w.process()
    w.tenant(a)
    dek = a.dek_for_encrypt("acme", "org-1").dek_id
    b.dek_by_id("acme", dek)  # b is warm: head seen, DEK cached
    a.revoke("acme")
    b.dek_by_id("acme", dek)  # within the bound b may still use what it verified ...
    w.clock.advance(0.5)
    with pytest.raises(TenantRevokedError, match="key revoked at"):
        b.dek_by_id("acme", dek)  # ... and not one moment after it
    assert len(b.cache) == 0


def test_an_idle_process_purges_a_revoked_tenants_keys_without_being_asked() -> None:
    w = World(recheck=0.5)
    a, b = w.process(), w.process()
    w.tenant(a)
    dek = a.dek_for_encrypt("acme", "org-1").dek_id
    b.dek_by_id("acme", dek)
    a.revoke("acme")
    w.clock.advance(1)
    b.revalidate()  # what the cache's sweeper thread does each second
    assert len(b.cache) == 0


def test_the_erased_floor_dek_is_refused_in_another_process_at_once_not_after_its_ttl() -> None:
    """Issue #13: ``erase_deks_below`` left the floor bucket's DEKs usable from other
    processes' caches until their TTL. The erasure replaces the workspace key, so the
    cached DEK's lineage no longer matches and its record is read: destroyed."""
    w = World(recheck=0.5)
    a, b = w.process(), w.process()
    w.tenant(a)
    first = a.dek_for_encrypt("acme", "org-1").dek_id
    a.retire_active_dek("acme", "org-1")
    second = a.dek_for_encrypt("acme", "org-1").dek_id  # same bucket, generation 2
    _, bucket, gen = parse_dek_id(first)
    b.dek_by_id("acme", first)  # cached in b
    b.dek_by_id("acme", second)
    a.erase_deks_below("acme", {"org-1": (bucket, gen)})
    w.clock.advance(0.5)
    with pytest.raises(KeyDestroyedError):
        b.dek_by_id("acme", first)
    b.dek_by_id("acme", second)  # the newer DEK of the floor's bucket stays readable


def test_search_material_is_asked_for_under_the_same_checks() -> None:
    w = World(recheck=0.5)
    a, b = w.process(), w.process()
    w.tenant(a)
    b.search_key_material("acme")
    a.revoke("acme")
    w.clock.advance(0.5)
    with pytest.raises(TenantRevokedError):
        b.search_key_material("acme")
    with pytest.raises(TenantRevokedError):
        b.check_access("acme")


# --- the master key's state at its provider ----------------------------------------------------


def test_a_key_the_customer_disables_is_refused_in_a_warm_process_within_the_check_interval() -> None:
    w = World(guard=True)
    kc = w.process()
    name = w.tenant(kc)
    dek = kc.dek_for_encrypt("acme", "org-1").dek_id
    kc.dek_by_id("acme", dek)
    w.kms.disable(name)
    kc.dek_by_id("acme", dek)  # the last answer (enabled) is under 5 s old: served from the cache
    w.clock.advance(5)
    deadline = time.monotonic() + 5
    while True:  # the status call runs in the guard's thread; a use keeps the last verdict meanwhile
        try:
            kc.dek_by_id("acme", dek)
        except KeyUnavailableError as exc:
            assert exc.state == "disabled" and "key revoked by the customer" in str(exc)
            break
        assert time.monotonic() < deadline, "never refused"
        time.sleep(0.01)
    assert len(kc.cache) == 0  # purged
    assert (Availability.UNUSABLE, Availability.OK) in w.changes
    w.kms.enable(name)
    w.clock.advance(5)
    deadline = time.monotonic() + 5
    while True:  # not revoked in the keychain: usable again once the provider says so
        try:
            kc.dek_by_id("acme", dek)
            break
        except KeyUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _outage(w: World, name: str) -> None:
    w.kms.inject("status", ServiceUnavailableError("injected: KMS does not answer"), times=1000)
    w.kms.inject("unwrap", ServiceUnavailableError("injected: KMS does not answer"), times=1000)


def _refused_after_check(kc: Keychain, dek: str, w: World) -> BaseException | None:
    w.clock.advance(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            kc.dek_by_id("acme", dek)
        except Exception as exc:  # noqa: BLE001
            return exc
        guard = kc.key_state_guard
        verdict = guard.verdict("acme") if guard else None
        if verdict is not None and verdict.availability is Availability.UNREACHABLE:
            try:  # the outage is known now: the next use is what the policy decides
                kc.dek_by_id("acme", dek)
            except Exception as exc:  # noqa: BLE001
                return exc
            return None  # still served
        time.sleep(0.01)
    return None


def test_outage_with_deny_immediately_refuses_as_unavailable_never_as_revoked() -> None:
    w = World(guard=True, policy="deny-immediately")
    kc = w.process()
    name = w.tenant(kc)
    dek = kc.dek_for_encrypt("acme", "org-1").dek_id
    _outage(w, name)
    exc = _refused_after_check(kc, dek, w)
    assert isinstance(exc, KeyServiceUnavailableError) and "key service unavailable" in str(exc)
    assert not isinstance(exc, KeyUnavailableError)  # not a revocation
    assert kc.status("acme").revoked is False
    assert (Availability.UNREACHABLE, Availability.OK) in w.changes


def test_outage_with_serve_from_cache_serves_until_the_grace_ends_even_past_the_ttl() -> None:
    w = World(guard=True, policy="serve-from-cache-for:120")
    kc = w.process(ttl=60)
    name = w.tenant(kc)
    dek = kc.dek_for_encrypt("acme", "org-1").dek_id
    _outage(w, name)
    assert _refused_after_check(kc, dek, w) is None  # unreachable, still served
    w.clock.advance(80)  # +85: past the 60 s TTL, inside the 120 s grace
    kc.dek_by_id("acme", dek)
    w.clock.advance(40)  # +125: the grace after the last good answer (T0) is over
    with pytest.raises(KeyServiceUnavailableError, match="serve-from-cache-for:120"):
        kc.dek_by_id("acme", dek)
    assert len(kc.cache) == 0 and kc.status("acme").revoked is False


def test_outage_with_alert_only_keeps_serving_to_the_normal_ttl() -> None:
    w = World(guard=True, policy="alert-only")
    kc = w.process(ttl=60)
    name = w.tenant(kc)
    dek = kc.dek_for_encrypt("acme", "org-1").dek_id
    _outage(w, name)
    assert _refused_after_check(kc, dek, w) is None
    kc.dek_by_id("acme", dek)
    w.clock.advance(60)  # the L2 expired; unwrapping it again needs the provider, which is down
    with pytest.raises(ServiceUnavailableError):
        kc.dek_by_id("acme", dek)


def test_a_provider_that_hangs_costs_a_read_at_most_the_timeout_once() -> None:
    release = threading.Event()

    class Hanging:
        key_ref = "memory://hang"

        def status(self):
            release.wait(10)
            raise ServiceUnavailableError("gave up")

    cache = KeyCache(clock=FakeClock())
    guard = KeyStateGuard(lambda ref: Hanging(), cache, check_seconds=5, timeout_seconds=0.2)
    started = time.monotonic()
    verdict, _ = guard.current("acme", "memory://hang")
    assert time.monotonic() - started < 2
    assert verdict.availability is Availability.UNREACHABLE and "no answer within 0.2 s" in verdict.error
    started = time.monotonic()
    guard.current("acme", "memory://hang")  # still pending: answered at once, no new wait
    assert time.monotonic() - started < 0.1
    release.set()


def test_a_process_whose_provider_never_answers_still_exits() -> None:
    """The status call of a hung provider runs in a thread that does not hold the
    interpreter at exit (a ThreadPoolExecutor's would: the process printed its last line
    and never ended)."""
    program = textwrap.dedent(
        """
        import threading
        from archive_kms.keys.cache import KeyCache
        from archive_kms.keys.keychain.access import KeyStateGuard

        class Hanging:
            key_ref = "memory://hang"
            def status(self):
                threading.Event().wait()  # never answers

        guard = KeyStateGuard(lambda ref: Hanging(), KeyCache(), check_seconds=5, timeout_seconds=0.2)
        verdict, _ = guard.current("acme", "memory://hang")
        print(verdict.availability.name)
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: a status call's thread holds it", pytrace=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "UNREACHABLE"


@pytest.mark.parametrize(
    ("text", "kind", "seconds", "canonical"),
    [
        ("deny-immediately", GraceKind.DENY_IMMEDIATELY, None, "deny-immediately"),
        ("alert-only", GraceKind.ALERT_ONLY, None, "alert-only"),
        ("serve-from-cache-for:300", GraceKind.SERVE_FROM_CACHE, 300, "serve-from-cache-for:300"),
        ("serve-from-cache-for 90s", GraceKind.SERVE_FROM_CACHE, 90, "serve-from-cache-for:90"),
        ("Serve-From-Cache-For=1.5", GraceKind.SERVE_FROM_CACHE, 1.5, "serve-from-cache-for:1.5"),
    ],
)
def test_grace_policies_parse_to_one_spelling(text, kind, seconds, canonical) -> None:
    policy = GracePolicy.parse(text)
    assert (policy.kind, policy.seconds, str(policy)) == (kind, seconds, canonical)


@pytest.mark.parametrize("text", ["", "serve-from-cache-for", "serve-from-cache-for:0", "forever", "deny", "sfc:10"])
def test_bad_grace_policies_are_refused_naming_the_choices(text) -> None:
    with pytest.raises(
        ValidationError,
        match="grace policy .*(deny-immediately, alert-only or serve-from-cache-for|seconds in 1..86400)",
    ):
        GracePolicy.parse(text)


def test_unusable_states_all_refuse_and_say_which() -> None:
    w = World(guard=True)
    kc = w.process()
    for state, act in (
        (KeyState.PENDING_DELETION, "schedule_deletion"),
        (KeyState.PENDING_IMPORT, "delete_material"),
        (KeyState.REVOKED, "revoke"),
    ):
        tenant = f"t-{state.value.replace('_', '-')}"
        name = w.tenant(kc, tenant)
        kc.dek_for_encrypt(tenant, "ws")
        getattr(w.kms, act)(name)
        w.clock.advance(5)
        deadline = time.monotonic() + 5
        while True:
            try:
                kc.check_access(tenant)
            except KeyUnavailableError as exc:
                assert exc.state == state.value
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_workspace_and_dek_another_process_just_created_read_at_once_despite_the_reused_head() -> None:
    """The reused head (``revocation_check_seconds``) is a bound on how late a revocation
    arrives, not a reason to call a key that exists missing: a DEK another process created
    a moment ago is found (the store is read again once before KeyNotFoundError)."""
    world = World(recheck=0.5)
    reader, writer = world.process(), world.process()
    world.tenant(reader)
    reader.create_workspace("acme", "ws0")
    reader.dek_for_encrypt("acme", "ws0")  # the reader now holds a verified head, reused for 0.5 s
    dek = writer.dek_for_encrypt("acme", "default")  # another process: a new workspace and its DEK
    assert reader.dek_by_id("acme", dek.dek_id).reveal() == dek.key.reveal()
    with pytest.raises(KeyNotFoundError):
        reader.dek_by_id("acme", "l4/nope/1/1")  # what does not exist is still refused


def test_new_data_is_never_encrypted_under_a_dek_another_process_just_retired() -> None:
    """Choosing the DEK for new data reads the current head, never the reused one: a DEK
    another process retired a moment ago (an enable's bind_key, an erasure's floor) is
    not used again (the soak's seed 20261: a copy right after bind_key took the retired
    DEK, the check before upload refused it, and the run failed for good)."""
    world = World(recheck=0.5)
    writer, binder = world.process(), world.process()
    world.tenant(writer)
    old = writer.dek_for_encrypt("acme", "ws0")  # the writer now reuses its head for 0.5 s
    binder.retire_active_dek("acme", "ws0")  # another process
    new = writer.dek_for_encrypt("acme", "ws0")
    assert new.dek_id != old.dek_id, "new data went under the DEK another process retired"
    assert writer.dek_by_id("acme", old.dek_id).reveal() == old.key.reveal()  # still decrypts
