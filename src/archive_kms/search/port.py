"""The SearchIndex port: one index generation per tenant behind an alias.

Backends: ``search.elasticsearch`` (Elasticsearch 9) and ``search.memory`` (an in-memory
inverted index). Both are held to ``tests/contract/test_search_index_contract.py``.

Names (``search.naming`` over ``domain.tenants``): alias ``archive-<tenant>``, generations
``archive-<tenant>--<gen>``.
Every method validates tenant ids and index names before touching the service, and
refuses names that are not generation indices (no wildcards, no ``_all``).

Contract
--------
- ``create_generation`` creates the index with **strict** mappings (``dynamic: strict``,
  field-count, depth and field-name-length limits) and a ``_meta`` marker (schema, tenant,
  generation, mode). Re-creating an existing generation with the same mapping returns its
  name (idempotent rerun); an existing index whose mapping differs (schema drift, other
  mode) raises ``SearchError`` naming the index (faults.md C9).
- ``bulk_index`` refuses (``IndexModeMismatchError``, before anything is sent) a batch
  with a document whose ``mode`` is not the generation's, or that has no mode: a keyed
  tenant's records never reach its index in clear, whatever a registry column says.
  It writes documents with deterministic ids. A document without a version is
  written with ``op_type=create`` and one with a version uses external versioning, so a
  retried bulk never duplicates and never lets a stale write win: an item the index
  already holds (same or newer) is reported as ``skipped``. Items rejected as retryable
  (HTTP 429, ``es_rejected_execution_exception``, 5xx) are retried per item with backoff;
  all others (mapping errors, a write block) are reported per document in
  ``BulkResult.failed`` while the rest index. ``BulkResult.ok`` is never true when an item
  failed. Writing into a missing index raises ``SearchError`` (never auto-creates one).
- Writes become visible to ``search`` and ``count`` after a refresh: pass
  ``refresh=True`` or call ``refresh(index)``.
- ``search`` goes through the tenant's alias, or, given ``index`` and ``mode``, searches
  that generation of the tenant in that mode (the platform passes both, from its signed
  generation registry: ``operations/search_guard.py``); the index's own ``_meta`` then
  only has to agree (``SearchBindingError`` before any query is sent if it does not).
  Keyed (BYOK) indices need the tenant's ``SearchKeys`` and plaintext indices refuse them
  (``IndexModeMismatchError``): a wiring mistake must not index or query a BYOK tenant in
  clear. Hits are decrypted and authenticated;
  a document that fails authentication is listed in ``SearchResult.failures`` (never
  returned as a hit, never dropped silently). No alias ⇒ ``SearchError``.
- ``current_index`` refuses (``SearchBindingError``) an alias that points at an index not
  named as one of the tenant's generations (``archive-<tenant>--<gen>``).
- ``swap_alias`` is atomic and conditional: it moves the alias from ``expected_current``
  (``None``: the alias must not exist yet) to ``new_index`` in one ``_aliases`` request.
  If the alias is not where the caller expected, or a racing swap got there first,
  ``AliasConflictError`` is raised and the alias still points to exactly one index
  (faults.md C7). Swapping to the index the alias already points to is a no-op (C4 rerun).
- ``delete_index`` refuses to delete the index the alias points to; deleting a missing
  index is a no-op.
- Transport failures, HTTP 429 and 5xx raise ``ServiceUnavailableError`` (retryable);
  other service errors raise ``SearchError`` (terminal) naming the index or alias.
  Messages never contain key material, document contents or query words.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from archive_kms.domain.records import AttachmentRef, FieldValue
from archive_kms.errors import SearchError, ServiceUnavailableError
from archive_kms.search.tokens import SearchKeys


class IndexMode(str, enum.Enum):
    """How a generation stores documents."""

    PLAINTEXT = "plaintext"  # managed tenants: terms and display fields in clear
    KEYED = "keyed"  # BYOK tenants: HMAC tokens, AEAD display field, no plaintext


@dataclass(frozen=True, repr=False)
class IndexDocument:
    """One document ready for the index. ``version=None`` ⇒ create-only. ``mode`` is the
    mode it was built for (``build_document`` sets it): every backend refuses a document
    whose mode is not its generation's, and one without a mode."""

    doc_id: str
    source: Mapping[str, Any]
    version: int | None = None
    mode: IndexMode | None = None

    def __repr__(self) -> str:  # the source may be customer plaintext (plaintext mode)
        mode = self.mode.value if self.mode is not None else None
        return (
            f"IndexDocument(doc_id={self.doc_id!r}, fields={sorted(self.source)}, version={self.version}, mode={mode})"
        )


@dataclass(frozen=True, repr=False)
class Query:
    """Words (all must match) and exact field filters (all must match).

    ``text`` is tokenized like the documents; ``filters`` maps a field API name to a value
    that must equal the record's value after normalisation (case, Unicode, whitespace).
    ``object_type`` restricts to one object type. An empty query lists documents.
    """

    text: str = ""
    filters: Mapping[str, FieldValue] = field(default_factory=dict)
    object_type: str | None = None
    limit: int = 50

    def __repr__(self) -> str:  # query words are customer plaintext
        return (
            f"Query(<{len(self.text)} chars>, filters={sorted(self.filters)}, "
            f"object_type={'<set>' if self.object_type else None}, limit={self.limit})"
        )


@dataclass(frozen=True, repr=False)
class Hit:
    """A record found by a search, decrypted and authenticated."""

    doc_id: str
    index: str
    object_type: str
    record_id: str
    workspace_id: str
    fields: Mapping[str, FieldValue]
    attachments: tuple[AttachmentRef, ...] = ()

    def __repr__(self) -> str:  # field values are customer data: keep them out of logs
        return (
            f"Hit(doc_id={self.doc_id!r}, index={self.index!r}, object_type={self.object_type!r}, "
            f"record_id={self.record_id!r}, {len(self.fields)} fields)"
        )


@dataclass(frozen=True)
class HitFailure:
    """A matching document that could not be authenticated or decoded."""

    doc_id: str
    index: str
    reason: str


@dataclass(frozen=True)
class SearchResult:
    """Hits in a deterministic order (by stored record id, then object type; no relevance
    ranking), the number of matching documents, and documents that failed."""

    hits: list[Hit]
    total: int
    failures: list[HitFailure] = field(default_factory=list)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)


@dataclass(frozen=True)
class BulkItemError:
    doc_id: str
    status: int
    error_type: str
    reason: str  # sanitised: never the document's content
    retryable: bool


@dataclass(frozen=True)
class BulkResult:
    """Per-document outcome of a bulk write."""

    index: str
    indexed: tuple[str, ...] = ()  # written now
    skipped: tuple[str, ...] = ()  # the index already held this version or newer (a retry)
    failed: tuple[BulkItemError, ...] = ()
    attempts: int = 0  # request rounds, retries included

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> None:
        """Raise if any item failed: ``ServiceUnavailableError`` when every failure is
        retryable (retrying the whole bulk is safe), else ``SearchError``."""
        if not self.failed:
            return
        shown = ", ".join(f"{e.doc_id} ({e.status} {e.error_type})" for e in self.failed[:5])
        more = f" and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
        msg = f"bulk write to {self.index}: {len(self.failed)} documents failed: {shown}{more}"
        if all(e.retryable for e in self.failed):
            raise ServiceUnavailableError(msg, resource=self.index)
        raise SearchError(msg, resource=self.index)


@dataclass(frozen=True)
class GenerationInfo:
    """What the index itself says about one generation."""

    index: str
    tenant: str
    generation: int
    mode: IndexMode
    schema: int
    completed_records: int | None  # set by mark_generation_complete
    write_blocked: bool
    is_current: bool  # the tenant's alias points here


@runtime_checkable
class SearchIndex(Protocol):
    """A tenant-partitioned search index with generations behind an alias."""

    def create_generation(self, tenant: str, generation: int, mode: IndexMode) -> str:
        """Create ``archive-<tenant>--<gen>`` with strict mappings; idempotent for an
        identical existing index; ``SearchError`` for an incompatible one."""
        ...

    def describe_generation(self, index_name: str) -> GenerationInfo | None:
        """The generation's marker and state, ``None`` if the index does not exist."""
        ...

    def list_generations(self, tenant: str) -> list[GenerationInfo]:
        """All of the tenant's generation indices, oldest first."""
        ...

    def mark_generation_complete(self, index_name: str, records: int) -> None:
        """Record in the index marker that a rebuild finished with ``records`` documents."""
        ...

    def bulk_index(self, index_name: str, docs: Sequence[IndexDocument], *, refresh: bool = False) -> BulkResult:
        """Write documents; per-item outcome; retryable items retried with backoff."""
        ...

    def delete_documents(self, index_name: str, doc_ids: Sequence[str], *, refresh: bool = False) -> BulkResult:
        """Delete documents by id (erasure); a missing document counts as ``skipped``."""
        ...

    def refresh(self, index_name: str) -> None:
        """Make every acknowledged write visible to search and count."""
        ...

    def count(self, index_name: str) -> int:
        """Documents visible to search in this index (refresh first for an exact count)."""
        ...

    def search(
        self,
        tenant: str,
        query: Query,
        keys: SearchKeys | None,
        *,
        index: str | None = None,
        mode: IndexMode | None = None,
    ) -> SearchResult:
        """Search the tenant's current generation through its alias; or, with ``index`` and
        ``mode`` (both or neither), that generation in that mode, whatever its ``_meta``
        claims (``SearchBindingError`` if the two disagree)."""
        ...

    def scan(self, index_name: str, keys: SearchKeys | None, *, page_size: int = 1_000) -> Iterator[Hit | HitFailure]:
        """Every document of one generation, decoded and authenticated like search hits,
        in pages of ``page_size`` (memory stays bounded; no result-size limit). A document
        that does not authenticate is yielded as a ``HitFailure``. ``IndexModeMismatchError``
        if ``keys`` do not fit the index's mode."""
        ...

    def current_index(self, tenant: str) -> str | None:
        """The index the tenant's alias points to, ``None`` if there is no alias.
        ``SearchError`` if it points to more than one index, ``SearchBindingError`` if
        to an index that is not named as one of the tenant's generations."""
        ...

    def swap_alias(self, tenant: str, new_index: str, *, expected_current: str | None) -> None:
        """Atomically move the alias from ``expected_current`` to ``new_index``;
        ``AliasConflictError`` if the alias is elsewhere."""
        ...

    def set_write_block(self, index_name: str, blocked: bool = True) -> None:
        """Block (or unblock) writes to an index, e.g. the old generation before the final
        delta pass (C5). Blocked writes fail per item with status 403."""
        ...

    def delete_index(self, index_name: str) -> None:
        """Delete a generation that the alias does not point to; no-op if missing."""
        ...
