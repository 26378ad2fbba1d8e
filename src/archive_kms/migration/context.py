"""What a running step sees, and what the engine knows about a kind of run.

- ``RunContext`` (platform, plan, fence, actor, shard runner, progress hooks, stop flag),
  built by the engine (``migration.engine``) and passed to every step.
- ``FlowDefinition``: a kind of run (enable, remove, rotate, erase) as the engine runs it:
  its ordered step names, the function of each step, its point of no return, how its plan
  is read back from the run's params, how it is cancelled and reported
  (``migration.flowdef`` holds the table; docs/adr/0025-one-step-engine-for-every-flow.md).
- ``StepWaiting``: what a step raises when it cannot finish until something outside the run
  happens (a rotation waits for a human's confirmation).

A module of its own so that the steps need nothing from the engine that calls them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from archive_kms.errors import FencedError, StateError
from archive_kms.migration.stopping import StopRequest, StopRequestedError
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, CopyStatus, Fence, ManifestSummary, MigrationRun, TenantRecord

__all__ = ["CancelFn", "FlowDefinition", "Hooks", "RunContext", "ShardRunner", "Step", "StepWaiting"]

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
    plan: Any  # the flow's plan: MigrationPlan (enable, remove), RotationPlan, ErasurePlan
    fence: Fence | None
    actor: str
    shard_runner: ShardRunner
    hooks: Hooks
    _fenced: threading.Event = field(default_factory=threading.Event)
    stop: StopRequest = field(default_factory=StopRequest)
    #: ``time.monotonic()`` of moments this execution passed (``steps.REGISTRY_SWITCHED``):
    #: a later step of the same execution measures waits from them on this process's clock.
    marks: dict[str, float] = field(default_factory=dict)

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


# --- kinds of run -------------------------------------------------------------------------------

#: A step: takes the run context, returns its small JSON result (never key material).
Step = Callable[[RunContext], dict[str, Any]]
#: Undo what a run did before its point of no return: (platform, run, plan, fence) -> what was undone.
CancelFn = Callable[[Platform, MigrationRun, Any, Fence], list[str]]


@dataclass(frozen=True)
class FlowDefinition:
    """One kind of run as the step engine executes it.

    ``steps`` run in order, each once to completion (checkpointed in the state store).
    ``point_of_no_return``: once this step has started, no earlier step may be rerun and the
    run cannot be cancelled (None: every step may be rerun, and cancel is refused only by
    ``cancel`` being None). ``step_functions`` returns the name -> function table (read at
    every call, so a test may wrap an entry). ``plan_from_params`` reads the plan back from
    the run's params. ``cancel`` undoes a run stopped before its point of no return (None:
    the flow cannot be cancelled). Its report registers with ``migration.report.register_report``."""

    flow: str
    steps: tuple[str, ...]
    point_of_no_return: str | None
    plan_from_params: Callable[[Mapping[str, Any]], Any]
    step_functions: Callable[[], Mapping[str, Step]]
    cancel: CancelFn | None = None
    summary: str = ""  # what holds once the point of no return is passed, in words
    rerun_consequence: str = "undo what it did"

    def rerun_refusal(self, run: MigrationRun, from_step: str) -> str | None:
        """Why rerunning ``run`` from ``from_step`` is refused, or None if it may be.
        Completed: the run lives past the point of no return. Started: it may, half way:
        only that step itself (its side effects are conditional) or a later one may rerun."""
        barrier_name = self.point_of_no_return
        if barrier_name is None:
            return None
        barrier = run.step(barrier_name)
        idx, cut = self.steps.index(from_step), self.steps.index(barrier_name)
        if (barrier.state.value == "completed" and idx <= cut) or (barrier.state.value != "pending" and idx < cut):
            first = (
                self.steps[cut + 1]
                if barrier.state.value == "completed" and cut + 1 < len(self.steps)
                else barrier_name
            )
            return (
                f"run {run.run_id} is past {barrier_name} ({self.summary or self.flow}); rerunning {from_step} "
                f"would {self.rerun_consequence}. Rerun from {first} or later"
            )
        return None

    def cancel_refusal(self, run: MigrationRun) -> str | None:
        """Why ``run`` cannot be cancelled, or None."""
        if self.cancel is None:
            return f"{self.flow} runs cannot be cancelled: resume the run (`archive-kms runs resume {run.run_id}`)"
        if self.point_of_no_return is not None and run.step(self.point_of_no_return).state.value != "pending":
            return f"run {run.run_id} has reached {self.point_of_no_return}"
        return None


class StepWaiting(Exception):
    """Raised by a step that cannot finish until something outside the run happens (a
    rotation waits for the customer's confirmation). The engine records the wait in the
    state store (a checkpoint of the step: ``{"waiting": reason, "since": ...}``), keeps
    the run ``running``, releases the lease and returns the outcome ``waiting``; resuming
    the run calls the step again. Not an error: nothing failed."""

    def __init__(self, reason: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = dict(details or {})
