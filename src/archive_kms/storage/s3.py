"""S3 adapter (boto3): one tenant's prefix in a shared bucket, or a dedicated bucket.

Takes a ready boto3 S3 client (``clients.aws_client("s3", settings)``): retries with
adaptive backoff, checksums "when_required" (faults A13). On top of that the adapter:

* sends ``x-amz-checksum-sha256`` (an S3 additional checksum, computed here from the
  bytes sent) on PutObject and every UploadPart, so a body corrupted on the way fails
  with ``BadDigest`` instead of being stored; the checksum S3 echoes (the object's, or the
  multipart composite of the parts') must be the one we computed, and is returned as
  ``ObjectInfo.checksum`` (ADR 0018). SHA-256 replaces the earlier ``Content-MD5``: S3
  validates it the same way, and with SHA-NI it costs a third of MD5's CPU;
* writes objects smaller than one part with one PutObject, larger ones as a multipart
  upload (parts of ``part_size``, doubling every 1,000 parts) with up to
  ``parts_in_flight`` parts uploading at once while the next is cut from the stream
  (``port.PartUploads``, charged to the store's ``PartBudget``), aborted on any failure
  once the parts already sent have finished;
* makes ``if_absent`` writes conditional with ``If-None-Match: *`` on PutObject and on
  CompleteMultipartUpload (a 412 becomes ``ObjectExistsError``); a ``head`` first avoids
  uploading a large object only to be refused at the end;
* for a location with an SSE-KMS key, sends ``ServerSideEncryption=aws:kms`` and the key
  ARN on every PutObject / CreateMultipartUpload (never relying on the bucket default,
  faults A14), and checks the response names that key;
* reads with one streaming GET through obstore when given ``reads``
  (``storage.s3_obstore``, ADR 0043: the same guarantees at a quarter of botocore's CPU),
  else through boto3: ``If-Match`` when the caller names the version it wants:
  another version is ``ObjectChangedError``); if the connection breaks mid-body it resumes
  with a ranged GET conditioned on the ETag (``If-Match``), so a changed object fails
  instead of mixing two versions (faults A3);
* deletes many objects with ``DeleteObjects`` (1,000 keys a request);
* lists with ListObjectsV2 pages (botocore adds ``EncodingType=url`` and decodes keys),
  skipping duplicates and failing on out-of-order pages (faults A10).

botocore turns a "200 OK with an <Error> body" on CompleteMultipartUpload into a 500 and
retries it (``botocore.handlers._handle_200_error``); if retries run out, the ClientError
is translated like any 5xx (faults A6). ``tests/contract`` checks that path.

A CompleteMultipartUpload that committed but whose response was lost is retried by
botocore and answered ``NoSuchUpload`` (the upload is gone because it completed). The
adapter then reads the object's ETag: if it is the multipart ETag of the parts it sent,
the write did happen, and is reported as the port says (success; ``ObjectExistsError``
for ``if_absent``), instead of a failure with nothing left to abort (faults A7).
``tests/faults/test_storage_faults.py`` runs these paths through a fault proxy.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from botocore.exceptions import ClientError

from archive_kms.errors import (
    ArchiveKmsError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.s3_errors import NETWORK_ERRORS, NOT_FOUND_CODES, error_code, translate_error
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
    validate_metadata,
)

if TYPE_CHECKING:
    from archive_kms.storage.s3_obstore import ObstoreS3Reads

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
DELETE_BATCH = 1_000  # DeleteObjects' limit
_PART_TIER = 1_000
_READ_CHUNK = 1024 * 1024


def _precondition_failed(exc: ClientError) -> bool:
    code, status = error_code(exc)
    return code in ("PreconditionFailed", "412") or status == 412


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def composite_sha256(part_checksums: list[str]) -> str:
    """S3's composite checksum of a multipart object: SHA-256 of the parts' binary SHA-256
    digests in order, base64, ``-<parts>``."""
    joined = b"".join(base64.b64decode(c) for c in part_checksums)
    return f"{base64.b64encode(hashlib.sha256(joined).digest()).decode('ascii')}-{len(part_checksums)}"


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 gives the object completed from parts with these ETags: the MD5 of
    their binary digests, ``-<count>``. ``None`` if a part ETag is not an MD5 hex digest."""
    try:
        digests = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    except ValueError:
        return None
    if len(digests) != 16 * len(part_etags):
        return None
    return f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(part_etags)}"'


class S3ObjectStore:
    """A tenant's objects under ``prefix`` in ``bucket``."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        *,
        sse_kms_key_arn: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        list_page_size: int = 1000,
        read_chunk_size: int = _READ_CHUNK,
        max_read_resumes: int = 3,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        upload_buffer: int | PartBudget = DEFAULT_UPLOAD_BUFFER,
        reads: ObstoreS3Reads | None = None,
    ) -> None:
        if not 1 <= list_page_size <= 1000:
            raise ValidationError(f"list_page_size must be 1..1000, got {list_page_size}")
        self._s3 = client
        self._bucket = bucket
        self._prefix = prefix
        self._sse_key = sse_kms_key_arn
        self._part_size = check_part_size(part_size)
        self._parts_in_flight = check_parts_in_flight(parts_in_flight)
        self.upload_budget = as_budget(upload_buffer)
        self._page_size = list_page_size
        self._read_chunk = read_chunk_size
        self._max_resumes = max_read_resumes
        self._reads = reads  # open_read through obstore (ADR 0043); None: boto3

    @property
    def label(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    def _fail(self, exc: BaseException, key: str | None, op: str) -> NoReturn:
        raise translate_error(exc, bucket=self._bucket, key=key, op=op) from exc

    def _sse_args(self) -> dict[str, Any]:
        if self._sse_key is None:
            return {}
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self._sse_key, "BucketKeyEnabled": True}

    def _check_sse(self, resp: Mapping[str, Any], key: str, *, written: bool) -> None:
        """Defense in depth: the object must be encrypted under the location's key. If a
        committed object is not, it is deleted again before we report the failure."""
        if self._sse_key is None:
            return
        got = resp.get("SSEKMSKeyId")
        if (
            resp.get("ServerSideEncryption") != "aws:kms"
            or not got
            or not (got == self._sse_key or got.endswith("/" + self._sse_key.rsplit("/", 1)[-1]))
        ):
            if written:
                try:
                    self._s3.delete_object(Bucket=self._bucket, Key=key)
                except Exception as exc:  # noqa: BLE001 - the encryption failure is the news
                    log.warning(
                        "s3://%s/%s: could not delete wrongly encrypted object: %s",
                        self._bucket,
                        key,
                        type(exc).__name__,
                    )
            raise StorageError(
                f"s3://{self._bucket}/{key}: stored with encryption {resp.get('ServerSideEncryption')!r} "
                f"key {got!r}, not SSE-KMS under {self._sse_key!r}",
                resource=f"s3://{self._bucket}/{key}",
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
        parts = iter_parts(chunks, lambda i: part_size_for(i, self._part_size, tier=_PART_TIER))
        first, last = next(parts)
        if last:  # the conditional PUT itself refuses an existing object: no HEAD round trip
            return self._put_single(name, key, first, if_absent, meta)
        if if_absent and self.head(name) is not None:  # don't upload gigabytes only to be refused at Complete
            raise ObjectExistsError(
                f"s3://{self._bucket}/{key}: object already exists", resource=f"s3://{self._bucket}/{key}"
            )
        # The list hands the first part over without keeping a reference (memory stays
        # at about one part).
        head = [first]
        del first
        return self._put_multipart(name, key, handover(head, parts), if_absent, meta)

    def _put_single(self, name: bytes, key: str, body: bytes, if_absent: bool, meta: dict[str, str]) -> ObjectInfo:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        checksum = _sha256_b64(body)
        try:
            resp = self._s3.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=body,
                ChecksumSHA256=checksum,
                Metadata=meta,
                **self._sse_args(),
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - translated at the edge
            self._fail(exc, key, "PutObject")
        self._check_sse(resp, key, written=True)
        self._check_echo(resp, checksum, key, "PutObject")
        return ObjectInfo(name, len(body), resp["ETag"], dict(meta), checksum="sha256:" + checksum)

    def _check_echo(self, resp: Mapping[str, Any], expected: str, key: str, op: str) -> None:
        """The checksum S3 stored with the object must be the one we sent: it validated the
        body against it, so the object holds exactly our bytes."""
        got = resp.get("ChecksumSHA256")
        if got != expected:
            raise StorageError(
                f"s3://{self._bucket}/{key}: {op} stored checksum {got!r}, not the SHA-256 {expected!r} we sent "
                "(the store did not confirm it holds our bytes)",
                resource=f"s3://{self._bucket}/{key}",
            )

    def _put_multipart(
        self, name: bytes, key: str, parts: Iterator[bytes], if_absent: bool, meta: dict[str, str]
    ) -> ObjectInfo:
        try:
            created = self._s3.create_multipart_upload(
                Bucket=self._bucket, Key=key, Metadata=meta, ChecksumAlgorithm="SHA256", **self._sse_args()
            )
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key, "CreateMultipartUpload")
        upload_id = created["UploadId"]

        def upload_part(number: int, body: bytes) -> tuple[str, str]:
            checksum = _sha256_b64(body)
            try:
                resp = self._s3.upload_part(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumSHA256=checksum,
                )
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, key, f"UploadPart {number}")
            self._check_echo(resp, checksum, key, f"UploadPart {number}")
            return str(resp["ETag"]), checksum

        uploads = PartUploads(
            upload_part, in_flight=self._parts_in_flight, budget=self.upload_budget, thread_name="akms-s3-part"
        )
        done: list[dict[str, Any]] = []
        committed = False
        try:
            self._check_sse(created, key, written=False)
            size = uploads.send_all(parts, limit=MAX_PARTS, where=f"s3://{self._bucket}/{key}")
            done = [{"PartNumber": n, "ETag": etag, "ChecksumSHA256": sha} for n, (etag, sha) in uploads.finish()]
            composite = composite_sha256([p["ChecksumSHA256"] for p in done])
            extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
            try:
                resp = self._s3.complete_multipart_upload(
                    Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}, **extra
                )
            except Exception as exc:
                found = self._completed_earlier(exc, key, done)
                if found is None:
                    self._fail(exc, key, "CompleteMultipartUpload")
                committed = True
                if if_absent:  # the port's "already there": the caller verifies (faults A7)
                    raise ObjectExistsError(
                        f"s3://{self._bucket}/{key}: object already exists (an earlier attempt of this "
                        "CompleteMultipartUpload committed it; its response was lost)",
                        resource=f"s3://{self._bucket}/{key}",
                    ) from exc
                resp = found
            committed = True
        except BaseException:
            # Whatever stopped us (a source error, a failed part, a refused condition,
            # Ctrl-C), leave no upload behind: first let the parts already sent finish (a
            # part landing after the abort could outlive it), then abort. A crash that
            # skips this is what abort_stale_uploads is for.
            try:
                uploads.drain()
            finally:
                if not committed:
                    self._abort(key, upload_id)
            raise
        self._check_sse(resp, key, written=True)
        if resp.get("ChecksumSHA256") is not None:  # HeadObject (a lost response) omits it
            self._check_echo(resp, composite, key, "CompleteMultipartUpload")
        return ObjectInfo(name, size, resp["ETag"], dict(meta), checksum="sha256-composite:" + composite)

    def _completed_earlier(self, exc: BaseException, key: str, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
        """After ``NoSuchUpload`` on CompleteMultipartUpload: the HeadObject response if
        the object under ``key`` is the one these parts make (an earlier attempt of the
        same request committed it and its response was lost), else ``None``."""
        if not isinstance(exc, ClientError) or error_code(exc)[0] != "NoSuchUpload":
            return None
        expected = multipart_etag([p["ETag"] for p in parts])
        if expected is None:
            return None
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=key)
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            return None
        if head.get("ETag") != expected:
            return None
        log.info("s3://%s/%s: CompleteMultipartUpload had committed before its response was lost", self._bucket, key)
        return head

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - best effort; the original error matters more
            log.warning(
                "s3://%s/%s: could not abort multipart upload %s: %s (abort_stale_uploads will)",
                self._bucket,
                key,
                upload_id,
                type(exc).__name__,
            )

    def delete(self, name: bytes) -> None:
        key = object_key(self._prefix, name)
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            err = translate_error(exc, bucket=self._bucket, key=key, op="DeleteObject")
            if not isinstance(err, ObjectNotFoundError):
                raise err from exc

    def delete_many(self, names: Iterable[bytes]) -> int:
        count = 0
        for batch in batched((object_key(self._prefix, n) for n in names), DELETE_BATCH):
            try:
                resp = self._s3.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, batch[0], f"DeleteObjects ({len(batch)} keys)")
            failed = [e for e in resp.get("Errors") or () if e.get("Code") not in NOT_FOUND_CODES]
            if failed:
                first = failed[0]
                raise translate_error(
                    ClientError(
                        {"Error": {"Code": first.get("Code"), "Message": first.get("Message")}}, "DeleteObjects"
                    ),
                    bucket=self._bucket,
                    key=first.get("Key"),
                    op=f"DeleteObjects ({len(failed)} of {len(batch)} keys refused)",
                )
            count += len(batch)
        return count

    # --- reads ---------------------------------------------------------------------------

    def head(self, name: bytes) -> ObjectInfo | None:
        key = object_key(self._prefix, name)
        try:
            resp = self._s3.head_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            err = translate_error(exc, bucket=self._bucket, key=key, op="HeadObject")
            if isinstance(err, ObjectNotFoundError):
                return None
            raise err from exc
        return ObjectInfo(
            name, int(resp["ContentLength"]), resp["ETag"], dict(resp.get("Metadata") or {}), resp.get("LastModified")
        )

    def open_read(self, name: bytes, *, if_match: str | None = None) -> ObjectReader:
        key = object_key(self._prefix, name)
        if self._reads is not None:
            return self._reads.open_read(name, key, if_match=if_match)
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=key, **({"IfMatch": if_match} if if_match else {}))
        except Exception as exc:
            if if_match and isinstance(exc, ClientError) and _precondition_failed(exc):
                raise ObjectChangedError(
                    f"s3://{self._bucket}/{key}: not the version asked for (ETag {if_match} was replaced)",
                    resource=f"s3://{self._bucket}/{key}",
                ) from exc
            self._fail(exc, key, "GetObject")
        info = ObjectInfo(
            name, int(resp["ContentLength"]), resp["ETag"], dict(resp.get("Metadata") or {}), resp.get("LastModified")
        )
        state = {"body": resp["Body"]}

        def chunks() -> Iterator[bytes]:
            pos = 0
            resumes = 0
            while True:
                try:
                    for chunk in state["body"].iter_chunks(self._read_chunk):
                        pos += len(chunk)
                        yield chunk
                    return
                except NETWORK_ERRORS + (ConnectionError,) as exc:
                    state["body"].close()
                    if resumes >= self._max_resumes or pos >= info.size:
                        self._fail(exc, key, "GetObject (body)")
                    resumes += 1
                    log.info(
                        "s3://%s/%s: resuming read at byte %d after %s", self._bucket, key, pos, type(exc).__name__
                    )
                    try:
                        # If-Match: a replaced object fails (412) instead of mixing versions.
                        state["body"] = self._s3.get_object(
                            Bucket=self._bucket, Key=key, Range=f"bytes={pos}-", IfMatch=info.etag
                        )["Body"]
                    except Exception as exc2:
                        err = translate_error(exc2, bucket=self._bucket, key=key, op="GetObject (resume)")
                        if isinstance(err, (ObjectExistsError, ObjectNotFoundError)):
                            raise TransientError(
                                f"s3://{self._bucket}/{key}: object changed during read", resource=key
                            ) from exc2
                        raise err from exc2

        return ObjectReader(info, chunks(), label=f"s3://{self._bucket}/{key}", on_close=lambda: state["body"].close())

    def list(self, prefix: bytes = b"") -> Iterator[ObjectInfo]:
        key_prefix = self._prefix + encode_prefix(prefix)
        paginator = self._s3.get_paginator("list_objects_v2")
        last: str | None = None
        try:
            for page in paginator.paginate(
                Bucket=self._bucket, Prefix=key_prefix, PaginationConfig={"PageSize": self._page_size}
            ):
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if last is not None and key <= last:
                        if key == last:
                            continue  # a page repeated an entry: report each object once
                        raise ServiceUnavailableError(
                            f"s3://{self._bucket}/{key_prefix}: listing went backwards ({key!r} after {last!r}); "
                            "retry the listing",
                            resource=key_prefix,
                        )
                    last = key
                    name = decode_key(self._prefix, key)
                    if name is None:
                        log.warning("s3://%s: skipping key %r not written by this store", self._bucket, key)
                        continue
                    yield ObjectInfo(name, int(item["Size"]), item["ETag"], None, item.get("LastModified"))
        except ArchiveKmsError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, key_prefix, "ListObjectsV2")

    # --- uploads -------------------------------------------------------------------------

    def pending_uploads(self) -> Iterator[PendingUpload]:
        paginator = self._s3.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(
                Bucket=self._bucket, Prefix=self._prefix, PaginationConfig={"PageSize": self._page_size}
            ):
                for up in page.get("Uploads", ()):
                    yield PendingUpload(
                        decode_key(self._prefix, up["Key"]), up["Key"], up["UploadId"], up.get("Initiated")
                    )
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, self._prefix, "ListMultipartUploads")

    def abort_stale_uploads(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        horizon = (now or datetime.now(UTC)) - older_than
        stale = [u for u in self.pending_uploads() if u.initiated is None or u.initiated <= horizon]
        for up in stale:
            try:
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=up.key, UploadId=up.upload_id)
            except ClientError as exc:
                if error_code(exc)[0] not in ("NoSuchUpload", "404"):  # already gone: fine
                    raise translate_error(exc, bucket=self._bucket, key=up.key, op="AbortMultipartUpload") from exc
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, up.key, "AbortMultipartUpload")
        return len(stale)
