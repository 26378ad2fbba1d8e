"""Rotation cost at 1x and 10x the data: same provider calls, same time outside the index rebuild.

    .venv/bin/python bench/bench_rotation.py [--records 200] [--factor 10] [--memory] [--json]

On the stack (`archive-kms stack up`): per size, a fresh tenant on a fresh LocalStack KMS key
(BYOKMS, S3, Elasticsearch, a temporary SQLite state store) archives ``--records`` synthetic
records (then ``--factor`` times as many), the key is rotated (``RotateKeyOnDemand``), the
rotation is detected, the rotate run waits, is confirmed and resumed to completion.
``--memory`` runs the same on the in-memory platform (no services).

Printed per size: the L1 provider calls of the re-wrap (wraps, unwraps), the rotate run's
wall time **excluding** the index steps (``build_index``, ``cutover``, ``cleanup_index``:
proportional to the records, as for any new generation) and the index steps' time; then
the ratios big/small. Targets (issue #14): the same provider calls, time ratio <= 1.2.
Timings are printed, never judged; exit 1 only if the provider calls differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from archive_kms.migration import engine
from archive_kms.migration.rotation_monitor import check_rotation, observe
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import confirm_rotation, issue_confirmation
from archive_kms.operations.tenants import create_tenant

INDEX_STEPS = ("build_index", "cutover", "cleanup_index")


def _platform(memory: bool, folder: Path) -> tuple[Platform, Any]:
    if memory:
        return Platform.in_memory(), None
    from archive_kms import clients
    from archive_kms.config import Settings

    settings = Settings().model_copy(update={"state_url": f"sqlite:///{folder / 'state.db'}"})
    return Platform.from_settings(settings), clients.kms_client(settings)


def one_size(records: int, memory: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        p, kms = _platform(memory, Path(folder))
        tid = f"bench-rot-{uuid.uuid4().hex[:8]}"
        if kms is None:
            key_ref = "memory://bench"
        else:
            key_ref = "aws-kms://" + kms.create_key(Description="bench_rotation")["KeyMetadata"]["Arn"]
        try:
            create_tenant(p, tid, cloud="s3", key_ref=key_ref, provision_storage=not memory, actor="bench")
            for i in range(0, records, 1000):
                spec = JobSpec(
                    f"{tid}-{i}",
                    tid,
                    "synthetic",
                    synthetic={"count": min(1000, records - i), "seed": 1, "offset": i, "mix": "small"},
                )
                assert submit_job(p.state, spec, p.open_archive).decision == "run"
            observe(p, tid)
            if kms is None:
                provider = p.resolve_provider(p.keychain.status(tid).l1_ref)
                provider._kms.rotate(provider._ref.name)
            else:
                kms.rotate_key_on_demand(KeyId=key_ref.removeprefix("aws-kms://"))
            _, rotation, run = check_rotation(p, tid, actor="bench")
            assert engine.execute(p, run.run_id, actor="bench", handle_signals=False).state == engine.WAITING
            confirm_rotation(
                p,
                issue_confirmation(p, tid, rotation.rotation_id, confirmed_by="bench").to_json(),
                tenant_id=tid,
                actor="bench",
            )
            started = time.perf_counter()
            out = engine.resume(p, run.run_id, actor="bench", handle_signals=False)
            wall = time.perf_counter() - started
            assert out.state == "completed", out
            done = p.state.get_run(run.run_id)
            index_seconds = sum(
                (s.finished_at - s.started_at).total_seconds()
                for s in done.steps
                if s.name in INDEX_STEPS and s.started_at and s.finished_at
            )
            rewrap = done.step("rewrap").result
            return {
                "records": records,
                "provider_wraps": rewrap["provider_wraps"],
                "provider_unwraps": rewrap["provider_unwraps"],
                "seconds_excluding_index": round(wall - index_seconds, 3),
                "index_seconds": round(index_seconds, 3),
            }
        finally:
            if kms is not None:
                kms.schedule_key_deletion(KeyId=key_ref.removeprefix("aws-kms://"), PendingWindowInDays=7)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    small = one_size(a.records, a.memory)
    big = one_size(a.records * a.factor, a.memory)
    same_calls = (small["provider_wraps"], small["provider_unwraps"]) == (
        big["provider_wraps"],
        big["provider_unwraps"],
    )
    ratio = big["seconds_excluding_index"] / max(small["seconds_excluding_index"], 1e-6)
    result = {
        "small": small,
        "big": big,
        "same_provider_calls": same_calls,
        "time_ratio_excluding_index": round(ratio, 2),
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in (("1x", small), (f"{a.factor}x", big)):
            print(
                f"{name:>4} {r['records']:>7} records: re-wrap {r['provider_unwraps']} unwrap + {r['provider_wraps']} "
                f"wrap; {r['seconds_excluding_index']:.3f} s excluding the index ({r['index_seconds']:.3f} s index)"
            )
        print(
            f"same provider calls: {same_calls}; time ratio {a.factor}x/1x excluding the index: {ratio:.2f} (target <= 1.2)"
        )
    return 0 if same_calls else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
