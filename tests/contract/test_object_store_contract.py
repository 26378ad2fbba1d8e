"""ObjectStore contract: the same tests over the in-memory store, S3 on LocalStack and
Azure Blob on Azurite (style rule 9). Backend-specific checks (raw keys, leftovers,
SSE-KMS headers, block ids) use each service's raw client as the oracle.

Every test gets a fresh location (uuid-named bucket / container) and a neighbouring
tenant's object that must stay untouched; both are removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from archive_kms import clients
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import (
    ObjectChangedError,
    ObjectExistsError,
    ObjectNotFoundError,
    TransientError,
    ValidationError,
)
from archive_kms.storage import locations as L
from archive_kms.storage.memory import MemoryObjectStore
from archive_kms.storage.naming import decode_key
from archive_kms.storage.port import MIN_PART_SIZE, ObjectStore

MiB = 1024 * 1024
PART = MIN_PART_SIZE  # 5 MiB: the smallest part S3 accepts, so the tests move little data
PAGE = 7  # forces pagination with ~25 objects
#: Memory a part upload in progress holds beyond the part itself: botocore hashes the body
#: for SigV4 (plain-HTTP endpoints) in 1 MiB reads, two alive at once; the chunk being
#: re-cut into parts fits in it too. Measured on S3: +2.0-2.4 MiB per part in flight.
REQUEST_SLACK = 2 * MiB + 512 * 1024


def write_bound(parts_in_flight: int, writers: int = 1, budget_parts: int | None = None) -> int:
    """The port's write bound for ``writers`` concurrent writes on one store: each holds
    the part it is cutting (plus BytesIO's 1/8 growth margin) and at most
    ``parts_in_flight`` uploading parts, and the store's upload threads hold at most
    ``budget_parts`` parts in all; every part being uploaded adds ``REQUEST_SLACK``."""
    uploading = writers * parts_in_flight if budget_parts is None else min(writers * parts_in_flight, budget_parts)
    return writers * (PART + PART // 8) + uploading * PART + (uploading + writers) * REQUEST_SLACK


# faults.md F9 and friends.
TRAVERSAL = [
    b"../",
    b"..\\",
    b"/abs",
    b"//",
    b"%2e%2e/",
    b"trailing/",
    b"trailing.",
    b"..",
    b".",
    b"../../other/x",
    b"\x00",
    b"nul\x00byte",
    b"\x01\x1f\x7f",
    b"line\nbreak",
    b"\xff\xfe",
    "ünï/名".encode(),
    b" sp ",
    b"?q#f",
    b"a+b&c=d",
    b"\\\\srv\\share",
]


def stream(size: int, seed: bytes = b"s", chunk: int = 64 * 1024) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes, generated lazily (never the whole object)."""
    counter = 0
    produced = 0
    block = b""
    while produced < size:
        if not block:
            block = hashlib.shake_256(seed + counter.to_bytes(8, "big")).digest(chunk)
            counter += 1
        take = min(len(block), size - produced)
        yield block[:take]
        block = block[take:]
        produced += take


def digest_of(chunks: Iterator[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for c in chunks:
        h.update(c)
        n += len(c)
    return h.hexdigest(), n


@dataclass
class Harness:
    kind: str
    store: ObjectStore
    make_store: Callable[..., ObjectStore]  # same location, other tuning
    key_prefix: str  # where this tenant's keys live in the raw namespace
    raw_keys: Callable[[], list[str]]  # every key in the raw namespace of this location
    raw_pending: Callable[[], list[str]]  # oracle for leftovers (raw client)
    neighbour_keys: Callable[[], list[str]]  # another tenant's keys, which must not change
    crash_mid_upload: Callable[[bytes], None]  # start an upload, then die without cleanup
    extra: dict = field(default_factory=dict)

    def write_bound(self, object_size: int, parts_in_flight: int) -> int:
        # The memory store holds the object by design.
        return object_size + 2 * PART if self.kind == "memory" else write_bound(parts_in_flight)


# --- backends -------------------------------------------------------------------------------------


def _memory_harness() -> Iterator[Harness]:
    store = MemoryObjectStore(prefix="tenants/acme/", part_size=PART)

    def crash(name: bytes) -> None:
        _, upload = store.begin_upload(name)
        upload.parts.append(b"x" * 1024)  # a started upload that nobody finishes

    yield Harness(
        "memory",
        store,
        lambda **kw: store,
        "tenants/acme/",
        store.raw_keys,
        lambda: [u.key for u in store.pending_uploads()],
        lambda: [],
        crash,
    )


_CRASH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from archive_kms import clients
    from archive_kms.config import Settings
    from archive_kms.storage.locations import Cloud, Location, open_store
    from archive_kms.storage.naming import object_key
    loc = Location.from_dict(json.loads(sys.argv[1]))
    name, part = bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    settings = Settings()
    store = open_store(loc, settings, part_size=part)
    key = object_key(loc.prefix, name)

    def parts_stored():
        # Asked of the service itself: parts upload in the background, so having cut two
        # parts from the stream does not mean they are stored yet.
        if loc.cloud is Cloud.S3:
            s3 = clients.aws_client("s3", settings)
            ups = s3.list_multipart_uploads(Bucket=loc.bucket, Prefix=key).get("Uploads", [])
            return sum(len(s3.list_parts(Bucket=loc.bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
                       for u in ups)
        from azure.core.exceptions import ResourceNotFoundError
        blob = clients.blob_service_client(settings).get_blob_client(loc.container, key)
        try:
            return len(blob.get_block_list("uncommitted")[1])
        except ResourceNotFoundError:  # no block staged yet
            return 0

    def chunks():
        sent = 0
        while True:
            if sent >= 2 * part + 1:
                # Two parts are stored by now (a third is being cut, maybe more uploading);
                # die like kill -9 (no cleanup runs).
                deadline = time.monotonic() + 60
                while parts_stored() < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            yield b"c" * 65536
            sent += 65536
    store.put_stream(name, chunks())
""")


def _crash_in_subprocess(location: L.Location, name: bytes) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, json.dumps(location.to_dict()), name.hex(), str(PART)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]


def _s3_harness(settings, read_client: str = "boto3") -> Iterator[Harness]:
    """S3 on LocalStack; ``read_client`` picks the client of ``open_read`` (ADR 0043)."""
    settings = settings.model_copy(update={"s3_read_client": read_client})
    s3 = clients.aws_client("s3", settings)
    bucket = f"contract-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    loc = L.shared_s3_location(TenantId("acme"), bucket)
    s3.put_object(Bucket=bucket, Key="tenants/other/neighbour", Body=b"n")

    def make(**kw):
        kw.setdefault("part_size", PART)
        kw.setdefault("list_page_size", PAGE)
        return L.open_store(loc, settings, s3_client=s3, **kw)

    def raw_keys():
        return [
            o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", ())
        ]

    def raw_pending():
        return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]

    h = Harness(
        "s3" if read_client == "boto3" else f"s3-{read_client}-reads",
        make(),
        make,
        loc.prefix,
        raw_keys,
        raw_pending,
        lambda: [k for k in raw_keys() if k.startswith("tenants/other/")],
        lambda name: _crash_in_subprocess(loc, name),
        {"s3": s3, "bucket": bucket, "location": loc},
    )
    yield h
    for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", ()):
        s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for k in raw_keys():
        s3.delete_object(Bucket=bucket, Key=k)
    s3.delete_bucket(Bucket=bucket)


def _azure_harness(settings) -> Iterator[Harness]:
    svc = clients.blob_service_client(settings)
    tenant = TenantId(f"acme-{uuid.uuid4().hex[:8]}")
    loc = L.shared_azure_location(tenant, svc.account_name)
    L.create_azure_container(svc, loc)
    other = svc.create_container(f"tenant-other-{uuid.uuid4().hex[:8]}")
    other.upload_blob("neighbour", b"n")
    container = svc.get_container_client(loc.container)

    def make(**kw):
        kw.setdefault("part_size", PART)
        kw.setdefault("list_page_size", PAGE)
        return L.open_store(loc, settings, blob_service=svc, **kw)

    def raw_keys():
        return [b.name for b in container.list_blobs()]

    def raw_pending():
        committed = set(raw_keys())
        return [b.name for b in container.list_blobs(include=["uncommittedblobs"]) if b.name not in committed]

    h = Harness(
        "azure",
        make(),
        make,
        "",
        raw_keys,
        raw_pending,
        lambda: [b.name for b in other.list_blobs()],
        lambda name: _crash_in_subprocess(loc, name),
        {"container": container, "location": loc, "svc": svc},
    )
    yield h
    container.delete_container()
    other.delete_container()


@pytest.fixture(params=["memory", "s3", "s3-obstore-reads", "azure"])
def backend(request) -> Iterator[Harness]:
    if request.param == "memory":
        yield from _memory_harness()
    elif request.param == "s3":
        yield from _s3_harness(request.getfixturevalue("localstack"))
    elif request.param == "s3-obstore-reads":
        yield from _s3_harness(request.getfixturevalue("localstack"), "obstore")
    else:
        yield from _azure_harness(request.getfixturevalue("azurite"))


# --- the contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 1])
def test_put_read_round_trip(backend, size):
    store = backend.store
    assert isinstance(store, ObjectStore)
    name = f"obj-{size}".encode()
    info = store.put_stream(name, stream(size), metadata={"sha256": "x" * 64, "kind": "record"})
    assert info.name == name and info.size == size and info.etag
    head = store.head(name)
    assert head is not None and head.size == size and head.etag == info.etag
    assert head.metadata == {"sha256": "x" * 64, "kind": "record"}
    want = digest_of(stream(size))
    with store.open_read(name) as r:
        assert r.info.size == size and r.info.metadata == head.metadata
        assert digest_of(iter(r)) == want
    with store.open_read(name) as r:
        data = b"".join(iter(lambda: r.read(1_000_003), b""))
    assert (hashlib.sha256(data).hexdigest(), len(data)) == want


@pytest.mark.parametrize("parts_in_flight", [1, 3])
def test_streamed_40mib_object_keeps_memory_bounded(backend, parts_in_flight):
    """Write peak <= (parts_in_flight + 1) parts + margins (``write_bound``: 15.6 MiB for
    one part in flight, 30.6 MiB for three), for a 40 MiB object: a write that buffered the
    stream, or let parts pile up behind slower uploads, fails."""
    store = backend.make_store(parts_in_flight=parts_in_flight) if backend.kind != "memory" else backend.store
    size = 8 * PART
    tracemalloc.start()
    try:
        store.put_stream(b"big", stream(size))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()  # what the store keeps (the memory store: the object)
        with store.open_read(b"big") as r:
            got = digest_of(iter(r))
        _, read_peak = tracemalloc.get_traced_memory()
        read_peak -= held
    finally:
        tracemalloc.stop()
    assert got == digest_of(stream(size))
    assert write_peak < backend.write_bound(size, parts_in_flight), f"write path peaked at {write_peak / MiB:.1f} MiB"
    assert read_peak < 3 * PART, f"read path peaked at {read_peak / MiB:.1f} MiB"


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_concurrent_writes_share_the_stores_upload_budget(request, kind):
    """Three multipart writes at once on one store whose upload budget holds two parts:
    the parts held by upload threads never exceed it (the rest are uploaded by their
    writers' own threads), so the store's write memory is the budget plus one part per
    writer (``write_bound``), not (parts_in_flight + 1) parts per writer. Every object
    arrives whole."""
    import threading

    gen = (
        _s3_harness(request.getfixturevalue("localstack"))
        if kind == "s3"
        else _azure_harness(request.getfixturevalue("azurite"))
    )
    backend = next(gen)
    try:
        store = backend.make_store(parts_in_flight=4, upload_buffer=2 * PART)
        writers, size = 3, 4 * PART + 1000
        errors: list[BaseException] = []

        def write(i: int) -> None:
            try:
                store.put_stream(f"w{i}".encode(), stream(size, b"w%d" % i))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        tracemalloc.start()
        try:
            threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert errors == []
        budget = store.upload_budget
        assert 0 < budget.peak <= 2 * PART and budget.held == 0
        # 39.4 MiB; unbudgeted, all 12 parts could be uploading at once: ~88 MiB.
        bound = write_bound(4, writers=writers, budget_parts=2)
        assert peak < bound, f"{writers} writers peaked at {peak / MiB:.1f} MiB (bound {bound / MiB:.1f} MiB)"
        for i in range(writers):
            assert digest_of(iter(store.open_read(f"w{i}".encode()))) == digest_of(stream(size, b"w%d" % i))
    finally:
        for _ in gen:  # the harness's own cleanup, after its yield
            pass


def test_head_missing_read_missing_and_delete(backend):
    store = backend.store
    assert store.head(b"missing") is None
    with pytest.raises(ObjectNotFoundError) as exc:
        store.open_read(b"missing")
    assert "missing" in str(exc.value)
    store.delete(b"missing")  # not an error
    store.put_stream(b"doomed", [b"bye"])
    store.delete(b"doomed")
    assert store.head(b"doomed") is None and [i.name for i in store.list()] == []
    store.delete(b"doomed")


def test_conditional_read_of_one_version(backend):
    """``if_match``: the version asked for reads; a replaced one (same name, same size)
    raises ObjectChangedError before any byte; a deleted one ObjectNotFoundError."""
    store = backend.store
    first = store.put_stream(b"pinned", [b"A" * 100])
    assert store.open_read(b"pinned", if_match=first.etag).read() == b"A" * 100
    listed = {i.name: i for i in store.list()}[b"pinned"]
    assert store.open_read(b"pinned", if_match=listed.etag).read() == b"A" * 100  # the listing's ETag works too
    store.put_stream(b"pinned", [b"B" * 100])
    with pytest.raises(ObjectChangedError) as exc:
        store.open_read(b"pinned", if_match=first.etag)
    assert "pinned" in str(exc.value)
    store.delete(b"pinned")
    with pytest.raises(ObjectNotFoundError):
        store.open_read(b"pinned", if_match=first.etag)


@pytest.mark.parametrize("size", [10, PART + 1024], ids=["single-put", "multipart"])
def test_write_returns_the_checksum_the_store_validated(backend, size):
    """``ObjectInfo.checksum`` of a write is the checksum of exactly the bytes sent, in the
    form the port names (recomputed here from the same bytes, independently)."""
    import base64

    data = b"".join(stream(size, b"ck"))
    info = backend.store.put_stream(b"ck", stream(size, b"ck"))
    parts = [data[i : i + PART] for i in range(0, len(data), PART)] if size > PART else [data]
    b64 = lambda d: base64.b64encode(d).decode()  # noqa: E731
    if backend.kind == "memory":
        expected = "sha256:" + hashlib.sha256(data).hexdigest()
    elif backend.kind.startswith("s3"):
        if len(parts) == 1:
            expected = "sha256:" + b64(hashlib.sha256(data).digest())
        else:
            joined = b"".join(hashlib.sha256(p).digest() for p in parts)
            expected = f"sha256-composite:{b64(hashlib.sha256(joined).digest())}-{len(parts)}"
    else:
        if len(parts) == 1:
            expected = "md5:" + b64(hashlib.md5(data).digest())
        else:
            joined = b"".join(hashlib.md5(p).digest() for p in parts)
            expected = f"md5-blocks:{b64(hashlib.md5(joined).digest())}-{len(parts)}"
    assert info.checksum == expected


def test_delete_many_in_batches(backend):
    store = backend.store
    before = backend.neighbour_keys()
    names = [f"many/{i:03d}".encode() for i in range(30)]
    for n in names:
        store.put_stream(n, [n])
    assert store.delete_many(iter(names[:20] + [b"many/never-there"])) == 21  # a missing name is no error
    assert sorted(i.name for i in store.list()) == names[20:]
    assert store.delete_many(i.name for i in store.list()) == 10
    assert list(store.list()) == [] and store.delete_many([]) == 0
    assert backend.neighbour_keys() == before


def test_list_prefix_pagination_each_once(backend):
    store = backend.store
    before = backend.neighbour_keys()
    names = [f"ws1/2024/{i:02d}".encode() for i in range(20)] + [f"ws2/{i}".encode() for i in range(5)]
    for n in names:
        store.put_stream(n, [n])
    listed = list(store.list())
    assert sorted(i.name for i in listed) == sorted(names) and len(listed) == len(names)
    assert all(i.metadata is None and i.size == len(i.name) for i in listed)
    assert sorted(i.name for i in store.list(b"ws1/")) == sorted(names[:20])
    assert sorted(i.name for i in store.list(b"ws1/2024/1")) == sorted(n for n in names if n.startswith(b"ws1/2024/1"))
    assert list(store.list(b"nothing")) == []
    assert backend.neighbour_keys() == before  # the other tenant's objects are not listed or touched


def test_conditional_create_twice(backend):
    store = backend.store
    store.put_stream(b"once", [b"first"], if_absent=True)
    with pytest.raises(ObjectExistsError) as exc:
        store.put_stream(b"once", [b"second"], if_absent=True)
    assert "once" in str(exc.value)
    assert store.open_read(b"once").read() == b"first"
    store.put_stream(b"once", [b"third"])  # unconditional overwrite replaces
    assert store.open_read(b"once").read() == b"third"


@pytest.mark.parametrize("size", [100, PART + 1024], ids=["single-put", "multipart"])
def test_conditional_create_race_is_decided_at_commit(backend, size):
    """Writer A passes the existence check, then B commits while A streams: A's commit
    must be refused (If-None-Match at PutObject / CompleteMultipartUpload / Put Block
    List), B's content stays, and A leaves no upload behind (faults A7/A8)."""
    store_a, store_b = backend.store, backend.make_store()

    def racing_chunks():
        first = True
        for c in stream(size, b"A"):
            if first:
                store_b.put_stream(b"raced", [b"B wins"], if_absent=True)
                first = False
            yield c

    with pytest.raises(ObjectExistsError):
        store_a.put_stream(b"raced", racing_chunks(), if_absent=True)
    assert store_a.open_read(b"raced").read() == b"B wins"
    store_a.abort_stale_uploads(timedelta(0))
    assert backend.raw_pending() == []


def test_traversal_names_round_trip_and_stay_inside(backend):
    store = backend.store
    before = backend.neighbour_keys()
    for i, name in enumerate(TRAVERSAL):
        store.put_stream(name, [b"payload-%d" % i], if_absent=True)
    for i, name in enumerate(TRAVERSAL):
        assert store.open_read(name).read() == b"payload-%d" % i
        assert store.head(name).size == len(b"payload-%d" % i)
    assert sorted(i.name for i in store.list()) == sorted(TRAVERSAL)
    raw = [k for k in backend.raw_keys() if k.startswith(backend.key_prefix) and k not in before]
    assert len(raw) == len(TRAVERSAL)
    for key in raw:
        rest = key[len(backend.key_prefix) :]
        assert all(c.isascii() and (c.isalnum() or c in "%_-") for c in rest), key
        assert decode_key(backend.key_prefix, key) in TRAVERSAL
    assert backend.neighbour_keys() == before


@pytest.mark.parametrize("name", [b"", "text", b"x" * 1100, b"/" * 400])
def test_bad_names_refused_before_any_request(backend, name):
    with pytest.raises(ValidationError):
        backend.store.put_stream(name, [b"x"])
    with pytest.raises(ValidationError):
        backend.store.head(name)


def test_bad_metadata_refused(backend):
    with pytest.raises(ValidationError):
        backend.store.put_stream(b"m", [b"x"], metadata={"Bad-Key": "v"})
    assert backend.store.head(b"m") is None


def test_failing_source_leaves_no_object(backend):
    class SourceBroke(Exception):
        pass

    def chunks():
        yield from stream(2 * PART + 1024)  # two parts/blocks are sent before the failure
        raise SourceBroke("reader of the source failed")

    with pytest.raises(SourceBroke):
        backend.store.put_stream(b"partial", chunks())
    assert backend.store.head(b"partial") is None
    assert [i.name for i in backend.store.list()] == []
    backend.store.abort_stale_uploads(timedelta(0))
    assert backend.raw_pending() == [] and list(backend.store.pending_uploads()) == []


def test_crashed_upload_is_invisible_and_cleaned_up(backend):
    store = backend.store
    backend.crash_mid_upload(b"crashed/obj")
    assert store.head(b"crashed/obj") is None
    assert [i.name for i in store.list()] == []
    pending = list(store.pending_uploads())
    assert [p.name for p in pending] == [b"crashed/obj"], backend.raw_pending()
    assert backend.raw_pending() != []
    assert store.abort_stale_uploads(timedelta(hours=1)) == 0  # too young to be stale
    assert store.abort_stale_uploads(timedelta(0)) == 1
    assert backend.raw_pending() == [] and list(store.pending_uploads()) == []
    # The name is usable afterwards, and only the new attempt's data is in it.
    store.put_stream(b"crashed/obj", stream(PART + 10, b"new"), if_absent=True)
    assert digest_of(iter(store.open_read(b"crashed/obj"))) == digest_of(stream(PART + 10, b"new"))


def test_reader_never_mixes_versions(backend):
    """Overwrite while a reader is mid-way: the reader returns the old version entirely
    or raises a retryable error; never a mix."""
    store = backend.make_store(read_chunk_size=MiB) if backend.kind != "memory" else backend.store
    store.put_stream(b"v", stream(3 * MiB, b"old"))
    old = digest_of(stream(3 * MiB, b"old"))
    r = store.open_read(b"v")
    first = r.read(MiB)
    store.put_stream(b"v", stream(3 * MiB, b"new"))
    try:
        rest = r.read()
    except TransientError:
        return
    data = first + rest
    assert (hashlib.sha256(data).hexdigest(), len(data)) == old


# --- backend-specific -------------------------------------------------------------------------------


def test_s3_dedicated_bucket_sse_kms(localstack):
    s3 = clients.aws_client("s3", localstack)
    kms = clients.aws_client("kms", localstack)
    key_arn = kms.create_key(Description="contract: dedicated bucket")["KeyMetadata"]["Arn"]
    tenant = TenantId(f"t{uuid.uuid4().hex[:10]}")
    loc = L.dedicated_s3_location(tenant, sse_kms_key_arn=key_arn, bucket_prefix="contract-ded")
    try:
        L.create_dedicated_s3_bucket(s3, loc, region=localstack.aws_region)
        L.create_dedicated_s3_bucket(s3, loc, region=localstack.aws_region)  # idempotent re-run
        rule = s3.get_bucket_encryption(Bucket=loc.bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
        assert rule["BucketKeyEnabled"] is True
        pab = s3.get_public_access_block(Bucket=loc.bucket)["PublicAccessBlockConfiguration"]
        assert all(pab.values())
        store = L.open_store(loc, localstack, s3_client=s3, part_size=PART)
        store.put_stream(b"first", [b"hello"])
        store.put_stream(b"second", stream(PART + 1))  # multipart path
        for name in (b"first", b"second"):
            h = s3.head_object(Bucket=loc.bucket, Key=name.decode())
            assert h["ServerSideEncryption"] == "aws:kms" and h["SSEKMSKeyId"] == key_arn
        assert L.delete_location(loc, store, s3_client=s3) == 2
        assert loc.bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        L.delete_location(loc, store, s3_client=s3)  # idempotent
    finally:
        kms.schedule_key_deletion(KeyId=key_arn, PendingWindowInDays=7)


def test_s3_every_put_names_the_key_even_if_the_bucket_default_differs(localstack):
    """Defense in depth (A14): the adapter sends the key on every PUT, so an object lands
    under the tenant's key even while the bucket default is something else."""
    s3 = clients.aws_client("s3", localstack)
    kms = clients.aws_client("kms", localstack)
    key_arn = kms.create_key(Description="contract: explicit sse")["KeyMetadata"]["Arn"]
    bucket = f"contract-sse-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    try:
        loc = L.Location(TenantId("acme"), L.Kind.DEDICATED, L.Cloud.S3, bucket=bucket, sse_kms_key_arn=key_arn)
        store = L.open_store(loc, localstack, s3_client=s3)
        store.put_stream(b"x", [b"data"])
        assert s3.head_object(Bucket=bucket, Key="x")["SSEKMSKeyId"] == key_arn
        L.delete_location(loc, store, s3_client=s3)
    finally:
        kms.schedule_key_deletion(KeyId=key_arn, PendingWindowInDays=7)


def _inject_200_error(s3, times: int) -> list[int]:
    """Make CompleteMultipartUpload answer '200 OK' with an <Error> body ``times`` times,
    before the request reaches the server (faults A6)."""
    from botocore.awsrequest import AWSResponse

    calls = [0]

    class _Raw:
        def __init__(self, body):
            self._body = body

        def stream(self, **kw):
            yield self._body

    def hook(request, **kw):
        if "uploadId=" in request.url and request.method == "POST" and calls[0] < times:
            calls[0] += 1
            body = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>boom</Message></Error>"
            return AWSResponse(request.url, 200, {}, _Raw(body))
        return None

    s3.meta.events.register_first("before-send.s3.CompleteMultipartUpload", hook)
    return calls


def test_s3_200_with_error_body_is_retried(localstack, monkeypatch):
    s3 = clients.aws_client("s3", localstack)
    bucket = f"contract-200-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    loc = L.shared_s3_location("acme", bucket)
    try:
        calls = _inject_200_error(s3, times=1)
        store = L.open_store(loc, localstack, s3_client=s3, part_size=PART)
        store.put_stream(b"obj", stream(PART + 1))
        assert calls[0] == 1
        assert digest_of(iter(store.open_read(b"obj"))) == digest_of(stream(PART + 1))

        calls = _inject_200_error(s3, times=10**6)  # every attempt: retries run out
        import time

        monkeypatch.setattr(time, "sleep", lambda s: None)  # skip botocore's backoff between attempts
        with pytest.raises(TransientError) as exc:
            store.put_stream(b"obj2", stream(PART + 1))
        assert exc.value.retryable and "CompleteMultipartUpload" in str(exc.value)
        assert store.head(b"obj2") is None
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        L.delete_location(loc, L.open_store(loc, localstack))
        s3.delete_bucket(Bucket=bucket)


def test_s3_read_resumes_after_connection_break(localstack):
    """A body that breaks mid-read is resumed with a ranged GET conditioned on the etag;
    if the object changed in between the read fails instead (faults A3). The boto3 read
    path (the obstore one: tests/faults/test_storage_faults.py, through the fault proxy)."""
    from botocore.exceptions import ResponseStreamingError

    s3 = clients.aws_client("s3", localstack)
    bucket = f"contract-rd-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    loc = L.shared_s3_location("acme", bucket)
    real_get = s3.get_object
    ranges: list[str | None] = []

    class Breaking:
        def __init__(self, body, after):
            self.body, self.after = body, after

        def iter_chunks(self, n):
            sent = 0
            for c in self.body.iter_chunks(n):
                if sent >= self.after:
                    raise ResponseStreamingError(error="connection reset by peer")
                sent += len(c)
                yield c

        def close(self):
            self.body.close()

    def flaky_get(**kw):
        ranges.append(kw.get("Range"))
        resp = real_get(**kw)
        if len(ranges) == 1:
            resp["Body"] = Breaking(resp["Body"], MiB)
        return resp

    try:
        store = L.open_store(loc, localstack, s3_client=s3, read_chunk_size=256 * 1024, reads=None)
        store.put_stream(b"o", stream(3 * MiB))
        s3.get_object = flaky_get
        assert digest_of(iter(store.open_read(b"o"))) == digest_of(stream(3 * MiB))
        assert ranges == [None, f"bytes={MiB}-"]

        ranges.clear()  # the next GET breaks again after 1 MiB
        r = store.open_read(b"o")
        assert len(r.read(MiB)) == MiB
        store.put_stream(b"o", stream(3 * MiB, b"changed"))
        with pytest.raises(TransientError, match="changed during read"):
            r.read()
        assert ranges == [None, f"bytes={MiB}-"]
    finally:
        s3.get_object = real_get
        L.delete_location(loc, L.open_store(loc, localstack))
        s3.delete_bucket(Bucket=bucket)


def test_azure_stale_blocks_of_a_crashed_attempt_are_never_committed(azurite):
    """A16: attempt 1 stages blocks and dies; attempt 2 commits only its own block ids."""
    svc = clients.blob_service_client(azurite)
    loc = L.shared_azure_location(f"acme-{uuid.uuid4().hex[:8]}", svc.account_name)
    L.create_azure_container(svc, loc)
    try:
        _crash_in_subprocess(loc, b"obj")
        store = L.open_store(loc, azurite, blob_service=svc, part_size=PART)
        blob = svc.get_blob_client(loc.container, "obj")
        _, stale = blob.get_block_list("uncommitted")
        assert len(stale) >= 2
        stale_attempt = {b.id.split("-")[0] for b in stale}
        store.put_stream(b"obj", stream(2 * PART + 5, b"attempt2"), if_absent=True)
        committed, uncommitted = blob.get_block_list("all")
        assert len(committed) == 3 and uncommitted == []  # the commit discarded the stale blocks
        assert {b.id.split("-")[0] for b in committed}.isdisjoint(stale_attempt)
        assert len({len(b.id) for b in committed}) == 1
        assert digest_of(iter(store.open_read(b"obj"))) == digest_of(stream(2 * PART + 5, b"attempt2"))
    finally:
        svc.delete_container(loc.container)


def test_azure_dedicated_container_and_delete_location(azurite):
    svc = clients.blob_service_client(azurite)
    loc = L.dedicated_azure_location(f"acme-{uuid.uuid4().hex[:8]}", svc.account_name)
    assert loc.container.startswith("byok-")
    L.create_azure_container(svc, loc)
    L.create_azure_container(svc, loc)  # idempotent
    store = L.open_store(loc, azurite)
    store.put_stream(b"a", [b"1"])
    store.put_stream(b"b/c", [b"2"])
    assert L.delete_location(loc, store, blob_service=svc) == 2
    assert loc.container not in [c.name for c in svc.list_containers()]
    L.delete_location(loc, store, blob_service=svc)  # idempotent


def test_open_store_refuses_an_unconfigured_azure_account(azurite):
    from archive_kms.errors import ConfigurationError

    loc = L.dedicated_azure_location("acme", account_prefix="akms")
    with pytest.raises(ConfigurationError, match="no credentials configured"):
        L.open_store(loc, azurite)


def test_s3_checksum_configuration_is_explicit(localstack):
    """A13: the S3 client computes and validates checksums only "when_required" (boto3
    >= 1.36 defaults to CRC trailers some S3-compatible stores reject), and integrity is
    not left to that default: every PutObject and UploadPart carries our SHA-256 checksum
    (``x-amz-checksum-sha256``, validated by S3 on receipt), and no CRC header or trailer
    is added behind our back."""
    s3 = clients.aws_client("s3", localstack)
    assert s3.meta.config.request_checksum_calculation == "when_required"
    assert s3.meta.config.response_checksum_validation == "when_required"
    bucket = f"contract-ck-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    loc = L.shared_s3_location("acme", bucket)
    sent: list[tuple[str, dict[str, str]]] = []

    def record(request, **kw):
        op = kw["event_name"].rsplit(".", 1)[-1]
        sent.append((op, {k.lower(): v for k, v in request.headers.items()}))

    s3.meta.events.register("before-send.s3", record)
    try:
        store = L.open_store(loc, localstack, s3_client=s3, part_size=PART)
        store.put_stream(b"small", [b"x" * 1000])
        store.put_stream(b"big", stream(PART + 1))
        writes = [(op, h) for op, h in sent if op in ("PutObject", "UploadPart")]
        assert [op for op, _ in writes] == ["PutObject", "UploadPart", "UploadPart"]
        for op, headers in sent:
            assert not [
                h
                for h in headers
                if (h.startswith("x-amz-checksum") and h not in ("x-amz-checksum-sha256", "x-amz-checksum-algorithm"))
                or h == "x-amz-trailer"
            ], (op, sorted(headers))
        assert all("x-amz-checksum-sha256" in h for _, h in writes)
    finally:
        s3.meta.events.unregister("before-send.s3", record)
        L.delete_location(loc, L.open_store(loc, localstack))
        s3.delete_bucket(Bucket=bucket)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_missing_bucket_or_container_is_a_storage_error(request, kind):
    """A location whose bucket/container is gone is a StorageError naming it (a human must
    act), never "no such object" (which a copy would answer by writing, a verify by
    re-copying). Azure tells it apart on every call (x-ms-error-code ContainerNotFound);
    S3 only where a body is returned (a HEAD 404 has none, so ``head`` says None)."""
    from archive_kms.errors import StorageError

    if kind == "s3":
        settings = request.getfixturevalue("localstack")
        gone = L.shared_s3_location("acme", f"contract-gone-{uuid.uuid4().hex[:10]}")
        store = L.open_store(gone, settings, part_size=PART)
        where = gone.bucket
    else:
        settings = request.getfixturevalue("azurite")
        svc = clients.blob_service_client(settings)
        gone = L.shared_azure_location(f"gone-{uuid.uuid4().hex[:8]}", svc.account_name)
        store = L.open_store(gone, settings, blob_service=svc, part_size=PART)
        where = gone.container
        with pytest.raises(StorageError, match=where):
            store.head(b"x")
    for call in (lambda: store.put_stream(b"x", [b"data"]), lambda: store.open_read(b"x"), lambda: list(store.list())):
        with pytest.raises(StorageError, match=where) as exc:
            call()
        assert not exc.value.retryable
