"""The key-lifecycle actions and warnings of the console (issue #14), registered with the
console's registries (``api.actions.register_action``, ``api.warnings.register_warning_source``)
when ``api.app`` is imported:

- ``POST /api/tenants/{tenant}/erase`` ``{"reason", "scope": {"before": T} | {"workspace": W}}``
  (security officer; dual control; blast-radius preview ``?action=erase`` from the
  tenant's retention policy): crypto-erase the time buckets before ``before``, or a whole
  ``workspace`` (``migration.launch.start_erase``).
- ``POST /api/tenants/{tenant}/confirm_rotation`` ``{"rotation_id"}`` (``confirm_rotation``:
  tenant admin, security officer, platform admin): the console issues a signed, single-use
  confirmation for the authenticated caller and accepts it (``operations.rotation``: tenant,
  rotation, challenge, expiry, the provider's current version all checked; a refusal
  changes nothing), then submits the resume of the waiting rotate run.
- ``POST /api/tenants/{tenant}/check_rotation`` ``{}`` (``key_lifecycle``): look for a
  rotation of the tenant's key now and start its rotate run.
- warnings ``rotation_detected`` (a rotation waiting for its confirmation, offering
  ``confirm_rotation``; severity ``critical`` once the reminder time has passed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, model_validator

from archive_kms.api.actions import TenantAction, register_action
from archive_kms.api.auth import Permission, Principal
from archive_kms.api.models import Reason, Strict
from archive_kms.api.warnings import ConsoleWarning, register_warning_source
from archive_kms.migration.launch import Started, confirm_and_resume, start_erase, start_rotation_check
from archive_kms.operations.platform import Platform
from archive_kms.state.port import RotationState, TenantRecord

__all__ = ["ConfirmRotationBody", "EraseBody", "EraseBuckets", "EraseWorkspace", "RotationWarnings"]


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


class ConfirmRotationBody(Strict):
    rotation_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The rotation")


def _confirm(console: Any, principal: Principal, tenant: str, body: ConfirmRotationBody, actor: str) -> Started:
    from archive_kms.operations.rotation import issue_confirmation

    conf = issue_confirmation(console.platform, tenant, body.rotation_id, confirmed_by=actor)
    return confirm_and_resume(console.platform, console.launcher, tenant, conf.to_json(), actor=actor)


class CheckRotationBody(Strict):
    pass


def _check_rotation(console: Any, principal: Principal, tenant: str, body: CheckRotationBody, actor: str) -> Started:
    return start_rotation_check(console.platform, console.launcher, tenant, actor=actor)


register_action(
    TenantAction(
        name="confirm_rotation",
        summary="Confirm the customer's rotation of the tenant's master key: the platform re-wraps under the new "
        "version, rebuilds the index and resumes archive jobs",
        permission=Permission.CONFIRM_ROTATION,
        body=ConfirmRotationBody,
        start=_confirm,
    )
)
register_action(
    TenantAction(
        name="check_rotation",
        summary="Look for a rotation of the tenant's master key now (a found one pauses the tenant and asks for a "
        "confirmation)",
        permission=Permission.KEY_LIFECYCLE,
        body=CheckRotationBody,
        start=_check_rotation,
    )
)


class RotationWarnings:
    """A warning per open rotation: ``rotation_detected``, offering ``confirm_rotation``
    once the run asks for the confirmation."""

    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        for t in tenants:
            rotation = platform.state.find_open_rotation(t.tenant_id)
            if rotation is None:
                continue
            awaiting = rotation.state is RotationState.AWAITING
            since = rotation.awaiting_since
            overdue = since is not None and (
                (datetime.now(UTC) - since).total_seconds() >= platform.settings.rotation_reminder_seconds
            )
            reminder = awaiting and (overdue or bool(rotation.details.get("reminded_at")))
            yield ConsoleWarning(
                id=f"rotation_detected:{t.tenant_id}:{rotation.rotation_id}",
                kind="rotation_detected",
                severity="critical" if reminder else "warning",
                tenant=t.tenant_id,
                run_id=rotation.run_id,
                since=rotation.awaiting_since or rotation.detected_at,
                message=(
                    f"the master key of {t.tenant_id} was rotated ({rotation.previous_version} -> "
                    f"{rotation.observed_version}); archive jobs are deferred until the rotation is confirmed"
                    + (" (reminder: still not confirmed)" if reminder else "")
                    if awaiting
                    else f"the master key of {t.tenant_id} was rotated; the rotation run is {rotation.state.value}"
                ),
                actions=("confirm_rotation",) if awaiting else (),
                details={
                    "rotation_id": rotation.rotation_id,
                    "key_ref": rotation.key_ref,
                    "previous_version": rotation.previous_version,
                    "observed_version": rotation.observed_version,
                    "state": rotation.state.value,
                    "reminder": reminder,
                },
            )


register_warning_source(RotationWarnings())
