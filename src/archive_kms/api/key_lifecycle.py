"""The key-lifecycle actions and warnings of the console (issue #14), registered with the
console's registries (``api.actions.register_action``, ``api.warnings.register_warning_source``)
when ``api.app`` is imported:

- ``POST /api/tenants/{tenant}/erase`` ``{"reason", "scope": {"before": T} | {"workspace": W}}``
  (security officer; dual control; blast-radius preview ``?action=erase`` from the
  tenant's retention policy): crypto-erase the time buckets before ``before``, or a whole
  ``workspace`` (``migration.launch.start_erase``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, model_validator

from archive_kms.api.actions import TenantAction, register_action
from archive_kms.api.auth import Permission, Principal
from archive_kms.api.models import Reason, Strict
from archive_kms.migration.launch import Started, start_erase

__all__ = ["EraseBody", "EraseBuckets", "EraseWorkspace"]


class EraseBuckets(Strict):
    before: datetime = Field(description="Erase every time bucket that started before this time (RFC 3339)")

    @model_validator(mode="after")
    def _zoned(self) -> EraseBuckets:
        if self.before.tzinfo is None:
            raise ValueError("before needs a zone, e.g. 2026-01-31T00:00:00Z")
        return self


class EraseWorkspace(Strict):
    workspace: str = Field(
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
        description="Erase this whole workspace (its key and every DEK under it)",
    )


class EraseBody(Strict):
    reason: str = Reason
    scope: EraseBuckets | EraseWorkspace = Field(description="What to erase: {before} (retention) or {workspace}")

    @property
    def before(self) -> datetime | None:
        return self.scope.before if isinstance(self.scope, EraseBuckets) else None

    @property
    def workspace(self) -> str | None:
        return self.scope.workspace if isinstance(self.scope, EraseWorkspace) else None


def _start_erase(console: Any, principal: Principal, tenant: str, body: EraseBody, actor: str) -> Started:
    return start_erase(
        console.platform,
        console.launcher,
        tenant,
        actor=actor,
        before=body.before,
        workspace=body.workspace,
        reason=body.reason,
    )


def _check_erase(console: Any, tenant: str, body: EraseBody) -> None:
    from archive_kms.migration.engine import check_trigger
    from archive_kms.migration.erase import plan_erase

    check_trigger(
        console.platform,
        plan_erase(console.platform, tenant, before=body.before, workspace=body.workspace, reason=body.reason),
    )


register_action(
    TenantAction(
        name="erase",
        summary="Crypto-erase the tenant's time buckets before a time, or a whole workspace (keys, objects, index "
        "documents; signed erasure record); needs a second approver",
        permission=Permission.KEY_LIFECYCLE,
        body=EraseBody,
        start=_start_erase,
        dual_control=True,
        dry_run="erase",
        check=_check_erase,
    )
)
