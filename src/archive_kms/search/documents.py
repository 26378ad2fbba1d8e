"""Records → index documents, queries → term filters, stored documents → hits.

Pure code shared by every SearchIndex backend, so Elasticsearch and the in-memory index
store and match exactly the same documents.

Document (both modes; one strict mapping)::

    object_type  keyword   plaintext: normalised type      keyed: token of "t:<type>"
    record_id    keyword   plaintext: the record id        keyed: token of "r:<id>"
    tokens       keyword[] plaintext: "w:…"/"f:…=…" terms  keyed: their HMAC tokens
    display      keyword, not indexed, no doc values
                           plaintext: the record's canonical JSON
                           keyed: base64 of the sealed record (below)

Document id: ``base64url(H(b"archive_kms/v1/doc" || lp(tenant) || lp(workspace) ||
lp(object_type) || lp(record_id)))`` with ``H`` = SHA-256 (plaintext mode) or HMAC-SHA256
under the token key (keyed mode: an unkeyed hash of guessable Salesforce ids would let
anyone confirm which records a BYOK tenant holds).

Sealed display field (keyed mode), version 1::

    0x01 || salt (16) || nonce (12) || AES-256-GCM(K, nonce, padded JSON, AAD) (with 16-byte tag)
    K   = HKDF-SHA256(IKM=display key, salt=salt, info="archive_kms/v1/search/display-doc" || lp(tenant) || lp(doc id))
    AAD = "archive_kms/v1/search/display" || 0x01 || lp(tenant) || lp(doc id)
    padded JSON = canonical record JSON + spaces up to a multiple of 256 bytes

A fresh key per sealing (random salt) keeps the GCM nonce budget out of reach however often
a tenant's index is rebuilt; the AAD binds the ciphertext to its tenant and document, so a
display field copied onto another document or tenant fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from archive_kms.crypto import aes_gcm
from archive_kms.crypto.kdf import hkdf_sha256
from archive_kms.domain.records import Record
from archive_kms.errors import IndexModeMismatchError, IntegrityError, SearchBindingError, SearchError, ValidationError
from archive_kms.search.naming import check_tenant_id
from archive_kms.search.port import Hit, HitFailure, IndexDocument, IndexMode, Query
from archive_kms.search.tokens import (
    SearchKeys,
    TokenMemo,
    check_field_name,
    field_term,
    lp,
    record_term,
    type_term,
    value_terms,
    value_text,
    word_terms,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Bounds on what one record may put into the index (faults.md F18: poisoned documents).
MAX_FIELDS = 800  # Salesforce allows 800 custom fields per object
MAX_VALUE_CHARS = 131_072  # Salesforce long text area maximum
MAX_RECORD_ID_CHARS = 255
MAX_ATTACHMENTS = 1_000
MAX_TERMS = 20_000
MAX_DISPLAY_BYTES = 1024 * 1024
MAX_QUERY_TERMS = 64
MAX_LIMIT = 1_000

DISPLAY_PAD = 256
_DISPLAY_VERSION = 1
_SALT = 16
_NONCE = 12
_TAG = 16
_DOC_LABEL = b"archive_kms/v1/doc"
_DISPLAY_KEY_LABEL = b"archive_kms/v1/search/display-doc"
_DISPLAY_AAD_LABEL = b"archive_kms/v1/search/display"

SORT_FIELDS = ("record_id", "object_type")


# --- index definition --------------------------------------------------------------------


def index_mapping(tenant: str, generation: int, mode: IndexMode) -> dict[str, Any]:
    """The strict mapping of a generation, with its ``_meta`` marker."""
    return {
        "dynamic": "strict",
        "_meta": generation_meta(tenant, generation, mode),
        "properties": {
            "object_type": {"type": "keyword"},
            "record_id": {"type": "keyword"},
            "tokens": {"type": "keyword"},
            "display": {"type": "keyword", "index": False, "doc_values": False},
        },
    }


def generation_meta(tenant: str, generation: int, mode: IndexMode, completed_records: int | None = None) -> dict:
    meta: dict[str, Any] = {"schema": SCHEMA_VERSION, "tenant": tenant, "generation": generation, "mode": mode.value}
    if completed_records is not None:
        meta["completed_records"] = completed_records
    return {"archive_kms": meta}


def index_settings(*, shards: int = 1, replicas: int = 0) -> dict[str, Any]:
    """Index settings; the mapping limits make a poisoned document fail instead of
    growing the mapping (strict mode already refuses new fields)."""
    return {
        "number_of_shards": shards,
        "number_of_replicas": replicas,
        "mapping": {
            "total_fields": {"limit": 16},
            "depth": {"limit": 2},
            "nested_fields": {"limit": 0},
            "field_name_length": {"limit": 64},
        },
        "max_result_window": 10_000,
    }


def mapping_drift(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Differences between an existing index's mapping and the one we would create
    (ignoring the completion marker). Empty list ⇒ compatible."""
    problems = []
    if actual.get("dynamic") != expected.get("dynamic"):
        problems.append(f"dynamic is {actual.get('dynamic')!r}, expected {expected.get('dynamic')!r}")
    a_props, e_props = actual.get("properties", {}), expected.get("properties", {})
    for name in sorted(set(a_props) | set(e_props)):
        if a_props.get(name) != e_props.get(name):
            problems.append(f"field {name!r} is {a_props.get(name)!r}, expected {e_props.get(name)!r}")
    a_meta = dict((actual.get("_meta") or {}).get("archive_kms") or {})
    a_meta.pop("completed_records", None)
    e_meta = (expected.get("_meta") or {}).get("archive_kms") or {}
    if a_meta != e_meta:
        problems.append(f"marker is {a_meta!r}, expected {e_meta!r}")
    return problems


def meta_of(mapping: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = (mapping.get("_meta") or {}).get("archive_kms")
    return dict(meta) if isinstance(meta, Mapping) else None


# --- records → documents -----------------------------------------------------------------


def _check_record(record: Record) -> None:
    if not isinstance(record, Record):
        raise ValidationError("expected an archive_kms.domain.records.Record")
    check_field_name(record.object_type)  # object API names follow the field-name rule
    rid = record.record_id
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_RECORD_ID_CHARS or not rid.isprintable():
        raise ValidationError(f"record id must be 1..{MAX_RECORD_ID_CHARS} printable characters")
    if not isinstance(record.workspace_id, str) or not record.workspace_id or not record.workspace_id.isprintable():
        raise ValidationError("workspace id must be a printable, non-empty str")
    if len(record.fields) > MAX_FIELDS:
        raise ValidationError(f"record {record.object_type}/{rid} has {len(record.fields)} fields (max {MAX_FIELDS})")
    for name, value in record.fields.items():
        check_field_name(name)
        text = value_text(value)
        if text is not None and len(text) > MAX_VALUE_CHARS:
            raise ValidationError(
                f"record {record.object_type}/{rid}: field {name} is longer than {MAX_VALUE_CHARS} characters"
            )
    if len(record.attachments) > MAX_ATTACHMENTS:
        raise ValidationError(f"record {record.object_type}/{rid} has more than {MAX_ATTACHMENTS} attachments")


def document_id(tenant: str, record: Record, keys: SearchKeys | None) -> str:
    """Deterministic id: the same record always maps to the same document (C6)."""
    tenant = check_tenant_id(tenant)
    data = (
        _DOC_LABEL
        + lp(tenant.encode())
        + lp(record.workspace_id.encode())
        + lp(record.object_type.encode())
        + lp(record.record_id.encode())
    )
    digest = keys.mac(data) if keys is not None else hashlib.sha256(data).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def record_terms(record: Record) -> set[str]:
    """Every plaintext term of a record: words of values, exact field values, words of
    attachment file names."""
    terms: set[str] = set()
    for name, value in record.fields.items():
        value_words, exact = value_terms(name, value)
        terms |= value_words
        if exact:
            terms.add(exact)
    for att in record.attachments:
        terms |= word_terms(att.file_name)
    return terms


def _check_mode_keys(tenant: str, mode: IndexMode, keys: SearchKeys | None) -> None:
    mode = IndexMode(mode)
    if mode is IndexMode.KEYED:
        if not isinstance(keys, SearchKeys):
            raise IndexModeMismatchError(f"keyed index of tenant {tenant!r} needs the tenant's SearchKeys")
        if keys.tenant != tenant:
            raise ValidationError(f"search keys of tenant {keys.tenant!r} used for tenant {tenant!r}")
    elif keys is not None:
        raise IndexModeMismatchError(
            f"plaintext index of tenant {tenant!r} was given SearchKeys: a keyed tenant "
            "must not be indexed or queried in clear"
        )


def build_document(
    record: Record,
    *,
    tenant: str,
    mode: IndexMode,
    keys: SearchKeys | None,
    version: int | None = None,
    memo: TokenMemo | None = None,
) -> IndexDocument:
    """The index document of ``record``. ``ValidationError`` for a record that breaks
    the bounds above (reported per record by callers, never indexed). ``memo``: tokens
    already computed with the same ``keys`` (a rebuild's; the document is the same)."""
    tenant = check_tenant_id(tenant)
    mode = IndexMode(mode)
    _check_mode_keys(tenant, mode, keys)
    if memo is not None and not memo.keys_are(keys):
        raise ValidationError("a token memo is used only with the SearchKeys it was made for")
    _check_record(record)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63):
        raise ValidationError("document version must be a non-negative 64-bit int")
    terms = record_terms(record)
    if len(terms) > MAX_TERMS:
        raise ValidationError(
            f"record {record.object_type}/{record.record_id} has {len(terms)} distinct terms (max {MAX_TERMS})"
        )
    display = record.to_json()
    if len(display) > MAX_DISPLAY_BYTES:
        raise ValidationError(
            f"record {record.object_type}/{record.record_id} is {len(display)} bytes (max {MAX_DISPLAY_BYTES})"
        )
    doc_id = document_id(tenant, record, keys)
    source: dict[str, Any] = _indexed_fields(record, mode, keys if memo is None else memo, terms)
    if mode is IndexMode.PLAINTEXT:
        source["display"] = display.decode("utf-8")
    else:
        assert keys is not None
        source["display"] = seal_display(display, tenant=tenant, doc_id=doc_id, keys=keys)
    return IndexDocument(doc_id=doc_id, source=source, version=version, mode=mode)


def _indexed_fields(
    record: Record, mode: IndexMode, keys: SearchKeys | TokenMemo | None, terms: set[str] | None = None
) -> dict[str, Any]:
    """The searchable fields of ``record``'s document (everything but ``display``)."""
    terms = record_terms(record) if terms is None else terms
    if mode is IndexMode.PLAINTEXT:
        return {
            "object_type": type_term(record.object_type)[2:],
            "record_id": record.record_id,
            "tokens": sorted(terms),
        }
    assert keys is not None
    return {
        "object_type": keys.keyed(type_term(record.object_type)),
        "record_id": keys.keyed(record_term(record.record_id)),
        "tokens": keys.keyed_all(terms),
    }  # sorted by token: no word order survives


def _check_matches(
    record: Record,
    mode: IndexMode,
    keys: SearchKeys | None,
    required: Sequence[tuple[str, str]],
    index: str,
    doc_id: str,
) -> None:
    """The hit's own authenticated record must carry every term the query matched on.
    Only ``display`` is sealed; the searchable fields of a document are not, so someone
    who can write to the index could copy one record's tokens onto another and make it
    answer queries it does not match. Recomputing the terms from the record closes that."""
    own = _indexed_fields(record, mode, keys)
    for field_name, value in required:
        held = own.get(field_name)
        if value != held and not (isinstance(held, list) and value in held):
            raise IntegrityError(
                f"document {doc_id} in {index} matched the query on index terms its own record "
                "does not have (the index was altered)",
                resource=index,
            )


# --- display field -----------------------------------------------------------------------


def _display_key(keys: SearchKeys, salt: bytes, tenant: str, doc_id: str) -> bytes:
    info = _DISPLAY_KEY_LABEL + lp(tenant.encode()) + lp(doc_id.encode())
    return hkdf_sha256(keys.display_key_material().reveal(), info=info, salt=salt)


def _display_aad(tenant: str, doc_id: str) -> bytes:
    return _DISPLAY_AAD_LABEL + bytes([_DISPLAY_VERSION]) + lp(tenant.encode()) + lp(doc_id.encode())


def seal_display(plaintext: bytes, *, tenant: str, doc_id: str, keys: SearchKeys) -> str:
    """Encrypt a record's JSON for the display field (base64 text)."""
    # JSON ignores trailing whitespace, so padding needs no length field; it hides the
    # exact record size within DISPLAY_PAD bytes.
    padded = plaintext + b" " * (-len(plaintext) % DISPLAY_PAD)
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    ct = aes_gcm.seal(_display_key(keys, salt, tenant, doc_id), nonce, padded, _display_aad(tenant, doc_id))
    return base64.b64encode(bytes([_DISPLAY_VERSION]) + salt + nonce + ct).decode("ascii")


def open_display(blob: str, *, tenant: str, doc_id: str, keys: SearchKeys) -> bytes:
    """Decrypt and authenticate a display field; ``IntegrityError`` on any failure."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise IntegrityError(f"display field of document {doc_id} is not base64", resource=doc_id) from None
    if len(raw) < 1 + _SALT + _NONCE + _TAG or len(raw) > MAX_DISPLAY_BYTES + DISPLAY_PAD + 64:
        raise IntegrityError(f"display field of document {doc_id} has an impossible length", resource=doc_id)
    if raw[0] != _DISPLAY_VERSION:
        raise IntegrityError(f"display field of document {doc_id} has unknown version {raw[0]}", resource=doc_id)
    salt, nonce, ct = raw[1 : 1 + _SALT], raw[1 + _SALT : 1 + _SALT + _NONCE], raw[1 + _SALT + _NONCE :]
    try:
        return aes_gcm.unseal(_display_key(keys, salt, tenant, doc_id), nonce, ct, _display_aad(tenant, doc_id))
    except aes_gcm.TagMismatch:
        raise IntegrityError(
            f"display field of document {doc_id} failed authentication (tampered, or "
            "sealed for another document, tenant or key)",
            resource=doc_id,
        ) from None


# --- queries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledQuery:
    """Term filters (``(field, value)`` pairs, all must match) and a size limit."""

    terms: tuple[tuple[str, str], ...]
    limit: int


def compile_query(tenant: str, query: Query, *, mode: IndexMode, keys: SearchKeys | None) -> CompiledQuery:
    """Turn a query into term filters on the stored fields, keyed like the documents."""
    tenant = check_tenant_id(tenant)
    mode = IndexMode(mode)
    _check_mode_keys(tenant, mode, keys)
    if not isinstance(query, Query):
        raise ValidationError("expected a search.port.Query")
    if isinstance(query.limit, bool) or not isinstance(query.limit, int) or not 1 <= query.limit <= MAX_LIMIT:
        raise ValidationError(f"query limit must be 1..{MAX_LIMIT}")
    if not isinstance(query.text, str):
        raise ValidationError("query text must be a str")
    terms = word_terms(query.text)
    if query.text.strip() and not terms:
        raise ValidationError("query text has no searchable words (letters or digits)")
    for name, value in query.filters.items():
        term = field_term(name, value)
        if term is None:
            raise ValidationError(
                f"filter on {name} needs a non-empty value of at most "
                "256 characters; search longer values by their words"
            )
        terms.add(term)
    if len(terms) > MAX_QUERY_TERMS:
        raise ValidationError(f"query has {len(terms)} terms (max {MAX_QUERY_TERMS})")
    pairs: list[tuple[str, str]] = []
    if query.object_type is not None:
        check_field_name(query.object_type)
        t = type_term(query.object_type)
        pairs.append(("object_type", keys.keyed(t) if keys else t[2:]))
    for t in sorted(terms):
        pairs.append(("tokens", keys.keyed(t) if keys else t))
    return CompiledQuery(terms=tuple(pairs), limit=query.limit)


# --- stored documents → hits -------------------------------------------------------------


def decode_hit(
    *,
    tenant: str,
    mode: IndexMode,
    keys: SearchKeys | None,
    index: str,
    doc_id: str,
    source: Mapping[str, Any],
    required: Sequence[tuple[str, str]] = (),
) -> Hit:
    """Rebuild the record of a stored document; ``IntegrityError`` if it does not
    authenticate (keyed mode), does not match its id, or lacks a ``required`` term (the
    compiled query it was found by) (either mode)."""
    tenant = check_tenant_id(tenant)
    mode = IndexMode(mode)
    _check_mode_keys(tenant, mode, keys)
    blob = source.get("display")
    if not isinstance(blob, str):
        raise IntegrityError(f"document {doc_id} in {index} has no display field", resource=index)
    if mode is IndexMode.KEYED:
        assert keys is not None
        plaintext = open_display(blob, tenant=tenant, doc_id=doc_id, keys=keys)
    else:
        plaintext = blob.encode("utf-8")
    try:
        record = Record.from_json(plaintext)
    except (ValueError, TypeError, AttributeError, ValidationError):
        raise IntegrityError(f"document {doc_id} in {index} has a malformed display field", resource=index) from None
    if document_id(tenant, record, keys) != doc_id:
        # The display field belongs to another record (or tenant): never return it.
        raise IntegrityError(f"document {doc_id} in {index} holds another record's display field", resource=index)
    if required:
        _check_matches(record, mode, keys, required, index, doc_id)
    return Hit(
        doc_id=doc_id,
        index=index,
        object_type=record.object_type,
        record_id=record.record_id,
        workspace_id=record.workspace_id,
        fields=dict(record.fields),
        attachments=record.attachments,
    )


def check_scan_keys(index_name: str, mode: IndexMode, keys: SearchKeys | None) -> str:
    """The tenant of ``index_name``, after checking ``keys`` fit its mode (``scan``)."""
    from archive_kms.search.naming import parse_index_name

    tenant, _ = parse_index_name(index_name)
    _check_mode_keys(tenant, IndexMode(mode), keys)
    return tenant


def decode_hits(
    *,
    tenant: str,
    keys: SearchKeys | None,
    rows: Iterable[tuple[str, str, Mapping[str, Any]]],
    mode_of: Callable[[str], IndexMode],
    required: Sequence[tuple[str, str]] = (),
) -> tuple[list[Hit], list[HitFailure]]:
    """Decode ``(index, doc_id, source)`` rows the way every backend must: a document that
    does not authenticate or decode becomes a ``HitFailure`` (logged by id, never by
    content) and the others are still returned."""
    hits: list[Hit] = []
    failures: list[HitFailure] = []
    for index, doc_id, source in rows:
        try:
            hits.append(
                decode_hit(
                    tenant=tenant,
                    mode=mode_of(index),
                    keys=keys,
                    index=index,
                    doc_id=doc_id,
                    source=source,
                    required=required,
                )
            )
        except (IntegrityError, ValidationError) as e:
            log.warning("search hit %s in %s failed verification: %s", doc_id, index, type(e).__name__)
            failures.append(HitFailure(doc_id=doc_id, index=index, reason=str(e)))
    return hits, failures


def check_document_modes(index: str, mode: IndexMode, docs: Sequence[IndexDocument]) -> None:
    """``IndexModeMismatchError`` (nothing sent) if a document was built for another mode
    than ``index``'s, or carries none: the writes every backend refuses."""
    mode = IndexMode(mode)
    wrong = [d for d in docs if d.mode is not mode]
    if wrong:
        how = "without a mode" if any(d.mode is None for d in wrong) else "for the other mode"
        log.error("refusing %d document(s) built %s for %s index %s", len(wrong), how, mode.value, index)
        raise IndexModeMismatchError(
            f"refusing to write {len(wrong)} document(s) into {mode.value} index {index}: they were built {how} "
            "(a keyed tenant's records never go into an index in clear, nor into another mode's index)",
            resource=index,
        )


def check_alias_targets(tenant: str, alias: str, targets: Sequence[str]) -> str | None:
    """The one index ``alias`` points to, ``None`` for none; ``SearchError`` for several,
    ``SearchBindingError`` for an index not named as one of ``tenant``'s generations."""
    from archive_kms.search.naming import check_index_of

    if len(targets) > 1:
        raise SearchError(f"alias {alias} points to {len(targets)} indices: {sorted(targets)}", resource=alias)
    for name in targets:
        try:
            check_index_of(tenant, name)
        except ValidationError:
            raise SearchBindingError(
                f"alias {alias} points to {name[:120]!r}, which is not one of tenant {tenant}'s index "
                "generations: refusing to search or write it",
                resource=alias,
            ) from None
    return targets[0] if targets else None


def check_bound_mode(index: str, recorded: IndexMode, stored: IndexMode) -> None:
    """The mode the caller recorded for ``index`` against what the index's ``_meta`` says:
    ``SearchBindingError`` if they differ (the index was replaced or its marker edited)."""
    if IndexMode(recorded) is not IndexMode(stored):
        raise SearchBindingError(
            f"index {index} says it is {IndexMode(stored).value} but it was created {IndexMode(recorded).value}: "
            "it was replaced or its marker edited; nothing was sent to it",
            resource=index,
        )


def encode_json(source: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: the line a bulk request sends for a document, and its size."""
    return json.dumps(source, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
