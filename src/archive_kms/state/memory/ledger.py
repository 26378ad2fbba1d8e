"""Manifests and the copy ledger in memory (``LedgerRepo``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from archive_kms.errors import StateError
from archive_kms.state._common import check_entry, json_object, member
from archive_kms.state.memory.tables import MemoryTables, _Manifest
from archive_kms.state.port import CopyRecord, CopyStatus, Fence, ManifestEntry, ManifestSummary

__all__ = ["MemoryLedgerRepo"]


class MemoryLedgerRepo(MemoryTables):
    """``LedgerRepo`` in memory."""

    def create_manifest(self, run_id: str, source: Mapping[str, Any], *, fence: Fence | None = None) -> None:
        source = json_object(source, "manifest source")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            existing = self._manifests.get(run_id)
            if existing is not None:
                if existing.source != source:
                    raise StateError(
                        f"run {run_id!r} already has a manifest of another source", resource=f"run:{run_id}"
                    )
                return
            self._manifests[run_id] = _Manifest(run.tenant_id, source, self._now())
            self._entries[run_id] = {}
            self._copies[run_id] = {}

    def add_manifest_entries(self, run_id: str, entries: Iterable[ManifestEntry], *, fence: Fence | None = None) -> int:
        batch: dict[bytes, ManifestEntry] = {}
        for e in entries:
            check_entry(e)
            e = replace(e, name=bytes(e.name))
            prior = batch.get(e.name)
            if prior is not None and prior != e:
                raise StateError(
                    f"manifest of run {run_id!r} lists object {e.name!r} twice with different attributes",
                    resource=f"run:{run_id}",
                )
            batch[e.name] = e
        with self._lock:
            m = self._manifests.get(run_id)
            if m is None:
                raise StateError(f"run {run_id!r} has no manifest (create_manifest first)", resource=f"run:{run_id}")
            self._fenced(fence, m.tenant_id)
            existing = self._entries[run_id]
            for name, e in batch.items():
                if name in existing and existing[name] != e:
                    raise StateError(
                        f"object {name!r} is already in the manifest of run {run_id!r} with other "
                        "attributes (size/etag/shard/digest)",
                        resource=f"run:{run_id}",
                    )
            new = [e for n, e in batch.items() if n not in existing]
            for e in new:
                existing[e.name] = e
            return len(new)

    def manifest_summary(self, run_id: str) -> ManifestSummary | None:
        with self._lock:
            m = self._manifests.get(run_id)
            if m is None:
                return None
            entries = self._entries[run_id].values()
            return ManifestSummary(
                run_id,
                m.tenant_id,
                copy.deepcopy(m.source),
                m.created_at,
                len(entries),
                sum(e.size for e in entries),
                len({e.shard for e in entries}),
            )

    def _paged(self, snapshot: Callable[[], list[Any]], page_size: int) -> Iterator[Any]:
        # Same observable behaviour as the SQL keyset pages: sorted by name, read lazily.
        last: bytes | None = None
        while True:
            with self._lock:
                page = [x for x in snapshot() if last is None or x.name > last][:page_size]
            yield from page
            if len(page) < page_size:
                return
            last = page[-1].name

    def iter_manifest(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        def snap() -> list[ManifestEntry]:
            return sorted(
                (e for e in self._entries.get(run_id, {}).values() if shard is None or e.shard == shard),
                key=lambda e: e.name,
            )

        return self._paged(snap, page_size)

    def record_copy(self, run_id: str, record: CopyRecord, *, fence: Fence | None = None) -> None:
        self.record_copies(run_id, [record], fence=fence)

    def record_copies(self, run_id: str, records: Sequence[CopyRecord], *, fence: Fence | None = None) -> None:
        if not records:
            return
        rows = [replace(r, name=bytes(r.name), status=member(CopyStatus, r.status, "copy status")) for r in records]
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            entries = self._entries.get(run_id, {})
            missing = [r.name for r in rows if r.name not in entries]
            if missing:
                raise StateError(
                    f"object(s) {', '.join(repr(n[:80]) for n in missing[:3])} not all in the manifest "
                    f"of run {run_id!r}; nothing recorded",
                    resource=f"run:{run_id}",
                )
            now = self._now()
            for r in rows:
                self._copies[run_id][r.name] = replace(r, updated_at=now)

    def get_copy(self, run_id: str, name: bytes) -> CopyRecord | None:
        with self._lock:
            return self._copies.get(run_id, {}).get(bytes(name))

    def iter_copies(
        self, run_id: str, *, status: CopyStatus | None = None, shard: int | None = None, page_size: int = 1000
    ) -> Iterator[CopyRecord]:
        def snap() -> list[CopyRecord]:
            with self._lock:
                entries = self._entries.get(run_id, {})
                return sorted(
                    (
                        c
                        for c in self._copies.get(run_id, {}).values()
                        if (status is None or c.status is status) and (shard is None or entries[c.name].shard == shard)
                    ),
                    key=lambda c: c.name,
                )

        return self._paged(snap, page_size)

    def copy_counts(self, run_id: str) -> dict[CopyStatus, int]:
        with self._lock:
            counts: dict[CopyStatus, int] = {}
            for c in self._copies.get(run_id, {}).values():
                counts[c.status] = counts.get(c.status, 0) + 1
            return counts

    def iter_uncopied(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        done = {CopyStatus.COPIED, CopyStatus.VERIFIED}

        def snap() -> list[ManifestEntry]:
            copies = self._copies.get(run_id, {})
            return sorted(
                (
                    e
                    for e in self._entries.get(run_id, {}).values()
                    if (shard is None or e.shard == shard)
                    and (e.name not in copies or copies[e.name].status not in done)
                ),
                key=lambda e: e.name,
            )

        return self._paged(snap, page_size)
