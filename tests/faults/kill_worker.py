"""The worker of the random-kill trials (``test_random_kills.py``), run in a child process
forked from a multiprocessing fork server that has already imported everything (a trial
then costs a fork, not a Python start-up).

``run_flow`` executes one enable or remove run of a tenant on the real services, on the
trial's state store. It may be killed (SIGKILL) two ways:

* by the parent, after a delay (``mode="clock"``): a truly random instant, whatever the
  worker is doing (a CPU loop, a sleep, a half-written buffer);
* by itself, at its ``kill_at``-th I/O event (``mode="io"``): every socket write (S3, KMS,
  Azure, Elasticsearch, Key Vault, KMIP, PostgreSQL through Python sockets) and every SQL
  statement counts as one, and the kill comes *before* that event is carried out. Unlike
  the named crash points (``archive_kms.crashpoints``) these fall anywhere: between a
  request's headers and its body, between two statements of one transaction, between
  an upload part and the next.

The child reports what it did (its outcome, or nothing if killed) through a pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
from dataclasses import replace
from typing import Any

import azure.storage.blob
import boto3
import botocore.loaders
import elasticsearch
import kmip.pie.client
from sqlalchemy import event
from sqlalchemy.engine import Engine

import archive_kms.keys.aws_kms
import archive_kms.keys.azure_key_vault
import archive_kms.keys.kmip
import archive_kms.migration.copying
import archive_kms.migration.steps
import archive_kms.search.elasticsearch
import archive_kms.state.sql
import archive_kms.storage.azure_blob
import archive_kms.storage.s3  # noqa: F401 - preloaded by the fork server
from archive_kms.migration import execute, plan_enable, plan_remove, thread_shard_runner, trigger
from archive_kms.operations.platform import Platform

# Imported once by the fork server: a trial's worker then starts in milliseconds. botocore
# reads its service models from JSON for every new session; keep what it read.
_load_file = botocore.loaders.JSONFileLoader.load_file
_cache: dict[Any, Any] = {}


def _cached_load_file(self: Any, file_path: str, *args: Any) -> Any:
    key = (file_path, *args)
    if key not in _cache:
        _cache[key] = _load_file(self, file_path, *args)
    return _cache[key]


botocore.loaders.JSONFileLoader.load_file = _cached_load_file
for _service in ("s3", "kms"):
    boto3.Session(region_name="us-east-1").client(_service, endpoint_url="http://127.0.0.1:1")
del azure.storage.blob, elasticsearch, kmip.pie.client


class _Events:
    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.lock = threading.Lock()

    def tick(self, *_args: Any, **_kw: Any) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def _count_io(events: _Events) -> None:
    for cls in (socket.socket, ssl.SSLSocket):
        for name in ("sendall", "send"):
            real = getattr(cls, name)

            def patched(self, *a, _real=real, **k):
                events.tick()
                return _real(self, *a, **k)

            setattr(cls, name, patched)
    event.listen(Engine, "before_cursor_execute", events.tick)


def _log_to(path: str | None) -> None:
    """The worker's log records (``archive_kms`` from DEBUG, the rest from INFO) into
    ``path``, line by line as they happen: the parent searches them for secrets (I7)."""
    import logging

    if path is None:
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("archive_kms").setLevel(logging.DEBUG)


def run_flow(
    settings: Any, flow: str, tenant: str, key_ref: str | None, kill_at: int, log_path: str | None, conn: Any
) -> None:
    _log_to(log_path)
    events = _Events(kill_at)
    _count_io(events)
    platform = Platform.from_settings(settings)
    if flow == "enable":
        plan = plan_enable(platform, tenant, "byokms" if key_ref.startswith("aws-kms") else "byokv", key_ref, shards=2)
    else:
        plan = plan_remove(platform, tenant, shards=2)
    plan = replace(plan, cutover_grace_seconds=0.0)
    run, created = trigger(platform, plan, actor=f"trial-worker-{os.getpid()}")
    conn.send(("run", run.run_id, created))
    out = execute(
        platform,
        run.run_id,
        actor=f"trial-worker-{os.getpid()}",
        shard_runner=thread_shard_runner,
        handle_signals=False,
    )
    conn.send(("done", out.to_dict(), events.count))
    conn.close()


def support_action(settings: Any, action: str, run_id: str, step: str | None, start_at: float, conn: Any) -> None:
    """A support engineer's ``resume`` / ``rerun STEP`` in a process of its own, started
    at ``start_at`` (Unix time) so that two of them race for real. Reports the outcome, or
    the error it was refused with."""
    import time

    from archive_kms.errors import ArchiveKmsError
    from archive_kms.migration import rerun, resume

    platform = Platform.from_settings(settings)
    actor = f"support-{os.getpid()}"
    time.sleep(max(0.0, start_at - time.time()))
    try:
        if action == "rerun":
            out = rerun(platform, run_id, step, actor=actor, handle_signals=False)
        else:
            out = resume(platform, run_id, actor=actor, handle_signals=False)
        conn.send(("outcome", out.to_dict()))
    except ArchiveKmsError as exc:
        conn.send(("refused", f"{type(exc).__name__}: {exc}"))
    conn.close()


def second_trigger(settings: Any, tenant: str, key_ref: str, conn: Any) -> None:
    """Another worker asked to enable a tenant whose run is going: trigger, and if it
    was handed the running run, try to execute it too."""
    from archive_kms.errors import ArchiveKmsError

    platform = Platform.from_settings(settings)
    actor = f"second-{os.getpid()}"
    plan = plan_enable(platform, tenant, "byokms", key_ref, shards=2)
    run, created = trigger(platform, plan, actor=actor)
    conn.send(("trigger", run.run_id, created))
    try:
        out = execute(platform, run.run_id, actor=actor, shard_runner=thread_shard_runner, handle_signals=False)
        conn.send(("outcome", out.to_dict()))
    except ArchiveKmsError as exc:
        conn.send(("refused", f"{type(exc).__name__}: {exc}"))
    conn.close()
