"""Copy + re-encrypt and verify, one object and one shard at a time.

``copy_object`` streams: source reader, conditioned on the ETag the manifest recorded
(``if_match``: a source replaced or deleted since the manifest is ``SourceChangedError``,
never copied; issue #10) -> authenticated decrypt (source binding) -> SHA-256 of the
plaintext -> encrypt under a fresh DEK of the tenant's (now customer-bound) keychain ->
the ciphertext decrypted again in memory under the keychain's DEK for its header, which
must give the source's plaintext SHA-256 and size before the upload may commit ->
conditional multipart/staged upload whose every request carries a checksum the store
validates (ADR 0018). At most one segment plus one upload part is in memory whatever the
object size, and a source that fails authentication half way aborts the upload: nothing
partial is ever committed (faults A3, A11).

``copy_shard`` / ``verify_shard`` work through one shard of the run's manifest with a
bounded thread pool (``verify_shard`` only in the ``read-back`` verify mode; the default
``attested`` mode verifies from the destination listing in the verify step itself, ADR
0018). The ledger keeps a keyed digest of each plaintext (``migration.digests``), never a
bare SHA-256. The copy ledger in the state store is the checkpoint: every object
is recorded (fenced) as soon as it is committed, so a crash redoes at most the objects in
flight; a rerun skips what the ledger says is done. A retried write that finds the object
already there (the earlier attempt committed, then died before the ledger write: faults
A7) checks that object against the source instead of writing a second one, and replaces
it only if it is not a good copy (verify rejected it, or it is not what the source holds).

A source object that does not authenticate on ``SOURCE_READ_ATTEMPTS`` reads is
quarantined, not failed (``migration.quarantine``; faults D9, A11). A run asked to stop
(``migration.stopping``; faults D3) takes no new object; objects in flight finish, or are
interrupted after a grace period with their upload aborted.

Both functions take plain, picklable arguments (run id, shard, fence token) and a
``Platform``, so the shard tasks can run in threads of the flow process or in Dask worker
processes that build their own platform from settings.
"""

from __future__ import annotations

import collections
import hmac
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from archive_kms import crashpoints
from archive_kms.config import Settings
from archive_kms.crypto.envelope import DecryptResult, EnvelopeHeader, ObjectBinding, decrypt_iter, encrypt_iter
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    FencedError,
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeyServiceUnavailableError,
    KeyUnavailableError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StateError,
    StorageError,
    ValidationError,
)
from archive_kms.keys.keychain import DataKey, parse_dek_id
from archive_kms.migration import stopping
from archive_kms.migration.digests import LedgerDigests, is_keyed
from archive_kms.migration.memory import CopyBudget, copy_budget, limit_allocator
from archive_kms.migration.plan import MigrationPlan
from archive_kms.migration.quarantine import (
    SOURCE_READ_ATTEMPTS,
    PoisonSourceError,
    Quarantine,
    kind_of,
    quarantine_record,
    quarantined,
)
from archive_kms.migration.stopping import StopRequestedError
from archive_kms.operations.archive import workspace_of
from archive_kms.operations.reading import DekSource, dek_lookup, read_plaintext_digest
from archive_kms.state.port import (
    AuditEvent,
    AuditLog,
    CopyRecord,
    CopyStatus,
    Fence,
    LeaseRepo,
    LedgerRepo,
    ManifestEntry,
    MigrationRun,
    RunRepo,
    StepState,
)
from archive_kms.storage import Location, ObjectStore
from archive_kms.storage.port import DEFAULT_PART_SIZE, ObjectReader, same_etag

log = logging.getLogger(__name__)


class CopyKeychain(DekSource, Protocol):
    """The slice of the keychain a copy uses: open objects, and encrypt under the active DEK."""

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK of ``workspace_id`` for ``now``'s time bucket (created on demand)."""
        ...


class ShardState(RunRepo, LedgerRepo, LeaseRepo, AuditLog, Protocol):
    """The run records, the copy ledger, the fence check and the audit log: the state a shard uses."""


class ShardPlatform(Protocol):
    """What a copy or verify shard uses of the platform (``operations.platform.Platform``
    in a thread of the flow, or the one a Dask worker builds from settings)."""

    @property
    def state(self) -> ShardState: ...

    @property
    def keychain(self) -> CopyKeychain: ...

    @property
    def settings(self) -> Settings: ...

    def store_for(self, location: Location) -> ObjectStore: ...


#: How the verify step proves the destination (``MigrationPlan.verify``; ADR 0018).
ATTESTED = "attested"  # in-memory check + store-validated checksums + destination listing
READ_BACK = "read-back"  # every object read back, decrypted and compared (one more GET each)
VERIFY_MODES = (ATTESTED, READ_BACK)
#: Audited when a quarantined source was restored (another version) and then copied.
REPAIRED_ACTION = "object.source_repaired"
#: Seconds between two saves of a copy shard's progress cursor (besides the final one).
PROGRESS_INTERVAL = 2.0


@dataclass(frozen=True)
class ObjectCopy:
    name: bytes
    plaintext_size: int
    plaintext_sha256: str  # unkeyed: kept in memory only; the ledger gets the keyed digest
    dest_size: int
    dest_etag: str
    dek_id: str
    written: bool  # False: an earlier attempt had committed it; verified instead
    source_etag: str | None = None  # the source version read (the manifest's)
    source_size: int = 0
    checksum: str | None = None  # what the store validated on the write (None: found, not written)


class SourceChangedError(IntegrityError):
    """A source object is not the version the manifest recorded: replaced (``kind`` =
    ``changed``) or removed (``deleted``) since the manifest was taken. Nothing of it is
    copied; the run stops before cutover naming it (issue #10)."""

    def __init__(self, message: str, *, resource: str | None = None, kind: str = "changed") -> None:
        super().__init__(message, resource=resource)
        self.kind = kind


def _open_source(src: ObjectStore, name: bytes, etag: str | None, size: int | None) -> ObjectReader:
    """``src.open_read`` of exactly the version the manifest recorded (``etag``, ``size``);
    ``SourceChangedError`` naming the object and what differs otherwise."""
    recorded = f"the manifest recorded {size} bytes, ETag {etag}"
    try:
        reader = src.open_read(name, if_match=etag) if etag else src.open_read(name)
    except ObjectNotFoundError:
        raise SourceChangedError(
            f"{src.label}: {name[:120]!r} was deleted after the manifest ({recorded})",
            resource=src.label,
            kind="deleted",
        ) from None
    except ObjectChangedError:
        now = src.head(name)
        what = "is gone now" if now is None else f"it now holds {now.size} bytes, ETag {now.etag}"
        raise SourceChangedError(
            f"{src.label}: {name[:120]!r} changed after the manifest ({recorded}; {what})",
            resource=src.label,
            kind="changed" if now is not None else "deleted",
        ) from None
    if size is not None and reader.info.size != size:
        reader.close()
        raise SourceChangedError(
            f"{src.label}: {name[:120]!r} changed after the manifest ({recorded}; it now holds "
            f"{reader.info.size} bytes, ETag {reader.info.etag})",
            resource=src.label,
        )
    return reader


class _Pieces(io.RawIOBase):
    """A reader over an iterator of byte pieces that remembers every piece it pulled, in
    order, for the uploader (``_checked_ciphertext``)."""

    def __init__(self, pieces: Iterator[bytes], pulled: collections.deque[bytes]) -> None:
        super().__init__()
        self._it, self._pulled = pieces, pulled
        self._buf, self._off = b"", 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._off >= len(self._buf):
            piece = next(self._it, b"")
            if not piece:
                return b""
            self._pulled.append(piece)
            self._buf, self._off = piece, 0
        end = len(self._buf) if size is None or size < 0 else min(len(self._buf), self._off + size)
        out = self._buf[self._off : end]
        self._off = end
        return out


def _checked_ciphertext(
    pieces: Iterator[bytes],
    binding: ObjectBinding,
    dek_for: Callable[[Any], Any],
    expect: Callable[[DecryptResult], None],
) -> Iterator[bytes]:
    """Pass ``pieces`` (an envelope as ``encrypt_iter`` yields it) through, each one only
    after the same bytes went through an authenticated decrypt with ``dek_for`` (the
    tenant keychain's DEK for the header's id); after the last piece, ``expect(result)``
    checks the plaintext size and SHA-256. It runs before the consumer can learn that the
    stream ended, so an upload never commits ciphertext that failed it (ADR 0018). Holds one
    ciphertext segment more than the encryptor does."""
    pulled: collections.deque[bytes] = collections.deque()
    decrypted = decrypt_iter(_Pieces(iter(pieces), pulled), binding=binding, dek_for=dek_for)
    while pulled:
        yield pulled.popleft()
    for _ in decrypted:
        while pulled:
            yield pulled.popleft()
    expect(decrypted.result)
    while pulled:  # nothing is left after the final segment; an envelope with trailing bytes fails above
        yield pulled.popleft()


def _source_dek_lookup(keychain: DekSource, tenant_id: str, label: str) -> Callable[[EnvelopeHeader], SecretBytes]:
    """``reading.dek_lookup`` for a source object: a header (not yet authenticated) that names a
    malformed DEK id, or a DEK this tenant never had, is the object's fault, like a failed
    tag, not the keychain's. Any other key error (unusable key, throttling) stays what it is."""

    checked = dek_lookup(keychain, tenant_id)

    def lookup(header: Any) -> Any:
        try:
            return checked(header)
        except ValidationError:
            raise PoisonSourceError(f"{label}: the header names a malformed DEK id", resource=label) from None
        except KeyNotFoundError as exc:
            if exc.resource != f"keychain:{tenant_id}/{header.dek_id}":
                raise
            raise PoisonSourceError(
                f"{label}: the header names DEK {header.dek_id}, which tenant {tenant_id} does "
                "not have (corrupt or another tenant's object)",
                resource=label,
            ) from None

    return lookup


def _as_poison(exc: IntegrityError, label: str) -> IntegrityError:
    """A source read's IntegrityError as a PoisonSourceError; the keychain's own (a bad
    signature) is not the object's fault and is returned unchanged."""
    if isinstance(exc, (PoisonSourceError, KeychainTamperedError)):
        return exc
    return PoisonSourceError(f"{label}: {exc}", resource=label, kind=kind_of(exc))


def _source_digest(
    src: Any,
    keychain: Any,
    tenant_id: str,
    name: bytes,
    interrupt: Callable[[], bool] | None = None,
    *,
    etag: str | None = None,
    size: int | None = None,
) -> DecryptResult:
    """The source object's plaintext (size, SHA-256), read end to end from the version
    the manifest recorded (``SourceChangedError`` otherwise); PoisonSourceError if it does
    not authenticate."""
    binding = ObjectBinding(tenant_id, workspace_of(name), name)
    with _open_source(src, name, etag, size) as reader:
        try:
            it = decrypt_iter(reader, binding=binding, dek_for=_source_dek_lookup(keychain, tenant_id, src.label))
            for _ in it:
                if interrupt is not None and interrupt():
                    raise StopRequestedError(f"{src.label}: read of {name[:80]!r} interrupted: the run is stopping")
            return it.result
        except IntegrityError as exc:
            raise _as_poison(exc, src.label) from exc


def read_back(
    store: Any,
    keychain: Any,
    tenant_id: str,
    name: bytes,
    interrupt: Callable[[], bool] | None = None,
    *,
    dek_for: Callable[[Any], Any] | None = None,
) -> Any:
    """Decrypt ``name`` from ``store`` end to end (one GET); the envelope's
    ``DecryptResult`` (plaintext size and SHA-256, ciphertext size, header). Raises
    IntegrityError for anything that does not authenticate, ObjectNotFoundError if absent,
    StopRequestedError once ``interrupt()`` says the run is stopping."""
    binding = ObjectBinding(tenant_id, workspace_of(name), name)
    with store.open_read(name) as reader:
        it = decrypt_iter(reader, binding=binding, dek_for=dek_for or dek_lookup(keychain, tenant_id))
        for _ in it:
            if interrupt is not None and interrupt():
                raise StopRequestedError(f"{store.label}: read of {name[:80]!r} interrupted: the run is stopping")
        return it.result


class LedgerBatch:
    """Copy-ledger rows buffered and written in one transaction every ``size`` rows or
    ``interval`` seconds: per-object transactions were a third of a shard's time. A crash
    loses at most the buffered rows; their objects are then found at the destination and
    checked against the source (``copy_object``), never written twice."""

    def __init__(
        self,
        state: Any,
        run_id: str,
        fence: Fence | None,
        *,
        size: int = 32,
        interval: float = 0.5,
        on_flush: Callable[[list[CopyRecord]], None] | None = None,
    ) -> None:
        self._state, self._run_id, self._fence = state, run_id, fence
        self._size, self._interval = size, interval
        self._on_flush = on_flush
        self._rows: list[CopyRecord] = []
        self._last = time.monotonic()

    def add(self, record: CopyRecord) -> bool:
        """Buffer ``record``; True if this flushed the buffer."""
        self._rows.append(record)
        if len(self._rows) >= self._size or time.monotonic() - self._last >= self._interval:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if self._rows:
            self._state.record_copies(self._run_id, self._rows, fence=self._fence)
            rows, self._rows = self._rows, []
            if self._on_flush is not None:
                self._on_flush(rows)
        self._last = time.monotonic()


def copy_object(
    src: Any,
    dst: Any,
    keychain: Any,
    tenant_id: str,
    name: bytes,
    *,
    source_etag: str | None = None,
    source_size: int | None = None,
    dek_floor: dict[str, list[int]] | None = None,
    before_replace: Callable[[bytes], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    source_attempts: int = SOURCE_READ_ATTEMPTS,
    check_dek_for: Callable[[Any], Any] | None = None,
    source_dek_for: Callable[[Any], Any] | None = None,
) -> ObjectCopy:
    """Copy one object, re-encrypted under a new DEK; see the module docstring.

    The source is read only as the version ``source_etag`` / ``source_size`` (the
    manifest's; ``SourceChangedError`` if it was replaced or deleted). If ``name`` is at
    the destination already (an earlier attempt committed it and died before the ledger
    write, or verify rejected it), it is kept only when it is what a copy would be now: it
    authenticates, its plaintext equals the source's and its DEK is newer than
    ``dek_floor``. Otherwise it is replaced: before cutover nothing reads the destination,
    and the source is intact. ``check_dek_for`` / ``source_dek_for`` resolve the DEK for the
    in-memory check of the new ciphertext / for the source (default: the keychain, per
    object).

    A source that does not authenticate is read again from the start, up to
    ``source_attempts`` reads in all; then PoisonSourceError (the caller quarantines it).
    ``interrupt()`` true (the run is stopping and the grace is over) raises
    StopRequestedError between plaintext chunks; the store aborts the upload."""
    job = _Job(
        src,
        dst,
        keychain,
        tenant_id,
        name,
        source_etag,
        source_size,
        dek_floor,
        interrupt,
        check_dek_for or dek_lookup(keychain, tenant_id),
        source_dek_for or _source_dek_lookup(keychain, tenant_id, src.label),
    )
    for attempt in range(1, source_attempts + 1):
        try:
            return _copy_once(job, before_replace)
        except PoisonSourceError as exc:
            if attempt >= source_attempts:
                raise PoisonSourceError(
                    f"{exc} ({attempt} reads)", resource=exc.resource, kind=exc.kind, attempts=attempt
                ) from exc
            log.warning(
                "%s: %r does not authenticate (read %d of %d); reading it again",
                src.label,
                name[:80],
                attempt,
                source_attempts,
            )
    raise AssertionError("unreachable")  # pragma: no cover - source_attempts >= 1


@dataclass(frozen=True)
class _Job:
    src: Any
    dst: Any
    keychain: Any
    tenant_id: str
    name: bytes
    source_etag: str | None
    source_size: int | None
    dek_floor: dict[str, list[int]] | None
    interrupt: Callable[[], bool] | None
    check_dek_for: Callable[[Any], Any]
    source_dek_for: Callable[[Any], Any]


def _copy_once(job: _Job, before_replace: Callable[[bytes], None] | None) -> ObjectCopy:
    try:
        return _write_copy(job)
    except ObjectExistsError:
        pass
    existing = _existing(job)
    if existing is not None:
        return existing
    if before_replace is not None:  # the one unconditional write: let the caller veto it
        before_replace(job.name)
    log.warning("%s: replacing %r, which does not match its source", job.dst.label, job.name[:80])
    job.dst.delete(job.name)
    return _write_copy(job)


def _write_copy(job: _Job) -> ObjectCopy:
    src, dst, keychain, tenant_id, name, interrupt = (
        job.src,
        job.dst,
        job.keychain,
        job.tenant_id,
        job.name,
        job.interrupt,
    )
    workspace = workspace_of(name)
    binding = ObjectBinding(tenant_id, workspace, name)
    source_failure: list[IntegrityError] = []  # the source's own failure, whatever the store wraps it in
    dek = keychain.dek_for_encrypt(tenant_id, workspace)
    with _open_source(src, name, job.source_etag, job.source_size) as reader:
        try:  # the header: parsed and checked against the binding before any upload starts
            plain = decrypt_iter(reader, binding=binding, dek_for=job.source_dek_for)
        except IntegrityError as exc:
            raise _as_poison(exc, src.label) from exc

        def measured() -> Iterator[bytes]:
            try:
                for i, chunk in enumerate(plain):
                    if i == 0:
                        crashpoints.hit("copy:mid-object")
                    if interrupt is not None and interrupt():
                        raise StopRequestedError(
                            f"{dst.label}: upload of {name[:80]!r} interrupted: the run is stopping"
                        )
                    yield chunk
            except IntegrityError as exc:
                source_failure.append(exc)
                raise

        def expect(check: DecryptResult) -> None:
            # The ciphertext about to be committed decrypts (authenticated, under the
            # keychain's DEK for its header) to the plaintext the source held.
            source = plain.result
            problems = []
            if check.plaintext_size != source.plaintext_size or not hmac.compare_digest(
                check.plaintext_sha256, source.plaintext_sha256
            ):
                problems.append("its plaintext differs from the source's")
            if check.header.dek_id != dek.dek_id:
                problems.append(f"its header names DEK {check.header.dek_id}, not {dek.dek_id}")
            if job.dek_floor is not None and not newer_than_bind(dek.dek_id, job.dek_floor):
                problems.append(f"DEK {dek.dek_id} is from before the key was bound")
            if problems:
                raise IntegrityError(
                    f"{dst.label}: new ciphertext of {name[:80]!r} failed its check before upload: "
                    + "; ".join(problems),
                    resource=dst.label,
                )

        try:
            info = dst.put_stream(
                name,
                _checked_ciphertext(
                    encrypt_iter(measured(), dek=dek.key, dek_id=dek.dek_id, binding=binding),
                    binding,
                    job.check_dek_for,
                    expect,
                ),
                if_absent=True,
                metadata={"akms_format": "1", "akms_dek": dek.dek_id},
            )
        except BaseException as exc:
            if source_failure:
                raise _as_poison(source_failure[0], src.label) from exc
            raise
    crashpoints.hit("copy:after-put")
    source = plain.result
    return ObjectCopy(
        name,
        source.plaintext_size,
        source.plaintext_sha256,
        info.size,
        info.etag,
        dek.dek_id,
        True,
        source_etag=reader.info.etag,
        source_size=reader.info.size,
        checksum=info.checksum,
    )


def _existing(job: _Job) -> ObjectCopy | None:
    """The object already at the destination if it is a good copy of the source (the
    manifest's version of it), else None. Compared with the source's plaintext, never
    with itself (faults A7, D10; I3)."""
    dst, name = job.dst, job.name
    info = dst.head(name)
    if info is None:  # deleted between the conditional write and now: write it
        return None
    try:
        found = read_back(dst, job.keychain, job.tenant_id, name)
    except KeychainTamperedError:
        raise  # the keychain, not the object, is in doubt: stop rather than rewrite
    except IntegrityError:
        return None  # does not authenticate: corrupt or foreign
    source = _source_digest(
        job.src, job.keychain, job.tenant_id, name, job.interrupt, etag=job.source_etag, size=job.source_size
    )
    if (
        found.plaintext_sha256 != source.plaintext_sha256
        or found.plaintext_size != source.plaintext_size
        or (job.dek_floor is not None and not newer_than_bind(found.header.dek_id, job.dek_floor))
    ):
        return None
    return ObjectCopy(
        name,
        found.plaintext_size,
        found.plaintext_sha256,
        info.size,
        info.etag,
        found.header.dek_id,
        False,
        source_etag=job.source_etag,
        source_size=job.source_size if job.source_size is not None else 0,
    )


@dataclass
class ShardResult:
    shard: int
    objects: int = 0  # handled in this call
    written: int = 0
    already: int = 0  # committed by an earlier attempt, verified and recorded
    skipped: int = 0  # the ledger said done before this call
    bytes_plaintext: int = 0
    failed: int = 0
    source_changed: int = 0  # of the failed: the source is not the manifest's version (changed, deleted)
    quarantined: int = 0  # source does not authenticate: recorded quarantined, not failed
    permanent: int = 0  # of the failed: no retry of the same input can fix them (not ``retryable``)
    interrupted: bool = False  # the run is stopping: objects of this shard were left for a resume
    errors: list[str] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _run_pool(
    items: Iterator[Any],
    work: Callable[[Any], Any],
    on_done: Callable[[Any, Any, BaseException | None], None],
    *,
    threads: int,
    stop: threading.Event,
    halt: Callable[[], bool] | None = None,
) -> bool:
    """Run ``work`` over ``items`` with at most ``threads`` in flight (bounded memory:
    the iterator is consumed lazily). ``halt()`` true (the run is stopping): no new item
    starts, queued ones are dropped, running ones finish. True if items were left."""
    halted = False

    def halting() -> bool:
        return halt is not None and halt()

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="akms-shard") as pool:
        pending: dict[Any, Any] = {}
        for item in items:
            if stop.is_set():
                break
            if halting():
                halted = True
                break
            pending[pool.submit(work, item)] = item
            if len(pending) >= threads * 2:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    on_done(pending.pop(f), f.result() if f.exception() is None else None, f.exception())
        if halting():
            for f in [f for f in pending if f.cancel()]:  # queued, never started: a resume does them
                del pending[f]
                halted = True
        for f in list(pending):
            exc = f.exception()
            on_done(pending.pop(f), f.result() if exc is None else None, exc)
    return halted


def _fatal(exc: BaseException) -> bool:
    """Errors that stop the shard at once: lost lease; the tenant's keys refused (revoked,
    the master key disabled by the customer, or its key service down past the grace
    policy: revoke wins, the run stops at this object boundary and resumes after restore);
    or not one of ours (a bug)."""
    refused = isinstance(exc, KeyServiceUnavailableError) or (
        isinstance(exc, KeyUnavailableError) and not isinstance(exc, KeyDestroyedError)
    )
    return isinstance(exc, FencedError) or refused or not isinstance(exc, ArchiveKmsError)


def _stop_checks(run_id: str) -> tuple[Callable[[], bool] | None, Callable[[], bool] | None]:
    """(halt, interrupt) for a shard of ``run_id``: take no new object once the run is
    asked to stop; interrupt objects in flight once the grace is over. (None, None) when
    the run does not execute in this process (a Dask worker: the shard runs to its end)."""
    stop = stopping.for_run(run_id)
    if stop is None:
        return None, None
    return stop.is_set, stop.overdue


def copy_shard(platform: ShardPlatform, run_id: str, shard: int, fence: Fence | None) -> dict[str, Any]:
    """Copy every object of ``shard`` the ledger does not have as copied/verified.

    Run by the copy step, it tries quarantined objects again (their source may have been
    fixed). Run by verify's first pass (verify is the running step), it copies again what
    failed, a copy or verify's own read-back, and leaves quarantined ones to support."""
    limit_allocator()  # in whatever process runs the shard (a Dask worker too); ADR 0019
    run = _get_run(platform.state, run_id)
    retry_quarantined = run.step("verify").state is not StepState.RUNNING
    return _copy_shard(platform, run, shard, fence, retry_quarantined=retry_quarantined)


def _copy_shard(
    platform: ShardPlatform, run: MigrationRun, shard: int, fence: Fence | None, *, retry_quarantined: bool
) -> dict[str, Any]:
    run_id = run.run_id
    plan = MigrationPlan.from_params(run.params)
    src = platform.store_for(plan.source_location)
    dst = platform.store_for(plan.destination_location)
    state, keychain, tenant = platform.state, platform.keychain, plan.tenant_id
    floor = (run.step("bind_key").result or {}).get("dek_floor")
    result = ShardResult(shard, errors=[])
    started = time.monotonic()
    stop = threading.Event()
    fatal: list[BaseException] = []
    lock = threading.Lock()
    halt, interrupt = _stop_checks(run_id)
    # Usually empty; a waiver recorded on a row survives the object being quarantined again.
    before: dict[bytes, Quarantine] = dict(quarantined(state, run_id, shard=shard))

    def before_replace(name: bytes) -> None:
        # Deleting is the one object-store write that is not conditional: only a worker that
        # still holds the tenant may do it, and never to a copy the ledger has verified.
        if fence is not None:
            state.check_fence(fence.tenant_id, fence.token)
        rec = state.get_copy(run_id, name)
        if rec is not None and rec.status is CopyStatus.VERIFIED:
            raise IntegrityError(
                f"{dst.label}: {name[:80]!r} is recorded verified but does not match its source "
                "now; not replacing it (inspect it, then rerun from verify)",
                resource=dst.label,
            )

    digests = LedgerDigests(keychain, tenant, run_id)
    budget = copy_budget(platform.settings.migration_copy_buffer_mib * 1024 * 1024)
    part_size = getattr(dst, "part_size", DEFAULT_PART_SIZE)
    parts = getattr(dst, "upload_budget", None)
    upload_buffer = platform.settings.migration_upload_buffer_mib * 1024 * 1024
    if parts is not None and parts.capacity > upload_buffer:
        parts.capacity = upload_buffer  # parts uploading in the store's threads, process-wide (ADR 0019, 0046)
    # No DEK memo of our own: the keychain's cache answers in microseconds and checks
    # revocation, erasure and the master key's state on every use (a memo here would let a
    # DEK outlive a revocation or an erasure by its lifetime).
    check_dek_for = dek_lookup(keychain, tenant)
    source_dek_for = _source_dek_lookup(keychain, tenant, src.label)
    attested = plan.verify == ATTESTED

    def work(entry: ManifestEntry) -> ObjectCopy:
        # A quarantined object's manifest version never authenticated: support's documented
        # fix is to restore the object and rerun, so its retry reads whatever version is
        # there now; a repaired one is audited (``object.source_repaired``) and becomes the
        # version verify and cleanup compare the source with. Every other object is read
        # only as the manifest recorded it.
        pinned = entry.name not in before
        with budget.hold(CopyBudget.cost(entry.size, part_size)):
            return _copy_entry(entry, pinned)

    def _copy_entry(entry: ManifestEntry, pinned: bool) -> ObjectCopy:
        return copy_object(
            src,
            dst,
            keychain,
            tenant,
            entry.name,
            source_etag=entry.etag if pinned else None,
            source_size=entry.size if pinned else None,
            dek_floor=floor,
            before_replace=before_replace,
            interrupt=interrupt,
            check_dek_for=check_dek_for,
            source_dek_for=source_dek_for,
        )

    progress_saved = [started]

    def flushed(rows: list[CopyRecord]) -> None:
        # The ledger rows are the checkpoint; the shard's cursor is progress only, saved
        # every PROGRESS_INTERVAL (it was a second transaction with every batch) and at the end.
        if time.monotonic() - progress_saved[0] >= PROGRESS_INTERVAL:
            state.save_checkpoint(run_id, "copy", shard, _cursor(result, started), fence=fence)
            progress_saved[0] = time.monotonic()
        crashpoints.hit("copy:after-record", times=sum(r.status is CopyStatus.COPIED for r in rows))

    ledger = LedgerBatch(state, run_id, fence, on_flush=flushed)

    def done(entry: ManifestEntry, copied: ObjectCopy | None, exc: BaseException | None) -> None:
        with lock:
            if stop.is_set():
                return
            try:
                if isinstance(exc, StopRequestedError):
                    result.interrupted = True  # not a failure: no row, a resume copies it
                    return
                result.objects += 1
                if isinstance(exc, PoisonSourceError):
                    result.quarantined += 1
                    prior = before.get(entry.name)
                    if result.errors is not None and len(result.errors) < 20:
                        result.errors.append(f"{entry.name[:120]!r}: quarantined: {exc}"[:300])
                    ledger.add(quarantine_record(entry.name, exc, waiver=prior.waiver if prior else None))
                    return
                if exc is None and attested and copied is not None and copied.written and copied.checksum is None:
                    exc = StorageError(
                        f"{dst.label}: the store confirmed no checksum for {entry.name[:80]!r}; the attested "
                        "verify mode needs one (ADR 0018): use verify mode read-back for this store",
                        resource=dst.label,
                    )
                if exc is not None:
                    result.failed += 1
                    if _fatal(exc):
                        raise exc
                    if isinstance(exc, SourceChangedError):
                        result.source_changed += 1
                        msg = f"source {exc.kind}: {exc}"[:500]
                    else:
                        result.permanent += 0 if getattr(exc, "retryable", False) else 1
                        msg = f"{type(exc).__name__}: {exc}"[:300]
                    if len(result.errors or []) < 20:
                        result.errors.append(f"{entry.name[:120]!r}: {msg}")  # type: ignore[union-attr]
                    ledger.add(CopyRecord(entry.name, CopyStatus.FAILED, error=msg))
                    return
                assert copied is not None
                if entry.name in before and not same_etag(copied.source_etag, entry.etag):
                    state.append_audit(
                        AuditEvent(
                            actor="migration",
                            action=REPAIRED_ACTION,
                            tenant_id=tenant,
                            run_id=run_id,
                            details={
                                "object_hex": entry.name.hex(),
                                "manifest_etag": entry.etag,
                                "manifest_size": entry.size,
                                "etag": copied.source_etag,
                                "size": copied.source_size,
                            },
                        )
                    )
                result.written += copied.written
                result.already += not copied.written
                result.bytes_plaintext += copied.plaintext_size
                ledger.add(
                    CopyRecord(
                        entry.name,
                        CopyStatus.COPIED,
                        dest_etag=copied.dest_etag,
                        dest_size=copied.dest_size,
                        plaintext_sha256=digests.of(
                            entry.name,
                            copied.source_etag,
                            copied.source_size,
                            copied.plaintext_size,
                            copied.plaintext_sha256,
                        ),
                    )
                )
            except BaseException as e:  # noqa: BLE001 - lost lease, or a bug: stop the shard
                fatal.append(e)
                stop.set()

    todo = state.iter_uncopied(run_id, shard=shard)
    if not retry_quarantined and before:
        todo = (e for e in todo if e.name not in before)
    if _run_pool(todo, work, done, threads=plan.threads_per_shard, stop=stop, halt=halt):
        result.interrupted = True
    if fatal:
        raise fatal[0]
    ledger.flush()  # what finished before a stop is recorded too
    result.seconds = time.monotonic() - started
    state.save_checkpoint(
        run_id,
        "copy",
        shard,
        {**_cursor(result, started), "complete": result.failed == 0 and not result.interrupted},
        fence=fence,
    )
    return result.to_dict()


def _get_run(runs: RunRepo, run_id: str) -> MigrationRun:
    run = runs.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    return run


def _cursor(result: ShardResult, started: float) -> dict[str, Any]:
    return {
        "objects": result.written + result.already,
        "bytes_plaintext": result.bytes_plaintext,
        "failed": result.failed,
        "quarantined": result.quarantined,
        "seconds": round(time.monotonic() - started, 3),
    }


def newer_than_bind(dek_id: str, floor: dict[str, list[int]]) -> bool:
    """Whether ``dek_id`` was created after the key was bound (``floor``: workspace ->
    [bucket, generation] of its newest DEK at bind time; DEK ids only grow)."""
    ws, bucket, gen = parse_dek_id(dek_id)
    last = floor.get(ws)
    return last is None or (bucket, gen) > (last[0], last[1])


def _with_manifest(
    records: Iterable[CopyRecord], entries: Iterable[ManifestEntry]
) -> Iterator[tuple[CopyRecord, ManifestEntry | None]]:
    """Each ledger row with its manifest entry: both come ordered by name, so one pass over
    each (constant memory) pairs them up."""
    it = iter(entries)
    entry = next(it, None)
    for rec in records:
        while entry is not None and entry.name < rec.name:
            entry = next(it, None)
        yield rec, (entry if entry is not None and entry.name == rec.name else None)


def verify_shard(platform: ShardPlatform, run_id: str, shard: int, fence: Fence | None) -> dict[str, Any]:
    """The ``read-back`` verify mode, one shard: read back every copied object at the
    destination. It must decrypt under the tenant's keychain with the destination binding,
    to the plaintext whose keyed digest the copy recorded for the manifest's version of the
    source (``digests``: name, manifest ETag and size, plaintext size and SHA-256), have
    the size that was written, and use a DEK created after the key was bound. Marks it
    verified, or failed (the copy step redoes it)."""
    run = _get_run(platform.state, run_id)
    plan = MigrationPlan.from_params(run.params)
    dst = platform.store_for(plan.destination_location)
    state, keychain, tenant = platform.state, platform.keychain, plan.tenant_id
    floor = (run.step("bind_key").result or {}).get("dek_floor", {})
    out: dict[str, Any] = {
        "shard": shard,
        "verified": 0,
        "already": 0,
        "mismatched": 0,
        "interrupted": False,
        "errors": [],
    }
    lock = threading.Lock()
    stop = threading.Event()
    fatal: list[BaseException] = []
    halt, interrupt = _stop_checks(run_id)
    digests = LedgerDigests(keychain, tenant, run_id)

    # Objects recorded but not yet verified; already-verified ones and objects the ledger
    # never recorded are accounted for by the step's reconciliation of the whole run.
    out["already"] = sum(1 for _ in state.iter_copies(run_id, shard=shard, status=CopyStatus.VERIFIED))
    ledger = LedgerBatch(state, run_id, fence)

    def work(item: tuple[CopyRecord, ManifestEntry | None]) -> str | None:
        rec, entry = item
        if entry is None:  # the ledger's foreign key makes this a state-store bug, not an object's fault
            raise IntegrityError(f"ledger row {rec.name[:80]!r} has no manifest entry", resource=f"run:{run_id}")
        res = read_back(dst, keychain, tenant, rec.name, interrupt)  # one GET: no HEAD, the body carries the size
        problems = []
        if not digests.matches(
            rec.plaintext_sha256, rec.name, entry.etag, entry.size, res.plaintext_size, res.plaintext_sha256
        ):
            problems.append(
                "plaintext differs from the manifest's version of the source "
                f"({entry.size} bytes, ETag {entry.etag}; keyed digest)"
            )
        if res.ciphertext_size != rec.dest_size:
            problems.append(f"size {res.ciphertext_size} != {rec.dest_size} written")
        if not newer_than_bind(res.header.dek_id, floor):
            problems.append(f"encrypted under {res.header.dek_id}, a DEK from before the key was bound")
        return "; ".join(problems) or None

    def done(item: tuple[CopyRecord, ManifestEntry | None], problem: str | None, exc: BaseException | None) -> None:
        rec = item[0]
        with lock:
            if stop.is_set():
                return
            try:
                if isinstance(exc, StopRequestedError):
                    out["interrupted"] = True  # stays copied: a resume verifies it
                    return
                if exc is not None and _fatal(exc):
                    raise exc
                if exc is not None:
                    problem = f"{type(exc).__name__}: {exc}"[:300]
                if problem:
                    out["mismatched"] += 1
                    if len(out["errors"]) < 20:
                        out["errors"].append(f"{rec.name[:120]!r}: {problem}")
                    ledger.add(CopyRecord(rec.name, CopyStatus.FAILED, error=problem[:500]))
                    return
                ledger.add(
                    CopyRecord(
                        rec.name,
                        CopyStatus.VERIFIED,
                        dest_etag=rec.dest_etag,
                        dest_size=rec.dest_size,
                        plaintext_sha256=rec.plaintext_sha256,
                    )
                )
                out["verified"] += 1
            except BaseException as e:  # noqa: BLE001 - lost lease, or a bug: stop the shard
                fatal.append(e)
                stop.set()

    # Keyset pages by name: rows this loop moves to verified never make a later page skip one.
    todo = _with_manifest(
        state.iter_copies(run_id, shard=shard, status=CopyStatus.COPIED), state.iter_manifest(run_id, shard=shard)
    )
    if _run_pool(todo, work, done, threads=plan.threads_per_shard, stop=stop, halt=halt):
        out["interrupted"] = True
    if fatal:
        raise fatal[0]
    ledger.flush()
    return out


def attest_copies(
    platform: ShardPlatform,
    run_id: str,
    listed: dict[bytes, Any],
    fence: Fence | None,
    *,
    check: Callable[[], None] | None = None,
    batch: int = 500,
) -> dict[str, Any]:
    """The ``attested`` verify mode (ADR 0018), for every copied row of the run: the
    destination listing (``listed``: name -> ``ObjectInfo``) shows the object version the
    copy committed (same ETag and size). That copy read the manifest's version of the
    source (``if_match``), decrypted its new ciphertext in memory under the tenant's
    keychain to the source's plaintext before committing it, and the store validated a
    checksum of exactly those bytes on every request; its row holds the keyed digest only
    such a copy writes. Marks rows verified, or failed (the copy step redoes them)."""
    state = platform.state
    ledger = LedgerBatch(state, run_id, fence, size=batch, interval=60.0)
    out: dict[str, Any] = {"verified": 0, "mismatched": 0, "errors": []}
    for n, rec in enumerate(state.iter_copies(run_id, status=CopyStatus.COPIED)):
        if check is not None and n % batch == 0:
            check()
        info = listed.get(rec.name)
        problems = []
        if not is_keyed(rec.plaintext_sha256):
            problems.append("its row holds no keyed digest from a checked copy (older code): copy it again")
        if info is None:
            problems.append("not at the destination")
        else:
            if not same_etag(info.etag, rec.dest_etag):
                problems.append(f"ETag {info.etag} at the destination, {rec.dest_etag} committed (replaced since?)")
            if info.size != rec.dest_size:
                problems.append(f"size {info.size} at the destination, {rec.dest_size} committed")
        if problems:
            out["mismatched"] += 1
            if len(out["errors"]) < 20:
                out["errors"].append(f"{rec.name[:120]!r}: {'; '.join(problems)}")
            ledger.add(CopyRecord(rec.name, CopyStatus.FAILED, error="; ".join(problems)[:500]))
            continue
        ledger.add(
            CopyRecord(
                rec.name,
                CopyStatus.VERIFIED,
                dest_etag=rec.dest_etag,
                dest_size=rec.dest_size,
                plaintext_sha256=rec.plaintext_sha256,
            )
        )
        out["verified"] += 1
    ledger.flush()
    return out


__all__ = [
    "ATTESTED",
    "READ_BACK",
    "REPAIRED_ACTION",
    "VERIFY_MODES",
    "LedgerBatch",
    "ObjectCopy",
    "SourceChangedError",
    "attest_copies",
    "copy_object",
    "copy_shard",
    "newer_than_bind",
    "read_back",
    "read_plaintext_digest",
    "verify_shard",
]
