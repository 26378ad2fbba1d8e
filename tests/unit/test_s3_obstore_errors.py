"""obstore's errors in our hierarchy (storage/s3_obstore.py): the S3 code and status are
read from the error text obstore gives, and mapped by the boto3 path's table."""

from __future__ import annotations

import pytest

from archive_kms.errors import (
    KeyUnavailableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from archive_kms.storage.s3_obstore import ObstoreS3Reads, s3_error_of, translate_obstore_error


def _obstore_text(status: str, code: str) -> str:
    # The shape obstore 0.12 gives (object_store's RetryError around S3's XML body).
    return (
        "Generic S3 error: Error performing GET http://127.0.0.1:4566/b/t/k in 9ms - Server returned "
        f"non-2xx status code: {status}: <?xml version='1.0' encoding='utf-8'?>\n<Error><Code>{code}</Code>"
        "<Message>m</Message></Error>"
    )


class GenericError(Exception):
    pass


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        ("400 Bad Request", "KMS.DisabledException", KeyUnavailableError),
        ("403 Forbidden", "AccessDenied", StorageError),
        ("404 Not Found", "NoSuchKey", ObjectNotFoundError),
        ("404 Not Found", "NoSuchBucket", StorageError),
        ("412 Precondition Failed", "PreconditionFailed", ObjectExistsError),
        ("503 Service Unavailable", "SlowDown", ServiceUnavailableError),
        ("500 Internal Server Error", "InternalError", ServiceUnavailableError),
    ],
)
def test_status_and_code_map_like_boto3(status, code, error):
    exc = GenericError(_obstore_text(status, code))
    assert s3_error_of(exc) == (code, int(status[:3]))
    err = translate_obstore_error(exc, bucket="b", key="t/k", op="GetObject")
    assert type(err) is error
    assert "s3://b" in str(err) and "127.0.0.1" not in str(err)  # obstore's text is not repeated


def test_no_response_is_retryable_and_an_unknown_failure_is_not():
    sent = GenericError(
        "Generic S3 error: Error performing GET http://h/b/k after 8 retries - HTTP error: error sending request"
    )
    assert s3_error_of(sent) is None
    err = translate_obstore_error(sent, bucket="b", key="k", op="GetObject")
    assert isinstance(err, ServiceUnavailableError) and err.retryable
    other = translate_obstore_error(GenericError("Generic S3 error: bad config"), bucket="b", key="k", op="GetObject")
    assert type(other) is StorageError


def test_repr_names_the_bucket_only():
    store = type("Store", (), {"__repr__": lambda self: "S3Store(secret_access_key=s3cr3t)"})()
    reads = ObstoreS3Reads(store, "b", chunk_size=1024)
    assert repr(reads) == "ObstoreS3Reads(s3://b)" and "s3cr3t" not in str(reads)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "KMS.DisabledException"),
        (403, "AccessDenied"),
        (404, "NoSuchKey"),
        (404, "NoSuchBucket"),
        (404, "NoSuchUpload"),
        (409, "OperationAborted"),
        (412, "PreconditionFailed"),
        (503, "SlowDown"),
        (400, "InvalidRequest"),
        (418, "418"),
    ],
)
def test_both_clients_read_one_table(status, code):
    # boto3's ClientError and obstore's text give the same error: both look the code and
    # status up in s3_errors.error_for.
    from botocore.exceptions import ClientError

    from archive_kms.s3_errors import error_for, translate_error

    boto = translate_error(
        ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"),
        bucket="b",
        key="t/k",
        op="GetObject",
    )
    obstore = translate_obstore_error(
        GenericError(_obstore_text(f"{status} X", code)), bucket="b", key="t/k", op="GetObject"
    )
    table = error_for(code, status, bucket="b", key="t/k", op="GetObject")
    assert type(boto) is type(obstore) is type(table)
    assert str(boto) == str(obstore) == str(table)
    assert boto.resource == obstore.resource == table.resource
