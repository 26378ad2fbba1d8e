"""Re-keying below L1 after a bind (``rotate_l3``, ``rekey_below_l1``, ``erase_deks_below``):
the backup attack it closes, crash safety, tampering and erasure.

The attack: a copy of the keychain rows taken before the tenant was bound to its own L1
(L2 wrapped under the platform's managed key), plus the managed key, plus any wrapped key
ciphertext of the live store (a later backup). ``_attacker_deks`` opens every DEK that
combination opens, by the documented wrap format, without going through the keychain.

The tests build their world with ``test_keychain.Env``, so
``tests/contract/test_keychain_store_sql.py`` reruns them on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from test_keychain import HOUR, T0, Env, _decrypt, _encrypt, _flip_wrapped

from archive_kms.crypto.signing import Verifier
from archive_kms.errors import (
    ArchiveKmsError,
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    TenantRevokedError,
    ValidationError,
)
from archive_kms.keys.keychain import ErasureRecord, Keychain, parse_dek_id
from archive_kms.keys.keychain.wrapping import open_wrapped as _open
from archive_kms.keys.keychain_store import KeyLevel, KeyRecord, KeyRecordState, RecordRef
from archive_kms.keys.port import KeyProvider, WrappedKey

Rows = dict[Any, bytes]
Blobs = Mapping[str, tuple[str, bytes, bytes]]  # name -> (workspace, object name, envelope)


@pytest.fixture()
def env() -> Env:
    return Env()  # test_keychain's world: the SQL contract module swaps its store


# --- the attacker -----------------------------------------------------------------------------


def _rows(env: Env) -> tuple[Rows, Rows]:
    """A copy of the keychain's raw rows (records, heads): a database backup."""
    return (
        {k: env.store.records[k] for k in list(env.store.records)},
        {k: env.store.heads[k] for k in list(env.store.heads)},
    )


def _attacker_deks(tenant: str, backup: Rows, live: Rows, old_l1: KeyProvider) -> dict[str, bytes]:
    """Every DEK (id -> key bytes) opened with the backup's L2 through ``old_l1`` and any L3
    or DEK ciphertext found in the backup or the live store."""
    records = [KeyRecord.from_json(raw) for rows in (backup, live) for (t, _), raw in rows.items() if t == tenant]
    records = [r for r in records if r.state is not KeyRecordState.DESTROYED]

    def try_open(keys: list[Any], rec: KeyRecord) -> Any:
        for key in keys:
            try:
                return _open(key, rec)
            except ArchiveKmsError:
                continue
        return None

    l2s = []
    for rec in (r for r in records if r.level is KeyLevel.TENANT):
        try:
            l2s.append(
                old_l1.unwrap(WrappedKey(rec.wrap_ref, rec.wrap_algorithm, rec.wrapped), context={"tenant": tenant})
            )
        except ArchiveKmsError:
            continue
    l3s = [k for k in (try_open(l2s, r) for r in records if r.level is KeyLevel.WORKSPACE) if k is not None]
    out = {}
    for rec in (r for r in records if r.level is KeyLevel.DEK):
        key = try_open(l3s, rec)
        if key is not None:
            out[rec.record_id] = key.reveal()
    return out


# --- a tenant with history ----------------------------------------------------------------------


def _tenant_with_data(env: Env) -> dict[str, tuple[str, bytes, bytes]]:
    """acme on its managed key: three hours of DEKs in org-1 and org-2 (the oldest of org-1
    already erased, which replaced org-1's workspace key: l3/org-1/2), org-3 erased.
    Returns name -> (workspace, object name, blob)."""
    env.tenant("acme")
    blobs = {}
    for h in range(3):
        env.clock.t = T0 + h * HOUR
        for ws in ("org-1", "org-2", "org-3"):
            name = f"{ws}/{h}".encode()
            blobs[f"{ws}/{h}"] = (ws, name, _encrypt(env.kc, "acme", ws, name, b"data " + name))
    env.kc.erase_buckets("acme", "org-1", older_than=T0 + HOUR)
    env.kc.erase_workspace("acme", "org-3")
    return {k: v for k, v in blobs.items() if k != "org-1/0" and not k.startswith("org-3")}


def _all_open(kc: Keychain, blobs: Blobs) -> None:
    for ws, name, blob in blobs.values():
        assert _decrypt(kc, "acme", ws, name, blob) == b"data " + name


def _bind(env: Env, *, rekey: bool) -> KeyProvider:
    """bind_key as the migration should run it: rotate_l1, rekey, retire the active DEKs."""
    customer = env.kms.provider(env.kms.create_key("acme-byok"))
    env.kc.rotate_l1("acme", customer)
    if rekey:
        env.kc.rekey_below_l1("acme")
    for ws in env.kc.status("acme").workspaces:
        env.kc.retire_active_dek("acme", ws)
    return customer


def _floor(env: Env) -> dict[str, tuple[int, int]]:
    floor: dict[str, tuple[int, int]] = {}
    for d in env.kc.list_deks("acme"):
        floor[d.workspace_id] = max(floor.get(d.workspace_id, (0, 0)), (d.bucket, d.generation))
    return floor


# --- rotate_l3 ------------------------------------------------------------------------------------


def test_rotate_l3_rewraps_live_deks_destroys_the_old_key_and_purges_it(env: Env) -> None:
    blobs = _tenant_with_data(env)
    before = {r.record_id: r for r in env.store.list_records("acme")}
    env.kc.dek_by_id("acme", "l4/org-1/472223/1")  # old L3 in this process's cache
    assert env.kc.cache.get("acme", "l3/org-1/2") is not None
    active = env.store.get_head("acme").workspace("org-1").active_dek
    kms_calls = env.kms.calls.copy()

    env.kc.rotate_l3("acme", "org-1")
    assert env.kms.calls == kms_calls  # local AES only: L2 was cached, DEKs never touch the L1

    after = {r.record_id: r for r in env.store.list_records("acme")}
    new_l3, old_l3 = after["l3/org-1/3"], after["l3/org-1/2"]
    assert (new_l3.state, new_l3.parent_id, new_l3.version, new_l3.generation) == (KeyRecordState.ACTIVE, "l2/1", 1, 3)
    assert old_l3.state is KeyRecordState.DESTROYED and old_l3.wrapped == b""
    live = [
        rid
        for rid, r in before.items()
        if r.workspace_id == "org-1" and r.level is KeyLevel.DEK and r.state is not KeyRecordState.DESTROYED
    ]
    assert len(live) == 2
    for rid in live:
        assert (after[rid].parent_id, after[rid].parent_version, after[rid].wrap_ref) == ("l3/org-1/3", 3, "l3/org-1/3")
        assert after[rid].version == before[rid].version + 1 and after[rid].state is before[rid].state
        assert after[rid].wrapped != before[rid].wrapped
    assert after["l4/org-1/472222/1"] == before["l4/org-1/472222/1"]  # tombstone untouched
    assert all(after[rid] == r for rid, r in before.items() if r.workspace_id != "org-1")
    head = env.store.get_head("acme").workspace("org-1")
    assert head.active_dek == RecordRef(active.record_id, active.generation, active.version + 1)

    assert env.kc.cache.get("acme", "l3/org-1/2") is None  # purged: never served again
    _all_open(env.keychain(), blobs)  # another process, empty cache
    _all_open(env.kc, blobs)
    assert env.kc.dek_for_encrypt("acme", "org-1").dek_id == active.record_id  # still the active DEK


def test_rotate_l3_refuses_erased_unknown_and_revoked(env: Env) -> None:
    _tenant_with_data(env)
    with pytest.raises(KeyDestroyedError):
        env.kc.rotate_l3("acme", "org-3")
    with pytest.raises(KeyNotFoundError):
        env.kc.rotate_l3("acme", "org-9")
    env.kc.revoke("acme")
    with pytest.raises(TenantRevokedError):
        env.kc.rotate_l3("acme", "org-1")


def test_edited_or_replayed_l3_after_rotate_l3_is_tampering(env: Env) -> None:
    blobs = _tenant_with_data(env)
    old_l3, old_dek = env.store.records[("acme", "l3/org-1/2")], env.store.records[("acme", "l4/org-1/472223/1")]
    env.kc.rotate_l3("acme", "org-1")
    good, live_dek = env.store.records[("acme", "l3/org-1/3")], env.store.records[("acme", "l4/org-1/472223/1")]

    for edit in (_flip_wrapped, lambda o: o.update(parent_id="l2/9"), lambda o: o.update(state="destroyed")):
        obj = json.loads(good)
        edit(obj)
        env.store.records[("acme", "l3/org-1/3")] = json.dumps(obj).encode()
        with pytest.raises(KeychainTamperedError):
            env.keychain().dek_by_id("acme", "l4/org-1/472223/1")
    env.store.records[("acme", "l3/org-1/3")] = good

    # bring back the pre-rotation workspace key and DEK rows: the DEK names a destroyed parent
    env.store.records[("acme", "l3/org-1/2")] = old_l3
    env.store.records[("acme", "l4/org-1/472223/1")] = old_dek
    with pytest.raises(KeychainTamperedError):
        env.keychain().dek_by_id("acme", "l4/org-1/472223/1")
    with pytest.raises(KeychainTamperedError):
        env.keychain().list_deks("acme")
    env.store.records[("acme", "l4/org-1/472223/1")] = live_dek
    _all_open(env.keychain(), blobs)  # with the live row back, everything opens again


# --- the backup attack --------------------------------------------------------------------------


@pytest.mark.parametrize("rekey", [True, False], ids=["rekeyed", "only-rewrapped"])
def test_a_keychain_backup_from_before_the_bind_opens_no_new_dek(env: Env, rekey: bool) -> None:
    blobs = _tenant_with_data(env)
    old_deks = {d.dek_id for d in env.kc.list_deks("acme") if d.state is not KeyRecordState.DESTROYED}
    managed = env.kms.provider(env.store.get_head("acme").l1_ref)
    backup, _ = _rows(env)  # taken before the bind

    _bind(env, rekey=rekey)
    new = env.kc.dek_for_encrypt("acme", "org-1")  # the copy encrypts under a DEK made after the bind
    blobs["new"] = ("org-1", b"copied", _encrypt(env.kc, "acme", "org-1", b"copied", b"data copied"))

    live, _ = _rows(env)
    opened = _attacker_deks("acme", backup, live, managed)
    assert set(opened) >= old_deks  # DEK bytes are unchanged: erase them once the source is gone
    if rekey:
        assert new.dek_id not in opened and not set(opened) - old_deks
    else:  # the gap this closes: the re-wrapped L2 still opens the L3 and every new DEK
        assert opened[new.dek_id] == new.key.reveal()

    # the live keychain opens everything, without the managed key
    env.kms.disable("acme-l1")
    _all_open(env.keychain(), blobs)


def test_rekey_replaces_l2_and_every_live_l3_once(env: Env) -> None:
    blobs = _tenant_with_data(env)
    search_before = env.kc.search_key_material("acme").fingerprint
    env.kc.rotate_l1("acme", env.kms.provider(env.kms.create_key("acme-byok")))
    calls = env.kms.calls.copy()

    report = env.kc.rekey_below_l1("acme")
    assert (report.l2_rotated, report.l3_rotated, report.deks_rewrapped) == (True, ("org-1", "org-2"), 5)
    assert env.kms.calls["wrap"] - calls["wrap"] == 1 and env.kms.calls["unwrap"] == calls["unwrap"]
    assert report.summary() == {
        "l2_id": "l2/2",
        "l2_rotated": True,
        "l3_rotated": ["org-1", "org-2"],
        "deks_rewrapped": 5,
        "head_version": report.status.head_version,
    }
    head = env.store.get_head("acme")
    assert (head.l2.record_id, head.l2.version) == ("l2/2", 1)
    assert [(w.workspace_id, w.l3.record_id, w.l3.version) for w in head.workspaces] == [
        ("org-1", "l3/org-1/3", 1),
        ("org-2", "l3/org-2/2", 1),
        ("org-3", "l3/org-3/1", 2),
    ]
    assert env.kc.search_key_material("acme").fingerprint != search_before  # new L2: new search keys

    again = env.kc.rekey_below_l1("acme")  # a rerun changes nothing
    assert (again.l2_rotated, again.l3_rotated, again.deks_rewrapped) == (False, (), 0)
    assert env.store.get_head("acme").version == head.version
    _all_open(env.keychain(), blobs)


def test_rekey_of_a_tenant_never_rewrapped_is_a_no_op(env: Env) -> None:
    blobs = _tenant_with_data(env)
    version = env.store.get_head("acme").version
    report = env.kc.rekey_below_l1("acme")
    assert (report.l2_rotated, report.l3_rotated) == (False, ())
    assert env.store.get_head("acme").version == version
    env.kc.rotate_l2("acme")  # L3s re-wrapped under a new L2, L2 itself fresh: only they go
    report = env.kc.rekey_below_l1("acme")
    assert (report.l2_rotated, report.l3_rotated) == (False, ("org-1", "org-2"))
    _all_open(env.keychain(), blobs)


# --- crashes --------------------------------------------------------------------------------------


class Crash(BaseException):
    """The process dies (not an error anything should handle)."""


def _crash_on_commit(env: Env, n: int, when: str) -> Callable[[], None]:
    """Kill the n-th store commit from now, before it reaches the store or right after it
    committed (before the keychain updates its cache). Returns the undo."""
    real = env.store.commit
    seen = {"commits": 0}

    def commit(tenant_id: str, **kw: Any) -> None:
        seen["commits"] += 1
        if seen["commits"] == n and when == "before":
            raise Crash()
        real(tenant_id, **kw)
        if seen["commits"] == n and when == "after":
            raise Crash()

    env.store.commit = commit  # type: ignore[method-assign]
    return lambda: setattr(env.store, "commit", real)


def _assert_rekeyed(env: Env, blobs: Blobs, backup: Rows, managed: KeyProvider) -> None:
    head = env.store.get_head("acme")
    assert head.l2.version == 1 and all(w.l3.version == 1 for w in head.workspaces if not w.erased)
    _all_open(env.keychain(), blobs)
    new = env.kc.dek_for_encrypt("acme", "org-2", now=env.clock.t + HOUR)
    assert new.dek_id not in _attacker_deks("acme", backup, _rows(env)[0], managed)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", [1, 2, 3])  # 1: the L2, 2 and 3: the two live workspace keys
def test_rekey_killed_at_any_commit_keeps_every_dek_and_a_rerun_converges(env: Env, n: int, when: str) -> None:
    blobs = _tenant_with_data(env)
    managed = env.kms.provider(env.store.get_head("acme").l1_ref)
    backup, _ = _rows(env)
    env.kc.rotate_l1("acme", env.kms.provider(env.kms.create_key("acme-byok")))
    undo = _crash_on_commit(env, n, when)
    with pytest.raises(Crash):
        env.kc.rekey_below_l1("acme")
    undo()
    _all_open(env.keychain(), blobs)  # in between, another process reads everything

    restarted = env.keychain()  # the rerun, in a fresh process
    report = restarted.rekey_below_l1("acme")
    done_before = n - 1 + (when == "after")  # commits that landed before the kill
    assert report.l2_rotated == (done_before == 0)
    assert len(report.l3_rotated) == 2 - max(0, done_before - 1)
    _assert_rekeyed(env, blobs, backup, managed)


@pytest.mark.parametrize("when", ["before", "after"])
def test_rotate_l3_killed_at_its_commit_keeps_every_dek_and_a_rerun_converges(env: Env, when: str) -> None:
    blobs = _tenant_with_data(env)
    undo = _crash_on_commit(env, 1, when)
    with pytest.raises(Crash):
        env.kc.rotate_l3("acme", "org-1")
    undo()
    _all_open(env.keychain(), blobs)
    _all_open(env.kc, blobs)  # the crashed process's cache did not keep a key nothing names
    env.keychain().rotate_l3("acme", "org-1")
    assert env.store.get_head("acme").workspace("org-1").l3.record_id == (
        "l3/org-1/3" if when == "before" else "l3/org-1/4"
    )
    _all_open(env.keychain(), blobs)


# --- erase_deks_below -----------------------------------------------------------------------------


def _migrated(env: Env) -> tuple[dict[str, tuple[int, int]], Rows, dict[str, Any]]:
    """bind (rekeyed) then a copy: DEKs after the floor in the floor's bucket and the next."""
    _tenant_with_data(env)
    backup, _ = _rows(env)
    _bind(env, rekey=True)
    floor = _floor(env)
    env.clock.t = T0 + 2 * HOUR + 60  # same bucket as the floor: generation 2
    copies = {"same-bucket": ("org-1", b"c1", _encrypt(env.kc, "acme", "org-1", b"c1", b"data c1"))}
    env.clock.t = T0 + 3 * HOUR
    copies["next-bucket"] = ("org-2", b"c2", _encrypt(env.kc, "acme", "org-2", b"c2", b"data c2"))
    return floor, backup, copies


def test_erase_deks_below_destroys_up_to_the_floor_and_keeps_newer_deks(env: Env) -> None:
    floor, _, copies = _migrated(env)
    # as bind_key computes it: erased workspaces included (their erasure is a no-op)
    assert floor == {"org-1": (472224, 1), "org-2": (472224, 1), "org-3": (472224, 1)}
    doomed = {
        d.dek_id
        for d in env.kc.list_deks("acme")
        if d.state is not KeyRecordState.DESTROYED and (d.bucket, d.generation) <= floor[d.workspace_id]
    }
    assert len(doomed) == 5
    env.kc.dek_by_id("acme", "l4/org-1/472224/1")  # cached: erasure must drop it

    records = env.kc.erase_deks_below("acme", {ws: list(f) for ws, f in floor.items()}, reason="source deleted")
    assert [r.workspace_id for r in records] == ["org-1", "org-2", "org-3"] and records[2].dek_ids == ()
    assert {i for r in records for i in r.dek_ids} == doomed
    verifier = Verifier.from_public_pem(env.signer.public_key_pem())
    for r in records:
        assert (r.scope, r.floor_dek_id, r.reason) == ("floor", f"l4/{r.workspace_id}/472224/1", "source deleted")
        ErasureRecord.from_json(r.to_json()).verify(verifier)
    assert env.kc.cache.get("acme", "l4/org-1/472224/1") is None

    for kc in (env.kc, env.keychain()):
        for rid in doomed:
            with pytest.raises(KeyDestroyedError):
                kc.dek_by_id("acme", rid)
        _all_open(kc, copies)
    survivors = {d.dek_id: d.state for d in env.kc.list_deks("acme") if d.state is not KeyRecordState.DESTROYED}
    assert survivors == {"l4/org-1/472224/2": KeyRecordState.ACTIVE, "l4/org-2/472225/1": KeyRecordState.ACTIVE}

    version = env.store.get_head("acme").version
    again = env.kc.erase_deks_below("acme", floor)  # rerun: nothing more, nothing written
    assert [r.dek_ids for r in again] == [(), (), ()] and env.store.get_head("acme").version == version


def test_an_erased_dek_brought_back_from_a_backup_never_opens(env: Env) -> None:
    floor, _, _ = _migrated(env)
    # live, re-wrapped versions of DEKs the erasure will destroy: one in the floor's bucket
    # (no bucket watermark covers it: the workspace key replaced in the same commit does)
    saved = {rid: env.store.records[("acme", rid)] for rid in ("l4/org-1/472224/1", "l4/org-1/472223/1")}
    env.kc.erase_deks_below("acme", floor)
    for rid, row in saved.items():
        env.store.records[("acme", rid)] = row
    with pytest.raises(KeychainTamperedError):  # it names the workspace key destroyed with it
        env.keychain().dek_by_id("acme", "l4/org-1/472224/1")
    with pytest.raises(KeyDestroyedError):  # below the watermark: refused by the head alone
        env.keychain().dek_by_id("acme", "l4/org-1/472223/1")


def test_erase_deks_below_validates_before_destroying(env: Env) -> None:
    floor, _, _ = _migrated(env)
    version = env.store.get_head("acme").version
    for bad in (
        {"org-1": (472224,)},
        {"org-1": (472224, 0)},
        {"org-1": ("472224", 1)},
        {"org-1": (True, 1)},
        {"org-1": (472300, 1)},
        {"bad/ws": (1, 1)},
    ):
        with pytest.raises(ValidationError):
            env.kc.erase_deks_below("acme", bad)
    with pytest.raises(KeyNotFoundError):
        env.kc.erase_deks_below("acme", {**floor, "org-9": (1, 1)})
    with pytest.raises(ValidationError):  # org-1 sorts first, but org-2's floor is checked before
        env.kc.erase_deks_below("acme", {**floor, "org-2": (472300, 1)})
    assert env.store.get_head("acme").version == version  # nothing was destroyed
    assert env.kc.erase_deks_below("acme", {"org-3": (472224, 1)})[0].dek_ids == ()  # erased workspace


def test_floor_erasure_record_is_signed_over_its_floor(env: Env) -> None:
    floor, _, _ = _migrated(env)
    obj = json.loads(env.kc.erase_deks_below("acme", floor)[0].to_json())
    obj["floor_dek_id"] = "l4/org-1/472223/1"
    with pytest.raises(IntegrityError):
        ErasureRecord.from_json(json.dumps(obj)).verify(env.signer.verifier())
    # records of the other scopes keep their JSON (and signatures) as before the field existed
    assert "floor_dek_id" not in json.loads(env.kc.erase_workspace("acme", "org-2").to_json())


def test_migration_sequence_leaves_an_old_backup_nothing_live(env: Env) -> None:
    """bind_key (rotate_l1, rekey, retire), copy, cleanup_source (erase_deks_below): every
    DEK still in the keychain is out of reach of the pre-bind backup and the managed key."""
    floor, backup, copies = _migrated(env)
    managed = env.kms.provider("memory://acme-l1")
    env.kc.erase_deks_below("acme", floor)
    live_deks = {d.dek_id for d in env.kc.list_deks("acme") if d.state is not KeyRecordState.DESTROYED}
    assert live_deks and not live_deks & set(_attacker_deks("acme", backup, _rows(env)[0], managed))
    env.kms.disable("acme-l1")
    _all_open(env.keychain(), copies)
    assert all(parse_dek_id(i)[1:] > floor[parse_dek_id(i)[0]] for i in live_deks)


# --- erase_buckets: a retained copy of an erased DEK's row (security review PoC 1b) --------------


def _hours_of_data(env: Env, hours: int = 4) -> tuple[dict[str, tuple[str, bytes, bytes]], list[str]]:
    """acme with one object per hour in org-1, each under that hour's DEK. Returns the
    objects (name -> (workspace, object name, blob)) and the DEK ids, oldest first."""
    env.tenant("acme")
    blobs, ids = {}, []
    for h in range(hours):
        env.clock.t = T0 + h * HOUR
        name = f"org-1/{h}".encode()
        blobs[f"org-1/{h}"] = ("org-1", name, _encrypt(env.kc, "acme", "org-1", name, b"data " + name))
        ids.append(env.kc.dek_for_encrypt("acme", "org-1").dek_id)
    return blobs, ids


def _live_l1(env: Env) -> KeyProvider:
    """The tenant's current L1: what the platform's own unwrap path can always use."""
    return env.kms.provider(env.store.get_head("acme").l1_ref)


def _put_back(env: Env, rows: Rows) -> None:
    for key, body in rows.items():
        env.store.records[key] = body


def test_erase_buckets_replaces_the_workspace_key_and_keeps_the_surviving_deks(env: Env) -> None:
    blobs, ids = _hours_of_data(env)
    env.kc.dek_by_id("acme", ids[0])  # cached: erasure must drop it
    before = {rid: env.store.get_record("acme", rid) for rid in ids}
    version, calls = env.store.get_head("acme").version, env.kms.calls.copy()

    record = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR, reason="retention 2h")
    assert (record.dek_ids, record.scope, record.l3_destroyed) == (tuple(ids[:2]), "buckets", False)
    assert record.head_version == version + 1  # one commit
    assert env.kms.calls == calls  # local AES only: the L2 was cached
    # the record's JSON is the one older records have (they verify unchanged)
    assert set(json.loads(record.to_json())) == {
        "format",
        "tenant_id",
        "workspace_id",
        "scope",
        "dek_ids",
        "l3_destroyed",
        "older_than",
        "reason",
        "erased_at",
        "head_version",
        "signer_key_id",
        "signature",
    }
    record.verify(env.signer.verifier())

    head = env.store.get_head("acme").workspace("org-1")
    assert (head.l3.record_id, head.l3.version, head.erased_before_bucket) == ("l3/org-1/2", 1, parse_dek_id(ids[2])[1])
    old_l3 = env.store.get_record("acme", "l3/org-1/1")
    assert old_l3.state is KeyRecordState.DESTROYED and old_l3.wrapped == b""
    states = {}
    for rid in ids:
        rec = env.store.get_record("acme", rid)
        states[rid] = rec.state
        if rec.state is not KeyRecordState.DESTROYED:  # survivors re-wrapped under the new key
            assert (rec.parent_id, rec.parent_version, rec.version) == ("l3/org-1/2", 2, before[rid].version + 1)
            assert rec.wrapped != before[rid].wrapped and rec.state is before[rid].state
    assert list(states.values()) == [
        KeyRecordState.DESTROYED,
        KeyRecordState.DESTROYED,
        KeyRecordState.DECRYPT_ONLY,
        KeyRecordState.ACTIVE,
    ]
    assert head.active_dek == RecordRef(ids[3], 1, 2)
    assert env.kc.cache.get("acme", ids[0]) is None and env.kc.cache.get("acme", "l3/org-1/1") is None

    survivors = {k: v for k, v in blobs.items() if k in ("org-1/2", "org-1/3")}
    for kc in (env.kc, env.keychain()):
        _all_open(kc, survivors)
        for rid in ids[:2]:
            with pytest.raises(KeyDestroyedError):
                kc.dek_by_id("acme", rid)
    assert env.kc.dek_for_encrypt("acme", "org-1").dek_id == ids[3]  # still the active DEK
    assert env.kc.reencrypt_path("acme") == ids[2:]


def test_a_copy_of_an_erased_dek_row_put_back_opens_under_no_live_key(env: Env) -> None:
    """PoC 1b: rows of DEKs retained from before the erasure (a dead tuple, a replica, a
    backup of those rows) written back into the store. Neither the keychain nor anyone with
    the live rows and the tenant's L1 (the platform's unwrap path) opens them: the workspace
    key that wrapped them was replaced in the erasure's commit. With the old behaviour (the
    workspace key kept) ``opened`` holds both erased DEKs."""
    blobs, ids = _hours_of_data(env)
    retained = {("acme", rid): env.store.records[("acme", rid)] for rid in ids[:2]}
    env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    _put_back(env, retained)

    opened = _attacker_deks("acme", retained, _rows(env)[0], _live_l1(env))
    assert set(opened) == set(ids[2:])  # the survivors only: the live L1 is the platform's own
    for kc in (env.kc, env.keychain()):
        for rid in ids[:2]:
            with pytest.raises(KeyDestroyedError):  # below the signed watermark: refused unread
                kc.dek_by_id("acme", rid)
    with pytest.raises(KeychainTamperedError):  # an inventory reports the restored rows
        env.keychain().list_deks("acme")
    _all_open(env.keychain(), {k: v for k, v in blobs.items() if k in ("org-1/2", "org-1/3")})


def test_erase_buckets_rerun_changes_nothing_and_a_later_one_replaces_the_key_again(env: Env) -> None:
    blobs, ids = _hours_of_data(env)
    first = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    rows, heads = _rows(env)

    again = env.keychain().erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)  # another process
    assert again.dek_ids == () and again.head_version == first.head_version
    assert _rows(env) == (rows, heads)  # nothing written

    retained = {("acme", ids[2]): env.store.records[("acme", ids[2])]}  # under l3/org-1/2
    later = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 3 * HOUR)
    assert later.dek_ids == (ids[2],)
    assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/3"
    _put_back(env, retained)
    assert ids[2] not in _attacker_deks("acme", retained, _rows(env)[0], _live_l1(env))
    env.store.records[("acme", ids[2])] = rows[("acme", ids[2])]  # the tombstone back: a clean store
    _all_open(env.keychain(), {"org-1/3": blobs["org-1/3"]})


@pytest.mark.parametrize("when", ["before", "after"])
def test_erase_buckets_killed_at_its_commit_converges(env: Env, when: str) -> None:
    blobs, ids = _hours_of_data(env)
    retained = {("acme", rid): env.store.records[("acme", rid)] for rid in ids[:2]}
    undo = _crash_on_commit(env, 1, when)
    with pytest.raises(Crash):
        env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    undo()
    between = env.keychain()  # another process reads a consistent keychain: all old or all new
    if when == "before":
        _all_open(between, blobs)
        assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/1"
    else:
        with pytest.raises(KeyDestroyedError):
            between.dek_by_id("acme", ids[0])
        assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/2"

    rerun = env.keychain().erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)  # a fresh process
    assert rerun.dek_ids == (tuple(ids[:2]) if when == "before" else ())
    assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/2"  # replaced exactly once
    survivors = {k: v for k, v in blobs.items() if k in ("org-1/2", "org-1/3")}
    _all_open(env.keychain(), survivors)
    _all_open(env.kc, survivors)  # the crashed process's cache serves no key nothing names
    tombstones = {key: env.store.records[key] for key in retained}
    _put_back(env, retained)
    assert set(_attacker_deks("acme", retained, _rows(env)[0], _live_l1(env))) == set(ids[2:])
    _put_back(env, tombstones)


def test_erase_buckets_while_revoked_only_destroys_and_the_next_one_replaces_the_key(env: Env) -> None:
    """Retention works while revoked, but without the L2 the workspace key cannot be replaced:
    the erasure destroys and raises the watermark only, which leaves the PoC 1b gap (the old
    behaviour). The first erase_buckets after restore closes it, with nothing left to destroy."""
    blobs, ids = _hours_of_data(env)
    retained = {("acme", rid): env.store.records[("acme", rid)] for rid in ids[:2]}
    env.kc.revoke("acme")
    calls = env.kms.calls.copy()
    record = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    assert record.dek_ids == tuple(ids[:2]) and env.kms.calls == calls  # nothing unwrapped
    head = env.store.get_head("acme").workspace("org-1")
    assert head.l3.record_id == "l3/org-1/1" and head.erased_before_bucket == parse_dek_id(ids[2])[1]
    env.kc.restore("acme")
    tombstones = {key: env.store.records[key] for key in retained}

    _put_back(env, retained)
    assert set(_attacker_deks("acme", retained, _rows(env)[0], _live_l1(env))) >= set(ids[:2])  # the gap
    _put_back(env, tombstones)

    closing = env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR)
    assert closing.dek_ids == () and closing.head_version == env.store.get_head("acme").version
    assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/2"
    _put_back(env, retained)
    assert set(_attacker_deks("acme", retained, _rows(env)[0], _live_l1(env))) == set(ids[2:])
    _put_back(env, tombstones)
    version = env.store.get_head("acme").version
    assert env.kc.erase_buckets("acme", "org-1", older_than=T0 + 2 * HOUR).dek_ids == ()
    assert env.store.get_head("acme").version == version  # closed: a further rerun writes nothing
    _all_open(env.keychain(), {k: v for k, v in blobs.items() if k in ("org-1/2", "org-1/3")})
