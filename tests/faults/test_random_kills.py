"""kill -9 of a migration worker at random moments, then resume, then I1-I7 (faults D2).

The named crash points (``archive_kms.crashpoints``, ``tests/flows/test_crash_resume.py``)
kill at the places someone thought of. These trials kill anywhere: each trial runs one
enable or remove run of a small tenant in a worker process (``kill_worker.run_flow``,
forked from a fork server that has imported everything) and kills it with SIGKILL

* ``io``: at its K-th I/O event (socket write or SQL statement, ~800 per run), before
  that event happens: in the middle of a request, between two statements of one
  transaction, between an upload part and the next; or
* ``clock``: from outside, after a random delay (a seeded fraction of the chain's latest
  unkilled run, 6 s until one was timed): whatever the worker is doing.

Then this process resumes the run (``resume --takeover``; or triggers it again if the
worker died before creating it) and checks the invariants I1-I7 (``invariants``: data
intact and single at the tenant's location, index == storage, no pending uploads, lease
released, gate open, audit records for every run and every resume, no key material
anywhere it should not be).

Trials run in chains, one tenant per chain, alternating enable and remove (so both flows
are killed everywhere). Even chains are on S3 (BYOKMS) with their state on PostgreSQL,
odd ones on Azure (BYOKV) with their state on SQLite; chains run side by side. Everything a
trial does follows from its seed: the cloud (``seed // 100``), the flow (``seed % 2``:
even = enable) and the kill (``random.Random(seed)``). A failing trial prints its seed;
``ARCHIVE_KMS_SOAK_SEED=<seed>`` runs that trial alone on a fresh tenant (a remove trial
first runs an unkilled enable), and ``ARCHIVE_KMS_SOAK_SEED=<first>-<seed>`` replays its
chain up to it (a tenant with the same history: the number of I/O events of a run grows a
little with it), e.g. ``ARCHIVE_KMS_SOAK_SEED=20000-20060 make soak``. Thread
interleavings inside the worker and the machine's speed (for ``clock`` kills) are not
seeded: an ``io`` kill lands on the same event number, give or take the order of
concurrent shards.

``ARCHIVE_KMS_SOAK_TRIALS`` (default 30, the CI tier; ``make soak`` runs 200),
``ARCHIVE_KMS_SOAK_CHAINS`` (default 3: chains run side by side),
``ARCHIVE_KMS_SOAK_BASE_SEED`` (default 20000: chain c uses seeds base + 100 c + i).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from flows_support import _teardown_tenants, invariants, storage_snapshot

from archive_kms.migration import execute, plan_enable, plan_remove, resume, thread_shard_runner, trigger
from archive_kms.state.port import RunState, StepState

TRIALS = int(os.environ.get("ARCHIVE_KMS_SOAK_TRIALS", "30"))
ONE_SEED = os.environ.get("ARCHIVE_KMS_SOAK_SEED")
BASE_SEED = int(os.environ.get("ARCHIVE_KMS_SOAK_BASE_SEED", "20000"))
CHAINS = int(os.environ.get("ARCHIVE_KMS_SOAK_CHAINS", "3"))
#: I/O events of one run of these tenants, measured: ~850 (enable), ~780 (remove).
MAX_EVENT = 800
#: Seconds a worker's run takes before the chain has timed one (a clock kill falls at a
#: seeded fraction of the chain's latest unkilled run: machines differ fourfold).
FIRST_RUN_ESTIMATE = 6.0
RECORDS = 3
WORKER_TIMEOUT = 180


def cloud_of(seed: int) -> str:
    return "s3" if (seed // 100) % 2 == 0 else "azure"


def flow_of(seed: int) -> str:
    return "enable" if seed % 2 == 0 else "remove"


@dataclass(frozen=True)
class Kill:
    mode: str  # io | clock
    at: int = 0  # io: the event number
    fraction: float = 0.0  # clock: of the run's expected duration

    @classmethod
    def of(cls, seed: int) -> Kill:
        rng = random.Random(seed)
        if rng.random() < 0.7:
            return cls("io", at=rng.randint(1, MAX_EVENT))
        return cls("clock", fraction=round(rng.uniform(0.02, 1.0), 3))

    def delay(self, run_seconds: float) -> float:
        return round(self.fraction * run_seconds, 2)

    def __str__(self) -> str:
        return f"io@{self.at}" if self.mode == "io" else f"clock@{self.fraction:.0%}"


@dataclass
class Chain:
    cloud: str
    tenant: str
    snapshot: dict[bytes, str]
    key_ref: str
    logs: Any  # directory for the workers' logs
    resumes: int = 0
    run_seconds: float = FIRST_RUN_ESTIMATE  # the latest unkilled worker's run


@dataclass
class TrialResult:
    seed: int
    flow: str
    kill: str
    killed: bool
    step: str | None  # where the run was when the worker died
    recovered: str  # how the run was finished: resume | trigger | none
    seconds: float
    problem: str | None = None
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)  # worker, recovery, invariants


@dataclass
class Tally:
    results: list[TrialResult] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, r: TrialResult) -> None:
        with self.lock:
            self.results.append(r)
            print(
                f"trial seed={r.seed} {cloud_of(r.seed)}/{r.flow} kill={r.kill} killed={r.killed} "
                f"at={r.step} recovered={r.recovered} {r.seconds:.1f}s {r.phases}"
                + (f" PROBLEM: {r.problem}" if r.problem else ""),
                file=sys.stderr,
                flush=True,
            )


def _current_step(platform: Any, run_id: str | None) -> str | None:
    if run_id is None:
        return "before-trigger"
    run = platform.state.get_run(run_id)
    if run is None:
        return "before-trigger"
    if run.state is RunState.COMPLETED:
        return "completed"
    return next((s.name for s in run.steps if s.state is not StepState.COMPLETED), "all-steps-done")


def run_trial(ctx, settings, platform, chain: Chain, seed: int) -> TrialResult:
    import kill_worker

    flow, kill = flow_of(seed), Kill.of(seed)
    started = time.monotonic()
    before = {r.run_id for r in platform.state.list_runs(chain.tenant)}
    reader, writer = ctx.Pipe(False)
    log_path = chain.logs / f"trial-{seed}.log"
    proc = ctx.Process(
        target=kill_worker.run_flow,
        args=(settings, flow, chain.tenant, chain.key_ref, kill.at if kill.mode == "io" else 0, str(log_path), writer),
    )
    proc.start()
    writer.close()
    if kill.mode == "clock":
        proc.join(kill.delay(chain.run_seconds))
        if proc.is_alive():
            proc.kill()
    proc.join(WORKER_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"worker still running after {WORKER_TIMEOUT} s")
    messages = []
    while reader.poll():
        try:
            messages.append(reader.recv())
        except EOFError:
            break
    reader.close()
    killed = proc.exitcode == -9
    if not killed:
        assert proc.exitcode == 0, f"worker exited {proc.exitcode} (not killed): {messages}"
        done = next((m for m in messages if m[0] == "done"), None)
        assert done is not None and done[1]["state"] == RunState.COMPLETED.value, f"unkilled worker: {messages}"
    new = [r for r in platform.state.list_runs(chain.tenant) if r.run_id not in before]
    assert len(new) <= 1, f"one trial made {len(new)} runs"
    run_id = new[0].run_id if new else None
    where = _current_step(platform, run_id) if killed else "not-killed"

    recovered = "none"
    worker_seconds = time.monotonic() - started
    if not killed:
        chain.run_seconds = worker_seconds
    if run_id is None:
        # Killed before the run existed: the operator simply starts it again.
        if flow == "remove":
            plan = plan_remove(platform, chain.tenant, shards=2)
        else:
            plan = plan_enable(platform, chain.tenant, _mode(chain), chain.key_ref, shards=2)
        run, created = trigger(platform, replace(plan, cutover_grace_seconds=0.0), actor="trial")
        assert created
        out = execute(platform, run.run_id, actor="trial", shard_runner=thread_shard_runner, handle_signals=False)
        recovered = "trigger"
    elif platform.state.get_run(run_id).state is not RunState.COMPLETED:
        out = resume(platform, run_id, actor="trial", takeover=True, handle_signals=False)
        chain.resumes += 1
        recovered = "resume"
    else:
        out = None
    if out is not None:
        assert out.state == RunState.COMPLETED.value, f"recovery ({recovered}) ended {out.state}: {out.error}"
    recovered_at = time.monotonic()
    worker_log = log_path.read_text(errors="replace") if log_path.exists() else ""
    invariants(platform, chain.tenant, chain.snapshot, resumes=chain.resumes, texts=[worker_log], killed_worker=killed)
    now = time.monotonic()
    return TrialResult(
        seed,
        flow,
        str(kill),
        killed,
        where,
        recovered,
        now - started,
        phases=(
            round(worker_seconds, 1),
            round(recovered_at - started - worker_seconds, 1),
            round(now - recovered_at, 1),
        ),
    )


def _mode(chain: Chain) -> str:
    return "byokms" if chain.cloud == "s3" else "byokv"


@dataclass
class ChainSetup:
    """Builds each chain on its own state store: chain 0 on PostgreSQL (a schema of its own
    on the stack's server), the others on SQLite files (the embedded default, where a
    kill -9 leaves a WAL to recover); and cleans up after."""

    settings: Any
    tmp: Any
    customer_key: Any
    made: list[tuple[Any, str]] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)

    def state_url(self, n: int) -> str:
        if n % 2 == 1 or not self.settings.postgres_url:
            return f"sqlite:///{self.tmp / f'chain{n}.db'}"
        import uuid

        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        schema = f"akms_trials_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self.settings.postgres_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        self.schemas.append(schema)
        url = make_url(self.settings.postgres_url).update_query_dict({"options": f"-c search_path={schema}"})
        return url.render_as_string(hide_password=False)

    def chain(self, cloud: str, n: int) -> tuple[Chain, Any, Any]:
        from archive_kms.operations.platform import Platform

        settings = self.settings.model_copy(update={"state_url": self.state_url(n)})
        platform = Platform.from_settings(settings)
        tenant = archive_small_tenant(platform, cloud)
        self.made.append((platform, tenant))
        key = self.customer_key("byokms" if cloud == "s3" else "byokv", cloud)
        logs = self.tmp / f"chain{n}-logs"
        logs.mkdir(exist_ok=True)
        return Chain(cloud, tenant, storage_snapshot(platform, tenant), key, logs), settings, platform

    def cleanup(self) -> None:
        for platform, tenant in self.made:
            _teardown_tenants(platform, [tenant])
            platform.state.close()
        if self.schemas:
            from sqlalchemy import create_engine, text

            admin = create_engine(self.settings.postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                for schema in self.schemas:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()


def archive_small_tenant(platform: Any, cloud: str) -> str:
    """A managed-key tenant with ``RECORDS`` synthetic records (with attachments)."""
    import uuid

    from archive_kms.operations.archive import JobSpec, submit_job
    from archive_kms.operations.tenants import create_tenant

    tenant = f"k{uuid.uuid4().hex[:8]}"
    create_tenant(platform, tenant, cloud=cloud, actor="test")
    for seed in range(61, 161):
        spec = JobSpec(
            f"{tenant}-seed",
            tenant,
            "synthetic",
            synthetic={"count": RECORDS, "seed": seed, "mix": "small", "workspaces": 2},
        )
        if any(atts for _, atts in spec.materialise()):
            break
    out = submit_job(platform.state, spec, platform.open_archive)
    assert out.decision == "run" and out.attachments > 0, out
    return tenant


@pytest.fixture
def chains(flow_settings, tmp_path, customer_key):
    setup = ChainSetup(flow_settings, tmp_path, customer_key)
    yield setup
    setup.cleanup()


def _settle_for(platform: Any, chain: Chain, seed: int) -> None:
    """Put the chain's tenant where the trial's flow starts (unkilled): managed for an
    enable, on its key for a remove."""
    on_key = platform.state.get_tenant(chain.tenant).key_mode.value != "managed"
    if on_key == (flow_of(seed) == "remove"):
        return
    if on_key:
        plan = plan_remove(platform, chain.tenant, shards=2)
    else:
        plan = plan_enable(platform, chain.tenant, _mode(chain), chain.key_ref, shards=2)
    run, _ = trigger(platform, replace(plan, cutover_grace_seconds=0.0), actor="trial")
    out = execute(platform, run.run_id, actor="trial", shard_runner=thread_shard_runner, handle_signals=False)
    assert out.state == RunState.COMPLETED.value, out.error


def test_random_kill_trials(fork_context, chains, fault_case, request):
    request.getfixturevalue("keyvault")
    tally = Tally()
    if ONE_SEED is not None:
        first, _, last = ONE_SEED.partition("-")
        seeds = list(range(int(first), int(last or first) + 1))
        assert len({cloud_of(s) for s in seeds}) == 1, "a replayed range must stay in one chain (seed // 100)"
        chain, settings, platform = chains.chain(cloud_of(seeds[0]), (seeds[0] // 100) % 2)
        plans = [(chain, settings, platform, seeds)]
    else:
        per_chain = -(-TRIALS // CHAINS)
        assert per_chain <= 100, "at most 100 trials per chain (seeds base + 100 c + i): raise ARCHIVE_KMS_SOAK_CHAINS"
        plans = []
        for c in range(CHAINS):
            first = BASE_SEED + 100 * c
            assert flow_of(first) == "enable", "ARCHIVE_KMS_SOAK_BASE_SEED must be even"
            chain, settings, platform = chains.chain(cloud_of(first), c)
            count = min(per_chain, TRIALS - c * per_chain)
            plans.append((chain, settings, platform, [first + i for i in range(count)]))

    def run_chain(chain: Chain, settings: Any, platform: Any, seeds: list[int]) -> None:
        for seed in seeds:
            started = time.monotonic()
            try:
                _settle_for(platform, chain, seed)
                result = run_trial(fork_context, settings, platform, chain, seed)
            except BaseException as exc:  # noqa: BLE001 - recorded with its seed, reported below
                result = TrialResult(
                    seed,
                    flow_of(seed),
                    str(Kill.of(seed)),
                    False,
                    None,
                    "?",
                    time.monotonic() - started,
                    problem=f"{type(exc).__name__}: {exc}"[:2000],
                )
                # The tenant is in an unknown state: go on with a new one.
                chain.tenant = archive_small_tenant(platform, chain.cloud)
                chains.made.append((platform, chain.tenant))
                chain.snapshot = storage_snapshot(platform, chain.tenant)
                chain.resumes = 0
            tally.add(result)

    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        for f in [pool.submit(run_chain, *plan) for plan in plans]:
            f.result()

    results = tally.results
    killed = [r for r in results if r.killed]
    problems = [r for r in results if r.problem]
    by_step = Counter(r.step for r in killed)
    fault_case.injected("kill -9", len(killed))
    fault_case.note(
        trials=len(results),
        killed=len(killed),
        violations=len(problems),
        kills_by_mode=dict(Counter(r.kill.split("@")[0] for r in killed)),
        kills_by_step=dict(by_step),
        recovered=dict(Counter(r.recovered for r in results)),
        seeds=[r.seed for r in results],
    )
    print(
        f"\nrandom kills: {len(results)} trials, {len(killed)} killed, {len(problems)} violations; "
        f"killed at {dict(by_step)}",
        file=sys.stderr,
    )
    assert not problems, "\n".join(
        f"trial seed={r.seed} ({cloud_of(r.seed)}/{r.flow}, kill {r.kill}) failed: {r.problem}\n"
        f"  replay it: ARCHIVE_KMS_SOAK_SEED={r.seed} make soak; with its chain's history: "
        f"ARCHIVE_KMS_SOAK_SEED={r.seed - r.seed % 100}-{r.seed} make soak"
        for r in problems
    )
    expected = len(plans[0][3]) if ONE_SEED is not None else TRIALS
    assert len(results) == expected, f"{len(results)} trials ran, {expected} planned"
    if ONE_SEED is None:
        assert len(killed) >= TRIALS // 2, f"only {len(killed)} of {TRIALS} trials killed the worker: retune MAX_*"
