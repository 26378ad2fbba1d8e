"""Prefect flows of the key lifecycle: revoke (with its receipt), restore, and the
scheduled key-state monitor. Thin: ``archive_kms.operations.revocation`` and
``archive_kms.operations.key_monitor`` do the work (docs/key-lifecycle.md).

* ``key-revoke``: a revocation the caller began (``start``: the parameters
  ``begin_revocation`` returned; the revocation is already in force) is finished here:
  the run record, the probes and the receipt. Without ``start`` (a run started from the
  Prefect UI) the flow begins it too.
* ``key-restore``: restore after a verified unwrap at the provider, replaying the jobs
  deferred meanwhile.
* ``key-monitor``: every ``key_monitor_interval_seconds`` (deployment schedule), look at
  every tenant's master key; a customer rotation opens the rotation and submits its
  ``rotate`` run (``migration.launch.start_detected_rotation``), which waits for the
  customer's confirmation; a customer-side disable revokes the tenant (actor ``monitor``).

Each flow leaves a markdown artifact (``revocation-<tenant>``, ``restore-<tenant>``,
``key-monitor``) and returns its report as JSON.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from archive_kms.flows.migration import _library_logs, _prefect_api, process_platform
from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact

from archive_kms.config import Settings
from archive_kms.errors import ArchiveKmsError, ValidationError
from archive_kms.migration.launch import run_tags
from archive_kms.operations.key_monitor import KeyObservation, check_keys
from archive_kms.operations.revocation import (
    RevocationReceipt,
    RevocationScope,
    RevocationStart,
    begin_revocation,
    finish_revocation,
    restore_tenant,
)

log = logging.getLogger(__name__)

__all__ = ["KEY_FLOWS", "monitor", "receipt_markdown", "restore", "revoke", "run_key_flow", "start_rotation"]


def _scope(workspace: str | None, before: str | None) -> RevocationScope:
    when = None
    if before:
        try:
            when = datetime.fromisoformat(before.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"before {before!r}: use an ISO 8601 time, e.g. 2026-01-31T00:00:00Z") from None
        if when.tzinfo is None:
            raise ValidationError(f"before {before!r}: give a time zone (e.g. Z for UTC)")
    return RevocationScope(workspace or None, when)


def receipt_markdown(receipt: dict[str, Any]) -> str:
    """The receipt as a markdown table (the flow's artifact; the CLI prints the same rows)."""
    lines = [
        f"# Revocation receipt: {receipt.get('tenant')} (run {receipt.get('run_id')})",
        "",
        f"- scope: {receipt.get('scope', {}).get('kind')}; actor: {receipt.get('actor')}; reason: "
        f"{receipt.get('reason') or '-'}",
        f"- requested at {receipt.get('requested_at')}; committed at {receipt.get('committed_at')}; "
        f"every process refusing by {receipt.get('refusing_everywhere_by')} (bound {receipt.get('bound_seconds')} s)",
        f"- ok: {receipt.get('ok')}"
        + (f"; late: {receipt.get('not_refusing_in_time')}" if not receipt.get("ok") else ""),
        "",
        "| component | refusing | since | after commit (ms) | served after commit |",
        "|---|---|---|---|---|",
    ]
    for c in receipt.get("components", []):
        lines.append(
            f"| {c['component']} | {c['refusing']} | {c.get('refusing_since') or '-'} | "
            f"{c.get('after_commit_ms') if c.get('after_commit_ms') is not None else '-'} | "
            f"{c.get('served_after_commit', 0)} |"
        )
    return "\n".join(lines)


@flow(name="key-revoke", flow_run_name="revoke-{tenant}", persist_result=False)
def revoke(
    tenant: str,
    actor: str = "operator",
    reason: str = "",
    workspace: str | None = None,
    before: str | None = None,
    run_id: str | None = None,
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Revoke ``tenant`` (or ``workspace`` / the DEKs before ``before``) and write the
    receipt. ``start``: the revocation the caller began (it is in force already)."""
    platform = process_platform()
    if start is not None:
        begun = RevocationStart.from_params(start)
        if begun.tenant_id != tenant:
            raise ValidationError(f"start is for tenant {begun.tenant_id}, not {tenant}")
    else:
        begun = begin_revocation(
            platform, tenant, actor=actor, reason=reason, scope=_scope(workspace, before), run_id=run_id
        )
    receipt: RevocationReceipt = finish_revocation(platform, begun)
    create_markdown_artifact(receipt_markdown(receipt.to_dict()), key=f"revocation-{tenant}".lower())
    get_run_logger().info("revocation of %s: receipt ok=%s (run %s)", tenant, receipt.ok, receipt.run_id)
    return receipt.to_dict()


@flow(name="key-restore", flow_run_name="restore-{tenant}", persist_result=False)
def restore(
    tenant: str,
    actor: str = "operator",
    reason: str = "",
    workspace: str | None = None,
    before: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Restore ``tenant`` (or a scope) after a verified unwrap; replay deferred jobs."""
    platform = process_platform()
    report = restore_tenant(
        platform, tenant, actor=actor, reason=reason, scope=_scope(workspace, before), run_id=run_id
    )
    create_markdown_artifact(
        f"# Restore: {tenant} (run {report.run_id})\n\n- restored: {report.restored}\n"
        f"- replayed jobs: {report.data.get('replayed_jobs')}\n- gate: {report.data.get('gate')}",
        key=f"restore-{tenant}".lower(),
    )
    return report.to_dict()


def start_rotation(tenant_id: str, observation: KeyObservation) -> None:
    """The monitor's ``on_rotation_detected``: open the rotation (``migration.rotation_monitor``)
    and submit its ``rotate`` run, which pauses the tenant and waits for the customer's
    confirmation (docs/key-lifecycle.md, section 12). The ``rotation_detected`` warning
    stands until the rotate run accepts the new version."""
    from archive_kms.flows.launcher import PrefectLauncher

    from archive_kms.migration.launch import start_detected_rotation

    platform = process_platform()
    started = start_detected_rotation(
        platform,
        PrefectLauncher.from_settings(platform.settings),
        tenant_id,
        key_ref=observation.key_ref,
        previous_version=observation.previous_version,
        observed_version=observation.key_version,
        actor="monitor",
    )
    log.info("rotation of %s: run %s (%s)", tenant_id, started.run_id, started.message)


@flow(name="key-monitor", flow_run_name="key-monitor", persist_result=False)
def monitor(tenant: str | None = None, dry_run: bool = False, revoke_disabled: bool = True) -> dict[str, Any]:
    """Look at every watched tenant's master key (or ``tenant``'s) and act on it."""
    platform = process_platform()
    report = check_keys(platform, tenant, dry_run=dry_run, on_rotation_detected=start_rotation, revoke=revoke_disabled)
    rows = [
        f"| {o.tenant_id} | {o.classification.value} | {o.state} | {o.key_version or '-'} | {o.action} |"
        for o in report.observations
    ]
    create_markdown_artifact(
        "# Key-state monitor\n\n| tenant | classification | state | version | action |\n|---|---|---|---|---|\n"
        + "\n".join(rows or ["| - | - | - | - | no tenant on its own key |"]),
        key="key-monitor",
    )
    return report.to_dict()


KEY_FLOWS = {"revoke": revoke, "restore": restore, "monitor": monitor}


def run_key_flow(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run key flow ``name`` in this process (what ``--wait`` does) and return its answer;
    the flow's own exception is raised as is."""
    if name not in KEY_FLOWS:
        raise ValidationError(f"unknown flow {name!r}: one of {', '.join(KEY_FLOWS)}")
    settings = Settings()
    tenant = kwargs.get("tenant")
    run_id = kwargs.get("run_id") or (kwargs.get("start") or {}).get("run_id")
    labels = (
        run_tags(tenant, run_id) if tenant and run_id else ["archive-kms"] + ([f"tenant:{tenant}"] if tenant else [])
    )
    with _prefect_api(settings), _library_logs(), tags(*labels):
        state = KEY_FLOWS[name](**kwargs, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


_ = ArchiveKmsError  # re-exported errors of the flows are the library's
