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
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from archive_kms.domain.keychain import ScopedRevocation
from archive_kms.domain.records import AttachmentData, AttachmentRef, Record
from archive_kms.errors import (
    ArchiveKmsError,
    FencedError,
    IndexModeMismatchError,
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyServiceUnavailableError,
    KeyUnavailableError,
    ObjectExistsError,
    ObjectNotFoundError,
    SearchBindingError,
    SearchError,
    StateError,
    ValidationError,
)
from archive_kms.keys.keychain import DataKey
from archive_kms.operations.job_input import (
    MAX_SYNTHETIC_RECORDS,
    check_inline_records,
    check_job_id,
    check_record,
    check_synthetic,
    read_jsonl,
)
from archive_kms.operations.job_lease import JobLease
from archive_kms.search import IndexMode, Query, SearchIndex, SearchKeys, SearchResult
from archive_kms.search.port import HitFailure
from archive_kms.state.port import (
    ABANDONED_PREFIX,
    SUPERSEDED_PREFIX,
    Admission,
    AuditEvent,
    AuditLog,
    DeferredJob,
    Fence,
    GateRepo,
    JobState,
)
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


class AccessCheckingKeychain(ArchiveKeychain, Protocol):
    """What a tenant's archive asks before serving a search: whether the tenant's keys may
    be used now, and which scoped (granular) revocations are in force."""

    def check_access(self, tenant_id: str) -> None:
        """Raise what a use of the tenant's keys would raise now (revoked, key unusable,
        key service unreachable past the grace policy)."""
        ...

    def scoped_revocations(self, tenant_id: str) -> tuple[ScopedRevocation, ...]:
        """The granular revocations in force."""
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
    #: Where each record came from (``FILE:LINE``), for error messages; never stored or sealed.
    origins: tuple[str, ...] = field(default=(), compare=False, repr=False)

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
        """The job's records with their attachment streams, each record checked
        (``operations.job_input``; ``ValidationError`` naming the record)."""
        check_job_id(self.job_id)
        if self.kind == "synthetic":
            from archive_kms.synthetic import SizeMix, generate_records

            mixes = {"small": SizeMix.small, "default": SizeMix, "large": SizeMix.large}
            mix_name = self.synthetic.get("mix", "small")
            if mix_name not in mixes:
                raise ValidationError(f"job {self.job_id}: unknown size mix {mix_name!r} (small|default|large)")
            count, seed = self.synthetic.get("count"), self.synthetic.get("seed", 0)
            offset = self.synthetic.get("offset", 0)
            check_synthetic(count, seed, offset, max_count=MAX_SYNTHETIC_RECORDS)
            gen = generate_records(
                self.tenant_id,
                offset + count,
                seed=seed,
                mix=mixes[mix_name](),
                workspaces=int(self.synthetic.get("workspaces", 1)),
            )
            for i, item in enumerate(gen):
                if i >= offset:
                    yield check_record(item[0], f"generated record {i + 1} of job {self.job_id}"), item[1]
            return
        if self.kind != "inline":
            raise ValidationError(f"job {self.job_id}: unknown job kind {self.kind!r} (inline|synthetic)")
        for record in check_inline_records(self.job_id, self.records, self.attachment_files, self.origins):
            atts = [
                AttachmentData(ref, functools.partial(_read_file, self.attachment_files[ref.attachment_id], ref.size))
                for ref in record.attachments
            ]
            yield record, atts


def job_from_options(
    tenant_id: str,
    *,
    job_id: str | None = None,
    jsonl: str | Path | None = None,
    attachments_root: str | Path | None = None,
    generate: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> JobSpec:
    """The job that ``archive-kms archive`` and the ``archive-job`` deployment run: a JSONL
    file (``load_jsonl``) or ``generate`` synthetic records; everything checked before
    anything is written (``ValidationError`` naming the option). No ``job_id``: a new one."""
    if (jsonl is None) == (generate == 0):
        raise ValidationError("give exactly one of --jsonl FILE or --generate N")
    if attachments_root is not None and jsonl is None:
        raise ValidationError("--attachments-root goes with --jsonl")
    jid = check_job_id(job_id) if job_id is not None else f"job-{os.urandom(8).hex()}"
    if jsonl is not None:
        return load_jsonl(jsonl, job_id=jid, tenant_id=tenant_id, attachments_root=attachments_root)
    check_synthetic(generate, seed, offset)
    return JobSpec(jid, tenant_id, "synthetic", synthetic={"count": generate, "seed": seed, "offset": offset})


def load_jsonl(path: str | Path, *, job_id: str, tenant_id: str, attachments_root: str | Path | None = None) -> JobSpec:
    """A job from a JSONL file (format: ``docs/archive-jobs.md``, "Job input"), checked
    before it is submitted (``operations.job_input.read_jsonl``: a ``ValidationError``
    naming ``FILE:LINE`` for the first problem)."""
    found = read_jsonl(path, job_id=job_id, attachments_root=attachments_root)
    return JobSpec(job_id, tenant_id, "inline", found.records, found.attachment_files, origins=found.origins)


def _read_file(path: str, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes; ``ValidationError`` (before the last byte is handed on, so the
    upload is aborted) if it does not hold exactly ``size`` bytes any more."""
    n = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the consumer stops early
    except OSError as e:
        raise ValidationError(f"attachment file {path}: cannot read it ({e.strerror})") from None
    with f:
        while block := f.read(chunk):
            n += len(block)
            if n > size:
                break
            yield block
    if n != size:
        raise ValidationError(
            f"attachment file {path} changed while it was archived ({size} bytes declared, "
            f"{'more' if n > size else n} read); nothing of the job is kept"
        )


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


def _test_point(name: str) -> None:
    """Crash and freeze points of the fault tests (``archive_kms.crashpoints``); one
    environment lookup when none is armed (production)."""
    if "ARCHIVE_KMS_FREEZE_AT" in os.environ or "ARCHIVE_KMS_CRASH_AT" in os.environ:
        from archive_kms import crashpoints

        crashpoints.hit(name)


#: The outcome of an attempt that lost its lease mid-way (not a ledger state).
SUPERSEDED = "superseded"


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    tenant_id: str
    decision: str  # run | deferred | duplicate | superseded
    records: int = 0
    attachments: int = 0
    objects_written: int = 0
    objects_already_there: int = 0
    bytes_plaintext: int = 0
    indexed: int = 0
    message: str = ""  # why, for a superseded attempt


class TenantArchive:
    """A tenant's archive as the writer and readers see it now: where it lives, which
    keychain encrypts it, which index generation answers searches.

    Search keys are not kept: ``search_keys`` is asked of the keychain on every use (given
    as a callable; a ``SearchKeys`` value is accepted for tests), so they are derived from
    the cached tenant key under the same checks as every other key (revocation, the
    master key's state, expiry) and a warm archive object stops searching when the tenant
    is revoked. A search of a plaintext index (managed tenants) has no key to ask for; it
    passes the keychain's ``check_access`` first, so it is refused alike. Hits covered by
    a scoped (granular) revocation are withheld (listed as failures saying why)."""

    def __init__(
        self,
        *,
        tenant_id: str,
        store: ObjectStore,
        keychain: ArchiveKeychain,
        index: SearchIndex,
        index_mode: IndexMode,
        search_keys: SearchKeys | Callable[[], SearchKeys | None] | None,
        index_name: str | None = None,
        segment_size: int | None = None,
        relocate: Callable[[], TenantArchive] | None = None,
        name_locations: Sequence[Any] = (),
        check_write: Callable[[], None] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.store = store
        self.keychain = keychain
        self.index = index
        self.index_mode = index_mode
        self._search_keys = search_keys
        self.index_name = index_name  # the registry's generation: write and search target (the alias's when None)
        self.segment_size = segment_size
        self._relocate = relocate  # the tenant's archive where the registry says it lives *now*
        # Where the tenant lives now and may live later (storage.name_limits.tenant_locations):
        # a job's names must fit all of them.
        self.name_locations = tuple(name_locations)
        self._check_write = check_write  # raises if the index must not take this archive's records now

    def check_writable(self) -> None:
        """Refuse (before any object is written) a write the index would refuse: the
        platform's check that a customer-keyed tenant never indexes in clear."""
        if self._check_write is not None:
            self._check_write()

    @property
    def search_keys(self) -> SearchKeys | None:
        """The tenant's search keys now (None for a plaintext index), asked of the keychain."""
        keys = self._search_keys
        return keys() if callable(keys) else keys

    def check_access(self) -> None:
        """Raise if the tenant's keys may not be used now (see the class docstring)."""
        check = getattr(self.keychain, "check_access", None)
        if check is not None:
            check(self.tenant_id)

    # writes

    def put_object(
        self,
        name: bytes,
        workspace_id: str,
        chunks: Iterable[bytes],
        *,
        job_tag: str | None = None,
        guard: Callable[[], None] | None = None,
        known_absent: bool = False,
    ) -> tuple[bool, int]:
        """Encrypt ``chunks`` into ``name`` unless it is there already. Returns
        (written, plaintext bytes). ``job_tag`` goes into the object's metadata (the job
        that wrote it, for a rollback); ``guard`` is called before the upload and between
        chunks and raises to stop it (a lost job lease): the upload is then aborted."""
        if not known_absent and self.store.head(name) is not None:
            return False, 0
        if guard is not None:
            guard()
        dek = self.keychain.dek_for_encrypt(self.tenant_id, workspace_id)
        binding = ObjectBinding(self.tenant_id, workspace_id, name)
        kwargs = {"segment_size": self.segment_size} if self.segment_size else {}
        sizes = {"n": 0}

        def counted() -> Iterator[bytes]:
            for c in chunks:
                if guard is not None:
                    guard()
                sizes["n"] += len(c)
                _test_point("job:chunk")
                yield c
            if guard is not None:
                guard()  # the last look before the upload commits

        ct = encrypt_iter(counted(), dek=dek.key, dek_id=dek.dek_id, binding=binding, **kwargs)
        metadata = {"akms_format": "1", "akms_dek": dek.dek_id}
        if job_tag is not None:
            metadata[JOB_TAG_KEY] = job_tag
        try:
            self.store.put_stream(name, ct, if_absent=True, metadata=metadata)
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

    def search(self, query: Query) -> SearchResult:
        """Search the registry's generation in the mode the platform recorded for it, with
        keys that fit that mode: never the mode the index claims, never a fallback to
        plaintext (docs/threat-model.md). The keys are asked of the keychain for this
        search (a revoked tenant is refused); a plaintext index asks for no key, so the
        keychain's ``check_access`` is asked instead. At cutover the registry moves first
        and the alias next, and the old generation is deleted later; a search that meets
        an index that is gone, or a registry that moved since this archive was opened,
        re-reads the registry and searches where it says now. A binding the platform did
        not record (an alias on someone else's index, an index whose marker contradicts
        our record) is never retried: it raised an alarm and fails closed. Hits under a
        scoped revocation are withheld."""
        archive = self
        for attempt in range(3):
            keys = archive.search_keys
            if keys is None:
                archive.check_access()
            try:
                if archive.index_name is None:
                    result = archive.index.search(archive.tenant_id, query, keys)
                else:
                    result = archive.index.search(
                        archive.tenant_id, query, keys, index=archive.index_name, mode=archive.index_mode
                    )
                return archive._without_revoked_scopes(result)
            except SearchBindingError:
                raise
            except (SearchError, IndexModeMismatchError):
                fresh = archive._relocate() if archive._relocate is not None else None
                same = fresh is None or (fresh.index_name, fresh.index_mode) == (archive.index_name, archive.index_mode)
                if same or attempt == 2:
                    raise
                archive = fresh  # type: ignore[assignment]
        raise AssertionError("unreachable")

    def _without_revoked_scopes(self, result: SearchResult) -> SearchResult:
        """Withhold hits a scoped revocation covers: a revoked workspace by the hit's
        workspace; a revoked time range by the DEK the record's object names (one header
        read per hit, only while such a revocation is in force)."""
        lookup = getattr(self.keychain, "scoped_revocations", None)
        scopes = lookup(self.tenant_id) if lookup is not None else ()
        if not scopes:
            return result
        kept, withheld = [], []
        for hit in result.hits:
            reason = self._withheld(hit, scopes)
            if reason is None:
                kept.append(hit)
            else:
                withheld.append(HitFailure(hit.doc_id, hit.index, f"withheld: {reason}"))
        return SearchResult(kept, result.total - len(withheld), [*result.failures, *withheld])

    def _withheld(self, hit: Any, scopes: tuple[ScopedRevocation, ...]) -> str | None:
        for scope in scopes:
            if scope.before is None and scope.workspace_id == hit.workspace_id:
                return f"{scope.describe()} revoked"
        if not any(s.before is not None for s in scopes):
            return None
        name = record_object_name(Record(hit.object_type, hit.record_id, {}, (), hit.workspace_id))
        try:
            with self.store.open_read(name) as reader:
                header = read_header(reader)
            self.keychain.dek_for_header(header)
        except KeyUnavailableError as exc:  # the scope (or a revocation since) refuses its key
            return str(exc)[:200]
        except ObjectNotFoundError:
            return None
        return None


# --- a job's plan: everything checked before the first write (ADR 0020) ---------------------

#: Object metadata naming the job that wrote an object (``writer_tag``), so a rollback
#: deletes only what that job created.
JOB_TAG_KEY = "akms_job"


def writer_tag(job_id: str) -> str:
    """What an object written by ``job_id`` carries in its metadata: a hash of the job id
    (the id itself may be anything a writer chose)."""
    return "j" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32]


@dataclass
class _Planned:
    record: Record
    where: str
    name: bytes
    present: bool  # already stored with this content (a crashed attempt of this job, or an identical record)
    attachments: list[tuple[AttachmentData, bytes, bool]]  # (data, name, present)


@dataclass
class JobPlan:
    """What a job will write, once every check passed: records and attachments with their
    object names, which of them are already stored, and the index generation."""

    job_id: str
    tenant_id: str
    target_index: str
    items: list[_Planned]

    @property
    def new_names(self) -> list[bytes]:
        """Names this job may create (the journal a rollback works from)."""
        out = []
        for item in self.items:
            out += [name for _, name, present in item.attachments if not present]
            if not item.present:
                out.append(item.name)
        return out


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _one_piece(make: Callable[[], bytes]) -> Iterator[bytes]:
    yield make()


def _same_content(archive: TenantArchive, name: bytes, expected: Callable[[], Iterable[bytes]]) -> bool:
    """Whether the stored plaintext of ``name`` equals ``expected()`` (by SHA-256, streamed)."""
    return _digest(archive.read_object(name)) == _digest(expected())


def _already_there(archive: TenantArchive, name: bytes, tag: str, same: Callable[[], bool], what: str) -> bool:
    """Whether ``name`` is stored already (True) or free (False). An object written by this
    job (a crashed attempt) counts as there; one written by another job must hold the same
    plaintext, else the job is refused: an archive never replaces an object."""
    info = archive.store.head(name)
    if info is None:
        return False
    if (info.metadata or {}).get(JOB_TAG_KEY) == tag:
        return True
    try:
        if same():
            return True
    except ArchiveKmsError as e:
        raise ValidationError(
            f"{what} is already stored and cannot be read ({type(e).__name__}); nothing of the job was written"
        ) from None
    raise ValidationError(
        f"{what} is already archived with other content (by another job); archived objects are never replaced: "
        "give the new version another id. Nothing of the job was written"
    )


def plan_job(archive: TenantArchive, spec: JobSpec) -> JobPlan:
    """Check everything about ``spec`` that can be checked without reading storage: each
    record's fields and ids, conflicting duplicates, the object names against every
    location the tenant may live in, and the index document of each record.
    ``ValidationError`` naming the record (``FILE:LINE`` for a JSONL job); nothing is
    written. ``check_stored`` then looks at what is stored already."""
    return _plan(archive, spec.job_id, spec.materialise(), spec.origins)


def _plan(
    archive: TenantArchive,
    job_id: str,
    records: Iterable[tuple[Record, list[AttachmentData]]],
    origins: Sequence[str] = (),
) -> JobPlan:
    from archive_kms.search import build_document
    from archive_kms.storage.name_limits import check_names, summary

    target = archive.index_name or archive.index.current_index(archive.tenant_id)
    if target is None:
        raise StateError(f"tenant {archive.tenant_id} has no search index: create the tenant first")
    items: list[_Planned] = []
    names: dict[bytes, str] = {}
    try:
        keys = archive.search_keys  # asked once for the check (each write batch asks again)
        documents = True
    except (KeyUnavailableError, KeyServiceUnavailableError):
        # The tenant's keys are refused (revoked, disabled, key service down): the gate
        # defers the job and its documents are checked when it is replayed after restore.
        keys, documents = None, False
    for n, (record, attachments) in enumerate(records):
        where = origins[n] if n < len(origins) else f"record {n + 1} of job {job_id}"
        try:
            if documents:
                build_document(record, tenant=archive.tenant_id, mode=archive.index_mode, keys=keys)
        except ValidationError as e:
            raise ValidationError(f"{where}: {e}") from None
        planned = _Planned(record, where, record_object_name(record), False, [])
        for att in attachments:
            planned.attachments.append((att, attachment_object_name(record.workspace_id, att.ref.attachment_id), False))
        for name in [planned.name, *(a[1] for a in planned.attachments)]:
            names.setdefault(name, where)
        items.append(planned)
    if archive.name_locations:
        problems = list(check_names(archive.name_locations, names))
        if problems:
            raise ValidationError(f"{names[problems[0].name]}: {summary(problems)}; nothing of the job was written")
    return JobPlan(job_id, archive.tenant_id, target, items)


def write_records(
    archive: TenantArchive, items: Iterable[tuple[Record, list[AttachmentData]]], *, job_id: str = "direct"
) -> dict[str, int]:
    """Write records outside a job (tools, tests): the same checks and the same writes,
    without the ledger, a lease or a journal (so nothing is rolled back on failure)."""
    plan = _plan(archive, job_id, ((check_record(r, f"record {r.record_id}"), a) for r, a in items))
    check_stored(archive, plan)
    return write_plan(archive, plan)


def check_stored(archive: TenantArchive, plan: JobPlan) -> None:
    """Mark what ``plan`` finds stored already: its own objects (an earlier attempt of this
    job) and identical ones of other jobs are skipped; an object of another job with other
    content refuses the job (``ValidationError`` naming the record). Reads only."""
    tag = writer_tag(plan.job_id)
    for item in plan.items:
        r = item.record
        for i, (att, name, _) in enumerate(item.attachments):
            present = _already_there(
                archive,
                name,
                tag,
                functools.partial(_same_content, archive, name, att.open),
                f"{item.where}: attachment {att.ref.attachment_id} (workspace {r.workspace_id})",
            )
            item.attachments[i] = (att, name, present)
        item.present = _already_there(
            archive,
            item.name,
            tag,
            functools.partial(_same_content, archive, item.name, functools.partial(_one_piece, item.record.to_json)),
            f"{item.where}: record {r.object_type}/{r.record_id} (workspace {r.workspace_id})",
        )


def write_plan(
    archive: TenantArchive, plan: JobPlan, *, guard: Callable[[], None] | None = None, batch_size: int = 200
) -> dict[str, int]:
    """Write a planned job: attachments, then each record, then its index documents in
    batches (deterministic ids, create-only). ``guard`` runs before every write."""
    from archive_kms.search import build_document

    # Before the first object (not at planning: a job planned while the tenant is paused
    # is deferred, and its replay lands in the generation the run leaves behind).
    archive.check_writable()
    check = guard or (lambda: None)
    tag = writer_tag(plan.job_id)
    counts = {"records": 0, "attachments": 0, "written": 0, "already": 0, "bytes": 0, "indexed": 0}
    batch: list = []
    keys = archive.search_keys  # asked again for every batch (below), never kept for the job

    def flush() -> None:
        nonlocal keys
        if not batch:
            return
        check()
        result = archive.index.bulk_index(plan.target_index, batch)
        result.raise_for_failures()
        counts["indexed"] += len(batch)
        batch.clear()
        keys = archive.search_keys

    for item in plan.items:
        for att, name, present in item.attachments:
            counts["attachments"] += 1
            if present:
                counts["already"] += 1
                continue
            written, n = archive.put_object(
                name, item.record.workspace_id, att.open(), job_tag=tag, guard=check, known_absent=True
            )
            counts["written" if written else "already"] += 1
            counts["bytes"] += n
        counts["records"] += 1
        if item.present:
            counts["already"] += 1
        else:
            written, n = archive.put_object(
                item.name,
                item.record.workspace_id,
                [item.record.to_json()],
                job_tag=tag,
                guard=check,
                known_absent=True,
            )
            counts["written" if written else "already"] += 1
            counts["bytes"] += n
        batch.append(build_document(item.record, tenant=archive.tenant_id, mode=archive.index_mode, keys=keys))
        if len(batch) >= batch_size:
            flush()
    flush()
    check()
    archive.index.refresh(plan.target_index)  # a finished job is searchable
    return counts


@dataclass(frozen=True)
class Rollback:
    """What ``rollback_job_output`` removed."""

    objects_deleted: int
    documents_deleted: int

    def to_dict(self) -> dict[str, int]:
        return {"objects_deleted": self.objects_deleted, "documents_deleted": self.documents_deleted}


def rollback_job_output(
    state: Any, archive: TenantArchive, job_id: str, *, guard: Callable[[], None] | None = None
) -> Rollback:
    """Remove what a failed or fenced attempt of ``job_id`` left: of the names it journaled
    (``record_job_writes``), the objects that carry its writer tag, and the index
    documents of those records; then forget the journal. Objects another job wrote are
    never touched. Idempotent. The caller makes sure no attempt of the job writes
    meanwhile: the writer itself while it holds its lease (``guard`` checks it before each
    delete), or a fencer while the job cannot start (``jobs_to_roll_back``)."""
    from archive_kms.search.documents import document_id

    check = guard or (lambda: None)
    tag = writer_tag(job_id)
    ours = []
    for name in state.job_writes(job_id):
        info = archive.store.head(name)
        if info is not None and (info.metadata or {}).get(JOB_TAG_KEY) == tag:
            ours.append(name)
    docs = []
    keys = archive.search_keys if ours else None
    for name in ours:
        if name.startswith(RECORD_PREFIX):
            parts = name.split(b"/", 3)
            if len(parts) == 4:
                ws, otype, rid = (p.decode("utf-8") for p in parts[1:])
                docs.append(document_id(archive.tenant_id, Record(otype, rid, {}, (), ws), keys))
    target = archive.index_name or archive.index.current_index(archive.tenant_id)
    deleted_docs = 0
    if docs and target is not None:
        check()
        result = archive.index.delete_documents(target, docs, refresh=True)
        result.raise_for_failures()
        deleted_docs = len(result.indexed)  # a document never written is skipped
    for name in ours:
        check()
        archive.store.delete(name)
    state.clear_job_writes(job_id)
    if ours:
        log.warning("job %s: rolled back %d object(s) and %d document(s)", job_id, len(ours), deleted_docs)
    return Rollback(len(ours), deleted_docs)


def submit_job(state, spec: JobSpec, open_archive: Callable[[str], TenantArchive]) -> JobOutcome:
    """The archive-job writer's entry point: check the job, admit it through the gate,
    then run or defer it.

    Everything that can be checked without the ledger is checked first (``plan_job``),
    so a bad job is refused whatever the gate says and never queued. The job is sealed
    before admission whatever the gate says: admission and deferral are one transaction,
    so the content must be ready to queue (a job with record content costs one DEK lookup
    and one small encryption even when it then runs at once)."""
    check_job_id(spec.job_id)
    archive = open_archive(spec.tenant_id)
    plan = plan_job(archive, spec)
    keychain = archive.keychain if _content(spec) is not None else None
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
    return _run(state, spec, _attempt(admission), open_archive, prepared=(archive, plan))


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
    state,
    job: JobSpec | DeferredJob,
    attempt: int,
    open_archive: Callable[[str], TenantArchive],
    *,
    run_id: str | None = None,
    prepared: tuple[TenantArchive, JobPlan] | None = None,
) -> JobOutcome:
    """Run an admitted attempt into the archive opened now, under the attempt's lease.
    ``job`` is the spec, or a queued job whose content is opened here under the keychain
    as it is now. The job is planned and checked in full before the first write; a
    failure after it rolls back what this attempt created (``rollback_job_output``), then
    is recorded on the attempt (a queued job stays queued). An attempt that loses its
    lease (taken over, fenced, abandoned, or frozen past it) stops writing at once, rolls
    nothing back (its fencer does) and reports ``superseded``."""
    lease = JobLease(state, job.job_id, attempt)
    journaled = False
    try:
        lease.start()
        if prepared is not None:
            archive, plan = prepared
        else:
            archive = open_archive(job.tenant_id)
            spec = job if isinstance(job, JobSpec) else open_queued(job, archive.keychain)
            plan = plan_job(archive, spec)
        check_stored(archive, plan)
        lease.check()
        state.record_job_writes(job.job_id, attempt, plan.new_names)
        journaled = True
        counts = write_plan(archive, plan, guard=lease.check)
        lease.check()
        state.finish_job(job.job_id, attempt, object_count=counts["written"] + counts["already"])
    except FencedError as e:  # lost the lease: write nothing more, leave the rollback to the fencer
        lease.stop()
        return _superseded(state, job, attempt, e, run_id)
    except BaseException as e:
        rolled = None
        if journaled:
            try:
                rolled = rollback_job_output(state, archive, job.job_id, guard=lease.check)
            except FencedError as lost:
                lease.stop()
                return _superseded(state, job, attempt, lost, run_id)
            except Exception:  # storage down too: the journal stays, a retry completes the job
                log.warning("job %s: rollback after a failure did not finish", job.job_id, exc_info=True)
        lease.stop()
        error = f"{type(e).__name__}: {e}"[:500]
        try:
            state.finish_job(job.job_id, attempt, error=error)
        except FencedError as lost:
            return _superseded(state, job, attempt, lost, run_id)
        details = {"job_id": job.job_id, "attempt": attempt, "error": type(e).__name__}
        if rolled is not None:
            details |= rolled.to_dict()
        _audit(state, job.tenant_id, "job.failed", details, run_id)
        raise
    lease.stop()
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


def _superseded(state, job: JobSpec | DeferredJob, attempt: int, error: Exception, run_id: str | None) -> JobOutcome:
    log.error("job %s attempt %d superseded: %s", job.job_id, attempt, error)
    _audit(state, job.tenant_id, "job.superseded", {"job_id": job.job_id, "attempt": attempt}, run_id)
    return JobOutcome(job.job_id, job.tenant_id, SUPERSEDED, message=str(error)[:500])


def replay_deferred(
    state,
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


def fence_stalled_jobs(
    state, open_archive: Callable[[str], TenantArchive], tenant_id: str, *, by: str, actor: str, run_id: str | None
) -> list[dict[str, Any]]:
    """Fence every running job of ``tenant_id`` whose lease expired (its writer died, hung
    or was frozen), then roll back the partial output of every fenced or abandoned job
    whose writer's lease has run out (ADR 0020). Each step is audited: ``job.fenced``,
    ``job.rolled_back``. Call it only while no job of the tenant can start (its gate
    paused): a migration's ``pause`` step does. Returns one summary per job rolled back."""
    for job in state.fence_expired_jobs(tenant_id, by=by):
        details = {"job_id": job.job_id, "attempt": job.attempt, "fenced_by": by}
        if job.lease_expires_at is not None:
            details["lease_expired_at"] = job.lease_expires_at.isoformat()
        state.append_audit(
            AuditEvent(actor=actor, action="job.fenced", tenant_id=tenant_id, run_id=run_id, details=details)
        )
        log.warning("archive job %s of tenant %s fenced by %s: its lease expired", job.job_id, tenant_id, by)
    out = []
    pending = state.jobs_to_roll_back(tenant_id)
    if pending:
        archive = open_archive(tenant_id)
        for job in pending:
            rolled = rollback_job_output(state, archive, job.job_id)
            details = {"job_id": job.job_id, "attempt": job.attempt, **rolled.to_dict()}
            state.append_audit(
                AuditEvent(actor=actor, action="job.rolled_back", tenant_id=tenant_id, run_id=run_id, details=details)
            )
            out.append(details)
    return out


@dataclass(frozen=True)
class Abandoned:
    """What ``abandon_running_job`` did."""

    job_id: str
    tenant_id: str
    attempt: int
    waited_seconds: float
    rollback: Rollback

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "tenant": self.tenant_id,
            "attempt": self.attempt,
            "waited_seconds": round(self.waited_seconds, 1),
            **self.rollback.to_dict(),
        }


def abandon_running_job(
    state,
    open_archive: Callable[[str], TenantArchive],
    tenant_id: str,
    job_id: str,
    *,
    reason: str,
    actor: str,
    sleep: Callable[[float], None] = time.sleep,
) -> Abandoned:
    """Support gives up a running archive job (a writer that hangs, or one known dead):
    the attempt is failed at once (``job.abandoned``, audited with reason and actor), so
    it can no longer renew, journal or finish; once the lease its writer held has run out
    (its writer then writes nothing more, by its own deadline) its partial output is
    rolled back. Run on a job abandoned or fenced earlier whose rollback did not finish, it
    finishes it. The writer may send the job again (same id) afterwards."""
    job = state.get_job(job_id)
    if job is not None and job.tenant_id == tenant_id and job.state is JobState.RUNNING:
        job = state.abandon_job(tenant_id, job_id, reason=reason, actor=actor)
        state.append_audit(
            AuditEvent(
                actor=actor.strip(),
                action="job.abandoned",
                tenant_id=tenant_id,
                details={"job_id": job_id, "attempt": job.attempt, "reason": reason.strip(), "actor": actor.strip()},
            )
        )
    elif (
        job is None
        or job.tenant_id != tenant_id
        or not (job.error or "").startswith((ABANDONED_PREFIX, SUPERSEDED_PREFIX))
    ):
        state.abandon_job(tenant_id, job_id, reason=reason, actor=actor)  # raises, naming why
    waited = 0.0
    if job.lease_expires_at is not None:
        waited = max(0.0, (job.lease_expires_at - datetime.now(UTC)).total_seconds()) + 0.5
        if waited > 0.5:
            log.warning("job %s: waiting %.0f s for its writer's lease to run out before rolling back", job_id, waited)
        sleep(waited)
    rolled = rollback_job_output(state, open_archive(tenant_id), job_id)
    state.append_audit(
        AuditEvent(
            actor=actor.strip(),
            action="job.rolled_back",
            tenant_id=tenant_id,
            details={"job_id": job_id, "attempt": job.attempt, **rolled.to_dict()},
        )
    )
    return Abandoned(job_id, tenant_id, job.attempt, waited, rolled)


def park_deferred_job(state, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
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
    "SUPERSEDED",
    "Abandoned",
    "AttachmentRef",
    "JobOutcome",
    "JobPlan",
    "JobSpec",
    "QueuedJob",
    "Rollback",
    "TenantArchive",
    "abandon_running_job",
    "attachment_object_name",
    "check_stored",
    "deferred_object_name",
    "fence_stalled_jobs",
    "job_from_options",
    "load_jsonl",
    "open_queued",
    "park_deferred_job",
    "plan_job",
    "record_object_name",
    "replay_deferred",
    "rollback_job_output",
    "seal_job",
    "submit_job",
    "workspace_of",
    "write_plan",
    "writer_tag",
]
