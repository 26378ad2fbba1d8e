"""Signing keychain records and heads, and checking each loaded record against the head
that names it: signature, tenant and id binding, version, state and parent. A record
that disagrees raises :class:`Mismatch` (the caller re-reads the head: a concurrent commit,
or tampering if the head did not move)."""

from __future__ import annotations

import logging
from dataclasses import replace

from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.keychain import KeyLevel, KeyRecord, KeyRecordState, TenantHead, WorkspaceHead
from archive_kms.errors import IntegrityError, KeychainTamperedError, KeyNotFoundError
from archive_kms.keys.keychain.ids import parse_dek_id
from archive_kms.keys.keychain_store import KeychainStore

__all__ = ["HEAD_PURPOSE", "RECORD_PURPOSE", "Mismatch", "RecordChecks", "expect"]

log = logging.getLogger(__name__)

RECORD_PURPOSE = "keychain-record/v1"
HEAD_PURPOSE = "keychain-head/v1"


class Mismatch(Exception):
    """A record disagrees with the head it was checked against: a concurrent commit (re-read
    the head and retry) or tampering (the head did not move)."""

    def __init__(self, tenant_id: str, record_id: str, message: str) -> None:
        super().__init__(message)
        self.resource = f"keychain:{tenant_id}/{record_id}"
        self.message = f"tenant {tenant_id}, {record_id}: {message}"


def expect(cond: bool, rec: KeyRecord, message: str) -> None:
    if not cond:
        raise Mismatch(rec.tenant_id, rec.record_id, message)


class RecordChecks:
    """Signs what the keychain commits; loads and checks what it reads."""

    def __init__(self, store: KeychainStore, signer: Signer, verifier: Verifier) -> None:
        self._store = store
        self.signer = signer
        self.verifier = verifier

    # --- signatures ----------------------------------------------------------------------

    def verify(self, payload: bytes, signature: bytes, key_id: str, purpose: str, resource: str) -> None:
        try:
            self.verifier.verify(payload, signature, key_id=key_id, purpose=purpose)
        except IntegrityError as exc:
            log.error("keychain: tampering detected: %s: %s", resource, exc)
            raise KeychainTamperedError(f"{resource}: {exc}", resource=resource) from None

    def verify_head(self, head: TenantHead, resource: str) -> None:
        self.verify(head.signing_payload(), head.signature, head.signer_key_id, HEAD_PURPOSE, resource)

    def sign_record(self, rec: KeyRecord) -> KeyRecord:
        unsigned = replace(rec, signer_key_id=self.signer.key_id, signature=b"")
        return replace(unsigned, signature=self.signer.sign(unsigned.signing_payload(), purpose=RECORD_PURPOSE))

    def sign_head(self, head: TenantHead) -> TenantHead:
        unsigned = replace(head, signer_key_id=self.signer.key_id, signature=b"")
        return replace(unsigned, signature=self.signer.sign(unsigned.signing_payload(), purpose=HEAD_PURPOSE))

    # --- records against the head ----------------------------------------------------------

    def record(self, tenant_id: str, record_id: str) -> KeyRecord:
        rec = self._store.get_record(tenant_id, record_id)
        if rec is None:
            raise Mismatch(tenant_id, record_id, "record named by the head is missing")
        self.check_signed(tenant_id, record_id, rec)
        return rec

    def check_signed(self, tenant_id: str, record_id: str, rec: KeyRecord) -> None:
        resource = f"keychain:{tenant_id}/{record_id}"
        self.verify(rec.signing_payload(), rec.signature, rec.signer_key_id, RECORD_PURPOSE, resource)
        if rec.tenant_id != tenant_id or rec.record_id != record_id:
            log.error("keychain: tampering detected: %s holds %s/%s", resource, rec.tenant_id, rec.record_id)
            raise KeychainTamperedError(
                f"{resource}: the stored record belongs to tenant {rec.tenant_id}, id {rec.record_id} (swapped)",
                resource=resource,
            )

    def checked_l2(self, head: TenantHead) -> KeyRecord:
        ref = head.l2
        rec = self.record(head.tenant_id, ref.record_id)
        expect(rec.level is KeyLevel.TENANT and rec.generation == ref.generation, rec, "not the head's L2 key")
        expect(rec.version == ref.version, rec, f"record version {rec.version}, head says {ref.version} (replayed)")
        expect(rec.state is KeyRecordState.ACTIVE, rec, f"L2 key is {rec.state.value}, head says active")
        expect(
            rec.parent_id == head.l1_ref and rec.parent_version == head.l1_generation,
            rec,
            "wrapped by another L1 than the head's",
        )
        return rec

    def checked_l3(self, head: TenantHead, ws: WorkspaceHead) -> KeyRecord:
        ref = ws.l3
        rec = self.record(head.tenant_id, ref.record_id)
        expect(
            rec.level is KeyLevel.WORKSPACE
            and rec.workspace_id == ws.workspace_id
            and rec.generation == ref.generation,
            rec,
            "not the head's workspace key",
        )
        expect(rec.version == ref.version, rec, f"record version {rec.version}, head says {ref.version} (replayed)")
        expect(rec.state is KeyRecordState.ACTIVE, rec, f"workspace key is {rec.state.value}, head says active")
        expect(
            rec.parent_id == head.l2.record_id and rec.parent_version == head.l2.generation,
            rec,
            "wrapped by another L2 than the head's",
        )
        return rec

    def checked_dek(self, head: TenantHead, ws: WorkspaceHead, record_id: str) -> KeyRecord:
        rec = self._store.get_record(head.tenant_id, record_id)
        if rec is None:
            # DEK ids are sparse (hours without data have none), so a missing id is unknown,
            # not evidence of tampering; commits are atomic, so it is not a race either.
            raise KeyNotFoundError(
                f"tenant {head.tenant_id} has no DEK {record_id}", resource=f"keychain:{head.tenant_id}/{record_id}"
            )
        self.check_dek(head, ws, rec, record_id)
        return rec

    def check_dek(self, head: TenantHead, ws: WorkspaceHead, rec: KeyRecord, record_id: str) -> None:
        """A DEK record's signature, binding and state against the head."""
        self.check_signed(head.tenant_id, record_id, rec)
        w, bucket, gen = parse_dek_id(record_id)
        expect(
            rec.level is KeyLevel.DEK
            and rec.workspace_id == w == ws.workspace_id
            and rec.bucket == bucket
            and rec.generation == gen,
            rec,
            "DEK record fields do not match its id",
        )
        expect(
            ws.last_dek is not None and (bucket, gen) <= parse_dek_id(ws.last_dek)[1:],
            rec,
            "DEK newer than the newest the head knows",
        )
        if rec.state is not KeyRecordState.DESTROYED:
            # A tombstone's parent no longer matters; a live DEK must hang under the head's L3.
            expect(
                rec.parent_id == ws.l3.record_id and rec.parent_version == ws.l3.generation,
                rec,
                "wrapped by another workspace key than the head's",
            )
        if ws.erased or bucket < ws.erased_before_bucket:
            expect(
                rec.state is KeyRecordState.DESTROYED,
                rec,
                f"DEK is {rec.state.value} but the head records it as crypto-erased (replayed)",
            )
        active = ws.active_dek
        if active is not None and active.record_id == record_id:
            expect(
                rec.version == active.version and rec.state is KeyRecordState.ACTIVE,
                rec,
                f"active DEK at version {rec.version} ({rec.state.value}), head says {active.version} (replayed)",
            )
        else:
            expect(
                rec.state is not KeyRecordState.ACTIVE,
                rec,
                "DEK claims ACTIVE but the head's active DEK is another (replayed)",
            )

    def verified_deks(self, head: TenantHead, ws: WorkspaceHead) -> list[KeyRecord]:
        """Every DEK record of ``ws`` (tombstones included), each checked against the head."""
        deks = self._store.list_records(head.tenant_id, level=KeyLevel.DEK, workspace_id=ws.workspace_id)
        for rec in deks:
            self.check_dek(head, ws, rec, rec.record_id)
        return deks
