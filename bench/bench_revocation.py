"""Revocation targets on the local services (docs/key-lifecycle.md, ADR 0024).

    .venv/bin/python bench/bench_revocation.py [--seconds 5] [--records 20]

Needs `archive-kms stack up`. Uses a throwaway SQLite state store and fresh tenants
(removed from the shared services' point of view only by their unique names). Prints:

1. **The per-use check's cost**: read throughput (``read_record``: S3 GET + decrypt) and
   keychain throughput (``dek_by_id`` from a warm cache) of one customer-key tenant with
   the checks at their defaults (``revocation_check_seconds`` 0.5, key-state check every
   5 s) vs the same process's peer with the checks off (head reused for 10 s, no
   key-state check). Ratio = with / without (target >= 0.95 for reads).
2. **Operator revoke**: a warm reader in another process (10 Hz reads + searches): its first
   refusal after the request, successes after ``revoke`` returned (target 0, first
   refusal within 1 s), and the receipt's components.
3. **Customer-side disable** (LocalStack KMS ``DisableKey``): when the warm process began
   refusing (target within 10 s), and when the provider itself refused unwrap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.revocation import restore_tenant, revoke_tenant
from archive_kms.operations.tenants import create_tenant

PROBE = Path(__file__).resolve().parents[1] / "tests" / "flows" / "probe_reader.py"


def throughput(fn: Any, seconds: float) -> float:
    fn()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return n / seconds


def archived(p: Platform, key_ref: str | None, records: int) -> tuple[str, list[Any]]:
    tid = f"b{uuid.uuid4().hex[:8]}"
    create_tenant(p, tid, cloud="s3", key_ref=key_ref, actor="bench")
    spec = JobSpec(f"{tid}-seed", tid, "synthetic", synthetic={"count": records, "seed": 3, "workspaces": 2})
    submit_job(p.state, spec, p.open_archive)
    return tid, [r for r, _ in spec.materialise()]


def check_cost(base: Settings, key_ref: str, seconds: float, records: int) -> None:
    on = Platform.from_settings(base)
    off = Platform.from_settings(
        base.model_copy(update={"revocation_check_seconds": 10.0, "key_state_check_seconds": 0.0})
    )
    tid, recs = archived(on, key_ref, records)
    r = recs[0]
    dek_id = on.open_archive(tid).keychain.dek_for_encrypt(tid, r.workspace_id).dek_id
    rows = []
    for label, fn_of in (
        ("read_record", lambda p: lambda: p.open_archive(tid).read_record(r.workspace_id, r.object_type, r.record_id)),
        ("dek_by_id", lambda p: lambda: p.keychain.dek_by_id(tid, dek_id)),
    ):
        # alternate the peers twice so drift on a shared machine hits both alike
        with_, without = [], []
        for _ in range(2):
            with_.append(throughput(fn_of(on), seconds / 2))
            without.append(throughput(fn_of(off), seconds / 2))
        a, b = sum(with_) / 2, sum(without) / 2
        rows.append((label, a, b))
    print("1. per-use check cost (checks on = defaults; off = head reused 10 s, no key-state check)")
    for label, a, b in rows:
        print(f"   {label:12} with {a:10.1f}/s   without {b:10.1f}/s   ratio {a / b:5.3f}")


class Probe:
    def __init__(self, settings: Settings, tid: str, rec: Any, out: Path) -> None:
        self.out = out
        env = {**os.environ, "ARCHIVE_KMS_STATE_URL": settings.state_url}
        args = [tid, rec.workspace_id, rec.object_type, rec.record_id, str(out), "--seconds", "300"]
        self.proc = subprocess.Popen([sys.executable, str(PROBE), *args], env=env)
        deadline = time.monotonic() + 120
        while not any("ready" in x for x in self.lines()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the probe process did not get warm: {self.lines()}")
            time.sleep(0.2)

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]

    def first(self, ok: bool, since: float, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = [x for x in self.lines() if "op" in x and x["t"] >= since and x["ok"] is ok]
            if hit:
                return hit[0]
            time.sleep(0.05)
        return None

    def successes(self, since: float) -> int:
        return sum(1 for x in self.lines() if "op" in x and x["t"] >= since and x["ok"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def operator_revoke(p: Platform, tmp: Path, records: int) -> None:
    tid, recs = archived(p, None, records)
    probe = Probe(p.settings, tid, recs[0], tmp / "operator.jsonl")
    try:
        asked = time.time()
        receipt = revoke_tenant(p, tid, actor="bench", reason="bench")
        returned = time.time()
        time.sleep(2)
        first = probe.first(False, asked, 5)
        print("2. operator revoke (managed key), warm reader in another process at 10 Hz")
        print(f"   revoke returned after {returned - asked:.3f} s; receipt ok: {receipt.ok}")
        print(
            f"   first refusal in the warm process: {first['t'] - asked:.3f} s after the request"
            if first
            else "   NO refusal"
        )
        print(f"   successful reads/searches after revoke returned: {probe.successes(returned)}")
        for c in receipt.to_dict()["components"]:
            print(f"   - {c['component']:24} refusing {c['refusing']!s:5} after_commit_ms {c['after_commit_ms']}")
        restore_tenant(p, tid, actor="bench")
        restored = time.time()
        back = probe.first(True, restored, 10)
        print(
            f"   restore: served again {back['t'] - restored:.3f} s after restore returned"
            if back
            else "   NOT served after restore"
        )
    finally:
        probe.stop()


def customer_disable(p: Platform, tmp: Path, records: int) -> None:
    kms = clients.kms_client(p.settings, max_attempts=2)
    arn = kms.create_key(Description="bench_revocation")["KeyMetadata"]["Arn"]
    tid, recs = archived(p, f"aws-kms://{arn}", records)
    probe = Probe(p.settings, tid, recs[0], tmp / "customer.jsonl")
    try:
        disabled = time.time()
        kms.disable_key(KeyId=arn)
        provider = None
        try:
            p.keychain.verify_l1_unwrap(tid)
        except Exception:  # noqa: BLE001 - the refusal is the measurement
            provider = time.time() - disabled
        first = probe.first(False, disabled, 30)
        print("3. customer-side disable (LocalStack KMS DisableKey), default settings")
        print(
            f"   provider refused unwrap: {provider:.3f} s after the disable"
            if provider is not None
            else "   provider still unwraps"
        )
        print(
            f"   warm process refused: {first['t'] - disabled:.2f} s after the disable (target 10 s)"
            if first
            else "   NOT refused within 30 s"
        )
    finally:
        probe.stop()
        kms.enable_key(KeyId=arn)
        kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--records", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-revocation-") as d:
        tmp = Path(d)
        base = Settings().model_copy(update={"state_url": f"sqlite:///{tmp / 'state.db'}"})
        p = Platform.from_settings(base)
        kms = clients.kms_client(base, max_attempts=2)
        arn = kms.create_key(Description="bench_revocation cost")["KeyMetadata"]["Arn"]
        try:
            check_cost(base, f"aws-kms://{arn}", args.seconds, args.records)
        finally:
            kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
        operator_revoke(p, tmp, args.records)
        customer_disable(p, tmp, args.records)


if __name__ == "__main__":
    main()
