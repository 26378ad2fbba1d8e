"""S3 errors translated into the project's hierarchy (``archive_kms.errors``), at the edge.

Shared by every adapter that talks to S3: the object store (``storage/s3.py``), bucket
provisioning (``storage/locations.py``) and the audit anchor store
(``state/anchors_s3.py``). It sits beside ``clients`` at the bottom of the layers and
imports only ``errors`` and botocore (docs/adr/0008-layers.md).
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    PaginationError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from archive_kms.errors import (
    ArchiveKmsError,
    KeyUnavailableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
)

__all__ = ["NETWORK_ERRORS", "error_code", "error_for", "translate_error"]

NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS = {"PreconditionFailed", "412"}
_CONFLICT = {"ConditionalRequestConflict", "409", "OperationAborted"}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "503",
    "InternalError",
    "500",
    "502",
    "504",
    "RequestTimeout",
    # The body was damaged on the way (we send Content-MD5): sending it again can help.
    "BadDigest",
    "IncompleteBody",
    "XAmzContentSHA256Mismatch",
}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidObjectState",
}
NETWORK_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
    IncompleteReadError,
    ResponseStreamingError,
    # Bases of the above: botocore raises a bare HTTPClientError for any other
    # failure while sending (e.g. a reset that urllib3 reports unusually).
    HTTPClientError,
    BotoConnectionError,
)


def error_code(err: ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a ``ClientError``."""
    return (
        str(err.response.get("Error", {}).get("Code", "")),
        int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0),
    )


def error_for(code: str, status: int, *, bucket: str, key: str | None, op: str) -> ArchiveKmsError:
    """The one table of S3 error responses: the error code and HTTP status S3 answered
    (``code`` may be empty, ``status`` 0 when unknown) mapped to our hierarchy, naming
    bucket, key and operation. Both clients use it: boto3's ``ClientError`` through
    ``translate_error``, obstore's errors through ``storage.s3_obstore`` (which parses the
    code and status out of them), so a failure reads the same whichever client met it."""
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    msg = f"S3 {op} on {where} failed: {code or status}"
    if code in NOT_FOUND_CODES:
        return ObjectNotFoundError(f"{where}: no such object ({op})", resource=where)
    if code in _EXISTS or status == 412:
        return ObjectExistsError(f"{where}: object already exists (conditional {op} refused)", resource=where)
    if code == "NoSuchUpload":
        return TransientError(
            f"{msg}: the multipart upload is gone (aborted by a cleanup?); retry the write", resource=where
        )
    if code == "NoSuchBucket":
        return StorageError(f"{msg}: bucket {bucket!r} does not exist", resource=bucket)
    if code.startswith("KMS.") or code in {"KMSDisabledException", "KMSInvalidStateException"}:
        return KeyUnavailableError(f"{msg}: the bucket's SSE-KMS key refused ({code})", resource=where, state=code)
    if code in _CONFLICT or status == 409:
        return TransientError(f"{msg}: concurrent conflicting write; retry the whole write", resource=where)
    if code in _TRANSIENT or status in (429, 500, 502, 503, 504):
        return ServiceUnavailableError(f"{msg} (retryable)", resource=where)
    if code in _DENIED or status == 403:
        return StorageError(f"{msg}: access denied to bucket {bucket!r}", resource=bucket)
    return StorageError(f"{msg} (HTTP {status})", resource=where)


def translate_error(exc: BaseException, *, bucket: str, key: str | None, op: str) -> ArchiveKmsError:
    """Map a botocore exception to our hierarchy, naming bucket, key and operation (an S3
    error response through ``error_for``)."""
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, ArchiveKmsError):
        return exc
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return error_for(code, status, bucket=bucket, key=key, op=op)
    if isinstance(exc, NETWORK_ERRORS):
        return ServiceUnavailableError(f"S3 {op} on {where}: {type(exc).__name__} (retryable)", resource=where)
    if isinstance(exc, PaginationError):  # e.g. the same continuation token twice: list again
        return ServiceUnavailableError(
            f"S3 {op} on {where}: inconsistent pagination ({exc}); retry the listing", resource=where
        )
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 {op} on {where}: {type(exc).__name__}: {exc}", resource=where)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return ServiceUnavailableError(f"S3 {op} on {where}: {type(exc).__name__} (retryable)", resource=where)
    raise exc
