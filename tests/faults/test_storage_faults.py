"""Storage faults against the real LocalStack and Azurite (faults.md section A).

Every store under test talks to the service through ``fault_proxy.Proxy`` on loopback,
with the production client configuration (``clients.aws_client`` / ``blob_service_client``):
only the wire is faulty. Fault schedules are seeded (``SEED``) and counted by the proxy,
which is the retry counter the tests assert on. Each scenario ends with the storage
invariants checked through the raw clients, not the adapter under test:

* I1/I2/I4: the raw listing holds every acknowledged name exactly once, and nothing
  else; the adapter's listing agrees;
* I3: each object's SHA-256 equals the one recorded when it was acknowledged;
* I5: no multipart upload / uncommitted block list is left (after ``abort_stale_uploads``
  where the scenario leaves one on purpose);
* I7: no error message or ``archive_kms`` log record carries object bytes or a credential.

Retry sleeps are recorded (``Env.sleeps``); tests that exhaust a retry budget skip the
waiting (``env.open(fast=True)``), the others really wait.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from botocore.config import Config
from fault_proxy import (
    Always,
    Burst,
    CorruptBody,
    CutResponse,
    DropResponse,
    From,
    Nth,
    Proxy,
    RandomRate,
    Reply,
    Request,
    ResetMidRequest,
    Response,
    Rewrite,
    Times,
    azure_error,
    azure_op,
    ops,
    s3_op,
    server_busy,
    slow_down,
)
from flows_support import report_held
from pydantic import SecretStr

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.envelope import ObjectBinding, decrypt_iter, encrypt_iter
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import ObjectExistsError, ServiceUnavailableError, TransientError
from archive_kms.storage import locations as L
from archive_kms.storage.azure_blob import AzureRetry
from archive_kms.storage.naming import decode_key, object_key
from archive_kms.storage.port import MIN_PART_SIZE, ObjectStore

SEED = 0x5EED_A1
MiB = 1024 * 1024
PART = MIN_PART_SIZE  # the smallest part S3 allows: multipart paths with little data
PAGE = 5
#: clients.aws_client sets retries={"max_attempts": 8}: botocore reads the legacy key as
#: *retries*, so 9 attempts in all (its requests say "amz-sdk-request: attempt=N; max=9").
S3_ATTEMPTS = 9
#: Written into every object: it must never show up in an error or a log line (I7).
MARK = b"<object-bytes-must-not-leak>"

# Generic operation names -> each backend's (as the proxy classifies requests).
OPS = {
    "s3": {
        "put": "PutObject",
        "part": "UploadPart",
        "create": "CreateMultipartUpload",
        "commit": "CompleteMultipartUpload",
        "abort": "AbortMultipartUpload",
        "get": "GetObject",
        "head": "HeadObject",
        "list": "ListObjectsV2",
        "pending": "ListMultipartUploads",
    },
    "azure": {
        "put": "PutBlob",
        "part": "PutBlock",
        "commit": "PutBlockList",
        "get": "GetBlob",
        "head": "GetBlobProperties",
        "list": "ListBlobs",
        "pending": "ListBlobs",
    },
}


# --- data ---------------------------------------------------------------------------------------


def body(name: bytes, size: int) -> bytes:
    """Deterministic object bytes for ``name``, starting with ``MARK``."""
    data = MARK + hashlib.shake_256(SEED.to_bytes(8, "big") + name).digest(max(0, size - len(MARK)))
    return data[:size]


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def sha(data: bytes | Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in [data] if isinstance(data, bytes) else data:
        h.update(c)
    return h.hexdigest()


def read_sha(store: ObjectStore, name: bytes) -> str:
    with store.open_read(name) as r:
        return sha(iter(r))


def put(store: ObjectStore, ledger: dict[bytes, str], name: bytes, data: bytes, **kw) -> None:
    """Write, and record the object as acknowledged (the ledger the invariants check)."""
    info = store.put_stream(name, chunked(data), **kw)
    assert info.size == len(data)
    ledger[name] = sha(data)


@functools.cache
def _secrets() -> tuple[str, ...]:
    """Object bytes and credentials (LocalStack's 4-letter secret is too common to grep for)."""
    s = Settings()
    out = [MARK.decode()]
    if s.azure_blob_connection_string is not None:
        m = re.search(r"AccountKey=([^;]+)", s.azure_blob_connection_string.get_secret_value())
        if m:
            out.append(m.group(1))
    if s.aws_secret_access_key is not None and len(s.aws_secret_access_key.get_secret_value()) >= 8:
        out.append(s.aws_secret_access_key.get_secret_value())
    return tuple(out)


def assert_secret_free(*texts: str) -> None:
    for text in texts:
        for secret in _secrets():
            assert secret not in text, "an error or log line carries object bytes or a credential (I7)"


@pytest.fixture(autouse=True)
def _no_secrets_in_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="archive_kms")
    yield
    assert_secret_free(*(r.getMessage() for r in caplog.records if r.name.startswith("archive_kms")))


# --- environments -------------------------------------------------------------------------------


@dataclass
class Env:
    kind: str
    proxy: Proxy
    open: Callable[..., ObjectStore]  # a store on the location, through the proxy
    direct: ObjectStore  # the same location without the proxy: the oracle's reader
    prefix: str
    label: str
    raw_keys: Callable[[], list[str]]
    raw_pending: Callable[[], list[str]]
    key_of: Callable[[bytes], str]  # how messages name an object
    busy: Reply  # the service's "slow down"
    budget: int  # attempts per request before the error reaches the caller
    sleeps: list[float] = field(default_factory=list)
    fast: list[bool] = field(default_factory=lambda: [False])
    extra: dict = field(default_factory=dict)

    def op(self, generic: str) -> str:
        return OPS[self.kind][generic]


def _record_sleeps(env: Env, monkeypatch) -> None:
    """Route ``time.sleep`` (botocore's backoff, azure-storage-blob's download retry, and
    the Azure adapter's, which is given ``lambda s: time.sleep(s)``) through a recorder
    that skips the wait in fast mode."""
    real = time.sleep

    def sleep(seconds: float) -> None:
        env.sleeps.append(seconds)
        if not env.fast[0]:
            real(seconds)

    monkeypatch.setattr(time, "sleep", sleep)


def _upstream(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _s3_env(settings, monkeypatch, read_client: str = "boto3") -> Iterator[Env]:
    settings = settings.model_copy(update={"s3_read_client": read_client})
    raw = clients.aws_client("s3", settings)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    raw.create_bucket(Bucket=bucket)
    loc = L.shared_s3_location(TenantId("acme"), bucket)
    proxy = Proxy(_upstream(settings.aws_endpoint_url), classify=s3_op)
    proxied = settings.model_copy(update={"aws_endpoint_url": proxy.url})
    env: Env

    def open_(fast: bool = False, **kw) -> ObjectStore:
        env.fast[0] = fast
        kw.setdefault("part_size", PART)
        kw.setdefault("list_page_size", PAGE)
        # A new client per store: botocore's retry quota and adaptive rate limiter are per client.
        client = clients.aws_client("s3", proxied)
        if fast:
            # Same attempts and backoff, without adaptive mode's client-side rate limiter:
            # it waits on a condition variable (real time, ~1-2 s a request once throttled),
            # which the sleep recorder cannot skip.
            cfg = client.meta.config.merge(Config(retries={"max_attempts": S3_ATTEMPTS - 1, "mode": "standard"}))
            client = clients.boto3_session(proxied).client("s3", endpoint_url=proxy.url, config=cfg)
        return L.open_store(loc, proxied, s3_client=client, **kw)

    def raw_keys() -> list[str]:
        return [
            o["Key"]
            for p in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=loc.prefix)
            for o in p.get("Contents", ())
        ]

    def raw_pending() -> list[str]:
        return [u["Key"] for u in raw.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]

    env = Env(
        "s3",
        proxy,
        open_,
        L.open_store(loc, settings, s3_client=raw, part_size=PART),
        loc.prefix,
        f"s3://{bucket}/{loc.prefix}",
        raw_keys,
        raw_pending,
        lambda name: f"s3://{bucket}/{object_key(loc.prefix, name)}",
        slow_down(),
        S3_ATTEMPTS,
        extra={"s3": raw, "bucket": bucket, "read_client": read_client},
    )
    _record_sleeps(env, monkeypatch)
    try:
        yield env
    finally:
        proxy.close()
        for u in raw.list_multipart_uploads(Bucket=bucket).get("Uploads", ()):
            raw.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        for k in [
            o["Key"]
            for p in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in p.get("Contents", ())
        ]:
            raw.delete_object(Bucket=bucket, Key=k)
        raw.delete_bucket(Bucket=bucket)


def _azure_env(settings, monkeypatch) -> Iterator[Env]:
    svc = clients.blob_service_client(settings)
    loc = L.shared_azure_location(TenantId(f"acme-{uuid.uuid4().hex[:8]}"), svc.account_name)
    L.create_azure_container(svc, loc)
    container = svc.get_container_client(loc.container)
    conn = settings.azure_blob_connection_string.get_secret_value()
    endpoint = re.search(r"BlobEndpoint=(http://[^/;]+)", conn).group(1)
    proxy = Proxy(_upstream(endpoint), classify=azure_op)
    proxied = settings.model_copy(update={"azure_blob_connection_string": SecretStr(conn.replace(endpoint, proxy.url))})
    env: Env

    def open_(fast: bool = False, **kw) -> ObjectStore:
        env.fast[0] = fast
        kw.setdefault("part_size", PART)
        kw.setdefault("list_page_size", PAGE)
        kw.setdefault("sleep", lambda s: time.sleep(s))  # late-bound: the recorder below
        return L.open_store(loc, proxied, blob_service=clients.blob_service_client(proxied), **kw)

    def raw_keys() -> list[str]:
        return [b.name for b in container.list_blobs()]

    def raw_pending() -> list[str]:
        committed = set(raw_keys())
        return [b.name for b in container.list_blobs(include=["uncommittedblobs"]) if b.name not in committed]

    env = Env(
        "azure",
        proxy,
        open_,
        L.open_store(loc, settings, blob_service=svc, part_size=PART),
        loc.prefix,
        f"azure://{svc.account_name}/{loc.container}/{loc.prefix}",
        raw_keys,
        raw_pending,
        lambda name: f"azure://{svc.account_name}/{loc.container}/{object_key(loc.prefix, name)}",
        server_busy(),
        AzureRetry().max_attempts,
        extra={"container": container},
    )
    _record_sleeps(env, monkeypatch)
    try:
        yield env
    finally:
        proxy.close()
        container.delete_container()


@pytest.fixture(params=["s3", "azure"])
def env(request, monkeypatch) -> Iterator[Env]:
    if request.param == "s3":
        yield from _s3_env(request.getfixturevalue("localstack"), monkeypatch)
    else:
        yield from _azure_env(request.getfixturevalue("azurite"), monkeypatch)


@pytest.fixture()
def s3_env(localstack, monkeypatch) -> Iterator[Env]:
    yield from _s3_env(localstack, monkeypatch)


@pytest.fixture()
def azure_env(azurite, monkeypatch) -> Iterator[Env]:
    yield from _azure_env(azurite, monkeypatch)


def check_invariants(env: Env, ledger: dict[bytes, str]) -> None:
    """I1-I5 for the storage layer, through the raw client (see the module docstring)."""
    env.proxy.set_rules()
    raw_names = [decode_key(env.prefix, k) for k in env.raw_keys()]
    assert sorted(raw_names) == sorted(ledger), "raw listing != acknowledged objects (I1/I2)"
    listed = [i.name for i in env.direct.list()]
    assert sorted(listed) == sorted(ledger), "adapter listing != acknowledged objects (I4)"
    for name, digest in ledger.items():
        assert read_sha(env.direct, name) == digest, f"{name!r}: stored bytes differ (I3)"
    assert env.raw_pending() == [], "unfinished uploads left behind (I5)"
    report_held("I1", "I2", "I3", "I4", "I5")


def workload(store: ObjectStore, ledger: dict[bytes, str], small: int) -> None:
    """PUT (single and multipart), HEAD, GET and List: every operation the port uses."""
    sizes = {f"obj/{i:02d}".encode(): 1000 + 997 * i for i in range(small)} | {b"obj/big": PART + 1024}
    for name, size in sizes.items():
        put(store, ledger, name, body(name, size))
    for name, size in sizes.items():
        info = store.head(name)
        assert info is not None and info.size == size
    for name, digest in ledger.items():
        assert read_sha(store, name) == digest
    assert sorted(i.name for i in store.list()) == sorted(ledger)


def write_ops(env: Env) -> list[str]:
    return [env.op(o) for o in (("put", "create", "part", "commit") if env.kind == "s3" else ("put", "part", "commit"))]


# --- A1 / A2: throttling and 5xx ------------------------------------------------------------------


def test_a1_every_operation_survives_throttling_at_random(env):
    """Each operation's first request is throttled, then 5% of all requests at random
    (seeded): every read and write succeeds within the SDK / adapter retry budget."""
    kinds = write_ops(env) + [env.op(o) for o in ("get", "head", "list")]
    env.proxy.set_rules(*(Times(ops(k), env.busy) for k in kinds), RandomRate(ops(), env.busy, 0.05, SEED))
    ledger: dict[bytes, str] = {}
    workload(env.open(), ledger, small=5)
    for k in kinds:
        assert env.proxy.faults(k), f"no {k} was throttled: the scenario did not test it"
        assert len(env.proxy.requests(k)) > len(env.proxy.faults(k))  # each fault was followed by a retry
    assert len(env.proxy.faults()) > len(kinds), "the seeded 5% never fired"
    assert len(env.sleeps) >= len(env.proxy.faults()), "a retry went out without backoff"
    check_invariants(env, ledger)


def test_a1_full_outage_burst_is_ridden_out(env):
    """100% throttling for 2 s: the retry schedule outlasts it; nothing fails."""
    burst = Burst(ops(), env.busy, seconds=2.0)
    env.proxy.set_rules(burst)
    ledger: dict[bytes, str] = {}
    started = time.monotonic()
    workload(env.open(), ledger, small=2)
    assert time.monotonic() - started >= 2.0
    assert len(env.proxy.faults()) >= 2 and burst.started is not None
    check_invariants(env, ledger)


@pytest.mark.parametrize("what", ["put", "part", "get", "head", "list"])
def test_a1_exhausted_budget_is_retryable_named_and_bounded(env, what):
    """Throttled for good: after exactly the retry budget the caller gets a retryable
    ServiceUnavailableError naming the object (or location), with no object bytes or
    credentials in it; no object and no upload is left behind."""
    ledger: dict[bytes, str] = {}
    name = b"obj/target"
    if what in ("get", "head", "list"):
        put(env.direct, ledger, name, body(name, 3000))
    data = body(name, PART + 10 if what == "part" else 3000)
    store = env.open(fast=True)
    op = env.op(what)
    # "part": the first part goes through, the second is throttled for good (the upload
    # has started: S3 must abort it; on Azure a staged block is left for cleanup).
    env.proxy.set_rules(From(ops(op), env.busy, n=2 if what == "part" else 1))
    calls: dict[str, Callable[[], object]] = {
        "put": lambda: store.put_stream(name, chunked(data)),
        "part": lambda: store.put_stream(name, chunked(data)),
        "get": lambda: read_sha(store, name),
        "head": lambda: store.head(name),
        "list": lambda: list(store.list()),
    }
    with pytest.raises(ServiceUnavailableError) as exc:
        calls[what]()
    err = exc.value
    assert err.retryable and isinstance(err, TransientError)
    assert (env.label if what == "list" else env.key_of(name)) in str(err)
    assert_secret_free(str(err), repr(err))
    assert len(env.proxy.faults(op)) == env.budget, "retries must stop at the budget (no tight loop, no give-up early)"
    backoffs = env.sleeps[-(env.budget - 1) :]
    assert len(env.sleeps) >= env.budget - 1 and len(set(backoffs)) == len(backoffs), "backoff without jitter"
    if what == "part":
        env.proxy.set_rules()
        if env.kind == "s3":
            assert env.raw_pending() == []  # the adapter aborted the multipart upload
        else:
            # Azure has no abort: the attempt's uncommitted blocks are cleanup's (A16).
            assert [p.name for p in store.pending_uploads()] == [name]
            assert store.abort_stale_uploads(timedelta(0)) == 1
    check_invariants(env, ledger)


def test_a2_azure_throttling_honours_retry_after(azure_env):
    """429 and 503 ServerBusy / 500 OperationTimedOut with Retry-After: retried (the SDK
    alone would not retry a 429 and would wait 15 s regardless), never sooner than asked."""
    env = azure_env
    env.proxy.set_rules(
        Times(ops("PutBlob"), azure_error(429, "TooManyRequests", retry_after=2)),
        Times(ops("GetBlobProperties"), azure_error(500, "OperationTimedOut", retry_after=1)),
        Times(ops("GetBlob"), server_busy(retry_after=1)),
    )
    ledger: dict[bytes, str] = {}
    store = env.open()
    started = time.monotonic()
    put(store, ledger, b"throttled", body(b"throttled", 4000))
    assert read_sha(store, b"throttled") == ledger[b"throttled"]
    elapsed = time.monotonic() - started
    injected = env.proxy.faults()
    assert [e.op for e in injected] == ["PutBlob", "GetBlobProperties", "GetBlob"]
    assert elapsed >= 2 + 1 + 1
    assert [s >= ra for s, ra in zip(env.sleeps, (2, 1, 1), strict=True)] == [True] * 3, env.sleeps
    check_invariants(env, ledger)


def test_a2_azure_retry_after_beyond_the_limit_fails_fast(azure_env):
    env = azure_env
    env.proxy.set_rules(Always(ops("PutBlob"), server_busy(retry_after=3600)))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="3600") as exc:
        env.open().put_stream(b"later", [b"x"])
    assert time.monotonic() - started < 2 and env.sleeps == []
    assert exc.value.retryable and env.key_of(b"later") in str(exc.value)
    check_invariants(env, {})


# --- A3: connection cut mid-body on GET --------------------------------------------------------


def _range_start_end(req: Request) -> tuple[int, int | None]:
    value = req.header("x-ms-range") or req.header("range") or ""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", value)
    if not m:
        return 0, None
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def _cut_reads_beyond(op: str, threshold: int):
    """Every GET covering byte ``threshold`` of the object breaks there (or 100 bytes in)."""

    def rule(req: Request):
        if req.op != op:
            return None
        start, end = _range_start_end(req)
        if end is not None and end < threshold:
            return None
        return CutResponse(max(threshold - start, 100))

    return rule


def test_a3_get_cut_mid_body_never_yields_a_short_object(env):
    """An envelope is read through a connection that breaks mid-body and decrypted into
    another object. Transient cuts: the read resumes and the copy is byte-identical (I3).
    Persistent cuts: the read raises a retryable error, decryption never completes and
    nothing is committed downstream; a rerun converges."""
    rng = random.Random(SEED)
    dek = SecretBytes.random(32)
    binding = ObjectBinding("acme", "ws1", b"src/doc")
    # Two parts downstream: the first is uploaded before the persistent cuts below start.
    plaintext = body(b"src/doc", 2 * PART + 100_000)
    envelope = b"".join(encrypt_iter(chunked(plaintext), dek=dek, dek_id="dek-1", binding=binding))
    ledger: dict[bytes, str] = {}
    put(env.direct, ledger, b"src/doc", envelope)
    store = env.open(fast=True)

    def copy(dst: bytes) -> None:
        with store.open_read(b"src/doc") as reader:
            store.put_stream(dst, decrypt_iter(reader, binding=binding, dek_for=lambda h: dek), if_absent=True)
        ledger[dst] = sha(plaintext)

    get = env.op("get")
    # The first GET ends (FIN) after ``first_cut`` bytes: on S3 past the first 1 MiB read
    # chunk, on Azure inside the first 1 MiB range. The next GET is reset (RST) early.
    # The third completes.
    first_cut = rng.randrange(MiB + 1, 2 * MiB) if env.kind == "s3" else rng.randrange(1000, MiB)
    env.proxy.set_rules(
        Nth(ops(get), CutResponse(first_cut), n=1), Nth(ops(get), CutResponse(rng.randrange(1000, MiB), rst=True), n=2)
    )
    copy(b"dst/doc")
    assert len(env.proxy.faults(get)) == 2 and len(env.proxy.requests(get)) >= 3
    if env.kind == "s3":  # resumed where it broke, with a ranged GET on the same version (If-Match)
        second, third = ({k.lower(): v for k, v in e.request_headers} for e in env.proxy.requests(get)[1:3])
        # (boto3 asks for "bytes=N-"; obstore names the end too, "bytes=N-<size - 1>")
        assert second.get("range", "").startswith(f"bytes={first_cut}-")
        # Our resume sends If-Match; obstore's own retry of a broken body checks the ETag of
        # what it gets instead (test_obstore_reads.py: a replaced object is never spliced in).
        assert "if-match" in second or env.extra.get("read_client") == "obstore"
        assert int(third["range"][6:].split("-")[0]) >= first_cut
        assert "if-match" in third or env.extra.get("read_client") == "obstore"

    env.proxy.set_rules(_cut_reads_beyond(get, 7 * MiB))
    with pytest.raises(TransientError) as exc:
        copy(b"dst/partial")
    assert exc.value.retryable and env.key_of(b"src/doc") in str(exc.value)
    assert_secret_free(str(exc.value))
    env.proxy.set_rules()
    assert store.head(b"dst/partial") is None
    assert b"dst/partial" not in [i.name for i in store.list()]
    if env.kind == "s3":
        assert env.raw_pending() == []  # the downstream multipart upload was aborted
    else:
        assert [p.name for p in store.pending_uploads()] == [b"dst/partial"]
        assert store.abort_stale_uploads(timedelta(0)) == 1

    copy(b"dst/partial")  # the rerun converges
    check_invariants(env, ledger)


# --- A4: connection reset while uploading --------------------------------------------------------


def test_a4_reset_mid_put_mid_part_and_mid_commit_is_retried_byte_identical(env):
    rng = random.Random(SEED)
    small, big = body(b"a4/small", 300_000), body(b"a4/big", 2 * PART + 7)
    env.proxy.set_rules(
        Times(ops(env.op("put")), ResetMidRequest(rng.randrange(1, len(small)))),
        Nth(ops(env.op("part")), ResetMidRequest(rng.randrange(1, PART)), n=2),
        Times(ops(env.op("commit")), ResetMidRequest(10)),
    )
    ledger: dict[bytes, str] = {}
    store = env.open()
    # if_absent: a truncated body the service kept would now be "already there" (and wrong).
    put(store, ledger, b"a4/small", small, if_absent=True)
    put(store, ledger, b"a4/big", big, if_absent=True)
    for generic in ("put", "part", "commit"):
        assert len(env.proxy.faults(env.op(generic))) == 1
    if env.kind == "azure":  # only this attempt's blocks, one per part
        committed, _ = env.extra["container"].get_blob_client(object_key(env.prefix, b"a4/big")).get_block_list()
        assert len(committed) == 3 and len({b.id.split("-")[0] for b in committed}) == 1
    check_invariants(env, ledger)


# --- A5 / A16: abandoned uploads -------------------------------------------------------------------


def test_a5_a16_abandoned_upload_is_listed_aborted_and_never_mixed_in(env):
    """The commit fails for good (and on S3 the abort too): the upload is left behind,
    invisible to readers. ``pending_uploads`` finds it (through a listing fault),
    ``abort_stale_uploads`` removes it (I5), and a new write of the name holds only its own
    data."""
    store = env.open(fast=True)
    rules = [Always(ops(env.op("commit")), env.busy)]
    if env.kind == "s3":
        rules.append(Always(ops(env.op("abort")), env.busy))
    env.proxy.set_rules(*rules)
    with pytest.raises(ServiceUnavailableError):
        store.put_stream(b"orphan", chunked(body(b"orphan-old", 2 * PART + 1)))
    env.proxy.set_rules()
    assert store.head(b"orphan") is None and list(store.list()) == []
    assert env.raw_pending() != []
    env.proxy.set_rules(Times(ops(env.op("pending")), env.busy))
    assert [p.name for p in store.pending_uploads()] == [b"orphan"]
    assert len(env.proxy.faults(env.op("pending"))) == 1
    assert store.abort_stale_uploads(timedelta(hours=1)) == 0  # may still be in progress
    assert store.abort_stale_uploads(timedelta(0)) == 1
    assert env.raw_pending() == [] and list(store.pending_uploads()) == []

    ledger: dict[bytes, str] = {}
    put(store, ledger, b"orphan", body(b"orphan-new", 2 * PART + 1), if_absent=True)
    check_invariants(env, ledger)


# --- A6: 200 OK with an <Error> body ---------------------------------------------------------------


def _error_200() -> Reply:
    # S3 streams whitespace while a long Complete runs, then the outcome: here an error.
    return Reply(
        200,
        b'\n\n  <?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
        b"<Message>We encountered an internal error. Please try again.</Message></Error>",
        (("Content-Type", "application/xml"),),
        reason="OK",
    )


def test_a6_complete_answered_200_with_error_body_is_a_failure(s3_env):
    env = s3_env
    ledger: dict[bytes, str] = {}
    env.proxy.set_rules(Times(ops("CompleteMultipartUpload"), _error_200(), n=2))
    put(env.open(), ledger, b"a6/ok", body(b"a6/ok", PART + 1))
    assert len(env.proxy.requests("CompleteMultipartUpload")) == 3  # two "200 <Error>" retried

    env.proxy.set_rules(Always(ops("CompleteMultipartUpload"), _error_200()))
    with pytest.raises(ServiceUnavailableError) as exc:
        env.open(fast=True).put_stream(b"a6/never", chunked(body(b"a6/never", PART + 1)))
    assert exc.value.retryable and env.key_of(b"a6/never") in str(exc.value)
    assert "CompleteMultipartUpload" in str(exc.value)
    assert len(env.proxy.faults("CompleteMultipartUpload")) == S3_ATTEMPTS
    check_invariants(env, ledger)  # no a6/never, and its upload aborted


# --- A7: committed, response lost ------------------------------------------------------------------


@pytest.mark.parametrize("if_absent", [True, False], ids=["conditional", "unconditional"])
@pytest.mark.parametrize("size", [4000, PART + 1], ids=["single", "multipart"])
def test_a7_commit_whose_response_was_lost(env, size, if_absent):
    """The service commits, the client sees a reset and retries. Conditional writes
    report ObjectExistsError (the port's "already there": the caller verifies the content,
    as here); unconditional ones succeed. Never a duplicate, never a leftover upload."""
    commit = env.op("put" if size < PART else "commit")
    env.proxy.set_rules(Times(ops(commit), DropResponse()))
    data = body(b"a7/obj", size)
    store = env.open()
    if if_absent:
        with pytest.raises(ObjectExistsError) as exc:
            store.put_stream(b"a7/obj", chunked(data), if_absent=True)
        assert env.key_of(b"a7/obj") in str(exc.value)
        # The caller's verification after "already there":
        info = store.head(b"a7/obj")
        assert info is not None and info.size == size and read_sha(store, b"a7/obj") == sha(data)
    else:
        info = store.put_stream(b"a7/obj", chunked(data))
        assert info.size == size and info.etag == store.head(b"a7/obj").etag
    assert env.proxy.faults(commit) and len(env.proxy.requests(commit)) == 2
    check_invariants(env, {b"a7/obj": sha(data)})


# --- A10: listing pagination faults ----------------------------------------------------------------

_ENTRY = {"s3": re.compile(rb"<Contents>.*?</Contents>", re.S), "azure": re.compile(rb"<Blob>.*?</Blob>", re.S)}
_FIRST = {"s3": b"<Contents>", "azure": b"<Blobs>"}
_TOKEN = {
    "s3": re.compile(rb"<NextContinuationToken>(.*?)</NextContinuationToken>"),
    "azure": re.compile(rb"<NextMarker>(.*?)</NextMarker>"),
}


def _prepend_entries(kind: str, page: bytes, extra: list[bytes]) -> bytes:
    at = page.index(_FIRST[kind]) + (len(_FIRST[kind]) if kind == "azure" else 0)
    return page[:at] + b"".join(extra) + page[at:]


def _is_later_page(req: Request) -> bool:
    return "continuation-token" in req.query or "marker" in req.query


class PageEditor:
    """Rewrites listing pages: ``edit(index, page, seen_pages) -> page``."""

    def __init__(self, kind: str, edit: Callable[[int, bytes, list[bytes]], bytes]) -> None:
        self.kind, self.edit, self.pages = kind, edit, []

    def __call__(self, req: Request, resp: Response) -> Response:
        original = resp.body
        resp.body = self.edit(len(self.pages), original, self.pages)
        self.pages.append(original)
        return resp


def _seed_listing(env: Env, n: int = 23) -> dict[bytes, str]:
    ledger: dict[bytes, str] = {}
    for i in range(n):
        name = f"ws/{i:03d}".encode()
        put(env.direct, ledger, name, body(name, 100 + i))
    return ledger


def test_a10_page_failing_once_and_duplicates_across_pages_list_each_object_once(env):
    ledger = _seed_listing(env)
    lst = env.op("list")
    env.proxy.set_rules(Nth(ops(lst), env.busy, n=2))
    assert sorted(i.name for i in env.open().list()) == sorted(ledger)
    assert len(env.proxy.faults(lst)) == 1 and len(env.proxy.requests(lst)) == 23 // PAGE + 1 + 1

    # Each page repeats the previous page's last entry (a retried page, an overlapping token).
    kind = env.kind
    editor = PageEditor(
        kind,
        lambda i, page, seen: page if i == 0 else _prepend_entries(kind, page, _ENTRY[kind].findall(seen[-1])[-1:]),
    )
    env.proxy.set_rules(Always(ops(lst), Rewrite(editor)))
    listed = [i.name for i in env.open().list()]
    assert len(editor.pages) == 5 and len(listed) == len(set(listed)) == len(ledger)
    assert sorted(listed) == sorted(ledger)
    check_invariants(env, ledger)


def test_a10_inconsistent_pages_fail_loudly_never_short(env):
    ledger = _seed_listing(env)
    lst, kind = env.op("list"), env.kind

    def drain(store: ObjectStore) -> list[bytes]:
        got: list[bytes] = []
        with pytest.raises(ServiceUnavailableError) as exc:
            for info in store.list():
                got.append(info.name)
        assert exc.value.retryable and env.label in str(exc.value)
        assert len(got) < len(ledger)
        return got

    # Page 3 repeats an entry from page 1 (not adjacent): the order went backwards.
    editor = PageEditor(
        kind, lambda i, page, seen: page if i != 2 else _prepend_entries(kind, page, _ENTRY[kind].findall(seen[0])[:1])
    )
    env.proxy.set_rules(Always(ops(lst), Rewrite(editor)))
    drain(env.open())

    # Page 2 hands out page 1's continuation token again (token reuse).
    def reuse_token(i: int, page: bytes, seen: list[bytes]) -> bytes:
        if i != 1:
            return page
        first = _TOKEN[kind].search(seen[0]).group(1)
        return _TOKEN[kind].sub(lambda m: m.group(0).replace(m.group(1), first), page, count=1)

    env.proxy.set_rules(Always(ops(lst), Rewrite(PageEditor(kind, reuse_token))))
    drain(env.open())

    # Every page after the first fails for good.
    env.proxy.set_rules(Always(lambda r: r.op == lst and _is_later_page(r), env.busy))
    drain(env.open(fast=True))
    assert len(env.proxy.faults(lst)) == env.budget
    check_invariants(env, ledger)


# --- A13: checksums -------------------------------------------------------------------------------


def test_a13_body_corrupted_on_the_wire_is_never_stored(env):
    """One bit flipped in a PUT body and in a part/block body. Every write carries a
    checksum the service checks (S3: x-amz-checksum-sha256, ADR 0018; Azure: Content-MD5):
    S3 refuses with BadDigest (botocore does not retry a 400; the adapter raises a
    retryable error and aborts), Azure refuses with Md5Mismatch (the adapter retries the
    request). Either way the stored bytes are the sent bytes (I3)."""
    rng = random.Random(SEED)
    small, big = body(b"a13/small", 70_000), body(b"a13/big", PART + 99)
    env.proxy.set_rules(
        Times(ops(env.op("put")), CorruptBody(rng.randrange(len(small)))),
        Times(ops(env.op("part")), CorruptBody(rng.randrange(PART))),
    )
    ledger: dict[bytes, str] = {}
    store = env.open()
    for name, data in ((b"a13/small", small), (b"a13/big", big)):
        if env.kind == "s3":
            with pytest.raises(ServiceUnavailableError, match="BadDigest") as exc:
                store.put_stream(name, chunked(data))
            assert env.key_of(name) in str(exc.value) and store.head(name) is None
            assert env.raw_pending() == []
        put(store, ledger, name, data)
    assert len(env.proxy.faults()) == 2
    for e in env.proxy.requests():
        if e.op in (env.op("put"), env.op("part")):
            headers = {k.lower() for k, _ in e.request_headers}
            checksum = "x-amz-checksum-sha256" if env.kind == "s3" else "content-md5"
            assert checksum in headers, f"{e.op} sent without its {checksum}"
            # boto3 >= 1.36 would add CRC trailers by default; configured "when_required" (A13).
            assert not {
                h
                for h in headers
                if (h.startswith("x-amz-checksum") and h not in ("x-amz-checksum-sha256", "x-amz-checksum-algorithm"))
                or h == "x-amz-trailer"
            }
    check_invariants(env, ledger)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "Wed, 25 Nov 2026 06:00:05 GMT"}, 5.0),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_a2_retry_after_forms(headers, seconds):
    """Seconds, an HTTP date (relative to now), or milliseconds; garbage is ignored."""
    from datetime import UTC, datetime

    from azure.core.exceptions import HttpResponseError
    from requests.structures import CaseInsensitiveDict

    from archive_kms.retry import retry_after_of as retry_after_seconds

    class _Resp:  # what azure-core's RequestsTransport response exposes
        def __init__(self) -> None:
            self.headers = CaseInsensitiveDict(headers)
            self.status_code, self.reason = 503, "Server Busy"

    exc = HttpResponseError(response=_Resp())
    now = datetime(2026, 11, 25, 6, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(exc, now=lambda: now) == seconds
