"""The key lifecycle in the console: the ``revoke`` and ``restore`` actions, the stored
warnings as a warning source, and the acknowledge route (docs/console-api.md, "Key
lifecycle"). Registered with the console's registries on import (``api.app`` imports
this module), so the console page only has to add its buttons.

* ``POST /api/tenants/{tenant}/revoke`` (``key_lifecycle`` permission: security officer,
  platform admin): revokes at once in the API process (``migration.launch.start_revoke``:
  in force everywhere when the request returns) and submits the receipt run; one approver,
  because revocation is the emergency action. Body: ``reason``, optional ``workspace`` /
  ``before`` (granular). Preview: ``GET .../blast-radius?action=revoke``.
* ``POST /api/tenants/{tenant}/restore``: dual control (a second, different approver):
  giving access back is the action an attacker wants (faults F15). Preview as above.
* Stored warnings (``operations.key_warnings``) appear in ``GET /api/warnings`` beside the
  console's own sources. The monitor's ``rotation_detected`` warning is not shown while the
  tenant has an open rotation: that rotation's warning (``api.rotation_actions``) stands for
  it and offers ``confirm_rotation``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import Field

from archive_kms.api.actions import TenantAction, register_action
from archive_kms.api.auth import Permission, Principal
from archive_kms.api.models import Reason, Strict
from archive_kms.api.warnings import ConsoleWarning, register_warning_source
from archive_kms.migration.launch import Started, start_restore, start_revoke
from archive_kms.operations.platform import Platform
from archive_kms.operations.revocation import RevocationScope, check_restore, check_revoke
from archive_kms.state.port import TenantRecord, WarningKind

__all__ = ["RestoreBody", "RevokeBody", "StoredWarnings"]

_WORKSPACE = Field(
    default=None, min_length=1, max_length=96, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$", description="One workspace"
)
_BEFORE = Field(default=None, description="Only the data keys of hours that end at or before this time (UTC)")


class RevokeBody(Strict):
    reason: str = Reason
    workspace: str | None = _WORKSPACE
    before: datetime | None = _BEFORE


class RestoreBody(Strict):
    reason: str = Reason
    workspace: str | None = _WORKSPACE
    before: datetime | None = _BEFORE


def _scope(body: Any) -> RevocationScope:
    return RevocationScope(body.workspace, body.before)


def _start_revoke(console: Any, principal: Principal, tenant: str, body: RevokeBody, actor: str) -> Started:
    return start_revoke(
        console.platform,
        console.launcher,
        tenant,
        actor=actor,
        reason=body.reason,
        workspace=body.workspace,
        before=body.before,
    )


def _start_restore(console: Any, principal: Principal, tenant: str, body: RestoreBody, actor: str) -> Started:
    return start_restore(
        console.platform,
        console.launcher,
        tenant,
        actor=actor,
        reason=body.reason,
        workspace=body.workspace,
        before=body.before,
    )


def _check_revoke(console: Any, tenant: str, body: RevokeBody) -> None:
    check_revoke(console.platform, tenant, _scope(body))


def _check_restore(console: Any, tenant: str, body: RestoreBody) -> None:
    check_restore(console.platform, tenant, _scope(body))


class StoredWarnings:
    """The warnings the library stored (key unavailable, key disabled, rotation detected,
    run failed, tenant revoked, key expiring)."""

    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        for t in tenants:
            rotating = platform.state.find_open_rotation(t.tenant_id) is not None
            for w in platform.state.list_warnings(t.tenant_id):
                actions: tuple[str, ...] = ()
                if w.kind == WarningKind.ROTATION_DETECTED.value and rotating:
                    continue  # the open rotation's own warning (api.rotation_actions) says it, with Confirm
                if w.kind in (WarningKind.TENANT_REVOKED.value, WarningKind.KEY_DISABLED.value):
                    actions = ("restore",)
                yield ConsoleWarning(
                    id=w.warning_id,
                    kind=w.kind,
                    severity=w.severity,
                    tenant=w.tenant_id,
                    message=w.message,
                    run_id=w.details.get("run_id") if isinstance(w.details.get("run_id"), str) else None,
                    since=w.raised_at,
                    actions=actions,
                    details={**dict(w.details), "count": w.count, "acknowledged_by": w.acknowledged_by},
                )


register_action(
    TenantAction(
        name="revoke",
        summary="Revoke the tenant's key access now (every process refuses); submits the receipt run",
        permission=Permission.KEY_LIFECYCLE,
        body=RevokeBody,
        start=_start_revoke,
        dry_run="revoke",
        check=_check_revoke,
    )
)
register_action(
    TenantAction(
        name="restore",
        summary="Restore key access after a verified unwrap and replay deferred jobs; needs a second approver",
        permission=Permission.KEY_LIFECYCLE,
        body=RestoreBody,
        start=_start_restore,
        dual_control=True,
        dry_run="restore",
        check=_check_restore,
    )
)
register_warning_source(StoredWarnings())
