"""Crypto-erasure of a tenant's data, as plain functions the erase flow's steps, the dry
run and the console call (``docs/key-lifecycle.md`` "Erasure").

An erasure has a **scope**: the DEKs of every time bucket that started before a cutoff
(retention: ``--before T``), in every live workspace, or a whole workspace (its L3 key
and every DEK under it). What it covers:

- **keys**: the live DEKs of the scope (``doomed_deks``), destroyed by the keychain
  (``erase_buckets`` / ``erase_workspace``, each with its signed ``ErasureRecord``);
- **storage**: every object whose envelope names one of those DEKs (``covered_objects``:
  the DEK id an object carries in its metadata, confirmed from its envelope header before
  anything is deleted), deleted so the storage is reclaimed;
- **search**: the index documents of those record objects in every generation of the
  tenant's index (``unindex``). Document ids are derived from the object names, under
  both document-id schemes (plaintext SHA-256 and the keyed HMAC), so the documents go
  whichever mode a generation is in. Without this, search would keep returning erased
  records: the display field is sealed under an L2-derived key, not under the DEKs.

``erasure_blast_radius`` counts all three without changing anything (the CLI's
``erase --dry-run`` and the console's blast-radius preview).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from archive_kms.crypto.envelope import read_header
from archive_kms.domain.records import Record
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import (
    ArchiveKmsError,
    IntegrityError,
    KeyUnavailableError,
    ObjectNotFoundError,
    StateError,
    ValidationError,
)
from archive_kms.keys.keychain import bucket_of, parse_dek_id
from archive_kms.keys.keychain.ids import check_workspace
from archive_kms.operations.archive import ATTACHMENT_PREFIX, RECORD_PREFIX
from archive_kms.operations.platform import Platform
from archive_kms.search import IndexMode, derive_search_keys
from archive_kms.search.documents import document_id
from archive_kms.storage import Location, ObjectInfo, ObjectStore

__all__ = [
    "ErasureBlastRadius",
    "ErasureScope",
    "UnindexResult",
    "covered_objects",
    "doomed_deks",
    "erasure_blast_radius",
    "erasure_scope",
    "object_dek_id",
    "record_document_ids",
    "unindex",
]

log = logging.getLogger(__name__)

SCOPES = ("buckets", "workspace")
#: The most document ids one delete request names.
UNINDEX_BATCH = 500


@dataclass(frozen=True)
class ErasureScope:
    """What one erasure covers. ``older_than``: scope ``buckets``; every bucket that started
    before this instant's bucket. ``workspace_id``: scope ``workspace``. ``workspaces``: the
    live workspaces it reaches (the one, or all for ``buckets``)."""

    tenant_id: str
    scope: str
    older_than: datetime | None
    workspace_id: str | None
    workspaces: tuple[str, ...]

    def describe(self) -> str:
        if self.scope == "workspace":
            return f"workspace {self.workspace_id} (its key and every DEK under it)"
        assert self.older_than is not None
        return f"the DEKs of every time bucket before {self.older_than.isoformat(timespec='seconds')}"


def _aware(value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError("--before needs a time with a zone, e.g. 2026-01-31T00:00:00Z")
    return value.astimezone(UTC)


def erasure_scope(
    platform: Platform,
    tenant_id: str,
    *,
    before: datetime | None = None,
    workspace: str | None = None,
    now: datetime | None = None,
) -> ErasureScope:
    """The scope of an erasure of ``tenant_id``: exactly one of ``before`` (retention) and
    ``workspace``. ``ValidationError`` naming what to fix: both or neither given, a cutoff
    in a future bucket (it would destroy the DEK in use: erase the workspace instead), an
    unknown or already erased workspace."""
    tid = TenantId(tenant_id).value
    if platform.state.get_tenant(tid) is None:
        raise StateError(f"unknown tenant {tid!r}: see `archive-kms tenant list`", resource=f"tenant:{tid}")
    if (before is None) == (workspace is None):
        raise ValidationError("name what to erase: --before TIME (retention) or --workspace ID, not both")
    status = platform.keychain.status(tid)
    if workspace is not None:
        ws = check_workspace(workspace)
        if ws in status.erased_workspaces:
            raise ValidationError(f"workspace {ws} of tenant {tid} was erased already")
        if ws not in status.workspaces:
            raise ValidationError(
                f"tenant {tid} has no workspace {ws!r} (it has: {', '.join(status.workspaces) or 'none'})"
            )
        return ErasureScope(tid, "workspace", None, ws, (ws,))
    assert before is not None
    cutoff = _aware(before)
    current = now or datetime.now(UTC)
    if cutoff > current:
        raise ValidationError(
            f"--before {cutoff.isoformat(timespec='seconds')} is in the future: an erasure by time only destroys "
            "buckets that have ended (to erase everything of a workspace, use --workspace)"
        )
    return ErasureScope(tid, "buckets", cutoff, None, tuple(status.workspaces))


def _width(deks: Sequence[Any]) -> int | None:
    """The bucket width of a workspace, from one of its DEKs (``not_after`` is its bucket's end)."""
    for d in deks:
        if d.not_after is not None:
            return int(d.not_after.timestamp()) // (d.bucket + 1)
    return None


def doomed_deks(platform: Platform, scope: ErasureScope) -> dict[str, list[str]]:
    """Per workspace, the live DEK ids the erasure destroys (empty lists left out)."""
    from archive_kms.domain.keychain import KeyRecordState

    out: dict[str, list[str]] = {}
    for ws in scope.workspaces:
        deks = platform.keychain.list_deks(scope.tenant_id, ws)
        live = [d for d in deks if d.state is not KeyRecordState.DESTROYED]
        if scope.scope == "buckets":
            width = _width(deks)
            assert scope.older_than is not None
            if width is None:
                continue
            cut = bucket_of(scope.older_than.timestamp(), width)
            live = [d for d in live if d.bucket < cut]
        if live:
            out[ws] = [d.dek_id for d in live]
    return out


def _cutoffs(platform: Platform, scope: ErasureScope) -> dict[str, int]:
    """Scope ``buckets``: per workspace, the first bucket that survives."""
    out: dict[str, int] = {}
    if scope.scope != "buckets":
        return out
    assert scope.older_than is not None
    for ws in scope.workspaces:
        width = _width(platform.keychain.list_deks(scope.tenant_id, ws))
        if width is not None:
            out[ws] = bucket_of(scope.older_than.timestamp(), width)
    return out


def object_dek_id(store: ObjectStore, name: bytes, *, header: bool = False) -> str | None:
    """The DEK id an object is encrypted under: its ``akms_dek`` metadata (one HEAD), or,
    with ``header`` (or no metadata), the DEK id in its envelope header (the first bytes of
    the object: what decryption uses). None if the object is gone."""
    if not header:
        info = store.head(name)
        if info is None:
            return None
        found = (info.metadata or {}).get("akms_dek")
        if found:
            return found
    try:
        with store.open_read(name) as reader:
            return read_header(reader).dek_id
    except ObjectNotFoundError:
        return None


def _workspace_prefixes(ws: str) -> tuple[bytes, bytes]:
    return RECORD_PREFIX + ws.encode() + b"/", ATTACHMENT_PREFIX + ws.encode() + b"/"


def _covers(dek: str | None, ws: str, cut: int | None) -> bool:
    if dek is None:
        return False
    try:
        dws, bucket, _ = parse_dek_id(dek)
    except ValidationError:
        return False
    return dws == ws and cut is not None and bucket < cut


def covered_objects(platform: Platform, scope: ErasureScope, location: Location) -> Iterator[ObjectInfo]:
    """Every object at ``location`` that the erasure covers. Scope ``workspace``: everything
    under the workspace's prefixes (its key is destroyed). Scope ``buckets``: objects of the
    scope's workspaces whose DEK lies in a bucket before the cutoff; the metadata's DEK id
    picks candidates and the envelope header confirms each (an object is deleted only if
    what decrypts it is erased)."""
    store = platform.store_for(location)
    cuts = _cutoffs(platform, scope)
    for ws in scope.workspaces:
        for prefix in _workspace_prefixes(ws):
            for info in store.list(prefix):
                if scope.scope == "workspace":
                    yield info
                    continue
                cut = cuts.get(ws)
                if _covers(object_dek_id(store, info.name), ws, cut) and _covers(
                    object_dek_id(store, info.name, header=True), ws, cut
                ):
                    yield info


def _record_of(name: bytes) -> Record | None:
    """The record identity an object name stands for (``records/<ws>/<type>/<id>``)."""
    if not name.startswith(RECORD_PREFIX):
        return None
    parts = name.split(b"/", 3)
    if len(parts) != 4 or not all(parts[1:]):
        return None
    try:
        return Record(parts[2].decode(), parts[3].decode(), {}, (), parts[1].decode())
    except (UnicodeDecodeError, ValidationError):
        return None


def record_document_ids(platform: Platform, tenant_id: str, names: Iterable[bytes]) -> list[str]:
    """The index document ids of the record objects among ``names``, under both id schemes
    (plaintext and, when the tenant's keys open, keyed), so a document goes whatever mode its
    generation is in. ``KeyUnavailableError`` if the tenant has a keyed generation but its
    keys cannot be opened (revoked): its keyed ids cannot be computed."""
    keyed = _keyed_ids_needed(platform, tenant_id)
    keys = None
    if keyed:
        keys = derive_search_keys(platform.keychain.search_key_material(tenant_id), tenant_id)
    out: list[str] = []
    for name in names:
        rec = _record_of(name)
        if rec is None:
            continue
        out.append(document_id(tenant_id, rec, None))
        if keys is not None:
            out.append(document_id(tenant_id, rec, keys))
    return out


def _keyed_ids_needed(platform: Platform, tenant_id: str) -> bool:
    t = platform.state.get_tenant(tenant_id)
    modes = {g.mode for g in platform.index.list_generations(tenant_id)}
    from archive_kms.state.port import KeyMode

    return IndexMode.KEYED in modes or (t is not None and t.key_mode is not KeyMode.MANAGED)


@dataclass(frozen=True)
class UnindexResult:
    indices: tuple[str, ...]
    deleted: int  # documents that were there and are gone now
    missing: int  # ids named that no generation held (already gone, or another id scheme)


def unindex(platform: Platform, tenant_id: str, document_ids: Sequence[str]) -> UnindexResult:
    """Delete ``document_ids`` from every generation of the tenant's index (the current one
    and any left over), refreshed so searches stop returning them at once. Idempotent."""
    generations = [g.index for g in platform.index.list_generations(tenant_id)]
    deleted = 0
    named = 0
    for index in generations:
        for i in range(0, len(document_ids), UNINDEX_BATCH):
            batch = list(document_ids[i : i + UNINDEX_BATCH])
            result = platform.index.delete_documents(index, batch, refresh=False)
            result.raise_for_failures()
            deleted += len(result.indexed)
            named += len(batch)
        platform.index.refresh(index)
    return UnindexResult(tuple(generations), deleted, named - deleted)


@dataclass(frozen=True)
class ErasureBlastRadius:
    """What an erasure would destroy and delete, counted without changing anything."""

    tenant: str
    scope: str
    description: str
    location: str
    workspaces: list[str]
    deks: int  # live DEKs destroyed
    objects: int
    bytes: int
    records: int
    attachments: int
    index_documents: int  # documents of those records in the current generation (one per record)
    index: str | None
    queued_jobs: int  # deferred jobs of the tenant (those sealed under an erased DEK never replay)
    running_runs: list[str]
    would: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def erasure_blast_radius(
    platform: Platform,
    tenant_id: str,
    *,
    before: datetime | None = None,
    workspace: str | None = None,
    now: datetime | None = None,
) -> ErasureBlastRadius:
    """The dry run of an erasure: the refusals it would give, and how many DEKs, objects
    (bytes) and index documents it would take. Nothing changes."""
    scope = erasure_scope(platform, tenant_id, before=before, workspace=workspace, now=now)
    tid = scope.tenant_id
    location = platform.location_of(tid)
    deks = doomed_deks(platform, scope)
    objects = records = attachments = size = 0
    for info in covered_objects(platform, scope, location):
        objects += 1
        size += info.size
        if info.name.startswith(RECORD_PREFIX):
            records += 1
        else:
            attachments += 1
    index = platform.index.current_index(tid)
    active = platform.state.find_active_run(tid)
    count = sum(len(v) for v in deks.values())
    would = [
        f"destroy {count} DEK(s) of {scope.describe()} in the keychain of {tid} (signed erasure records)",
        f"delete {objects} object(s) ({size} bytes) they encrypted from {location.uri}",
        f"delete the {records} index document(s) of those records from every generation of {tid}'s index",
        "write a signed erasure record covering keys, storage and index (archive-kms erasure verify FILE)",
    ]
    if scope.scope == "workspace":
        would.insert(1, f"destroy the workspace key of {scope.workspace_id}: the workspace id is never used again")
    return ErasureBlastRadius(
        tenant=tid,
        scope=scope.scope,
        description=scope.describe(),
        location=location.uri,
        workspaces=list(scope.workspaces),
        deks=count,
        objects=objects,
        bytes=size,
        records=records,
        attachments=attachments,
        index_documents=records,
        index=index,
        queued_jobs=platform.state.gate(tid).pending,
        running_runs=[active.run_id] if active is not None else [],
        would=would,
    )


def check_erasable(platform: Platform, tenant_id: str) -> None:
    """Refusals that do not depend on the scope: an unknown tenant; a revoked tenant whose
    index has a keyed generation (its document ids need its keys: restore it first)."""
    t = platform.state.get_tenant(tenant_id)
    if t is None:
        raise StateError(f"unknown tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
    revoked = t.revoked
    try:
        revoked = revoked or platform.keychain.status(tenant_id).revoked
    except ArchiveKmsError as exc:
        raise IntegrityError(f"the keychain of tenant {tenant_id} cannot be read: {exc}") from None
    if revoked and _keyed_ids_needed(platform, tenant_id):
        raise KeyUnavailableError(
            f"tenant {tenant_id} is revoked and its search index is keyed: the erased records' index documents "
            "cannot be found without its keys; restore the tenant, erase, then revoke it again",
            resource=f"tenant:{tenant_id}",
            state="revoked",
        )
