"""The rotate flow: the customer rotated their master key (KMS ``RotateKeyOnDemand`` /
automatic rotation, a new Key Vault key version); after the customer **confirms** it, the
tenant's L2 is re-wrapped under the new version and the index generation rebuilt
(product.md "Flows" 2; issue #14; ``docs/key-lifecycle.md`` "Rotation").

Steps (``ROTATE_STEPS``; the engine of ADR 0025 runs them, checkpointed):

- ``preflight``: the tenant is on a customer key, not revoked, and the rotation is open.
- ``pause``: the archive gate closes (new jobs deferred), running jobs drain.
- ``confirm``: the rotation asks for a confirmation (a fresh single-use challenge; state
  ``awaiting``) and the step **waits** (``StepWaiting``: the wait is in the state store,
  the run holds no lease) until ``operations.rotation.confirm_rotation`` accepted one and
  the run is resumed. Past ``rotation_reminder_seconds`` the wait is marked for a reminder.
- ``prove_key``: the provider, read now, still has the observed version current, and a
  test wrap/unwrap under it round-trips: the new version works before anything depends on it.
- ``rewrap`` (**point of no return**): ``Keychain.rotate_l1`` with the same key: 1 unwrap
  (the L2 under the old version) + 1 wrap (under the current = new version), whatever the
  data size. Idempotent: a rerun finds the L1 generation already bumped.
- ``build_index``, ``cutover``, ``cleanup_index``: a new index generation from storage, the
  alias swapped to it, the old generation deleted.
- ``resume``: the gate reopens and the deferred jobs are replayed.
- ``retire``: the canary check (the keychain's L2 is wrapped under the observed version,
  the current index is the new generation, no other generation left) and the new version
  recorded as the tenant's known version; the rotation is ``completed`` and the old
  version is reported safe to disable.
- ``report``.

Crash points: ``before:<step>``, ``after:<step>`` and ``rotate:after-rewrap-commit`` (the
keychain committed the re-wrap, the step not yet recorded).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms import crashpoints
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError, StateError, ValidationError
from archive_kms.migration.context import FlowDefinition, RunContext, Step, StepWaiting
from archive_kms.migration.report import HasRunLedger, register_report, step_rows, total_seconds
from archive_kms.operations.archive import RECORD_PREFIX, replay_deferred
from archive_kms.operations.key_monitor import accept_key_version
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import current_key_version, new_challenge
from archive_kms.search.naming import index_name
from archive_kms.search.rebuild import rebuild_generation
from archive_kms.state.port import (
    AuditEvent,
    Flow,
    KeyMode,
    KeyRotation,
    MigrationRun,
    RotationState,
    StepState,
)

__all__ = ["ROTATE_FLOW", "ROTATE_STEPS", "RotationPlan", "plan_rotation"]

ROTATE_STEPS: tuple[str, ...] = (
    "preflight",
    "pause",
    "confirm",
    "prove_key",
    "rewrap",
    "build_index",
    "cutover",
    "cleanup_index",
    "resume",
    "retire",
    "report",
)
ROTATE_POINT_OF_NO_RETURN = "rewrap"


@dataclass(frozen=True)
class RotationPlan:
    tenant_id: str
    rotation_id: str
    key_ref: str
    mode: str
    previous_version: str | None
    observed_version: str | None
    old_index: str | None
    new_generation: int
    l1_generation_before: int
    kind: str = "customer"  # customer | byok (a new imported key: key_ref is the new key)
    previous_key_ref: str = ""
    parallel_shards: int = 1
    threads_per_shard: int = 8
    flow: str = Flow.ROTATE.value

    @property
    def switches_key(self) -> bool:
        """The tenant moves to another key: a BYOK re-upload (a new imported key), or a
        customer rotation whose new version is another key object (KMIP: a new object
        under the same Name, ADR 0038)."""
        return bool(self.previous_key_ref) and self.previous_key_ref != self.key_ref

    @property
    def new_index(self) -> str:
        return index_name(self.tenant_id, self.new_generation)

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RotationPlan:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in params.items() if k in known})


def plan_rotation(platform: Platform, rotation: KeyRotation) -> RotationPlan:
    """The run for an open ``rotation`` of its tenant's key; refusals first."""
    t = platform.state.get_tenant(rotation.tenant_id)
    if t is None:
        raise StateError(f"unknown tenant {rotation.tenant_id!r}", resource=f"tenant:{rotation.tenant_id}")
    if t.key_mode is KeyMode.MANAGED:
        raise ValidationError(f"tenant {t.tenant_id} is on the platform key: there is no customer rotation to confirm")
    status = platform.keychain.status(t.tenant_id)
    if status.revoked or t.revoked:
        raise ValidationError(f"tenant {t.tenant_id} is revoked: restore it before its key rotation is applied")
    if status.l1_ref not in (rotation.key_ref, rotation.previous_key_ref):
        raise ValidationError(f"the rotation is of {rotation.key_ref}, the tenant's L2 is wrapped by {status.l1_ref}")
    return RotationPlan(
        tenant_id=t.tenant_id,
        rotation_id=rotation.rotation_id,
        key_ref=rotation.key_ref,
        mode=t.key_mode.value,
        previous_version=rotation.previous_version,
        observed_version=rotation.observed_version,
        old_index=platform.index.current_index(t.tenant_id),
        new_generation=t.index_generation + 1,
        l1_generation_before=status.l1_generation,
        kind=rotation.kind,
        previous_key_ref=rotation.previous_key_ref,
    )


def _plan(ctx: RunContext) -> RotationPlan:
    plan: RotationPlan = ctx.plan
    return plan


def _rotation(ctx: RunContext) -> KeyRotation:
    plan = _plan(ctx)
    rotation = ctx.platform.state.get_rotation(plan.rotation_id)
    if rotation is None:
        raise StateError(f"rotation {plan.rotation_id} is gone", resource=f"rotation:{plan.rotation_id}")
    return rotation


# --- steps --------------------------------------------------------------------------------------


def preflight(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    rotation = _rotation(ctx)
    if not rotation.open:
        raise StateError(f"rotation {rotation.rotation_id} is {rotation.state.value}", resource=plan.rotation_id)
    t = ctx.tenant()
    if t.revoked or p.keychain.status(plan.tenant_id).revoked:
        raise ValidationError(f"tenant {plan.tenant_id} is revoked: restore it, then resume this run")
    if rotation.run_id != ctx.run_id:
        p.state.update_rotation(plan.rotation_id, expect=[rotation.state], run_id=ctx.run_id)
    return {"rotation_id": plan.rotation_id, "key_ref": plan.key_ref, "observed_version": plan.observed_version}


def pause(ctx: RunContext) -> dict[str, Any]:
    from archive_kms.migration.steps import STEP_FUNCTIONS

    return STEP_FUNCTIONS["pause"](ctx)


def confirm(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    rotation = _rotation(ctx)
    now = datetime.now(UTC)
    if rotation.state is RotationState.DETECTED:
        rotation = p.state.update_rotation(
            plan.rotation_id,
            expect=[RotationState.DETECTED],
            state=RotationState.AWAITING,
            nonce=new_challenge(),
            awaiting_since=now,
            run_id=ctx.run_id,
        )
        ctx.audit(
            "rotation.awaiting",
            {"rotation_id": plan.rotation_id, "key_ref": plan.key_ref, "observed_version": plan.observed_version},
        )
    if rotation.state is RotationState.AWAITING:
        since = rotation.awaiting_since or now
        overdue = (now - since).total_seconds() >= p.settings.rotation_reminder_seconds
        if overdue and not rotation.details.get("reminded_at"):
            p.state.update_rotation(
                plan.rotation_id, expect=[RotationState.AWAITING], details={"reminded_at": now.isoformat()}
            )
            ctx.audit("rotation.reminder", {"rotation_id": plan.rotation_id, "awaiting_since": since.isoformat()})
        raise StepWaiting(
            f"rotation {plan.rotation_id} of {plan.tenant_id}'s key to version {plan.observed_version} waits for the "
            f"customer's confirmation (console, or `archive-kms confirm-rotation {plan.tenant_id} "
            f"--rotation {plan.rotation_id}`); archive jobs are deferred meanwhile",
            {"rotation_id": plan.rotation_id, "reminder": overdue},
        )
    if rotation.state is not RotationState.CONFIRMED:
        raise StateError(f"rotation {plan.rotation_id} is {rotation.state.value}", resource=plan.rotation_id)
    return {
        "rotation_id": plan.rotation_id,
        "confirmed_by": rotation.confirmed_by,
        "confirmed_at": rotation.confirmed_at.isoformat() if rotation.confirmed_at else None,
    }


def prove_key(ctx: RunContext) -> dict[str, Any]:
    """The observed version is current at the provider and round-trips a test key."""
    plan, p = _plan(ctx), ctx.platform
    seen = current_key_version(p, plan.key_ref)
    if seen != plan.observed_version:
        raise IntegrityError(
            f"the current version of {plan.key_ref} is {seen}, the confirmed rotation is to {plan.observed_version}: "
            "the key changed again; cancel this run (a new rotation is detected)",
            resource=plan.key_ref,
        )
    provider = p.resolve_provider(plan.key_ref)
    if plan.switches_key and plan.kind == "customer":
        check = getattr(provider, "check_metadata", None)
        if check is not None:
            check()  # another object of the customer's: it must be a usable master key (preflight's checks)
    probe = SecretBytes(secrets.token_bytes(32))
    context = {"tenant": plan.tenant_id, "purpose": "rotation-proof"}
    wrapped = provider.wrap(probe, context=context)
    back = provider.unwrap(wrapped, context=context)
    if not hmac.compare_digest(back.reveal(), probe.reveal()):
        raise IntegrityError(f"a test key wrapped under {plan.key_ref} did not unwrap to itself", resource=plan.key_ref)
    return {"version": seen, "wrap_ref": wrapped.key_ref, "round_trip": "ok", "provider_calls": 3}


def rewrap(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    status = p.keychain.status(plan.tenant_id)
    calls_before = p.keychain.provider_calls
    if status.l1_generation == plan.l1_generation_before:
        status = p.keychain.rotate_l1(plan.tenant_id, p.resolve_provider(plan.key_ref))
        crashpoints.hit("rotate:after-rewrap-commit")
    calls = p.keychain.provider_calls - calls_before
    after = current_key_version(p, plan.key_ref)
    if after != plan.observed_version:  # the wrap went to the version current at the time
        raise IntegrityError(
            f"{plan.key_ref} moved to version {after} during the re-wrap; rerun the step", resource=plan.key_ref
        )
    return {
        "l1_generation": status.l1_generation,
        "wrapped_under_version": plan.observed_version,
        "provider_wraps": calls.wrap,
        "provider_unwraps": calls.unwrap,
    }


def _records(ctx: RunContext) -> Any:
    from archive_kms.migration.steps import _records as read_records

    return read_records(ctx, ctx.platform.store_for(ctx.platform.location_of(_plan(ctx).tenant_id)))


def build_index(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    t = ctx.tenant()
    report = rebuild_generation(
        _records(ctx),
        p.index,
        plan.tenant_id,
        plan.new_generation,
        p.index_mode(t.key_mode),
        p.search_keys(plan.tenant_id, t.key_mode),
    )
    report.require_complete()
    expected = sum(1 for _ in p.store_for(p.location_of(plan.tenant_id)).list(RECORD_PREFIX))
    if report.count != expected:
        raise IntegrityError(f"index {report.index} holds {report.count} documents, storage {expected} records")
    return {"index": report.index, "documents": report.count, "seconds": round(report.seconds, 3)}


def cutover(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    t = ctx.tenant()
    if t.index_generation != plan.new_generation or (plan.switches_key and t.key_ref != plan.key_ref):
        key_ref = plan.key_ref if plan.switches_key else t.key_ref
        p.state.update_tenant(replace(t, index_generation=plan.new_generation, key_ref=key_ref), fence=ctx.fence)
    current = p.index.current_index(plan.tenant_id)
    if current != plan.new_index:
        p.index.swap_alias(plan.tenant_id, plan.new_index, expected_current=plan.old_index)
    ctx.audit("tenant.index_cutover", {"index": plan.new_index, "rotation_id": plan.rotation_id})
    return {"index": plan.new_index}


def cleanup_index(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    deleted = []
    for g in p.index.list_generations(plan.tenant_id):
        if g.index != plan.new_index and p.index.current_index(plan.tenant_id) == plan.new_index:
            p.index.delete_index(g.index)
            deleted.append(g.index)
    return {"deleted": deleted}


def resume(ctx: RunContext) -> dict[str, Any]:
    p, tenant = ctx.platform, _plan(ctx).tenant_id
    outcomes = replay_deferred(p.state, tenant, ctx.run_id, p.open_archive, fence=ctx.fence, reclaim_after=timedelta(0))
    gate = p.state.gate(tenant)
    if gate.state.value != "open" or gate.pending:
        raise StateError(f"{gate.pending} deferred job(s) of {tenant} not replayed yet; rerun the step")
    ran = [o for o in outcomes if o.decision == "run"]
    return {"replayed": len(ran), "records": sum(o.records for o in ran), "gate": gate.state.value}


def canary(platform: Platform, tenant_id: str, rotation: KeyRotation) -> dict[str, Any]:
    """Whether the customer may disable the old key version now: the L2 was re-wrapped
    after the rotation (L1 generation bumped, by the rotation's run, under the observed
    version), the provider still has that version current, and the tenant's only index
    generation is the current one, built after the re-wrap."""
    status = platform.keychain.status(tenant_id)
    run = platform.state.get_run(rotation.run_id) if rotation.run_id else None
    rewrapped = (run.step("rewrap").result or {}) if run is not None else {}
    generations = [g.index for g in platform.index.list_generations(tenant_id)]
    current = platform.index.current_index(tenant_id)
    built = (run.step("build_index").result or {}).get("index") if run is not None else None
    checks = {
        "l2_under_the_key": status.l1_ref == platform.resolve_provider(rotation.key_ref).key_ref,
        "l2_rewrapped": bool(rewrapped) and status.l1_generation == rewrapped.get("l1_generation"),
        "l2_under_new_version": rewrapped.get("wrapped_under_version") == rotation.observed_version,
        "provider_current_version": current_key_version(platform, rotation.key_ref) == rotation.observed_version,
        "index_rebuilt": current is not None and current == built and generations == [current],
    }
    return {"safe_to_disable_old_version": all(checks.values()), "checks": checks}


def retire(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    rotation = _rotation(ctx)
    result = canary(p, plan.tenant_id, rotation)
    if not result["safe_to_disable_old_version"]:
        failed = [k for k, v in result["checks"].items() if not v]
        raise IntegrityError(f"the old key version is still needed ({', '.join(failed)}); rerun from rewrap")
    p.state.record_key_version(plan.tenant_id, plan.key_ref, plan.observed_version)
    if plan.observed_version is not None:  # the monitor's accepted version too: its warning clears
        accept_key_version(p, plan.tenant_id, plan.observed_version, actor=ctx.actor)
    retired = None
    if plan.kind == "byok" and plan.previous_key_ref and plan.previous_key_ref != plan.key_ref:
        retired = _retire_old_byok_key(ctx, plan.previous_key_ref)
    if rotation.state is not RotationState.COMPLETED:
        p.state.update_rotation(
            plan.rotation_id,
            expect=[RotationState.CONFIRMED],
            state=RotationState.COMPLETED,
            completed_at=datetime.now(UTC),
            details={"canary": result["checks"], "old_version_retired": plan.previous_version},
        )
    ctx.audit(
        "rotation.completed",
        {"rotation_id": plan.rotation_id, "version": plan.observed_version, "previous": plan.previous_version},
    )
    if plan.switches_key and plan.kind == "customer":
        # The old object is the customer's: nothing wraps under it now; they deactivate it.
        ctx.audit("rotation.old_key_released", {"key_ref": plan.previous_key_ref, "replaced_by": plan.key_ref})
    return {
        **result,
        "previous_version": plan.previous_version,
        "version": plan.observed_version,
        "old_key_retired": retired,
        "previous_key_ref": plan.previous_key_ref,
    }


def _retire_old_byok_key(ctx: RunContext, old_ref: str) -> str:
    """Retire the old imported key (BYOK): after the canary nothing is wrapped under it. KMS
    deletes its material, Key Vault soft-deletes it (ADR 0036). Once per run (a checkpoint),
    so a rerun does not ask the key service again."""
    done = ctx.platform.state.load_checkpoints(ctx.run_id, "retire").get(0)
    if done is None:
        if old_ref.startswith("azure-kv://"):
            from archive_kms.keys.azure_byok import KeyVaultByokImporter

            KeyVaultByokImporter.from_settings(ctx.platform.settings).retire(old_ref)
        else:
            from archive_kms.keys.byok import ByokImporter

            ByokImporter.from_settings(ctx.platform.settings).delete_material(old_ref)
        ctx.platform.state.save_checkpoint(ctx.run_id, "retire", 0, {"old_key_retired": old_ref}, fence=ctx.fence)
        ctx.audit("byok.old_key_retired", {"key_ref": old_ref})
    return old_ref


def report(ctx: RunContext) -> dict[str, Any]:
    return rotate_report(ctx.platform, ctx.run(), True)


ROTATE_STEP_FUNCTIONS: dict[str, Step] = {
    "preflight": preflight,
    "pause": pause,
    "confirm": confirm,
    "prove_key": prove_key,
    "rewrap": rewrap,
    "build_index": build_index,
    "cutover": cutover,
    "cleanup_index": cleanup_index,
    "resume": resume,
    "retire": retire,
    "report": report,
}


def _cancel(platform: Platform, run: MigrationRun, plan: Any, fence: Any) -> list[str]:
    """Before ``rewrap``: reopen the gate (replaying the deferred jobs), drop a half-built
    index generation, and close the rotation as cancelled (the key version stays unknown:
    the next check detects it again)."""
    undone: list[str] = []
    if platform.index.current_index(plan.tenant_id) != plan.new_index:
        platform.index.delete_index(plan.new_index)
    if platform.state.gate(plan.tenant_id).paused_by_run == run.run_id:
        replayed = replay_deferred(platform.state, plan.tenant_id, run.run_id, platform.open_archive, fence=fence)
        undone.append(f"pause ({len(replayed)} deferred job(s) replayed)")
    rotation = platform.state.get_rotation(plan.rotation_id)
    if rotation is not None and rotation.open:
        platform.state.update_rotation(plan.rotation_id, expect=[rotation.state], state=RotationState.CANCELLED)
        undone.append("rotation cancelled")
    return undone


ROTATE_FLOW = FlowDefinition(
    flow=Flow.ROTATE.value,
    steps=ROTATE_STEPS,
    point_of_no_return=ROTATE_POINT_OF_NO_RETURN,
    plan_from_params=RotationPlan.from_params,
    step_functions=lambda: ROTATE_STEP_FUNCTIONS,
    cancel=_cancel,
    summary="the L2 is wrapped under the new key version",
    rerun_consequence="re-wrap it again under the same version",
)


def rotate_report(platform: HasRunLedger, run: MigrationRun, final: bool = False) -> dict[str, Any]:
    from archive_kms.migration.report import progress

    plan = RotationPlan.from_params(run.params)
    rewrapped = run.step("rewrap").result or {}
    retired = run.step("retire").result or {}
    return {
        "run_id": run.run_id,
        "tenant": run.tenant_id,
        "flow": run.flow.value,
        "mode": run.mode,
        "state": "completed" if final else run.state.value,
        "rotation_id": plan.rotation_id,
        "key_ref": plan.key_ref,
        "previous_version": plan.previous_version,
        "version": plan.observed_version,
        "confirmed_by": (run.step("confirm").result or {}).get("confirmed_by"),
        "provider_wraps": rewrapped.get("provider_wraps"),
        "provider_unwraps": rewrapped.get("provider_unwraps"),
        "index": (run.step("build_index").result or {}).get("index"),
        "old_indices_deleted": (run.step("cleanup_index").result or {}).get("deleted"),
        "replayed_jobs": (run.step("resume").result or {}).get("replayed"),
        "safe_to_disable_old_version": retired.get("safe_to_disable_old_version"),
        "total_seconds": total_seconds(run),
        "progress": progress(platform, run),
        "steps": step_rows(run),
    }


register_report(Flow.ROTATE.value, rotate_report)


def rotation_waiting(platform: Platform, run: MigrationRun) -> bool:
    return run.state.value == "running" and run.step("confirm").state is StepState.RUNNING


def audit_detected(platform: Platform, rotation: KeyRotation, actor: str) -> None:
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="rotation.detected",
            tenant_id=rotation.tenant_id,
            details={
                "rotation_id": rotation.rotation_id,
                "key_ref": rotation.key_ref,
                "previous_version": rotation.previous_version,
                "observed_version": rotation.observed_version,
            },
        )
    )
