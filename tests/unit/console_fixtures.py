"""A console on the in-memory platform for the API tests: two tenants (``acme`` on its own
key after an in-memory enable, ``globex`` managed), a recording run launcher, a settable
clock, and tokens for every role."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.api.app import Console, create_app
from archive_kms.api.auth import TokenKeys, issue_token
from archive_kms.crypto.signing import Signer
from archive_kms.migration import execute, plan_enable, thread_shard_runner, trigger
from archive_kms.migration.launch import Launch, LaunchState
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.console import ConsoleStore
from archive_kms.state.sql import open_state

ACME, GLOBEX = "acme", "globex"


def _now() -> datetime:
    return datetime.now(UTC)


CUSTOMER_KEY = "memory://customer-1"


class RecordingLauncher:
    """A ``RunLauncher`` that records submissions instead of creating flow runs (held to
    the launcher contract in tests/contract/test_run_launcher_contract.py): every
    submission is a flow run that stays ``scheduled`` until ``settle`` is called."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        from archive_kms.migration.launch import DEPLOYMENTS

        self.known_deployments = set(DEPLOYMENTS.values())  # what flows/prefect.yaml deploys
        self._states: dict[str, LaunchState] = {}
        self._lock = threading.Lock()

    def submit(self, deployment: str, parameters: Mapping[str, Any], *, tags: Sequence[str]) -> Launch:
        from archive_kms.errors import ConfigurationError

        if deployment not in self.known_deployments:
            raise ConfigurationError(f"deployment {deployment} is not on the server", resource=deployment)
        flow_run_id = str(uuid.uuid4())
        with self._lock:
            self.submitted.append(
                {"deployment": deployment, "parameters": dict(parameters), "tags": list(tags), "id": flow_run_id}
            )
            now = _now()
            self._states[flow_run_id] = LaunchState(
                flow_run_id, "scheduled", False, created=now, state_since=now, parameters=dict(parameters)
            )
        return Launch(flow_run_id, deployment)

    def launches(self, run_id: str) -> list[LaunchState]:
        with self._lock:
            ids = [s["id"] for s in self.submitted if f"run:{run_id}" in s["tags"]]
            return [self._states[i] for i in reversed(ids)]

    def settle(self, flow_run_id: str, state: str = "completed", message: str | None = None) -> None:
        with self._lock:
            self._states[flow_run_id] = replace(
                self._states[flow_run_id], state=state, terminal=True, message=message, state_since=_now()
            )

    def move(self, flow_run_id: str, state: str, *, since: datetime | None = None) -> None:
        """A worker took the flow run: ``pending`` / ``running`` (not terminal), since ``since``."""
        with self._lock:
            self._states[flow_run_id] = replace(self._states[flow_run_id], state=state, state_since=since or _now())

    def mark_crashed(self, flow_run_id: str, message: str) -> None:
        with self._lock:
            if not self._states[flow_run_id].terminal:
                self._states[flow_run_id] = replace(
                    self._states[flow_run_id], state="crashed", terminal=True, message=message, state_since=_now()
                )


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def _job(tenant: str, job_id: str, count: int = 6) -> JobSpec:
    return JobSpec(job_id, tenant, "synthetic", synthetic={"count": count, "seed": 3, "mix": "small", "workspaces": 1})


def sealed_in_memory_platform(signer: Signer) -> Platform:
    """``Platform.in_memory()`` whose audit chain heads are sealed with ``signer`` (as the
    real wiring seals them with the platform signing key)."""
    from archive_kms.state.audit import SignerHeadSealer
    from archive_kms.state.memory import InMemoryStateStore

    p = Platform.in_memory()
    p.state = InMemoryStateStore(sealer=SignerHeadSealer(signer))
    p.keychain._audit = p.state  # the keychain audits into (and checks its head against) this store
    return p


def console_platform(signer: Signer) -> Platform:
    """acme: archived, then moved onto its own key (in memory); globex: managed, archived."""
    p = sealed_in_memory_platform(signer)
    for t in (ACME, GLOBEX):
        create_tenant(p, t, cloud="s3", provision_storage=False)
        assert submit_job(p.state, _job(t, f"{t}-base"), p.open_archive).decision == "run"
    plan = replace(plan_enable(p, ACME, "byokms", CUSTOMER_KEY), shards=2, parallel_shards=2, cutover_grace_seconds=0)
    run, _ = trigger(p, plan, actor="test")
    out = execute(p, run.run_id, actor="test", shard_runner=thread_shard_runner, handle_signals=False)
    assert out.state == "completed", out
    return p


class ConsoleHarness:
    def __init__(self, tmp_path: Any, platform: Platform | None = None) -> None:
        from fastapi.testclient import TestClient

        self.signer = Signer.generate()
        self.platform = platform or console_platform(self.signer)
        self.state = open_state(f"sqlite:///{tmp_path / 'console.db'}")
        self.store = ConsoleStore(self.state)
        self.launcher = RecordingLauncher()
        self.keys = TokenKeys.generate()
        self.clock = Clock()
        self.console = Console(
            platform=self.platform,
            store=self.store,
            launcher=self.launcher,
            keys=self.keys,
            audit_verifier=self.signer.verifier(),
            clock=self.clock,
            approval_ttl=timedelta(minutes=30),
            auth_failure_limit=5,
        )
        self.app = create_app(self.console)
        self.client = TestClient(self.app, raise_server_exceptions=False)

    def reset(self, tmp_path: Any) -> ConsoleHarness:
        """A fresh platform, console store, launcher, clock and key-state cache under the same
        app (building the FastAPI app is the slow part), for the next test."""
        from archive_kms.api.warnings import (
            AlarmWarnings,
            KeyStateProbe,
            KeyStateWarnings,
            RunWarnings,
            warning_sources,
        )

        self.state.close()
        self.signer = Signer.generate()
        self.platform = console_platform(self.signer)
        self.state = open_state(f"sqlite:///{tmp_path / 'console.db'}")
        self.store = ConsoleStore(self.state)
        self.launcher = RecordingLauncher()
        self.clock = Clock()
        c = self.console
        c.platform, c.store, c.launcher, c.clock = self.platform, self.store, self.launcher, self.clock
        c.audit_verifier = self.signer.verifier()
        c.probe = KeyStateProbe()
        c.warning_sources = [RunWarnings(self.clock), KeyStateWarnings(c.probe), AlarmWarnings(), *warning_sources()]
        return self

    def token(self, role: str, sub: str = "alice", tenant: str | None = ACME) -> str:
        return issue_token(self.keys, subject=sub, role=role, tenant_id=tenant, now=datetime.now(UTC))

    def headers(self, role: str, sub: str = "alice", tenant: str | None = ACME) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sub, tenant)}"}

    def call(
        self, method: str, path: str, role: str | None, *, sub: str = "alice", tenant: str | None = ACME, **kw: Any
    ):
        headers = {**(self.headers(role, sub, tenant) if role else {}), **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def close(self) -> None:
        self.client.close()
        self.state.close()
