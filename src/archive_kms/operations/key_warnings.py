"""Stored warnings: the small API the key-state monitor, revocation runs, the rotation
flow and the console use to raise, clear, acknowledge and list what needs a human.

Warnings live in the state store (``state.port.WarningRepo``), so every process, the CLI
(``archive-kms warnings``) and the console see the same ones. A warning's id is stable
while its condition lasts (``<kind>:<tenant>[:<subject>]``): raising it again updates it.
Each new episode, each clear and each acknowledgement is also an audit record
(``warning.raise`` / ``warning.clear`` / ``warning.ack``: kind, id, actor; the message
holds no key material and no record content), so the audit log says who saw what when.

Kinds (``state.port.WarningKind``): ``key_unavailable`` (the key service does not answer:
an outage, never a revocation), ``key_disabled`` (the customer disabled, deleted or
expired the key, or withdrew our access: the tenant was revoked), ``rotation_detected``
(details: ``tenant``, ``key_ref``, ``previous_version``, ``observed_version``; the
rotation flow acts on it and clears it), ``run_failed``, ``tenant_revoked``,
``key_expiring`` (imported key material expires soon).

The public names here are stable (ADR 0022): ``raise_warning``, ``clear_warning``,
``acknowledge_warning``, ``list_warnings``, ``WarningKind``, ``StoredWarning``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from archive_kms.state.port import AuditEvent, AuditLog, StoredWarning, WarningKind, WarningRepo, warning_id

__all__ = [
    "DEFAULT_SEVERITY",
    "StoredWarning",
    "WarningKind",
    "WarningStore",
    "acknowledge_warning",
    "clear_warning",
    "list_warnings",
    "raise_warning",
]

log = logging.getLogger(__name__)

#: Severity of each known kind when the caller does not say.
DEFAULT_SEVERITY: dict[str, str] = {
    WarningKind.KEY_UNAVAILABLE.value: "warning",
    WarningKind.KEY_DISABLED.value: "critical",
    WarningKind.ROTATION_DETECTED.value: "warning",
    WarningKind.RUN_FAILED.value: "critical",
    WarningKind.TENANT_REVOKED.value: "critical",
    "key_expiring": "warning",
}


class WarningStore(WarningRepo, AuditLog, Protocol):
    """The state a warning needs: the warnings and the audit log."""


def _kind(kind: WarningKind | str) -> str:
    return kind.value if isinstance(kind, WarningKind) else str(kind)


def raise_warning(
    state: WarningStore,
    tenant_id: str,
    kind: WarningKind | str,
    message: str,
    *,
    actor: str,
    severity: str | None = None,
    subject: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> StoredWarning:
    """Raise (or raise again) a warning; a new episode is audited as ``warning.raise``."""
    k = _kind(kind)
    stored, new = state.raise_warning(
        tenant_id,
        k,
        severity=severity or DEFAULT_SEVERITY.get(k, "warning"),
        message=message,
        subject=subject,
        details=details,
    )
    if new:
        log.warning("warning raised: %s: %s", stored.warning_id, message)
        state.append_audit(
            AuditEvent(
                actor=actor,
                action="warning.raise",
                tenant_id=tenant_id,
                details={"warning_id": stored.warning_id, "kind": k, "severity": stored.severity},
            )
        )
    return stored


def clear_warning(
    state: WarningStore,
    tenant_id: str,
    kind: WarningKind | str,
    *,
    actor: str,
    subject: str | None = None,
    reason: str | None = None,
) -> StoredWarning | None:
    """Clear the warning if it is active (audited as ``warning.clear``); None if it was not."""
    wid = warning_id(_kind(kind), tenant_id, subject)
    cleared = state.clear_warning(wid)
    if cleared is not None:
        log.info("warning cleared: %s", wid)
        state.append_audit(
            AuditEvent(
                actor=actor,
                action="warning.clear",
                tenant_id=tenant_id,
                details={"warning_id": wid, "kind": cleared.kind, "reason": (reason or "")[:300]},
            )
        )
    return cleared


def acknowledge_warning(state: WarningStore, warning_id_: str, *, actor: str) -> StoredWarning:
    """Record that ``actor`` saw the warning (it stays until its condition clears);
    audited as ``warning.ack``. ``StateError`` if there is no such warning."""
    acked = state.acknowledge_warning(warning_id_, actor=actor)
    state.append_audit(
        AuditEvent(
            actor=actor,
            action="warning.ack",
            tenant_id=acked.tenant_id,
            details={"warning_id": acked.warning_id, "kind": acked.kind},
        )
    )
    return acked


def list_warnings(
    state: WarningRepo,
    tenant_id: str | None = None,
    *,
    include_cleared: bool = False,
    kind: WarningKind | str | None = None,
    limit: int = 500,
) -> list[StoredWarning]:
    """Active warnings (or all, with ``include_cleared``), newest first."""
    return state.list_warnings(
        tenant_id, active=None if include_cleared else True, kind=None if kind is None else _kind(kind), limit=limit
    )
