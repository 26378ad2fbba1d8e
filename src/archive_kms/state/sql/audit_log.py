"""The hash-chained audit log on SQL (``AuditLog``): records, chain heads (optionally
sealed), verification in one snapshot, exports. The chain itself is ``state.audit``."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from archive_kms.errors import ConfigurationError, StateError
from archive_kms.state import audit as chain
from archive_kms.state._common import check_id
from archive_kms.state.port import AuditEvent, AuditHead, AuditRecord, AuditVerification
from archive_kms.state.schema import RUN_ID, audit_heads, audit_log
from archive_kms.state.sql.database import SqlDatabase, SqlRepository

__all__ = ["SqlAuditLog"]


class SqlAuditLog(SqlRepository):
    """``AuditLog`` on SQL. ``sealer`` seals chain heads (and is then required by
    ``verify_audit``)."""

    def __init__(self, db: SqlDatabase, *, sealer: chain.HeadSealer | None = None) -> None:
        super().__init__(db)
        self._sealer = sealer

    def _head(self, conn: Connection, name: str, *, lock: bool) -> Row[Any] | None:
        q = select(audit_heads).where(audit_heads.c.chain == name)
        return conn.execute(q.with_for_update() if lock else q).one_or_none()

    def _write_head(self, conn: Connection, name: str, count: int, head_hash: str, now: datetime, exists: bool) -> None:
        h = chain.seal_head(self._sealer, name, count, head_hash)
        values = {
            "count": count,
            "head_hash": head_hash,
            "seal": h.seal,
            "seal_alg": h.seal_alg,
            "seal_key_id": h.seal_key_id,
            "updated_at": now,
        }
        if exists:
            conn.execute(update(audit_heads).where(audit_heads.c.chain == name).values(**values))
        else:
            conn.execute(insert(audit_heads).values(chain=name, **values))

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        check_id("audit actor", event.actor, 255)
        check_id("audit action", event.action, 128)
        if event.tenant_id is not None:
            check_id("tenant id", event.tenant_id, 128)
        if event.run_id is not None:
            check_id("run id", event.run_id, RUN_ID)
        details_text = chain.canonical_json(dict(event.details))
        details = json.loads(details_text)  # what a reader will get back, so the hash covers exactly that
        # The global head is the one row every writer of the fleet updates. Its lock orders
        # the appends, so the append runs at READ COMMITTED whatever the server's default: a
        # REPEATABLE READ / SERIALIZABLE snapshot taken before waiting for that lock would
        # fail every waiter as soon as the holder commits (a retry storm on a hot row).
        with self._db.tx("append audit record", isolation="READ COMMITTED") as conn:
            head = self._head(conn, chain.GLOBAL_CHAIN, lock=True)  # serialises appends: one chain
            if head is None:
                raise StateError(
                    "the audit chain head is missing: run `archive-kms audit verify`", resource="audit:global"
                )
            t_head = None
            if event.tenant_id is not None:
                t_head = self._head(conn, chain.tenant_chain(event.tenant_id), lock=True)
            now = self._now()
            fields: dict[str, Any] = {
                "seq": head.count + 1,
                "ts": now,
                "actor": event.actor,
                "action": event.action,
                "tenant_id": event.tenant_id,
                "run_id": event.run_id,
                "details": details,
                "prev_hash": head.head_hash,
                "tenant_seq": None if event.tenant_id is None else (t_head.count + 1 if t_head else 1),
                "tenant_prev_hash": None
                if event.tenant_id is None
                else (t_head.head_hash if t_head else chain.GENESIS),
            }
            digest = chain.record_hash(**fields)
            conn.execute(insert(audit_log).values(**(fields | {"details": details_text, "hash": digest})))
            self._write_head(conn, chain.GLOBAL_CHAIN, fields["seq"], digest, now, exists=True)
            if event.tenant_id is not None:
                self._write_head(
                    conn,
                    chain.tenant_chain(event.tenant_id),
                    fields["tenant_seq"],
                    digest,
                    now,
                    exists=t_head is not None,
                )
        return AuditRecord(**fields, hash=digest)

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        a = audit_log.c
        last = after_seq
        while True:
            q = select(audit_log).where(a.seq > last)
            if tenant_id is not None:
                q = q.where(a.tenant_id == tenant_id)
            page = q.order_by(a.seq).limit(page_size)
            rows = self._read("read audit log", functools.partial(_all_rows, page))
            for r in rows:
                yield _audit(r)
            if len(rows) < page_size:
                return
            last = rows[-1].seq

    def _heads(self, conn: Connection, tenant_id: str | None) -> dict[str, chain.ChainHead]:
        q = select(audit_heads)
        if tenant_id is not None:
            q = q.where(audit_heads.c.chain == chain.tenant_chain(tenant_id))
        return {
            r.chain: chain.ChainHead(r.chain, r.count, r.head_hash, r.seal, r.seal_alg, r.seal_key_id)
            for r in conn.execute(q).all()
        }

    def verify_audit(self, *, tenant_id: str | None = None) -> AuditVerification:
        verifier = chain.ChainVerifier(tenant_id=tenant_id)
        # One snapshot for heads and records, so concurrent appends cannot look like tampering.
        with self._tx("verify audit log", write=False, snapshot=True) as conn:
            heads = self._heads(conn, tenant_id)
            q = select(audit_log)
            if tenant_id is not None:
                q = q.where(audit_log.c.tenant_id == tenant_id)
            result = conn.execute(q.order_by(audit_log.c.seq).execution_options(yield_per=1000))
            try:
                for row in result:
                    try:
                        rec = _audit(row)
                    except (ValueError, TypeError) as exc:
                        return verifier.fail(row.seq, f"record {row.seq} is malformed: {type(exc).__name__}")
                    if verifier.feed(rec) is not None:
                        break
            finally:
                result.close()
        return verifier.finish(heads, self._sealer)

    def audit_head(self, *, tenant_id: str | None = None) -> AuditHead | None:
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        with self._tx("read audit head", write=False) as conn:
            row = self._head(conn, name, lock=False)
        if row is None:
            return None
        head = chain.ChainHead(row.chain, row.count, row.head_hash, row.seal, row.seal_alg, row.seal_key_id)
        seal_ok = None if self._sealer is None else chain.check_head_seal(head, self._sealer) is None
        return AuditHead(int(row.count), row.head_hash, seal_ok)

    def reseal_audit_heads(self) -> AuditVerification:
        if self._sealer is None:
            raise ConfigurationError("reseal needs a head sealer: open the store with sealer=...")
        verifier = chain.ChainVerifier()
        with self._tx("reseal audit heads") as conn:
            self._head(conn, chain.GLOBAL_CHAIN, lock=True)  # appends wait until the reseal commits
            heads = self._heads(conn, None)
            result = conn.execute(select(audit_log).order_by(audit_log.c.seq).execution_options(yield_per=1000))
            try:
                for row in result:
                    if verifier.feed(_audit(row)) is not None:
                        break
            finally:
                result.close()
            outcome = verifier.finish(heads, None)
            if not outcome.ok:
                return outcome
            now = self._now()
            for h in heads.values():
                self._write_head(conn, h.chain, h.count, h.head_hash, now, exists=True)
        return replace(outcome, sealed=True)

    def export_audit(self, tenant_id: str | None = None) -> Iterator[dict[str, Any]]:
        heads = self._read("read audit heads", lambda conn: self._heads(conn, tenant_id))
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        limit = heads[name].count if name in heads else 0
        # Records are immutable, so paging up to the heads read above is consistent.
        for rec in self.iter_audit(tenant_id=tenant_id):
            position = rec.seq if tenant_id is None else rec.tenant_seq
            if position is not None and position > limit:
                break
            yield chain.record_to_json(rec)
        if name not in heads:
            heads[name] = chain.ChainHead(name, 0, chain.GENESIS)
        for h in sorted(heads, key=lambda c: (c == chain.GLOBAL_CHAIN, c)):  # global last
            yield heads[h].to_json()


def _audit(r: Row[Any]) -> AuditRecord:
    return AuditRecord(
        seq=int(r.seq),
        ts=r.ts,
        actor=r.actor,
        action=r.action,
        tenant_id=r.tenant_id,
        run_id=r.run_id,
        details=json.loads(r.details),
        prev_hash=r.prev_hash,
        tenant_seq=None if r.tenant_seq is None else int(r.tenant_seq),
        tenant_prev_hash=r.tenant_prev_hash,
        hash=r.hash,
    )


def _all_rows(query: Any, conn: Connection) -> list[Row[Any]]:
    """Every row of ``query`` (one page of a paged read)."""
    return list(conn.execute(query).all())
