"""Copy + re-encrypt and verify, one object and one shard at a time.

``copy_object`` streams: source reader -> authenticated decrypt (source binding) ->
SHA-256 of the plaintext -> encrypt under a fresh DEK of the tenant's (now customer-bound)
keychain -> conditional multipart/staged upload. At most one segment plus one upload part
is in memory whatever the object size, and a source that fails authentication half way
aborts the upload: nothing partial is ever committed (faults A3, A11).

``copy_shard`` / ``verify_shard`` work through one shard of the run's manifest with a
bounded thread pool. The copy ledger in the state store is the checkpoint: every object
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

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from archive_kms.crypto.envelope import DecryptResult, EnvelopeHeader, ObjectBinding, decrypt_iter, encrypt_iter
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    FencedError,
    IntegrityError,
    KeychainTamperedError,
    KeyNotFoundError,
    ObjectExistsError,
    StateError,
    ValidationError,
)
from archive_kms.keys.keychain import DataKey, parse_dek_id
from archive_kms.migration import crashpoints, stopping
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
from archive_kms.operations import reading
from archive_kms.operations.archive import workspace_of
from archive_kms.operations.reading import DekSource, dek_lookup, read_plaintext_digest
from archive_kms.state.port import (
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

log = logging.getLogger(__name__)


class CopyKeychain(DekSource, Protocol):
    """The slice of the keychain a copy uses: open objects, and encrypt under the active DEK."""

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK of ``workspace_id`` for ``now``'s time bucket (created on demand)."""
        ...


class ShardState(RunRepo, LedgerRepo, LeaseRepo, Protocol):
    """The run records, the copy ledger and the fence check: the state a shard uses."""


class ShardPlatform(Protocol):
    """What a copy or verify shard uses of the platform (``operations.platform.Platform``
    in a thread of the flow, or the one a Dask worker builds from settings)."""

    @property
    def state(self) -> ShardState: ...

    @property
    def keychain(self) -> CopyKeychain: ...

    def store_for(self, location: Location) -> ObjectStore: ...


@dataclass(frozen=True)
class ObjectCopy:
    name: bytes
    plaintext_size: int
    plaintext_sha256: str
    dest_size: int
    dest_etag: str
    dek_id: str
    written: bool  # False: an earlier attempt had committed it; verified instead


def _source_dek_lookup(keychain: DekSource, tenant_id: str, label: str) -> Callable[[EnvelopeHeader], SecretBytes]:
    """``reading.dek_lookup`` for a source object: a header (not yet authenticated) that names a
    malformed DEK id, or a DEK this tenant never had, is the object's fault, like a failed
    tag, not the keychain's. Any other key error (unusable key, throttling) stays what it is."""

    checked = dek_lookup(keychain, tenant_id)

    def lookup(header: EnvelopeHeader) -> SecretBytes:
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
    src: ObjectStore, keychain: DekSource, tenant_id: str, name: bytes, interrupt: Callable[[], bool] | None = None
) -> str:
    """SHA-256 of the source object's plaintext, read end to end; PoisonSourceError if
    it does not authenticate."""
    binding = ObjectBinding(tenant_id, workspace_of(name), name)
    try:
        with src.open_read(name) as reader:
            it = decrypt_iter(reader, binding=binding, dek_for=_source_dek_lookup(keychain, tenant_id, src.label))
            for _ in it:
                if interrupt is not None and interrupt():
                    raise StopRequestedError(f"{src.label}: read of {name[:80]!r} interrupted: the run is stopping")
            return it.result.plaintext_sha256
    except IntegrityError as exc:
        raise _as_poison(exc, src.label) from exc


def read_back(
    store: ObjectStore, keychain: DekSource, tenant_id: str, name: bytes, interrupt: Callable[[], bool] | None = None
) -> DecryptResult:
    """``reading.read_back`` that raises StopRequestedError once ``interrupt()`` says the
    run is stopping."""

    def stop_if_interrupted() -> None:
        if interrupt is not None and interrupt():
            raise StopRequestedError(f"{store.label}: read of {name[:80]!r} interrupted: the run is stopping")

    return reading.read_back(store, keychain, tenant_id, name, stop_if_interrupted)


class LedgerBatch:
    """Copy-ledger rows buffered and written in one transaction every ``size`` rows or
    ``interval`` seconds: per-object transactions were a third of a shard's time. A crash
    loses at most the buffered rows; their objects are then found at the destination and
    checked against the source (``copy_object``), never written twice."""

    def __init__(
        self,
        state: LedgerRepo,
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
    src: ObjectStore,
    dst: ObjectStore,
    keychain: CopyKeychain,
    tenant_id: str,
    name: bytes,
    *,
    dek_floor: dict[str, list[int]] | None = None,
    before_replace: Callable[[bytes], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    source_attempts: int = SOURCE_READ_ATTEMPTS,
) -> ObjectCopy:
    """Copy one object, re-encrypted under a new DEK; see the module docstring.

    If ``name`` is at the destination already (an earlier attempt committed it and died
    before the ledger write, or verify rejected it), it is kept only when it is what a copy
    would be now: it authenticates, its plaintext equals the source's and its DEK is newer
    than ``dek_floor``. Otherwise it is replaced: before cutover nothing reads the
    destination, and the source is intact.

    A source that does not authenticate is read again from the start, up to
    ``source_attempts`` reads in all; then PoisonSourceError (the caller quarantines it).
    ``interrupt()`` true (the run is stopping and the grace is over) raises
    StopRequestedError between plaintext chunks; the store aborts the upload."""
    for attempt in range(1, source_attempts + 1):
        try:
            return _copy_once(src, dst, keychain, tenant_id, name, dek_floor, before_replace, interrupt)
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


def _copy_once(
    src: ObjectStore,
    dst: ObjectStore,
    keychain: CopyKeychain,
    tenant_id: str,
    name: bytes,
    dek_floor: dict[str, list[int]] | None,
    before_replace: Callable[[bytes], None] | None,
    interrupt: Callable[[], bool] | None,
) -> ObjectCopy:
    try:
        return _write_copy(src, dst, keychain, tenant_id, name, interrupt)
    except ObjectExistsError:
        pass
    existing = _existing(src, dst, keychain, tenant_id, name, dek_floor, interrupt)
    if existing is not None:
        return existing
    if before_replace is not None:  # the one unconditional write: let the caller veto it
        before_replace(name)
    log.warning("%s: replacing %r, which does not match its source", dst.label, name[:80])
    dst.delete(name)
    return _write_copy(src, dst, keychain, tenant_id, name, interrupt)


def _write_copy(
    src: ObjectStore,
    dst: ObjectStore,
    keychain: CopyKeychain,
    tenant_id: str,
    name: bytes,
    interrupt: Callable[[], bool] | None = None,
) -> ObjectCopy:
    workspace = workspace_of(name)
    binding = ObjectBinding(tenant_id, workspace, name)
    sha = hashlib.sha256()
    size = {"n": 0}
    source_failure: list[IntegrityError] = []  # the source's own failure, whatever the store wraps it in
    dek = keychain.dek_for_encrypt(tenant_id, workspace)
    with src.open_read(name) as reader:
        try:  # the header: parsed and checked against the binding before any upload starts
            plain = decrypt_iter(reader, binding=binding, dek_for=_source_dek_lookup(keychain, tenant_id, src.label))
        except IntegrityError as exc:
            raise _as_poison(exc, src.label) from exc

        def measured() -> Iterator[bytes]:
            try:
                for i, chunk in enumerate(plain):
                    sha.update(chunk)
                    size["n"] += len(chunk)
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

        try:
            info = dst.put_stream(
                name,
                encrypt_iter(measured(), dek=dek.key, dek_id=dek.dek_id, binding=binding),
                if_absent=True,
                metadata={"akms_format": "1", "akms_dek": dek.dek_id},
            )
        except BaseException as exc:
            if source_failure:
                raise _as_poison(source_failure[0], src.label) from exc
            raise
    crashpoints.hit("copy:after-put")
    return ObjectCopy(name, size["n"], sha.hexdigest(), info.size, info.etag, dek.dek_id, True)


def _existing(
    src: ObjectStore,
    dst: ObjectStore,
    keychain: CopyKeychain,
    tenant_id: str,
    name: bytes,
    dek_floor: dict[str, list[int]] | None,
    interrupt: Callable[[], bool] | None = None,
) -> ObjectCopy | None:
    """The object already at the destination if it is a good copy of the source, else None.
    Compared with the source's plaintext, never with itself (faults A7, D10; I3)."""
    info = dst.head(name)
    if info is None:  # deleted between the conditional write and now: write it
        return None
    try:
        size, digest, dek_id = read_plaintext_digest(dst, keychain, tenant_id, name)
    except KeychainTamperedError:
        raise  # the keychain, not the object, is in doubt: stop rather than rewrite
    except IntegrityError:
        return None  # does not authenticate: corrupt or foreign
    src_digest = _source_digest(src, keychain, tenant_id, name, interrupt)
    if digest != src_digest or (dek_floor is not None and not newer_than_bind(dek_id, dek_floor)):
        return None
    return ObjectCopy(name, size, digest, info.size, info.etag, dek_id, False)


@dataclass
class ShardResult:
    shard: int
    objects: int = 0  # handled in this call
    written: int = 0
    already: int = 0  # committed by an earlier attempt, verified and recorded
    skipped: int = 0  # the ledger said done before this call
    bytes_plaintext: int = 0
    failed: int = 0
    quarantined: int = 0  # source does not authenticate: recorded quarantined, not failed
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
    """Errors that stop the shard at once: lost lease, or not one of ours (a bug)."""
    return isinstance(exc, FencedError) or not isinstance(exc, ArchiveKmsError)


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

    def work(entry: ManifestEntry) -> ObjectCopy:
        return copy_object(
            src, dst, keychain, tenant, entry.name, dek_floor=floor, before_replace=before_replace, interrupt=interrupt
        )

    def flushed(rows: list[CopyRecord]) -> None:
        state.save_checkpoint(run_id, "copy", shard, _cursor(result, started), fence=fence)
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
                if exc is not None:
                    result.failed += 1
                    if _fatal(exc):
                        raise exc
                    msg = f"{type(exc).__name__}: {exc}"[:300]
                    if len(result.errors or []) < 20:
                        result.errors.append(f"{entry.name[:120]!r}: {msg}")  # type: ignore[union-attr]
                    ledger.add(CopyRecord(entry.name, CopyStatus.FAILED, error=msg))
                    return
                assert copied is not None
                result.written += copied.written
                result.already += not copied.written
                result.bytes_plaintext += copied.plaintext_size
                ledger.add(
                    CopyRecord(
                        entry.name,
                        CopyStatus.COPIED,
                        dest_etag=copied.dest_etag,
                        dest_size=copied.dest_size,
                        plaintext_sha256=copied.plaintext_sha256,
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


def verify_shard(platform: ShardPlatform, run_id: str, shard: int, fence: Fence | None) -> dict[str, Any]:
    """Read back every copied object of ``shard`` at the destination: it decrypts under
    the tenant's keychain with the destination binding, its plaintext SHA-256 equals the
    source's (recorded at copy time from an authenticated read), its size equals what was
    written, and its DEK was created after the key was bound. Marks it verified, or
    failed (the copy step redoes it)."""
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

    # Objects recorded but not yet verified; already-verified ones and objects the ledger
    # never recorded are accounted for by the step's reconciliation of the whole run.
    out["already"] = sum(1 for _ in state.iter_copies(run_id, shard=shard, status=CopyStatus.VERIFIED))
    ledger = LedgerBatch(state, run_id, fence)

    def work(rec: CopyRecord) -> str | None:
        res = read_back(dst, keychain, tenant, rec.name, interrupt)  # one GET: no HEAD, the body carries the size
        problems = []
        if res.plaintext_sha256 != rec.plaintext_sha256:
            problems.append("plaintext digest differs from the source's")
        if res.ciphertext_size != rec.dest_size:
            problems.append(f"size {res.ciphertext_size} != {rec.dest_size} written")
        if not newer_than_bind(res.header.dek_id, floor):
            problems.append(f"encrypted under {res.header.dek_id}, a DEK from before the key was bound")
        return "; ".join(problems) or None

    def done(rec: CopyRecord, problem: str | None, exc: BaseException | None) -> None:
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
    todo = state.iter_copies(run_id, shard=shard, status=CopyStatus.COPIED)
    if _run_pool(todo, work, done, threads=plan.threads_per_shard, stop=stop, halt=halt):
        out["interrupted"] = True
    if fatal:
        raise fatal[0]
    ledger.flush()
    return out


__all__ = [
    "LedgerBatch",
    "ObjectCopy",
    "copy_object",
    "copy_shard",
    "newer_than_bind",
    "read_back",
    "read_plaintext_digest",
    "verify_shard",
]
