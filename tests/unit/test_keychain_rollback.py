"""A rolled-back keychain is refused by a fresh process (security review PoC 1a), and every
committed head change is in the audit log (ADR 0007, docs/key-hierarchy.md section 7).

The attacker here has write access to the keychain rows (not to the audit log, whose
rollback the audit anchors catch: tests/contract/test_audit_anchors.py). He copies the
rows, lets the platform erase / revoke, then writes the old rows back. Every row he
restores carries a valid signature. A "process" is a new ``Keychain`` over the same store
and audit log with an empty cache and no memory of head versions: a CLI call or a new
Dask/Prefect worker.

The in-memory store and audit log run here; tests/contract/test_keychain_store_sql.py
reruns every test on SQLite and PostgreSQL by overriding the ``world`` fixture.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from archive_kms.crypto.envelope import ObjectBinding, decrypt_to_bytes, encrypt_bytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import (
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    ServiceUnavailableError,
    TenantRevokedError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import ErasureRecord, Keychain, bucket_of
from archive_kms.keys.keychain_store import InMemoryKeychainStore, KeychainStore, TenantHead
from archive_kms.keys.memory import MemoryKms
from archive_kms.state.memory import InMemoryStateStore
from archive_kms.state.port import AuditEvent, AuditLog, AuditRecord

HOUR = 3600
T0 = 1_700_000_000.0
TENANT = "acme"

Rows = tuple[dict[Any, bytes], dict[Any, bytes]]


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """What outlives a process: the keychain rows, the audit log, the KMS, the signing key.
    ``store`` exposes its raw rows as ``records`` / ``heads`` mappings (in memory, or live
    views onto the SQL rows), which is how the attacker reads and writes them."""

    def __init__(self, store: KeychainStore, audit: AuditLog) -> None:
        self.store: Any = store
        self.audit = audit
        self.clock = FakeClock()
        self.kms = MemoryKms()
        self.signer = Signer.generate()

    def process(self, *, audit: AuditLog | None = None, **kwargs: Any) -> Keychain:
        """A fresh process: new keychain, new cache, nothing remembered."""
        return Keychain(
            self.store,
            self.kms.provider,
            self.signer,
            self.clock,
            KeyCache(ttl_seconds=60, clock=self.clock),
            audit=audit or self.audit,
            **kwargs,
        )

    def backup(self) -> Rows:
        """The attacker's copy of every keychain row (a backup, a replica, a SELECT)."""
        return (
            {k: self.store.records[k] for k in list(self.store.records)},
            {k: self.store.heads[k] for k in list(self.store.heads)},
        )

    def restore(self, rows: Rows) -> None:
        """Write the copy back: rows made since are deleted, the others overwritten."""
        for live, old in zip((self.store.records, self.store.heads), rows, strict=True):
            for key in [k for k in list(live) if k not in old]:
                del live[key]
            for key, body in old.items():
                live[key] = body

    def keychain_audit(self, tenant_id: str = TENANT) -> list[AuditRecord]:
        return [r for r in self.audit.iter_audit(tenant_id=tenant_id) if r.action.startswith("keychain.")]


@pytest.fixture()
def world() -> Iterator[World]:
    yield World(InMemoryKeychainStore(), InMemoryStateStore())


class FlakyAudit:
    """The audit log, with appends failing while ``down`` (the database went away between
    the keychain commit and the audit append)."""

    def __init__(self, real: AuditLog) -> None:
        self.real = real
        self.down = False

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        if self.down:
            raise ServiceUnavailableError("audit log unavailable (test)")
        return self.real.append_audit(event)

    def iter_audit(self, **kwargs: Any) -> Iterator[AuditRecord]:
        return self.real.iter_audit(**kwargs)

    def audit_head(self, **kwargs: Any) -> Any:
        return self.real.audit_head(**kwargs)


def _tenant(world: World) -> Keychain:
    kc = world.process()
    kc.create_tenant(TENANT, world.kms.provider(world.kms.create_key("acme-l1")))
    return kc


def _encrypt(kc: Keychain, ws: str, name: bytes, data: bytes) -> bytes:
    dek = kc.dek_for_encrypt(TENANT, ws)
    return encrypt_bytes(data, dek=dek.key, dek_id=dek.dek_id, binding=ObjectBinding(TENANT, ws, name))


def _decrypt(kc: Keychain, ws: str, name: bytes, blob: bytes) -> bytes:
    return decrypt_to_bytes(blob, binding=ObjectBinding(TENANT, ws, name), dek_for=kc.dek_for_header)


# --- rollback -------------------------------------------------------------------------------


def test_fresh_process_refuses_a_keychain_rolled_back_to_before_an_erasure(world: World) -> None:
    """PoC 1a: the erased DEK does not come back through an old copy of the keychain."""
    kc = _tenant(world)
    blob = _encrypt(kc, "org1", b"records/org1/001", b"SECRET: payroll 2023")
    old_dek = kc.dek_for_encrypt(TENANT, "org1").dek_id
    backup = world.backup()

    world.clock.t += 3 * HOUR
    kc.dek_for_encrypt(TENANT, "org1")  # a newer bucket exists
    erased = kc.erase_buckets(TENANT, "org1", world.clock.t)
    assert erased.dek_ids == (old_dek,)
    with pytest.raises(KeyDestroyedError):
        world.process().dek_by_id(TENANT, old_dek)

    world.restore(backup)  # every restored row is validly signed
    fresh = world.process()
    with pytest.raises(KeychainTamperedError) as refused:
        fresh.dek_by_id(TENANT, old_dek)
    head = TenantHead.from_json(backup[1][TENANT])
    assert (
        f"keychain of tenant {TENANT} is at version {head.version} but the audit log recorded version "
        f"{erased.head_version}: rolled back"
    ) in str(refused.value)
    with pytest.raises(KeychainTamperedError):
        _decrypt(world.process(), "org1", b"records/org1/001", blob)
    with pytest.raises(KeychainTamperedError):  # nothing answers from the old keychain, not even status
        world.process().status(TENANT)
    with pytest.raises(KeychainTamperedError):  # nor the process that erased (its own mark, or the log's)
        kc.dek_by_id(TENANT, old_dek)


def test_fresh_process_refuses_a_keychain_rolled_back_to_before_a_revoke(world: World) -> None:
    kc = _tenant(world)
    blob = _encrypt(kc, "org1", b"a", b"customer data")
    backup = world.backup()
    kc.revoke(TENANT)
    with pytest.raises(TenantRevokedError):
        _decrypt(world.process(), "org1", b"a", blob)

    world.restore(backup)  # the signed head from before the revoke: revoked=False
    assert TenantHead.from_json(world.store.heads[TENANT]).revoked is False
    with pytest.raises(KeychainTamperedError, match="rolled back"):
        _decrypt(world.process(), "org1", b"a", blob)
    with pytest.raises(KeychainTamperedError, match="rolled back"):
        world.process().dek_for_encrypt(TENANT, "org1")


def test_a_long_running_process_catches_a_rollback_below_what_the_log_later_recorded(world: World) -> None:
    """The worker loaded the tenant before another process revoked it; the attacker rolls the
    keychain back to exactly what the worker saw. Its own high-water mark cannot tell; the
    audit log, re-read incrementally, can."""
    _tenant(world)
    worker = world.process(audit_refresh_seconds=0)
    worker.status(TENANT)
    backup = world.backup()
    world.process().revoke(TENANT)
    world.restore(backup)
    with pytest.raises(KeychainTamperedError, match="rolled back"):
        worker.status(TENANT)


def test_a_deleted_keychain_is_refused_and_not_created_again(world: World) -> None:
    _tenant(world)
    del world.store.heads[TENANT]
    fresh = world.process()
    with pytest.raises(KeychainTamperedError, match="is missing but the audit log recorded version 1"):
        fresh.status(TENANT)
    with pytest.raises(KeychainTamperedError, match="is missing"):
        fresh.create_tenant(TENANT, world.kms.provider(world.kms.create_key("acme-l1-again")))


def test_dek_creation_is_not_audited_and_a_head_ahead_by_it_is_accepted(world: World) -> None:
    """ADR 0007: hourly DEKs bump the head version but write no audit record; the next
    audited change vouches for them."""
    kc = _tenant(world)
    for h in range(5):
        world.clock.t = T0 + h * HOUR
        kc.dek_for_encrypt(TENANT, "org1")
    kc.create_workspace(TENANT, "org2")
    assert world.store.get_head(TENANT).version == 7
    assert [(r.action, r.details["head_version"]) for r in world.keychain_audit()] == [("keychain.create", 1)]
    assert world.process().status(TENANT).head_version == 7  # ahead of the log by DEK commits: fine
    assert len(world.keychain_audit()) == 1  # and nothing "recovered"
    world.process().revoke(TENANT)
    assert [(r.action, r.details["head_version"]) for r in world.keychain_audit()][-1] == ("keychain.revoke", 8)


# --- the audit trail ----------------------------------------------------------------------


def test_every_security_change_of_the_head_is_audited_without_key_material(world: World) -> None:
    kc = _tenant(world)
    keys = [kc.dek_for_encrypt(TENANT, ws).key.reveal() for ws in ("org1", "org2")]
    expected = [("keychain.create", 1)]

    def step(action: str, fn: Any) -> None:
        fn()
        expected.append((action, world.store.get_head(TENANT).version))

    step("keychain.rotate_l1", lambda: kc.rotate_l1(TENANT, world.kms.provider(world.kms.create_key("byok"))))
    step("keychain.rotate_l2", lambda: kc.rotate_l2(TENANT))
    step("keychain.rotate_l3", lambda: kc.rotate_l3(TENANT, "org1"))
    step("keychain.retire_dek", lambda: kc.retire_active_dek(TENANT, "org1"))
    kc.rotate_l1(TENANT, world.kms.provider(world.kms.create_key("byok-2")))
    expected.append(("keychain.rotate_l1", world.store.get_head(TENANT).version))
    before = world.store.get_head(TENANT).version
    kc.rekey_below_l1(TENANT)  # one commit for the L2, one per workspace made under the old L2
    expected += [("keychain.rekey", before + 1), ("keychain.rekey", before + 2), ("keychain.rekey", before + 3)]
    step("keychain.revoke", lambda: kc.revoke(TENANT))
    step("keychain.restore", lambda: kc.restore(TENANT))
    step("keychain.erase", lambda: kc.erase_workspace(TENANT, "org2"))

    records = world.keychain_audit()
    assert [(r.action, r.details["head_version"]) for r in records] == expected
    head = world.store.get_head(TENANT)
    assert ("keychain." + head.audited_change.action, head.audited_change.version) == expected[-1]
    assert [r.details["step"] for r in records if r.action == "keychain.rekey"] == ["l2", "l3", "l3"]
    assert all(
        r.actor == "keychain"
        and r.tenant_id == TENANT
        and r.details["tenant_id"] == TENANT
        and r.details["l1_ref"].startswith("memory://")
        for r in records
    )
    assert records[1].details["previous_l1_ref"] == "memory://acme-l1"
    # ids, versions and counts only: no wrapped bytes, no key bytes in any form
    text = json.dumps([r.details for r in records])
    assert not {"wrapped", "key", "signature"} & {k for r in records for k in r.details}
    for raw in list(world.store.records.values()):
        wrapped = json.loads(raw)["wrapped"]
        assert not wrapped or wrapped not in text
    for key in keys:
        assert key.hex() not in text and base64.b64encode(key).decode() not in text


def test_erasure_records_are_in_the_audit_log_and_verify_with_the_public_key(world: World) -> None:
    kc = _tenant(world)
    for h in range(3):
        world.clock.t = T0 + h * HOUR
        for ws in ("org1", "org2", "org3"):
            kc.dek_for_encrypt(TENANT, ws)
    made = [
        kc.erase_buckets(TENANT, "org1", T0 + 2 * HOUR),
        kc.erase_workspace(TENANT, "org2"),
        *kc.erase_deks_below(TENANT, {"org3": (bucket_of(T0 + HOUR, HOUR), 1)}),
    ]
    assert kc.erase_workspace(TENANT, "org2").dek_ids == ()  # a repeat commits nothing, audits nothing

    logged = [r for r in world.keychain_audit() if r.action == "keychain.erase"]
    assert [r.details["scope"] for r in logged] == ["buckets", "workspace", "floor"]
    # buckets and floor replaced the workspace key in the same commit, and say so as rotate_l3 does
    assert [tuple(r.details.get(k) for k in ("previous_l3_id", "l3_id", "deks_rewrapped")) for r in logged] == [
        ("l3/org1/1", "l3/org1/2", 1),
        (None, None, None),
        ("l3/org3/1", "l3/org3/2", 1),
    ]
    customer = Verifier.from_public_pem(world.signer.public_key_pem())  # all a customer needs
    assert [len(r.dek_ids) for r in made] == [2, 3, 2]
    for rec, returned in zip(logged, made, strict=True):
        erasure = ErasureRecord.from_json(rec.details["erasure_record"])
        erasure.verify(customer)
        assert erasure == returned and rec.details["head_version"] == erasure.head_version
        assert rec.details["workspace_id"] == erasure.workspace_id
        edited = json.loads(rec.details["erasure_record"])
        edited["dek_ids"] = edited["dek_ids"][1:]  # hide one destroyed DEK
        with pytest.raises(IntegrityError):
            ErasureRecord.from_json(json.dumps(edited)).verify(customer)


# --- crash between the commit and the audit append ----------------------------------------


def test_head_ahead_of_the_audit_log_is_accepted_and_its_record_written_by_a_fresh_process(world: World) -> None:
    _tenant(world)
    flaky = FlakyAudit(world.audit)
    crashed = world.process(audit=flaky)  # type: ignore[arg-type]
    crashed.status(TENANT)
    flaky.down = True
    with pytest.raises(ServiceUnavailableError):
        crashed.revoke(TENANT)  # committed; the audit append failed, then the process died
    del crashed
    assert [r.action for r in world.keychain_audit()] == ["keychain.create"]
    version = world.store.get_head(TENANT).version

    fresh = world.process()
    assert fresh.status(TENANT).revoked  # accepted
    records = world.keychain_audit()
    assert [(r.action, r.details["head_version"], r.details.get("recovered")) for r in records] == [
        ("keychain.create", 1, None),
        ("keychain.revoke", version, True),
    ]
    world.process().status(TENANT)
    assert len(world.keychain_audit()) == 2  # repaired once, not on every load
    backup = world.backup()
    world.process().restore(TENANT)
    world.restore(backup)  # and the recovered record now protects what it stands for
    with pytest.raises(KeychainTamperedError, match="rolled back"):
        world.process().status(TENANT)


def test_an_audit_append_that_failed_is_written_in_full_by_the_next_call_of_the_same_process(world: World) -> None:
    kc = _tenant(world)
    for h in range(2):
        world.clock.t = T0 + h * HOUR
        kc.dek_for_encrypt(TENANT, "org1")
    flaky = FlakyAudit(world.audit)
    worker = world.process(audit=flaky)  # type: ignore[arg-type]
    flaky.down = True
    with pytest.raises(ServiceUnavailableError):
        worker.erase_buckets(TENANT, "org1", T0 + HOUR)
    flaky.down = False
    assert worker.erase_buckets(TENANT, "org1", T0 + HOUR).dek_ids == ()  # the retry: already erased

    erase = [r for r in world.keychain_audit() if r.action == "keychain.erase"]
    assert len(erase) == 1 and "recovered" not in erase[0].details  # the kept event, signed record and all
    erasure = ErasureRecord.from_json(erase[0].details["erasure_record"])
    erasure.verify(world.signer.verifier())
    assert erasure.dek_ids == (f"l4/org1/{bucket_of(T0, HOUR)}/1",)
    assert erasure.head_version == world.store.get_head(TENANT).version


def test_a_head_signed_before_audited_changes_existed_still_loads(world: World) -> None:
    """Heads written before ``audited_change`` lack the field; they verify and load."""
    from dataclasses import replace

    kc = _tenant(world)
    head = world.store.get_head(TENANT)
    unsigned = replace(head, audited_change=None, signer_key_id=world.signer.key_id, signature=b"")
    legacy = replace(unsigned, signature=world.signer.sign(unsigned.signing_payload(), purpose="keychain-head/v1"))
    assert b"audited_change" not in legacy.to_json()
    assert TenantHead.from_json(legacy.to_json()).to_json() == legacy.to_json()
    world.store.heads[TENANT] = legacy.to_json()
    assert world.process().status(TENANT).head_version == head.version
    assert kc.status(TENANT).head_version == head.version


def test_the_in_memory_platform_wires_the_audit_log_into_the_keychain() -> None:
    from archive_kms.operations.platform import Platform
    from archive_kms.operations.tenants import create_tenant

    p = Platform.in_memory()
    create_tenant(p, TENANT, provision_storage=False)
    p.keychain.revoke(TENANT)
    assert [r.action for r in p.state.iter_audit(tenant_id=TENANT)] == [
        "keychain.create",
        "tenant.create",
        "keychain.revoke",
    ]
    assert p.state.verify_audit(tenant_id=TENANT).ok
