"""Prefect flows that move a tenant onto its own key (``enable``), back onto the managed
key (``remove``), and let support resume or rerun a run (``support``).

Thin on purpose: planning, the steps, the ledger, leases and fencing all live in
``archive_kms.migration``; a flow only plans, triggers, and calls the step engine with

- a shard runner that submits one Prefect task per copy/verify shard on a task runner:
  Prefect's thread pool (``task_runner="threads"``) or a Dask cluster through prefect-dask
  (``"dask"``: ``settings.dask_address``, else a local cluster of two worker processes);
- hooks that write Prefect logs and artifacts (a progress bar while it runs, then the
  report as a table and a markdown summary).

A shard task gets plain, picklable arguments only (run id, step, shard, fence token) and
builds its own platform from settings once per process, so a Dask worker process needs
nothing from the flow but those arguments. Shard tasks are never retried by Prefect and
never persist results or cache: the copy ledger is the retry mechanism (a failed shard is
recorded; a rerun or resume redoes it).

Entry points: ``run_flow`` (what the CLI calls), the flows themselves, and the
deployments in ``flows/prefect.yaml``.

Stopping (faults D3): the flow function runs in the main thread of its process, so the
engine's SIGTERM/SIGINT handler replaces Prefect's own for as long as a run executes: a
SIGTERM (a runner cancelling a deployment run, a pod being evicted, Ctrl-C) stops the run
at the next object boundary, records it failed and resumable ("stopped by signal"),
releases the lease, and the flow run ends Failed with that message (not Cancelled).
Code that drives a run from another thread stops it with ``stop_run(run_id)``. Prefect's
``on_cancellation`` hooks run only after the flow was interrupted, too late to help.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from archive_kms.flows.limits import PrefectRequestLimiter, run_admission
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from archive_kms.config import Settings
from archive_kms.errors import ArchiveKmsError, ConfigurationError, StateError, ValidationError
from archive_kms.migration import (
    EnableMode,
    Hooks,
    MigrationPlan,
    Outcome,
    build_report,
    cancel,
    execute,
    plan_enable,
    plan_remove,
    progress,
    rerun,
    resume,
    trigger,
)
from archive_kms.migration.engine import REFUSED, get_run, shard_function
from archive_kms.migration.flowdef import ALL_STEPS, definition
from archive_kms.migration.launch import run_tags
from archive_kms.operations.platform import Platform
from archive_kms.state.port import Fence, Flow, RunState
from archive_kms.storage import Cloud

log = logging.getLogger(__name__)


class TaskRunnerKind(str, enum.Enum):
    """Where copy/verify shard tasks run (a dropdown in the Prefect UI)."""

    THREADS = "threads"
    DASK = "dask"


class SupportAction(str, enum.Enum):
    RESUME = "resume"
    RERUN = "rerun"
    CANCEL = "cancel"


#: The steps a rerun may start from (of every flow), as an enum so the Prefect UI offers them.
StepName = enum.Enum("StepName", {s.upper(): s for s in ALL_STEPS}, type=str)  # type: ignore[misc]

TASK_RUNNERS = tuple(k.value for k in TaskRunnerKind)
SUPPORT_ACTIONS = tuple(a.value for a in SupportAction)
#: The local Dask cluster used when no ``dask_address`` is configured: two worker
#: processes (the shard tasks really leave the flow's process), no dashboard port.
LOCAL_DASK_CLUSTER: dict[str, Any] = {
    "n_workers": 2,
    "processes": True,
    "threads_per_worker": 2,
    "dashboard_address": ":0",
}
#: Dask settings the local cluster's workers get (a Nanny passes its process's Dask config
#: to the worker it spawns). The worker's statistical profiler is off: every 10 ms it calls
#: ``sys._current_frames()``, and on CPython 3.11 a garbage collection that starts inside
#: that call can deadlock the whole worker process with the GIL held (every thread waits
#: for it, the shard never ends; seen as a copy step that hung in the test suite). We never
#: read those profiles. A cluster of your own (``dask_address``) needs the same setting:
#: docs/migration-flows.md.
LOCAL_DASK_CONFIG: dict[str, Any] = {"distributed.worker.profile.enabled": False}
#: Fields of a shard result kept in the flow's answer (which process ran which shard).
_SHARD_SUMMARY_FIELDS = ("shard", "pid", "objects", "written", "already", "verified", "failed", "mismatched")


# --- library logs in the flow run logs ---------------------------------------------------------

#: Library loggers whose records go to the flow run's logs: deployment runs through
#: ``PREFECT_LOGGING_EXTRA_LOGGERS`` (prefect.yaml and the worker's environment set it),
#: in-process runs through ``_library_logs``.
LIBRARY_LOGGERS = ("archive_kms",)


def _library_log_level() -> None:
    """Let INFO records of the library through (Prefect's root logger stops at WARNING)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


# --- one platform per process -----------------------------------------------------------------

_platforms: dict[tuple[int, str], Platform] = {}
_platforms_lock = threading.Lock()


def process_platform(settings: Settings | None = None) -> Platform:
    """This process's platform for ``settings`` (default: the environment), built once,
    its key-service requests bounded by the fleet's Prefect rate limits (``flows.limits``).

    Keyed by process id, so a forked worker never reuses its parent's connections, and by
    the settings (secrets masked), so a process whose configuration changed gets a new one."""
    settings = settings or Settings()
    _library_log_level()
    key = (os.getpid(), settings.model_dump_json())
    with _platforms_lock:
        platform = _platforms.get(key)
        if platform is None:
            # every request to a key service passes the fleet's rate limit of its quota domain
            platform = Platform.from_settings(settings, request_limiter=PrefectRequestLimiter(settings))
            _platforms[key] = platform
        return platform


# --- shard tasks ------------------------------------------------------------------------------


@task(
    name="migration-shard", task_run_name="{step}-shard-{shard}", retries=0, persist_result=False, cache_policy=NO_CACHE
)
def shard_task(run_id: str, step: str, shard: int, tenant_id: str | None, fence_token: int | None) -> dict[str, Any]:
    """Copy or verify one shard in whatever process the task runner chose."""
    fence = Fence(tenant_id, fence_token) if tenant_id is not None and fence_token is not None else None
    result = shard_function(step)(process_platform(), run_id, shard, fence)
    return {**result, "pid": os.getpid()}


class PrefectShardRunner:
    """The engine's ``ShardRunner``: one ``shard_task`` per shard on ``task_runner``.

    On the thread pool at most the plan's ``parallel_shards`` shards are in flight (they
    share this process's memory and connections, like the engine's own thread runner); a
    Dask cluster gets every shard at once and its worker threads bound the concurrency.
    Waits for every shard before raising the first error, so no shard is still writing
    when the engine records the step as failed."""

    def __init__(self, task_runner: TaskRunner) -> None:
        self.task_runner = task_runner
        self.ran: dict[str, list[dict[str, Any]]] = {}

    def _window(self, platform: Platform, run_id: str) -> int | None:
        if not isinstance(self.task_runner, ThreadPoolTaskRunner):
            return None
        return MigrationPlan.from_params(get_run(platform, run_id).params).parallel_shards

    def __call__(
        self, platform: Platform, run_id: str, step: str, shards: Sequence[int], fence: Fence | None
    ) -> list[dict[str, Any]]:
        window = self._window(platform, run_id)
        futures: list[PrefectFuture[dict[str, Any]]] = []
        in_flight: set[PrefectFuture[dict[str, Any]]] = set()
        for shard in shards:
            if window is not None and len(in_flight) >= window:
                in_flight.discard(next(as_completed(list(in_flight))))
            future = self.task_runner.submit(
                shard_task,
                {
                    "run_id": run_id,
                    "step": step,
                    "shard": shard,
                    "tenant_id": fence.tenant_id if fence else None,
                    "fence_token": fence.token if fence else None,
                },
            )
            futures.append(future)
            in_flight.add(future)
        for future in futures:
            future.wait()
        results = [future.result() for future in futures]  # raises the first shard's error
        self.ran.setdefault(step, []).extend({k: r[k] for k in _SHARD_SUMMARY_FIELDS if k in r} for r in results)
        logger = _run_logger()
        for r in results:  # where each shard ran (a Dask worker, or this process): for support
            logger.info("%s shard %s ran in process %s", step, r.get("shard"), r.get("pid"))
        return results


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger, or this module's outside a flow run."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError: called outside a run
        return log


def task_runner_for(name: str, settings: Settings | None = None) -> TaskRunner:
    """A fresh task runner of kind ``name`` ("threads" | "dask")."""
    if name == "threads":
        return ThreadPoolTaskRunner()
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigurationError("--task-runner dask needs prefect-dask: install archive-kms[dask]") from None
        address = getattr(settings or Settings(), "dask_address", None)
        if address:
            return DaskTaskRunner(address=address)
        import dask

        # set for the process (not a context): the cluster, and the Nannies that hand the
        # config to the workers, are started later, when the flow enters the runner
        dask.config.set(LOCAL_DASK_CONFIG)
        return DaskTaskRunner(cluster_kwargs=dict(LOCAL_DASK_CLUSTER))
    raise ValidationError(f"unknown task runner {name!r}: use one of {', '.join(TASK_RUNNERS)}")


def _is_kind(runner: Any, name: str) -> bool:
    if name == "threads":
        return isinstance(runner, ThreadPoolTaskRunner)
    return type(runner).__name__ == "DaskTaskRunner"


@contextlib.contextmanager
def _shard_runner(name: str) -> Iterator[PrefectShardRunner]:
    """Shard tasks on the flow's own task runner when it is of kind ``name`` (``run_flow``
    selects it with ``with_options``); otherwise (a deployment run, or a direct call with
    the default runner) on a runner of that kind started for this flow run."""
    ctx = FlowRunContext.get()
    current = ctx.task_runner if ctx is not None else None
    if current is not None and _is_kind(current, name):
        yield PrefectShardRunner(current)
        return
    with task_runner_for(name) as runner:
        yield PrefectShardRunner(runner)


# --- progress and report artifacts ---------------------------------------------------------------


def artifact_key(tenant_id: str, suffix: str = "") -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes: tenant ids are
    exactly that (domain.tenants rule)."""
    return f"migration-{tenant_id}" + (f"-{suffix}" if suffix else "")


class ArtifactReporter:
    """The engine's hooks: step lines in the flow log and one progress artifact updated as
    steps complete and objects are copied/verified. Never fails the run: progress is
    best effort (the state store is the truth, ``archive-kms runs show`` reads it)."""

    def __init__(self, platform: Platform, run_id: str) -> None:
        run = get_run(platform, run_id)
        self.tenant_id, self.run_id = run.tenant_id, run_id
        self.logger = get_run_logger()
        self._steps_done = progress(platform, run)["steps_done"]
        self._steps_total = len(definition(run.flow).steps)
        self._lock = threading.Lock()
        self._last: tuple[float, str] | None = None
        # hooks run on the engine's progress thread too: give it this flow's Prefect context
        self._context = contextvars.copy_context()
        self._artifact_id = create_progress_artifact(
            progress=self._percent(),
            key=artifact_key(self.tenant_id, "progress"),
            description=self._describe(f"{self._steps_done}/{self._steps_total} steps done"),
        )

    def hooks(self) -> Hooks:
        return Hooks(on_step=self.on_step, on_progress=self.on_progress)

    def _percent(self, fraction_of_step: float = 0.0) -> float:
        return round(min(100.0, 100.0 * (self._steps_done + fraction_of_step) / self._steps_total), 1)

    def _describe(self, what: str) -> str:
        return f"run {self.run_id} of tenant {self.tenant_id}: {what}"

    def _update(self, percent: float, what: str) -> None:
        with self._lock:
            if self._last == (percent, what):
                return
            self._last = (percent, what)
            try:
                self._context.copy().run(
                    update_progress_artifact,
                    artifact_id=self._artifact_id,
                    progress=percent,
                    description=self._describe(what),
                )
            except Exception:
                log.warning("could not update the progress artifact of run %s", self.run_id, exc_info=True)

    def on_step(self, step: str, state: str, result: dict[str, Any] | None) -> None:
        if state == "completed":
            self._steps_done += 1
            seconds = (result or {}).get("seconds")
            self.logger.info("step %s completed in %s s", step, seconds)
        elif state == "failed":
            self.logger.error("step %s failed: %s", step, (result or {}).get("error"))
        else:
            self.logger.info("step %s %s", step, state)
        self._update(self._percent(), f"step {step} {state}")

    def on_progress(self, step: str, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        verb = "copied" if step == "copy" else "verified"
        self._update(self._percent(fraction), f"{step}: {done}/{total} objects {verb}")

    def finish(self, outcome: Outcome, report: dict[str, Any]) -> None:
        """The final report as a table and a markdown summary."""
        key = artifact_key(self.tenant_id)
        self._update(self._percent(), f"{outcome.state}: {outcome.message}")
        create_table_artifact(
            table=report_table(report),
            key=f"{key}-report",
            description=f"{report['flow']} run {report['run_id']}: {report['state']}",
        )
        create_markdown_artifact(
            markdown=report_markdown(outcome, report),
            key=key,
            description=f"{report['flow']} {self.tenant_id}: {outcome.state}",
        )


_GENERIC_SKIP = ("steps", "progress", "run_id", "tenant", "flow")


def report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report as (item, value) rows: totals, then the time of every step."""
    if report.get("flow") not in ("enable", "remove"):  # rotate, erase: their own fields, in their order
        rows = [{"item": "run_id", "value": str(report["run_id"])}]
        rows += [{"item": k, "value": "" if v is None else str(v)} for k, v in report.items() if k not in _GENERIC_SKIP]
        for s in report["steps"]:
            rows.append({"item": f"step {s['step']}", "value": s["state"] + (f": {s['error']}" if s["error"] else "")})
        return rows
    items = (
        "run_id",
        "tenant",
        "flow",
        "mode",
        "state",
        "source",
        "destination",
        "key_ref",
        "objects",
        "bytes",
        "bytes_plaintext_copied",
        "copy_seconds",
        "throughput_mb_s",
        "verification",
        "lost",
        "duplicated",
        "reconciliation",
        "quarantined",
        "waived",
        "quarantine_kept_at",
        "index",
        "index_documents",
        "deferred_replayed",
        "total_seconds",
    )
    rows = [{"item": k, "value": "" if report.get(k) is None else str(report[k])} for k in items]
    for q in report.get("quarantine") or []:
        waiver = f"waived by {q['waived_by']}: {q['waiver_reason']}" if q["waived"] else "not waived"
        rows.append({"item": f"quarantined {q['object']}", "value": f"{q['kind']}, {waiver}; {q['reason']}"})
    for s in report["steps"]:
        value = f"{s['state']}" + (f", {s['seconds']} s" if s["seconds"] is not None else "")
        value += f", attempt {s['attempts']}" if s["attempts"] else ""
        rows.append({"item": f"step {s['step']}", "value": value + (f": {s['error']}" if s["error"] else "")})
    return rows


def report_markdown(outcome: Outcome, report: dict[str, Any]) -> str:
    if report.get("flow") not in ("enable", "remove"):
        head = f"# {report['flow']} {report['tenant']}: {outcome.state}\n\nRun `{report['run_id']}` ({outcome.message}).\n\n"
        head += "".join(f"- {k}: {v}\n" for k, v in report.items() if k not in _GENERIC_SKIP and v is not None)
        if outcome.error:
            head += f"\n**Failed**: {outcome.error}\n"
        return head + _steps_markdown(report)
    kept = report.get("quarantine_kept_at")
    kept = f"; their source objects are kept at {kept}" if kept else ""
    head = (
        f"# {report['flow']} {report['tenant']}: {outcome.state}\n\n"
        f"Run `{report['run_id']}` ({outcome.message}). {report['source']} -> {report['destination']}, "
        f"key `{report['key_ref']}`.\n\n"
        f"- objects: {report['objects']} ({report['bytes']} bytes stored)\n"
        f"- copied: {report['bytes_plaintext_copied']} plaintext bytes in {report['copy_seconds']} s "
        f"({report['throughput_mb_s']} MB/s)\n"
        f"- verification: {report['verification']} (lost {report['lost']}, duplicated {report['duplicated']})\n"
        f"- quarantined: {report.get('quarantined', 0)} ({report.get('waived', 0)} waived{kept})\n"
        f"- index: {report['index']} with {report['index_documents']} documents\n"
        f"- total: {report['total_seconds']} s\n"
    )
    if outcome.error:
        head += f"\n**Failed**: {outcome.error}\n"
    return head + _steps_markdown(report)


def _steps_markdown(report: dict[str, Any]) -> str:
    lines = ["| step | state | attempts | seconds | error |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        error = (s["error"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['step']} | {s['state']} | {s['attempts']} | {s['seconds'] or ''} | {error} |")
    return "\n" + "\n".join(lines) + "\n"


# --- the flows -----------------------------------------------------------------------------------


def _value(x: Any) -> Any:
    """An enum parameter's value (Prefect hands typed parameters over as their enum)."""
    return x.value if isinstance(x, enum.Enum) else x


def _check_task_runner(name: Any) -> str:
    name = _value(name)
    if name not in TASK_RUNNERS:
        raise ValidationError(f"unknown task runner {name!r}: use one of {', '.join(TASK_RUNNERS)}")
    return name


def _answer(
    platform: Platform, outcome: Outcome, shards: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    answer = {"outcome": outcome.to_dict(), "report": build_report(platform, outcome.run_id)}
    if shards:
        answer["shards"] = shards
    return answer


def _drive(platform: Platform, run_id: str, task_runner: str, call: Callable[..., Outcome]) -> dict[str, Any]:
    """Run ``call`` (execute / resume / rerun of the engine) with Prefect shard tasks and
    artifact hooks; the answer the flows return."""
    if platform.state.get_run(run_id) is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    reporter = ArtifactReporter(platform, run_id)
    with _shard_runner(task_runner) as shards:
        # the run executes its steps holding a slot of the fleet's run limit (flows.limits)
        outcome = call(shard_runner=shards, hooks=reporter.hooks(), admission=run_admission(platform.settings))
    answer = _answer(platform, outcome, shards.ran)
    reporter.finish(outcome, answer["report"])
    logger = get_run_logger()
    if outcome.state in ("failed", REFUSED):
        logger.error("run %s failed: %s (%s)", run_id, outcome.message, outcome.error)
        # The flow run itself ends Failed (Prefect UI, automations, retries by policy); the
        # answer rides along as the state's data for run_flow and the CLI.
        return Failed(message=f"run {run_id}: {outcome.message}: {outcome.error}"[:1000], data=answer)
    logger.info("run %s %s: %s", run_id, outcome.state, outcome.message)
    return answer


def _refused(exc: ArchiveKmsError) -> Any:
    """A refusal (bad input, a failed run in the way, a run past cutover) ends the flow run
    Failed with the error as its data, not raised: raised, Prefect would log a traceback
    before the caller's one-line error (``run_flow`` raises it again for the caller)."""
    return Failed(message=f"{type(exc).__name__}: {exc}"[:1000], data=exc)


def _start(platform: Platform, plan: MigrationPlan, *, actor: str, task_runner: str) -> dict[str, Any]:
    run, created = trigger(platform, plan, actor=actor)
    if not created:  # one flow per tenant: report the run already going, never execute it twice
        get_run_logger().info("tenant %s already has %s run %s going", plan.tenant_id, run.flow.value, run.run_id)
        return _answer(
            platform,
            Outcome(
                run.run_id, run.tenant_id, run.flow.value, run.state.value, created=False, message="already running"
            ),
        )
    return _drive(platform, run.run_id, task_runner, lambda **kw: execute(platform, run.run_id, actor=actor, **kw))


def _submitted(platform: Platform, run_id: str, tenant: str, flow_kind: Flow) -> Any:
    """The run the console or CLI triggered and submitted with this flow run."""
    run = platform.state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    if run.tenant_id != tenant or run.flow is not flow_kind:
        raise ValidationError(
            f"run {run_id} is a {run.flow.value} run of tenant {run.tenant_id}, not {flow_kind.value} of {tenant}"
        )
    return run


def _execute_submitted(platform: Platform, run: Any, *, actor: str, task_runner: str) -> dict[str, Any]:
    if run.state is not RunState.RUNNING:  # a duplicate delivery of the flow run: report, never redo
        get_run_logger().info("run %s is %s already: nothing to execute", run.run_id, run.state.value)
        return _answer(
            platform,
            Outcome(run.run_id, run.tenant_id, run.flow.value, run.state.value, created=False, message="not running"),
        )
    return _drive(platform, run.run_id, task_runner, lambda **kw: execute(platform, run.run_id, actor=actor, **kw))


@flow(name="migration-enable", flow_run_name="enable-{tenant}", persist_result=False)
def enable(
    tenant: str,
    mode: EnableMode,
    key_ref: str,
    cloud: Cloud | None = None,
    shards: int | None = None,
    task_runner: TaskRunnerKind = TaskRunnerKind.THREADS,
    actor: str = "operator",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Move ``tenant`` onto its own key ``key_ref`` in ``mode`` (byokms | byok | byokv | kmip).

    ``run_id``: a run the console or CLI already triggered (and checked); it is executed.
    Without it (a run started from the Prefect UI) the flow plans and triggers one itself."""
    try:
        runner = _check_task_runner(task_runner)
        platform = process_platform()
        if run_id is not None:
            return _execute_submitted(
                platform, _submitted(platform, run_id, tenant, Flow.ENABLE), actor=actor, task_runner=runner
            )
        plan = plan_enable(platform, tenant, _value(mode), key_ref, cloud=_value(cloud), shards=shards)
        return _start(platform, plan, actor=actor, task_runner=runner)
    except ArchiveKmsError as exc:
        return _refused(exc)


@flow(name="migration-remove", flow_run_name="remove-{tenant}", persist_result=False)
def remove(
    tenant: str,
    shards: int | None = None,
    task_runner: TaskRunnerKind = TaskRunnerKind.THREADS,
    actor: str = "operator",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Move ``tenant`` back into shared storage under the managed key (``run_id``: as for enable)."""
    try:
        runner = _check_task_runner(task_runner)
        platform = process_platform()
        if run_id is not None:
            return _execute_submitted(
                platform, _submitted(platform, run_id, tenant, Flow.REMOVE), actor=actor, task_runner=runner
            )
        plan = plan_remove(platform, tenant, shards=shards)
        return _start(platform, plan, actor=actor, task_runner=runner)
    except ArchiveKmsError as exc:
        return _refused(exc)


@flow(name="migration-support", flow_run_name="support-{action}-{run_id}", persist_result=False)
def support(
    run_id: str,
    action: SupportAction,
    from_step: StepName | None = None,  # type: ignore[valid-type]
    takeover: bool = False,
    task_runner: TaskRunnerKind = TaskRunnerKind.THREADS,
    actor: str = "support",
) -> dict[str, Any]:
    """Resume a failed or crashed run, rerun it from a named step, or cancel it (before
    cutover: the tenant is put back as it was)."""
    try:
        return _support(run_id, _value(action), _value(from_step), takeover, task_runner, actor)
    except ArchiveKmsError as exc:
        return _refused(exc)


def _support(
    run_id: str, action: str, from_step: str | None, takeover: bool, task_runner: Any, actor: str
) -> dict[str, Any]:
    runner = _check_task_runner(task_runner)
    if action not in SUPPORT_ACTIONS:
        raise ValidationError(f"unknown support action {action!r}: use one of {', '.join(SUPPORT_ACTIONS)}")
    if action == "rerun" and not from_step:
        raise ValidationError(f"rerun needs the step to start from: one of {', '.join(ALL_STEPS)}")
    platform = process_platform()
    if action == "cancel":
        outcome = cancel(platform, run_id, actor=actor, takeover=takeover)
        get_run_logger().info("run %s %s", run_id, outcome.message)
        return _answer(platform, outcome)
    if action == "resume":
        return _drive(
            platform, run_id, runner, lambda **kw: resume(platform, run_id, actor=actor, takeover=takeover, **kw)
        )
    step = str(from_step)  # a rerun without one was refused above
    return _drive(
        platform,
        run_id,
        runner,
        lambda **kw: rerun(platform, run_id, step, actor=actor, takeover=takeover, **kw),
    )


FLOWS = {"enable": enable, "remove": remove, "support": support}


def stop_run(run_id: str, reason: str = "stop requested") -> bool:
    """Ask run ``run_id``, executing in this process (a flow in another thread), to stop
    gracefully at its next object boundary; False if it is not executing here."""
    from archive_kms.migration import request_stop

    return request_stop(run_id, reason)


def run_flow(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run flow ``name`` in this process on the task runner ``kwargs["task_runner"]`` names
    and return its answer; the flow's own exception (a refused plan, an unknown run, a lease
    held by a live worker) is raised as is."""
    if name not in FLOWS:
        raise ValidationError(f"unknown flow {name!r}: one of {', '.join(FLOWS)}")
    runner = kwargs.get("task_runner", "threads")
    _check_task_runner(runner)
    settings = Settings()
    with _prefect_api(settings), _library_logs(), tags(*_tags_for(name, kwargs)):
        selected = FLOWS[name].with_options(task_runner=task_runner_for(runner, settings))
        state = selected(**kwargs, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):  # a refusal (_refused), or an exception the flow raised
        raise result
    return result


def _tags_for(name: str, kwargs: dict[str, Any]) -> list[str]:
    """The tenant tag (and the run tag, when the run is known) of an in-process flow run."""
    tenant = kwargs.get("tenant")
    run_id = kwargs.get("run_id")
    if run_id and not tenant:
        run = process_platform().state.get_run(run_id)
        tenant = run.tenant_id if run is not None else None
    if tenant and run_id:
        return run_tags(tenant, run_id)
    return ["archive-kms"] + ([f"tenant:{tenant}"] if tenant else [])


@contextlib.contextmanager
def _library_logs() -> Iterator[None]:
    """Send ``archive_kms`` log records (INFO and up) to the flow run's logs while a flow
    runs in this process. Prefect's API handler drops records logged outside a run."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler()
    handler.setLevel(logging.INFO)
    attached = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(handler)
            attached.append(logger)
    _library_log_level()
    try:
        yield
    finally:
        for logger in attached:
            logger.removeHandler(handler)


@contextlib.contextmanager
def _prefect_api(settings: Settings) -> Iterator[None]:
    """Report to the configured Prefect server (``prefect_api_url``, the stack's locally)
    unless Prefect already has an API URL; with neither, refuse instead of letting Prefect
    start a temporary server of its own that nobody can see."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    url = settings.prefect_api_url
    if not url:
        raise ConfigurationError(
            "no Prefect API: prefect_api_url is not set (run `archive-kms stack up`, or export "
            "ARCHIVE_KMS_PREFECT_API_URL or PREFECT_API_URL)"
        )
    os.environ.setdefault("PREFECT_API_URL", url)  # Dask worker processes started from here inherit it
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


__all__ = [
    "FLOWS",
    "LIBRARY_LOGGERS",
    "LOCAL_DASK_CLUSTER",
    "TASK_RUNNERS",
    "PrefectShardRunner",
    "StepName",
    "SupportAction",
    "TaskRunnerKind",
    "artifact_key",
    "enable",
    "process_platform",
    "remove",
    "report_markdown",
    "report_table",
    "run_flow",
    "shard_task",
    "stop_run",
    "support",
    "task_runner_for",
]
