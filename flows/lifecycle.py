"""Prefect flows of the key lifecycle: crypto-erasure (``erase``, and the scheduled
``erase_retention``) and key rotation (``rotate``). Thin: the plans, the steps, the
confirmation rules and the erasure record live in ``archive_kms.migration.erase`` /
``migration.rotate`` and ``archive_kms.operations``; the step engine (ADR 0025) runs them
exactly as it runs enable and remove, with the same hooks and artifacts
(``flows/migration.py``).

Deployments in ``flows/prefect.yaml``: ``key-erase/erase``, ``key-erase-retention/retention``
(hourly schedule), ``key-rotate/rotate``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from archive_kms.flows.migration import (
    FLOWS,
    _drive,
    _execute_submitted,
    _start,
    _submitted,
    process_platform,
)
from prefect import flow, get_run_logger

from archive_kms.errors import ArchiveKmsError
from archive_kms.migration import resume
from archive_kms.migration.erase import plan_erase, plan_retention_erasures
from archive_kms.state.port import Flow

__all__ = ["erase", "erase_retention", "rotate"]


@flow(name="key-erase", flow_run_name="erase-{tenant}", persist_result=False)
def erase(
    tenant: str,
    before: datetime | None = None,
    workspace: str | None = None,
    reason: str | None = None,
    actor: str = "operator",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Crypto-erase ``tenant``'s time buckets before ``before`` (retention) or its
    ``workspace``: keys destroyed, objects deleted, index documents deleted, a signed
    erasure record. ``run_id``: a run the console or CLI already triggered."""
    platform = process_platform()
    if run_id is not None:
        return _execute_submitted(
            platform, _submitted(platform, run_id, tenant, Flow.ERASE), actor=actor, task_runner="threads"
        )
    plan = plan_erase(platform, tenant, before=before, workspace=workspace, reason=reason)
    return _start(platform, plan, actor=actor, task_runner="threads")


@flow(name="key-erase-retention", flow_run_name="erase-retention", persist_result=False)
def erase_retention(actor: str = "scheduler:retention") -> dict[str, Any]:
    """The scheduled erasure: for every tenant with a retention policy, erase the time
    buckets that ended more than the retention ago (one erase run per tenant, one after
    the other). A tenant whose run fails does not stop the others; the flow run fails at
    the end if any did, naming them."""
    platform = process_platform()
    logger = get_run_logger()
    decisions = plan_retention_erasures(platform)
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    for decision in decisions:
        if decision.plan is None:
            logger.info("tenant %s: nothing to erase (%s)", decision.tenant_id, decision.why)
            continue
        try:
            answer = _start(platform, decision.plan, actor=actor, task_runner="threads")
        except ArchiveKmsError as exc:
            logger.error("tenant %s: erase refused: %s", decision.tenant_id, exc)
            failed.append(decision.tenant_id)
            continue
        data = answer if isinstance(answer, dict) else answer.result(raise_on_failure=False)  # a Failed state
        outcome = data["outcome"]
        runs.append(outcome)
        if outcome["state"] != "completed":
            failed.append(decision.tenant_id)
    result = {"decisions": [d.to_dict() for d in decisions], "runs": runs, "failed": failed}
    if failed:
        from prefect.states import Failed

        return Failed(message=f"erase failed for {', '.join(failed)}", data=result)  # type: ignore[return-value]
    return result


FLOWS.update({"erase": erase, "erase-retention": erase_retention})


@flow(name="key-rotate", flow_run_name="rotate-{tenant}", persist_result=False)
def rotate(tenant: str, run_id: str | None = None, actor: str = "operator") -> dict[str, Any]:
    """Apply a customer rotation of ``tenant``'s master key: pause the tenant, wait for the
    confirmation (the run ends ``waiting``; the state store keeps the wait), then re-wrap
    the L2 under the new version, rebuild the index, resume jobs, retire the old version.
    ``run_id``: the rotate run the rotation check triggered. Without it, the check runs
    here (``migration.rotation_monitor``)."""
    from archive_kms.migration.engine import waiting_on
    from archive_kms.migration.rotation_monitor import check_rotation

    platform = process_platform()
    if run_id is None:
        _, _, run = check_rotation(platform, tenant, actor=actor)
        if run is None:
            get_run_logger().info("tenant %s: no rotation of its key since the last check", tenant)
            return {"outcome": None, "report": None}
        run_id = run.run_id
    run = _submitted(platform, run_id, tenant, Flow.ROTATE)
    if waiting_on(platform, run) is not None:  # a wait that ended (or not): resume calls the step again
        return _drive(platform, run_id, "threads", lambda **kw: resume(platform, run_id, actor=actor, **kw))
    return _execute_submitted(platform, run, actor=actor, task_runner="threads")


FLOWS.update({"rotate": rotate})
