"""SearchIndex on Elasticsearch 9, through the official client (built by
``archive_kms.clients.elasticsearch_client``; pass it in).

Edge translation: transport failures (connection refused/reset, timeouts), HTTP 429 and
5xx ⇒ ``ServiceUnavailableError`` (retryable); other API errors ⇒ ``SearchError`` naming
the index or alias; a lost conditional alias swap ⇒ ``AliasConflictError``. Error text
from Elasticsearch is sanitised (it can quote document values).

Notes on Elasticsearch behaviour this adapter relies on (checked against 9.5):
* ``_aliases`` applies all actions atomically; ``remove`` with ``must_exist: true`` fails
  the whole request (404 ``aliases_not_found_exception``) if the alias is not on that
  index, and adding a second index with ``is_write_index: true`` fails it (500
  ``illegal_state_exception`` "more than one write index"). Together they make the swap
  conditional on the expected current index, including "no alias yet".
* A ``_meta`` update replaces the whole ``_meta`` object.
* Bulk ``index`` into a missing index would auto-create it with dynamic mappings, so the
  adapter checks that the generation exists first (a concurrent delete between the check
  and the write remains possible: deployments should also set
  ``action.auto_create_index: "-archive-*,+*"``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.errors import (
    AliasConflictError,
    SearchError,
    ServiceUnavailableError,
    ValidationError,
)
from archive_kms.search import documents as D
from archive_kms.search.bulk import run_bulk, safe_reason
from archive_kms.search.naming import (
    alias_name,
    check_index_of,
    check_tenant_id,
    index_name,
    index_pattern,
    parse_index_name,
)
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

log = logging.getLogger(__name__)

DEFAULT_MAX_BULK_DOCS = 500
DEFAULT_MAX_BULK_BYTES = 8 * 1024 * 1024


def _api_error_parts(exc: Any) -> tuple[int, str, str]:
    status = getattr(getattr(exc, "meta", None), "status", 0) or 0
    body = getattr(exc, "body", None)
    etype, reason = str(getattr(exc, "error", "") or "unknown"), ""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        etype = str(body["error"].get("type", etype))
        reason = safe_reason(body["error"].get("reason"))
    return int(status), etype, reason


class ElasticsearchSearchIndex:
    """SearchIndex backed by an Elasticsearch cluster (one per deployment or per tenant)."""

    def __init__(
        self,
        client: Any,
        *,
        shards: int = 1,
        replicas: int = 0,
        max_bulk_docs: int = DEFAULT_MAX_BULK_DOCS,
        max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
        max_attempts: int = 5,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_bulk_docs < 1 or max_bulk_bytes < 1024 or shards < 1 or replicas < 0:
            raise ValidationError("bulk limits, shards and replicas must be positive")
        self._es = client
        self._shards, self._replicas = shards, replicas
        self._max_docs, self._max_bytes = max_bulk_docs, max_bulk_bytes
        self._max_attempts, self._backoff, self._sleep = max_attempts, backoff, sleep
        self._modes: dict[str, IndexMode] = {}  # an index's mode never changes
        self._modes_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, elasticsearch_url: str | None = None) -> ElasticsearchSearchIndex:
        """The adapter on the configured shared cluster, or on a tenant's dedicated cluster
        at ``elasticsearch_url`` (the client from ``archive_kms.clients``)."""
        if elasticsearch_url is not None:
            settings = settings.model_copy(update={"elasticsearch_url": elasticsearch_url})
        return cls(clients.elasticsearch_client(settings))

    def __repr__(self) -> str:
        return "ElasticsearchSearchIndex()"

    # --- error translation -----------------------------------------------------------

    @contextmanager
    def _translate(self, action: str, resource: str) -> Iterator[None]:
        from elastic_transport import SerializationError
        from elasticsearch import ApiError, TransportError

        try:
            yield
        except ApiError as e:
            status, etype, reason = _api_error_parts(e)
            msg = f"{action} on {resource} failed: HTTP {status} {etype}" + (f": {reason}" if reason else "")
            if status == 429 or status >= 500:
                raise ServiceUnavailableError(msg, resource=resource) from None
            raise SearchError(msg, resource=resource) from None
        except SerializationError as e:
            raise SearchError(
                f"{action} on {resource} failed: bad response ({type(e).__name__})", resource=resource
            ) from None
        except TransportError as e:
            raise ServiceUnavailableError(
                f"{action} on {resource} failed: Elasticsearch unreachable ({type(e).__name__})", resource=resource
            ) from None

    # --- generations -----------------------------------------------------------------

    def _get_index(self, name: str) -> dict[str, Any] | None:
        with self._translate("get index", name):
            resp = self._es.options(ignore_status=404).indices.get(index=name)
        body = resp.body if hasattr(resp, "body") else resp
        if not isinstance(body, Mapping) or name not in body:
            return None  # 404 body, or the name resolved to something else
        return dict(body[name])

    def _info(self, name: str, data: Mapping[str, Any]) -> GenerationInfo:
        tenant, generation = parse_index_name(name)
        meta = D.meta_of(data.get("mappings") or {}) or {}
        mode = self._mode_from_meta(meta, name)
        blocks = ((data.get("settings") or {}).get("index") or {}).get("blocks") or {}
        return GenerationInfo(
            index=name,
            tenant=tenant,
            generation=generation,
            mode=mode,
            schema=int(meta.get("schema", 0)),
            completed_records=meta.get("completed_records"),
            write_blocked=str(blocks.get("write", "false")).lower() == "true",
            is_current=alias_name(tenant) in (data.get("aliases") or {}),
        )

    def _mode_from_meta(self, meta: Mapping[str, Any], name: str) -> IndexMode:
        try:
            mode = IndexMode(meta["mode"])
        except (KeyError, ValueError):
            raise SearchError(
                f"index {name} has no archive_kms marker: not a search generation", resource=name
            ) from None
        with self._modes_lock:
            self._modes[name] = mode
        return mode

    def _mode(self, name: str) -> IndexMode:
        with self._modes_lock:
            mode = self._modes.get(name)
        if mode is not None:
            return mode
        data = self._get_index(name)
        if data is None:
            raise SearchError(f"search index {name} does not exist", resource=name)
        return self._mode_from_meta(D.meta_of(data.get("mappings") or {}) or {}, name)

    def create_generation(self, tenant: str, generation: int, mode: IndexMode) -> str:
        tenant = check_tenant_id(tenant)
        from elasticsearch import BadRequestError

        name = index_name(tenant, generation)
        mode = IndexMode(mode)
        expected = D.index_mapping(tenant, generation, mode)
        try:
            with self._translate("create index", name):
                try:
                    self._es.indices.create(
                        index=name,
                        mappings=expected,
                        settings=D.index_settings(shards=self._shards, replicas=self._replicas),
                    )
                except BadRequestError as e:
                    if _api_error_parts(e)[1] != "resource_already_exists_exception":
                        raise
                    raise _AlreadyExists() from None
        except _AlreadyExists:
            data = self._get_index(name)
            if data is None:  # deleted between our create and get: let the caller retry
                raise ServiceUnavailableError(f"index {name} vanished while being created", resource=name) from None
            drift = D.mapping_drift(data.get("mappings") or {}, expected)
            if drift:
                raise SearchError(
                    f"index {name} exists with an incompatible mapping: {'; '.join(drift)}; "
                    "delete it or use a new generation",
                    resource=name,
                ) from None
        with self._modes_lock:
            self._modes[name] = mode
        return name

    def describe_generation(self, index_name: str) -> GenerationInfo | None:
        parse_index_name(index_name)
        data = self._get_index(index_name)
        return None if data is None else self._info(index_name, data)

    def list_generations(self, tenant: str) -> list[GenerationInfo]:
        tenant = check_tenant_id(tenant)
        pattern = index_pattern(tenant)
        with self._translate("list indices", pattern):
            resp = self._es.indices.get(index=pattern, allow_no_indices=True, expand_wildcards="open,closed")
        out = []
        for name, data in dict(resp.body if hasattr(resp, "body") else resp).items():
            try:
                check_index_of(tenant, name)  # the wildcard also matches e.g. acme-corp's indices
            except ValidationError:
                continue
            out.append(self._info(name, data))
        return sorted(out, key=lambda g: g.generation)

    def mark_generation_complete(self, index_name: str, records: int) -> None:
        tenant, generation = parse_index_name(index_name)
        if isinstance(records, bool) or not isinstance(records, int) or records < 0:
            raise ValidationError("records must be a non-negative int")
        mode = self._mode(index_name)
        with self._translate("mark complete", index_name):
            self._es.indices.put_mapping(
                index=index_name, meta=D.generation_meta(tenant, generation, mode, completed_records=records)
            )

    # --- documents -------------------------------------------------------------------

    def _require_index(self, name: str) -> None:
        with self._translate("check index", name):
            exists = bool(self._es.indices.exists(index=name))
        if not exists:
            raise SearchError(f"search index {name} does not exist", resource=name)

    def _batches(self, items: Sequence[Any], size_of: Callable[[Any], int]) -> Iterator[list[Any]]:
        batch: list[Any] = []
        nbytes = 0
        for item in items:
            n = size_of(item)
            if batch and (len(batch) >= self._max_docs or nbytes + n > self._max_bytes):
                yield batch
                batch, nbytes = [], 0
            batch.append(item)
            nbytes += n
        if batch:
            yield batch

    def _send(self, name: str, operations: list[Any]) -> Mapping[str, Any]:
        with self._translate("bulk write", name):
            resp = self._es.bulk(operations=operations, include_source_on_error=False)
        return resp.body if hasattr(resp, "body") else resp

    def _index_ops(self, name: str, docs: Sequence[tuple[IndexDocument, bytes]]) -> list[bytes]:
        """NDJSON lines: each document's source was serialized once, when its batch was
        sized; the client sends bytes lines as they are."""
        ops: list[bytes] = []
        for d, source in docs:
            if d.version is None:
                action: dict[str, Any] = {"create": {"_index": name, "_id": d.doc_id}}
            else:
                action = {"index": {"_index": name, "_id": d.doc_id, "version": d.version, "version_type": "external"}}
            ops.append(D.encode_json(action))
            ops.append(source)
        return ops

    def _merge(self, name: str, results: list[BulkResult]) -> BulkResult:
        return BulkResult(
            index=name,
            indexed=tuple(i for r in results for i in r.indexed),
            skipped=tuple(i for r in results for i in r.skipped),
            failed=tuple(f for r in results for f in r.failed),
            attempts=max((r.attempts for r in results), default=0),
        )

    def bulk_index(self, index_name: str, docs: Sequence[IndexDocument], *, refresh: bool = False) -> BulkResult:
        parse_index_name(index_name)
        docs = list(docs)
        self._require_index(index_name)
        D.check_document_modes(index_name, self._mode(index_name), docs)
        results = []
        encoded = [(d, D.encode_json(d.source)) for d in docs]
        for batch in self._batches(encoded, lambda e: len(e[1]) + 200):
            results.append(
                run_bulk(
                    index_name,
                    batch,
                    doc_id=lambda e: e[0].doc_id,
                    send=lambda b: self._send(index_name, self._index_ops(index_name, b)),
                    max_attempts=self._max_attempts,
                    backoff=self._backoff,
                    sleep=self._sleep,
                )
            )
        if refresh:
            self.refresh(index_name)
        return self._merge(index_name, results)

    def delete_documents(self, index_name: str, doc_ids: Sequence[str], *, refresh: bool = False) -> BulkResult:
        parse_index_name(index_name)
        ids = [str(i) for i in doc_ids]
        self._require_index(index_name)
        results = []
        for batch in self._batches(ids, lambda i: len(i) + 100):
            results.append(
                run_bulk(
                    index_name,
                    batch,
                    doc_id=lambda i: i,
                    send=lambda b: self._send(index_name, [{"delete": {"_index": index_name, "_id": i}} for i in b]),
                    max_attempts=self._max_attempts,
                    backoff=self._backoff,
                    sleep=self._sleep,
                )
            )
        if refresh:
            self.refresh(index_name)
        return self._merge(index_name, results)

    def refresh(self, index_name: str) -> None:
        parse_index_name(index_name)
        with self._translate("refresh", index_name):
            self._es.indices.refresh(index=index_name)

    def count(self, index_name: str) -> int:
        parse_index_name(index_name)
        with self._translate("count", index_name):
            return int(self._es.count(index=index_name)["count"])

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
        if (index is None) != (mode is None):
            raise ValidationError("search: give both index and mode, or neither")
        if index is not None and mode is not None:
            return self._search_bound(tenant, query, keys, index, IndexMode(mode))
        alias = alias_name(tenant)
        # Resolve the alias once and search that concrete index: the query is compiled for
        # its mode, so an alias swap in between must not send it to an index of the other
        # mode. If that index was deleted since (cleanup after a cutover), resolve again.
        for attempt in range(2):
            current = self.current_index(tenant)
            if current is None:
                raise SearchError(f"tenant {tenant} has no search index (alias {alias} is missing)", resource=alias)
            try:
                current_mode = self._mode(current)
            except SearchError:
                if attempt == 0:
                    continue  # deleted between resolving and reading its mapping
                raise
            compiled = D.compile_query(tenant, query, mode=current_mode, keys=keys)
            es_query = (
                {"bool": {"filter": [{"term": {f: v}} for f, v in compiled.terms]}}
                if compiled.terms
                else {"match_all": {}}
            )
            with self._translate("search", alias):
                resp = self._es.options(ignore_status=404 if attempt == 0 else ()).search(
                    index=current,
                    query=es_query,
                    size=compiled.limit,
                    sort=[{f: "asc"} for f in D.SORT_FIELDS],
                    source_includes=["display"],
                    track_total_hits=True,
                )
            if getattr(resp, "meta", None) is None or resp.meta.status != 404:
                break
        # a swap between resolving the alias and searching: decode each hit by its own index's mode
        hits, failures = D.decode_hits(
            tenant=tenant,
            keys=keys,
            mode_of=lambda index: current_mode if index == current else self._mode(index),
            rows=((h["_index"], h["_id"], h.get("_source") or {}) for h in resp["hits"]["hits"]),
            required=compiled.terms,
        )
        total = resp["hits"]["total"]["value"]
        return SearchResult(hits=hits, total=int(total), failures=failures)

    def _search_bound(
        self, tenant: str, query: Query, keys: SearchKeys | None, index: str, mode: IndexMode
    ) -> SearchResult:
        """``index`` in ``mode`` (the caller's record), never in the mode its ``_meta`` claims."""
        check_index_of(tenant, index)
        compiled = D.compile_query(tenant, query, mode=mode, keys=keys)  # keys must fit the *recorded* mode
        D.check_bound_mode(index, mode, self._stored_mode(index))
        es_query = (
            {"bool": {"filter": [{"term": {f: v}} for f, v in compiled.terms]}} if compiled.terms else {"match_all": {}}
        )
        with self._translate("search", index):
            resp = self._es.search(
                index=index,
                query=es_query,
                size=compiled.limit,
                sort=[{f: "asc"} for f in D.SORT_FIELDS],
                source_includes=["display"],
                track_total_hits=True,
            )
        hits, failures = D.decode_hits(
            tenant=tenant,
            keys=keys,
            mode_of=lambda _index: mode,
            rows=((index, h["_id"], h.get("_source") or {}) for h in resp["hits"]["hits"] if h.get("_index") == index),
            required=compiled.terms,
        )
        return SearchResult(hits=hits, total=int(resp["hits"]["total"]["value"]), failures=failures)

    def _stored_mode(self, name: str) -> IndexMode:
        """What the index's ``_meta`` says now (read every time: the cache is for our own writes)."""
        data = self._get_index(name)
        if data is None:
            raise SearchError(f"search index {name} does not exist", resource=name)
        return self._mode_from_meta(D.meta_of(data.get("mappings") or {}) or {}, name)

    def scan(self, index_name: str, keys: SearchKeys | None, *, page_size: int = 1_000) -> Iterator[Hit | HitFailure]:
        mode = self._mode(index_name)
        tenant = D.check_scan_keys(index_name, mode, keys)
        if not 1 <= page_size <= 10_000:
            raise ValidationError("page_size must be between 1 and 10000")
        # A point in time gives one consistent view across pages; search_after on
        # _shard_doc pages through it without the 10,000-hit window of from/size.
        with self._translate("open point in time", index_name):
            pit = self._es.open_point_in_time(index=index_name, keep_alive="2m")["id"]
        try:
            after: list[Any] | None = None
            while True:
                with self._translate("scan", index_name):
                    resp = self._es.search(
                        pit={"id": pit, "keep_alive": "2m"},
                        size=page_size,
                        sort=[{"_shard_doc": "asc"}],
                        source_includes=["display"],
                        query={"match_all": {}},
                        track_total_hits=False,
                        **({"search_after": after} if after is not None else {}),
                    )
                page = resp["hits"]["hits"]
                if not page:
                    return
                pit = resp.get("pit_id", pit)
                hits, failures = D.decode_hits(
                    tenant=tenant,
                    keys=keys,
                    mode_of=lambda _i: mode,
                    rows=((index_name, h["_id"], h.get("_source") or {}) for h in page),
                )
                yield from hits
                yield from failures
                after = page[-1]["sort"]
        finally:
            try:
                self._es.close_point_in_time(id=pit)
            except Exception:  # noqa: BLE001 - best effort: the PIT expires on its own after keep_alive
                log.debug("closing point in time on %s failed", index_name)

    # --- aliases ---------------------------------------------------------------------

    def _alias_targets(self, alias: str) -> list[str]:
        with self._translate("get alias", alias):
            resp = self._es.options(ignore_status=404).indices.get_alias(name=alias)
        body = resp.body if hasattr(resp, "body") else resp
        if not isinstance(body, Mapping) or body.get("status") == 404:
            return []
        return sorted(name for name, data in body.items() if alias in ((data or {}).get("aliases") or {}))

    def current_index(self, tenant: str) -> str | None:
        alias = alias_name(tenant)
        return D.check_alias_targets(check_tenant_id(tenant), alias, self._alias_targets(alias))

    def swap_alias(self, tenant: str, new_index: str, *, expected_current: str | None) -> None:
        tenant = check_tenant_id(tenant)
        from elasticsearch import ApiError

        alias = alias_name(tenant)
        check_index_of(tenant, new_index)
        if expected_current is not None:
            check_index_of(tenant, expected_current)
        self._require_index(new_index)
        current = self.current_index(tenant)
        if current == new_index:
            return  # already swapped: a rerun after a crash (C4)
        if current != expected_current:
            raise AliasConflictError(
                f"alias {alias} points to {current}, not {expected_current}: another swap won; re-read the alias",
                resource=alias,
            )
        actions: list[dict[str, Any]] = []
        if expected_current is not None:
            actions.append({"remove": {"index": expected_current, "alias": alias, "must_exist": True}})
        actions.append({"add": {"index": new_index, "alias": alias, "is_write_index": True}})
        with self._translate("swap alias", alias):
            try:
                self._es.indices.update_aliases(actions=actions)
            except ApiError as e:
                status, etype, reason = _api_error_parts(e)
                if status == 404 or (etype == "illegal_state_exception" and "write index" in reason):
                    # The alias moved between our read and the atomic request. If it moved to
                    # new_index, it was this request: an earlier attempt was applied and its
                    # answer lost (a timeout the client retried), so the swap is done.
                    if self._alias_targets(alias) == [new_index]:
                        log.info("alias %s already points at %s: a retried swap found its own", alias, new_index)
                        return
                    raise AliasConflictError(
                        f"alias {alias} changed during the swap to {new_index} ({etype}): "
                        "another swap won; re-read the alias",
                        resource=alias,
                    ) from None
                raise

    # --- lifecycle -------------------------------------------------------------------

    def set_write_block(self, index_name: str, blocked: bool = True) -> None:
        parse_index_name(index_name)
        with self._translate("write block", index_name):
            if blocked:
                self._es.indices.add_block(index=index_name, block="write")
            else:
                self._es.indices.put_settings(index=index_name, settings={"index.blocks.write": False})

    def delete_index(self, index_name: str) -> None:
        tenant, _ = parse_index_name(index_name)
        if self.current_index(tenant) == index_name:
            raise SearchError(
                f"refusing to delete {index_name}: alias {alias_name(tenant)} points to it", resource=index_name
            )
        with self._translate("delete index", index_name):
            self._es.options(ignore_status=404).indices.delete(index=index_name)
        with self._modes_lock:
            self._modes.pop(index_name, None)


class _AlreadyExists(Exception):
    """Internal signal: the index exists already (not an error by itself)."""
