"""Workspaces and data keys: creating the L3 key of a workspace and the DEK of each time
bucket on demand, finding a DEK by the id an object header carries, retiring the active
DEK, listing DEKs, and the search material derived from the L2 key."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

from archive_kms.crypto.keychain_keys import KEY_SIZE, WRAP_ALGORITHM, derive_search_material
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.keychain import KeyLevel, KeyRecord, KeyRecordState, RecordRef, TenantHead, WorkspaceHead
from archive_kms.errors import IntegrityError
from archive_kms.keys.keychain.heads import Plan, TenantHeads, workspace_of
from archive_kms.keys.keychain.ids import (
    as_ts,
    bucket_of,
    check_tenant,
    check_workspace,
    dek_id,
    dt,
    l3_id,
    parse_dek_id,
)
from archive_kms.keys.keychain.records import Mismatch, RecordChecks
from archive_kms.keys.keychain.values import DataKey, DekInfo
from archive_kms.keys.keychain.wrapping import KeyWrapping, erased_error, scoped_refusal, seal

__all__ = ["DataKeys"]

log = logging.getLogger(__name__)


class DataKeys:
    """The keychain's everyday path: keys for encrypting and decrypting objects."""

    def __init__(
        self,
        heads: TenantHeads,
        checks: RecordChecks,
        keys: KeyWrapping,
        *,
        clock: Callable[[], float],
        bucket_seconds: int,
    ) -> None:
        self._heads = heads
        self._checks = checks
        self._keys = keys
        self._clock = clock
        self._bucket_seconds = bucket_seconds

    def create_workspace(self, tenant_id: str, workspace_id: str) -> str:
        """Create the workspace's L3 key if missing; returns its record id. ``dek_for_encrypt``
        does this on demand, so calling it is optional."""
        check_tenant(tenant_id)
        check_workspace(workspace_id)

        def plan(head: TenantHead) -> Plan:
            ws = head.workspace(workspace_id)
            if ws is not None:
                if ws.erased:
                    raise erased_error(tenant_id, workspace_id)
                return Plan(result=ws.l3.record_id)
            p = Plan(result=None)
            ws, _ = self.new_workspace(head, workspace_id, p)
            p.result = ws.l3.record_id
            p.head = head.with_workspace(ws)
            return p

        return cast("str", self._heads.write(tenant_id, plan, gate=True))

    def new_workspace(self, head: TenantHead, workspace_id: str, p: Plan) -> tuple[WorkspaceHead, SecretBytes]:
        """Add a new workspace's L3 key (wrapped by the L2) to ``p``; the head is the caller's."""
        l2 = self._keys.l2_key(head)
        l3 = SecretBytes.random(KEY_SIZE)
        now = self._heads.now()
        rec = KeyRecord(
            tenant_id=head.tenant_id,
            record_id=l3_id(workspace_id, 1),
            level=KeyLevel.WORKSPACE,
            workspace_id=workspace_id,
            bucket=None,
            generation=1,
            parent_id=head.l2.record_id,
            parent_version=head.l2.generation,
            wrap_ref=head.l2.record_id,
            wrap_algorithm=WRAP_ALGORITHM,
            wrapped=b"\0",  # placeholder: the AAD needs the record first
            state=KeyRecordState.ACTIVE,
            created_at=now,
            not_after=None,
            updated_at=now,
            version=1,
        )
        p.records.append(replace(rec, wrapped=seal(l2, l3, rec)))
        p.cache_put.append((rec.record_id, l3))
        log.info("keychain: tenant %s workspace %s created", head.tenant_id, workspace_id)
        ws = WorkspaceHead(workspace_id, RecordRef(rec.record_id, 1, 1), bucket_seconds=self._bucket_seconds)
        return ws, l3

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK for ``now``'s bucket, creating it (and the workspace key) on demand.

        When a new bucket starts, its DEK is created and the previous one becomes
        DECRYPT_ONLY. A ``now`` behind the newest DEK (clock skew between workers) gets the
        newest DEK: data lands in a later bucket and is erased later, never earlier.
        """
        check_tenant(tenant_id)
        check_workspace(workspace_id)
        ts = self._clock() if now is None else as_ts(now)

        def fast(head: TenantHead) -> DataKey | None:
            ws = head.workspace(workspace_id)
            if ws is None:
                return None
            if ws.erased:
                raise erased_error(tenant_id, workspace_id)
            active = ws.active_dek
            if active is not None and parse_dek_id(active.record_id)[1] >= bucket_of(ts, ws.bucket_seconds):
                return DataKey(active.record_id, self._keys.dek_key(head, active.record_id))
            return None

        found = self._heads.read(tenant_id, fast, fresh=True)  # new data: never a DEK retired meanwhile
        if found is not None:
            return found

        def plan(head: TenantHead) -> Plan:
            existing = fast(head)  # another worker may have created it meanwhile
            if existing is not None:
                return Plan(result=existing)
            p = Plan(result=None)
            ws = head.workspace(workspace_id)
            if ws is None:
                ws, l3 = self.new_workspace(head, workspace_id, p)
            else:
                l3 = self._keys.l3_key(head, ws)
            bucket = max(bucket_of(ts, ws.bucket_seconds), ws.erased_before_bucket)
            refused = scoped_refusal(head, ws, bucket, f"workspace {workspace_id}")
            if refused is not None:
                raise refused
            generation = 1
            if ws.last_dek is not None:
                _, last_bucket, last_gen = parse_dek_id(ws.last_dek)
                bucket = max(bucket, last_bucket)  # DEK ids only grow
                if bucket == last_bucket:
                    generation = last_gen + 1
            new_id = dek_id(workspace_id, bucket, generation)
            now_dt = self._heads.now()
            rec = KeyRecord(
                tenant_id=tenant_id,
                record_id=new_id,
                level=KeyLevel.DEK,
                workspace_id=workspace_id,
                bucket=bucket,
                generation=generation,
                parent_id=ws.l3.record_id,
                parent_version=ws.l3.generation,
                wrap_ref=ws.l3.record_id,
                wrap_algorithm=WRAP_ALGORITHM,
                wrapped=b"\0",  # placeholder, replaced below (the AAD needs the record)
                state=KeyRecordState.ACTIVE,
                created_at=now_dt,
                not_after=dt((bucket + 1) * ws.bucket_seconds),
                updated_at=now_dt,
                version=1,
            )
            dek = SecretBytes.random(KEY_SIZE)
            p.records.append(replace(rec, wrapped=seal(l3, dek, rec)))
            if ws.active_dek is not None:
                old = self._checks.checked_dek(head, ws, ws.active_dek.record_id)
                p.records.append(self._heads.bump(old, state=KeyRecordState.DECRYPT_ONLY))
            ws = replace(ws, active_dek=RecordRef(new_id, generation, 1), last_dek=new_id)
            p.head = head.with_workspace(ws)
            p.cache_put.append((new_id, dek))
            p.result = DataKey(new_id, SecretBytes(dek.reveal()))
            log.info("keychain: tenant %s new active DEK %s", tenant_id, new_id)
            return p

        return cast("DataKey", self._heads.write(tenant_id, plan, gate=True))

    def dek_by_id(self, tenant_id: str, dek_id: str) -> SecretBytes:
        """The DEK named in an object header, for decryption (ACTIVE or DECRYPT_ONLY).

        Raises ``KeyDestroyedError`` if it was crypto-erased, ``TenantRevokedError`` if the
        tenant is revoked, ``KeyNotFoundError`` for an unknown id, ``KeychainTamperedError``
        if a record on the way fails its signature or binding checks.
        """
        check_tenant(tenant_id)
        parse_dek_id(dek_id)
        return self._heads.read(tenant_id, lambda head: self._keys.dek_key(head, dek_id))

    def dek_for_header(self, header: Any) -> SecretBytes:
        """``dek_by_id`` for an object envelope header (``crypto.envelope.EnvelopeHeader``):
        pass ``dek_for=keychain.dek_for_header`` to the envelope's decrypt functions. The
        header's workspace must be the one its DEK id names."""
        if parse_dek_id(header.dek_id)[0] != header.workspace_id:
            raise IntegrityError(
                f"object header names workspace {header.workspace_id} but DEK {header.dek_id}",
                resource=f"keychain:{header.tenant_id}/{header.dek_id}",
            )
        return self.dek_by_id(header.tenant_id, header.dek_id)

    def search_key_material(self, tenant_id: str) -> SecretBytes:
        """Key material for the tenant's search keys (``search.derive_search_keys``):
        HKDF of the L2 key under its own label, so index tokens and display ciphertext
        die with the tenant key (revocation refuses it like any unwrap), and a new L2
        means a new index generation."""
        check_tenant(tenant_id)

        def derive(head: TenantHead) -> SecretBytes:
            return derive_search_material(self._keys.l2_key(head), tenant_id, head.l2.record_id)

        return self._heads.read(tenant_id, derive)

    def retire_active_dek(self, tenant_id: str, workspace_id: str) -> str | None:
        """Make the workspace's active DEK DECRYPT_ONLY now (e.g. suspected exposure); the
        next ``dek_for_encrypt`` creates the next generation. Returns the retired id."""
        check_tenant(tenant_id)
        check_workspace(workspace_id)

        def plan(head: TenantHead) -> Plan:
            ws = workspace_of(head, workspace_id)
            if ws.active_dek is None:
                return Plan(result=None)
            old = self._checks.checked_dek(head, ws, ws.active_dek.record_id)
            return Plan(
                result=old.record_id,
                head=head.with_workspace(replace(ws, active_dek=None)),
                records=[self._heads.bump(old, state=KeyRecordState.DECRYPT_ONLY)],
                audit_details={"workspace_id": workspace_id, "dek_id": old.record_id},
            )

        return cast("str | None", self._heads.write(tenant_id, plan, gate=True, audit_action="retire_dek"))

    def list_deks(self, tenant_id: str, workspace_id: str | None = None) -> list[DekInfo]:
        """Every DEK (tombstones included), each verified; works while revoked."""
        check_tenant(tenant_id)
        if workspace_id is not None:
            check_workspace(workspace_id)

        def read(head: TenantHead) -> list[DekInfo]:
            out = []
            for rec in self._heads.store.list_records(tenant_id, level=KeyLevel.DEK, workspace_id=workspace_id):
                ws = head.workspace(rec.workspace_id or "")
                if ws is None:
                    raise Mismatch(tenant_id, rec.record_id, "DEK of a workspace the head does not know")
                self._checks.check_dek(head, ws, rec, rec.record_id)
                out.append(
                    DekInfo(
                        rec.record_id,
                        ws.workspace_id,
                        rec.bucket or 0,
                        rec.generation,
                        rec.state,
                        rec.created_at,
                        rec.not_after,
                    )
                )
            return sorted(out, key=lambda d: (d.workspace_id, d.bucket, d.generation))

        return self._heads.read(tenant_id, read, gate=False)

    def reencrypt_path(self, tenant_id: str, workspace_id: str | None = None) -> list[str]:
        """The hook for a full re-encryption (a DEK or L3 key is believed compromised):
        every DEK id that can still decrypt, oldest first. The copy machinery decrypts each
        object under its header's DEK id, re-encrypts it with ``dek_for_encrypt`` into a
        *new workspace id*, verifies, then calls ``erase_workspace`` on the old one.
        (Rotating L1 or L2 needs no re-encryption: they are re-wrapped.)"""
        return [d.dek_id for d in self.list_deks(tenant_id, workspace_id) if d.state is not KeyRecordState.DESTROYED]
