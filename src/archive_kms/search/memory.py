"""An in-memory SearchIndex: a real implementation with its own inverted index, held to
the same contract suite as the Elasticsearch adapter.

It behaves like Elasticsearch where the contract depends on it: strict mappings reject
unknown fields and non-scalar values per item, writes become visible to search and count
only after a refresh, versions (external and create-only) decide what a retried write
does, aliases carry a write-index flag and a conditional swap fails atomically. Thread
safe (one lock), so race tests can run against it.

``item_fault`` lets tests inject per-item bulk failures: called with ``(index, doc_id)``
before an item is applied, it may return an Elasticsearch-style item body (``status``,
``error``) that is reported instead of applying the item.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from archive_kms.errors import AliasConflictError, SearchError, ValidationError
from archive_kms.search import documents as D
from archive_kms.search.bulk import run_bulk
from archive_kms.search.naming import alias_name, check_index_of, check_tenant_id, index_name, parse_index_name
from archive_kms.search.port import (
    BulkResult,
    GenerationInfo,
    Hit,
    HitFailure,
    IndexDocument,
    IndexMode,
    Query,
    SearchResult,
)
from archive_kms.search.tokens import SearchKeys

ItemFault = Callable[[str, str], Mapping[str, Any] | None]

_MAX_KEYWORD_BYTES = 32766  # Lucene's term length limit, which Elasticsearch enforces


@dataclass
class _Index:
    mappings: dict[str, Any]
    settings: dict[str, Any]
    live: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # id -> (version, source)
    visible: dict[str, dict[str, Any]] = field(default_factory=dict)  # as of the last refresh
    postings: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    write_blocked: bool = False

    def _terms(self, source: Mapping[str, Any]) -> set[tuple[str, str]]:
        out = set()
        for name, spec in self.mappings["properties"].items():
            if spec.get("index", True) is False or name not in source:
                continue
            values = source[name] if isinstance(source[name], list) else [source[name]]
            out |= {(name, _keyword(v)) for v in values if v is not None}
        return out

    def refresh(self) -> None:
        for doc_id in self.dirty:
            old = self.visible.pop(doc_id, None)
            if old is not None:
                for term in self._terms(old):
                    self.postings[term].discard(doc_id)
            entry = self.live.get(doc_id)
            if entry is not None:
                self.visible[doc_id] = entry[1]
                for term in self._terms(entry[1]):
                    self.postings.setdefault(term, set()).add(doc_id)
        self.dirty.clear()

    def check_source(self, source: Any) -> tuple[int, str, str] | None:
        """Strict-mapping validation: ``(status, type, reason)`` of the error, or None."""
        if not isinstance(source, Mapping):
            return 400, "document_parsing_exception", "document is not an object"
        props = self.mappings["properties"]
        for name, value in source.items():
            if name not in props:
                return (
                    400,
                    "strict_dynamic_mapping_exception",
                    f"mapping set to strict, dynamic introduction of [{name}] within [_doc] is not allowed",
                )
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, (Mapping, list)):
                    return 400, "document_parsing_exception", f"failed to parse field [{name}] of type [keyword]"
                if (
                    v is not None
                    and props[name].get("index", True) is not False
                    and len(_keyword(v).encode("utf-8")) > _MAX_KEYWORD_BYTES
                ):
                    return 400, "document_parsing_exception", f"failed to parse field [{name}]: immense term"
        return None


def _keyword(value: Any) -> str:
    # Elasticsearch coerces scalars into keyword strings.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mode_of(meta: Mapping[str, Any] | None, name: str) -> IndexMode:
    try:
        return IndexMode((meta or {})["mode"])
    except (KeyError, ValueError):
        raise SearchError(f"index {name} has no archive_kms marker: not a search generation", resource=name) from None


class MemorySearchIndex:
    """SearchIndex in process memory."""

    def __init__(
        self,
        *,
        item_fault: ItemFault | None = None,
        max_attempts: int = 5,
        backoff: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.RLock()
        self._indices: dict[str, _Index] = {}
        self._aliases: dict[str, dict[str, bool]] = {}  # alias -> {index: is_write_index}
        self._item_fault = item_fault
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"MemorySearchIndex({len(self._indices)} indices)"

    # --- helpers ---------------------------------------------------------------------

    def _get(self, name: str) -> _Index:
        idx = self._indices.get(name)
        if idx is None:
            raise SearchError(f"search index {name} does not exist", resource=name)
        return idx

    def _info(self, name: str, idx: _Index) -> GenerationInfo:
        tenant, generation = parse_index_name(name)
        meta = D.meta_of(idx.mappings) or {}
        return GenerationInfo(
            index=name,
            tenant=tenant,
            generation=generation,
            mode=_mode_of(meta, name),
            schema=int(meta.get("schema", 0)),
            completed_records=meta.get("completed_records"),
            write_blocked=idx.write_blocked,
            is_current=name in self._aliases.get(alias_name(tenant), {}),
        )

    # --- generations -----------------------------------------------------------------

    def create_generation(self, tenant: str, generation: int, mode: IndexMode) -> str:
        tenant = check_tenant_id(tenant)
        name = index_name(tenant, generation)
        mode = IndexMode(mode)
        expected = D.index_mapping(tenant, generation, mode)
        with self._lock:
            if name in self._aliases:
                raise SearchError(f"{name} is an alias, not an index", resource=name)
            existing = self._indices.get(name)
            if existing is not None:
                drift = D.mapping_drift(existing.mappings, expected)
                if drift:
                    raise SearchError(
                        f"index {name} exists with an incompatible mapping: {'; '.join(drift)}; "
                        "delete it or use a new generation",
                        resource=name,
                    )
                return name
            self._indices[name] = _Index(mappings=expected, settings=D.index_settings())
        return name

    def describe_generation(self, index_name: str) -> GenerationInfo | None:
        parse_index_name(index_name)
        with self._lock:
            idx = self._indices.get(index_name)
            return None if idx is None else self._info(index_name, idx)

    def list_generations(self, tenant: str) -> list[GenerationInfo]:
        tenant = check_tenant_id(tenant)
        with self._lock:
            out = []
            for name, idx in self._indices.items():
                try:
                    check_index_of(tenant, name)
                except ValidationError:
                    continue
                out.append(self._info(name, idx))
        return sorted(out, key=lambda g: g.generation)

    def mark_generation_complete(self, index_name: str, records: int) -> None:
        tenant, generation = parse_index_name(index_name)
        if isinstance(records, bool) or not isinstance(records, int) or records < 0:
            raise ValidationError("records must be a non-negative int")
        with self._lock:
            idx = self._get(index_name)
            mode = _mode_of(D.meta_of(idx.mappings), index_name)
            # Like Elasticsearch, a _meta update replaces the whole _meta object.
            idx.mappings["_meta"] = D.generation_meta(tenant, generation, mode, completed_records=records)

    # --- documents -------------------------------------------------------------------

    def _bulk_send(self, name: str, op: str, items: Sequence[Any]) -> dict[str, Any]:
        out, errors = [], False
        with self._lock:
            idx = self._get(name)
            for item in items:
                doc_id = item.doc_id if op == "index" else item
                body = self._apply(name, idx, op, item, doc_id)
                errors = errors or "error" in body
                out.append({op: body})
        return {"errors": errors, "items": out}

    def _apply(self, name: str, idx: _Index, op: str, item: Any, doc_id: str) -> dict[str, Any]:
        base = {"_index": name, "_id": doc_id}
        if self._item_fault is not None:
            injected = self._item_fault(name, doc_id)
            if injected is not None:
                return {**base, **copy.deepcopy(dict(injected))}
        if idx.write_blocked:
            return {
                **base,
                "status": 403,
                "error": {
                    "type": "cluster_block_exception",
                    "reason": f"index [{name}] blocked by: [FORBIDDEN/8/index write (api)];",
                },
            }
        current = idx.live.get(doc_id)
        if op == "delete":
            if current is None:
                return {**base, "status": 404, "result": "not_found"}
            del idx.live[doc_id]
            idx.dirty.add(doc_id)
            return {**base, "status": 200, "result": "deleted"}
        doc: IndexDocument = item
        problem = idx.check_source(doc.source)
        if problem is not None:
            status, etype, reason = problem
            return {**base, "status": status, "error": {"type": etype, "reason": reason}}
        # Create-only writes get Elasticsearch's first internal version, 1.
        if current is not None and (doc.version is None or current[0] >= doc.version):
            return {
                **base,
                "status": 409,
                "error": {"type": "version_conflict_engine_exception", "reason": f"[{doc_id}]: version conflict"},
            }
        idx.live[doc_id] = (1 if doc.version is None else doc.version, copy.deepcopy(dict(doc.source)))
        idx.dirty.add(doc_id)
        return {
            **base,
            "status": 200 if current is not None else 201,
            "result": "updated" if current is not None else "created",
        }

    def _run(self, name: str, op: str, items: Sequence[Any], key: Callable[[Any], str], refresh: bool) -> BulkResult:
        parse_index_name(name)
        with self._lock:
            self._get(name)  # a missing index is an error, never auto-created
        result = run_bulk(
            name,
            items,
            doc_id=key,
            send=lambda batch: self._bulk_send(name, op, batch),
            max_attempts=self._max_attempts,
            backoff=self._backoff,
            sleep=self._sleep,
        )
        if refresh:
            self.refresh(name)
        return result

    def bulk_index(self, index_name: str, docs: Sequence[IndexDocument], *, refresh: bool = False) -> BulkResult:
        docs = list(docs)
        parse_index_name(index_name)
        with self._lock:
            mode = _mode_of(D.meta_of(self._get(index_name).mappings), index_name)
        D.check_document_modes(index_name, mode, docs)
        return self._run(index_name, "index", docs, lambda d: d.doc_id, refresh)

    def delete_documents(self, index_name: str, doc_ids: Sequence[str], *, refresh: bool = False) -> BulkResult:
        return self._run(index_name, "delete", list(doc_ids), lambda d: d, refresh)

    def refresh(self, index_name: str) -> None:
        parse_index_name(index_name)
        with self._lock:
            self._get(index_name).refresh()

    def count(self, index_name: str) -> int:
        parse_index_name(index_name)
        with self._lock:
            return len(self._get(index_name).visible)

    # --- search ----------------------------------------------------------------------

    def search(
        self,
        tenant: str,
        query: Query,
        keys: SearchKeys | None,
        *,
        index: str | None = None,
        mode: IndexMode | None = None,
    ) -> SearchResult:
        tenant = check_tenant_id(tenant)
        alias = alias_name(tenant)
        if (index is None) != (mode is None):
            raise ValidationError("search: give both index and mode, or neither")
        with self._lock:
            if index is not None and mode is not None:
                check_index_of(tenant, index)
                current, mode = index, IndexMode(mode)
                compiled = D.compile_query(tenant, query, mode=mode, keys=keys)  # keys fit the recorded mode
                idx = self._get(current)
                D.check_bound_mode(current, mode, _mode_of(D.meta_of(idx.mappings), current))
            else:
                found = self.current_index(tenant)
                if found is None:
                    raise SearchError(f"tenant {tenant} has no search index (alias {alias} is missing)", resource=alias)
                current = found
                idx = self._get(current)
                mode = _mode_of(D.meta_of(idx.mappings), current)
                compiled = D.compile_query(tenant, query, mode=mode, keys=keys)
            if compiled.terms:
                sets = [idx.postings.get(term, set()) for term in compiled.terms]
                matched = set.intersection(*sets) if sets else set()
            else:
                matched = set(idx.visible)
            ordered = sorted(matched, key=lambda d: tuple(str(idx.visible[d].get(f, "")) for f in D.SORT_FIELDS))
            sources = [(d, copy.deepcopy(idx.visible[d])) for d in ordered[: compiled.limit]]
        hits, failures = D.decode_hits(
            tenant=tenant,
            keys=keys,
            mode_of=lambda _index: mode,
            rows=((current, doc_id, source) for doc_id, source in sources),
            required=compiled.terms,
        )
        return SearchResult(hits=hits, total=len(matched), failures=failures)

    def scan(self, index_name: str, keys: SearchKeys | None, *, page_size: int = 1_000) -> Iterator[Hit | HitFailure]:
        with self._lock:
            idx = self._get(index_name)
            mode = _mode_of(D.meta_of(idx.mappings), index_name)
            doc_ids = sorted(idx.visible)
        tenant = D.check_scan_keys(index_name, mode, keys)
        if not 1 <= page_size <= 10_000:
            raise ValidationError("page_size must be between 1 and 10000")
        for start in range(0, len(doc_ids), page_size):
            with self._lock:  # a page at a time, like the real index; deleted since listing = skipped
                idx = self._get(index_name)
                rows = [
                    (index_name, d, copy.deepcopy(idx.visible[d]))
                    for d in doc_ids[start : start + page_size]
                    if d in idx.visible
                ]
            hits, failures = D.decode_hits(tenant=tenant, keys=keys, mode_of=lambda _i: mode, rows=rows)
            yield from hits
            yield from failures

    # --- aliases ---------------------------------------------------------------------

    def current_index(self, tenant: str) -> str | None:
        alias = alias_name(tenant)
        with self._lock:
            targets = sorted(self._aliases.get(alias, {}))
        return D.check_alias_targets(check_tenant_id(tenant), alias, targets)

    def swap_alias(self, tenant: str, new_index: str, *, expected_current: str | None) -> None:
        tenant = check_tenant_id(tenant)
        alias = alias_name(tenant)
        check_index_of(tenant, new_index)
        if expected_current is not None:
            check_index_of(tenant, expected_current)
        with self._lock:  # the lock makes the check-and-swap one atomic step, as _aliases is in ES
            self._get(new_index)
            current = self.current_index(tenant)
            if current == new_index:
                return  # already swapped: a rerun after a crash (C4)
            targets = self._aliases.get(alias, {})
            if expected_current is not None and expected_current not in targets:
                raise AliasConflictError(
                    f"alias {alias} does not point to {expected_current} (it points to "
                    f"{current}): another swap won; re-read the alias",
                    resource=alias,
                )
            after = {k: v for k, v in targets.items() if k != expected_current}
            if any(after.values()):
                raise AliasConflictError(
                    f"alias {alias} already points to {sorted(after)}: another swap won; re-read the alias",
                    resource=alias,
                )
            after[new_index] = True
            self._aliases[alias] = after

    # --- lifecycle -------------------------------------------------------------------

    def set_write_block(self, index_name: str, blocked: bool = True) -> None:
        parse_index_name(index_name)
        with self._lock:
            self._get(index_name).write_blocked = bool(blocked)

    def delete_index(self, index_name: str) -> None:
        tenant, _ = parse_index_name(index_name)
        with self._lock:
            if self.current_index(tenant) == index_name:
                raise SearchError(
                    f"refusing to delete {index_name}: alias {alias_name(tenant)} points to it", resource=index_name
                )
            self._indices.pop(index_name, None)
            for targets in self._aliases.values():
                targets.pop(index_name, None)
