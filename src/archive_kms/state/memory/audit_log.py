"""The hash-chained audit log in memory (``AuditLog``); ``_audit`` and ``_heads`` are
the raw rows, which tests edit to play an attacker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from archive_kms.errors import ConfigurationError, StateError
from archive_kms.state import audit as chain
from archive_kms.state._common import check_id
from archive_kms.state.memory.tables import MemoryTables, _copy_audit
from archive_kms.state.port import AuditEvent, AuditHead, AuditRecord, AuditVerification
from archive_kms.state.schema import RUN_ID

__all__ = ["MemoryAuditLog"]


class MemoryAuditLog(MemoryTables):
    """``AuditLog`` in memory."""

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        check_id("audit actor", event.actor, 255)
        check_id("audit action", event.action, 128)
        if event.tenant_id is not None:
            check_id("tenant id", event.tenant_id, 128)
        if event.run_id is not None:
            check_id("run id", event.run_id, RUN_ID)
        details = json.loads(chain.canonical_json(dict(event.details)))
        with self._lock:
            head = self._heads.get(chain.GLOBAL_CHAIN)
            if head is None:
                raise StateError(
                    "the audit chain head is missing: run `archive-kms audit verify`", resource="audit:global"
                )
            t_name = None if event.tenant_id is None else chain.tenant_chain(event.tenant_id)
            t_head = None if t_name is None else self._heads.get(t_name)
            fields: dict[str, Any] = {
                "seq": head.count + 1,
                "ts": self._now(),
                "actor": event.actor,
                "action": event.action,
                "tenant_id": event.tenant_id,
                "run_id": event.run_id,
                "details": details,
                "prev_hash": head.head_hash,
                "tenant_seq": None if t_name is None else (t_head.count + 1 if t_head else 1),
                "tenant_prev_hash": None if t_name is None else (t_head.head_hash if t_head else chain.GENESIS),
            }
            rec = AuditRecord(**fields, hash=chain.record_hash(**fields))
            self._audit.append(rec)
            self._heads[chain.GLOBAL_CHAIN] = chain.seal_head(self._sealer, chain.GLOBAL_CHAIN, rec.seq, rec.hash)
            if t_name is not None:
                self._heads[t_name] = chain.seal_head(self._sealer, t_name, fields["tenant_seq"], rec.hash)
            return _copy_audit(rec)

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        with self._lock:
            recs = sorted(
                (r for r in self._audit if r.seq > after_seq and (tenant_id is None or r.tenant_id == tenant_id)),
                key=lambda r: r.seq,
            )
        return iter([_copy_audit(r) for r in recs])

    def audit_head(self, *, tenant_id: str | None = None) -> AuditHead | None:
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        with self._lock:
            head = self._heads.get(name)
        if head is None:
            return None
        seal_ok = None if self._sealer is None else chain.check_head_seal(head, self._sealer) is None
        return AuditHead(head.count, head.head_hash, seal_ok)

    def verify_audit(self, *, tenant_id: str | None = None) -> AuditVerification:
        verifier = chain.ChainVerifier(tenant_id=tenant_id)
        with self._lock:
            recs = sorted(
                (r for r in self._audit if tenant_id is None or r.tenant_id == tenant_id), key=lambda r: r.seq
            )
            heads = (
                dict(self._heads)
                if tenant_id is None
                else {k: v for k, v in self._heads.items() if k == chain.tenant_chain(tenant_id)}
            )
        for rec in recs:
            if verifier.feed(rec) is not None:
                break
        return verifier.finish(heads, self._sealer)

    def reseal_audit_heads(self) -> AuditVerification:
        if self._sealer is None:
            raise ConfigurationError("reseal needs a head sealer: open the store with sealer=...")
        verifier = chain.ChainVerifier()
        with self._lock:
            for rec in sorted(self._audit, key=lambda r: r.seq):
                if verifier.feed(rec) is not None:
                    break
            outcome = verifier.finish(dict(self._heads), None)
            if not outcome.ok:
                return outcome
            for name, h in list(self._heads.items()):
                self._heads[name] = chain.seal_head(self._sealer, name, h.count, h.head_hash)
        return replace(outcome, sealed=True)

    def export_audit(self, tenant_id: str | None = None) -> Iterator[dict[str, Any]]:
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        with self._lock:
            heads = dict(self._heads) if tenant_id is None else {k: v for k, v in self._heads.items() if k == name}
            heads.setdefault(name, chain.ChainHead(name, 0, chain.GENESIS))
            recs = sorted(
                (r for r in self._audit if tenant_id is None or r.tenant_id == tenant_id), key=lambda r: r.seq
            )
        limit = heads[name].count
        for rec in recs:
            position = rec.seq if tenant_id is None else rec.tenant_seq
            if position is not None and position > limit:
                break
            yield chain.record_to_json(_copy_audit(rec))
        for h in sorted(heads, key=lambda c: (c == chain.GLOBAL_CHAIN, c)):  # global last
            yield heads[h].to_json()
