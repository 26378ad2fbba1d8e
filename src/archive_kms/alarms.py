"""Security alarms: what the platform raises when something it depends on contradicts what
it recorded itself (an index it never created behind a tenant's alias, an audit log that
is not a continuation of its anchors, a keychain audit chain that does not verify).

An alarm is three things at once, so that no single channel being ignored hides it:

* a ``CRITICAL`` log line (logger ``archive_kms.alarms``) naming the kind and the tenant;
* an audit record ``alarm.<kind>`` (actor ``security``) in the tenant's chain, or the
  global chain for a platform-wide alarm; best effort: an alarm about the database must
  not depend on the database accepting it;
* a console warning: ``api.warnings.AlarmWarnings`` lists the ``alarm.*`` records of the
  tenants in scope (and the platform-wide ones) as critical warnings.

The caller then fails closed (raises). Details are ids, names and counts, never query
words, record content or key material.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from archive_kms.domain.audit import AuditEvent, AuditRecord

__all__ = ["ALARM_ACTION_PREFIX", "ALARM_ACTOR", "AlarmLog", "is_alarm", "raise_alarm"]

log = logging.getLogger("archive_kms.alarms")

ALARM_ACTION_PREFIX = "alarm."
ALARM_ACTOR = "security"


class AlarmLog(Protocol):
    """Where alarms are recorded: the audit log's append (``state.port.AuditLog`` has it)."""

    def append_audit(self, event: AuditEvent) -> AuditRecord: ...


def is_alarm(action: str) -> bool:
    return action.startswith(ALARM_ACTION_PREFIX)


def raise_alarm(
    audit: AlarmLog | None,
    kind: str,
    message: str,
    *,
    tenant_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Log ``message`` at CRITICAL and append ``alarm.<kind>`` to the audit log (if one is
    given). Never raises: the caller raises its own, specific error next."""
    log.critical("SECURITY ALARM %s%s: %s", kind, f" (tenant {tenant_id})" if tenant_id else "", message)
    if audit is None:
        return
    try:
        audit.append_audit(
            AuditEvent(
                actor=ALARM_ACTOR,
                action=ALARM_ACTION_PREFIX + kind,
                tenant_id=tenant_id,
                details={"message": message[:500], **dict(details or {})},
            )
        )
    except Exception as exc:  # noqa: BLE001 - the alarm is logged; the database may be what is wrong
        log.critical("SECURITY ALARM %s could not be written to the audit log: %s", kind, type(exc).__name__)
