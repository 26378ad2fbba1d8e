"""The actions the console can start on a tenant, as a registry.

Each ``TenantAction`` becomes one route, ``POST /api/tenants/{tenant}/{name}``, with its
own body model in the OpenAPI document, the permission it needs, whether it needs a
second approver (dual control), and the blast-radius preview it offers
(``GET /api/tenants/{tenant}/blast-radius?action=NAME``, from
``operations.blast_radius``). ``start(console, principal, tenant, body, actor)`` starts
it (normally by submitting a deployment run through ``migration.launch``) and returns
``Started``.

Built in: ``enable`` and ``remove`` (dual control). The key-lifecycle work registers
``revoke`` / ``restore`` / ``rotate`` / ``erase`` / ``confirm_rotation`` with
``register_action(TenantAction(...))`` before ``create_app`` is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from archive_kms.api.auth import Permission, Principal
from archive_kms.api.models import EnableBody, RemoveBody
from archive_kms.migration.launch import Started, start_enable, start_remove

#: (console, principal, tenant id, body, actor) -> Started
StartFn = Callable[[Any, Principal, str, Any, str], Started]


@dataclass(frozen=True)
class TenantAction:
    name: str  # the route's last segment and the audit/approval action name
    summary: str
    permission: Permission
    body: type[BaseModel]
    start: StartFn
    dual_control: bool = False
    dry_run: str | None = None  # blast-radius action name, if it has a preview
    check: Callable[[Any, str, Any], None] | None = None  # refusals before an approval request is made


_ACTIONS: dict[str, TenantAction] = {}


def register_action(action: TenantAction) -> None:
    if not action.name.replace("_", "").isalnum() or action.name in ("blast-radius",):
        raise ValueError(f"bad action name {action.name!r}")
    _ACTIONS[action.name] = action


def registered_actions() -> dict[str, TenantAction]:
    return dict(_ACTIONS)


def _start_enable(console: Any, principal: Principal, tenant: str, body: EnableBody, actor: str) -> Started:
    return start_enable(
        console.platform,
        console.launcher,
        tenant,
        body.mode.value,
        body.key_ref,
        actor=actor,
        cloud=body.cloud.value if body.cloud else None,
        shards=body.shards,
    )


def _start_remove(console: Any, principal: Principal, tenant: str, body: RemoveBody, actor: str) -> Started:
    return start_remove(console.platform, console.launcher, tenant, actor=actor, shards=body.shards)


def _check_remove(console: Any, tenant: str, body: RemoveBody) -> None:
    from archive_kms.migration import plan_remove
    from archive_kms.migration.engine import check_trigger

    check_trigger(console.platform, plan_remove(console.platform, tenant, shards=body.shards))


register_action(
    TenantAction(
        name="enable",
        summary="Move the tenant onto its own key (onboarding); submits the enable deployment",
        permission=Permission.MIGRATE,
        body=EnableBody,
        start=_start_enable,
    )
)
register_action(
    TenantAction(
        name="remove",
        summary="Move the tenant back to shared storage under the managed key; needs a second approver",
        permission=Permission.MIGRATE,
        body=RemoveBody,
        start=_start_remove,
        dual_control=True,
        dry_run="remove",
        check=_check_remove,
    )
)

__all__ = ["StartFn", "TenantAction", "register_action", "registered_actions"]
