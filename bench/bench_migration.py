"""Migration throughput against rclone's: same generated archive, same LocalStack, same run.

    .venv/bin/python bench/bench_migration.py [--objects 400] [--mix default] [--shards 8]
        [--parallel-shards 4] [--threads 4] [--transfers N] [--rclone-server-side] [--json]
        [--tenant-tag TAG] [--verify attested|read-back] [--scale]

Needs `archive-kms stack up` (LocalStack S3+KMS, Elasticsearch) and `rclone` on PATH.

1. Generates one synthetic archive (``--objects`` records plus their attachments, size mix
   ``--mix``, two workspaces) into a fresh tenant on the shared S3 bucket, with
   ``submit_job`` on the real platform (state in a temporary SQLite file).
2. **rclone** copies the tenant's shared prefix to a fresh bucket: a pure byte copy that
   checks its own MD5/ETag per object. Server-side copy is disabled (``--disable Copy``)
   unless ``--rclone-server-side``: our migration has to stream every byte through the
   client to decrypt and re-encrypt it, so the peer streams too.
3. **Raw boto3** (the raw-client peer): a threaded GET + PUT of the same objects into a
   fresh bucket with boto3 and no cryptography (``upload_fileobj`` of each GET body: one
   PutObject below 8 MiB, 8 MiB parts 4 at a time above), as many objects in flight as
   ours. Our ratio to it is the cost of everything we add (decrypt, re-encrypt, checks,
   ledger).
4. **Ours**: the enable migration of the same tenant (``plan_enable`` mode byokms onto a
   fresh LocalStack KMS key, ``trigger``, ``execute`` with the thread shard runner), all
   13 steps, in a subprocess of its own; ``--verify`` picks the verify mode (ADR 0018).

``--scale`` replaces the archive with two: 20,000 small records (written directly, 16 at a
time, without the archive job's indexing) and one attachment of 2 GiB, each run through the
three contenders; it prints both tables and the difference of our peak RSS between them
(the memory bound must not depend on object count or size).

Both contenders run as child processes; each one's peak RSS is measured from outside (GNU
``time``'s ``%M`` when /usr/bin/time is there, else the child's ``VmHWM`` sampled every 20 ms;
see ``run_measured``). Throughput is the source's stored bytes (what both read) over:

* ours (copy+verify): the copy step's plus the verify step's seconds, i.e. re-encrypting
  *and* reading every object back to check it: the figure the ratio uses;
* ours (copy only): the copy step alone;
* ours (end to end): plan + all 13 steps (pause, manifest, index rebuild, cutover,
  deleting the source, ...);
* rclone: its process's wall time (start to exit).

Concurrency is the same on both sides: rclone gets ``--transfers`` = ``--checkers`` =
parallel shards x threads per shard (objects in flight in our copy step) unless given.
rclone runs first (our migration deletes the source at the end). Everything the run
creates (buckets, indices, the KMS key, scheduled for deletion) is removed at the end.
Exit 1 if either copy is incomplete or the migration does not complete; timings are
reported, never judged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.operations.platform import Platform

MIB = 1024 * 1024
RCLONE_REMOTE = "ls"  # the rclone remote name, configured only through RCLONE_CONFIG_LS_* variables
TENANT_PREFIX = "bench-mig"


# --- measuring a child process -------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    rss_method: str  # "gnu-time" (exact) or "proc-poll" (VmHWM sampled every 20 ms)
    stdout: str
    stderr: str
    cpu_seconds: float | None = None  # user + system CPU of the command (GNU time only)


GNU_TIME = "/usr/bin/time"


def _gnu_time_usable() -> bool:
    try:
        return subprocess.run([GNU_TIME, "-f", "%M", "true"], capture_output=True, check=False).returncode == 0
    except OSError:
        return False


def _vm_hwm_bytes(pid: int | str) -> int | None:
    """The process's peak RSS so far (``VmHWM``), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_measured(cmd: list[str], env: dict[str, str]) -> Measured:
    """Run ``cmd``: wall time and the child's own peak RSS.

    Not ``wait4``'s ``ru_maxrss``: Linux carries the parent's RSS over the fork into the
    child's figure (this script holds ~170 MiB of SDKs, more than rclone ever uses). GNU
    time forks from its own tiny process, so its ``%M`` is the command's own peak; without
    it, ``VmHWM`` of the command is sampled until it exits."""
    with tempfile.TemporaryDirectory(prefix="akms-bench-run-") as tmp:
        out_path, err_path, rss_path = (Path(tmp) / n for n in ("stdout", "stderr", "rss"))
        use_time = _gnu_time_usable()
        full = [GNU_TIME, "-f", "%U %S %M", "-o", str(rss_path), *cmd] if use_time else cmd
        with out_path.open("w") as out, err_path.open("w") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(full, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            peak = 0
            if use_time:
                proc.wait()
            while proc.poll() is None:
                peak = max(peak, _vm_hwm_bytes(proc.pid) or 0)
                time.sleep(0.02)
            seconds = time.perf_counter() - started
        cpu = None
        if use_time:
            fields = rss_path.read_text().split()
            peak = int(fields[-1]) * 1024 if fields and fields[-1].isdigit() else 0  # KiB
            try:
                cpu = float(fields[-3]) + float(fields[-2])
            except (IndexError, ValueError):
                cpu = None
        return Measured(
            proc.returncode,
            seconds,
            peak,
            "gnu-time" if use_time else "proc-poll",
            out_path.read_text(),
            err_path.read_text(),
            cpu,
        )


# --- the archive ----------------------------------------------------------------------------


def build_platform(state_url: str):
    settings = Settings(state_url=state_url)
    return Platform.from_settings(settings), settings


def generate_archive(platform: Any, tenant: str, *, records: int, mix: str, seed: int) -> dict[str, Any]:
    from archive_kms.operations.archive import JobSpec, submit_job
    from archive_kms.operations.tenants import create_tenant

    create_tenant(platform, tenant, cloud="s3", actor="bench")
    spec = JobSpec(
        f"{tenant}-job", tenant, "synthetic", synthetic={"count": records, "seed": seed, "mix": mix, "workspaces": 2}
    )
    started = time.perf_counter()
    outcome = submit_job(platform.state, spec, platform.open_archive)
    return {
        "records": outcome.records,
        "attachments": outcome.attachments,
        "bytes_plaintext": outcome.bytes_plaintext,
        "seconds": time.perf_counter() - started,
    }


def listing_totals(s3: Any, bucket: str, prefix: str = "") -> tuple[int, int]:
    """(objects, bytes) under ``prefix`` in ``bucket``."""
    count = total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            count += 1
            total += obj["Size"]
    return count, total


# --- rclone ---------------------------------------------------------------------------------


def rclone_env(settings: Settings) -> dict[str, str]:
    """rclone configured for LocalStack S3 through the environment only (no config file)."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE" and not k.startswith("RCLONE_")}
    prefix = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
    env.update(
        {
            "RCLONE_CONFIG": os.devnull,  # never read a user's rclone.conf
            prefix + "TYPE": "s3",
            prefix + "PROVIDER": "Other",
            prefix + "ENDPOINT": settings.aws_endpoint_url or "",
            prefix + "REGION": settings.aws_region,
            prefix + "ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value()
            if settings.aws_access_key_id
            else "",
            prefix + "SECRET_ACCESS_KEY": (
                settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else ""
            ),
            prefix + "FORCE_PATH_STYLE": "true",
        }
    )
    return env


def run_rclone(
    settings: Settings, src_bucket: str, src_prefix: str, dst_bucket: str, *, transfers: int, server_side: bool
) -> Measured:
    cmd = [
        "rclone",
        "copy",
        f"{RCLONE_REMOTE}:{src_bucket}/{src_prefix}",
        f"{RCLONE_REMOTE}:{dst_bucket}/",
        "--transfers",
        str(transfers),
        "--checkers",
        str(transfers),
        "--s3-no-check-bucket",
    ]
    if not server_side:
        cmd += ["--disable", "Copy"]  # stream through the client, as our migration must
    return run_measured(cmd, rclone_env(settings))


def rclone_version() -> str:
    try:
        out = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"rclone is not usable ({exc}); install it: apt-get install -y rclone") from None
    return out.splitlines()[0].strip()


# --- the raw boto3 peer (a child process) ------------------------------------------------------


def raw_phase(src_bucket: str, src_prefix: str, dst_bucket: str, *, threads: int) -> dict[str, Any]:
    """Runs in the child: GET each object under the prefix and PUT it into ``dst_bucket``."""
    from concurrent.futures import ThreadPoolExecutor

    from boto3.s3.transfer import TransferConfig

    settings = Settings()
    s3 = clients.aws_client("s3", settings)
    config = TransferConfig(
        multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4, use_threads=True
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=src_bucket, Prefix=src_prefix)
        for o in page.get("Contents", ())
    ]

    def copy(key: str) -> int:
        body = s3.get_object(Bucket=src_bucket, Key=key)["Body"]
        s3.upload_fileobj(body, dst_bucket, key[len(src_prefix) :], Config=config)
        return 1

    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = sum(pool.map(copy, keys))
    return {"objects": done, "peak_rss_self_bytes": _vm_hwm_bytes("self")}


def run_raw(settings: Settings, src_bucket: str, src_prefix: str, dst_bucket: str, *, threads: int) -> Measured:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        "raw",
        "--src-bucket",
        src_bucket,
        "--src-prefix",
        src_prefix,
        "--dst-bucket",
        dst_bucket,
        "--threads",
        str(threads),
    ]
    return run_measured(cmd, dict(os.environ))


# --- scale data --------------------------------------------------------------------------------


def generate_small_objects(platform: Any, tenant: str, count: int, *, seed: int) -> dict[str, Any]:
    """``count`` records (no attachments), written 16 at a time straight through the tenant's
    archive (encrypted, conditional PUT), without the archive job's index writes."""
    from concurrent.futures import ThreadPoolExecutor

    from archive_kms.operations.archive import record_object_name
    from archive_kms.operations.tenants import create_tenant
    from archive_kms.synthetic import generate_records

    create_tenant(platform, tenant, cloud="s3", actor="bench")
    archive = platform.open_archive(tenant)
    started = time.perf_counter()

    def put(record: Any) -> int:
        return archive.put_object(record_object_name(record), record.workspace_id, [record.to_json()])[1]

    records = (r for r, _ in generate_records(tenant, count, seed=seed, workspaces=2))
    with ThreadPoolExecutor(max_workers=16) as pool:
        plaintext = sum(pool.map(put, records, chunksize=64))
    return {"records": count, "attachments": 0, "bytes_plaintext": plaintext, "seconds": time.perf_counter() - started}


def generate_big_object(platform: Any, tenant: str, size: int, *, seed: int) -> dict[str, Any]:
    """One attachment of ``size`` bytes (pseudo-random, generated lazily) and no record."""
    from archive_kms.operations.archive import attachment_object_name
    from archive_kms.operations.tenants import create_tenant
    from archive_kms.synthetic import keystream

    create_tenant(platform, tenant, cloud="s3", actor="bench")
    archive = platform.open_archive(tenant)
    started = time.perf_counter()
    _, n = archive.put_object(attachment_object_name("ws0", "00PSCALE0000000001"), "ws0", keystream(b"%d" % seed, size))
    return {"records": 0, "attachments": 1, "bytes_plaintext": n, "seconds": time.perf_counter() - started}


# --- our migration (the child process) --------------------------------------------------------


def migrate_phase(
    state_url: str, tenant: str, key_ref: str, *, shards: int, parallel_shards: int, threads: int, verify: str | None
) -> dict[str, Any]:
    """Runs in the child: the whole enable flow of ``tenant``; step timings from the run."""
    from archive_kms.migration import build_report, execute, plan_enable, trigger
    from archive_kms.migration.steps import STEP_FUNCTIONS

    step_cpu: dict[str, float] = {}

    def cpu_of(name: str, fn: Any) -> Any:
        def timed(ctx: Any) -> Any:  # the process's CPU seconds (all threads) while the step ran
            started = time.process_time()
            try:
                return fn(ctx)
            finally:
                step_cpu[name] = step_cpu.get(name, 0.0) + time.process_time() - started

        return timed

    for name, fn in list(STEP_FUNCTIONS.items()):
        STEP_FUNCTIONS[name] = cpu_of(name, fn)
    platform, _ = build_platform(state_url)
    started = time.perf_counter()
    plan = plan_enable(
        platform,
        tenant,
        "byokms",
        key_ref,
        shards=shards,
        parallel_shards=parallel_shards,
        threads_per_shard=threads,
        **({"verify": verify} if verify else {}),  # not given: the settings' default
    )
    run, _ = trigger(platform, plan, actor="bench")
    outcome = execute(platform, run.run_id, actor="bench")
    end_to_end = time.perf_counter() - started
    run = platform.state.get_run(run.run_id)
    steps = {
        s.name: (s.finished_at - s.started_at).total_seconds()
        for s in run.steps
        if s.started_at is not None and s.finished_at is not None
    }
    report = build_report(platform, run.run_id)
    return {
        "outcome": outcome.to_dict(),
        "steps": steps,
        "step_cpu_seconds": {k: round(v, 3) for k, v in step_cpu.items()},
        "end_to_end_seconds": end_to_end,
        "copy": run.step("copy").result or {},
        "verify": run.step("verify").result or {},
        "objects": report["objects"],
        "bytes": report["bytes"],
        "destination": report["destination"],
        "peak_rss_self_bytes": _vm_hwm_bytes("self"),
    }


def run_ours(state_url: str, tenant: str, key_ref: str, args: argparse.Namespace) -> tuple[Measured, dict[str, Any]]:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        "migrate",
        "--state-url",
        state_url,
        "--tenant",
        tenant,
        "--key-ref",
        key_ref,
        "--shards",
        str(args.shards),
        "--parallel-shards",
        str(args.parallel_shards),
        "--threads",
        str(args.threads),
        *(["--verify", args.verify] if args.verify else []),
    ]
    measured = run_measured(cmd, dict(os.environ))
    if measured.returncode != 0:
        raise SystemExit(f"migration subprocess exited {measured.returncode}:\n{measured.stderr[-4000:]}")
    return measured, json.loads(measured.stdout.strip().splitlines()[-1])


# --- cleanup --------------------------------------------------------------------------------


def empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.NoSuchBucket:
        pass


def cleanup(
    settings: Settings, s3: Any, tenant: str, buckets: list[str], shared_prefix: str | None, key_arn: str | None
) -> None:
    """Remove what the run created; best effort, a failure is printed, not raised."""
    from archive_kms.domain.tenants import es_index_pattern

    steps: list[tuple[str, Any]] = [(f"bucket {b}", lambda b=b: empty_and_delete_bucket(s3, b)) for b in buckets]
    if shared_prefix:  # left behind only if the migration stopped before cleanup_source
        steps.append(("shared prefix", lambda: _delete_prefix(s3, settings.shared_bucket, shared_prefix)))

    def indices() -> None:
        es = clients.elasticsearch_client(settings)
        for name in es.options(ignore_status=404).indices.get(index=es_index_pattern(tenant)):
            es.indices.delete(index=name)

    steps.append(("search indices", indices))
    if key_arn:
        steps.append(
            (
                "kms key",
                lambda: clients.kms_client(settings).schedule_key_deletion(KeyId=key_arn, PendingWindowInDays=7),
            )
        )
    for what, fn in steps:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - cleanup must try every step
            print(f"cleanup of {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _delete_prefix(s3: Any, bucket: str, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


# --- the comparison -------------------------------------------------------------------------


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


def compare(args: argparse.Namespace, *, data: str = "synthetic") -> dict[str, Any]:
    """One archive (``data``: the synthetic job, or ``small``/``big`` for ``--scale``)
    through rclone, the raw boto3 peer and our migration."""
    tmp = Path(tempfile.mkdtemp(prefix="akms-bench-mig-"))
    state_url = f"sqlite:///{tmp / 'state.db'}"
    platform, settings = build_platform(state_url)
    s3 = clients.aws_client("s3", settings)
    run_tag = uuid.uuid4().hex[:8]
    # The generated data depends on the tenant id: a fixed tag gives every run the same data.
    tenant = f"{TENANT_PREFIX}-{args.tenant_tag or run_tag}" + ("" if data == "synthetic" else f"-{data}")
    rclone_bucket = f"akms-bench-rclone-{run_tag}"
    raw_bucket = f"akms-bench-raw-{run_tag}"
    buckets: list[str] = []
    key_arn: str | None = None
    src = None
    try:
        version = rclone_version()
        if data == "small":
            generated = generate_small_objects(platform, tenant, args.scale_objects, seed=args.seed)
        elif data == "big":
            generated = generate_big_object(platform, tenant, args.scale_big_mib * MIB, seed=args.seed)
        else:
            generated = generate_archive(platform, tenant, records=args.objects, mix=args.mix, seed=args.seed)
        src = platform.location_of(tenant)
        objects, source_bytes = listing_totals(s3, src.bucket, src.prefix)

        s3.create_bucket(Bucket=rclone_bucket)
        buckets.append(rclone_bucket)
        rclone = run_rclone(
            settings,
            src.bucket,
            src.prefix,
            rclone_bucket,
            transfers=args.transfers,
            server_side=args.rclone_server_side,
        )
        rclone_copied = listing_totals(s3, rclone_bucket)
        if rclone.returncode != 0 or rclone_copied != (objects, source_bytes):
            raise SystemExit(
                f"rclone copy incomplete (exit {rclone.returncode}, {rclone_copied} of "
                f"{(objects, source_bytes)}):\n{rclone.stderr[-4000:]}"
            )
        empty_and_delete_bucket(s3, rclone_bucket)  # keep the shared LocalStack small

        s3.create_bucket(Bucket=raw_bucket)
        buckets.append(raw_bucket)
        raw = run_raw(settings, src.bucket, src.prefix, raw_bucket, threads=args.parallel_shards * args.threads)
        raw_copied = listing_totals(s3, raw_bucket)
        if raw.returncode != 0 or raw_copied != (objects, source_bytes):
            raise SystemExit(
                f"raw boto3 copy incomplete (exit {raw.returncode}, {raw_copied} of "
                f"{(objects, source_bytes)}):\n{raw.stderr[-4000:]}"
            )
        empty_and_delete_bucket(s3, raw_bucket)

        key_arn = clients.kms_client(settings).create_key(Description=f"bench {tenant}")["KeyMetadata"]["Arn"]
        from archive_kms.domain.tenants import dedicated_s3_bucket_name

        buckets.append(dedicated_s3_bucket_name(tenant))
        ours_proc, ours = run_ours(state_url, tenant, f"aws-kms://{key_arn}", args)
        if ours["outcome"]["state"] != "completed" or ours["objects"] != objects or ours["bytes"] != source_bytes:
            raise SystemExit(
                f"migration did not complete over the same data: {json.dumps(ours['outcome'])}; "
                f"{ours['objects']} objects / {ours['bytes']} bytes vs {objects} / {source_bytes}"
            )
        copy_s, verify_s = ours["steps"]["copy"], ours["steps"]["verify"]
        result = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "rclone": version},
            "data": {
                "kind": data,
                "records": generated["records"],
                "attachments": generated["attachments"],
                "objects": objects,
                "source_bytes": source_bytes,
                "plaintext_bytes": ours["copy"].get("bytes_plaintext"),
                "mix": args.mix if data == "synthetic" else data,
                "seed": args.seed,
                "generate_seconds": round(generated["seconds"], 3),
            },
            "concurrency": {
                "shards": args.shards,
                "parallel_shards": args.parallel_shards,
                "threads_per_shard": args.threads,
                "in_flight": args.parallel_shards * args.threads,
                "rclone_transfers": args.transfers,
                "rclone_checkers": args.transfers,
                "rclone_server_side": args.rclone_server_side,
            },
            "ours": {
                "verify_mode": ours["verify"].get("mode", "read-back"),
                "copy_seconds": copy_s,
                "verify_seconds": verify_s,
                "end_to_end_seconds": ours["end_to_end_seconds"],
                "process_seconds": ours_proc.seconds,
                "copy_verify_mib_s": rate(source_bytes, copy_s + verify_s),
                "copy_only_mib_s": rate(source_bytes, copy_s),
                "end_to_end_mib_s": rate(source_bytes, ours["end_to_end_seconds"]),
                "peak_rss_bytes": ours_proc.peak_rss_bytes,
                "cpu_seconds": ours_proc.cpu_seconds,
                "rss_method": ours_proc.rss_method,
                "steps": ours["steps"],
                "step_cpu_seconds": ours.get("step_cpu_seconds", {}),
            },
            "rclone": {
                "seconds": rclone.seconds,
                "mib_s": rate(source_bytes, rclone.seconds),
                "peak_rss_bytes": rclone.peak_rss_bytes,
                "cpu_seconds": rclone.cpu_seconds,
                "rss_method": rclone.rss_method,
            },
            "raw_boto3": {
                "seconds": raw.seconds,
                "mib_s": rate(source_bytes, raw.seconds),
                "peak_rss_bytes": raw.peak_rss_bytes,
                "cpu_seconds": raw.cpu_seconds,
            },
        }
        result["ratio"] = result["ours"]["copy_verify_mib_s"] / result["rclone"]["mib_s"]
        result["ratio_copy_only"] = result["ours"]["copy_only_mib_s"] / result["rclone"]["mib_s"]
        result["ratio_end_to_end"] = result["ours"]["end_to_end_mib_s"] / result["rclone"]["mib_s"]
        result["ratio_vs_raw_boto3"] = result["ours"]["copy_verify_mib_s"] / result["raw_boto3"]["mib_s"]
        result["raw_boto3_vs_rclone"] = result["raw_boto3"]["mib_s"] / result["rclone"]["mib_s"]
        return result
    finally:
        still_shared = src.prefix if src is not None else None
        cleanup(settings, s3, tenant, buckets, still_shared, key_arn)
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    d, c, o, rc = r["data"], r["concurrency"], r["ours"], r["rclone"]
    print(f"machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, {r['machine']['rclone']}")
    print(
        f"data: {d['objects']} objects ({d['records']} records, {d['attachments']} attachments, mix {d['mix']}, "
        f"seed {d['seed']}), {d['source_bytes'] / MIB:.1f} MiB stored, generated in {d['generate_seconds']:.1f} s"
    )
    print(
        f"concurrency: ours {c['shards']} shards, {c['parallel_shards']} at a time x {c['threads_per_shard']} "
        f"threads = {c['in_flight']} objects in flight; rclone --transfers {c['rclone_transfers']} "
        f"--checkers {c['rclone_checkers']}{'' if c['rclone_server_side'] else ' --disable Copy'}"
    )
    print()
    print(f"{'':34} {'seconds':>9} {'MiB/s':>9} {'peak RSS MiB':>13}")
    rss_ours, rss_rclone = o["peak_rss_bytes"] / MIB, rc["peak_rss_bytes"] / MIB
    print(
        f"{'ours: copy + verify':34} {o['copy_seconds'] + o['verify_seconds']:9.2f} {o['copy_verify_mib_s']:9.1f} "
        f"{rss_ours:13.1f}"
    )
    print(f"{'ours: copy only':34} {o['copy_seconds']:9.2f} {o['copy_only_mib_s']:9.1f} {'':>13}")
    print(f"{'ours: end to end (13 steps)':34} {o['end_to_end_seconds']:9.2f} {o['end_to_end_mib_s']:9.1f} {'':>13}")
    print(f"{'rclone copy':34} {rc['seconds']:9.2f} {rc['mib_s']:9.1f} {rss_rclone:13.1f}")
    rb = r["raw_boto3"]
    print(
        f"{'raw boto3 GET+PUT (no crypto)':34} {rb['seconds']:9.2f} {rb['mib_s']:9.1f} {rb['peak_rss_bytes'] / MIB:13.1f}"
    )
    print()
    steps = ", ".join(f"{k} {v:.2f}" for k, v in o["steps"].items() if v >= 0.05)
    print(f"our steps (s): {steps}")
    print(f"verify mode: {o['verify_mode']}")
    print(f"ratio ours/rclone (copy + verify): {r['ratio']:.2f}   (goal >= 1.0)")
    print(
        f"ratio ours/raw boto3 (copy + verify): {r['ratio_vs_raw_boto3']:.2f}   (goal >= 0.8); "
        f"raw boto3/rclone: {r['raw_boto3_vs_rclone']:.2f}"
    )
    print(
        f"ratio ours/rclone (copy only): {r['ratio_copy_only']:.2f}   end to end: {r['ratio_end_to_end']:.2f}"
        "   (goal >= 0.7)"
    )
    print(f"peak RSS: ours {rss_ours:.1f} MiB, rclone {rss_rclone:.1f} MiB (measured by {o['rss_method']})")


def _tenant_tag(value: str) -> str:
    if re.fullmatch(r"[a-z0-9]{1,12}", value) is None:
        raise argparse.ArgumentTypeError("a tenant tag is 1-12 lowercase letters or digits")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=400, help="records to generate (attachments come on top)")
    parser.add_argument(
        "--mix",
        choices=("small", "default", "large"),
        default="default",
        help="attachment size mix (synthetic.SizeMix)",
    )
    parser.add_argument("--seed", type=int, default=7)
    # The fan-out defaults are the product's (plan._fanout): 16 objects in flight.
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--parallel-shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4, help="threads per shard")
    parser.add_argument(
        "--transfers",
        type=int,
        default=None,
        help="rclone --transfers and --checkers (default: parallel shards x threads)",
    )
    parser.add_argument(
        "--rclone-server-side",
        action="store_true",
        help="let rclone use S3 server-side copy (no bytes through the client)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--tenant-tag",
        type=_tenant_tag,
        default=None,
        help="fixed tenant id suffix (default: random per run). The data depends on the tenant id "
        "and --seed, so runs with the same tag compare on identical data; one run at a time.",
    )
    parser.add_argument(
        "--verify",
        choices=("attested", "read-back"),
        default=None,
        help="our verify mode (ADR 0018); default: the settings' (ARCHIVE_KMS_MIGRATION_VERIFY, attested)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead of the synthetic archive: 20,000 small records, then one 2 GiB attachment",
    )
    parser.add_argument("--scale-objects", type=int, default=20_000, help=argparse.SUPPRESS)
    parser.add_argument("--scale-big-mib", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--src-bucket", help=argparse.SUPPRESS)
    parser.add_argument("--src-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--dst-bucket", help=argparse.SUPPRESS)
    parser.add_argument("--state-url", help=argparse.SUPPRESS)
    parser.add_argument("--tenant", help=argparse.SUPPRESS)
    parser.add_argument("--key-ref", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.phase == "migrate":
        print(
            json.dumps(
                migrate_phase(
                    args.state_url,
                    args.tenant,
                    args.key_ref,
                    shards=args.shards,
                    parallel_shards=args.parallel_shards,
                    threads=args.threads,
                    verify=args.verify,
                ),
                default=str,
            )
        )
        return 0
    if args.phase == "raw":
        print(json.dumps(raw_phase(args.src_bucket, args.src_prefix, args.dst_bucket, threads=args.threads)))
        return 0
    if args.transfers is None:
        args.transfers = args.parallel_shards * args.threads
    if args.scale:
        results = {"small": compare(args, data="small"), "big": compare(args, data="big")}
        rss = {k: v["ours"]["peak_rss_bytes"] / MIB for k, v in results.items()}
        results["peak_rss_difference_mib"] = abs(rss["small"] - rss["big"])  # type: ignore[assignment]
        if args.json:
            print(json.dumps(results, indent=1, default=str))
        else:
            for kind in ("small", "big"):
                print_table(results[kind])
                print()
            print(
                f"peak RSS ours: {rss['small']:.1f} MiB (20,000 small) vs {rss['big']:.1f} MiB (one big object): "
                f"difference {results['peak_rss_difference_mib']:.1f} MiB   (goal <= 10, both <= 150)"
            )
        return 0
    result = compare(args)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
