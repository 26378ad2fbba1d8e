"""Object-name encoding, the port's helpers, locations and error translation (no services)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive_kms.errors import (
    KeyUnavailableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.storage import locations as L
from archive_kms.storage.naming import MAX_KEY_LEN, decode_key, encode_name, object_key
from archive_kms.storage.port import (
    MIN_PART_SIZE,
    ObjectInfo,
    ObjectReader,
    check_part_size,
    iter_parts,
    part_size_for,
    validate_metadata,
)

# faults.md F9, plus the other bytes that trip paths and URLs.
TRAVERSAL = [
    b"../",
    b"..\\",
    b"/abs",
    b"//",
    b"%2e%2e/",
    b"%2E%2E%2F",
    b"trailing/",
    b"trailing.",
    b"..",
    b".",
    b"a/../../b",
    b"\x00",
    b"nul\x00byte",
    b"\x01\x1f\x7f",
    b"line\nbreak\r",
    b"\xff\xfe",
    "ünïcode/名".encode(),
    b" space ",
    b"?query#frag",
    b"a+b&c=d",
    b"~tilde",
    b"\\\\server\\share",
]


def _safe_chars(key: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "%_-") for c in key)


@pytest.mark.parametrize("name", TRAVERSAL)
def test_traversal_names_stay_inside_the_prefix(name):
    key = object_key("tenants/acme/", name)
    assert key.startswith("tenants/acme/")
    rest = key[len("tenants/acme/") :]
    assert _safe_chars(rest)  # no '/', '.', '\\', control chars: no segment can be '..' or empty
    assert decode_key("tenants/acme/", key) == name


def test_distinct_names_never_collide():
    keys = [object_key("p/", n) for n in TRAVERSAL]
    assert len(set(keys)) == len(TRAVERSAL)
    assert object_key("p/", b"../") != object_key("p/", b"%2e%2e/")


@given(st.binary(min_size=1, max_size=300))
def test_round_trip(name):
    assert decode_key("t/", object_key("t/", name)) == name


@given(st.binary(max_size=50), st.binary(max_size=50))
def test_prefix_of_names_is_prefix_of_keys(a, b):
    assert encode_name(a + b) == encode_name(a) + encode_name(b)


@pytest.mark.parametrize(
    "key",
    [
        "t/a.b",
        "t/a/b",
        "t/%2e",
        "t/%41",
        "t/%4",
        "t/%zz",
        "t/\u00e9",
        "other/x",
        "t/",
        "t/a%",
    ],
)
def test_decode_refuses_keys_we_did_not_write(key):
    assert decode_key("t/", key) is None


@pytest.mark.parametrize("name", [b"", "text", bytearray(b"x"), None])
def test_bad_names(name):
    with pytest.raises(ValidationError):
        object_key("t/", name)


def test_name_length_limit_counts_the_encoding():
    prefix = "tenants/acme/"
    room = MAX_KEY_LEN - len(prefix)
    assert len(object_key(prefix, b"a" * room)) == MAX_KEY_LEN
    with pytest.raises(ValidationError, match="1024"):
        object_key(prefix, b"a" * (room + 1))
    with pytest.raises(ValidationError, match="3 chars"):
        object_key(prefix, b"/" * (room // 3 + 1))


# --- metadata, parts, reader ------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        {"Upper": "x"},
        {"1a": "x"},
        {"a-b": "x"},
        {"a": "\u00e9"},
        {"a": " padded"},
        {"a": "line\n"},
        {"a" * 65: "x"},
        {"a": "x" * 2100},
        {"a": 1},
    ],
)
def test_bad_metadata(meta):
    with pytest.raises(ValidationError):
        validate_metadata(meta)


def test_good_metadata():
    assert validate_metadata({"sha256": "ab" * 32, "tenant_id": "acme", "n": ""}) == {
        "sha256": "ab" * 32,
        "tenant_id": "acme",
        "n": "",
    }
    assert validate_metadata(None) == {}


@pytest.mark.parametrize("size", [0, 1, MIN_PART_SIZE - 1, 600 * 1024 * 1024, True, 8.0])
def test_bad_part_sizes_fail_at_construction(size):
    with pytest.raises(ValidationError, match="part_size"):
        check_part_size(size)


def test_iter_parts_recuts_and_flags_the_last_part():
    assert list(iter_parts([], lambda i: 4)) == [(b"", True)]
    assert list(iter_parts([b"", b""], lambda i: 4)) == [(b"", True)]
    assert list(iter_parts([b"abcdef", b"gh", b"ijk"], lambda i: 4)) == [
        (b"abcd", False),
        (b"efgh", False),
        (b"ijk", True),
    ]
    assert list(iter_parts([b"abcd"], lambda i: 4)) == [(b"abcd", True)]
    assert list(iter_parts([b"abcd", b""], lambda i: 4)) == [(b"abcd", True)]
    assert list(iter_parts([b"ab", b"cd", b"e"], lambda i: 4)) == [(b"abcd", False), (b"e", True)]
    assert list(iter_parts([memoryview(b"abcdefg")], lambda i: 2 + i)) == [
        (b"ab", False),
        (b"cde", False),
        (b"fg", True),
    ]
    with pytest.raises(ValidationError, match="chunks must be bytes"):
        list(iter_parts(["text"], lambda i: 4))


def test_iter_parts_looks_ahead_one_chunk_only():
    pulled = []

    def chunks():
        for c in (b"aaaa", b"bbbb", b"cccc"):
            pulled.append(c)
            yield c

    it = iter_parts(chunks(), lambda i: 4)
    assert next(it) == (b"aaaa", False) and pulled == [b"aaaa", b"bbbb"]


def test_part_size_doubles_per_tier_and_caps():
    base = 8 * 1024 * 1024
    assert part_size_for(0, base, tier=1000) == base
    assert part_size_for(999, base, tier=1000) == base
    assert part_size_for(1000, base, tier=1000) == 2 * base
    assert part_size_for(9999, base, tier=1000) == 512 * 1024 * 1024
    total = sum(part_size_for(i, base, tier=1000) for i in range(10_000))
    assert total > 2 * 1024**4  # > 2 TiB fits in S3's 10,000 parts


def _reader(chunks, size):
    return ObjectReader(ObjectInfo(b"n", size, "e"), iter(chunks), label="mem://n")


def test_reader_read_n_is_exact_and_iterates_chunks():
    r = _reader([b"abc", b"defg", b"h"], 8)
    assert r.read(2) == b"ab" and r.read(4) == b"cdef" and r.read(10) == b"gh" and r.read(1) == b""
    assert list(_reader([b"abc", b"", b"de"], 5)) == [b"abc", b"de"]
    buf = bytearray(5)
    assert _reader([b"abc", b"de"], 5).readinto(buf) == 5 and bytes(buf) == b"abcde"
    assert io.BufferedReader(_reader([b"xy"], 2)).read() == b"xy"  # type: ignore[arg-type]


def test_reader_refuses_short_and_long_streams():
    with pytest.raises(TransientError, match="truncated"):
        _reader([b"abc"], 5).read()
    with pytest.raises(TransientError, match="more bytes"):
        _reader([b"abcdef"], 5).read()
    r = _reader([b"abc"], 3)
    r.close()
    with pytest.raises(ValueError):
        r.read()


# --- locations ---------------------------------------------------------------------------------

ARN = "arn:aws:kms:us-east-1:000000000000:key/7e506c14-46b7-4e69-9571-01c430f339fb"


def test_location_constructors_and_round_trip():
    for loc in (
        L.shared_s3_location("acme", "archive-kms-shared"),
        L.dedicated_s3_location("acme", sse_kms_key_arn=ARN),
        L.shared_azure_location("acme", "devstoreaccount1"),
        L.dedicated_azure_location("acme", "devstoreaccount1"),
        L.dedicated_azure_location("acme", account_prefix="akms"),
    ):
        assert L.Location.from_dict(loc.to_dict()) == loc
    assert L.shared_s3_location("acme", "archive-kms-shared").uri == "s3://archive-kms-shared/tenants/acme/"
    assert L.dedicated_s3_location("acme", sse_kms_key_arn=ARN).bucket == "archive-kms-tenant-acme"
    assert L.shared_azure_location("acme", "devstoreaccount1").container == "tenant-acme"
    assert L.dedicated_azure_location("acme", "devstoreaccount1").container == "byok-acme"


@pytest.mark.parametrize(
    "data",
    [
        {"tenant": "Acme", "kind": "shared", "cloud": "s3", "bucket": "b-x", "prefix": "tenants/acme/"},
        {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "b-x", "prefix": ""},
        {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "b-x", "prefix": "../"},
        {"tenant": "acme", "kind": "dedicated", "cloud": "s3", "bucket": "B_X"},
        {"tenant": "acme", "kind": "dedicated", "cloud": "s3", "bucket": "b-x", "sse_kms_key_arn": "alias/x"},
        {"tenant": "acme", "kind": "dedicated", "cloud": "azure", "account": "acct1", "container": "a--b"},
        {"tenant": "acme", "kind": "dedicated", "cloud": "azure", "account": "Acct", "container": "byok-acme"},
        {"tenant": "acme", "kind": "weird", "cloud": "s3", "bucket": "b-x"},
    ],
)
def test_location_refuses_bad_records(data):
    with pytest.raises((ValidationError, ValueError)):
        L.Location.from_dict(data)


KV_KEY = "https://acme-kv.vault.azure.net/keys/archive"


def test_a_tenant_account_location_is_stored_byte_exact_and_old_ones_unchanged():
    own = L.dedicated_azure_location("acme-eu", account_prefix="akms", cmk_key_url=KV_KEY)
    assert own.to_dict() == {
        "tenant": "acme-eu",
        "kind": "dedicated",
        "cloud": "azure",
        "bucket": None,
        "account": "akmsacmeeudrnn5pgr",
        "container": "byok-acme-eu",
        "prefix": "",
        "sse_kms_key_arn": None,
        "own_account": True,
        "cmk_key_url": KV_KEY,
    }
    assert own.uri == "azure://akmsacmeeudrnn5pgr/byok-acme-eu/"
    assert L.Location.from_dict(own.to_dict()) == own
    kmip = L.dedicated_azure_location("acme-eu", account_prefix="akms")
    assert kmip.to_dict()["cmk_key_url"] is None and kmip.own_account
    # what earlier releases stored (no own_account key) reads back as the platform-account container
    old = {
        "tenant": "acme",
        "kind": "dedicated",
        "cloud": "azure",
        "bucket": None,
        "account": "devstoreaccount1",
        "container": "byok-acme",
        "prefix": "",
        "sse_kms_key_arn": None,
    }
    loc = L.Location.from_dict(old)
    assert not loc.own_account and loc.to_dict() == old  # round-trips to the exact same dict


@pytest.mark.parametrize(
    "change,match",
    [
        ({"account": L.dedicated_azure_location("beta", account_prefix="akms").account}, "is not tenant acme"),
        ({"account": "devstoreaccount1"}, "is not tenant acme"),
        ({"kind": "shared", "container": "tenant-acme"}, "dedicated Azure locations"),
        ({"prefix": "tenants/acme/"}, "a whole container"),
        ({"own_account": "yes"}, "true or false"),
        ({"cmk_key_url": "https://v.vault.azure.net/keys/k/" + "0" * 32}, "versionless"),
        ({"cmk_key_url": "http://v.vault.azure.net/keys/k"}, "versionless"),
        ({"cmk_key_url": "https://v.vault.azure.net/secrets/k"}, "versionless"),
        ({"own_account": False}, "own storage account only"),
    ],
)
def test_a_tenant_account_location_refuses_what_is_not_its_tenants(change, match):
    good = L.dedicated_azure_location("acme", account_prefix="akms", cmk_key_url=KV_KEY).to_dict()
    with pytest.raises(ValidationError, match=match):
        L.Location.from_dict({**good, **change})


def test_a_tenant_account_store_needs_the_provisioners_client():
    from archive_kms.errors import ConfigurationError

    loc = L.dedicated_azure_location("acme", account_prefix="akms")
    with pytest.raises(ConfigurationError, match="its provisioner gives the account's client"):
        L.open_store(loc)


def test_an_own_account_location_needs_a_configured_provisioner():
    from archive_kms.config import Settings
    from archive_kms.errors import ConfigurationError
    from archive_kms.storage.provisioning import CloudProvisioner

    p = CloudProvisioner(Settings(aws_endpoint_url=None, azure_account_pool=[]))
    loc = L.dedicated_azure_location("acme", account_prefix="akms")
    for call in (lambda: p.exists(loc), lambda: p.create(loc), lambda: p.blob_service(loc)):
        with pytest.raises(ConfigurationError, match="azure_subscription_id.*azure_account_pool"):
            call()


class _FakeS3Config:
    """Answers like S3 whose bucket configuration becomes visible only after N reads."""

    def __init__(self, stale_reads: int) -> None:
        self.stale = stale_reads
        self.enc = None
        self.pab = None

    def create_bucket(self, **kw):
        return {}

    def put_public_access_block(self, Bucket, PublicAccessBlockConfiguration):
        self.pab = PublicAccessBlockConfiguration

    def put_bucket_encryption(self, Bucket, ServerSideEncryptionConfiguration):
        self.enc = ServerSideEncryptionConfiguration

    def get_bucket_encryption(self, Bucket):
        if self.stale > 0:
            self.stale -= 1
            return {
                "ServerSideEncryptionConfiguration": {
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                }
            }
        return {"ServerSideEncryptionConfiguration": self.enc}

    def get_public_access_block(self, Bucket):
        return {"PublicAccessBlockConfiguration": self.pab}


def test_dedicated_bucket_waits_until_encryption_reads_back():
    fake = _FakeS3Config(stale_reads=3)
    clock = [0.0]
    L.create_dedicated_s3_bucket(
        fake,
        L.dedicated_s3_location("acme", sse_kms_key_arn=ARN),
        region="us-east-1",
        sleep=lambda s: clock.__setitem__(0, clock[0] + s),
        monotonic=lambda: clock[0],
    )
    assert fake.stale == 0 and clock[0] == pytest.approx(1.5)


def test_dedicated_bucket_times_out_retryably():
    fake = _FakeS3Config(stale_reads=10**6)
    clock = [0.0]
    with pytest.raises(ServiceUnavailableError, match="did not read back"):
        L.create_dedicated_s3_bucket(
            fake,
            L.dedicated_s3_location("acme", sse_kms_key_arn=ARN),
            region="us-east-1",
            timeout=5,
            sleep=lambda s: clock.__setitem__(0, clock[0] + s),
            monotonic=lambda: clock[0],
        )


# --- error translation -----------------------------------------------------------------------------


def _client_error(code, status):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("NoSuchKey", 404, ObjectNotFoundError),
        ("404", 404, ObjectNotFoundError),
        ("PreconditionFailed", 412, ObjectExistsError),
        ("ConditionalRequestConflict", 409, TransientError),
        ("SlowDown", 503, ServiceUnavailableError),
        ("InternalError", 500, ServiceUnavailableError),
        ("ServiceUnavailable", 503, ServiceUnavailableError),
        ("RequestTimeout", 400, ServiceUnavailableError),
        ("BadDigest", 400, ServiceUnavailableError),
        ("AccessDenied", 403, StorageError),
        ("NoSuchBucket", 404, StorageError),
        ("KMS.DisabledException", 400, KeyUnavailableError),
        ("RequestTimeTooSkewed", 403, StorageError),
        ("Weird", 400, StorageError),
        ("NoSuchUpload", 404, TransientError),
    ],
)
def test_s3_error_translation(code, status, expected):
    from archive_kms.storage.s3 import translate_error

    err = translate_error(_client_error(code, status), bucket="bkt", key="tenants/acme/k", op="PutObject")
    assert type(err) is expected
    assert "bkt" in str(err)
    assert err.retryable == issubclass(expected, TransientError)


def test_s3_network_errors_are_retryable():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from archive_kms.storage.s3 import translate_error

    for exc in (EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x")):
        assert isinstance(translate_error(exc, bucket="b", key="k", op="GetObject"), ServiceUnavailableError)


@pytest.mark.parametrize(
    "cls, code, status, expected",
    [
        ("ResourceNotFoundError", "BlobNotFound", 404, ObjectNotFoundError),
        ("ResourceNotFoundError", "ContainerNotFound", 404, StorageError),
        ("ResourceExistsError", "BlobAlreadyExists", 409, ObjectExistsError),
        ("ResourceModifiedError", "ConditionNotMet", 412, ObjectExistsError),
        ("HttpResponseError", "ServerBusy", 503, ServiceUnavailableError),
        ("HttpResponseError", "OperationTimedOut", 500, ServiceUnavailableError),
        ("HttpResponseError", None, 429, ServiceUnavailableError),
        ("ClientAuthenticationError", "AuthenticationFailed", 403, StorageError),
        ("HttpResponseError", "KeyVaultEncryptionKeyNotFound", 403, KeyUnavailableError),
    ],
)
def test_azure_error_translation(cls, code, status, expected):
    import azure.core.exceptions as ace

    from archive_kms.storage.azure_blob import translate_error

    exc = getattr(ace, cls)(message="m")
    exc.status_code = status
    exc.error_code = code
    err = translate_error(exc, where="azure://acct/tenant-acme/k", op="Put Blob")
    assert type(err) is expected and "tenant-acme" in str(err)


def test_azure_network_errors_are_retryable():
    from azure.core.exceptions import ServiceRequestError

    from archive_kms.storage.azure_blob import translate_error

    assert isinstance(translate_error(ServiceRequestError("reset"), where="w", op="o"), ServiceUnavailableError)


# --- S3 listing faults (A10) with a scripted client --------------------------------------------------


class _ScriptedPages:
    def __init__(self, pages):
        self.pages = pages

    def get_paginator(self, name):
        pages = self.pages

        class P:
            def paginate(self, **kw):
                return iter(pages)

        return P()


def _page(*keys):
    return {"Contents": [{"Key": k, "Size": 1, "ETag": '"e"'} for k in keys]}


def test_s3_list_drops_repeated_entries_across_pages():
    from archive_kms.storage.s3 import S3ObjectStore

    store = S3ObjectStore(_ScriptedPages([_page("p/a", "p/b"), _page("p/b", "p/c"), _page("p/c")]), "bkt", "p/")
    assert [i.name for i in store.list()] == [b"a", b"b", b"c"]


def test_s3_list_fails_on_out_of_order_pages_and_skips_foreign_keys(caplog):
    from archive_kms.storage.s3 import S3ObjectStore

    store = S3ObjectStore(_ScriptedPages([_page("p/b", "p/x.y"), _page("p/a")]), "bkt", "p/")
    it = store.list()
    assert next(it).name == b"b"
    with pytest.raises(ServiceUnavailableError, match="backwards"):
        next(it)
    assert "not written by this store" in caplog.text


def test_memory_abort_stale_uploads_respects_horizon():
    from datetime import UTC, datetime

    from archive_kms.storage.memory import MemoryObjectStore

    now = datetime(2030, 1, 1, tzinfo=UTC)
    store = MemoryObjectStore(clock=lambda: now)
    store.begin_upload(b"x")
    assert [u.name for u in store.pending_uploads()] == [b"x"]
    assert store.abort_stale_uploads(timedelta(hours=1)) == 0
    assert store.abort_stale_uploads(timedelta(hours=1), now=now + timedelta(hours=2)) == 1
    assert list(store.pending_uploads()) == []


# --- adapters' own logic with scripted clients ---------------------------------------------------


class _WrongKeyS3:
    """PutObject 'succeeds' but reports another KMS key (a misconfigured bucket or proxy)."""

    def __init__(self):
        self.deleted = []

    def head_object(self, **kw):
        raise _client_error("404", 404)

    def put_object(self, **kw):
        assert kw["ServerSideEncryption"] == "aws:kms" and kw["SSEKMSKeyId"] == ARN
        return {
            "ETag": '"e"',
            "ServerSideEncryption": "aws:kms",
            "SSEKMSKeyId": "arn:aws:kms:us-east-1:000000000000:key/other",
        }

    def delete_object(self, Bucket, Key):
        self.deleted.append(Key)


def test_s3_object_under_the_wrong_kms_key_is_removed_and_reported():
    from archive_kms.storage.s3 import S3ObjectStore

    fake = _WrongKeyS3()
    store = S3ObjectStore(fake, "bkt", "", sse_kms_key_arn=ARN)
    with pytest.raises(StorageError, match="not SSE-KMS under"):
        store.put_stream(b"x", [b"data"], if_absent=True)
    assert fake.deleted == ["x"]


class _UncommittedBlob:
    """Azure proper: Delete Blob answers 404 for a blob that has only uncommitted blocks."""

    def __init__(self, log):
        self.log = log

    def delete_blob(self, **kw):
        from azure.core.exceptions import ResourceNotFoundError

        self.log.append(("delete", kw.get("etag")))
        if kw.get("etag") is None:
            raise ResourceNotFoundError(message="BlobNotFound")

    def commit_block_list(self, blocks, **kw):
        self.log.append(("commit", tuple(blocks), kw["match_condition"].name))
        return {"etag": '"empty"'}


def test_azure_discard_falls_back_to_commit_empty_then_conditional_delete():
    from archive_kms.storage.azure_blob import AzureBlobObjectStore

    log: list = []

    class Container:
        account_name, container_name = "acct", "tenant-acme"

        def get_blob_client(self, key):
            return _UncommittedBlob(log)

    AzureBlobObjectStore(Container())._discard_uncommitted("k")
    assert log == [("delete", None), ("commit", (), "IfMissing"), ("delete", '"empty"')]


# --- Azure container still being deleted ----------------------------------------------------


class _BlobServiceDeleting:
    """A blob service whose container of that name is being deleted for ``busy`` calls."""

    def __init__(self, busy: int, code: str = "ContainerBeingDeleted") -> None:
        self.busy, self.code, self.calls = busy, code, 0

    def create_container(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        self.calls += 1
        if self.calls <= self.busy:
            err = ResourceExistsError(message=f"{self.code}: the specified container is being deleted")
            err.error_code = self.code
            raise err


def _azure_location():
    from archive_kms.storage.locations import dedicated_azure_location

    return dedicated_azure_location("acme", "devstoreaccount1")


def test_create_azure_container_waits_while_one_of_that_name_is_being_deleted() -> None:
    from archive_kms.storage.locations import create_azure_container

    slept: list[float] = []
    service = _BlobServiceDeleting(busy=3)
    create_azure_container(service, _azure_location(), sleep=slept.append, clock=lambda: sum(slept))
    assert service.calls == 4 and slept == [0.5, 1.0, 2.0]


def test_create_azure_container_gives_up_retryably_after_the_wait() -> None:
    from archive_kms.errors import ServiceUnavailableError
    from archive_kms.storage.locations import create_azure_container

    slept: list[float] = []
    service = _BlobServiceDeleting(busy=10**6)
    with pytest.raises(ServiceUnavailableError, match="still being deleted") as info:
        create_azure_container(service, _azure_location(), wait_s=20, sleep=slept.append, clock=lambda: sum(slept))
    assert info.value.retryable and sum(slept) <= 20 and service.calls > 3


def test_create_azure_container_reuses_an_existing_one() -> None:
    from archive_kms.storage.locations import create_azure_container

    service = _BlobServiceDeleting(busy=1, code="ContainerAlreadyExists")
    create_azure_container(service, _azure_location(), sleep=lambda _s: pytest.fail("must not wait"))
    assert service.calls == 1


# --- parallel part uploads with a scripted multipart client ----------------------------------------


class _MultipartS3:
    """A scripted S3 multipart endpoint. ``upload_part`` checks the SHA-256 checksum, records
    which thread sent which part and how many parts (and bytes) were being uploaded at
    once, and waits ``delay`` seconds (a slow network) or for ``gate`` (a Barrier the first
    parts must cross together). ``fail_part`` makes that part fail with ``fail_with``."""

    def __init__(
        self, *, delay: float = 0.0, gate=None, fail_part: int | None = None, fail_with: BaseException | None = None
    ):
        import threading

        self.delay, self.gate, self.fail_part = delay, gate, fail_part
        self.fail_with = fail_with or _client_error("AccessDenied", 403)
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.in_flight = self.max_in_flight = 0
        self.bytes_in_flight = self.max_bytes_in_flight = 0
        self.part_threads: list[tuple[int, str]] = []  # (part number, thread name)
        self.completed: list[dict] = []

    def create_multipart_upload(self, **kw):
        self.events.append(("create",))
        return {"UploadId": "u1"}

    def head_object(self, **kw):
        raise _client_error("404", 404)

    def upload_part(self, *, Body, ChecksumSHA256, PartNumber, **kw):
        import base64
        import hashlib
        import threading
        import time

        assert base64.b64encode(hashlib.sha256(Body).digest()).decode() == ChecksumSHA256
        with self.lock:
            self.in_flight += 1
            self.bytes_in_flight += len(Body)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_bytes_in_flight = max(self.max_bytes_in_flight, self.bytes_in_flight)
            self.part_threads.append((PartNumber, threading.current_thread().name))
        try:
            if self.gate is not None and PartNumber <= self.gate.parties:
                self.gate.wait(timeout=10)  # BrokenBarrierError if the parts did not overlap
            time.sleep(self.delay)
            if PartNumber == self.fail_part:
                raise self.fail_with
            return {"ETag": f'"etag-{PartNumber}"', "ChecksumSHA256": ChecksumSHA256}
        finally:
            with self.lock:
                self.in_flight -= 1
                self.bytes_in_flight -= len(Body)
                self.events.append(("part-done", PartNumber, time.monotonic()))

    def complete_multipart_upload(self, **kw):
        self.completed.append(kw)
        self.events.append(("complete",))
        return {"ETag": '"done-3"'}

    def abort_multipart_upload(self, **kw):
        import time

        self.events.append(("abort", time.monotonic()))


SMALL_PART = MIN_PART_SIZE


def _parts(n: int, tail: int = 1000, pulled: list | None = None):
    """``n`` full parts plus ``tail`` bytes, in 256 KiB chunks generated lazily."""
    total = n * SMALL_PART + tail
    chunk = b"\x5a" * (256 * 1024)
    sent = 0
    while sent < total:
        piece = chunk[: min(len(chunk), total - sent)]
        sent += len(piece)
        if pulled is not None:
            pulled.append(sent)
        yield piece


def test_multipart_uploads_up_to_n_parts_at_once_in_order():
    import threading

    from archive_kms.storage.s3 import S3ObjectStore

    fake = _MultipartS3(gate=threading.Barrier(3))  # parts 1-3 must be in flight together
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=3, upload_buffer=64 * 2**20)
    info = store.put_stream(b"obj", _parts(7), if_absent=True)
    assert info.size == 7 * SMALL_PART + 1000
    assert fake.max_in_flight == 3  # the gate proves 3 overlapped; never more than N
    (complete,) = fake.completed
    assert complete["IfNoneMatch"] == "*"
    parts = complete["MultipartUpload"]["Parts"]
    assert [{k: p[k] for k in ("PartNumber", "ETag")} for p in parts] == [
        {"PartNumber": n, "ETag": f'"etag-{n}"'} for n in range(1, 9)
    ]
    assert all(len(p["ChecksumSHA256"]) == 44 for p in parts)  # every part's SHA-256, base64
    assert info.checksum is not None and info.checksum.startswith("sha256-composite:") and info.checksum.endswith("-8")
    assert store.upload_budget.held == 0 and 0 < store.upload_budget.peak <= 3 * SMALL_PART + 1000


def test_multipart_without_budget_is_sequential_in_the_writers_thread():
    import threading

    from archive_kms.storage.s3 import S3ObjectStore

    fake = _MultipartS3()
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=4, upload_buffer=0)
    store.put_stream(b"obj", _parts(3))
    assert fake.max_in_flight == 1
    assert {t for _, t in fake.part_threads} == {threading.current_thread().name}
    assert [p["PartNumber"] for p in fake.completed[0]["MultipartUpload"]["Parts"]] == [1, 2, 3, 4]


def test_a_failed_part_stops_the_stream_and_aborts_after_the_parts_in_flight():
    from archive_kms.storage.s3 import S3ObjectStore

    pulled: list[int] = []
    fake = _MultipartS3(delay=0.05, fail_part=2)
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=2)
    with pytest.raises(StorageError, match="UploadPart 2"):
        store.put_stream(b"obj", _parts(40, pulled=pulled))
    assert fake.completed == []
    kinds = [e[0] for e in fake.events]
    assert kinds.count("abort") == 1 and kinds[-1] == "abort", kinds  # after every part that was sent
    abort_at = fake.events[-1][1]
    assert all(e[2] <= abort_at for e in fake.events if e[0] == "part-done")
    assert pulled[-1] < 10 * SMALL_PART  # the writer stopped reading soon after the failure
    assert store.upload_budget.held == 0


def test_a_failing_source_aborts_after_the_parts_in_flight():
    from archive_kms.storage.s3 import S3ObjectStore

    class SourceBroke(Exception):
        pass

    def chunks():
        yield from _parts(4, tail=1000)  # four whole parts go out; the fifth is never complete
        raise SourceBroke("source read failed")

    fake = _MultipartS3(delay=0.05)
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=4)
    with pytest.raises(SourceBroke):
        store.put_stream(b"obj", chunks())
    abort_at = fake.events[-1][1]
    assert fake.events[-1][0] == "abort" and fake.completed == []
    assert sum(e[0] == "part-done" for e in fake.events) == 4  # the four parts sent finished first
    assert all(e[2] <= abort_at for e in fake.events if e[0] == "part-done")
    assert store.upload_budget.held == 0


def test_write_memory_is_n_plus_one_parts_however_slow_the_uploads():
    """Uploads far slower than the stream: the writer must wait for a free slot instead of
    cutting parts ahead. Peak <= (N + 1) parts + slack; buffering the 12 parts would be
    60 MiB."""
    import tracemalloc

    from archive_kms.storage.s3 import S3ObjectStore

    fake = _MultipartS3(delay=0.05)
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=2)
    tracemalloc.start()
    try:
        store.put_stream(b"obj", _parts(12))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fake.max_in_flight == 2
    assert peak < 3 * SMALL_PART + 2 * 2**20, f"peaked at {peak / 2**20:.1f} MiB"


def test_concurrent_writes_never_exceed_the_stores_budget():
    """Four writers, budget for two parts: upload threads never hold more than two parts;
    the other parts are uploaded by the writers' own threads (no writer waits on another)."""
    import threading

    from archive_kms.storage.s3 import S3ObjectStore

    fake = _MultipartS3(delay=0.02)
    store = S3ObjectStore(fake, "bkt", "p/", part_size=SMALL_PART, parts_in_flight=4, upload_buffer=2 * SMALL_PART)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            store.put_stream(b"w%d" % i, _parts(5, tail=0))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,), name=f"writer-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(fake.completed) == 4
    assert store.upload_budget.peak <= 2 * SMALL_PART and store.upload_budget.held == 0
    by_writer = sum(t.startswith("writer-") for _, t in fake.part_threads)
    assert by_writer > 0  # the budget was full at times: parts went up the sequential way


@pytest.mark.parametrize("bad", [0, 65, True, 2.0])
def test_bad_parts_in_flight_fail_at_construction(bad):
    from archive_kms.storage.s3 import S3ObjectStore

    with pytest.raises(ValidationError, match="parts_in_flight"):
        S3ObjectStore(_MultipartS3(), "bkt", "p/", parts_in_flight=bad)
    with pytest.raises(ValidationError, match="upload_buffer"):
        S3ObjectStore(_MultipartS3(), "bkt", "p/", upload_buffer=-1)


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "2015-10-21T07:28:00.000Z",
        "2026-12-07T02:00:00Z",
        "2015-10-21T07:28:00.123456+00:00",
        1700000000,
        1700000000.25,
        "20151021T072800Z",  # not one the fast path knows: botocore's parser answers
    ],
)
def test_fast_response_timestamps_equal_botocores(value):
    from botocore.utils import parse_timestamp as botocore_parse

    from archive_kms.clients import parse_timestamp

    got = parse_timestamp(value)
    assert got == botocore_parse(value) and got.tzinfo is not None
