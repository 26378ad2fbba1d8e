"""Rotation detection: a **minimal stand-in** for the key-state monitor of issue #13 (the
revocation work), which was not on ``main`` when rotation was built. The contract it
stands in for: the monitor raises a ``rotation_detected`` warning and calls
``on_rotation_detected(tenant_id, observation)``. Here:

- ``observe(platform, tenant_id)`` reads the provider's current version of the tenant's
  L1 and compares it with the last known one (``LifecycleRepo.get_key_version``); the
  first observation only records a baseline;
- ``on_rotation_detected(platform, tenant_id, observation, actor=)`` opens the rotation
  (one open per tenant) and triggers its ``rotate`` run; the rotation record is the
  warning the console shows (``api.rotation_actions``);
- ``check_rotation`` is both, what ``archive-kms rotation check`` runs.

When the monitor lands, it calls ``on_rotation_detected`` and this module's ``observe``
either goes or becomes its probe; nothing else changes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import StateError
from archive_kms.keys.refs import replacement_ref
from archive_kms.migration.engine import trigger
from archive_kms.migration.rotate import audit_detected, plan_rotation
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import current_key_version
from archive_kms.state.port import KeyMode, KeyRotation, MigrationRun, RotationState

__all__ = ["RotationObservation", "check_rotation", "detect_rotation", "observe", "on_rotation_detected"]


@dataclass(frozen=True)
class RotationObservation:
    tenant_id: str
    key_ref: str
    previous_version: str | None
    observed_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant_id,
            "key_ref": self.key_ref,
            "previous_version": self.previous_version,
            "observed_version": self.observed_version,
        }


def observe(platform: Platform, tenant_id: str) -> RotationObservation | None:
    """A rotation of ``tenant_id``'s master key since the last known version, or None
    (unchanged; or the first look, which records the baseline)."""
    tid = TenantId(tenant_id).value
    t = platform.state.get_tenant(tid)
    if t is None:
        raise StateError(f"unknown tenant {tid!r}", resource=f"tenant:{tid}")
    if t.key_mode is KeyMode.MANAGED:
        return None
    key_ref = platform.keychain.status(tid).l1_ref
    version = current_key_version(platform, key_ref)
    mark = platform.state.get_key_version(tid)
    if mark is None or mark.key_ref != key_ref:
        platform.state.record_key_version(tid, key_ref, version)
        return None
    if version is None or version == mark.version:
        return None
    return RotationObservation(tid, key_ref, mark.version, version)


def on_rotation_detected(
    platform: Platform, tenant_id: str, observation: RotationObservation, *, actor: str
) -> tuple[KeyRotation, MigrationRun, bool]:
    """Open the rotation (or find the tenant's open one) and trigger its rotate run (or
    find it). Returns (rotation, run, created): ``created`` True for the one caller whose
    trigger created the run (it submits it; concurrent callers find it). An observation made before a rotate run
    applied this very change (a monitor check racing the run's ``retire``) finds that
    completed rotation and its run (created False): the same change is not rotated twice."""
    # A KMIP "version" is another key object: the rotation moves the tenant onto it.
    replacement = replacement_ref(observation.key_ref, observation.observed_version)
    target = replacement or observation.key_ref
    applied = _applied(platform, tenant_id, target, observation.observed_version)
    if applied is not None:
        return applied
    rotation, created = platform.state.open_rotation(
        KeyRotation(
            rotation_id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            kind="customer",
            key_ref=target,
            previous_key_ref=observation.key_ref,
            previous_version=observation.previous_version,
            observed_version=observation.observed_version,
        )
    )
    if created:
        audit_detected(platform, rotation, actor)
    if rotation.run_id is not None:
        run = platform.state.get_run(rotation.run_id)
        if run is not None:
            return rotation, run, False
    run, run_created = trigger(platform, plan_rotation(platform, rotation), actor=actor)
    return rotation, run, run_created


def _applied(
    platform: Platform, tenant_id: str, key_ref: str, version: str | None
) -> tuple[KeyRotation, MigrationRun, bool] | None:
    """The completed rotation (and its run) that already moved the tenant onto
    ``version`` of ``key_ref``, if the tenant's known version is that one; else None."""
    mark = platform.state.get_key_version(tenant_id)
    if mark is None or mark.key_ref != key_ref or mark.version != version:
        return None
    for done in platform.state.list_rotations(tenant_id, states=[RotationState.COMPLETED]):
        if done.key_ref == key_ref and done.observed_version == version:
            run = platform.state.get_run(done.run_id) if done.run_id else None
            if run is not None:
                return done, run, False
    return None


def check_rotation(
    platform: Platform, tenant_id: str, *, actor: str
) -> tuple[RotationObservation | None, KeyRotation | None, MigrationRun | None]:
    """Observe; on a rotation (or with one already open), make sure its run exists."""
    observation, rotation, run, _ = detect_rotation(platform, tenant_id, actor=actor)
    return observation, rotation, run


def detect_rotation(
    platform: Platform, tenant_id: str, *, actor: str
) -> tuple[RotationObservation | None, KeyRotation | None, MigrationRun | None, bool]:
    """``check_rotation``, and whether this call created the rotate run."""
    observation = observe(platform, tenant_id)
    if observation is None:
        open_rotation = platform.state.find_open_rotation(TenantId(tenant_id).value)
        if open_rotation is None:
            return None, None, None, False
        observation = RotationObservation(
            open_rotation.tenant_id,
            open_rotation.key_ref,
            open_rotation.previous_version,
            open_rotation.observed_version,
        )
    rotation, run, created = on_rotation_detected(platform, observation.tenant_id, observation, actor=actor)
    return observation, rotation, run, created
