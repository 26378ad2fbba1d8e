"""A migration worker in a fresh process, for the kill -9 tests (tests/flows/test_crash_resume.py).

    python tests/flows/worker.py enable TENANT MODE KEYREF [--shards N]
    python tests/flows/worker.py execute RUN          # a run the test already triggered (any flow)
    python tests/flows/worker.py resume RUN [--takeover]
    python tests/flows/worker.py rerun RUN STEP [--takeover]

Runs one engine action on the real services with ``Platform.from_settings(Settings())``:
Settings come from ``ARCHIVE_KMS_*`` (the test passes the state store URL and a short lease
TTL) and the stack's endpoints file. Prints the ``Outcome`` as one JSON line on stdout, or
``{"error": ...}`` and exit 2 for one of our errors. Crash points come from
``ARCHIVE_KMS_CRASH_AT`` (``archive_kms.crashpoints``); the process kills itself there.

``enable`` triggers; only the process that created the run executes it. A trigger that
finds the tenant's run already going reports it (``created: false``) and leaves it to the
worker that owns it: one run, one set of side effects.

Test-only crash point, injected here rather than in the product: ``test:after-upload-part``
(optionally ``@N``) is reached after every successful S3 UploadPart, so a kill there leaves
a multipart upload in flight at the destination (faults A5/I5).

``AKMS_WORKER_START_AT`` (Unix time): start the action at that instant, after the imports
and the platform are ready, so two workers race for real (double trigger).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

AFTER_UPLOAD_PART = "test:after-upload-part"
START_AT_ENV = "AKMS_WORKER_START_AT"


def _arm_upload_part_point() -> None:
    """Reach ``test:after-upload-part`` after each successful UploadPart of any S3 client
    in this process (only when that point is armed: production code paths are untouched)."""
    from botocore.client import BaseClient

    from archive_kms import crashpoints

    if AFTER_UPLOAD_PART not in os.environ.get(crashpoints.ENV, ""):
        return
    original = BaseClient._make_api_call

    def make_api_call(self: BaseClient, operation_name: str, api_params: dict[str, Any]) -> Any:
        response = original(self, operation_name, api_params)
        if operation_name == "UploadPart":
            crashpoints.hit(AFTER_UPLOAD_PART)
        return response

    BaseClient._make_api_call = make_api_call  # type: ignore[method-assign]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worker.py")
    sub = parser.add_subparsers(dest="action", required=True)
    enable = sub.add_parser("enable")
    enable.add_argument("tenant")
    enable.add_argument("mode")
    enable.add_argument("key_ref")
    enable.add_argument("--shards", type=int, default=None)
    execute = sub.add_parser("execute")
    execute.add_argument("run_id")
    resume = sub.add_parser("resume")
    resume.add_argument("run_id")
    resume.add_argument("--takeover", action="store_true")
    rerun = sub.add_parser("rerun")
    rerun.add_argument("run_id")
    rerun.add_argument("step")
    rerun.add_argument("--takeover", action="store_true")
    return parser.parse_args(argv)


def _enable(platform: Any, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    from archive_kms.migration import Outcome, execute, plan_enable, thread_shard_runner, trigger

    plan = plan_enable(platform, args.tenant, args.mode, args.key_ref, shards=args.shards)
    run, created = trigger(platform, plan, actor=actor)
    if not created:
        return Outcome(
            run.run_id,
            run.tenant_id,
            run.flow.value,
            run.state.value,
            created=False,
            message=f"run {run.run_id} is already going for {run.tenant_id}",
        ).to_dict()
    return execute(platform, run.run_id, actor=actor, shard_runner=thread_shard_runner).to_dict()


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("AKMS_WORKER_LOG", "WARNING"),
        stream=sys.stderr,
        format=f"worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    args = _parse(argv)
    _arm_upload_part_point()

    from archive_kms.config import Settings
    from archive_kms.errors import ArchiveKmsError
    from archive_kms.migration import execute, rerun, resume
    from archive_kms.operations.platform import Platform

    actor = f"worker-{os.getpid()}"
    try:
        platform = Platform.from_settings(Settings())
        if START_AT_ENV in os.environ:
            time.sleep(max(0.0, float(os.environ[START_AT_ENV]) - time.time()))
        if args.action == "enable":
            out = _enable(platform, args, actor)
        elif args.action == "execute":
            out = execute(platform, args.run_id, actor=actor).to_dict()
        elif args.action == "resume":
            out = resume(platform, args.run_id, actor=actor, takeover=args.takeover).to_dict()
        else:
            out = rerun(platform, args.run_id, args.step, actor=actor, takeover=args.takeover).to_dict()
    except ArchiveKmsError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
