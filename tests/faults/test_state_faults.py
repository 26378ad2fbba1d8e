"""State-store faults on PostgreSQL during enable runs (issue 17).

* Connection drops and serialization failures: the run's state store is PostgreSQL (the
  stack's server, a schema of its own) reached through ``tcp_proxy.PgProxy``, which
  frames the wire protocol per statement: it resets the connection before a statement,
  or after the server answered one (a ``COMMIT`` whose answer is lost: the ambiguous
  commit), and answers a statement with SQLSTATE 40001 / 40P01 as a real serialization
  failure or deadlock would reach the driver.
* A restart of PostgreSQL during a run: a private server (``PrivatePostgres``: its own
  data directory and port, ``pg_ctl``), never the shared one.

The oracle: the run completes, or ends failed with a retryable error (resumable), and
a resume completes it; I1-I7 hold after every case.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from flows_support import _teardown_tenants, invariants
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from state_fixtures import ThrowawayPostgres
from tcp_proxy import PgDrop, PgError, PgProxy, SqlNth

from archive_kms.errors import ArchiveKmsError
from archive_kms.migration import execute, plan_enable, resume, thread_shard_runner, trigger
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import RunState

RECORDS = 6


def _archived(platform, cloud: str = "s3") -> tuple[str, dict[bytes, str]]:
    from flows_support import storage_snapshot

    tenant = f"p{uuid.uuid4().hex[:8]}"
    create_tenant(platform, tenant, cloud=cloud, actor="test")
    for seed in range(71, 171):
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
    return tenant, storage_snapshot(platform, tenant)


def _run_enable(platform, tenant: str, key_ref: str):
    """Trigger and execute an enable run as a worker does. Returns (what the worker saw:
    an Outcome, or the exception it died of, and the run id)."""
    plan = replace(plan_enable(platform, tenant, "byokms", key_ref, shards=2), cutover_grace_seconds=0.0)
    try:
        run, created = trigger(platform, plan, actor="test")
        assert created
        return execute(
            platform, run.run_id, actor="test", shard_runner=thread_shard_runner, handle_signals=False
        ), run.run_id
    except ArchiveKmsError as exc:  # the worker died of it; the operator resumes the run
        assert exc.retryable, f"a state-store fault surfaced as a non-retryable error: {exc!r}"
        runs = _when_answering(lambda: platform.state.list_runs(tenant))
        assert len(runs) == 1, f"{len(runs)} runs after a failed trigger"
        return exc, runs[0].run_id


def _when_answering(read, seconds: float = 30.0):
    """``read()`` once the state store answers again (after a restart)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return read()
        except ArchiveKmsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _finish(platform, run_id: str, first) -> int:
    """Resume the run unless it completed; the number of resumes made."""
    if getattr(first, "state", None) == RunState.COMPLETED.value:
        return 0
    if not isinstance(first, Exception):
        assert first.state == RunState.FAILED.value, first
        assert first.error and first.error.split(":", 1)[0] in (
            "TransientError",
            "ServiceUnavailableError",
        ), f"a state-store fault ended the run with a non-retryable error: {first.error}"
    done = _when_answering(lambda: resume(platform, run_id, actor="test", takeover=True, handle_signals=False))
    assert done.state == RunState.COMPLETED.value, done.error
    return 1


# --- the shared PostgreSQL through the proxy ---------------------------------------------------------


@pytest.fixture()
def pg_through_proxy(flow_settings, customer_key) -> Iterator[tuple[PgProxy, object, str]]:
    """(proxy, platform on a fresh schema of the stack's PostgreSQL through the proxy,
    customer key)."""
    url = make_url(flow_settings.postgres_url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    schema = f"akms_faults_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    proxy = PgProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(port=proxy.port).update_query_dict({"options": f"-c search_path={schema}"})
    settings = flow_settings.model_copy(update={"state_url": proxied.render_as_string(hide_password=False)})
    platform = Platform.from_settings(settings)
    made: list[str] = []
    platform.made = made  # type: ignore[attr-defined]
    try:
        yield proxy, platform, customer_key("byokms", "s3")
    finally:
        proxy.set_pg_rules()
        _teardown_tenants(platform, made)
        platform.state.close()
        proxy.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_connection_drops_mid_step(pg_through_proxy, fault_case, monkeypatch):
    """When the run reaches copy, every connection to PostgreSQL is reset (pre-ping
    replaces the pooled ones) and the first ledger write loses its connection after the
    server ran it, inside its transaction (rolled back): the copy step fails resumably.
    The resume then loses the answer to a COMMIT the server carried out (the ambiguous
    commit): that operation fails, the next resume finds its effect in place and
    converges (ledger rows are upserts, step transitions are checked)."""
    from harness import at_step

    proxy, p, key = pg_through_proxy
    tenant, snapshot = _archived(p)
    p.made.append(tenant)

    def start_dropping() -> None:
        proxy.reset_all()
        proxy.set_pg_rules(SqlNth("copy_ledger", PgDrop(after_forward=True), n=1, in_tx=True))

    at_step(monkeypatch, "copy", start_dropping)
    first, run_id = _run_enable(p, tenant, key)
    assert getattr(first, "state", None) == RunState.FAILED.value, first
    assert "copy" in first.message and first.error.startswith("ServiceUnavailableError"), first
    assert proxy.injected["pg PgDrop"] == 1 and proxy.injected["reset-all"] == 1, proxy.injected

    proxy.set_pg_rules(SqlNth("commit", PgDrop(after_forward=True), n=6))
    resumes = 0
    outcome = None
    for _ in range(3):
        resumes += 1
        try:
            outcome = resume(p, run_id, actor="test", takeover=True, handle_signals=False)
        except ArchiveKmsError as exc:
            assert exc.retryable, exc
            continue
        if outcome.state == RunState.COMPLETED.value:
            break
        assert outcome.error.startswith(("ServiceUnavailableError", "TransientError")), outcome
    assert outcome is not None and outcome.state == RunState.COMPLETED.value, outcome
    assert proxy.injected["pg PgDrop"] == 2, proxy.injected
    proxy.set_pg_rules()
    fault_case.note(resumes=resumes)
    invariants(p, tenant, snapshot, resumes=resumes)


def test_serialization_failures_and_deadlocks_mid_step(pg_through_proxy, fault_case):
    """Serialization failures (40001) on a step transition and a ledger batch, deadlocks
    (40P01) on an audit append and a lease renewal, each once, at its n-th occurrence
    (counted across the run and its resumes). Each is a retryable error: the state store
    retries the whole transaction (retry.py) or, past its attempts, fails the step
    resumably with the transaction rolled back; resumes complete the run."""
    proxy, p, key = pg_through_proxy
    tenant, snapshot = _archived(p)
    p.made.append(tenant)
    serialization = PgError("40001", "could not serialize access due to concurrent update (injected)")
    deadlock = PgError("40P01", "deadlock detected (injected)")
    rules = [
        SqlNth("update run_steps", serialization, n=9, in_tx=True),
        SqlNth("copy_ledger", serialization, n=2, in_tx=True),
        SqlNth("insert into audit_log", deadlock, n=6, in_tx=True),
        # n=1: a run renews its lease only if it outlives the heartbeat interval, but always
        # releases it (an UPDATE), so the first update is certain to come.
        SqlNth("update tenant_leases", deadlock, n=1, in_tx=True),
    ]
    proxy.set_pg_rules(*rules)
    first, run_id = _run_enable(p, tenant, key)
    outcome, resumes = first, 0
    while getattr(outcome, "state", None) != RunState.COMPLETED.value:
        if isinstance(outcome, Exception):
            assert outcome.retryable, outcome
        else:
            assert outcome.state == RunState.FAILED.value, outcome
            assert outcome.error.startswith(("TransientError", "ServiceUnavailableError")), outcome.error
            assert "could not serialize" in outcome.error or "deadlock" in outcome.error, outcome.error
        assert resumes < 5, "the run did not converge"
        resumes += 1
        try:
            outcome = resume(p, run_id, actor="test", takeover=True, handle_signals=False)
        except ArchiveKmsError as exc:
            outcome = exc
    proxy.set_pg_rules()
    assert all(r.seen >= r.n for r in rules), [(r.needle, r.seen) for r in rules]
    assert sum(proxy.injected.values()) == len(rules), proxy.injected
    fault_case.note(resumes=resumes)
    invariants(p, tenant, snapshot, resumes=resumes)


# --- a private PostgreSQL, restarted during a run --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres(ThrowawayPostgres):
    """A PostgreSQL of this test only, on a loopback TCP port, restartable."""

    def start(self) -> str:
        self.port = _free_port()
        super().start()
        self._restart_with_tcp()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c max_connections=100"
        )

    def _restart_with_tcp(self) -> None:
        self.restart()

    def restart(self, mode: str = "fast") -> None:
        out = self._run(
            "pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-m", mode,
            "-w", "-t", "60", "-o", self._options(), "restart",
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {out.stderr.strip()[-800:]}")


@pytest.fixture()
def private_postgres(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, str]]:
    server = PrivatePostgres()
    try:
        url = server.start()
    except Exception as exc:  # noqa: BLE001 - must fail loudly, not skip
        server.stop()
        pytest.fail(f"could not start a private PostgreSQL: {exc}", pytrace=False)
    try:
        yield server, url
    finally:
        server.stop()


def test_postgres_restart_during_a_run(private_postgres, flow_settings, customer_key, fault_case, monkeypatch):
    """The state store's server restarts (fast shutdown: every session terminated) while
    the run copies. The run ends completed (the restart fell between transactions) or
    failed resumably (a write met the restart); a resume after the restart completes it."""
    from harness import at_step

    server, url = private_postgres
    settings = flow_settings.model_copy(update={"state_url": url})
    p = Platform.from_settings(settings)
    tenant, snapshot = _archived(p)
    restarted = threading.Event()

    def restart_soon() -> None:
        def go() -> None:
            time.sleep(0.2)
            server.restart("fast")
            restarted.set()

        threading.Thread(target=go, daemon=True).start()

    at_step(monkeypatch, "copy", restart_soon)
    try:
        first, run_id = _run_enable(p, tenant, customer_key("byokms", "s3"))
        assert restarted.wait(60), "the server was not restarted"
        fault_case.injected("postgres restart")
        resumes = _finish(p, run_id, first)
        fault_case.note(first=getattr(first, "state", type(first).__name__), resumes=resumes)
        invariants(p, tenant, snapshot, resumes=resumes)
    finally:
        _teardown_tenants(p, [tenant])
        p.state.close()
