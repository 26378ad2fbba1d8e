"""Blast-radius preview: what an action would touch, computed without changing anything.

``blast_radius(platform, tenant, action)`` counts what the tenant has where the action
would act (objects and bytes at its storage location, documents in its current index,
archive jobs queued or running, runs going) and says in words what the action would do.
The console (``GET /api/tenants/{tenant}/blast-radius``) and the CLI (``archive-kms remove
TENANT --dry-run``) show the same result.

Actions plug in with ``register_dry_run(action, describe)``: ``describe(platform, tenant)``
checks that the action may run (raising the same ``ValidationError`` the run would) and
returns the lines saying what it would do. Each action registers its own where it is built
(``remove`` in ``migration.plan``), so this module imports no layer above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import SearchError, StateError, ValidationError
from archive_kms.operations.platform import Platform

#: action -> describe(platform, tenant_id) -> what it would do, one line each
DryRun = Callable[[Any, str], list[str]]
_DRY_RUNS: dict[str, DryRun] = {}


def register_dry_run(action: str, describe: DryRun) -> None:
    _DRY_RUNS[action] = describe


def dry_run_actions() -> list[str]:
    return sorted(_DRY_RUNS)


@dataclass(frozen=True)
class BlastRadius:
    tenant: str
    action: str
    location: str
    key_mode: str
    key_ref: str | None
    objects: int
    bytes: int
    index: str | None
    index_documents: int | None  # None: the index could not be counted
    queued_jobs: int  # deferred archive jobs not yet replayed
    running_jobs: int  # archive jobs admitted and not finished
    running_runs: list[str]  # run ids of the tenant's runs going now
    would: list[str]  # what the action would do, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def blast_radius(platform: Platform, tenant_id: str, action: str) -> BlastRadius:
    """The preview of ``action`` on ``tenant_id``; ``ValidationError`` if the action is
    unknown or would be refused (the reason the run would give)."""
    tid = TenantId(tenant_id).value
    describe = _DRY_RUNS.get(action)
    if describe is None:
        raise ValidationError(f"action {action!r}: blast radius is known for {', '.join(dry_run_actions())}")
    tenant = platform.state.get_tenant(tid)
    if tenant is None:
        raise StateError(f"unknown tenant {tid!r}", resource=f"tenant:{tid}")
    would = describe(platform, tid)
    location = platform.location_of(tid)
    objects = size = 0
    for info in platform.store_for(location).list():
        objects += 1
        size += info.size
    index = platform.index.current_index(tid)
    documents: int | None = None
    if index is not None:
        try:
            documents = platform.index.count(index)
        except SearchError:
            documents = None
    gate = platform.state.gate(tid)
    active = platform.state.find_active_run(tid)
    return BlastRadius(
        tenant=tid,
        action=action,
        location=location.uri,
        key_mode=tenant.key_mode.value,
        key_ref=tenant.key_ref,
        objects=objects,
        bytes=size,
        index=index,
        index_documents=documents,
        queued_jobs=gate.pending,
        running_jobs=len(platform.state.running_jobs(tid)),
        running_runs=[active.run_id] if active is not None else [],
        would=would,
    )


__all__ = ["BlastRadius", "DryRun", "blast_radius", "dry_run_actions", "register_dry_run"]
