"""Verify a tenant where it lives now: every object read end to end, and its records
against its search index.

``verify_tenant`` is what ``archive-kms verify TENANT`` runs (after an onboarding, a
removal, or whenever support wants proof): each object at the tenant's current location
is decrypted and authenticated in full (streaming: one segment per object in flight,
a bounded number of objects at once), and the records found are compared with the
documents behind the tenant's index alias, by id and by content.

It never stops at the first bad object: every object it could not read, and every
disagreement between storage and index, is reported with a reason (``REASONS``) and a
sentence saying what it likely means. What it proves and what it compares against is in
``docs/migration-flows.md`` ("What verify proves").
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from archive_kms.crypto.envelope import read_header
from archive_kms.domain.records import Record
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import (
    ArchiveKmsError,
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyUnavailableError,
    ObjectNotFoundError,
    StateError,
    TransientError,
    ValidationError,
)
from archive_kms.operations.archive import RECORD_PREFIX
from archive_kms.operations.platform import Platform
from archive_kms.operations.reading import read_plaintext_digest
from archive_kms.storage import Location
from archive_kms.storage.name_limits import display

DEFAULT_THREADS = 8
EXAMPLES = 5  # names listed per kind of problem under "examples"; ``problems`` lists every one

#: (workspace, object type, record id): how a record is named in storage and in a hit
RecordKey = tuple[str, str, str]

#: Every reason a problem can have, and what it means.
REASONS = {
    "authentication_failed": "the object does not authenticate (altered, truncated, or bound to another name/tenant)",
    "dek_erased": "the object is under a crypto-erased DEK",
    "dek_unknown": "the object names a DEK this tenant's keychain never had",
    "key_unavailable": "a key the object needs cannot be used now (revoked tenant, disabled customer key)",
    "keychain_tampered": "the tenant's keychain failed its signature or rollback check",
    "not_an_archive_object": "the name is not one the archive writes",
    "missing": "the object was listed but is gone when read",
    "read_failed": "the storage did not answer for this object (after retries)",
    "not_indexed": "a stored record has no document in the index",
    "index_only": "the index has a document for a record that is not in storage",
    "index_mismatch": "the index document's record differs from the stored record",
    "index_unreadable": "an index document does not authenticate or decode",
}


@dataclass(frozen=True)
class Problem:
    object: str  # the object name (or index document id) as support can copy it
    reason: str  # a key of REASONS
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"object": self.object, "reason": self.reason, "detail": self.detail}


@dataclass
class _Tally:
    objects: int = 0
    bytes_plaintext: int = 0
    records: dict[RecordKey, tuple[str, str]] = field(default_factory=dict)  # -> (name shown, plaintext sha256)
    problems: list[Problem] = field(default_factory=list)
    unreadable: int = 0
    unreadable_records: set[RecordKey] = field(default_factory=set)
    unreadable_examples: list[str] = field(default_factory=list)


def record_key_of(name: bytes) -> RecordKey | None:
    """``records/<workspace>/<type>/<id>`` -> its key; None for attachments."""
    if not name.startswith(RECORD_PREFIX):
        return None
    parts = name.split(b"/", 3)
    if len(parts) != 4:
        return None
    try:
        return parts[1].decode(), parts[2].decode(), parts[3].decode()
    except UnicodeDecodeError:
        return None


def _bounded(
    items: Iterable[bytes], work: Callable[[bytes], Any], on_done: Callable[[bytes, Future], None], threads: int
) -> None:
    """``work`` over ``items`` with at most ``2 * threads`` in flight (the listing is consumed lazily)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="akms-verify") as pool:
        pending: dict[Future, bytes] = {}
        for item in items:
            pending[pool.submit(work, item)] = item
            if len(pending) >= threads * 2:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    on_done(pending.pop(f), f)
        for f in list(pending):
            on_done(pending.pop(f), f)


def _dek_of(store: Any, name: bytes) -> str | None:
    """The DEK id an object's header names (not authenticated: for the report only)."""
    try:
        with store.open_read(name) as reader:
            return read_header(io.BytesIO(reader.read(1024))).dek_id
    except (ArchiveKmsError, OSError):
        return None


def _classify(store: Any, name: bytes, exc: ArchiveKmsError) -> tuple[str, str]:
    """(reason, detail) of an object that could not be read."""
    why = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, KeyDestroyedError):
        dek = _dek_of(store, name)
        return (
            "dek_erased",
            f"its DEK {dek or '(unknown)'} was crypto-erased, so this cannot be a current object of the tenant: most "
            "likely a stale or replayed copy (written back from a backup, or an old version from before a migration "
            "re-encrypted the tenant). Nothing can decrypt it; delete it once investigated",
        )
    if isinstance(exc, KeychainTamperedError):
        return "keychain_tampered", why
    if isinstance(exc, KeyNotFoundError):
        dek = _dek_of(store, name)
        return (
            "dek_unknown",
            f"its header names DEK {dek or '(unreadable)'}, which this tenant's keychain never had: an object "
            "from elsewhere or a forged header",
        )
    if isinstance(exc, KeyUnavailableError):
        return "key_unavailable", why
    if isinstance(exc, IntegrityError):
        return "authentication_failed", why
    if isinstance(exc, ObjectNotFoundError):
        return "missing", "listed, then gone when read (deleted meanwhile)"
    if isinstance(exc, ValidationError):
        return "not_an_archive_object", why
    if isinstance(exc, TransientError):
        return "read_failed", why
    return "read_failed", why


def _read_objects(platform: Platform, tenant_id: str, location: Location, threads: int) -> _Tally:
    store = platform.store_for(location)
    tally = _Tally()

    def read(name: bytes) -> tuple[int, str]:
        size, digest, _dek = read_plaintext_digest(store, platform.keychain, tenant_id, name)
        return size, digest

    def done(name: bytes, future: Future) -> None:  # runs in this thread only: no lock needed
        tally.objects += 1
        try:
            size, digest = future.result()
        except ArchiveKmsError as exc:  # the finding, not a crash: go on with the next object
            tally.unreadable += 1
            reason, detail = _classify(store, name, exc)
            tally.problems.append(Problem(display(name, 300), reason, detail))
            if len(tally.unreadable_examples) < EXAMPLES:
                tally.unreadable_examples.append(f"{name[:120]!r}: {reason}")
            key = record_key_of(name)
            if key is not None:
                tally.unreadable_records.add(key)
            return
        tally.bytes_plaintext += size
        key = record_key_of(name)
        if key is not None:
            tally.records[key] = (display(name, 300), digest)

    _bounded((info.name for info in store.list()), read, done, threads)
    return tally


def _index_records(
    platform: Platform, tenant_id: str, index: str
) -> tuple[dict[RecordKey, tuple[str, str]], list[Problem]]:
    """The records held by the documents of ``index`` (every one, decrypted and
    authenticated, paged through by ``scan``): key -> (document id, SHA-256 of the record
    as stored), and the documents that failed."""
    from archive_kms.search.port import HitFailure

    archive = platform.open_archive(tenant_id)
    found: dict[RecordKey, tuple[str, str]] = {}
    failures: list[Problem] = []
    for item in platform.index.scan(index, archive.search_keys):
        if isinstance(item, HitFailure):
            failures.append(Problem(f"document {item.doc_id}", "index_unreadable", item.reason[:300]))
            continue
        record = Record(item.object_type, item.record_id, dict(item.fields), tuple(item.attachments), item.workspace_id)
        found[(item.workspace_id, item.object_type, item.record_id)] = (
            item.doc_id,
            hashlib.sha256(record.to_json()).hexdigest(),
        )
    return found, failures


def _examples(keys: Iterable[RecordKey]) -> list[str]:
    return [f"{ws}/{otype}/{rid}" for ws, otype, rid in sorted(keys)[:EXAMPLES]]


def verify_tenant(platform: Platform, tenant_id: str, *, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Read every object of ``tenant_id`` end to end and reconcile its records with its
    index; ``ok`` only if every object authenticates and records and documents agree in
    number, ids and content. Never stops at a bad object: ``problems`` lists every one."""
    tid = TenantId(tenant_id).value
    tenant = platform.state.get_tenant(tid)
    if tenant is None:
        raise StateError(f"unknown tenant {tid!r}: see `archive-kms tenant list`", resource=f"tenant:{tid}")
    location = Location.from_dict(tenant.location)
    tally = _read_objects(platform, tid, location, threads)
    index = platform.index.current_index(tid)
    documents = 0
    indexed: dict[Any, Any] = {}
    index_failures: list[Any] = []
    if index is not None:
        platform.index.refresh(index)
        documents = platform.index.count(index)
        indexed, index_failures = _index_records(platform, tid, index)
    stored = set(tally.records)
    missing = stored - set(indexed)  # stored records without a document
    extra = set(indexed) - stored  # documents without a stored (readable) record
    problems = list(tally.problems)
    for key in sorted(missing):
        problems.append(Problem(tally.records[key][0], "not_indexed", REASONS["not_indexed"]))
    for key in sorted(extra - tally.unreadable_records):  # an unreadable object is reported once, above
        problems.append(
            Problem(
                f"records/{'/'.join(key)} (document {indexed[key][0]})",
                "index_only",
                "the index answers for this record but storage does not hold it (lost object, or a document "
                "added to the index by hand)",
            )
        )
    mismatched = 0
    for key in sorted(stored & set(indexed)):
        if tally.records[key][1] != indexed[key][1]:
            mismatched += 1
            problems.append(
                Problem(
                    tally.records[key][0],
                    "index_mismatch",
                    f"document {indexed[key][0]} holds other fields than the stored record (the index was altered, "
                    "or the record object was replaced)",
                )
            )
    problems += index_failures
    ok = not problems and index is not None and documents == len(tally.records)
    return {
        "tenant": tid,
        "location": location.uri,
        "index": index,
        "objects": tally.objects,
        "bytes_plaintext": tally.bytes_plaintext,
        "records": len(tally.records),
        "index_documents": documents,
        "missing_in_index": len(missing),
        "extra_in_index": len(extra),
        "index_mismatched": mismatched,
        "unreadable": tally.unreadable,
        "index_unreadable": len(index_failures),
        "problem_counts": dict(sorted(Counter(p.reason for p in problems).items())),
        "problems": [p.to_dict() for p in problems],
        "examples": {
            "missing_in_index": _examples(missing),
            "extra_in_index": _examples(extra),
            "unreadable": tally.unreadable_examples,
        },
        "ok": ok,
    }


__all__ = ["REASONS", "Problem", "record_key_of", "verify_tenant"]
