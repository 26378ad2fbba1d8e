"""The keychain (L2 tenant key, L3 workspace keys, L4 DEKs) over the in-memory store and the
in-memory KMS (keys/memory.py, a real implementation held to the KeyProvider contract).

A "fresh" keychain below is a second Keychain over the same store with its own empty
cache: it plays another process, so nothing it returns can come from the first one's cache.
"""

from __future__ import annotations

import base64
import json
import threading

import pytest

from archive_kms.crypto.envelope import ObjectBinding, decrypt_to_bytes, encrypt_bytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import (
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyUnavailableError,
    StateError,
    TenantRevokedError,
    ValidationError,
    VersionConflictError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import (
    ErasureRecord,
    Keychain,
    bucket_of,
    dek_id,
    parse_dek_id,
)
from archive_kms.keys.keychain_store import (
    InMemoryKeychainStore,
    KeyLevel,
    KeyRecord,
    KeyRecordState,
    TenantHead,
)
from archive_kms.keys.memory import MemoryKms

HOUR = 3600
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, bucket 472222


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Env:
    """One keychain "process" plus the shared world (store, KMS, signer, clock)."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.kms = MemoryKms()
        self.store = InMemoryKeychainStore()
        self.signer = Signer.generate()
        self.kc = self.keychain()

    def keychain(self, **kwargs) -> Keychain:
        cache = KeyCache(ttl_seconds=60, clock=self.clock)
        return Keychain(self.store, self.kms.provider, self.signer, self.clock, cache, **kwargs)

    def tenant(self, tenant_id: str = "acme") -> str:
        ref = self.kms.create_key(f"{tenant_id}-l1")
        self.kc.create_tenant(tenant_id, self.kms.provider(ref))
        return ref

    def record_json(self, tenant_id: str, record_id: str) -> dict:
        return json.loads(self.store.records[(tenant_id, record_id)])

    def put_json(self, tenant_id: str, record_id: str, obj: dict) -> None:
        self.store.records[(tenant_id, record_id)] = json.dumps(obj).encode()


@pytest.fixture()
def env() -> Env:
    return Env()


def _encrypt(kc: Keychain, tenant: str, ws: str, name: bytes, data: bytes, now=None) -> bytes:
    dek = kc.dek_for_encrypt(tenant, ws, now)
    return encrypt_bytes(
        data, dek=dek.key, dek_id=dek.dek_id, binding=ObjectBinding(tenant, ws, name), segment_size=4096
    )


def _decrypt(kc: Keychain, tenant: str, ws: str, name: bytes, blob: bytes) -> bytes:
    return decrypt_to_bytes(blob, binding=ObjectBinding(tenant, ws, name), dek_for=kc.dek_for_header)


# --- hierarchy ------------------------------------------------------------------------------


def test_hierarchy_round_trip_through_a_fresh_process(env: Env) -> None:
    env.tenant("acme")
    blob = _encrypt(env.kc, "acme", "org-1", b"records/1.json", b"hello archive" * 500)

    other = env.keychain()
    assert _decrypt(other, "acme", "org-1", b"records/1.json", blob) == b"hello archive" * 500
    assert other.provider_calls.unwrap == 1  # L2 from the L1; L3 and DEK are local AES-GCM

    records = {r.record_id: r for r in env.store.list_records("acme")}
    assert set(records) == {"l2/1", "l3/org-1/1", f"l4/org-1/{bucket_of(T0, HOUR)}/1"}
    l2, l3 = records["l2/1"], records["l3/org-1/1"]
    assert (l2.level, l2.parent_id, l2.wrap_ref) == (KeyLevel.TENANT, "memory://acme-l1", "memory://acme-l1/1")
    assert (l3.parent_id, l3.parent_version) == ("l2/1", 1)
    assert all(r.signature and r.signer_key_id == env.signer.key_id for r in records.values())


def test_dek_ids_are_deterministic_and_strict() -> None:
    assert dek_id("org-1", 472222, 1) == "l4/org-1/472222/1"
    assert parse_dek_id("l4/org-1/472222/1") == ("org-1", 472222, 1)
    for bad in [
        "l4/org-1/0472222/1",
        "l4/org-1/472222/0",
        "l3/org-1/1",
        "l4/org/1/2/3",
        "l4/org-1/-1/1",
        "l4//1/1",
        "l4/org 1/1/1",
        "l4/" + "w" * 97 + "/1/1",
        7,
    ]:
        with pytest.raises(ValidationError):
            parse_dek_id(bad)
    with pytest.raises(ValidationError):
        dek_id("a/b", 1, 1)


def test_records_serialise_deterministically(env: Env) -> None:
    env.tenant("acme")
    env.kc.dek_for_encrypt("acme", "org-1")
    for raw in [*env.store.records.values(), *env.store.heads.values()]:
        cls = TenantHead if b"keychain.head" in raw else KeyRecord
        obj = cls.from_json(raw)
        assert obj.to_json() == raw
        assert cls.from_json(obj.to_json()) == obj


def test_create_tenant_twice_is_refused(env: Env) -> None:
    ref = env.tenant("acme")
    with pytest.raises(StateError):
        env.kc.create_tenant("acme", env.kms.provider(ref))
    with pytest.raises(ValidationError):
        env.kc.create_tenant("bad/tenant", env.kms.provider(ref))
    with pytest.raises(KeyNotFoundError):
        env.kc.dek_for_encrypt("nobody", "org-1")


# --- buckets --------------------------------------------------------------------------------


def test_hourly_rollover_old_dek_decrypt_only_new_dek_active(env: Env) -> None:
    env.tenant("acme")
    first = env.kc.dek_for_encrypt("acme", "org-1")
    env.clock.advance(1200)  # same hour
    assert env.kc.dek_for_encrypt("acme", "org-1").dek_id == first.dek_id
    old_blob = _encrypt(env.kc, "acme", "org-1", b"a", b"old data")

    env.clock.advance(HOUR)
    second = env.kc.dek_for_encrypt("acme", "org-1")
    assert second.dek_id == dek_id("org-1", bucket_of(env.clock.t, HOUR), 1) != first.dek_id
    states = {d.dek_id: d.state for d in env.kc.list_deks("acme")}
    assert states == {first.dek_id: KeyRecordState.DECRYPT_ONLY, second.dek_id: KeyRecordState.ACTIVE}

    # the old DEK still decrypts, in any process; it never encrypts again, even for a
    # worker whose clock is behind (it gets the newest DEK)
    assert _decrypt(env.keychain(), "acme", "org-1", b"a", old_blob) == b"old data"
    assert env.kc.dek_for_encrypt("acme", "org-1", now=T0).dek_id == second.dek_id
    not_after = next(d.not_after for d in env.kc.list_deks("acme") if d.dek_id == first.dek_id)
    assert not_after.timestamp() == (bucket_of(T0, HOUR) + 1) * HOUR


def test_bucket_width_is_configurable_and_kept_per_workspace(env: Env) -> None:
    env.tenant("acme")
    minute = env.keychain(bucket_seconds=60)
    a = minute.dek_for_encrypt("acme", "org-m")
    env.clock.advance(61)
    b = minute.dek_for_encrypt("acme", "org-m")
    assert parse_dek_id(b.dek_id)[1] == parse_dek_id(a.dek_id)[1] + 1
    # a keychain configured hourly still cuts this workspace by the minute it was created with
    env.clock.advance(60)
    c = env.kc.dek_for_encrypt("acme", "org-m")
    assert parse_dek_id(c.dek_id)[1] == bucket_of(env.clock.t, 60)


def test_retired_dek_gives_way_to_next_generation_in_the_same_bucket(env: Env) -> None:
    env.tenant("acme")
    first = env.kc.dek_for_encrypt("acme", "org-1")
    assert env.kc.retire_active_dek("acme", "org-1") == first.dek_id
    second = env.kc.dek_for_encrypt("acme", "org-1")
    ws, bucket, gen = parse_dek_id(second.dek_id)
    assert (ws, bucket, gen) == ("org-1", parse_dek_id(first.dek_id)[1], 2)
    assert env.keychain().dek_by_id("acme", first.dek_id) == first.key


def test_concurrent_writers_agree_on_one_dek_per_bucket(env: Env) -> None:
    env.tenant("acme")
    env.kc.create_workspace("acme", "org-1")
    keychains = [env.keychain() for _ in range(8)]  # eight "processes"
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = keychains[i].dek_for_encrypt("acme", "org-1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.dek_id for r in results}) == 1
    assert len({r.key.fingerprint for r in results}) == 1
    assert len(env.kc.list_deks("acme")) == 1


def test_store_commit_is_compare_and_set(env: Env) -> None:
    env.tenant("acme")
    head = env.store.get_head("acme")
    with pytest.raises(VersionConflictError) as info:
        env.store.commit("acme", head=head, records=[], expected_head_version=head.version - 1 or 99)
    assert info.value.retryable


# --- rotation -------------------------------------------------------------------------------


def test_rotate_l1_costs_one_unwrap_and_one_wrap_for_1000_deks(env: Env) -> None:
    env.tenant("acme")
    for i in range(1000):  # 10 workspaces x 100 hourly buckets
        env.kc.dek_for_encrypt("acme", f"org-{i % 10}", now=T0 + (i // 10) * HOUR)
    assert len(env.kc.list_deks("acme")) == 1000
    blob = _encrypt(env.kc, "acme", "org-3", b"x", b"payload", now=T0 + 99 * HOUR)
    before_rows = dict(env.store.records)

    new_ref = env.kms.create_key("acme-l1-v2")
    kms_before, kc_before = env.kms.calls.copy(), env.kc.provider_calls
    env.kc.rotate_l1("acme", env.kms.provider(new_ref))
    assert (env.kc.provider_calls - kc_before).__dict__ == {"wrap": 1, "unwrap": 1}
    assert env.kms.calls["wrap"] - kms_before["wrap"] == 1
    assert env.kms.calls["unwrap"] - kms_before["unwrap"] == 1

    changed = {k for k in env.store.records if env.store.records[k] != before_rows.get(k)}
    assert changed == {("acme", "l2/1")}  # one record re-wrapped; no L3 or DEK touched
    l2 = env.store.get_record("acme", "l2/1")
    assert (l2.parent_id, l2.parent_version, l2.version) == (new_ref, 2, 2)
    assert env.kc.status("acme").l1_ref == new_ref

    # the old L1 is no longer needed: disable it and read through a fresh process
    env.kms.disable("acme-l1")
    assert _decrypt(env.keychain(), "acme", "org-3", b"x", blob) == b"payload"


def test_rotate_l2_rewraps_workspace_keys_only_and_old_objects_still_open(env: Env) -> None:
    env.tenant("acme")
    blobs = {ws: _encrypt(env.kc, "acme", ws, b"o", ws.encode() * 100) for ws in ("org-1", "org-2", "org-3")}
    env.clock.advance(HOUR)
    for ws in blobs:
        env.kc.dek_for_encrypt("acme", ws)
    env.kc.erase_workspace("acme", "org-3")
    before = {rid: r for (_, rid), r in ((k, KeyRecord.from_json(v)) for k, v in env.store.records.items())}

    calls = env.kc.provider_calls
    env.kms.calls.clear()
    status = env.kc.rotate_l2("acme")
    assert status.l2_id == "l2/2"
    assert (env.kc.provider_calls - calls).wrap == 1
    assert env.kms.calls["wrap"] == 1 and env.kms.calls["unwrap"] <= 1

    after = {r.record_id: r for r in env.store.list_records("acme")}
    assert after["l2/2"].state is KeyRecordState.ACTIVE
    assert after["l2/1"].state is KeyRecordState.DESTROYED and after["l2/1"].wrapped == b""
    for ws in ("org-1", "org-2"):
        l3 = after[f"l3/{ws}/1"]
        assert (l3.parent_id, l3.parent_version, l3.version) == ("l2/2", 2, 2)
        assert l3.wrapped != before[f"l3/{ws}/1"].wrapped
    assert after["l3/org-3/1"] == before["l3/org-3/1"]  # erased: tombstone untouched
    deks = [rid for rid in before if rid.startswith("l4/")]
    assert deks and all(after[rid] == before[rid] for rid in deks)  # DEKs untouched

    fresh = env.keychain()
    for ws in ("org-1", "org-2"):
        assert _decrypt(fresh, "acme", ws, b"o", blobs[ws]) == ws.encode() * 100


# --- tampering ------------------------------------------------------------------------------


def _two_hours_of_deks(env: Env) -> tuple[str, str]:
    env.tenant("acme")
    old = env.kc.dek_for_encrypt("acme", "org-1").dek_id
    env.clock.advance(HOUR)
    new = env.kc.dek_for_encrypt("acme", "org-1").dek_id
    return old, new


def _flip_wrapped(obj: dict) -> None:
    raw = bytearray(base64.b64decode(obj["wrapped"]))
    raw[20] ^= 0x01
    obj["wrapped"] = base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("record", ["dek", "l3", "l2"])
def test_flipped_wrapped_byte_is_tampering(env: Env, record: str) -> None:
    old, _ = _two_hours_of_deks(env)
    rid = {"dek": old, "l3": "l3/org-1/1", "l2": "l2/1"}[record]
    obj = env.record_json("acme", rid)
    _flip_wrapped(obj)
    env.put_json("acme", rid, obj)
    with pytest.raises(KeychainTamperedError) as info:
        env.keychain().dek_by_id("acme", old)
    assert "signature does not verify" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        {"state": "active"},  # a decrypt-only DEK promoted back to encrypting
        {"bucket": 1},
        {"parent_id": "l3/org-2/1"},
        {"not_after": "2100-01-01T00:00:00.000000Z"},
        {"version": 9},
    ],
)
def test_edited_dek_record_is_tampering(env: Env, edit: dict) -> None:
    old, _ = _two_hours_of_deks(env)
    obj = env.record_json("acme", old)
    obj.update(edit)
    env.put_json("acme", old, obj)
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", old)


def test_edited_head_is_tampering(env: Env) -> None:
    _, new = _two_hours_of_deks(env)
    env.kc.revoke("acme")
    head = json.loads(env.store.heads["acme"])
    head["revoked"] = False  # un-revoke by editing the row
    env.store.heads["acme"] = json.dumps(head).encode()
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", new)


def test_malformed_rows_are_tampering(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    env.store.records[("acme", old)] = b"{not json"
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", old)
    env.store.heads["acme"] = b'{"format": "archive_kms.keychain.head/1"}'
    with pytest.raises(KeychainTamperedError):
        env.keychain().status("acme")


@pytest.mark.parametrize("record", ["l2/1", "l3/org-1/1", "dek"])
def test_record_swapped_in_from_another_tenant_is_tampering(env: Env, record: str) -> None:
    old, _ = _two_hours_of_deks(env)
    env.tenant("globex")  # same ids exist for globex: same workspace, same hour
    env.clock.t = T0
    env.kc.dek_for_encrypt("globex", "org-1")
    rid = old if record == "dek" else record
    env.store.records[("acme", rid)] = env.store.records[("globex", rid)]
    with pytest.raises(KeychainTamperedError) as info:
        env.keychain().dek_by_id("acme", old)
    assert "swapped" in str(info.value)


def test_head_swapped_in_from_another_tenant_is_tampering(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    env.tenant("globex")
    env.store.heads["acme"] = env.store.heads["globex"]
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", old)


def test_replayed_active_version_of_a_decrypt_only_dek_is_tampering(env: Env) -> None:
    env.tenant("acme")
    first = env.kc.dek_for_encrypt("acme", "org-1").dek_id
    v1 = env.store.records[("acme", first)]  # signed, ACTIVE, version 1
    env.clock.advance(HOUR)
    env.kc.dek_for_encrypt("acme", "org-1")  # first becomes DECRYPT_ONLY, version 2
    env.store.records[("acme", first)] = v1
    with pytest.raises(KeychainTamperedError) as info:
        env.keychain().dek_by_id("acme", first)
    assert "replayed" in str(info.value)


def test_replayed_l2_after_rotate_l1_is_tampering(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    v1 = env.store.records[("acme", "l2/1")]  # wrapped under the old L1
    env.kc.rotate_l1("acme", env.kms.provider(env.kms.create_key("acme-l1-v2")))
    env.store.records[("acme", "l2/1")] = v1
    with pytest.raises(KeychainTamperedError) as info:
        env.keychain().dek_by_id("acme", old)
    assert "replayed" in str(info.value)


def test_replayed_l3_after_rotate_l2_is_tampering(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    v1 = env.store.records[("acme", "l3/org-1/1")]
    env.kc.rotate_l2("acme")
    env.store.records[("acme", "l3/org-1/1")] = v1
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", old)


def test_replayed_destroyed_dek_never_decrypts_and_is_reported(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    alive = env.store.records[("acme", old)]
    env.kc.erase_buckets("acme", "org-1", older_than=env.clock.t)
    env.store.records[("acme", old)] = alive  # bring the wrapped DEK back from a backup
    with pytest.raises(KeyDestroyedError):  # the signed head says erased: refused unread
        env.keychain().dek_by_id("acme", old)
    with pytest.raises(KeychainTamperedError):  # and an inventory reports the replay
        env.keychain().reencrypt_path("acme")


def test_replayed_head_is_tampering_in_a_process_that_saw_a_newer_one(env: Env) -> None:
    _, new = _two_hours_of_deks(env)
    old_head = env.store.heads["acme"]
    env.kc.revoke("acme")
    env.store.heads["acme"] = old_head  # roll the head back to "not revoked"
    with pytest.raises(KeychainTamperedError) as info:
        env.kc.dek_by_id("acme", new)
    assert "went back" in str(info.value)


def test_a_head_read_that_races_a_newer_write_is_not_a_replay(env: Env) -> None:
    """Thread A reads the head (version n) while thread B commits n+1 and notes it: A's
    head is older than the mark when A checks it, but was current when A read it. Only a
    head older than the mark seen *before* the read is a replay (the store never goes back)."""
    env.tenant()
    env.kc.create_workspace("acme", "ws0")
    read_done, write_done = threading.Event(), threading.Event()
    real_get_head = env.store.get_head
    racing = {"on": True}

    def slow_get_head(tenant_id):
        head = real_get_head(tenant_id)
        if racing["on"] and threading.current_thread().name == "reader":
            racing["on"] = False
            read_done.set()
            assert write_done.wait(5)  # B commits and notes a newer head meanwhile
        return head

    env.store.get_head = slow_get_head  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            env.kc.status("acme")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reader, name="reader")
    t.start()
    assert read_done.wait(5)
    env.kc.create_workspace("acme", "ws1")  # head version + 1, noted by this keychain
    write_done.set()
    t.join(5)
    assert errors == []
    assert env.kc.status("acme").head_version == real_get_head("acme").version


def test_signature_from_another_platform_key_is_tampering(env: Env) -> None:
    old, _ = _two_hours_of_deks(env)
    stranger = Keychain(env.store, env.kms.provider, Signer.generate(), env.clock, KeyCache(clock=env.clock))
    with pytest.raises(KeychainTamperedError) as info:
        stranger.dek_by_id("acme", old)
    assert "unknown key" in str(info.value)


# --- revocation -----------------------------------------------------------------------------


def test_revoke_refuses_every_unwrap_at_once_and_restore_reenables(env: Env) -> None:
    env.tenant("acme")
    env.tenant("globex")
    dek = env.kc.dek_for_encrypt("acme", "org-1")
    other_process = env.keychain()
    other_process.dek_by_id("acme", dek.dek_id)  # warm: L2, L3, DEK cached there too
    other_dek = env.kc.dek_for_encrypt("globex", "org-1")
    assert len(env.kc.cache) > 0 and len(other_process.cache) > 0
    calls = env.kms.calls.copy()

    env.kc.revoke("acme")
    assert env.kc.status("acme").revoked
    for kc in (env.kc, other_process):
        with pytest.raises(TenantRevokedError) as info:
            kc.dek_by_id("acme", dek.dek_id)
        assert info.value.state == "revoked" and not info.value.retryable
        with pytest.raises(TenantRevokedError):
            kc.dek_for_encrypt("acme", "org-1")
        with pytest.raises(TenantRevokedError):
            kc.rotate_l2("acme")
    assert env.kms.calls == calls  # refused before any provider call
    assert other_process.cache.purge("acme") == 0  # its cache was purged on first refusal
    assert env.kc.dek_by_id("globex", other_dek.dek_id) == other_dek.key  # others unaffected
    env.kc.revoke("acme")  # idempotent

    env.kc.restore("acme")
    assert other_process.dek_by_id("acme", dek.dek_id) == dek.key


def test_restore_needs_a_working_l1(env: Env) -> None:
    env.tenant("acme")
    dek = env.kc.dek_for_encrypt("acme", "org-1")
    env.kc.revoke("acme")
    env.kms.disable("acme-l1")
    with pytest.raises(KeyUnavailableError) as info:
        env.kc.restore("acme")
    assert info.value.state == "disabled"
    assert env.kc.status("acme").revoked
    env.kms.enable("acme-l1")
    env.kc.restore("acme")
    assert env.kc.dek_by_id("acme", dek.dek_id) == dek.key


def test_disabled_l1_fails_reads_after_cache_ttl(env: Env) -> None:
    env.tenant("acme")
    dek = env.kc.dek_for_encrypt("acme", "org-1")
    env.kms.disable("acme-l1")
    assert env.kc.dek_by_id("acme", dek.dek_id) == dek.key  # still cached: bounded by TTL
    env.clock.advance(61)
    with pytest.raises(KeyUnavailableError):
        env.kc.dek_by_id("acme", dek.dek_id)


# --- erasure --------------------------------------------------------------------------------


def test_erase_buckets_crypto_erases_and_issues_a_verifiable_record(env: Env) -> None:
    env.tenant("acme")
    ids = [env.kc.dek_for_encrypt("acme", "org-1", now=T0 + h * HOUR).dek_id for h in range(5)]
    env.clock.t = T0 + 4 * HOUR
    blob = _encrypt(env.kc, "acme", "org-1", b"keep", b"recent")
    env.kc.dek_by_id("acme", ids[0])  # cached: erasure must purge it

    record = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 3 * HOUR, reason="retention 3h")
    assert record.dek_ids == tuple(ids[:3]) and record.scope == "buckets" and not record.l3_destroyed
    assert env.kc.cache.get("acme", ids[0]) is None  # purged from this process's cache at once
    for kc in (env.kc, env.keychain()):
        for rid in ids[:3]:
            with pytest.raises(KeyDestroyedError) as info:
                kc.dek_by_id("acme", rid)
            assert "crypto-erased" in str(info.value) and not info.value.retryable
        assert _decrypt(kc, "acme", "org-1", b"keep", blob) == b"recent"
    for rid in ids[:3]:
        tomb = env.store.get_record("acme", rid)
        assert tomb.state is KeyRecordState.DESTROYED and tomb.wrapped == b""
    assert env.kc.reencrypt_path("acme") == ids[3:]

    # verifiable by anyone holding the platform public key, from its JSON alone
    verifier = Verifier.from_public_pem(env.signer.public_key_pem())
    parsed = ErasureRecord.from_json(record.to_json())
    assert parsed == record
    parsed.verify(verifier)
    assert env.kc.erase_buckets("acme", "org-1", older_than=T0 + 3 * HOUR).dek_ids == ()  # idempotent


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o.update(dek_ids=o["dek_ids"][:-1]),
        lambda o: o.update(reason="other"),
        lambda o: o.update(tenant_id="globex"),
        lambda o: o.update(erased_at="2030-01-01T00:00:00.000000Z"),
        lambda o: o.update(signature=base64.b64encode(b"\0" * 64).decode()),
    ],
)
def test_edited_erasure_record_fails_verification(env: Env, edit) -> None:
    env.tenant("acme")
    for h in range(3):
        env.kc.dek_for_encrypt("acme", "org-1", now=T0 + h * HOUR)
    env.clock.t = T0 + 2 * HOUR
    obj = json.loads(env.kc.erase_buckets("acme", "org-1", older_than=env.clock.t).to_json())
    edit(obj)
    with pytest.raises(IntegrityError):
        ErasureRecord.from_json(json.dumps(obj)).verify(Verifier.from_public_pem(env.signer.public_key_pem()))


def test_erasure_record_does_not_verify_under_another_key(env: Env) -> None:
    env.tenant("acme")
    env.kc.dek_for_encrypt("acme", "org-1")
    record = env.kc.erase_workspace("acme", "org-1")
    with pytest.raises(IntegrityError):
        record.verify(Signer.generate().verifier())


def test_erase_workspace_destroys_l3_and_every_dek(env: Env) -> None:
    env.tenant("acme")
    ids = [env.kc.dek_for_encrypt("acme", "org-1", now=T0 + h * HOUR).dek_id for h in range(3)]
    env.clock.t = T0 + 2 * HOUR
    env.kc.revoke("acme")  # erasure works while revoked (it unwraps nothing)
    record = env.kc.erase_workspace("acme", "org-1", reason="org deleted")
    env.kc.restore("acme")
    assert record.dek_ids == tuple(ids) and record.l3_destroyed and record.scope == "workspace"
    record.verify(env.signer.verifier())
    assert env.store.get_record("acme", "l3/org-1/1").state is KeyRecordState.DESTROYED
    for rid in ids:
        with pytest.raises(KeyDestroyedError):
            env.keychain().dek_by_id("acme", rid)
    with pytest.raises(KeyDestroyedError):
        env.kc.dek_for_encrypt("acme", "org-1")
    assert env.kc.status("acme").erased_workspaces == ("org-1",)
    assert env.kc.reencrypt_path("acme") == []


def test_erase_buckets_refuses_a_future_cutoff(env: Env) -> None:
    env.tenant("acme")
    env.kc.dek_for_encrypt("acme", "org-1")
    with pytest.raises(ValidationError):
        env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    with pytest.raises(KeyNotFoundError):
        env.kc.erase_buckets("acme", "org-9", older_than=T0)


def test_new_deks_never_land_in_an_erased_bucket(env: Env) -> None:
    env.tenant("acme")
    env.kc.dek_for_encrypt("acme", "org-1", now=T0)
    env.clock.advance(2 * HOUR)
    env.kc.erase_buckets("acme", "org-1", older_than=env.clock.t)  # active DEK erased too
    late = env.kc.dek_for_encrypt("acme", "org-1", now=T0)  # a worker whose clock lags
    assert parse_dek_id(late.dek_id)[1] == bucket_of(env.clock.t, HOUR)
    assert env.keychain().dek_by_id("acme", late.dek_id) == late.key


# --- secrets never leak ---------------------------------------------------------------------


def _forms(secret: bytes) -> list[str]:
    hexed = secret.hex()
    return [
        secret.decode("latin-1"),
        hexed,
        hexed.upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
    ] + [hexed[i : i + 16] for i in range(0, len(hexed) - 15, 2)]


def test_key_bytes_never_in_repr_errors_logs_or_store(env: Env, caplog) -> None:
    import logging

    from archive_kms.keys.keychain.wrapping import open_wrapped as _open
    from archive_kms.keys.port import WrappedKey

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    env.tenant("acme")
    dek = env.kc.dek_for_encrypt("acme", "org-1")
    texts += [repr(dek), str(dek), repr(env.kc), repr(env.kc.cache), repr(env.signer)]
    env.clock.advance(HOUR)
    env.kc.dek_for_encrypt("acme", "org-1")
    env.kc.rotate_l2("acme")
    env.kc.rotate_l1("acme", env.kms.provider(env.kms.create_key("acme-l1-v2")))
    texts += [repr(r) for r in env.store.list_records("acme")] + [repr(env.store.get_head("acme"))]
    l2_rec = env.store.get_record("acme", "l2/2")
    l2 = env.kms.provider(l2_rec.parent_id).unwrap(
        WrappedKey(l2_rec.wrap_ref, l2_rec.wrap_algorithm, l2_rec.wrapped), context={"tenant": "acme"}
    )
    l3 = _open(l2, env.store.get_record("acme", "l3/org-1/1"))
    record = env.kc.erase_buckets("acme", "org-1", older_than=env.clock.t)
    texts.append(repr(record))
    live_l3 = env.store.get_head("acme").workspace("org-1").l3.record_id  # the erasure replaced it
    new_l3 = _open(l2, env.store.get_record("acme", live_l3))

    obj = env.record_json("acme", live_l3)
    _flip_wrapped(obj)
    env.put_json("acme", live_l3, obj)
    errors = []
    for call in (lambda: env.keychain().dek_for_encrypt("acme", "org-1"), lambda: env.kc.dek_by_id("acme", dek.dek_id)):
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    assert len(errors) == 2
    import traceback

    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts += ["".join(traceback.format_exception(e)) for e in errors]
    texts += [r.getMessage() for r in caplog.records]
    stored = b"".join([*env.store.records.values(), *env.store.heads.values()]).decode()
    texts.append(stored)
    assert any("tampering detected" in t for t in texts)  # the logs did say something

    haystack = "\n".join(texts)
    for secret in (dek.key.reveal(), l2.reveal(), l3.reveal(), new_l3.reveal()):
        for form in _forms(secret):
            assert form not in haystack


def test_unknown_dek_ids_are_not_found(env: Env) -> None:
    env.tenant("acme")
    first = env.kc.dek_for_encrypt("acme", "org-1", now=T0).dek_id
    env.kc.dek_for_encrypt("acme", "org-1", now=T0 + 3 * HOUR)
    ws, bucket, _ = parse_dek_id(first)
    for missing in (dek_id(ws, bucket + 1, 1), dek_id(ws, bucket + 9, 1), dek_id("org-9", bucket, 1)):
        with pytest.raises(KeyNotFoundError):
            env.keychain().dek_by_id("acme", missing)
    with pytest.raises(ValidationError):
        env.kc.dek_by_id("acme", "l3/org-1/1")
