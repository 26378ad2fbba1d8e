"""A private fleet on the local stack, for the many-tenant trials (issue #19):
``tests/flows/test_fleet.py`` (a few tenants in CI, 100 in ``make scale``) and
``bench/bench_scale.py``.

What it starts, all its own, and stops again:

- a **PostgreSQL database** ``akms_scale_<id>`` in the stack's PostgreSQL server (the state
  store of every process of the fleet), dropped at the end;
- a **Prefect server** on its own port (``localstack/stack.py up --only prefect`` with a
  private stack directory), the work pool ``archive-kms`` and the deployments of
  ``flows/prefect.yaml`` deployed from this checkout;
- **process workers** on the pool (``prefect worker start --limit N``), each one a process
  this harness can ``kill -9`` together with the flow-run processes it started (what a lost
  host looks like), and add later;
- a **reclaimer** (``archive-kms runs reclaim --every S``) that resubmits the runs of a lost
  worker;
- optionally a **Dask cluster** (scheduler + worker processes) the flows' shard tasks use.

Everything else (LocalStack S3+KMS, Azurite, Elasticsearch, the Key Vault emulator, the
KMIP server) is the shared stack's; the tenants the fleet creates (buckets, containers,
indices, customer keys) are removed at the end.

Tenants get mixed clouds and modes (``MIX``), a small synthetic archive each, a fresh
customer key each, and are onboarded through the ``enable`` deployment
(``migration.launch.start_enable`` with the Prefect launcher) all at once. While they run,
a sampler records every process of the fleet (peak RSS of each, which worker started
which flow run) and the slots in use of the run limit; afterwards ``check`` proves every
tenant (0 lost, 0 duplicated, every object decrypted end to end, index == storage), the
audit chain, and that nothing is left running, leased or holding a slot.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive_kms import clients, retry
from archive_kms.config import PROJECT_ROOT, Settings
from archive_kms.errors import ServiceUnavailableError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from customer_keys import CustomerKeyFactory

#: What a trial deploys from flows/prefect.yaml: the onboarding and the reclaimer's resumes.
FLEET_DEPLOYMENTS = ("enable", "support")
PYTHON = sys.executable
ARCHIVE_KMS = str(Path(sys.executable).parent / "archive-kms")
STACK_PY = str(PROJECT_ROOT / "localstack" / "stack.py")
SHARED_STACK = Path(os.environ.get("ARCHIVE_KMS_STACK_DIR", PROJECT_ROOT / ".stack"))

#: (mode, cloud) of tenant i is MIX[i % len(MIX)]: both clouds, every customer-key mode.
MIX = (("byokms", "s3"), ("byokv", "azure"), ("byok", "s3"), ("kmip", "azure"), ("kmip", "s3"))
TERMINAL_RUN_STATES = {"completed", "failed", "cancelled"}
SUBMIT_RETRY = retry.Backoff(max_attempts=6, base_delay=1.0, max_delay=15.0)


@dataclass
class FleetConfig:
    tenants: int
    workers: int = 2
    worker_limit: int = 3  # flow-run processes per worker (prefect worker --limit)
    max_concurrent_runs: int = 4  # the Prefect global concurrency limit archive-kms-runs
    records: int = 8  # synthetic records per tenant (plus their attachments)
    shards: int = 2
    task_runner: str = "threads"
    lease_ttl_seconds: float = 10.0
    #: requests/s per quota domain (settings l1_requests_per_second_*)
    l1_rates: dict[str, float] = field(default_factory=lambda: {"aws_kms": 20.0, "azure_kv": 10.0, "kmip": 10.0})
    prefect_port: int = 14333
    reclaim_every_seconds: float = 5.0
    #: a flow run pending/running this long without its run's lease counts as lost (a killed
    #: worker's queued flow runs); above how long a flow-run process takes to start here
    unstarted_after_seconds: float = 60.0
    dask_address: str | None = None
    label: str = "fleet"


@dataclass
class Tenant:
    tenant_id: str
    mode: str
    cloud: str
    key_ref: str
    objects: int
    stored_bytes: int
    run_id: str | None = None


@dataclass
class ProcessPeak:
    pid: int
    role: str  # worker:<name> | flow-run | prefect-server | dask-worker | harness
    rss_mb: float = 0.0
    flow_run_id: str | None = None
    worker: str | None = None


class Sampler(threading.Thread):
    """Every ``interval`` seconds: the fleet's processes (peak RSS each; which worker
    started which flow run, from the flow-run process's PREFECT__FLOW_RUN_ID) and the
    slots in use of the run limit."""

    def __init__(self, fleet: Fleet, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="fleet-sampler")
        self.fleet, self.interval = fleet, interval
        self.peaks: dict[int, ProcessPeak] = {}
        self.run_slots: list[tuple[float, int]] = []
        self.flow_run_processes: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _note(self, proc: psutil.Process, role: str, worker: str | None = None) -> None:
        try:
            rss = proc.memory_info().rss / 1e6
        except psutil.Error:
            return
        peak = self.peaks.get(proc.pid)
        if peak is None:
            flow_run = None
            if role == "flow-run":
                with contextlib.suppress(psutil.Error):
                    flow_run = proc.environ().get("PREFECT__FLOW_RUN_ID")
            peak = self.peaks[proc.pid] = ProcessPeak(proc.pid, role, flow_run_id=flow_run, worker=worker)
        peak.rss_mb = max(peak.rss_mb, rss)

    def sample(self) -> None:
        flow_runs = 0
        for name, handle in list(self.fleet.workers.items()):
            try:
                proc = psutil.Process(handle.pid)
                self._note(proc, f"worker:{name}", name)
                for child in proc.children(recursive=True):
                    self._note(child, "flow-run", name)
                    flow_runs += 1
            except psutil.Error:
                continue
        for pid, role in self.fleet.extra_processes().items():
            with contextlib.suppress(psutil.Error):
                self._note(psutil.Process(pid), role)
        self._note(psutil.Process(), "harness")
        now = time.monotonic()
        self.flow_run_processes.append((now, flow_runs))
        with contextlib.suppress(Exception):
            self.run_slots.append((now, self.fleet.run_limit()["active_slots"]))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()


class Fleet:
    """Start with ``with Fleet(config) as fleet:``; everything is stopped and removed on exit."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.id = uuid.uuid4().hex[:6]
        self.dir = PROJECT_ROOT / f".fleet-{config.label}-{self.id}"
        self.db = f"akms_scale_{self.id}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.reclaimer: subprocess.Popen[bytes] | None = None
        self.tenants: list[Tenant] = []
        self.killed: dict[str, list[str]] = {}  # worker -> run ids it was executing
        self.dask_pids: dict[int, str] = {}
        self.sampler: Sampler | None = None
        self.timings: dict[str, float] = {}
        self._keys: CustomerKeyFactory | None = None
        self._exit = contextlib.ExitStack()
        self._worker_counter = itertools.count(1)

    # --- settings and environment ---------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config.prefect_port}/api"

    def settings(self) -> Settings:
        return Settings(**self._endpoints, **self._overrides())

    def _overrides(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "lease_ttl_seconds": c.lease_ttl_seconds,
            "max_concurrent_runs": c.max_concurrent_runs,
            **{f"l1_requests_per_second_{k}": v for k, v in c.l1_rates.items()},
        }
        if c.dask_address:
            out["dask_address"] = c.dask_address
        return out

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the fleet: the private stack directory (its
        endpoints file names the private database and Prefect server) and the limits."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ARCHIVE_KMS_"))}
        env.update(
            ARCHIVE_KMS_STACK_DIR=str(self.dir),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_EPHEMERAL_ENABLED="false",
            PREFECT_HOME=str(self.dir / "prefect-home"),
            PREFECT_LOGGING_EXTRA_LOGGERS="archive_kms",
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        for key, value in self._overrides().items():
            env[f"ARCHIVE_KMS_{key.upper()}"] = str(value)
        env.update(extra)
        return env

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        t0 = time.monotonic()
        shared = json.loads((SHARED_STACK / "endpoints.json").read_text())
        self.dir.mkdir(parents=True)
        self._exit.callback(shutil.rmtree, self.dir, True)
        admin_url = make_url(shared["postgres_url"]).set(database="postgres")
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        self._exit.callback(self._drop_database)
        from archive_kms.crypto.signing import Signer

        Signer.create_key_file(self.dir / "keychain-signing.pem")
        self._endpoints = {
            **shared,
            "state_url": make_url(shared["postgres_url"]).set(database=self.db).render_as_string(hide_password=False),
            "prefect_api_url": self.api_url,
            "keychain_signing_key_path": str(self.dir / "keychain-signing.pem"),
        }
        self._exit.callback(self._stop_prefect)
        out = subprocess.run(
            [PYTHON, STACK_PY, "up", "--only", "prefect"],
            env=dict(self.env(), ARCHIVE_KMS_PORT_PREFECT=str(self.config.prefect_port)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"private Prefect server did not start: {out.stderr[-2000:]}")
        self._write_endpoints()  # stack up wrote its own: ours names the shared services
        self.timings["prefect_server_s"] = time.monotonic() - t0
        self._deploy()
        self.platform = self._platform()
        self._keys = CustomerKeyFactory(self.settings())
        self._exit.callback(self._cleanup_tenants)
        from archive_kms.flows.limits import apply_limits

        with self._prefect():
            apply_limits(self.settings())
        for _ in range(self.config.workers):
            self.add_worker()
        self._start_reclaimer()
        self.sampler = Sampler(self)
        self.sampler.start()
        self._exit.callback(self.sampler.stop)
        self.timings["fleet_start_s"] = time.monotonic() - t0

    def _write_endpoints(self) -> None:
        path = self.dir / "endpoints.json"
        path.write_text(json.dumps(self._endpoints, indent=2, sort_keys=True))

    def _platform(self) -> Any:
        from archive_kms.operations.platform import Platform

        return Platform.from_settings(self.settings())

    @contextlib.contextmanager
    def _prefect(self) -> Iterator[None]:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def _deploy(self) -> None:
        import urllib.request

        body = json.dumps({"name": "archive-kms", "type": "process"}).encode()
        req = urllib.request.Request(
            f"{self.api_url}/work_pools/", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with contextlib.suppress(urllib.error.HTTPError):  # 409: exists
            urllib.request.urlopen(req, timeout=30).close()
        out = subprocess.run(
            # only what the trial runs: the scheduled deployments (the key monitor every
            # minute, hourly anchors and retention) would add flow runs that never settle
            [PYTHON, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml"]
            + [arg for name in FLEET_DEPLOYMENTS for arg in ("--name", name)],
            env=self.env(),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"prefect deploy failed: {out.stdout[-1500:]}\n{out.stderr[-1500:]}")

    def add_worker(self, name: str | None = None) -> str:
        """Start a process worker on the pool (its own session, so it can be killed whole)."""
        name = name or f"{self.config.label}-w{next(self._worker_counter)}"
        log = (self.dir / f"worker-{name}.log").open("ab")
        cmd = [PYTHON, "-m", "prefect", "worker", "start", "--pool", "archive-kms", "--type", "process"]
        cmd += ["--limit", str(self.config.worker_limit), "--name", name]
        self.workers[name] = subprocess.Popen(
            cmd, env=self.env(), cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return name

    def _start_reclaimer(self) -> None:
        log = (self.dir / "reclaimer.log").open("ab")
        self.reclaimer = subprocess.Popen(
            [
                ARCHIVE_KMS,
                "runs",
                "reclaim",
                "--every",
                str(self.config.reclaim_every_seconds),
                "--unstarted-after",
                str(self.config.unstarted_after_seconds),
                "--json",
            ],
            env=self.env(),
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def extra_processes(self) -> dict[int, str]:
        out = dict(self.dask_pids)
        pidfile = self.dir / "pids" / "prefect.pid"
        with contextlib.suppress(OSError, ValueError):
            out[int(pidfile.read_text())] = "prefect-server"
        return out

    def close(self) -> None:
        for name in list(self.workers):
            self._kill_tree(self.workers.pop(name).pid, signal.SIGTERM)
        if self.reclaimer is not None:
            self._kill_tree(self.reclaimer.pid, signal.SIGTERM)
            self.reclaimer = None
        self._exit.close()

    @staticmethod
    def _kill_tree(pid: int, sig: int) -> list[int]:
        """Signal ``pid`` and every process below it at once; the pids signalled."""
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        if sig != signal.SIGKILL:
            _, alive = psutil.wait_procs(procs, timeout=15)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        else:
            psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def _stop_prefect(self) -> None:
        subprocess.run(
            [PYTHON, STACK_PY, "down", "--only", "prefect"],
            env=dict(self.env(), ARCHIVE_KMS_PORT_PREFECT=str(self.config.prefect_port)),
            capture_output=True,
            timeout=120,
        )

    def _drop_database(self) -> None:
        with contextlib.suppress(Exception):
            getattr(self, "platform", None) and self.platform.state.close()
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
        self._admin.dispose()

    def state_transactions(self) -> tuple[int, int]:
        """(commits, rollbacks) of the fleet's database so far, every process together
        (PostgreSQL's pg_stat_database, flushed within about a second)."""
        with self._admin.connect() as conn:
            row = conn.execute(
                text("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = :d"), {"d": self.db}
            ).one()
        return int(row[0]), int(row[1])

    # --- tenants --------------------------------------------------------------------------------

    def create_tenants(self, count: int | None = None, *, parallel: int = 4) -> list[Tenant]:
        """``count`` (default ``config.tenants``) more tenants with mixed clouds and modes,
        each with a small archive and a fresh customer key."""
        from archive_kms.operations.archive import JobSpec, submit_job
        from archive_kms.operations.tenants import create_tenant

        t0 = time.monotonic()
        first = len(self.tenants)

        def make(i: int) -> Tenant:
            mode, cloud = MIX[i % len(MIX)]
            tid = f"{self.config.label[:8]}-{self.id}-{i:03d}"
            create_tenant(self.platform, tid, cloud=cloud, actor="fleet")
            spec = JobSpec(
                f"{tid}-seed",
                tid,
                "synthetic",
                synthetic={"count": self.config.records, "seed": i, "mix": "small", "workspaces": 2},
            )
            out = submit_job(self.platform.state, spec, self.platform.open_archive)
            assert out.decision == "run", out
            assert self._keys is not None
            key_ref = self._keys(mode, cloud)
            store = self.platform.store_for(self.platform.location_of(tid))
            infos = list(store.list())
            return Tenant(tid, mode, cloud, key_ref, len(infos), sum(i.size for i in infos))

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            made = list(pool.map(make, range(first, first + (count or self.config.tenants))))
        self.tenants += made
        self.timings["create_tenants_s"] = self.timings.get("create_tenants_s", 0.0) + time.monotonic() - t0
        return made

    def submit(self, tenants: list[Tenant], *, task_runner: str | None = None, restart_clock: bool = True) -> None:
        """Onboard ``tenants`` at once through the enable deployment (``restart_clock``
        False: more tenants of the batch already submitted, whose figures they join)."""
        from archive_kms.flows.launcher import PrefectLauncher

        from archive_kms.migration.launch import start_enable

        launcher = PrefectLauncher(self.api_url)
        if restart_clock:
            self.started_at = time.monotonic()
            self.started_wall = datetime.now(UTC)
            self.transactions_at_start = self.state_transactions()
        for t in tenants:

            def start(t: Tenant = t) -> Any:
                return start_enable(
                    self.platform,
                    launcher,
                    t.tenant_id,
                    t.mode,
                    t.key_ref,
                    actor="fleet",
                    cloud=t.cloud,
                    shards=self.config.shards,
                    task_runner=task_runner or self.config.task_runner,
                )

            # a busy Prefect server (SQLite) may refuse a flow run: start_enable then cancels
            # the run it created, so trying again starts a fresh one (counted in the figures)
            started = retry.call(
                start, backoff=SUBMIT_RETRY, what=f"submit {t.tenant_id}", retry_on=(ServiceUnavailableError,)
            )
            assert started.created, started
            t.run_id = started.run_id

    def runs(self, tenants: list[Tenant]) -> dict[str, Any]:
        return {t.run_id: self.platform.state.get_run(t.run_id) for t in tenants if t.run_id}

    def wait(
        self, tenants: list[Tenant], timeout: float, *, until_completed: int | None = None, poll: float = 2.0
    ) -> None:
        """Until every run of ``tenants`` settled (or ``until_completed`` of them completed)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(tenants)
            done = [r for r in runs.values() if r is not None and r.state.value in TERMINAL_RUN_STATES]
            completed = sum(1 for r in done if r.state.value == "completed")
            if until_completed is not None and completed >= until_completed:
                return
            if until_completed is None and len(done) == len(runs):
                self.finished_at = time.monotonic()
                return
            if time.monotonic() > deadline:
                states: dict[str, int] = defaultdict(int)
                for r in runs.values():
                    states[r.state.value if r else "?"] += 1
                raise TimeoutError(f"runs not settled after {timeout:.0f} s: {dict(states)}; logs in {self.dir}")
            time.sleep(poll)

    # --- workers coming and going ---------------------------------------------------------------

    def runs_executing_on(self, worker: str) -> dict[str, str]:
        """{run id: flow run id} of the runs ``worker``'s flow-run processes are executing
        now: the run holds its tenant's lease and has a step running."""
        out: dict[str, str] = {}
        handle = self.workers.get(worker)
        if handle is None:
            return out
        from prefect.client.orchestration import get_client

        try:
            children = psutil.Process(handle.pid).children(recursive=True)
        except psutil.Error:
            return out
        for child in children:
            try:
                flow_run_id = child.environ().get("PREFECT__FLOW_RUN_ID")
            except psutil.Error:
                continue
            if not flow_run_id:
                continue
            with self._prefect(), get_client(sync_client=True) as client:
                run_id = (client.read_flow_run(flow_run_id).parameters or {}).get("run_id")
            run = self.platform.state.get_run(run_id) if run_id else None
            if run is None or run.state.value != "running":
                continue
            lease = self.platform.state.get_lease(run.tenant_id)
            if lease is None or lease.run_id != run_id:
                continue
            if any(s.state.value == "running" for s in run.steps):
                out[run_id] = flow_run_id
        return out

    def kill_worker_mid_run(self, worker: str, *, timeout: float = 300.0) -> list[str]:
        """Wait until ``worker`` executes at least one run mid-step, then ``kill -9`` it and
        every flow-run process it started, at once. The run ids it was executing."""
        deadline = time.monotonic() + timeout
        while True:
            executing = self.runs_executing_on(worker)
            if executing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker} never executed a run mid-step within {timeout:.0f} s")
            time.sleep(0.5)
        handle = self.workers.pop(worker)
        killed = self._kill_tree(handle.pid, signal.SIGKILL)
        self.killed[worker] = sorted(executing)
        self.timings[f"killed_{worker}_at_s"] = time.monotonic() - self.started_at
        print(
            f"fleet: kill -9 of worker {worker} and its {len(killed) - 1} flow-run process(es), "
            f"executing run(s) {sorted(executing)}",
            flush=True,
        )
        return sorted(executing)

    def flow_runs_by_worker(self) -> dict[str, set[str]]:
        """Worker name -> the flow runs its processes executed (seen by the sampler)."""
        out: dict[str, set[str]] = defaultdict(set)
        for peak in self.sampler.peaks.values() if self.sampler else ():
            if peak.role == "flow-run" and peak.flow_run_id and peak.worker:
                out[peak.worker].add(peak.flow_run_id)
        return out

    # --- limits ---------------------------------------------------------------------------------

    def run_limit(self) -> dict[str, Any]:
        from archive_kms.flows.limits import RUNS_LIMIT
        from prefect.client.orchestration import get_client

        with self._prefect(), get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(RUNS_LIMIT)
        return {"limit": limit.limit, "active_slots": limit.active_slots}

    def l1_acquisitions(self) -> dict[str, list[datetime]]:
        """Limit name -> times of the slots granted (Prefect's ``concurrency-limit.acquired``
        events of the archive-kms-l1:* rate limits)."""
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

        out: dict[str, list[datetime]] = defaultdict(list)
        flt = EventFilter(
            event=EventNameFilter(name=["prefect.concurrency-limit.acquired"]),
            occurred=EventOccurredFilter(since=self.started_wall - timedelta(minutes=1), until=datetime.now(UTC)),
        )
        with self._prefect(), get_client(sync_client=True) as client:
            page = client.request("POST", "/events/filter", json={"filter": flt.model_dump(mode="json"), "limit": 50})
            body = page.json()
            while True:
                for ev in body.get("events", []):
                    name = ev["resource"].get("prefect.resource.name", "")
                    if name.startswith("archive-kms-l1:"):
                        slots = int(ev["resource"].get("slots-acquired", "1"))
                        out[name].extend([datetime.fromisoformat(ev["occurred"])] * slots)
                token = body.get("next_page")
                if not token:
                    break
                body = client._client.get(token).json()
        return out

    # --- after the runs -------------------------------------------------------------------------

    def check(self, tenants: list[Tenant], *, slot_timeout: float = 180.0) -> dict[str, Any]:
        """Every tenant verified, the audit chain verifies, nothing left running, leased or
        holding a slot; the figures of the trial. Raises AssertionError naming what failed."""
        from archive_kms.migration import build_report
        from archive_kms.operations.verification import verify_tenant

        reports = {}
        for t in tenants:
            report = build_report(self.platform, t.run_id)
            assert report["state"] == "completed", (t.tenant_id, report["state"], report["steps"])
            assert report["verification"] == "ok" and report["lost"] == 0 and report["duplicated"] == 0, report
            assert report["objects"] == t.objects, (t.tenant_id, report["objects"], t.objects)
            reports[t.tenant_id] = report

        def verified(t: Tenant) -> dict[str, Any]:
            return verify_tenant(self.platform, t.tenant_id)

        with ThreadPoolExecutor(max_workers=4) as pool:
            for t, v in zip(tenants, pool.map(verified, tenants), strict=True):
                assert v["ok"], (t.tenant_id, v)
                tenant = self.platform.state.get_tenant(t.tenant_id)
                assert tenant.key_mode.value == t.mode and tenant.key_ref, tenant
        audit = self.platform.state.verify_audit()
        assert audit.ok, audit
        running = [r for r in self.platform.state.list_runs(limit=10_000) if r.state.value != "completed"]
        assert not running, [(r.run_id, r.state.value) for r in running]
        held = [t.tenant_id for t in tenants if self.platform.state.get_lease(t.tenant_id) is not None]
        assert not held, f"leases still held: {held}"
        self._check_flow_runs_settled()
        deadline = time.monotonic() + slot_timeout  # a killed run's slot is freed when its Prefect lease ends
        while (slots := self.run_limit()["active_slots"]) and time.monotonic() < deadline:
            time.sleep(2)
        assert slots == 0, f"{slots} slot(s) of archive-kms-runs still held"
        return self.figures(tenants, reports)

    def _check_flow_runs_settled(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

        with self._prefect(), get_client(sync_client=True) as client:
            unsettled = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"])
                    )
                ),
                limit=50,
            )
        assert not unsettled, [(str(r.id), r.name, r.state.type.value) for r in unsettled]

    def figures(self, tenants: list[Tenant], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        wall = self.finished_at - self.started_at
        time.sleep(1.5)  # pg_stat_database is flushed about every second
        commits, rollbacks = (b - a for a, b in zip(self.transactions_at_start, self.state_transactions(), strict=True))
        objects = sum(t.objects for t in tenants)
        peaks = list(self.sampler.peaks.values()) if self.sampler else []

        def peak(role_prefix: str) -> float:
            return round(max((p.rss_mb for p in peaks if p.role.startswith(role_prefix)), default=0.0), 1)

        slots = [s for _, s in (self.sampler.run_slots if self.sampler else [])]
        processes = [n for _, n in (self.sampler.flow_run_processes if self.sampler else [])]
        by_worker = {w: len(ids) for w, ids in sorted(self.flow_runs_by_worker().items())}
        return {
            "tenants": len(tenants),
            "workers": self.config.workers,
            "modes": dict(sorted(_count(t.mode for t in tenants).items())),
            "clouds": dict(sorted(_count(t.cloud for t in tenants).items())),
            "objects": objects,
            "stored_bytes": sum(t.stored_bytes for t in tenants),
            "wall_seconds": round(wall, 1),
            "tenants_per_min": round(len(tenants) / wall * 60, 2),
            "objects_per_s": round(objects / wall, 2),
            "peak_rss_mb": {
                "flow_run_process": peak("flow-run"),
                "worker": peak("worker:"),
                "prefect_server": peak("prefect-server"),
                "dask_worker": peak("dask-worker"),
                "harness": peak("harness"),
            },
            "run_limit": self.config.max_concurrent_runs,
            "max_run_slots_in_use": max(slots, default=0),
            "max_flow_run_processes": max(processes, default=0),
            "flow_runs_by_worker": by_worker,
            "killed": self.killed,
            "timings": {k: round(v, 1) for k, v in self.timings.items()},
            # every process's transactions from submit to the end of the checks (polling and verification included)
            "state_commits": commits,
            "state_rollbacks": rollbacks,  # includes read transactions a pool ends with ROLLBACK
            "state_commits_per_object": round(commits / max(objects, 1), 1),
            "state_commits_per_run": round(commits / max(len(tenants), 1), 1),
            "lost": sum(r["lost"] for r in reports.values()),
            "duplicated": sum(r["duplicated"] for r in reports.values()),
        }

    # --- cleanup --------------------------------------------------------------------------------

    def _cleanup_tenants(self) -> None:
        from archive_kms.search.naming import index_pattern
        from archive_kms.storage import (
            dedicated_azure_location,
            dedicated_s3_location,
            shared_azure_location,
            shared_s3_location,
        )

        s = self.platform.settings
        es = clients.elasticsearch_client(s)

        def clean(tid: str) -> None:
            for loc in (
                shared_s3_location(tid, s.shared_bucket),
                dedicated_s3_location(tid, sse_kms_key_arn=None),
                shared_azure_location(tid, s.shared_azure_account),
                dedicated_azure_location(tid, account=s.shared_azure_account),
            ):
                with contextlib.suppress(Exception):
                    if not self.platform.provisioner.exists(loc):
                        continue
                    store = self.platform.store_for(loc)
                    if loc.cloud.value == "s3" and loc.kind.value == "shared":
                        for info in list(store.list()):
                            store.delete(info.name)
                        store.abort_stale_uploads(timedelta(0))
                    else:
                        self.platform.provisioner.delete(loc, store)
            with contextlib.suppress(Exception):
                es.indices.delete(index=index_pattern(tid), expand_wildcards="all", ignore_unavailable=True)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(clean, [t.tenant_id for t in self.tenants]))
        if self._keys is not None:
            with contextlib.suppress(Exception):
                self._keys.cleanup()


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(out)


def max_in_window(times: list[datetime], window: float) -> int:
    """The most timestamps within any ``window`` seconds."""
    ts = sorted(t.timestamp() for t in times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while t - ts[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


__all__ = ["MIX", "Fleet", "FleetConfig", "Tenant", "max_in_window"]
