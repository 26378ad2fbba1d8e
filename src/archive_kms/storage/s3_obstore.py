"""S3 reads through obstore (the Rust ``object_store`` client): the streaming GET of
``S3ObjectStore.open_read`` at about a quarter of botocore's CPU (docs/benchmarks.md,
session 6; ADR 0043).

Only reads move: a write stays on boto3 because obstore returns neither the checksum S3
stored (the echo ``S3ObjectStore`` checks, ADR 0018) nor the SSE-KMS key it used, and it
cannot make a multipart commit conditional (``If-None-Match: *``) without holding the
whole object in memory. ``S3ObjectStore`` takes an ``ObstoreS3Reads`` for its bucket
(``clients.obstore_s3_store`` builds the client) and hands ``open_read`` to it; head,
list, delete and the upload bookkeeping stay on boto3.

What a read keeps from the boto3 path: ``If-Match`` on the GET (another version is
``ObjectChangedError`` before a byte is returned), bounded chunks (``min_chunk_size``),
the size check of ``ObjectReader`` (a short or long body raises), a resume after a broken
body with a ranged GET conditioned on the ETag (a replaced object fails instead of mixing
versions, faults A3), and the same error translation: obstore's errors carry the HTTP
status and S3's XML error body; the code and status parsed out of them are looked up in
``s3_errors.error_for``, the table boto3's errors go through too (so a refusing SSE-KMS
key is ``KeyUnavailableError`` here exactly as on boto3). obstore retries 5xx, throttling
and connection errors itself (``clients.obstore_s3_store`` sets the limits) before one
reaches us.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator
from typing import Any

from archive_kms.errors import (
    ArchiveKmsError,
    ObjectChangedError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
)
from archive_kms.s3_errors import error_for
from archive_kms.storage.port import ObjectInfo, ObjectReader

log = logging.getLogger(__name__)

_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([^<]{1,100})</Code>")
#: Attributes obstore reports beside the user metadata (object_store's ``Attribute``).
_STANDARD_ATTRIBUTES = frozenset(
    {"Content-Type", "Content-Encoding", "Content-Disposition", "Content-Language", "Cache-Control"}
)
_MAX_RESUMES = 3


def s3_error_of(exc: BaseException) -> tuple[str, int] | None:
    """The S3 error code and HTTP status an obstore error carries (``None`` when the
    request got no HTTP response: a connection that failed or broke)."""
    text = str(exc)
    status = _STATUS_RE.search(text)
    if status is None:
        return None
    code = _CODE_RE.search(text)
    return (code.group(1) if code else status.group(1)), int(status.group(1))


def translate_obstore_error(exc: BaseException, *, bucket: str, key: str, op: str) -> ArchiveKmsError:
    """An obstore error in our hierarchy, mapped by ``s3_errors.error_for`` (the table the
    boto3 path uses too) from the S3 code and status it carries, so both clients report a
    failure the same way. The message names bucket, key and operation; it never repeats
    obstore's text (which holds the request URL but no credentials)."""
    if isinstance(exc, ArchiveKmsError):
        return exc
    where = f"s3://{bucket}/{key}"
    found = s3_error_of(exc)
    if found is None:
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or _is_transport(exc):
            return ServiceUnavailableError(f"S3 {op} on {where}: connection failed (retryable)", resource=where)
        return StorageError(f"S3 {op} on {where}: {type(exc).__name__}", resource=where)
    code, status = found
    return error_for(code, status, bucket=bucket, key=key, op=op)


def _is_transport(exc: BaseException) -> bool:
    """obstore's ``GenericError`` for a request that never got a response (reqwest's
    "error sending request", a reset or a timeout, after obstore's own retries)."""
    text = str(exc)
    return any(s in text for s in ("HTTP error", "error sending request", "timed out", "connection", "error decoding"))


class ObstoreS3Reads:
    """Streaming reads of one bucket through an obstore ``S3Store``."""

    def __init__(self, store: Any, bucket: str, *, chunk_size: int) -> None:
        self._store = store
        self._bucket = bucket
        self._chunk = chunk_size

    def __repr__(self) -> str:
        return f"ObstoreS3Reads(s3://{self._bucket})"  # the store's config holds the credentials

    def open_read(self, name: bytes, key: str, *, if_match: str | None) -> ObjectReader:
        import obstore

        where = f"s3://{self._bucket}/{key}"
        try:
            result = obstore.get(self._store, key, options={"if_match": if_match} if if_match else None)
        except Exception as exc:
            if if_match and type(exc).__name__ == "PreconditionError":
                raise ObjectChangedError(
                    f"{where}: not the version asked for (ETag {if_match} was replaced)", resource=where
                ) from exc
            raise translate_obstore_error(exc, bucket=self._bucket, key=key, op="GetObject") from exc
        meta = result.meta
        attributes = result.attributes
        info = ObjectInfo(
            name,
            int(meta["size"]),
            str(meta["e_tag"]),
            {k: str(v) for k, v in attributes.items() if k not in _STANDARD_ATTRIBUTES},
            meta.get("last_modified"),
        )
        state: dict[str, Any] = {"stream": result.stream(min_chunk_size=self._chunk)}

        def chunks() -> Generator[bytes, None, None]:
            pos = 0
            resumes = 0
            while True:
                try:
                    for chunk in state["stream"]:
                        data = bytes(chunk)
                        pos += len(data)
                        yield data
                    return
                except Exception as exc:
                    if resumes >= _MAX_RESUMES or pos >= info.size:
                        raise translate_obstore_error(exc, bucket=self._bucket, key=key, op="GetObject (body)") from exc
                    resumes += 1
                    log.info("%s: resuming read at byte %d after %s", where, pos, type(exc).__name__)
                    try:
                        # If-Match: a replaced object fails (412) instead of mixing versions.
                        again = obstore.get(self._store, key, options={"range": {"offset": pos}, "if_match": info.etag})
                    except Exception as exc2:
                        if type(exc2).__name__ in ("PreconditionError", "NotFoundError") or isinstance(
                            exc2, FileNotFoundError
                        ):
                            raise TransientError(f"{where}: object changed during read", resource=key) from exc2
                        raise translate_obstore_error(
                            exc2, bucket=self._bucket, key=key, op="GetObject (resume)"
                        ) from exc2
                    state["stream"] = again.stream(min_chunk_size=self._chunk)

        body = chunks()

        def close() -> None:  # ends the generator, which lets go of the stream and its connection
            body.close()
            state.pop("stream", None)

        return ObjectReader(info, body, label=where, on_close=close)
