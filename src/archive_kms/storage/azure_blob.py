"""Azure Blob adapter (azure-storage-blob): one tenant's container (optionally a prefix in it).

Takes a ready ``ContainerClient`` (from ``clients.blob_service_client``). The adapter:

* writes objects smaller than one block with one Put Blob, larger ones as staged blocks
  (``part_size``, doubling every 5,000 blocks; up to ``parts_in_flight`` staging at once
  while the next is cut from the stream, charged to the store's ``PartBudget``: see
  ``port.PartUploads``) committed with Put Block List. Block ids
  are ``<attempt>-<index>`` where ``attempt`` is new for every call: ids are deterministic
  within an attempt and never reused across attempts, so a crashed attempt's uncommitted
  blocks can never be committed by a later one (faults A16); all ids have the same length
  (Azure rejects mixed lengths on one blob);
* sends a transactional MD5 with every block and single put (``validate_content``: Azure
  and Azurite refuse a body that does not match with ``Md5Mismatch``) and checks the MD5
  the service echoes; ``ObjectInfo.checksum`` is the blob's MD5 (one Put Blob) or the MD5
  of the blocks' MD5s in order (staged blocks), ADR 0018;
* reads only the version asked for when given ``if_match`` (``ObjectChangedError``
  otherwise);
* deletes many blobs with blob batch requests (256 a request);
* makes ``if_absent`` writes conditional with ``If-None-Match: *`` (``BlobAlreadyExists``
  / ``ConditionNotMet`` become ``ObjectExistsError``);
* reads in ranged GETs of ``read_chunk_size`` (1 MiB; see ``_READ_CHUNK`` for why not
  more) conditioned on the ETag seen when opened (``If-Match``), so memory stays bounded
  and a replaced blob fails the read instead of mixing versions; a range whose body breaks
  is requested again whole (faults A3).
* lists with ``list_blobs`` pages, once per blob, failing on out-of-order pages.
* retries every request itself (``AzureRetry``, through ``archive_kms.retry``), with the
  SDK's own retries switched off per call (``retry_total=0``): azure-storage-blob's
  ``ExponentialRetry`` never retries a 429, ignores ``Retry-After`` and waits 15 s (±3)
  before its first retry. Ours retries what translates to a retryable error (429, 5xx,
  ``ServerBusy``/``OperationTimedOut``, MD5 mismatches, broken connections, other 409
  conflicts), sleeping at least what ``Retry-After`` asks (faults A1/A2); a request is re-sent whole
  (a range GET from its start), which is safe because every write is a complete block,
  blob or block list whose bytes we still hold. When the attempts run out the caller gets
  ``ServiceUnavailableError`` naming the blob.

Uncommitted blocks of a crashed attempt are invisible to reads and lists and expire
after 7 days; ``pending_uploads`` finds blobs that have only uncommitted blocks and
``abort_stale_uploads`` deletes them. Stale uncommitted blocks on an *existing* blob
are not reported (listing every blob's block list is too expensive); the next commit
discards them, or Azure does after 7 days.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from archive_kms import retry
from archive_kms.errors import (
    ArchiveKmsError,
    KeyUnavailableError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.retry import Backoff
from archive_kms.storage.naming import decode_key, encode_prefix, object_key
from archive_kms.storage.port import (
    DEFAULT_PART_SIZE,
    DEFAULT_PARTS_IN_FLIGHT,
    DEFAULT_UPLOAD_BUFFER,
    ObjectInfo,
    ObjectReader,
    PartBudget,
    PartUploads,
    PendingUpload,
    as_budget,
    batched,
    check_part_size,
    check_parts_in_flight,
    handover,
    iter_parts,
    part_size_for,
    same_etag,
    validate_metadata,
)

log = logging.getLogger(__name__)

MAX_BLOCKS = 50_000
DELETE_BATCH = 256  # blob batch's limit
_BLOCK_TIER = 5_000
# azure-storage-blob materialises each ranged GET with ``b"".join(list(response))``, and
# ``list()`` takes the stream's ``__len__`` (its byte count) as a length hint: a range of
# N bytes briefly costs ~9N bytes (8-byte list slots). 1 MiB ranges keep a reader near
# 9 MiB; larger ranges buy fewer requests at 9x their size in memory.
_READ_CHUNK = 1024 * 1024

_TRANSIENT_CODES = {
    "ServerBusy",
    "OperationTimedOut",
    "InternalError",
    "Md5Mismatch",
    "InvalidBlockList",
    "ContainerBeingDeleted",
}
_BROKEN_CONNECTION = (IncompleteReadError, ServiceRequestError, ServiceResponseError)
#: Per-call option that switches the SDK's own retry policy off (we retry, see AzureRetry).
_NO_SDK_RETRY: dict[str, Any] = {"retry_total": 0}

T = TypeVar("T")


#: The adapter's retry budget and schedule (``archive_kms.retry``): 6 attempts, equal-jitter
#: backoff from 0.5 s doubling up to 20 s, never sooner than ``Retry-After``, and a
#: ``Retry-After`` beyond 60 s is not waited out in-process (the call fails, retryable).
AzureRetry = Backoff
AZURE_RETRY = AzureRetry(max_attempts=6, base_delay=0.5, max_delay=20.0, max_retry_after=60.0)


def translate_error(exc: BaseException, *, where: str, op: str) -> ArchiveKmsError:
    """Map an azure-core exception to our hierarchy, naming the container/blob and op."""
    if isinstance(exc, ArchiveKmsError):
        return exc
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return ServiceUnavailableError(f"Azure Blob {op} on {where}: {type(exc).__name__} (retryable)", resource=where)
    if isinstance(exc, HttpResponseError):
        raw_code = getattr(exc, "error_code", None) or ""
        # azure-storage-blob gives known codes as StorageErrorCode members, whose str() on
        # Python 3.11 is "StorageErrorCode.MD5_MISMATCH", not the wire code "Md5Mismatch".
        code = str(getattr(raw_code, "value", raw_code))
        status = int(getattr(exc, "status_code", None) or 0)
        msg = f"Azure Blob {op} on {where} failed: {code or status}"
        if not status and (
            isinstance(exc, IncompleteReadError)
            or isinstance(getattr(exc, "inner_exception", None), _BROKEN_CONNECTION)
        ):
            # No complete HTTP answer: the SDK's download wraps a body that kept breaking
            # (IncompleteReadError, ServiceResponseError) in a bare HttpResponseError.
            return ServiceUnavailableError(
                f"Azure Blob {op} on {where}: connection broke ({type(exc.inner_exception or exc).__name__}, "
                "retryable)",
                resource=where,
            )
        if code == "ContainerNotFound":
            return StorageError(f"{msg}: the container does not exist", resource=where)
        if code.startswith("KeyVault") or code == "EncryptionScopeDisabled":
            return KeyUnavailableError(f"{msg}: the customer-managed key refused", resource=where, state=code)
        if isinstance(exc, ResourceNotFoundError) or code == "BlobNotFound" or status == 404:
            return ObjectNotFoundError(f"{where}: no such object ({op})", resource=where)
        if code in _TRANSIENT_CODES:  # before the 409s: ContainerBeingDeleted is not "object exists"
            return ServiceUnavailableError(f"{msg} (retryable)", resource=where)
        if (
            isinstance(exc, ResourceModifiedError)
            or code in {"BlobAlreadyExists", "ConditionNotMet"}
            or status == 412
            or (isinstance(exc, ResourceExistsError) and not code)
        ):
            return ObjectExistsError(f"{where}: object already exists (conditional {op} refused)", resource=where)
        if status in (408, 429, 500, 502, 503, 504):
            return ServiceUnavailableError(f"{msg} (retryable)", resource=where)
        if isinstance(exc, ClientAuthenticationError) or status == 403:
            return StorageError(f"{msg}: access denied", resource=where)
        if status == 409:
            return TransientError(f"{msg}: conflicting concurrent operation; retry", resource=where)
        return StorageError(f"{msg} (HTTP {status})", resource=where)
    if isinstance(exc, AzureError):
        return StorageError(f"Azure Blob {op} on {where}: {type(exc).__name__}: {exc}", resource=where)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return ServiceUnavailableError(f"Azure Blob {op} on {where}: {type(exc).__name__} (retryable)", resource=where)
    raise exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AzureBlobObjectStore:
    """A tenant's objects in ``container`` (under ``prefix``, usually empty)."""

    def __init__(
        self,
        container: Any,
        *,
        prefix: str = "",
        part_size: int = DEFAULT_PART_SIZE,
        list_page_size: int = 5000,
        read_chunk_size: int = _READ_CHUNK,
        retry: AzureRetry = AZURE_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        upload_buffer: int | PartBudget = DEFAULT_UPLOAD_BUFFER,
    ) -> None:
        if not 1 <= list_page_size <= 5000:
            raise ValidationError(f"list_page_size must be 1..5000, got {list_page_size}")
        self._c = container
        self._prefix = prefix
        self._part_size = check_part_size(part_size)
        self._parts_in_flight = check_parts_in_flight(parts_in_flight)
        self.upload_budget = as_budget(upload_buffer)
        self._page_size = list_page_size
        self._read_chunk = read_chunk_size
        self._retry = retry
        self._sleep = sleep
        self._rand = rand

    @property
    def label(self) -> str:
        return f"azure://{self._c.account_name}/{self._c.container_name}/{self._prefix}"

    @property
    def container_name(self) -> str:
        return self._c.container_name

    def _where(self, key: str | None) -> str:
        return self.label + (key[len(self._prefix) :] if key is not None else "")

    def _fail(self, exc: BaseException, key: str | None, op: str) -> NoReturn:
        raise translate_error(exc, where=self._where(key), op=op) from exc

    def _call(self, op: str, key: str | None, request: Callable[[], T]) -> T:
        """Run one request (made with ``_NO_SDK_RETRY``), retrying what a retry can fix
        (a retryable translated error: throttling, 5xx, broken connections) per the
        store's ``AzureRetry`` (``archive_kms.retry.call``). Any other outcome, and the
        last failure, is raised translated."""
        where = self._where(key)
        return retry.call(
            request,
            backoff=self._retry,
            translate=lambda exc: translate_error(exc, where=where, op=op),
            what=f"{where}: {op}",
            sleep=self._sleep,
            rand=self._rand,
        )

    # --- writes --------------------------------------------------------------------------

    def put_stream(
        self,
        name: bytes,
        chunks: Iterable[bytes],
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        key = object_key(self._prefix, name)
        meta = validate_metadata(metadata)
        blob = self._c.get_blob_client(key)
        parts = iter_parts(chunks, lambda i: part_size_for(i, self._part_size, tier=_BLOCK_TIER))
        first, last = next(parts)
        if not last and if_absent and self.head(name) is not None:  # don't stage blocks only to be refused
            raise ObjectExistsError(f"{self._where(key)}: object already exists", resource=self._where(key))
        if last:  # Put Blob with overwrite=False refuses an existing blob itself: no HEAD round trip
            resp = self._put_blob(blob, key, first, if_absent, meta)
            md5 = self._echoed_md5(resp, first, key, "Put Blob")
            return ObjectInfo(
                name, len(first), resp["etag"], dict(meta), resp.get("last_modified"), checksum="md5:" + _b64(md5)
            )
        head = [first]
        del first

        from azure.storage.blob import BlobBlock

        attempt = uuid.uuid4().hex[:16]

        def block_id_of(number: int) -> str:
            return f"{attempt}-{number - 1:06d}"  # same length for every block (Azure requires it)

        def stage(number: int, body: bytes) -> bytes:
            return self._stage(blob, key, number - 1, block_id_of(number), body)

        # No abort on Azure: staged blocks of a failed attempt stay uncommitted (cleanup's,
        # A16). Draining only makes sure no block is still being staged after we return.
        uploads: PartUploads[bytes] = PartUploads(
            stage, in_flight=self._parts_in_flight, budget=self.upload_budget, thread_name="akms-blob-block"
        )
        try:
            size = uploads.send_all(handover(head, parts), limit=MAX_BLOCKS, where=self._where(key), unit="blocks")
            staged = uploads.finish()
            blocks = [BlobBlock(block_id=block_id_of(n)) for n, _ in staged]
        except BaseException:
            uploads.drain()
            raise
        extra: dict[str, Any] = {"match_condition": MatchConditions.IfMissing} if if_absent else {}
        # A retry after a commit whose response was lost: unconditional, it commits the
        # same blocks again (same content); conditional, it is refused (ObjectExistsError,
        # the port's "already there, verify it", faults A7).
        resp = self._call(
            "Put Block List", key, lambda: blob.commit_block_list(blocks, metadata=meta, **extra, **_NO_SDK_RETRY)
        )
        composite = hashlib.md5(b"".join(md5 for _, md5 in staged), usedforsecurity=False).digest()
        return ObjectInfo(
            name,
            size,
            resp["etag"],
            dict(meta),
            resp.get("last_modified"),
            checksum=f"md5-blocks:{_b64(composite)}-{len(staged)}",
        )

    def _echoed_md5(self, resp: Any, body: bytes, key: str, op: str) -> bytes:
        """The MD5 of ``body``, which the service validated (``validate_content``) and must
        echo back: a mismatch means it did not confirm it stored our bytes."""
        md5 = hashlib.md5(body, usedforsecurity=False).digest()
        got = resp.get("content_md5") if hasattr(resp, "get") else None
        if got is not None and bytes(got) != md5:
            raise StorageError(
                f"{self._where(key)}: {op} echoed MD5 {_b64(bytes(got))}, not {_b64(md5)} we sent",
                resource=self._where(key),
            )
        return md5

    def _put_blob(self, blob: Any, key: str, body: bytes, if_absent: bool, meta: dict[str, str]) -> Any:
        # A retry after a lost response: unconditional, it writes the same bytes again;
        # conditional, it is refused (ObjectExistsError: "already there, verify it").
        return self._call(
            "Put Blob",
            key,
            lambda: blob.upload_blob(
                body,
                length=len(body),
                overwrite=not if_absent,
                metadata=meta,
                validate_content=True,
                max_concurrency=1,
                **_NO_SDK_RETRY,
            ),
        )

    def _stage(self, blob: Any, key: str, index: int, block_id: str, body: bytes) -> bytes:
        resp = self._call(
            f"Put Block {index}",
            key,
            lambda: blob.stage_block(block_id, body, length=len(body), validate_content=True, **_NO_SDK_RETRY),
        )
        return self._echoed_md5(resp, body, key, f"Put Block {index}")

    def delete(self, name: bytes) -> None:
        key = object_key(self._prefix, name)
        try:
            self._call("Delete Blob", key, lambda: self._c.delete_blob(key, **_NO_SDK_RETRY))
        except ObjectNotFoundError:
            pass  # already gone (or a retry after a lost response)

    def delete_many(self, names: Iterable[bytes]) -> int:
        count = 0
        for batch in batched((object_key(self._prefix, n) for n in names), DELETE_BATCH):

            def send(batch: list[str] = batch) -> list[Any]:
                return list(self._c.delete_blobs(*batch, raise_on_any_failure=False, **_NO_SDK_RETRY))

            results = self._call(f"Blob Batch Delete ({len(batch)} blobs)", batch[0], send)
            failed = [(k, r) for k, r in zip(batch, results, strict=False) if r.status_code not in (200, 202, 404)]
            if failed:
                key, resp = failed[0]
                raise StorageError(
                    f"{self._where(key)}: batch delete refused {len(failed)} of {len(batch)} blobs "
                    f"(first: HTTP {resp.status_code})",
                    resource=self._where(key),
                )
            count += len(batch)
        return count

    # --- reads ---------------------------------------------------------------------------

    def head(self, name: bytes) -> ObjectInfo | None:
        key = object_key(self._prefix, name)
        try:
            props = self._properties(key)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(name, int(props.size), props.etag, dict(props.metadata or {}), props.last_modified)

    def open_read(self, name: bytes, *, if_match: str | None = None) -> ObjectReader:
        key = object_key(self._prefix, name)
        blob = self._c.get_blob_client(key)
        props = self._properties(key)
        if if_match is not None and not same_etag(props.etag, if_match):
            raise ObjectChangedError(
                f"{self._where(key)}: not the version asked for (ETag {if_match} was replaced by {props.etag})",
                resource=self._where(key),
            )
        info = ObjectInfo(name, int(props.size), props.etag, dict(props.metadata or {}), props.last_modified)

        def chunks() -> Iterator[bytes]:
            offset = 0
            while offset < info.size:
                data = self._read_range(blob, key, info.etag, offset, min(self._read_chunk, info.size - offset))
                offset += len(data)
                yield data
                if not data:
                    return  # the reader reports the short read

        return ObjectReader(info, chunks(), label=self._where(key))

    def _properties(self, key: str) -> Any:
        blob = self._c.get_blob_client(key)
        return self._call("Get Blob Properties", key, lambda: blob.get_blob_properties(**_NO_SDK_RETRY))

    def _read_range(self, blob: Any, key: str, etag: str, offset: int, length: int) -> bytes:
        """One range, fetched whole (a broken body is re-requested from ``offset``), only
        from the version with ``etag``."""
        try:
            return self._call(
                "Get Blob (range)",
                key,
                lambda: blob.download_blob(
                    offset=offset,
                    length=length,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                    max_concurrency=1,
                    **_NO_SDK_RETRY,
                ).readall(),
            )
        except (ObjectExistsError, ObjectNotFoundError) as exc:
            raise TransientError(
                f"{self._where(key)}: object changed or vanished during read", resource=self._where(key)
            ) from exc

    def list(self, prefix: bytes = b"") -> Iterator[ObjectInfo]:
        key_prefix = self._prefix + encode_prefix(prefix)
        last: str | None = None
        try:
            for page in self._pages(key_prefix, "List Blobs", include=None):
                for props in page:
                    key = props.name
                    if last is not None and key <= last:
                        if key == last:
                            continue
                        raise ServiceUnavailableError(
                            f"{self.label}: listing went backwards ({key!r} after {last!r}); retry the listing",
                            resource=self.label,
                        )
                    last = key
                    name = decode_key(self._prefix, key)
                    if name is None:
                        log.warning("%s: skipping blob %r not written by this store", self.label, key)
                        continue
                    yield ObjectInfo(name, int(props.size), props.etag, None, props.last_modified)
        except ArchiveKmsError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key_prefix, "List Blobs")

    def _pages(self, key_prefix: str, op: str, include: builtins.list[str] | None) -> Iterator[builtins.list[Any]]:
        """Listing pages, each fetched with retries. A failed page fetch leaves the pager's
        continuation token where it was, so the retry asks for the same page again."""
        pager = self._c.list_blobs(
            name_starts_with=key_prefix, include=include, results_per_page=self._page_size, **_NO_SDK_RETRY
        ).by_page()

        def fetch() -> list[Any] | None:
            page = next(pager, None)
            return None if page is None else list(page)  # the page's items arrived with it

        while (page := self._call(op, key_prefix, fetch)) is not None:
            yield page

    # --- uploads -------------------------------------------------------------------------

    def pending_uploads(self) -> Iterator[PendingUpload]:
        """Blobs that exist only as uncommitted blocks. The listing with
        ``uncommittedblobs`` shows them with size 0; a properties call tells them apart
        from committed empty blobs (it is 404 for them)."""
        try:
            for page in self._pages(self._prefix, "List Blobs (uncommitted)", include=["uncommittedblobs"]):
                for props in page:
                    if props.size:
                        continue
                    try:
                        self._properties(props.name)
                        continue  # a committed empty blob
                    except ObjectNotFoundError:
                        pass
                    yield PendingUpload(
                        decode_key(self._prefix, props.name),
                        props.name,
                        None,
                        props.last_modified or props.creation_time,
                    )
        except ArchiveKmsError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, self._prefix, "List Blobs (uncommitted)")

    def abort_stale_uploads(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        horizon = (now or datetime.now(UTC)) - older_than
        count = 0
        for up in list(self.pending_uploads()):
            if up.initiated is not None and up.initiated > horizon:
                continue
            self._discard_uncommitted(up.key)
            count += 1
        return count

    def _discard_uncommitted(self, key: str) -> None:
        blob = self._c.get_blob_client(key)
        try:
            self._call("Delete Blob (uncommitted)", key, lambda: blob.delete_blob(**_NO_SDK_RETRY))
            return
        except ObjectNotFoundError:
            pass  # Azure proper answers 404 for a blob that has only uncommitted blocks
        # Committing an empty list discards the uncommitted blocks; then delete that empty
        # blob, conditioned on its etag. Only if still absent (If-None-Match), so a
        # writer that committed meanwhile keeps its object.
        try:
            resp = self._call(
                "Put Block List (discard)",
                key,
                lambda: blob.commit_block_list([], match_condition=MatchConditions.IfMissing, **_NO_SDK_RETRY),
            )
        except ObjectExistsError:
            return
        try:
            self._call(
                "Delete Blob (discard)",
                key,
                lambda: blob.delete_blob(
                    etag=resp["etag"], match_condition=MatchConditions.IfNotModified, **_NO_SDK_RETRY
                ),
            )
        except (ObjectNotFoundError, ObjectExistsError):
            return
