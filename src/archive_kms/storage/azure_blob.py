"""Azure Blob adapter (azure-storage-blob): one tenant's container (optionally a prefix in it).

Takes a ready ``ContainerClient`` (from ``wiring.blob_service_client``). The adapter:

* writes objects smaller than one block with one Put Blob, larger ones as staged blocks
  (``part_size``, doubling every 5,000 blocks) committed with Put Block List. Block ids
  are ``<attempt>-<index>`` where ``attempt`` is new for every call: ids are deterministic
  within an attempt and never reused across attempts, so a crashed attempt's uncommitted
  blocks can never be committed by a later one (faults A16); all ids have the same length
  (Azure rejects mixed lengths on one blob);
* sends a transactional MD5 with every block and single put (``validate_content``);
* makes ``if_absent`` writes conditional with ``If-None-Match: *`` (``BlobAlreadyExists``
  / ``ConditionNotMet`` become ``ObjectExistsError``);
* reads in ranged GETs of ``read_chunk_size`` (1 MiB; see ``_READ_CHUNK`` for why not
  more) conditioned on the ETag seen when opened (``If-Match``), so memory stays bounded
  and a replaced blob fails the read instead of mixing versions; each range is retried by
  the SDK on its own (faults A3).
* lists with ``list_blobs`` pages, once per blob, failing on out-of-order pages.

Uncommitted blocks of a crashed attempt are invisible to reads and lists and expire
after 7 days; ``pending_uploads`` finds blobs that have only uncommitted blocks and
``abort_stale_uploads`` deletes them. Stale uncommitted blocks on an *existing* blob
are not reported (listing every blob's block list is too expensive); the next commit
discards them, or Azure does after 7 days.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from archive_kms.errors import (
    ArchiveKmsError,
    KeyUnavailableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.storage.naming import decode_key, encode_prefix, object_key
from archive_kms.storage.port import (
    DEFAULT_PART_SIZE,
    ObjectInfo,
    ObjectReader,
    PendingUpload,
    check_part_size,
    handover,
    iter_parts,
    part_size_for,
    validate_metadata,
)

log = logging.getLogger(__name__)

MAX_BLOCKS = 50_000
_BLOCK_TIER = 5_000
# azure-storage-blob materialises each ranged GET with ``b"".join(list(response))``, and
# ``list()`` takes the stream's ``__len__`` (its byte count) as a length hint: a range of
# N bytes briefly costs ~9N bytes (8-byte list slots). 1 MiB ranges keep a reader near
# 9 MiB; larger ranges buy fewer requests at 9x their size in memory.
_READ_CHUNK = 1024 * 1024

_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError", "Md5Mismatch", "InvalidBlockList",
                    "ContainerBeingDeleted"}


def translate_error(exc: BaseException, *, where: str, op: str) -> ArchiveKmsError:
    """Map an azure-core exception to our hierarchy, naming the container/blob and op."""
    if isinstance(exc, ArchiveKmsError):
        return exc
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return ServiceUnavailableError(f"Azure Blob {op} on {where}: {type(exc).__name__} (retryable)",
                                       resource=where)
    if isinstance(exc, HttpResponseError):
        code = str(getattr(exc, "error_code", None) or "")
        status = int(getattr(exc, "status_code", None) or 0)
        msg = f"Azure Blob {op} on {where} failed: {code or status}"
        if code == "ContainerNotFound":
            return StorageError(f"{msg}: the container does not exist", resource=where)
        if code.startswith("KeyVault") or code == "EncryptionScopeDisabled":
            return KeyUnavailableError(f"{msg}: the customer-managed key refused", resource=where, state=code)
        if isinstance(exc, ResourceNotFoundError) or code == "BlobNotFound" or status == 404:
            return ObjectNotFoundError(f"{where}: no such object ({op})", resource=where)
        if (isinstance(exc, (ResourceExistsError, ResourceModifiedError))
                or code in {"BlobAlreadyExists", "ConditionNotMet"} or status == 412):
            return ObjectExistsError(f"{where}: object already exists (conditional {op} refused)", resource=where)
        if code in _TRANSIENT_CODES or status in (408, 429, 500, 502, 503, 504):
            return ServiceUnavailableError(f"{msg} (retryable)", resource=where)
        if isinstance(exc, ClientAuthenticationError) or status == 403:
            return StorageError(f"{msg}: access denied", resource=where)
        if status == 409:
            return TransientError(f"{msg}: conflicting concurrent operation; retry", resource=where)
        return StorageError(f"{msg} (HTTP {status})", resource=where)
    if isinstance(exc, AzureError):
        return StorageError(f"Azure Blob {op} on {where}: {type(exc).__name__}: {exc}", resource=where)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return ServiceUnavailableError(f"Azure Blob {op} on {where}: {type(exc).__name__} (retryable)",
                                       resource=where)
    raise exc


class AzureBlobObjectStore:
    """A tenant's objects in ``container`` (under ``prefix``, usually empty)."""

    def __init__(self, container: Any, *, prefix: str = "", part_size: int = DEFAULT_PART_SIZE,
                 list_page_size: int = 5000, read_chunk_size: int = _READ_CHUNK) -> None:
        if not 1 <= list_page_size <= 5000:
            raise ValidationError(f"list_page_size must be 1..5000, got {list_page_size}")
        self._c = container
        self._prefix = prefix
        self._part_size = check_part_size(part_size)
        self._page_size = list_page_size
        self._read_chunk = read_chunk_size

    @property
    def label(self) -> str:
        return f"azure://{self._c.account_name}/{self._c.container_name}/{self._prefix}"

    @property
    def container_name(self) -> str:
        return self._c.container_name

    def _where(self, key: str | None) -> str:
        return self.label + (key[len(self._prefix):] if key is not None else "")

    def _fail(self, exc: BaseException, key: str | None, op: str) -> NoReturn:
        raise translate_error(exc, where=self._where(key), op=op) from exc

    # --- writes --------------------------------------------------------------------------

    def put_stream(self, name: bytes, chunks: Iterable[bytes], *, if_absent: bool = False,
                   metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        key = object_key(self._prefix, name)
        meta = validate_metadata(metadata)
        blob = self._c.get_blob_client(key)
        parts = iter_parts(chunks, lambda i: part_size_for(i, self._part_size, tier=_BLOCK_TIER))
        first, last = next(parts)
        if not last and if_absent and self.head(name) is not None:  # don't stage blocks only to be refused
            raise ObjectExistsError(f"{self._where(key)}: object already exists", resource=self._where(key))
        if last:  # Put Blob with overwrite=False refuses an existing blob itself: no HEAD round trip
            try:
                resp = blob.upload_blob(first, length=len(first), overwrite=not if_absent, metadata=meta,
                                        validate_content=True, max_concurrency=1)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, key, "Put Blob")
            return ObjectInfo(name, len(first), resp["etag"], dict(meta), resp.get("last_modified"))
        head = [first]
        del first

        from azure.storage.blob import BlobBlock

        attempt = uuid.uuid4().hex[:16]
        blocks: list[BlobBlock] = []
        size = 0
        index = -1
        for body in handover(head, parts):  # not enumerate(): its cached tuple keeps the last part alive
            index += 1
            if index >= MAX_BLOCKS:
                raise ValidationError(f"{self._where(key)}: object exceeds {MAX_BLOCKS} blocks")
            block_id = f"{attempt}-{index:06d}"  # same length for every block (Azure requires it)
            try:
                blob.stage_block(block_id, body, length=len(body), validate_content=True)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, key, f"Put Block {index}")
            blocks.append(BlobBlock(block_id=block_id))
            size += len(body)
            del body
        extra: dict[str, Any] = {"match_condition": MatchConditions.IfMissing} if if_absent else {}
        try:
            resp = blob.commit_block_list(blocks, metadata=meta, **extra)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "Put Block List")
        return ObjectInfo(name, size, resp["etag"], dict(meta), resp.get("last_modified"))

    def delete(self, name: bytes) -> None:
        key = object_key(self._prefix, name)
        try:
            self._c.delete_blob(key)
        except Exception as exc:  # noqa: BLE001
            err = translate_error(exc, where=self._where(key), op="Delete Blob")
            if not isinstance(err, ObjectNotFoundError):
                raise err from exc

    # --- reads ---------------------------------------------------------------------------

    def head(self, name: bytes) -> ObjectInfo | None:
        key = object_key(self._prefix, name)
        try:
            props = self._c.get_blob_client(key).get_blob_properties()
        except Exception as exc:  # noqa: BLE001
            err = translate_error(exc, where=self._where(key), op="Get Blob Properties")
            if isinstance(err, ObjectNotFoundError):
                return None
            raise err from exc
        return ObjectInfo(name, int(props.size), props.etag, dict(props.metadata or {}), props.last_modified)

    def open_read(self, name: bytes) -> ObjectReader:
        key = object_key(self._prefix, name)
        blob = self._c.get_blob_client(key)
        try:
            props = blob.get_blob_properties()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "Get Blob Properties")
        info = ObjectInfo(name, int(props.size), props.etag, dict(props.metadata or {}), props.last_modified)

        def chunks() -> Iterator[bytes]:
            offset = 0
            while offset < info.size:
                length = min(self._read_chunk, info.size - offset)
                try:
                    data = blob.download_blob(offset=offset, length=length, etag=info.etag,
                                              match_condition=MatchConditions.IfNotModified,
                                              max_concurrency=1).readall()
                except Exception as exc:  # noqa: BLE001
                    err = translate_error(exc, where=self._where(key), op="Get Blob (range)")
                    if isinstance(err, (ObjectExistsError, ObjectNotFoundError)):
                        raise TransientError(f"{self._where(key)}: object changed or vanished during read",
                                             resource=self._where(key)) from exc
                    raise err from exc
                offset += len(data)
                yield data
                if not data:
                    return  # the reader reports the short read

        return ObjectReader(info, chunks(), label=self._where(key))

    def list(self, prefix: bytes = b"") -> Iterator[ObjectInfo]:
        key_prefix = self._prefix + encode_prefix(prefix)
        last: str | None = None
        try:
            pages = self._c.list_blobs(name_starts_with=key_prefix, results_per_page=self._page_size).by_page()
            for page in pages:
                for props in page:
                    key = props.name
                    if last is not None and key <= last:
                        if key == last:
                            continue
                        raise ServiceUnavailableError(
                            f"{self.label}: listing went backwards ({key!r} after {last!r}); retry the listing",
                            resource=self.label)
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

    # --- uploads -------------------------------------------------------------------------

    def pending_uploads(self) -> Iterator[PendingUpload]:
        """Blobs that exist only as uncommitted blocks. The listing with
        ``uncommittedblobs`` shows them with size 0; a properties call tells them apart
        from committed empty blobs (it is 404 for them)."""
        try:
            for props in self._c.list_blobs(name_starts_with=self._prefix, include=["uncommittedblobs"],
                                            results_per_page=self._page_size):
                if props.size:
                    continue
                try:
                    self._c.get_blob_client(props.name).get_blob_properties()
                    continue  # a committed empty blob
                except ResourceNotFoundError:
                    pass
                yield PendingUpload(decode_key(self._prefix, props.name), props.name, None,
                                    props.last_modified or props.creation_time)
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
            blob.delete_blob()
            return
        except ResourceNotFoundError:
            pass  # Azure proper answers 404 for a blob that has only uncommitted blocks
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "Delete Blob (uncommitted)")
        # Committing an empty list discards the uncommitted blocks; then delete that empty
        # blob, conditioned on its etag. Only if still absent (If-None-Match), so a
        # writer that committed meanwhile keeps its object.
        try:
            resp = blob.commit_block_list([], match_condition=MatchConditions.IfMissing)
        except ResourceExistsError:
            return
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "Put Block List (discard)")
        try:
            blob.delete_blob(etag=resp["etag"], match_condition=MatchConditions.IfNotModified)
        except (ResourceNotFoundError, ResourceModifiedError):
            return
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "Delete Blob (discard)")
