"""The copy's S3 data path on each client: the same objects, the same threads, CPU seconds.

    .venv/bin/python bench/bench_s3_data_path.py [--objects 568] [--repeats 3] [--threads 16] [--json]

Needs the stack's LocalStack (S3 and KMS). Writes ``--objects`` objects in the default
size mix (three records of 1-4 KB to one attachment drawn from ``synthetic.SizeMix``'s
bands) under a fresh prefix of a scratch bucket, then, alternating, one child process per
variant and repeat copies every object (GET with ``If-Match`` of the listed ETag, PUT
create-only with ``x-amz-checksum-sha256`` under SSE-KMS with a fresh LocalStack key,
metadata like the migration's) and reports its own CPU (user + system, ``getrusage``),
wall time and peak RSS for the copy loop only:

* ``boto3``: ``S3ObjectStore.open_read`` -> ``put_stream`` (reads and writes on boto3);
* ``obstore-reads``: the same with ``s3_read_client = "obstore"`` (ADR 0043);
* ``obstore``: obstore GET and obstore PUT (``mode="create"``, the store's SHA-256 and
  SSE-KMS settings), the path ADR 0043 does not adopt (no checksum echo, no SSE response
  check, no conditional multipart);
* ``obstore+head``: ``obstore`` plus a boto3 HeadObject (``ChecksumMode=ENABLED``) per
  object to read the stored checksum and key back (what the echo would cost).

Prints medians; timings are printed, never judged. Everything it wrote is deleted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

VARIANTS = ("boto3", "obstore-reads", "obstore", "obstore+head")
META = {"akms_format": "1", "akms_dek": "bench"}


def _setup(settings: Any, objects: int) -> dict[str, Any]:
    from archive_kms import clients
    from archive_kms.storage.naming import object_key
    from archive_kms.synthetic import SizeMix

    s3 = clients.aws_client("s3", settings)
    kms = clients.aws_client("kms", settings)
    bucket = f"bench-s3-path-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    key = kms.create_key(Description="bench_s3_data_path")["KeyMetadata"]["Arn"]
    rnd = random.Random(16)
    bands = SizeMix().bands
    total = 0
    for i in range(objects):
        if i % 4 == 3:
            pick, acc = rnd.random(), 0.0
            lo, hi = bands[-1][1:]
            for weight, b_lo, b_hi in bands:
                acc += weight
                if pick < acc:
                    lo, hi = b_lo, b_hi
                    break
            size = rnd.randint(lo, hi)
        else:
            size = rnd.randint(1_000, 4_000)
        s3.put_object(Bucket=bucket, Key=object_key("src/", f"obj{i:06d}".encode()), Body=os.urandom(size))
        total += size
    return {"bucket": bucket, "key": key, "bytes": total}


def _copy(settings: Any, bucket: str, key: str, variant: str, run: str, threads: int) -> dict[str, Any]:
    from archive_kms import clients
    from archive_kms.storage.naming import decode_key, object_key
    from archive_kms.storage.s3 import S3ObjectStore
    from archive_kms.storage.s3_obstore import ObstoreS3Reads

    s3 = clients.aws_client("s3", settings)
    etags = {
        o["Key"]: o["ETag"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="src/")
        for o in p.get("Contents", ())
    }
    if variant in ("boto3", "obstore-reads"):
        reads = None
        if variant == "obstore-reads":  # what storage.locations.open_store builds for s3_read_client = "obstore"
            reads = ObstoreS3Reads(clients.obstore_s3_store(bucket, settings), bucket, chunk_size=1024 * 1024)
        src = S3ObjectStore(s3, bucket, "src/", reads=reads)
        dst = S3ObjectStore(s3, bucket, f"{run}/", sse_kms_key_arn=key)

        def copy(k: str) -> int:
            name = decode_key("src/", k)
            assert name is not None
            with src.open_read(name, if_match=etags[k]) as reader:
                return dst.put_stream(name, iter(reader), if_absent=True, metadata=META).size

    else:
        import obstore
        from obstore.store import S3Store

        source = clients.obstore_s3_store(bucket, settings)
        common = {
            "endpoint": settings.aws_endpoint_url,
            "region": settings.aws_region,
            "access_key_id": settings.aws_access_key_id.get_secret_value(),
            "secret_access_key": settings.aws_secret_access_key.get_secret_value(),
            "virtual_hosted_style_request": False,
            "client_options": {"allow_http": True},
        }
        target = S3Store(
            bucket,
            checksum_algorithm="sha256",
            server_side_encryption="aws:kms",
            sse_kms_key_id=key,
            sse_bucket_key_enabled=True,
            unsigned_payload=True,
            **common,
        )
        head = variant == "obstore+head"

        def copy(k: str) -> int:
            got = obstore.get(source, k, options={"if_match": etags[k]})
            body = b"".join(bytes(c) for c in got.stream(min_chunk_size=1024 * 1024))
            digest = hashlib.sha256(body).digest()  # what ObjectInfo.checksum needs
            out = object_key(f"{run}/", decode_key("src/", k) or b"")
            obstore.put(target, out, body, mode="create", use_multipart=False, attributes=META)
            if head:
                resp = s3.head_object(Bucket=bucket, Key=out, ChecksumMode="ENABLED")
                assert resp["ChecksumSHA256"] == base64.b64encode(digest).decode()
                assert resp["SSEKMSKeyId"] == key
            return len(body)

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        copied = sum(pool.map(copy, sorted(etags)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"cpu_seconds": cpu, "wall_seconds": wall, "bytes": copied, "peak_rss_mib": after.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=568)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("BUCKET", "KEY", "VARIANT", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    from archive_kms.config import Settings

    settings = Settings()
    if args.child:
        print(json.dumps(_copy(settings, *args.child, args.threads)))
        return 0
    data = _setup(settings, args.objects)
    variants = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for i in range(args.repeats):
            for v in variants:
                out = subprocess.run(
                    [sys.executable, __file__, "--threads", str(args.threads), "--child", data["bucket"], data["key"], v,
                     f"r{i}-{v.replace('+', '-')}"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        from archive_kms import clients

        s3 = clients.aws_client("s3", settings)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=data["bucket"]):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                s3.delete_objects(Bucket=data["bucket"], Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=data["bucket"])
    result = {
        "objects": args.objects,
        "mib": data["bytes"] / 2**20,
        "medians": {
            v: {m: statistics.median(r[m] for r in rs) for m in ("cpu_seconds", "wall_seconds", "peak_rss_mib")}
            for v, rs in runs.items()
        },
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.objects} objects, {result['mib']:.1f} MiB, {args.threads} threads, medians of {args.repeats}")
        print(f"{'variant':16} {'CPU s':>8} {'wall s':>8} {'peak RSS MiB':>13}")
        for v, m in result["medians"].items():
            print(f"{v:16} {m['cpu_seconds']:8.2f} {m['wall_seconds']:8.2f} {m['peak_rss_mib']:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
