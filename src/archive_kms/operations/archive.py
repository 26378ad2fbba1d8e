"""Archive jobs: write a batch of records and attachments into a tenant's current
location, encrypted under its keychain, and index them — exactly once.

A job has an idempotency id. The gate (state store) decides: RUN now, DEFERRED (the
tenant is paused: the job spec is stored durably and replayed after resume), or
DUPLICATE (already done, running or queued). Writes are conditional creates, index
document ids are deterministic, so a job retried after a crash archives once.

A job's *spec* (``JobSpec``) is what gets deferred: records inline (small JSON) and
attachment bytes by reference to a durable source (a file path, or the synthetic
generator's seed). Attachment bytes are never put in the state store, and neither is
record content in clear: the gate keeps clear metadata (kind, counts, a keyed digest) and
the content sealed under the tenant's keychain (``seal_job``), bound to tenant and job id;
the store purges the seal when the job is replayed (``docs/archive-jobs.md``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from archive_kms.crypto.envelope import (
    EnvelopeHeader,
    ObjectBinding,
    decrypt_iter,
    decrypt_to_bytes,
    encrypt_bytes,
    encrypt_iter,
    read_header,
)
from archive_kms.crypto.kdf import hkdf_sha256
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.records import AttachmentData, AttachmentRef, Record
from archive_kms.errors import (
    IndexModeMismatchError,
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    StateError,
    ValidationError,
)
from archive_kms.keys.keychain import DataKey
from archive_kms.search import IndexMode, SearchIndex, SearchKeys
from archive_kms.state.port import Admission, AuditEvent, AuditLog, DeferredJob, Fence, GateRepo, JobState
from archive_kms.storage.port import ObjectStore

log = logging.getLogger(__name__)


class ArchiveKeychain(Protocol):
    """The slice of the keychain archive jobs use: encrypt under the active DEK, open an
    object by its header, derive the job-digest key."""

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK of ``workspace_id`` for ``now``'s time bucket (created on demand)."""
        ...

    def dek_for_header(self, header: EnvelopeHeader) -> SecretBytes:
        """The DEK an envelope header names, checked against the header's workspace."""
        ...

    def search_key_material(self, tenant_id: str) -> SecretBytes:
        """Key material derived from the tenant key for search and job-digest keys."""
        ...


class JobGate(GateRepo, AuditLog, Protocol):
    """The gate, the job records and the audit log: the state archive jobs use."""


JOB_ACTOR = "archive-writer"  # the audit actor of archive jobs submitted by the platform's writer

RECORD_PREFIX = b"records/"
ATTACHMENT_PREFIX = b"attachments/"


def record_object_name(record: Record) -> bytes:
    """``records/<workspace>/<object type>/<record id>``: opaque bytes in the tenant's location."""
    return b"/".join(
        (
            RECORD_PREFIX.rstrip(b"/"),
            record.workspace_id.encode(),
            record.object_type.encode(),
            record.record_id.encode(),
        )
    )


def attachment_object_name(workspace_id: str, attachment_id: str) -> bytes:
    return b"/".join((ATTACHMENT_PREFIX.rstrip(b"/"), workspace_id.encode(), attachment_id.encode()))


def workspace_of(name: bytes) -> str:
    """The workspace an object name belongs to (second path element)."""
    parts = name.split(b"/")
    if len(parts) < 3 or parts[0] not in (b"records", b"attachments"):
        raise ValidationError(f"not an archive object name: {name[:80]!r}")
    return parts[1].decode()


# --- job specs: what a deferred job keeps --------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """A replayable description of an archive job.

    ``kind`` is ``inline`` (records given, attachments from files) or ``synthetic``
    (records and attachment bytes from the deterministic generator)."""

    job_id: str
    tenant_id: str
    kind: str
    records: tuple[Mapping[str, Any], ...] = ()
    attachment_files: Mapping[str, str] = field(default_factory=dict)  # attachment_id -> path
    synthetic: Mapping[str, Any] = field(default_factory=dict)  # {"count", "seed", "offset", "mix"}

    def to_payload(self) -> dict[str, Any]:
        """The whole spec as JSON, records included: never queued any more (``seal_job``);
        ``from_payload`` still reads it, for rows an earlier version queued this way."""
        return {
            "kind": self.kind,
            "records": list(self.records),
            "attachment_files": dict(self.attachment_files),
            "synthetic": dict(self.synthetic),
        }

    @classmethod
    def from_payload(cls, job_id: str, tenant_id: str, payload: Mapping[str, Any]) -> JobSpec:
        return cls(
            job_id,
            tenant_id,
            payload["kind"],
            tuple(payload.get("records") or ()),
            dict(payload.get("attachment_files") or {}),
            dict(payload.get("synthetic") or {}),
        )

    def materialise(self) -> Iterator[tuple[Record, list[AttachmentData]]]:
        """The job's records with their attachment streams."""
        if self.kind == "synthetic":
            from archive_kms.synthetic import SizeMix, generate_records

            mix = {"small": SizeMix.small, "default": SizeMix, "large": SizeMix.large}[
                self.synthetic.get("mix", "small")
            ]()
            offset = int(self.synthetic.get("offset", 0))
            gen = generate_records(
                self.tenant_id,
                offset + int(self.synthetic["count"]),
                seed=int(self.synthetic.get("seed", 0)),
                mix=mix,
                workspaces=int(self.synthetic.get("workspaces", 1)),
            )
            for i, item in enumerate(gen):
                if i >= offset:
                    yield item
            return
        if self.kind != "inline":
            raise ValidationError(f"job {self.job_id}: unknown job kind {self.kind!r} (inline|synthetic)")
        for raw in self.records:
            record = Record.from_json(raw)
            atts = []
            for ref in record.attachments:
                path = self.attachment_files.get(ref.attachment_id)
                if path is None:
                    raise ValidationError(
                        f"job {self.job_id}: attachment {ref.attachment_id} of record "
                        f"{record.record_id} has no file; give it with the job"
                    )
                atts.append(AttachmentData(ref, functools.partial(_read_file, path)))
            yield record, atts


def _read_file(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            yield block


def load_jsonl(path: str | Path, *, job_id: str, tenant_id: str) -> JobSpec:
    """A job from a JSONL file: one record per line; attachments as
    ``{"attachment_id", "file_name", "size", "path"}`` entries in ``attachments``."""
    records, files = [], {}
    base = Path(path).parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValidationError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            for att in obj.get("attachments") or ():
                p = att.pop("path", None)
                if p is not None:
                    full = (base / p) if not Path(p).is_absolute() else Path(p)
                    att.setdefault("size", full.stat().st_size)
                    files[att["attachment_id"]] = str(full.resolve())
            Record.from_json(obj)  # validate now, name the line on error
            records.append(obj)
    return JobSpec(job_id, tenant_id, "inline", tuple(records), files)


# --- deferred jobs: what the gate keeps --------------------------------------------------

DEFERRED_FORMAT = "akms-deferred-job/1"
DEFERRED_PREFIX = b"deferred/"
_DIGEST_INFO = b"archive_kms/v1/deferred-job-digest/"


def deferred_object_name(job_id: str) -> bytes:
    """``deferred/<job id>``: what a job's sealed content is bound to, with the tenant (in
    the per-object key and the AAD), so content moved to another job or tenant does not open."""
    return DEFERRED_PREFIX + job_id.encode()


@dataclass(frozen=True)
class QueuedJob:
    """A job as the gate stores it.

    ``metadata`` stays clear and holds no record content: format, kind, counts, a
    synthetic job's generator parameters, and a keyed digest of the content (the store
    compares metadata to tell a resent job from a reused id). ``sealed`` is the content
    (inline records, attachment file references) as an envelope under the tenant's
    keychain, or None for a job without any (a synthetic job)."""

    metadata: dict[str, Any]
    sealed: bytes | None = field(default=None, repr=False)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _content(spec: JobSpec) -> dict[str, Any] | None:
    """The part of a spec that comes from customer records, or None if it has none."""
    if not spec.records and not spec.attachment_files:
        return None
    return {"records": [dict(r) for r in spec.records], "attachment_files": dict(spec.attachment_files)}


def _content_digest(keychain: ArchiveKeychain, spec: JobSpec, plaintext: bytes) -> str:
    """HMAC-SHA256 of job id and content under a key derived from the tenant's L2 key: a
    database reader cannot confirm a guessed record with it. It survives re-binding L1; a
    new L2 (``rotate_l2``) changes it, and ``submit_job`` then recognises a resend by
    opening the queued seal instead (``_is_resend``)."""
    material = keychain.search_key_material(spec.tenant_id)
    key = hkdf_sha256(material.reveal(), info=_DIGEST_INFO + spec.tenant_id.encode())
    job = spec.job_id.encode()
    return "hmac-sha256:" + hmac.new(key, len(job).to_bytes(4, "big") + job + plaintext, hashlib.sha256).hexdigest()


def _seal_workspace(spec: JobSpec) -> str:
    """The workspace whose active DEK seals the content: the first record's, one the job
    writes into anyway, so sealing adds no key the archive would not have."""
    return Record.from_json(spec.records[0]).workspace_id if spec.records else "default"


def seal_job(spec: JobSpec, keychain: ArchiveKeychain | None) -> QueuedJob:
    """The form in which the gate may keep ``spec``: content sealed with the project's
    envelope under the active DEK of a workspace of the tenant's keychain (the DEK outlives
    an L1 re-binding: only L2's wrapping changes), bound to ``deferred/<job id>``."""
    metadata: dict[str, Any] = {
        "format": DEFERRED_FORMAT,
        "kind": spec.kind,
        "record_count": len(spec.records),
        "attachment_count": len(spec.attachment_files),
    }
    if spec.synthetic:
        metadata["synthetic"] = dict(spec.synthetic)  # generator parameters: no record content
    content = _content(spec)
    if content is None:
        return QueuedJob(metadata)
    if keychain is None:
        raise ValidationError(
            f"job {spec.job_id}: a job with record content is sealed under its tenant's keychain; none was given"
        )
    try:
        plaintext = _canonical(content)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"job {spec.job_id}: records must be plain JSON ({type(e).__name__})") from None
    digest = _content_digest(keychain, spec, plaintext)
    metadata["digest"] = digest
    workspace = _seal_workspace(spec)
    dek = keychain.dek_for_encrypt(spec.tenant_id, workspace)
    sealed = encrypt_bytes(
        _canonical({"digest": digest, **content}),
        dek=dek.key,
        dek_id=dek.dek_id,
        binding=ObjectBinding(spec.tenant_id, workspace, deferred_object_name(spec.job_id)),
    )
    return QueuedJob(metadata, sealed)


def _refused(job: DeferredJob, reason: str) -> IntegrityError:
    return IntegrityError(
        f"deferred job {job.job_id} of tenant {job.tenant_id}: its sealed content was refused ({reason}); it was "
        "altered, moved from another job or tenant, or its key was destroyed. Nothing was archived; the job stays "
        f"queued for support (`archive-kms jobs park {job.tenant_id} {job.job_id} --reason ...` gives it up)",
        resource=f"job:{job.job_id}",
    )


def _unseal(job: DeferredJob, keychain: ArchiveKeychain) -> dict[str, Any]:
    sealed = job.sealed or b""
    try:
        header = read_header(io.BytesIO(sealed))
        binding = ObjectBinding(job.tenant_id, header.workspace_id, deferred_object_name(job.job_id))
        body = json.loads(decrypt_to_bytes(sealed, binding=binding, dek_for=keychain.dek_for_header))
    except KeychainTamperedError:
        raise  # the keychain's own alarm, not this job's
    except (IntegrityError, ValidationError, KeyNotFoundError, KeyDestroyedError) as e:
        # FormatError is an IntegrityError; an edited header may name a DEK that never existed,
        # and a crypto-erased DEK will never open the seal again.
        raise _refused(job, f"{type(e).__name__}: {e}") from e
    except ValueError as e:  # authenticated but not JSON: not something this code sealed
        raise _refused(job, f"content is not JSON ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise _refused(job, "content is not a JSON object")
    return body


def open_queued(job: DeferredJob, keychain: ArchiveKeychain) -> JobSpec:
    """The spec of a queued job, its content opened and checked against its metadata.
    ``IntegrityError`` naming the job if the seal does not open here (tampered, or moved
    from another job or tenant) or does not match the metadata."""
    meta = job.payload
    if meta.get("format") != DEFERRED_FORMAT:  # queued before content was sealed: the spec itself
        return JobSpec.from_payload(job.job_id, job.tenant_id, meta)
    synthetic = dict(meta.get("synthetic") or {})
    if "digest" not in meta:
        if job.sealed is not None:
            raise _refused(job, "sealed content found for a job queued without any")
        return JobSpec(job.job_id, job.tenant_id, meta["kind"], synthetic=synthetic)
    if not job.sealed:
        raise _refused(job, "the sealed content is missing")
    body = _unseal(job, keychain)
    records, files = body.get("records"), body.get("attachment_files")
    if (
        body.get("digest") != meta["digest"]
        or not isinstance(records, list)
        or not isinstance(files, dict)
        or len(records) != meta.get("record_count")
        or len(files) != meta.get("attachment_count")
    ):
        raise _refused(job, "the clear metadata does not match the sealed content")
    return JobSpec(job.job_id, job.tenant_id, meta["kind"], tuple(records), files, synthetic)


# --- the writer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    tenant_id: str
    decision: str  # run | deferred | duplicate
    records: int = 0
    attachments: int = 0
    objects_written: int = 0
    objects_already_there: int = 0
    bytes_plaintext: int = 0
    indexed: int = 0


class TenantArchive:
    """A tenant's archive as the writer and readers see it now: where it lives, which
    keychain encrypts it, which index generation answers searches."""

    def __init__(
        self,
        *,
        tenant_id: str,
        store: ObjectStore,
        keychain: ArchiveKeychain,
        index: SearchIndex,
        index_mode: IndexMode,
        search_keys: SearchKeys | None,
        index_name: str | None = None,
        segment_size: int | None = None,
        relocate: Callable[[], TenantArchive] | None = None,
        keyed_search_keys: Callable[[], SearchKeys] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.store = store
        self.keychain = keychain
        self.index = index
        self.index_mode = index_mode
        self.search_keys = search_keys
        self.index_name = index_name  # the write target (alias's current index when None)
        self.segment_size = segment_size
        self._relocate = relocate  # the tenant's archive where the registry says it lives *now*
        self._keyed_search_keys = keyed_search_keys  # the tenant's SearchKeys, derived on demand

    # writes

    def put_object(self, name: bytes, workspace_id: str, chunks: Iterable[bytes]) -> tuple[bool, int]:
        """Encrypt ``chunks`` into ``name`` unless it is there already. Returns
        (written, plaintext bytes)."""
        if self.store.head(name) is not None:
            return False, 0
        dek = self.keychain.dek_for_encrypt(self.tenant_id, workspace_id)
        binding = ObjectBinding(self.tenant_id, workspace_id, name)
        kwargs = {"segment_size": self.segment_size} if self.segment_size else {}
        sizes = {"n": 0}

        def counted() -> Iterator[bytes]:
            for c in chunks:
                sizes["n"] += len(c)
                yield c

        ct = encrypt_iter(counted(), dek=dek.key, dek_id=dek.dek_id, binding=binding, **kwargs)
        try:
            self.store.put_stream(name, ct, if_absent=True, metadata={"akms_format": "1", "akms_dek": dek.dek_id})
        except ObjectExistsError:  # a concurrent or earlier attempt won: same content by construction
            return False, 0
        return True, sizes["n"]

    # reads

    def read_object(self, name: bytes) -> Iterator[bytes]:
        """Decrypted, authenticated plaintext of one object, streamed."""
        binding = ObjectBinding(self.tenant_id, workspace_of(name), name)
        try:
            reader = self.store.open_read(name)
        except ObjectNotFoundError:
            # A migration may have cut over and deleted the old location since this archive
            # was opened: look the tenant up again rather than answer 404 (faults E7).
            fresh = self._relocate() if self._relocate is not None else None
            if fresh is None or fresh.store is self.store:
                raise
            return fresh.read_object(name)
        # dek_for_header, not dek_by_id: the DEK must belong to the header's workspace, or an
        # object could name another workspace's DEK and outlive the erasure of its own.
        # (decrypt_iter has already checked the header's tenant and workspace against the binding.)
        return decrypt_iter(reader, binding=binding, dek_for=self.keychain.dek_for_header)

    def read_record(self, workspace_id: str, object_type: str, record_id: str) -> Record:
        name = record_object_name(Record(object_type, record_id, {}, (), workspace_id))
        return Record.from_json(b"".join(self.read_object(name)))

    def read_attachment(self, workspace_id: str, attachment_id: str) -> Iterator[bytes]:
        return self.read_object(attachment_object_name(workspace_id, attachment_id))

    def search(self, query):
        # At cutover the registry (key mode) and the alias (index generation) move one
        # after the other; a search in between meets the other mode's index, and the
        # alias may move again while we retry. The index's own mode decides which keys
        # the query needs (faults E7); a cutover moves once, so three tries suffice.
        keys = self.search_keys
        for attempt in range(3):
            try:
                return self.index.search(self.tenant_id, query, keys)
            except IndexModeMismatchError:
                if self._keyed_search_keys is None or attempt == 2:
                    raise
                keys = None if keys is not None else self._keyed_search_keys()
        raise AssertionError("unreachable")


def write_records(
    archive: TenantArchive, items: Iterable[tuple[Record, list[AttachmentData]]], *, batch_size: int = 200
) -> dict[str, int]:
    """Write records and attachments, then index the records (deterministic ids)."""
    from archive_kms.search import build_document

    counts = {"records": 0, "attachments": 0, "written": 0, "already": 0, "bytes": 0, "indexed": 0}
    batch: list = []

    target = archive.index_name or archive.index.current_index(archive.tenant_id)
    if target is None:
        raise StateError(f"tenant {archive.tenant_id} has no search index: create the tenant first")

    def flush() -> None:
        if not batch:
            return
        result = archive.index.bulk_index(target, batch)
        result.raise_for_failures()
        counts["indexed"] += len(batch)
        batch.clear()

    for record, attachments in items:
        for att in attachments:
            written, n = archive.put_object(
                attachment_object_name(record.workspace_id, att.ref.attachment_id), record.workspace_id, att.open()
            )
            counts["attachments"] += 1
            counts["written" if written else "already"] += 1
            counts["bytes"] += n
        written, n = archive.put_object(record_object_name(record), record.workspace_id, [record.to_json()])
        counts["records"] += 1
        counts["written" if written else "already"] += 1
        counts["bytes"] += n
        batch.append(
            build_document(record, tenant=archive.tenant_id, mode=archive.index_mode, keys=archive.search_keys)
        )
        if len(batch) >= batch_size:
            flush()
    flush()
    archive.index.refresh(target)  # a finished job is searchable
    return counts


def submit_job(state: JobGate, spec: JobSpec, open_archive: Callable[[str], TenantArchive]) -> JobOutcome:
    """The archive-job writer's entry point: admit through the gate, then run or defer.

    The job is sealed before admission whatever the gate says: admission and deferral are
    one transaction, so the content must be ready to queue (a job with record content
    costs one DEK lookup and one small encryption even when it then runs at once)."""
    keychain = open_archive(spec.tenant_id).keychain if _content(spec) is not None else None
    queued = seal_job(spec, keychain)
    try:
        admission = state.admit_job(spec.tenant_id, spec.job_id, queued.metadata, sealed=queued.sealed)
    except StateError:
        if keychain is None or not _is_resend(state, spec, keychain):
            raise
        log.info(
            "job %s for tenant %s: duplicate (recognised by the ledger or its queued seal)", spec.job_id, spec.tenant_id
        )
        return JobOutcome(spec.job_id, spec.tenant_id, "duplicate")
    decision = admission.decision.value
    if decision != "run":
        log.info("job %s for tenant %s: %s", spec.job_id, spec.tenant_id, decision)
        if decision == "deferred":
            _audit(state, spec.tenant_id, "job.deferred", {"job_id": spec.job_id, "kind": spec.kind})
        return JobOutcome(spec.job_id, spec.tenant_id, decision)
    return _run(state, spec, _attempt(admission), open_archive)


def _attempt(admission: Admission) -> int:
    """The attempt number of an admission to run (the gate numbers every run)."""
    if admission.attempt is None:
        raise StateError(f"job {admission.job_id} was admitted to run without an attempt number")
    return admission.attempt


def _audit(state: AuditLog, tenant_id: str, action: str, details: dict[str, Any], run_id: str | None = None) -> None:
    """Every job that writes (or is queued to write) into a tenant's archive leaves an
    audit record: ids and counts, never record content."""
    state.append_audit(
        AuditEvent(
            actor=JOB_ACTOR if run_id is None else f"replay:{run_id}",
            action=action,
            tenant_id=tenant_id,
            run_id=run_id,
            details=details,
        )
    )


def _is_resend(state: GateRepo, spec: JobSpec, keychain: ArchiveKeychain) -> bool:
    """Whether the store refused ``spec`` only because its digest was keyed by an L2 that
    has since been replaced: the job completed (as a job that never waited would answer),
    or its queued seal opens to the same content."""
    done = state.get_job(spec.job_id)
    if done is not None and done.tenant_id == spec.tenant_id and done.state is JobState.COMPLETED:
        return True
    queued = next((j for j in state.list_deferred(spec.tenant_id) if j.job_id == spec.job_id), None)
    if queued is None or queued.sealed is None:
        return False
    try:
        held = open_queued(queued, keychain)
    except IntegrityError:
        return False
    return held.kind == spec.kind and _canonical(_content(held)) == _canonical(_content(spec))


def _run(
    state: JobGate,
    job: JobSpec | DeferredJob,
    attempt: int,
    open_archive: Callable[[str], TenantArchive],
    *,
    run_id: str | None = None,
) -> JobOutcome:
    """Run an admitted attempt into the archive opened now. ``job`` is the spec, or a
    queued job whose content is opened here under the keychain as it is now. Any failure,
    a refused seal included, is recorded on the attempt (a queued job stays queued)."""
    try:
        archive = open_archive(job.tenant_id)
        spec = job if isinstance(job, JobSpec) else open_queued(job, archive.keychain)
        counts = write_records(archive, spec.materialise())
    except BaseException as e:
        state.finish_job(job.job_id, attempt, error=f"{type(e).__name__}: {e}"[:500])
        _audit(
            state,
            job.tenant_id,
            "job.failed",
            {"job_id": job.job_id, "attempt": attempt, "error": type(e).__name__},
            run_id,
        )
        raise
    state.finish_job(job.job_id, attempt, object_count=counts["written"] + counts["already"])
    _audit(
        state,
        job.tenant_id,
        "job.run",
        {
            "job_id": job.job_id,
            "attempt": attempt,
            "records": counts["records"],
            "attachments": counts["attachments"],
            "objects_written": counts["written"],
            "objects_already_there": counts["already"],
            "indexed": counts["indexed"],
        },
        run_id,
    )
    return JobOutcome(
        job.job_id,
        job.tenant_id,
        "run",
        counts["records"],
        counts["attachments"],
        counts["written"],
        counts["already"],
        counts["bytes"],
        counts["indexed"],
    )


def replay_deferred(
    state: JobGate,
    tenant_id: str,
    run_id: str,
    open_archive: Callable[[str], TenantArchive],
    *,
    fence: Fence | None = None,
    reclaim_after: timedelta = timedelta(minutes=5),
) -> list[JobOutcome]:
    """Resume the gate and replay every deferred job exactly once, in arrival order,
    into wherever the tenant lives now. ``reclaim_after``: claims older than this (a
    replayer that crashed) are taken over; a migration run that holds the tenant's lease
    passes 0, since no other replayer can be at work.

    Each job's sealed content is opened under the tenant's keychain as it is now (an L1
    re-binding since the deferral changes nothing: the DEK is the same). A seal that does
    not open raises ``IntegrityError`` naming the job, after recording the failure on the
    job's attempt; the job stays queued with its seal, for support (``park_deferred_job``
    gives it up so the gate can drain past it). The store purges a
    job's seal in the transaction that marks it replayed (completed, or found done)."""
    outcomes: list[JobOutcome] = []
    seen: set[str] = set()
    claimed = state.resume_and_drain(tenant_id, run_id, fence=fence)
    if not claimed:
        claimed = state.claim_deferred(tenant_id, reclaim_after=reclaim_after)
    while claimed:
        fresh = [job for job in claimed if job.job_id not in seen]
        if not fresh:  # only jobs this call handed back as running elsewhere: stop, don't spin
            break
        for job in fresh:
            seen.add(job.job_id)
            admission = state.start_job(tenant_id, job.job_id)
            if admission.decision.value != "run":  # completed by an earlier replayer, or running now
                outcomes.append(JobOutcome(job.job_id, tenant_id, "duplicate"))
                continue
            outcomes.append(_run(state, job, _attempt(admission), open_archive, run_id=run_id))
        claimed = state.claim_deferred(tenant_id, reclaim_after=reclaim_after)
    return outcomes


def park_deferred_job(state: JobGate, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
    """Support gives up on a queued job that cannot be replayed (its seal is refused): the
    store marks it replayed without running it, keeps its seal for forensics, and opens the
    gate if that drained it; the parking is audited (ids, reason, actor: never content).
    The job's content is not archived: the writer must send it again under a new job id."""
    parked = state.park_deferred(tenant_id, job_id, reason=reason, actor=actor)
    mark = parked.parked
    if mark is None:
        raise StateError(f"job {job_id} of tenant {tenant_id} was not parked", resource=f"job:{job_id}")
    who, why = mark["actor"], mark["reason"]  # as the store kept them (trimmed)
    state.append_audit(
        AuditEvent(
            actor=who, action="job.parked", tenant_id=tenant_id, details={"job_id": job_id, "reason": why, "actor": who}
        )
    )
    log.warning("job %s of tenant %s parked by %s", job_id, tenant_id, who)
    return parked


__all__ = [
    "DEFERRED_FORMAT",
    "AttachmentRef",
    "JobOutcome",
    "JobSpec",
    "QueuedJob",
    "TenantArchive",
    "attachment_object_name",
    "deferred_object_name",
    "load_jsonl",
    "open_queued",
    "park_deferred_job",
    "record_object_name",
    "replay_deferred",
    "seal_job",
    "submit_job",
    "workspace_of",
    "write_records",
]
