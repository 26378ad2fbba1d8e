"""A run's manifest and copy ledger on SQL (``LedgerRepo``). Object names are bytes,
ordered bytewise; long reads page by name, one short transaction per page."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, func, insert, or_, select

from archive_kms.errors import StateError, TransientError
from archive_kms.state._common import check_entry, json_object, member
from archive_kms.state.port import CopyRecord, CopyStatus, Fence, ManifestEntry, ManifestSummary
from archive_kms.state.schema import copy_ledger, manifest_entries, manifests
from archive_kms.state.sql.database import Conflict, SqlRepository

__all__ = ["SqlLedgerRepo"]


class SqlLedgerRepo(SqlRepository):
    """``LedgerRepo`` on SQL."""

    def create_manifest(self, run_id: str, source: Mapping[str, Any], *, fence: Fence | None = None) -> None:
        source = json_object(source, "manifest source")
        with self._tx("create manifest") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            existing = conn.execute(select(manifests.c.source).where(manifests.c.run_id == run_id)).scalar()
            if existing is not None:
                if dict(existing) != source:
                    raise StateError(
                        f"run {run_id!r} already has a manifest of another source", resource=f"run:{run_id}"
                    )
                return
            conn.execute(
                insert(manifests).values(run_id=run_id, tenant_id=tenant_id, source=source, created_at=self._now())
            )

    def add_manifest_entries(self, run_id: str, entries: Iterable[ManifestEntry], *, fence: Fence | None = None) -> int:
        batch: dict[bytes, ManifestEntry] = {}
        for e in entries:
            check_entry(e)
            prior = batch.get(e.name)
            if prior is not None and prior != e:
                raise StateError(
                    f"manifest of run {run_id!r} lists object {e.name!r} twice with different attributes",
                    resource=f"run:{run_id}",
                )
            batch[e.name] = e
        if not batch:
            return 0
        try:
            with self._tx("add manifest entries") as conn:
                tenant_id = conn.execute(select(manifests.c.tenant_id).where(manifests.c.run_id == run_id)).scalar()
                if tenant_id is None:
                    raise StateError(
                        f"run {run_id!r} has no manifest (create_manifest first)", resource=f"run:{run_id}"
                    )
                self._fenced(conn, fence, tenant_id)
                names = list(batch)
                existing: dict[bytes, ManifestEntry] = {}
                for i in range(0, len(names), 500):
                    for r in conn.execute(
                        select(manifest_entries).where(
                            manifest_entries.c.run_id == run_id, manifest_entries.c.name.in_(names[i : i + 500])
                        )
                    ).all():
                        existing[bytes(r.name)] = _entry(r)
                for name, prior in existing.items():
                    if prior != batch[name]:
                        raise StateError(
                            f"object {name!r} is already in the manifest of run {run_id!r} with other "
                            "attributes (size/etag/shard/digest)",
                            resource=f"run:{run_id}",
                        )
                new = [e for n, e in batch.items() if n not in existing]
                if new:
                    conn.execute(
                        insert(manifest_entries),
                        [
                            {
                                "run_id": run_id,
                                "name": e.name,
                                "shard": e.shard,
                                "size": e.size,
                                "etag": e.etag,
                                "plaintext_sha256": e.plaintext_sha256,
                            }
                            for e in new
                        ],
                    )
                return len(new)
        except Conflict:
            raise TransientError(
                f"manifest of run {run_id!r} was extended concurrently; retry", resource=f"run:{run_id}"
            ) from None

    def manifest_summary(self, run_id: str) -> ManifestSummary | None:
        with self._tx("manifest summary", write=False) as conn:
            m = conn.execute(select(manifests).where(manifests.c.run_id == run_id)).one_or_none()
            if m is None:
                return None
            e = manifest_entries.c
            agg = conn.execute(
                select(func.count(), func.coalesce(func.sum(e.size), 0), func.count(func.distinct(e.shard))).where(
                    e.run_id == run_id
                )
            ).one()
        return ManifestSummary(run_id, m.tenant_id, dict(m.source), m.created_at, int(agg[0]), int(agg[1]), int(agg[2]))

    def _pages(
        self, op: str, make_query: Callable[[bytes | None], Any], page_size: int, convert: Callable[[Row[Any]], Any]
    ) -> Iterator[Any]:
        """Keyset pagination on object name: no transaction is held between pages."""
        last: bytes | None = None
        while True:
            query = make_query(last).limit(page_size)
            rows = self._read(op, functools.partial(_all_rows, query))
            for r in rows:
                yield convert(r)
            if len(rows) < page_size:
                return
            last = bytes(rows[-1].name)

    def iter_manifest(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        e = manifest_entries.c

        def query(after: bytes | None) -> Any:
            q = select(manifest_entries).where(e.run_id == run_id)
            if shard is not None:
                q = q.where(e.shard == shard)
            if after is not None:
                q = q.where(e.name > after)
            return q.order_by(e.name)

        return self._pages("read manifest", query, page_size, _entry)

    def record_copy(self, run_id: str, record: CopyRecord, *, fence: Fence | None = None) -> None:
        self.record_copies(run_id, [record], fence=fence)

    def record_copies(self, run_id: str, records: Sequence[CopyRecord], *, fence: Fence | None = None) -> None:
        if not records:
            return
        now = self._now()
        rows = []
        for record in records:
            status = member(CopyStatus, record.status, "copy status")
            rows.append(
                {
                    "status": status.value,
                    "dest_etag": record.dest_etag,
                    "dest_size": record.dest_size,
                    "plaintext_sha256": record.plaintext_sha256,
                    "error": record.error,
                    "updated_at": now,
                }
            )
        # One statement, executed for every row (executemany): compiling a statement per row
        # was most of a ledger batch's CPU (issue #16).
        insert = self._insert(copy_ledger)
        upsert = insert.on_conflict_do_update(
            index_elements=["run_id", "name"], set_={k: insert.excluded[k] for k in rows[0]}
        )
        params = [
            {"run_id": run_id, "name": bytes(record.name), **values}
            for record, values in zip(records, rows, strict=True)
        ]
        try:
            with self._tx("record copy") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                conn.execute(upsert, params)
        except Conflict:
            names = ", ".join(repr(r.name[:80]) for r in records[:3])
            raise StateError(
                f"object(s) {names}{' ...' if len(records) > 3 else ''} not all in the manifest of "
                f"run {run_id!r}; nothing recorded",
                resource=f"run:{run_id}",
            ) from None

    def get_copy(self, run_id: str, name: bytes) -> CopyRecord | None:
        with self._tx("get copy", write=False) as conn:
            row = conn.execute(
                select(copy_ledger).where(copy_ledger.c.run_id == run_id, copy_ledger.c.name == bytes(name))
            ).one_or_none()
        return None if row is None else _copy(row)

    def iter_copies(
        self, run_id: str, *, status: CopyStatus | None = None, shard: int | None = None, page_size: int = 1000
    ) -> Iterator[CopyRecord]:
        c, e = copy_ledger.c, manifest_entries.c

        def query(after: bytes | None) -> Any:
            q = select(copy_ledger).where(c.run_id == run_id)
            if shard is not None:
                q = q.join(manifest_entries, (e.run_id == c.run_id) & (e.name == c.name)).where(e.shard == shard)
            if status is not None:
                q = q.where(c.status == member(CopyStatus, status, "copy status").value)
            if after is not None:
                q = q.where(c.name > after)
            return q.order_by(c.name)

        return self._pages("read copy ledger", query, page_size, _copy)

    def copy_counts(self, run_id: str) -> dict[CopyStatus, int]:
        with self._tx("count copies", write=False) as conn:
            rows = conn.execute(
                select(copy_ledger.c.status, func.count())
                .where(copy_ledger.c.run_id == run_id)
                .group_by(copy_ledger.c.status)
            ).all()
        return {CopyStatus(s): int(n) for s, n in rows}

    def iter_uncopied(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        e, c = manifest_entries.c, copy_ledger.c
        done = [CopyStatus.COPIED.value, CopyStatus.VERIFIED.value]

        def query(after: bytes | None) -> Any:
            q = (
                select(manifest_entries)
                .select_from(manifest_entries.outerjoin(copy_ledger, and_(c.run_id == e.run_id, c.name == e.name)))
                .where(e.run_id == run_id, or_(c.status.is_(None), c.status.not_in(done)))
            )
            if shard is not None:
                q = q.where(e.shard == shard)
            if after is not None:
                q = q.where(e.name > after)
            return q.order_by(e.name)

        return self._pages("read uncopied objects", query, page_size, _entry)


def _entry(r: Row[Any]) -> ManifestEntry:
    return ManifestEntry(
        name=bytes(r.name), size=int(r.size), shard=r.shard, etag=r.etag, plaintext_sha256=r.plaintext_sha256
    )


def _copy(r: Row[Any]) -> CopyRecord:
    return CopyRecord(
        name=bytes(r.name),
        status=CopyStatus(r.status),
        dest_etag=r.dest_etag,
        dest_size=None if r.dest_size is None else int(r.dest_size),
        plaintext_sha256=r.plaintext_sha256,
        error=r.error,
        updated_at=r.updated_at,
    )


def _all_rows(query: Any, conn: Connection) -> list[Row[Any]]:
    """Every row of ``query`` (one page of a paged read)."""
    return list(conn.execute(query).all())
