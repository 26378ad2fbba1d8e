"""What a running step sees: the run's ``RunContext`` (platform, plan, fence, actor, shard
runner, progress hooks, stop flag), built by the engine (``migration.engine``) and passed to
every step (``migration.steps``). A module of its own so that the steps need nothing from the
engine that calls them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from archive_kms.errors import FencedError, StateError
from archive_kms.migration.plan import MigrationPlan
from archive_kms.migration.stopping import StopRequest, StopRequestedError
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, CopyStatus, Fence, ManifestSummary, MigrationRun, TenantRecord

__all__ = ["Hooks", "RunContext", "ShardRunner"]

log = logging.getLogger(__name__)

#: (platform, run_id, step, shards, fence) -> one result dict per shard
ShardRunner = Callable[[Platform, str, str, Sequence[int], Fence | None], list[dict[str, Any]]]


@dataclass
class Hooks:
    """Callbacks for progress reporting (Prefect artifacts, CLI progress bars)."""

    on_step: Callable[[str, str, dict[str, Any] | None], None] = lambda step, state, result: None
    on_progress: Callable[[str, int, int], None] = lambda step, done, total: None


@dataclass
class RunContext:
    platform: Platform
    run_id: str
    plan: MigrationPlan
    fence: Fence | None
    actor: str
    shard_runner: ShardRunner
    hooks: Hooks
    _fenced: threading.Event = field(default_factory=threading.Event)
    stop: StopRequest = field(default_factory=StopRequest)

    def check(self) -> None:
        """Raise FencedError if the heartbeat lost the lease, StopRequestedError if the run
        was asked to stop (a signal, or the caller), and what the keychain raises if the
        tenant's keys are refused (revoked, or its master key taken away: revoke wins even
        in a step that uses no key; microseconds, docs/key-lifecycle.md)."""
        self.check_fenced()
        if self.stop.is_set():
            raise StopRequestedError(f"run {self.run_id}: {self.stop.reason}", resource=f"run:{self.run_id}")
        self.platform.keychain.check_access(self.plan.tenant_id)

    def run(self) -> MigrationRun:
        """The run as the state store has it now."""
        run = self.platform.state.get_run(self.run_id)
        if run is None:
            raise StateError(f"run {self.run_id} disappeared from the state store", resource=f"run:{self.run_id}")
        return run

    def tenant(self) -> TenantRecord:
        """The run's tenant as the registry has it now."""
        tenant = self.platform.state.get_tenant(self.plan.tenant_id)
        if tenant is None:
            raise StateError(f"tenant {self.plan.tenant_id} disappeared", resource=f"tenant:{self.plan.tenant_id}")
        return tenant

    def manifest_summary(self) -> ManifestSummary:
        """The run's manifest totals (the manifest step made it)."""
        summary = self.platform.state.manifest_summary(self.run_id)
        if summary is None:
            raise StateError(
                f"run {self.run_id} has no manifest: rerun it from the manifest step", resource=f"run:{self.run_id}"
            )
        return summary

    def check_fenced(self) -> None:
        if self._fenced.is_set():
            raise FencedError(
                f"run {self.run_id} lost the lease of tenant {self.plan.tenant_id}; stopping",
                resource=f"run:{self.run_id}",
            )

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def run_shards(self, step: str, shards: Sequence[int]) -> list[dict[str, Any]]:
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_progress, args=(step, stop), daemon=True)
        poller.start()
        try:
            return self.shard_runner(self.platform, self.run_id, step, shards, self.fence)
        finally:
            stop.set()
            poller.join(timeout=5)
            self.report_progress(step)

    def report_progress(self, step: str) -> None:
        summary = self.platform.state.manifest_summary(self.run_id)
        counts = self.platform.state.copy_counts(self.run_id)
        done = counts.get(CopyStatus.VERIFIED, 0)
        if step == "copy":
            done += counts.get(CopyStatus.COPIED, 0)
        self.hooks.on_progress(step, done, summary.entries if summary else 0)

    def _poll_progress(self, step: str, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            try:
                self.report_progress(step)
            except Exception:
                log.debug("progress poll failed", exc_info=True)

    def audit(self, action: str, details: dict[str, Any] | None = None) -> None:
        self.platform.state.append_audit(
            AuditEvent(
                actor=self.actor,
                action=action,
                tenant_id=self.plan.tenant_id,
                run_id=self.run_id,
                details=details or {},
            )
        )
