"""The keychain trusts a head version only from its tenant's verified audit chain (issue 11
finding 3, ADR 0028): records whose hashes recompute, that link one to the next, and that
end at the tenant's sealed head. Before, it took the highest ``head_version`` of any
``keychain.*`` row: one inserted row locked a tenant out for good, and a deleted tail was
not noticed. A false lock has an audited override (``Keychain.unlock``).

The in-memory state store with sealed heads plays the database; the attacker edits its raw
rows (``_audit``, ``_heads``). The same rules on PostgreSQL with real roles are in
tests/contract/test_state_roles_postgres.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer
from archive_kms.domain.audit import record_hash
from archive_kms.errors import KeychainTamperedError, StateError
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import Keychain
from archive_kms.keys.keychain_store import InMemoryKeychainStore
from archive_kms.keys.memory import MemoryKms
from archive_kms.state.audit import HmacHeadSealer
from archive_kms.state.memory import InMemoryStateStore
from archive_kms.state.port import AuditEvent, AuditRecord

T0 = 1_700_000_000.0
HOUR = 3600
TENANT = "acme"


class World:
    def __init__(self) -> None:
        self.state = InMemoryStateStore(sealer=HmacHeadSealer(SecretBytes.random(32), "audit-k1"))
        self.store = InMemoryKeychainStore()
        self.kms = MemoryKms()
        self.signer = Signer.generate()
        self.now = T0

    def process(self) -> Keychain:
        """A fresh process: nothing cached, nothing remembered."""
        return Keychain(self.store, self.kms.provider, self.signer, lambda: self.now, KeyCache(), audit=self.state)

    def forge(self, *, seq: int, tenant_seq: int, prev: AuditRecord, details: dict) -> AuditRecord:
        """What someone who can INSERT into audit_log writes: a well-formed, correctly
        linked and hashed keychain record (the hash is unkeyed). He cannot seal a head."""
        fields = {
            "seq": seq,
            "ts": prev.ts,
            "actor": "keychain",
            "action": "keychain.rotate_l1",
            "tenant_id": TENANT,
            "run_id": None,
            "details": details,
            "prev_hash": prev.hash,
            "tenant_seq": tenant_seq,
            "tenant_prev_hash": prev.hash,
        }
        rec = AuditRecord(**fields, hash=record_hash(**fields))
        self.state._audit.append(rec)
        return rec

    def tenant_records(self) -> list[AuditRecord]:
        return list(self.state.iter_audit(tenant_id=TENANT))


@pytest.fixture()
def world() -> World:
    w = World()
    kc = w.process()
    kc.create_tenant(TENANT, w.kms.provider(w.kms.create_key("acme-l1")))
    kc.dek_for_encrypt(TENANT, "org1", now=T0)
    kc.retire_active_dek(TENANT, "org1")
    kc.rotate_l1(TENANT, w.kms.provider(w.kms.create_key("acme-l1b")))
    return w


def test_an_inserted_row_with_a_higher_version_neither_locks_nor_counts(world: World) -> None:
    last = world.tenant_records()[-1]
    world.forge(seq=last.seq + 1, tenant_seq=last.tenant_seq + 1, prev=last, details={"head_version": 999})
    fresh = world.process()
    assert fresh.status(TENANT).head_version < 999  # loads: the row is beyond the sealed head
    assert fresh.lock_status(TENANT)["locked"] is False
    # the forged row takes the next tenant position: appends for this tenant now conflict,
    # which is an availability problem (docs/threat-model.md), never a trusted number
    assert fresh.dek_for_encrypt(TENANT, "org1", now=T0 + HOUR).dek_id


def test_a_deleted_record_is_refused_alarmed_and_unlocked_only_by_an_audited_override(world: World) -> None:
    middle = world.tenant_records()[1]
    world.state._audit.remove(middle)
    fresh = world.process()
    with pytest.raises(KeychainTamperedError, match=r"does not verify \(it is broken at tenant record\(s\) \[2\]\)"):
        fresh.dek_for_encrypt(TENANT, "org1", now=T0 + HOUR)
    alarms = [r for r in world.tenant_records() if r.action == "alarm.keychain_audit_chain"]
    assert len(alarms) == 1 and "broken at tenant record" in alarms[0].details["message"]
    status = fresh.lock_status(TENANT)
    assert status["locked"] and status["chain_breaks"] == [2]

    with pytest.raises(Exception, match="reason"):
        fresh.unlock(TENANT, reason=" ", actor="alice")
    out = world.process().unlock(TENANT, reason="row lost in a disk repair, ticket 4711", actor="alice")
    assert out["locked"] is False and out["unlocked_by"] == "alice"
    unlock = [r for r in world.tenant_records() if r.action == "keychain.unlock"]
    assert len(unlock) == 1 and unlock[0].actor == "alice"
    assert unlock[0].details["reason"] == "row lost in a disk repair, ticket 4711"
    assert unlock[0].details["accept_chain_breaks"] == [2]
    assert world.process().dek_for_encrypt(TENANT, "org1", now=T0 + HOUR).dek_id  # a fresh process accepts it
    with pytest.raises(StateError, match="not locked"):
        world.process().unlock(TENANT, reason="again", actor="alice")


def test_an_unlock_someone_inserts_is_not_on_the_sealed_chain_and_does_nothing(world: World) -> None:
    world.state._audit.remove(world.tenant_records()[1])
    last = world.tenant_records()[-1]
    world.forge(
        seq=last.seq + 1,
        tenant_seq=last.tenant_seq + 1,
        prev=last,
        details={"accept_head_version": 1, "accept_chain_breaks": [2]},
    )
    world.state._audit[-1] = replace(world.state._audit[-1], action="keychain.unlock")
    with pytest.raises(KeychainTamperedError, match="does not verify"):
        world.process().status(TENANT)


def test_a_rewritten_head_seal_locks(world: World) -> None:
    name = f"tenant:{TENANT}"
    head = world.state._heads[name]
    world.state._heads[name] = replace(head, seal="AAAA" + head.seal[4:])
    with pytest.raises(KeychainTamperedError, match="seal does not verify"):
        world.process().status(TENANT)


def test_a_deleted_tail_with_its_head_moved_back_is_refused(world: World) -> None:
    """Someone with table-owner rights deletes the last records and moves the head back
    without the sealing key: the head's seal no longer verifies."""
    name = f"tenant:{TENANT}"
    records = world.tenant_records()
    world.state._audit.remove(records[-1])
    head = world.state._heads[name]
    world.state._heads[name] = replace(head, count=head.count - 1, head_hash=records[-2].hash)
    with pytest.raises(KeychainTamperedError, match="seal does not verify"):
        world.process().status(TENANT)


def test_a_false_rollback_lock_is_overridden_and_lists_what_it_undoes(world: World) -> None:
    kc = world.process()
    before = {k: v for k, v in world.store.heads.items()}, {k: v for k, v in world.store.records.items()}
    kc.revoke(TENANT)
    kc.restore(TENANT)
    world.store.heads.clear()
    world.store.heads.update(before[0])  # an operator restored the keychain rows from an older backup
    world.store.records.clear()
    world.store.records.update(before[1])
    world.store._versions[TENANT] = world.store.get_head(TENANT).version  # the store's own version column
    fresh = world.process()
    with pytest.raises(KeychainTamperedError, match="rolled back"):
        fresh.status(TENANT)
    status = fresh.lock_status(TENANT)
    assert status["locked"] and status["chain_problem"] is None
    out = world.process().unlock(
        TENANT, reason="restored after storage loss; revoke+restore already undone", actor="bob"
    )
    assert [u["action"] for u in out["undone"]] == ["keychain.revoke", "keychain.restore"]
    assert world.process().status(TENANT).head_version == status["head_version"]
    # later commits are audited and counted again from the accepted version on
    kc = world.process()
    kc.revoke(TENANT)
    assert world.process().status(TENANT).revoked


def test_the_unlock_record_is_an_ordinary_audit_record(world: World) -> None:
    world.state._audit.remove(world.tenant_records()[1])
    world.process().unlock(TENANT, reason="ticket 1", actor="carol")
    exported = list(world.state.export_audit(TENANT))
    assert any(d.get("action") == "keychain.unlock" for d in exported)
    event = AuditEvent("x", "y", TENANT, details={})
    assert world.state.append_audit(event).tenant_id == TENANT
