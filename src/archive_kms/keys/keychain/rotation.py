"""Rotation: re-wrapping L2 under a new L1 (``rotate_l1``), a new L2 (``rotate_l2``), a
new workspace key (``rotate_l3``), and replacing every key below L1 that a copy of the
keychain from before a new L1 could open (``rekey_below_l1``).

One rule (MultiFernet's): the newest key encrypts, any allowed key decrypts, rotation
re-wraps. Rotation cost is independent of the data: ``rotate_l1`` is 1 provider unwrap +
1 wrap; ``rotate_l2`` re-wraps the L3 keys, ``rotate_l3`` one workspace's DEKs, locally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from archive_kms.crypto.keychain_keys import KEY_SIZE
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.keychain import KeyRecord, KeyRecordState, RecordRef, TenantHead, WorkspaceHead
from archive_kms.keys.keychain.heads import Plan, TenantHeads, workspace_of
from archive_kms.keys.keychain.ids import check_tenant, check_workspace, l2_id, l3_id
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain.values import RekeyReport, TenantKeyStatus, status_of
from archive_kms.keys.keychain.wrapping import KeyWrapping, erased_error, open_wrapped, seal
from archive_kms.keys.port import KeyProvider

__all__ = ["DekSelector", "Rotation", "dek_order"]

log = logging.getLogger(__name__)

DekSelector = Callable[[tuple[int, int]], bool]  # picks DEKs by (bucket, generation)


def dek_order(rec: KeyRecord) -> tuple[int, int]:
    """A DEK's place in its workspace's order: (bucket, generation)."""
    return rec.bucket or 0, rec.generation


def _only_ever_under_current_parent(ref: RecordRef) -> bool:
    """Whether a live L2/L3 key's bytes were only ever stored wrapped by its current parent.
    A record's version goes up on every change, and the only change a live L2 or L3 record
    gets is a re-wrap under a new parent (``rotate_l1``, ``rotate_l2``): version 1 means
    never re-wrapped. (Any other future bump only makes ``rekey_below_l1`` do more.)"""
    return ref.version == 1


class Rotation:
    """Re-wrapping and replacing keys; each change is one atomic, audited commit."""

    def __init__(self, heads: TenantHeads, checks: RecordChecks, keys: KeyWrapping) -> None:
        self._heads = heads
        self._checks = checks
        self._keys = keys

    def _status(self, tenant_id: str) -> TenantKeyStatus:
        return status_of(self._heads.load(tenant_id, gate=False))

    def rotate_l1(self, tenant_id: str, new_l1: KeyProvider) -> TenantKeyStatus:
        """Re-wrap the tenant's L2 key under ``new_l1``: exactly 1 unwrap (old L1) + 1 wrap
        (new L1) whatever the data volume; no L3/L4 record changes. The unwrap always goes to
        the old provider, never the cache, so the stored L2 is proven to open under it."""
        check_tenant(tenant_id)

        def plan(head: TenantHead) -> Plan:
            rec = self._checks.checked_l2(head)
            self._heads.gate(tenant_id)
            l2 = self._keys.unwrap_l2_from_provider(head, rec)
            wrapped = self._keys.provider_wrap(new_l1, l2, tenant_id)
            new = self._heads.bump(
                rec,
                parent_id=new_l1.key_ref,
                parent_version=head.l1_generation + 1,
                wrap_ref=wrapped.key_ref,
                wrap_algorithm=wrapped.algorithm,
                wrapped=wrapped.ciphertext,
            )
            new_head = replace(
                head,
                l1_ref=new_l1.key_ref,
                l1_generation=head.l1_generation + 1,
                l2=replace(head.l2, version=new.version),
            )
            log.info("keychain: tenant %s L2 re-wrapped from %s to %s", tenant_id, head.l1_ref, new_l1.key_ref)
            return Plan(
                result=None,
                head=new_head,
                records=[new],
                cache_put=[(rec.record_id, l2)],
                audit_details={
                    "previous_l1_ref": head.l1_ref,
                    "l1_generation": head.l1_generation + 1,
                    "l2_id": rec.record_id,
                },
            )

        self._heads.write(tenant_id, plan, gate=True, audit_action="rotate_l1")
        return self._status(tenant_id)

    def rotate_l2(self, tenant_id: str) -> TenantKeyStatus:
        """A new L2 key (wrapped by the current L1: 1 wrap, plus 1 unwrap if the old L2 is
        not cached); every live L3 key is re-wrapped under it; the old L2 is DESTROYED.
        DEK records do not change, so existing objects keep decrypting."""
        check_tenant(tenant_id)
        self._heads.write(tenant_id, self.rotate_l2_plan, gate=True, audit_action="rotate_l2")
        return self._status(tenant_id)

    def rotate_l3(self, tenant_id: str, workspace_id: str) -> TenantKeyStatus:
        """A new workspace key (new key bytes) wrapped by the current L2; every live DEK of
        the workspace (ACTIVE and DECRYPT_ONLY) is re-wrapped under it with local AES-GCM
        (no provider call, beyond 1 L2 unwrap if the L2 is not cached); the old L3 is
        DESTROYED and dropped from this process's cache. Tombstones stay as they are. DEK
        key bytes do not change, so existing objects keep decrypting. One atomic commit."""
        check_tenant(tenant_id)
        check_workspace(workspace_id)

        def plan(head: TenantHead) -> Plan:
            ws = workspace_of(head, workspace_id)
            if ws.erased:
                raise erased_error(tenant_id, workspace_id)
            return self.rotate_l3_plan(head, ws)

        self._heads.write(tenant_id, plan, gate=True, audit_action="rotate_l3")
        return self._status(tenant_id)

    def rekey_below_l1(self, tenant_id: str) -> RekeyReport:
        """Replace every key below L1 whose bytes were ever stored under a key other than
        its current parent: the L2 (``rotate_l2``) if ``rotate_l1`` re-wrapped it since it
        was made, then the L3 of every live workspace (``rotate_l3``) made under an older
        L2. Afterwards no L2 or L3 bytes in a copy of the keychain taken before the call
        wrap anything live, so such a copy plus an old L1 opens no DEK made from now on
        (DEKs that already existed keep their bytes: erase them with ``erase_deks_below``).

        Idempotent and resumable: each replacement is one atomic commit, and a rerun after
        a crash between them (or a second call) replaces only what is still old. Costs 1
        L1 wrap (+ at most 1 unwrap) when the L2 is replaced, 0 otherwise. A new L2 means
        new search keys (``search_key_material``): call it before a keyed index is built.
        """
        check_tenant(tenant_id)

        def l2_plan(head: TenantHead) -> Plan:
            if _only_ever_under_current_parent(head.l2):
                return Plan(result=False)
            p = self.rotate_l2_plan(head)
            p.result = True
            p.audit_details["step"] = "l2"
            return p

        l2_rotated = self._heads.write(tenant_id, l2_plan, gate=True, audit_action="rekey")
        rotated: list[str] = []
        rewrapped = 0
        for workspace_id in self._status(tenant_id).workspaces:

            def l3_plan(head: TenantHead, workspace_id: str = workspace_id) -> Plan:
                ws = workspace_of(head, workspace_id)
                if ws.erased or _only_ever_under_current_parent(ws.l3):
                    return Plan(result=None)
                p = self.rotate_l3_plan(head, ws)
                p.audit_details["step"] = "l3"
                return p

            count = self._heads.write(tenant_id, l3_plan, gate=True, audit_action="rekey")
            if count is not None:
                rotated.append(workspace_id)
                rewrapped += count
        status = self._status(tenant_id)
        log.info(
            "keychain: tenant %s re-keyed below L1: L2 %s, %d workspace keys replaced, %d DEKs re-wrapped",
            tenant_id,
            "replaced" if l2_rotated else "kept",
            len(rotated),
            rewrapped,
        )
        return RekeyReport(tenant_id, bool(l2_rotated), tuple(rotated), rewrapped, status)

    # --- plans (also used by the erasures) ------------------------------------------------

    def rotate_l2_plan(self, head: TenantHead) -> Plan:
        """``rotate_l2`` as a plan: a new L2 under the current L1, the live L3 keys re-wrapped
        under it, the old L2 destroyed."""
        tenant_id = head.tenant_id
        old_rec = self._checks.checked_l2(head)
        old_l2 = self._keys.l2_key(head)
        new_l2 = SecretBytes.random(KEY_SIZE)
        self._heads.gate(tenant_id)
        wrapped = self._keys.provider_wrap(self._keys.resolve(head.l1_ref), new_l2, tenant_id)
        gen = old_rec.generation + 1
        now = self._heads.now()
        new_rec = replace(
            old_rec,
            record_id=l2_id(gen),
            generation=gen,
            wrap_ref=wrapped.key_ref,
            wrap_algorithm=wrapped.algorithm,
            wrapped=wrapped.ciphertext,
            created_at=now,
            updated_at=now,
            version=1,
            signer_key_id="",
            signature=b"",
        )
        p = Plan(result=None, records=[new_rec, self._heads.destroy(old_rec)])
        workspaces = []
        for ws in head.workspaces:
            if ws.erased:  # its L3 is a tombstone; nothing to re-wrap
                workspaces.append(ws)
                continue
            l3_rec = self._checks.checked_l3(head, ws)
            l3 = open_wrapped(old_l2, l3_rec)
            moved = self._heads.bump(
                l3_rec, parent_id=new_rec.record_id, parent_version=gen, wrap_ref=new_rec.record_id
            )
            p.records.append(replace(moved, wrapped=seal(new_l2, l3, moved)))
            workspaces.append(replace(ws, l3=replace(ws.l3, version=moved.version)))
        p.head = replace(head, l2=RecordRef(new_rec.record_id, gen, 1), workspaces=tuple(workspaces))
        p.cache_drop.append(old_rec.record_id)
        p.cache_put.append((new_rec.record_id, new_l2))
        p.audit_details.update(
            l2_id=new_rec.record_id, previous_l2_id=old_rec.record_id, l3_rewrapped=len(p.records) - 2
        )
        log.info(
            "keychain: tenant %s L2 rotated to %s; %d L3 keys re-wrapped",
            tenant_id,
            new_rec.record_id,
            len(p.records) - 2,
        )
        return p

    def rotate_l3_plan(
        self,
        head: TenantHead,
        ws: WorkspaceHead,
        *,
        destroy: DekSelector | None = None,
        deks: Sequence[KeyRecord] | None = None,
    ) -> Plan:
        """A new L3 for ``ws`` (new bytes, wrapped by the current L2), every live DEK
        re-wrapped under it, the old L3 destroyed; the plan's result is how many DEKs were
        re-wrapped. Live DEKs that ``destroy`` selects are destroyed instead of re-wrapped
        (the erasures). ``deks``: the workspace's DEK records, already verified against
        ``head`` (read here otherwise). Everything lands in one commit, so a crash leaves
        either the old or the new workspace key, never a mix."""
        tenant_id = head.tenant_id
        old_rec = self._checks.checked_l3(head, ws)
        old_l3 = self._keys.l3_key(head, ws)
        l2 = self._keys.l2_key(head)
        gen = old_rec.generation + 1
        now = self._heads.now()
        new_rec = replace(
            old_rec,
            record_id=l3_id(ws.workspace_id, gen),
            generation=gen,
            parent_id=head.l2.record_id,
            parent_version=head.l2.generation,
            wrap_ref=head.l2.record_id,
            wrapped=b"\0",  # placeholder: the AAD needs the record first
            created_at=now,
            updated_at=now,
            version=1,
            signer_key_id="",
            signature=b"",
        )
        new_l3 = SecretBytes.random(KEY_SIZE)
        new_rec = replace(new_rec, wrapped=seal(l2, new_l3, new_rec))
        p = Plan(result=0, records=[new_rec, self._heads.destroy(old_rec)])
        active = ws.active_dek
        for rec in self._checks.verified_deks(head, ws) if deks is None else deks:
            if rec.state is KeyRecordState.DESTROYED:
                continue  # a tombstone keeps its old parent: it wraps nothing
            is_active = active is not None and active.record_id == rec.record_id
            if destroy is not None and destroy(dek_order(rec)):
                p.records.append(self._heads.destroy(rec))
                p.cache_drop.append(rec.record_id)
                if is_active:
                    active = None
                continue
            moved = self._heads.bump(rec, parent_id=new_rec.record_id, parent_version=gen, wrap_ref=new_rec.record_id)
            p.records.append(replace(moved, wrapped=seal(new_l3, open_wrapped(old_l3, rec), moved)))
            p.result += 1
            if is_active and active is not None:
                active = replace(active, version=moved.version)
        p.head = head.with_workspace(replace(ws, l3=RecordRef(new_rec.record_id, gen, 1), active_dek=active))
        p.cache_drop.append(old_rec.record_id)  # nothing names it any more; never serve it again
        p.cache_put.append((new_rec.record_id, new_l3))
        p.audit_details.update(
            workspace_id=ws.workspace_id,
            l3_id=new_rec.record_id,
            previous_l3_id=old_rec.record_id,
            deks_rewrapped=p.result,
        )
        log.info(
            "keychain: tenant %s workspace %s key rotated to %s; %d DEKs re-wrapped",
            tenant_id,
            ws.workspace_id,
            new_rec.record_id,
            p.result,
        )
        return p
