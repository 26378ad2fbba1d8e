"""Crypto-erasure and its signed evidence.

``erase_buckets`` (retention: every DEK of a bucket before a time), ``erase_workspace``
(the workspace key and every DEK under it) and ``erase_deks_below`` (every DEK up to a
floor, per workspace) destroy keys in one commit each and return an :class:`ErasureRecord`
signed by the platform key; the commit's audit record carries it verbatim. The DEK
erasures replace the workspace key in the same commit (``Rotation.rotate_l3_plan``), so a
retained copy of an erased DEK's row opens under no live key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.keychain import (
    KeyLevel,
    KeyRecord,
    KeyRecordState,
    RecordRef,
    SignedJson,
    TenantHead,
    WorkspaceHead,
    b64_in,
    time_in,
    time_out,
)
from archive_kms.errors import IntegrityError, ValidationError
from archive_kms.keys.keychain.heads import Plan, TenantHeads, workspace_of
from archive_kms.keys.keychain.ids import (
    as_ts,
    bucket_of,
    check_floor,
    check_tenant,
    check_workspace,
    dek_id,
    dt,
    parse_dek_id,
)
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain.rotation import DekSelector, Rotation, dek_order

__all__ = ["ERASURE_PURPOSE", "Erasure", "ErasureRecord"]

log = logging.getLogger(__name__)

ERASURE_PURPOSE = "erasure-record/v1"


@dataclass(frozen=True)
class ErasureRecord(SignedJson):
    """Signed evidence that keys were destroyed (crypto-erasure).

    Verifies on its own: ``ErasureRecord.from_json(data).verify(Verifier.from_public_pem(pem))``
    with the platform's public key. ``head_version`` is the keychain head version that
    recorded the erasure: a keychain found below it later has been rolled back.
    ``l3_destroyed`` is true when the workspace key itself was destroyed (the workspace is
    gone). ``floor_dek_id`` is set for scope ``floor`` (``erase_deks_below``): the newest DEK
    id the erasure covered; it is left out of the JSON otherwise.
    """

    tenant_id: str
    workspace_id: str
    scope: str  # "buckets" | "workspace" | "floor"
    dek_ids: tuple[str, ...]
    l3_destroyed: bool
    older_than: datetime | None
    reason: str
    erased_at: datetime
    head_version: int
    floor_dek_id: str | None = None  # scope "floor": the newest DEK id the erasure covered
    signer_key_id: str = ""
    signature: bytes = b""

    FORMAT = "archive_kms.erasure-record/1"

    def __repr__(self) -> str:
        return (
            f"ErasureRecord({self.tenant_id}/{self.workspace_id} {self.scope}: {len(self.dek_ids)} DEKs"
            f"{' + L3' if self.l3_destroyed else ''} at {time_out(self.erased_at)}, head v{self.head_version}, "
            f"signed by {self.signer_key_id})"
        )

    def _fields(self) -> dict[str, Any]:
        out = {
            "format": self.FORMAT,
            "tenant_id": self.tenant_id,
            "workspace_id": self.workspace_id,
            "scope": self.scope,
            "dek_ids": list(self.dek_ids),
            "l3_destroyed": self.l3_destroyed,
            "older_than": time_out(self.older_than),
            "reason": self.reason,
            "erased_at": time_out(self.erased_at),
            "head_version": self.head_version,
            "signer_key_id": self.signer_key_id,
        }
        if self.floor_dek_id is not None:  # absent otherwise: records made before it verify as they were
            out["floor_dek_id"] = self.floor_dek_id
        return out

    @classmethod
    def from_json(cls, data: bytes | str) -> ErasureRecord:
        try:
            obj = json.loads(data)
            if obj.pop("format") != cls.FORMAT:
                raise ValueError("unknown format")
            return cls(
                tenant_id=obj["tenant_id"],
                workspace_id=obj["workspace_id"],
                scope=obj["scope"],
                dek_ids=tuple(obj["dek_ids"]),
                l3_destroyed=obj["l3_destroyed"],
                older_than=time_in(obj["older_than"]),
                reason=obj["reason"],
                erased_at=time_in(obj["erased_at"]),  # type: ignore[arg-type]
                head_version=obj["head_version"],
                floor_dek_id=obj.get("floor_dek_id"),
                signer_key_id=obj["signer_key_id"],
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise IntegrityError("erasure record is malformed") from None

    def verify(self, verifier: Verifier) -> None:
        """Return if the platform signed exactly this record; ``IntegrityError`` otherwise."""
        verifier.verify(self.signing_payload(), self.signature, key_id=self.signer_key_id, purpose=ERASURE_PURPOSE)


def _wrapped_by(dek: KeyRecord, l3: RecordRef) -> bool:
    """Whether the DEK record names ``l3`` (id and generation) as its parent. A tombstone
    that still does lost its bytes here only: any retained copy of its row opens under that
    live workspace key, until the key is replaced."""
    return dek.parent_id == l3.record_id and dek.parent_version == l3.generation


def _check_floor_of(ws: WorkspaceHead, through: tuple[int, int]) -> None:
    if not ws.erased and (ws.last_dek is None or through > parse_dek_id(ws.last_dek)[1:]):
        raise ValidationError(
            f"floor {dek_id(ws.workspace_id, *through)} is newer than the newest DEK of workspace "
            f"{ws.workspace_id} ({ws.last_dek}); erase_deks_below only destroys DEKs that existed "
            "(use erase_workspace)"
        )


class Erasure:
    """Destroys DEKs and workspace keys; each call returns signed evidence."""

    def __init__(
        self,
        heads: TenantHeads,
        checks: RecordChecks,
        rotation: Rotation,
        signer: Signer,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._heads = heads
        self._checks = checks
        self._rotation = rotation
        self._signer = signer
        self._clock = clock

    def erase_buckets(
        self,
        tenant_id: str,
        workspace_id: str,
        older_than: datetime | float,
        *,
        reason: str = "retention expired",
    ) -> ErasureRecord:
        """Destroy the DEKs of every bucket that starts before ``older_than``'s bucket
        (retention). ``older_than`` may not lie in a future bucket (that would destroy the
        DEK in use: use ``erase_workspace``). Returns the signed record of the DEKs destroyed
        by this call (empty if there was nothing left).

        The same commit replaces the workspace key (as ``rotate_l3``), re-wraps the
        surviving DEKs under the new one and raises the workspace's erasure watermark, so a
        retained copy of a destroyed DEK's row (dead tuple, replica, backup) opens under no
        live key. That needs the L2 (local AES-GCM, at most 1 L1 unwrap). While the tenant
        is revoked it only destroys and raises the watermark; the first call on the
        workspace after ``restore`` replaces the key (so does one on a workspace erased
        before this behaviour existed), even with nothing left to destroy."""
        check_tenant(tenant_id)
        check_workspace(workspace_id)
        cutoff_ts = as_ts(older_than)

        def plan(head: TenantHead) -> Plan:
            ws = workspace_of(head, workspace_id)
            cutoff = bucket_of(cutoff_ts, ws.bucket_seconds)
            if cutoff > bucket_of(self._clock(), ws.bucket_seconds):
                raise ValidationError(
                    f"older_than {time_out(dt(cutoff_ts))} is in a future bucket; erase_buckets "
                    "never destroys the current DEK (use erase_workspace)"
                )
            p = self._erasure_plan(
                head, ws, lambda order: order[0] < cutoff, watermark=cutoff, replace_l3=not head.revoked
            )
            p.result = self._erasure_record(
                head, p, workspace_id, "buckets", older_than=dt(cutoff_ts), reason=reason, l3_destroyed=False
            )
            return p

        record: ErasureRecord = self._heads.write(tenant_id, plan, gate=False, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s: %d DEKs crypto-erased (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            reason,
        )
        return record

    def erase_workspace(self, tenant_id: str, workspace_id: str, *, reason: str = "workspace deleted") -> ErasureRecord:
        """Destroy the workspace's L3 key and every DEK under it; the workspace id can never
        be used again. Works while revoked. Returns the signed erasure record."""
        check_tenant(tenant_id)
        check_workspace(workspace_id)

        def plan(head: TenantHead) -> Plan:
            ws = workspace_of(head, workspace_id)
            p = Plan(result=None)
            if not ws.erased:
                for rec in self._heads.store.list_records(tenant_id, level=KeyLevel.DEK, workspace_id=workspace_id):
                    self._checks.check_dek(head, ws, rec, rec.record_id)
                    if rec.state is not KeyRecordState.DESTROYED:
                        p.records.append(self._heads.destroy(rec))
                l3_rec = self._heads.destroy(self._checks.checked_l3(head, ws))
                p.cache_drop = [r.record_id for r in p.records] + [l3_rec.record_id]
                p.records.append(l3_rec)
                p.head = head.with_workspace(
                    replace(ws, erased=True, active_dek=None, l3=replace(ws.l3, version=l3_rec.version))
                )
            p.result = self._erasure_record(
                head, p, workspace_id, "workspace", older_than=None, reason=reason, l3_destroyed=not ws.erased
            )
            return p

        record: ErasureRecord = self._heads.write(tenant_id, plan, gate=False, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s crypto-erased: %d DEKs and its L3 key (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            reason,
        )
        return record

    def erase_deks_below(
        self,
        tenant_id: str,
        floor: Mapping[str, Sequence[int]],
        *,
        reason: str = "superseded by a re-encrypted copy",
    ) -> list[ErasureRecord]:
        """Destroy, per workspace, every DEK not newer than its floor ``(bucket, generation)``
        (e.g. the migration's ``dek_floor``: the newest DEK at bind time), keeping the newer
        ones, in one commit per workspace. ``erase_buckets`` cannot do this: it cuts whole
        buckets, and the floor's bucket usually also holds DEKs made after it.

        The same commit replaces the workspace key (as ``rotate_l3``) and raises the
        workspace's erasure watermark to the floor's bucket, so a live copy of an erased DEK
        brought back from a backup names a destroyed parent and is refused
        (``KeychainTamperedError``), like one below the watermark (``KeyDestroyedError``).
        Needs the L2 (refused while revoked); a floor newer than the workspace's newest DEK
        is a ``ValidationError``. Returns one signed ``ErasureRecord`` (scope ``floor``) per
        workspace, in workspace order; a rerun destroys nothing more and returns empty ones.
        """
        check_tenant(tenant_id)
        floors = {check_workspace(ws): check_floor(ws, value) for ws, value in floor.items()}
        head = self._heads.load(tenant_id, gate=True)
        for workspace_id, through in floors.items():  # every floor checked before anything is destroyed
            _check_floor_of(workspace_of(head, workspace_id), through)
        return [self._erase_through(tenant_id, ws, floors[ws], reason) for ws in sorted(floors)]

    def _erase_through(self, tenant_id: str, workspace_id: str, through: tuple[int, int], reason: str) -> ErasureRecord:
        floor_id = dek_id(workspace_id, *through)

        def plan(head: TenantHead) -> Plan:
            ws = workspace_of(head, workspace_id)
            if not ws.erased:
                _check_floor_of(ws, through)
            # Every DEK of a bucket below the floor's is at or below the floor: the watermark
            # may rise to the floor's bucket.
            p = self._erasure_plan(head, ws, lambda order: order <= through, watermark=through[0], replace_l3=True)
            p.result = self._erasure_record(
                head,
                p,
                workspace_id,
                "floor",
                older_than=None,
                reason=reason,
                l3_destroyed=False,
                floor_dek_id=floor_id,
            )
            return p

        record: ErasureRecord = self._heads.write(tenant_id, plan, gate=True, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s: %d DEKs up to %s crypto-erased (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            floor_id,
            reason,
        )
        return record

    def _erasure_plan(
        self, head: TenantHead, ws: WorkspaceHead, doomed: DekSelector, *, watermark: int, replace_l3: bool
    ) -> Plan:
        """The commit of ``erase_buckets`` and ``erase_deks_below``: destroy the live DEKs of
        ``ws`` that ``doomed`` selects and raise the erasure watermark to ``watermark`` (every
        bucket below it must be doomed). With ``replace_l3`` the same commit replaces the
        workspace key and re-wraps the surviving DEKs (``rotate_l3_plan``), so a retained
        copy of a destroyed DEK's row opens under no live key; it does that also with
        nothing left to destroy if a tombstone still hangs under the live key (an erasure
        made without replacing it: while revoked, or by an older version). Without
        ``replace_l3`` (no L2: tenant revoked) it only destroys. ``head`` None: nothing to do."""
        if ws.erased:
            return Plan(result=None)
        deks = self._checks.verified_deks(head, ws)  # decide on verified records only
        live_doomed = [r for r in deks if r.state is not KeyRecordState.DESTROYED and doomed(dek_order(r))]
        exposed = any(r.state is KeyRecordState.DESTROYED and _wrapped_by(r, ws.l3) for r in deks)
        if replace_l3 and (live_doomed or exposed):
            p = self._rotation.rotate_l3_plan(head, ws, destroy=doomed, deks=deks)
            ws = p.head.workspace(ws.workspace_id)  # type: ignore[union-attr,assignment]
        else:
            p = Plan(result=None, records=[self._heads.destroy(r) for r in live_doomed])
            p.cache_drop = [r.record_id for r in live_doomed]
            if ws.active_dek is not None and ws.active_dek.record_id in p.cache_drop:
                ws = replace(ws, active_dek=None)
        if p.records or watermark > ws.erased_before_bucket:
            p.head = head.with_workspace(replace(ws, erased_before_bucket=max(ws.erased_before_bucket, watermark)))
        return p

    def _erasure_record(
        self,
        head: TenantHead,
        p: Plan,
        workspace_id: str,
        scope: str,
        *,
        older_than: datetime | None,
        reason: str,
        l3_destroyed: bool,
        floor_dek_id: str | None = None,
    ) -> ErasureRecord:
        destroyed = (r.record_id for r in p.records if r.level is KeyLevel.DEK and r.state is KeyRecordState.DESTROYED)
        rec = ErasureRecord(
            tenant_id=head.tenant_id,
            workspace_id=workspace_id,
            scope=scope,
            dek_ids=tuple(sorted(destroyed, key=parse_dek_id)),
            l3_destroyed=l3_destroyed,
            older_than=older_than,
            reason=reason,
            erased_at=self._heads.now(),
            head_version=head.version + 1 if p.head is not None else head.version,
            floor_dek_id=floor_dek_id,
            signer_key_id=self._signer.key_id,
        )
        rec = replace(rec, signature=self._signer.sign(rec.signing_payload(), purpose=ERASURE_PURPOSE))
        # The commit's audit record carries the signed record verbatim: verifiable from the log alone.
        p.audit_details.update(workspace_id=workspace_id, scope=scope, erasure_record=rec.to_json().decode("ascii"))
        return rec
