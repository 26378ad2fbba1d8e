"""The SQL state store under contention on PostgreSQL (issue #19): transactions the
database aborts to settle a conflict (deadlock, serialization failure) are run again by
the store through ``archive_kms.retry`` and never reach the caller; the connection pool
of a process is bounded by its settings.

- a real deadlock between a store write and another session, detected by PostgreSQL;
- concurrent migration runs (lease, steps, copy ledger), archive jobs (admission, ledger)
  and monitor-like writes (tenant registry, audit records) with the database at
  SERIALIZABLE, where PostgreSQL aborts many of them: every call returns normally, the
  records add up, the audit chain verifies;
- the pool: never more connections than ``size + max_overflow``, and a clear retryable
  error when a caller waits longer than ``timeout`` for one.

Each test gets its own schema on the PostgreSQL server of the state contract suite.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive_kms.errors import TransientError, VersionConflictError
from archive_kms.state.port import (
    AuditEvent,
    CopyRecord,
    CopyStatus,
    Decision,
    Flow,
    KeyMode,
    ManifestEntry,
    RunState,
    StepState,
    TenantRecord,
)
from archive_kms.state.sql import open_state
from archive_kms.state.sql.database import PoolLimits

STEPS = ["preflight", "copy", "verify"]


def _with_options(url: str, *options: str, **query: str) -> str:
    """``url`` with more libpq ``-c`` options (kept after the schema's search_path)."""
    u = make_url(url)
    current = str(u.query.get("options") or "")
    return u.update_query_dict(
        {"options": " ".join([current, *(f"-c {o}" for o in options)]).strip(), **query}
    ).render_as_string(hide_password=False)


def _shared(tid: str) -> dict[str, Any]:
    return {"tenant": tid, "kind": "shared", "cloud": "s3", "bucket": "archive-kms-shared", "prefix": f"tenants/{tid}/"}


def _tenant(store: Any, tid: str) -> TenantRecord:
    return store.create_tenant(
        TenantRecord(tid, KeyMode.MANAGED, _shared(tid), index_alias=f"archive-{tid}", index_generation=1)
    )


def _in_threads(n: int, fn: Callable[[int], Any]) -> list[BaseException]:
    """Run ``fn(i)`` in ``n`` threads started together; the exceptions they raised."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def body(i: int) -> None:
        start.wait()
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return errors


def test_a_deadlock_with_another_session_is_retried_and_never_reaches_the_caller(postgres_url):
    """The store's ``pause`` takes the lease row (FOR SHARE, fenced) and then the gate row;
    another session holds the gate row and then wants the lease row. PostgreSQL detects
    the deadlock in the store's session and aborts that transaction; the store runs
    ``pause`` again, and it succeeds. PostgreSQL checks for a deadlock once per wait, when
    the waiter's deadlock_timeout runs out: the store's (3 s) must run out after the other
    session closed the cycle (well under a second after the store began to wait) and before
    the other's (60 s)."""
    store = open_state(_with_options(postgres_url, "deadlock_timeout=3s"))
    other = create_engine(postgres_url)
    try:
        _tenant(store, "acme")
        run, _ = store.start_run("acme", Flow.ENABLE, mode="byokms", steps=STEPS)
        lease = store.acquire_lease("acme", run.run_id, timedelta(minutes=5))
        before = store.database.aborted_retries
        deadlocks_before = _deadlocks(other)

        with other.connect() as conn:
            tx = conn.begin()
            conn.execute(text("SET LOCAL deadlock_timeout = '60s'"))
            conn.execute(text("SELECT 1 FROM archive_gates WHERE tenant_id = 'acme' FOR UPDATE"))
            outcome: dict[str, Any] = {}

            def pause() -> None:
                try:
                    outcome["gate"] = store.pause("acme", run.run_id, fence=lease.fence)
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    outcome["error"] = exc

            worker = threading.Thread(target=pause)
            worker.start()
            _wait_for_lock_wait(other, "archive_gates")
            # Now wait for the lease row the store's transaction holds FOR SHARE: a cycle.
            conn.execute(text("UPDATE tenant_leases SET expires_at = expires_at WHERE tenant_id = 'acme'"))
            tx.commit()
        worker.join(timeout=60)

        assert "error" not in outcome, f"the deadlock reached the caller: {outcome.get('error')!r}"
        assert outcome["gate"].state.value == "paused"
        assert store.database.aborted_retries >= before + 1
        assert _wait_until(lambda: _deadlocks(other) > deadlocks_before), "PostgreSQL recorded no deadlock"
    finally:
        other.dispose()
        store.close()


def _deadlocks(engine: Any) -> int:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")).scalar()
        )


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _wait_for_lock_wait(engine: Any, table: str, timeout: float = 20.0) -> None:
    """Until some session waits for a row lock (the store's ``pause`` on ``table``)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database() "
        "AND query ILIKE :pattern"
    )
    assert _wait_until(lambda: engine.connect().execute(query, {"pattern": f"%{table}%"}).scalar() > 0, timeout), (
        f"the store's transaction never waited for {table}"
    )


#: Threads per kind of writer, and how much each writes: small enough for CI (a few
#: seconds), large enough that SERIALIZABLE aborts many transactions.
RUN_WRITERS, JOB_WRITERS, MONITOR_WRITERS = 4, 4, 4
OBJECTS_PER_RUN, JOBS_PER_WRITER, MONITOR_ROUNDS = 40, 15, 15


def test_runs_jobs_and_monitor_writes_at_serializable_all_succeed_and_add_up(postgres_url):
    """The database at SERIALIZABLE (libpq option in the state URL): PostgreSQL aborts
    transactions that read what a concurrent one wrote. Every writer's calls return
    normally, and afterwards the run ledgers, job ledger, tenant versions and audit chain
    hold exactly what was written."""
    url = _with_options(postgres_url, "default_transaction_isolation=serializable")
    store = open_state(url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
        tenants = [f"tenant{i}" for i in range(RUN_WRITERS)]
        for tid in tenants:
            _tenant(store, tid)
        monitor_counts: dict[str, int] = {tid: 0 for tid in tenants}
        lock = threading.Lock()

        def run_writer(i: int) -> None:  # one migration run per tenant: lease, steps, manifest, ledger
            tid = tenants[i]
            run, created = store.start_run(tid, Flow.ENABLE, mode="byokms", steps=STEPS)
            assert created
            lease = store.acquire_lease(tid, run.run_id, timedelta(minutes=5))
            names = [f"obj/{n:04d}".encode() for n in range(OBJECTS_PER_RUN)]
            store.update_step(run.run_id, "preflight", StepState.RUNNING, fence=lease.fence)
            store.update_step(run.run_id, "preflight", StepState.COMPLETED, result={}, fence=lease.fence)
            store.create_manifest(run.run_id, _shared(tid), fence=lease.fence)
            store.add_manifest_entries(
                run.run_id,
                [ManifestEntry(n, size=10, shard=k % 2, etag=f"e{k}") for k, n in enumerate(names)],
                fence=lease.fence,
            )
            for step in ("copy", "verify"):
                store.update_step(run.run_id, step, StepState.RUNNING, fence=lease.fence)
                status = CopyStatus.COPIED if step == "copy" else CopyStatus.VERIFIED
                for k in range(0, len(names), 4):
                    store.record_copies(
                        run.run_id,
                        [CopyRecord(n, status, dest_etag="d", dest_size=10) for n in names[k : k + 4]],
                        fence=lease.fence,
                    )
                    lease = store.renew_lease(lease, timedelta(minutes=5))
                store.update_step(run.run_id, step, StepState.COMPLETED, result={}, fence=lease.fence)
            store.append_audit(AuditEvent(actor="run", action="run.complete", tenant_id=tid, run_id=run.run_id))
            store.set_run_state(run.run_id, RunState.COMPLETED, fence=lease.fence)
            assert store.release_lease(lease)

        def job_writer(i: int) -> None:  # archive jobs of every tenant: admission, then completion
            for k in range(JOBS_PER_WRITER):
                tid = tenants[(i + k) % len(tenants)]
                job_id = f"job-{i}-{k}"
                admission = store.admit_job(tid, job_id, {"n": k})
                assert admission.decision is Decision.RUN, admission
                store.finish_job(job_id, admission.attempt, object_count=1)
                store.append_audit(
                    AuditEvent(actor="job", action="job.complete", tenant_id=tid, details={"job": job_id})
                )

        def monitor_writer(i: int) -> None:  # a key-state monitor: read, update the tenant, audit
            for k in range(MONITOR_ROUNDS):
                tid = tenants[(i + k) % len(tenants)]
                while True:
                    current = store.get_tenant(tid)
                    assert current is not None
                    try:
                        store.update_tenant(
                            TenantRecord(
                                tid,
                                current.key_mode,
                                current.location,
                                index_alias=current.index_alias,
                                index_generation=current.index_generation + 1,
                                version=current.version,
                            )
                        )
                        break
                    except VersionConflictError:  # another monitor round won: read again
                        continue
                with lock:
                    monitor_counts[tid] += 1
                store.append_audit(AuditEvent(actor="monitor", action="key.state", tenant_id=tid, details={"k": k}))

        writers: list[Callable[[int], None]] = (
            [run_writer] * RUN_WRITERS + [job_writer] * JOB_WRITERS + [monitor_writer] * MONITOR_WRITERS
        )
        index_of_kind: dict[int, int] = {}
        for n, fn in enumerate(writers):
            index_of_kind[n] = sum(1 for m in range(n) if writers[m] is fn)
        errors = _in_threads(len(writers), lambda n: writers[n](index_of_kind[n]))
        assert not errors, f"{len(errors)} call(s) failed, first: {errors[0]!r}"

        assert store.database.aborted_retries > 0, "SERIALIZABLE aborted nothing: the test did not contend"
        for tid in tenants:
            (run,) = store.list_runs(tid)
            assert run.state is RunState.COMPLETED
            counts = store.copy_counts(run.run_id)
            assert counts.get(CopyStatus.VERIFIED, 0) == OBJECTS_PER_RUN, counts
            assert store.get_tenant(tid).index_generation == 1 + monitor_counts[tid]
        jobs = [store.get_job(f"job-{i}-{k}") for i in range(JOB_WRITERS) for k in range(JOBS_PER_WRITER)]
        assert all(j is not None and j.state.value == "completed" for j in jobs)
        audit = list(store.iter_audit())
        assert len(audit) == RUN_WRITERS + JOB_WRITERS * JOBS_PER_WRITER + MONITOR_WRITERS * MONITOR_ROUNDS
        assert store.verify_audit().ok
        print(f"\nSERIALIZABLE contention: {store.database.aborted_retries} aborted transactions retried, 0 surfaced")
    finally:
        store.close()


def test_a_process_never_holds_more_connections_than_its_pool_allows(postgres_url):
    """16 threads of one process against a pool of 2 + 1: the server never sees more than
    3 of its connections, every call completes."""
    app = f"akms-pool-{uuid.uuid4().hex[:8]}"
    store = open_state(_with_options(postgres_url, application_name=app), pool=PoolLimits(2, 1, 30.0))
    watcher = create_engine(postgres_url)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app")
        with watcher.connect() as conn:
            while not done.is_set():
                seen.append(int(conn.execute(query, {"app": app}).scalar()))
                conn.commit()
                time.sleep(0.005)

    try:
        _tenant(store, "acme")
        observer = threading.Thread(target=watch)
        observer.start()
        errors = _in_threads(
            16,
            lambda i: [store.append_audit(AuditEvent(actor=f"w{i}", action="x", tenant_id="acme")) for _ in range(10)],
        )
        done.set()
        observer.join()
        assert not errors, errors[:3]
        assert seen and max(seen) <= 3, f"connections seen: max {max(seen)}"
        assert max(seen) >= 2, "the load never used the pool"
        assert store.verify_audit().ok
    finally:
        done.set()
        watcher.dispose()
        store.close()


def test_waiting_longer_than_the_pool_timeout_is_a_retryable_error_naming_the_settings(postgres_url):
    store = open_state(postgres_url, pool=PoolLimits(1, 0, 0.3))
    try:
        _tenant(store, "acme")
        held = store.engine.connect()  # the pool's only connection
        try:
            started = time.monotonic()
            with pytest.raises(TransientError, match="state_pool_size=1, state_pool_max_overflow=0") as err:
                store.get_tenant("acme")
            assert err.value.retryable and time.monotonic() - started < 10
        finally:
            held.close()
        assert store.get_tenant("acme") is not None  # the pool serves again once the connection is back
    finally:
        store.close()


def test_the_platform_sizes_its_pool_from_settings(postgres_url, tmp_path):
    from archive_kms.config import Settings
    from archive_kms.operations.platform import Platform

    settings = Settings(
        state_url=postgres_url,
        state_pool_size=3,
        state_pool_max_overflow=2,
        state_pool_timeout_seconds=7,
        keychain_signing_key_path=None,
        elasticsearch_url="http://127.0.0.1:1",
        aws_endpoint_url=None,
        azure_blob_connection_string=None,
    )
    platform = Platform.from_settings(settings)
    try:
        pool = platform.state.engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 2, 7)  # type: ignore[attr-defined]
    finally:
        platform.state.close()


@pytest.mark.parametrize(
    "size,overflow,timeout", [(0, 0, 1.0), (1, -1, 1.0), (1, 0, 0.0)], ids=["no-size", "negative-overflow", "no-wait"]
)
def test_pool_limits_refuse_values_that_cannot_work(size, overflow, timeout):
    from archive_kms.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="state store pool"):
        PoolLimits(size, overflow, timeout)
