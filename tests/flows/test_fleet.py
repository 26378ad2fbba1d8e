"""Many tenants at once on a fleet of its own (issue #19; ``fleet.py``): PostgreSQL state,
a private Prefect server with process workers on the work pool, the shared clouds, key
servers and Elasticsearch.

- **Many tenants**: tenants with mixed clouds and modes are onboarded at once through the
  ``enable`` deployment. Two workers (``--limit 2`` each) execute them under the Prefect
  global concurrency limit ``archive-kms-runs`` and the per-quota-domain rate limits of the
  key services. Every tenant is verified (0 lost, 0 duplicated, every object decrypted end
  to end, index == storage), the audit chain verifies, nothing is left running, leased or
  holding a slot; the run limit was reached and never exceeded, and no key service received
  more requests in any window than its rate limit allows.
- **Workers come and go**: one worker is killed with ``kill -9`` (with its flow-run
  processes) while it executes a run mid-step; the reclaimer resubmits its runs, another
  worker takes them over (the lease's fencing token grows) and they complete. A worker
  added mid-batch executes work.
- **Shards on Dask**: in the same batch, a few tenants' runs put their copy/verify shard
  tasks on one Dask cluster of two worker processes; a Dask worker is killed mid-shard, and
  Dask runs that shard once more on a live worker (the ledger makes the redo idempotent).

One batch does all three at once (CI time). ``ARCHIVE_KMS_FLEET_TENANTS`` sets how many
tenants run on threads (CI: 6, plus 3 on Dask); ``ARCHIVE_KMS_FLEET_WORKER_LIMIT`` and
``ARCHIVE_KMS_FLEET_RUN_LIMIT`` the flow-run processes per worker and the run limit.
``make scale`` runs the 100-tenant trials (``bench/bench_scale.py``). The figures are
printed as one JSON line (``fleet:``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import Fleet, FleetConfig, max_in_window

from archive_kms.config import PROJECT_ROOT

TENANTS = int(os.environ.get("ARCHIVE_KMS_FLEET_TENANTS", "6"))
WORKER_LIMIT = int(os.environ.get("ARCHIVE_KMS_FLEET_WORKER_LIMIT", "2"))
RUN_LIMIT = int(os.environ.get("ARCHIVE_KMS_FLEET_RUN_LIMIT", "3"))
DASK_TENANTS = 3
#: requests per second per quota domain: low, so that the limits are what paces the key calls
L1_RATES = {"aws_kms": 4.0, "azure_kv": 2.0, "kmip": 2.0}
SETTLE_TIMEOUT_S = 600 + 30 * TENANTS


FLEET_SERVICES = ("localstack", "azurite", "elasticsearch", "keyvault", "kmip", "postgres")


@pytest.fixture(scope="module")
def dask_fleet(stack):
    """The fleet, with a local Dask cluster (2 worker processes) its flows' shard tasks use."""
    from distributed import Client, LocalCluster

    down = [name for name in FLEET_SERVICES if not stack.get(name)]
    if down:
        pytest.fail(f"service(s) {', '.join(down)} not healthy: run `archive-kms stack up`", pytrace=False)

    config = FleetConfig(
        tenants=TENANTS,
        workers=2,
        worker_limit=WORKER_LIMIT,
        max_concurrent_runs=RUN_LIMIT,
        l1_rates=L1_RATES,
        label="fleet",
    )
    fleet = Fleet(config)
    # the deployments load flows/migration.py as the top-level module "migration": the
    # scheduler (in this process) and the Dask workers import it from flows/ (docs/migration-flows.md)
    flows_dir = str(PROJECT_ROOT / "flows")
    if flows_dir not in sys.path:
        sys.path.append(flows_dir)
    import dask
    from archive_kms.flows.migration import LOCAL_DASK_CONFIG  # no worker profiler (a CPython 3.11 deadlock)

    dask.config.set(LOCAL_DASK_CONFIG)
    cluster = LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=2,
        dashboard_address=":0",
        env={
            **{k: v for k, v in fleet.env().items() if k.startswith(("ARCHIVE_KMS_", "PREFECT_"))},
            "PYTHONPATH": os.pathsep.join(filter(None, [flows_dir, os.environ.get("PYTHONPATH")])),
        },
    )
    client = Client(cluster)
    try:
        config.dask_address = cluster.scheduler_address
        with fleet:
            fleet.dask_pids.update({pid: "dask-worker" for pid in _dask_pids(client).values()})
            yield fleet, client
    finally:
        client.close()
        cluster.close()


def test_tenants_onboard_at_once_within_the_fleet_limits_and_survive_a_lost_worker_and_dask_worker(dask_fleet):
    fleet, client = dask_fleet
    tenants = fleet.create_tenants(TENANTS + DASK_TENANTS)
    on_threads, on_dask = tenants[:TENANTS], tenants[TENANTS:]
    # the Dask tenants first, so that their shards run while the batch keeps the fleet busy
    fleet.submit(on_dask, task_runner="dask")
    fleet.submit(on_threads, restart_clock=False)
    with ThreadPoolExecutor(max_workers=1) as pool:
        dask_kill = pool.submit(_kill_a_dask_worker_mid_shard, client, fleet)
        killed = fleet.kill_worker_mid_run("fleet-w1")
        added = fleet.add_worker("fleet-w3")
        key, victim = dask_kill.result(timeout=SETTLE_TIMEOUT_S)
    fleet.wait(tenants, SETTLE_TIMEOUT_S)
    figures = fleet.check(tenants)

    # the lost worker's runs were taken over and completed, each reclaimed once
    assert killed
    for run_id in killed:
        run = fleet.platform.state.get_run(run_id)
        assert run.state.value == "completed", (run_id, run.state)
        audit = [r for r in fleet.platform.state.iter_audit(tenant_id=run.tenant_id) if r.run_id == run_id]
        assert [r.action for r in audit].count("run.reclaim") >= 1, [r.action for r in audit]
    by_worker = fleet.flow_runs_by_worker()
    assert by_worker.get(added), f"the worker added mid-batch executed nothing: {dict(by_worker)}"
    assert by_worker.get("fleet-w2"), dict(by_worker)

    # the run limit was reached and never exceeded (Prefect's count, and the state store's)
    assert 0 < figures["max_run_slots_in_use"] <= RUN_LIMIT, figures
    assert figures["max_run_slots_in_use"] == RUN_LIMIT, f"the run limit never bound: {figures}"
    assert figures["max_flow_run_processes"] > RUN_LIMIT, figures
    overlap = _max_concurrent_steps(fleet, tenants, exclude=set(killed))
    assert overlap <= RUN_LIMIT, f"{overlap} runs executed steps at once, limit {RUN_LIMIT}"

    # no key service got more requests in any window than its rate limit allows
    granted = fleet.l1_acquisitions()
    assert {n.split(":")[1] for n in granted} >= {"aws-kms", "azure-kv", "kmip"}, sorted(granted)
    rates = {"aws-kms": L1_RATES["aws_kms"], "azure-kv": L1_RATES["azure_kv"], "kmip": L1_RATES["kmip"]}
    worst = {}
    for name, times in granted.items():
        rate = rates[name.split(":")[1]]
        burst = max(1, int(rate + 0.999))
        for window in (1.0, 5.0, 20.0):
            seen = max_in_window(times, window)
            assert seen <= burst + rate * window + 1, (name, window, seen, rate)  # +1: event clock granularity
        worst[name] = {
            "requests": len(times),
            "max_in_5s": max_in_window(times, 5.0),
            "allowed_in_5s": burst + rate * 5,
        }
    figures["l1"] = worst
    figures["l1_requests_per_run"] = round(sum(len(t) for t in granted.values()) / len(tenants), 1)

    # shards on Dask: the killed Dask worker's shard ran once more, on a live worker, and
    # every Dask tenant's shards ran on the Dask workers, not in the flow-run processes
    # The scheduler's transitions of the task: (start, finish). The kill takes it out of
    # processing (to released) and it completes (processing -> memory) exactly once; how
    # often it was (re)assigned in between is Dask's business (work stealing moves tasks).
    story = client.story(key)
    moves = [(t[t.index(key) + 1], t[t.index(key) + 2]) for t in story if key in t and len(t) > t.index(key) + 2]
    completed = [m for m in moves if m == ("processing", "memory")]
    lost = [m for m in moves if m[0] == "processing" and m[1] in ("released", "waiting", "no-worker")]
    assert len(completed) == 1, f"shard task {key} completed {len(completed)} time(s): {moves}"
    assert lost and moves.index(lost[0]) < moves.index(completed[0]), f"shard task {key} was not redone: {moves}"
    workers = set(_dask_pids(client).values())
    for t in on_dask:
        report_pids = _shard_pids(fleet, t.run_id)
        assert report_pids and report_pids <= workers | {victim}, (report_pids, workers, victim)
    figures["dask"] = {"tenants": len(on_dask), "killed_dask_worker": victim, "redone": key}
    print("\nfleet: " + json.dumps(figures, sort_keys=True))


def _max_concurrent_steps(fleet: Fleet, tenants: list, *, exclude: set[str]) -> int:
    """Most runs whose steps were executing at one instant, from the state store's step
    times (runs executed once only: a resumed run keeps its last attempt's times)."""
    edges = []
    for t in tenants:
        if t.run_id in exclude:
            continue
        run = fleet.platform.state.get_run(t.run_id)
        starts = [s.started_at for s in run.steps if s.started_at]
        ends = [s.finished_at for s in run.steps if s.finished_at]
        if any(s.attempt > 1 for s in run.steps) or not starts or not ends:
            continue
        edges += [(min(starts).timestamp(), 1), (max(ends).timestamp(), -1)]
    best = current = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        current += delta
        best = max(best, current)
    return best


def _kill_a_dask_worker_mid_shard(client, fleet: Fleet) -> tuple[str, int]:
    """As soon as a shard task is seen executing, kill -9 the Dask worker process
    running it. (the task's key, the killed pid)."""
    import psutil

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        pids = _dask_pids(client)
        for addr, keys in client.processing().items():
            for key in keys:
                # at first sight: on an idle machine a shard of a small tenant runs in a few
                # tenths of a second, so waiting for it to have run a while can miss them all
                if addr in pids:
                    pid = pids[addr]
                    psutil.Process(pid).kill()
                    print(f"fleet: kill -9 of Dask worker {pid} while it executed {key}", flush=True)
                    return key, pid
        time.sleep(0.02)
    raise AssertionError("no shard task executed on the Dask cluster")


def _dask_pids(client) -> dict[str, int]:
    """Dask worker address -> its process id."""
    return dict(client.run(os.getpid))


def _shard_pids(fleet: Fleet, run_id: str) -> set[int]:
    """The processes that ran the run's copy shards, as its flow recorded them (the flow's
    answer lives in its Prefect result: read from the flow-run logs instead)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, LogFilter, LogFilterFlowRunId

    pids: set[int] = set()
    with fleet._prefect(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}"])))
        for fr in runs:
            for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id]))):
                found = re.fullmatch(r"copy shard \d+ ran in process (\d+)", entry.message)
                if found:
                    pids.add(int(found.group(1)))
    return pids
