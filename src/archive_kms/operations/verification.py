"""Verify a tenant where it lives now: every object read end to end, and its records
against its search index.

``verify_tenant`` is what ``archive-kms verify TENANT`` runs (after an onboarding, a
removal, or whenever support wants proof): each object at the tenant's current location
is decrypted and authenticated in full (streaming: one segment per object in flight,
a bounded number of objects at once), and the records found are compared with the
documents behind the tenant's index alias, by count and by id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import IntegrityError, StateError
from archive_kms.operations.archive import RECORD_PREFIX
from archive_kms.operations.platform import Platform
from archive_kms.operations.reading import read_plaintext_digest
from archive_kms.storage import Location

DEFAULT_THREADS = 8
EXAMPLES = 5  # names listed per kind of problem; the counts are exact

#: (workspace, object type, record id): how a record is named in storage and in a hit
RecordKey = tuple[str, str, str]


@dataclass
class _Tally:
    objects: int = 0
    bytes_plaintext: int = 0
    records: set[RecordKey] = field(default_factory=set)
    unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)


def record_key_of(name: bytes) -> RecordKey | None:
    """``records/<workspace>/<type>/<id>`` -> its key; None for attachments."""
    if not name.startswith(RECORD_PREFIX):
        return None
    parts = name.split(b"/", 3)
    if len(parts) != 4:
        return None
    return parts[1].decode(), parts[2].decode(), parts[3].decode()


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


def _read_objects(platform: Platform, tenant_id: str, location: Location, threads: int) -> _Tally:
    store = platform.store_for(location)
    tally = _Tally()

    def read(name: bytes) -> int:
        size, _digest, _dek = read_plaintext_digest(store, platform.keychain, tenant_id, name)
        return size

    def done(name: bytes, future: Future) -> None:  # runs in this thread only: no lock needed
        tally.objects += 1
        try:
            tally.bytes_plaintext += future.result()
        except IntegrityError as exc:  # did not authenticate: that is the finding, not a crash
            tally.unreadable += 1
            if len(tally.unreadable_examples) < EXAMPLES:
                tally.unreadable_examples.append(f"{name[:120]!r}: {type(exc).__name__}")
            return
        key = record_key_of(name)
        if key is not None:
            tally.records.add(key)

    _bounded((info.name for info in store.list()), read, done, threads)
    return tally


def _index_keys(platform: Platform, tenant_id: str, index: str) -> tuple[set[RecordKey], int]:
    """The records held by the documents of ``index`` (every one, decrypted and
    authenticated, paged through by ``scan``) and the number that failed authentication."""
    from archive_kms.search.port import HitFailure

    archive = platform.open_archive(tenant_id)
    keys: set[RecordKey] = set()
    failures = 0
    for item in platform.index.scan(index, archive.search_keys):
        if isinstance(item, HitFailure):
            failures += 1
        else:
            keys.add((item.workspace_id, item.object_type, item.record_id))
    return keys, failures


def _examples(keys: Iterable[RecordKey]) -> list[str]:
    return [f"{ws}/{otype}/{rid}" for ws, otype, rid in sorted(keys)[:EXAMPLES]]


def verify_tenant(platform: Platform, tenant_id: str, *, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Read every object of ``tenant_id`` end to end and reconcile its records with its
    index; ``ok`` only if every object authenticates and records and documents agree."""
    tid = TenantId(tenant_id).value
    tenant = platform.state.get_tenant(tid)
    if tenant is None:
        raise StateError(f"unknown tenant {tid!r}: see `archive-kms tenant list`", resource=f"tenant:{tid}")
    location = Location.from_dict(tenant.location)
    tally = _read_objects(platform, tid, location, threads)
    index = platform.index.current_index(tid)
    documents, failures = 0, 0
    indexed: set[RecordKey] = set()
    if index is not None:
        platform.index.refresh(index)
        documents = platform.index.count(index)
        indexed, failures = _index_keys(platform, tid, index)
    missing = tally.records - indexed
    extra = indexed - tally.records
    ok = (
        tally.unreadable == 0
        and failures == 0
        and index is not None
        and documents == len(tally.records)
        and not missing
        and not extra
    )
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
        "unreadable": tally.unreadable,
        "index_unreadable": failures,
        "examples": {
            "missing_in_index": _examples(missing),
            "extra_in_index": _examples(extra),
            "unreadable": tally.unreadable_examples,
        },
        "ok": ok,
    }


__all__ = ["record_key_of", "verify_tenant"]
