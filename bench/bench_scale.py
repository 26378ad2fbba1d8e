"""Many tenants at once: throughput and peak memory at 1 vs 2 workers and 10 vs N tenants.

    .venv/bin/python bench/bench_scale.py [--tenants 100] [--small 10] [--worker-limit 3]
        [--run-limit 4] [--records 8] [--trials A,B,C] [--json]

Needs the stack (`archive-kms stack up`: LocalStack S3+KMS, Azurite, Elasticsearch, the Key
Vault emulator, the KMIP server, PostgreSQL). ``make scale`` runs it with ``--tenants 100``.

Three trials, each on a fleet of its own (``tests/flows/fleet.py``: a private PostgreSQL
database and Prefect server, process workers on the work pool, the reclaimer; the shared
clouds, key servers and Elasticsearch), each onboarding tenants with mixed clouds and modes
(S3/Azure; byokms, byokv, byok, kmip) through the ``enable`` deployment all at once:

    A  1 worker,  ``--small`` tenants
    B  2 workers, ``--small`` tenants
    C  2 workers, ``--tenants`` tenants

Every trial is checked like the fleet test (every tenant verified end to end, 0 lost, 0
duplicated, the audit chain verifies, no run left running, leased or holding a slot), so a
figure is never one of a broken run. Printed per trial: tenants/min and objects/s (from the
submission of the first run to the settling of the last), peak RSS of each kind of process
(a flow-run process, a worker, the Prefect server), state-store transactions per object,
key-service requests per run; then the ratios B/A (a second worker) and C/B (ten times the
tenants). On one machine a second worker adds processes, not cores: B/A shows what the run
limit and the machine allow, not what a second host would add.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "flows"))
from fleet import Fleet, FleetConfig


def trial(label: str, *, tenants: int, workers: int, args: argparse.Namespace) -> dict:
    config = FleetConfig(
        tenants=tenants,
        workers=workers,
        worker_limit=args.worker_limit,
        max_concurrent_runs=args.run_limit,
        records=args.records,
        label=f"bench{label.lower()}",
        prefect_port=14334,  # not the fleet test's (14333): both may run on one machine
    )
    print(f"trial {label}: {workers} worker(s), {tenants} tenants ...", file=sys.stderr, flush=True)
    with Fleet(config) as fleet:
        made = fleet.create_tenants(tenants)
        fleet.submit(made)
        fleet.wait(made, 600 + 30 * tenants)
        figures = fleet.check(made)
        granted = fleet.l1_acquisitions()
    figures["l1_requests_per_run"] = round(sum(len(t) for t in granted.values()) / max(tenants, 1), 1)
    figures["trial"] = label
    print(f"trial {label}: " + json.dumps(figures, sort_keys=True), file=sys.stderr, flush=True)
    return figures


ROW = "{:<6} {:>7} {:>7} {:>9} {:>11} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9}"


def _row(f: dict) -> str:
    rss = f["peak_rss_mb"]
    return ROW.format(
        f["trial"],
        f["workers"],
        f["tenants"],
        f["objects"],
        f["tenants_per_min"],
        f["objects_per_s"],
        rss["flow_run_process"],
        rss["worker"],
        rss["prefect_server"],
        f["state_commits_per_object"],
        f["l1_requests_per_run"],
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--worker-limit", type=int, default=3, help="flow-run processes per worker")
    parser.add_argument("--run-limit", type=int, default=4, help="archive-kms-runs (max_concurrent_runs)")
    parser.add_argument("--records", type=int, default=8, help="synthetic records per tenant")
    parser.add_argument("--trials", default="A,B,C", help="which trials to run (the ratios need all three)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.tenants, args.small, args.worker_limit, args.run_limit, args.records) < 1:
        parser.error("--tenants, --small, --worker-limit, --run-limit and --records must be at least 1")

    wanted = {t.strip().upper() for t in args.trials.split(",") if t.strip()}
    if not wanted or not wanted <= {"A", "B", "C"}:
        parser.error("--trials: a comma-separated subset of A,B,C")
    shapes = {"A": (args.small, 1), "B": (args.small, 2), "C": (args.tenants, 2)}
    done = {name: trial(name, tenants=shapes[name][0], workers=shapes[name][1], args=args) for name in sorted(wanted)}
    if len(done) < 3:  # each trial's figures were printed as it ended
        return
    a, b, c = done["A"], done["B"], done["C"]
    ratios = {
        "B/A tenants_per_min (2 vs 1 worker)": _ratio(b["tenants_per_min"], a["tenants_per_min"]),
        "B/A objects_per_s": _ratio(b["objects_per_s"], a["objects_per_s"]),
        "B/A peak RSS per flow-run process": _ratio(
            b["peak_rss_mb"]["flow_run_process"], a["peak_rss_mb"]["flow_run_process"]
        ),
        "C/B tenants_per_min (N vs small tenants)": _ratio(c["tenants_per_min"], b["tenants_per_min"]),
        "C/B objects_per_s": _ratio(c["objects_per_s"], b["objects_per_s"]),
        "C/B peak RSS per flow-run process": _ratio(
            c["peak_rss_mb"]["flow_run_process"], b["peak_rss_mb"]["flow_run_process"]
        ),
        "C/B peak RSS per worker": _ratio(c["peak_rss_mb"]["worker"], b["peak_rss_mb"]["worker"]),
        "C/B peak RSS of the Prefect server": _ratio(
            c["peak_rss_mb"]["prefect_server"], b["peak_rss_mb"]["prefect_server"]
        ),
        "C/B state transactions per object": _ratio(c["state_commits_per_object"], b["state_commits_per_object"]),
        "C/B state transactions per run": _ratio(c["state_commits_per_run"], b["state_commits_per_run"]),
    }
    if args.json:
        print(json.dumps({"trials": [a, b, c], "ratios": ratios}, sort_keys=True))
        return
    print(
        ROW.format(
            "trial",
            "workers",
            "tenants",
            "objects",
            "tenants/min",
            "objects/s",
            "rss run",
            "rss wkr",
            "rss srv",
            "tx/object",
            "L1 req/run",
        )
    )
    for f in (a, b, c):
        print(_row(f))
    print("(peak RSS in MB: a flow-run process, a worker, the Prefect server)")
    for name, value in ratios.items():
        print(f"{name}: {value}")
    for f in (a, b, c):
        print(f"trial {f['trial']}: " + json.dumps(f, sort_keys=True))


if __name__ == "__main__":
    main()
