"""The erase flow: crypto-erasure of a tenant's expired time buckets or of a whole
workspace, with its data deleted from storage and search and one signed record covering
all three (product.md "Flows" 5; issue #14; issue #11 finding 6).

Steps (``ERASE_STEPS``; the engine of ADR 0025 runs them, checkpointed):

- ``preflight``: the tenant still lives where the plan says, its scope is still live, a
  revoked tenant with a keyed index is refused (its document ids need its keys).
- ``inventory``: every object the erasure covers goes into the run's manifest (names,
  sizes): the DEK id of each, from its metadata, confirmed from its envelope header.
- ``unindex`` (**point of no return**): their index documents are deleted from every
  generation of the tenant's index, so search stops returning them before the keys go.
- ``destroy_keys``: the keychain destroys the DEKs (``erase_buckets`` per workspace, or
  ``erase_workspace``), one signed ``ErasureRecord`` per workspace, in the audit log.
- ``delete_objects``: the objects are deleted (storage reclaimed); objects written into
  the scope since the inventory (a job that raced a workspace erasure) are found again,
  added to the manifest and unindexed too.
- ``verify``: nothing the scope covers is left in storage, no document of a deleted record
  is left in any generation, and every destroyed DEK refuses to open.
- ``record``: the signed erasure record (``operations.erasure_record``) covering keys,
  storage and index, in the audit log (``erasure.record``) and the step result.
- ``report``.

Each step converges when run again after a crash: deleting what is gone and destroying
what is destroyed are no-ops, and ``destroy_keys`` reads the signed records it made back
from the audit log. Crash points: ``before:<step>``, ``after:<step>`` (the engine), and
``erase:between-workspaces`` (after each workspace's keys were destroyed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms import crashpoints
from archive_kms.errors import (
    ArchiveKmsError,
    IntegrityError,
    KeyDestroyedError,
    KeyUnavailableError,
    StateError,
    TransientError,
    ValidationError,
)
from archive_kms.migration.context import FlowDefinition, RunContext, Step
from archive_kms.migration.report import HasRunLedger, register_report, step_rows, total_seconds
from archive_kms.operations.blast_radius import register_dry_run
from archive_kms.operations.erasure import (
    ErasureScope,
    check_erasable,
    covered_objects,
    doomed_deks,
    erasure_blast_radius,
    erasure_scope,
    record_document_ids,
    unindex,
)
from archive_kms.operations.erasure_record import ErasureCertificate, digest_of_names
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, Flow, ManifestEntry, MigrationRun
from archive_kms.storage import Location

__all__ = [
    "ERASE_FLOW",
    "ERASE_POINT_OF_NO_RETURN",
    "ERASE_STEPS",
    "ErasurePlan",
    "RetentionDecision",
    "plan_erase",
    "plan_retention_erasures",
]

log = logging.getLogger(__name__)

ERASE_STEPS: tuple[str, ...] = (
    "preflight",
    "inventory",
    "unindex",
    "destroy_keys",
    "delete_objects",
    "verify",
    "record",
    "report",
)
#: From here on the erasure goes through: search no longer returns the data.
ERASE_POINT_OF_NO_RETURN = "unindex"
TRIGGERS = ("operator", "retention")
MAX_REASON_CHARS = 500
MANIFEST_PAGE = 1000


@dataclass(frozen=True)
class ErasurePlan:
    tenant_id: str
    scope: str  # "buckets" | "workspace"
    older_than: str | None  # ISO 8601 UTC, scope buckets
    workspace_id: str | None  # scope workspace
    workspaces: tuple[str, ...]
    location: Mapping[str, Any]  # the tenant's storage location when planned
    mode: str  # the tenant's key mode when planned
    key_ref: str  # the tenant's L1 when planned
    reason: str
    trigger: str = "operator"
    retention_seconds: int | None = None
    flow: str = Flow.ERASE.value

    @property
    def erasure_scope(self) -> ErasureScope:
        older = datetime.fromisoformat(self.older_than) if self.older_than else None
        return ErasureScope(self.tenant_id, self.scope, older, self.workspace_id, tuple(self.workspaces))

    @property
    def location_value(self) -> Location:
        return Location.from_dict(self.location)

    def to_params(self) -> dict[str, Any]:
        d = asdict(self)
        d["workspaces"], d["location"] = list(self.workspaces), dict(self.location)
        return d

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ErasurePlan:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in params.items() if k in known}
        values["workspaces"] = tuple(values.get("workspaces") or ())
        return cls(**values)


def _reason(reason: str | None, default: str) -> str:
    text = (reason or default).strip()
    if not text or len(text) > MAX_REASON_CHARS or any(not c.isprintable() for c in text):
        raise ValidationError(f"the erasure reason must be 1..{MAX_REASON_CHARS} printable characters on one line")
    return text


def plan_erase(
    platform: Platform,
    tenant_id: str,
    *,
    before: datetime | None = None,
    workspace: str | None = None,
    reason: str | None = None,
    trigger: str = "operator",
    retention_seconds: int | None = None,
    now: datetime | None = None,
) -> ErasurePlan:
    """Plan erasing ``tenant_id``'s buckets before ``before`` or its ``workspace``; every
    refusal the run would give (``erasure_scope``, ``check_erasable``) comes now."""
    if trigger not in TRIGGERS:
        raise ValidationError(f"trigger must be one of {', '.join(TRIGGERS)}")
    scope = erasure_scope(platform, tenant_id, before=before, workspace=workspace, now=now)
    check_erasable(platform, scope.tenant_id)
    t = platform.state.get_tenant(scope.tenant_id)
    assert t is not None
    default = "retention period ended" if trigger == "retention" else f"erase {scope.describe()}"
    return ErasurePlan(
        tenant_id=scope.tenant_id,
        scope=scope.scope,
        older_than=scope.older_than.isoformat() if scope.older_than else None,
        workspace_id=scope.workspace_id,
        workspaces=scope.workspaces,
        location=dict(t.location),
        mode=t.key_mode.value,
        key_ref=t.key_ref or platform.keychain.status(scope.tenant_id).l1_ref,
        reason=_reason(reason, default),
        trigger=trigger,
        retention_seconds=retention_seconds,
    )


# --- retention ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionDecision:
    """What the scheduled erase decided for one tenant with a retention policy."""

    tenant_id: str
    retention_seconds: int
    cutoff: datetime
    plan: ErasurePlan | None  # None: nothing to do now (``why``)
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant_id,
            "retention_seconds": self.retention_seconds,
            "cutoff": self.cutoff.isoformat(timespec="seconds"),
            "erase": self.plan is not None,
            "why": self.why,
        }


def plan_retention_erasures(platform: Platform, *, now: datetime | None = None) -> list[RetentionDecision]:
    """For every tenant with a retention policy: the erasure its expired buckets need now
    (every bucket that ended more than the retention ago), or why none. A bucket is
    erased once its *end* is older than the retention, so no record is erased before its
    retention has passed."""
    current = now or datetime.now(UTC)
    out: list[RetentionDecision] = []
    for policy in platform.state.list_retention():
        tid = policy.tenant_id
        cutoff = current - timedelta(seconds=policy.retention_seconds)
        try:
            if platform.state.find_active_run(tid) is not None:
                out.append(RetentionDecision(tid, policy.retention_seconds, cutoff, None, "a run is going"))
                continue
            plan = plan_erase(
                platform,
                tid,
                before=cutoff,
                trigger="retention",
                retention_seconds=policy.retention_seconds,
                now=current,
            )
            if not doomed_deks(platform, plan.erasure_scope):
                out.append(RetentionDecision(tid, policy.retention_seconds, cutoff, None, "nothing has expired"))
                continue
            out.append(RetentionDecision(tid, policy.retention_seconds, cutoff, plan, "expired buckets"))
        except ArchiveKmsError as exc:
            out.append(RetentionDecision(tid, policy.retention_seconds, cutoff, None, f"{type(exc).__name__}: {exc}"))
    return out


# --- steps --------------------------------------------------------------------------------------


def _plan(ctx: RunContext) -> ErasurePlan:
    plan: ErasurePlan = ctx.plan
    return plan


def preflight(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    check_erasable(p, plan.tenant_id)
    t = ctx.tenant()
    if dict(t.location) != dict(plan.location):
        raise StateError(
            f"tenant {plan.tenant_id} moved since this erasure was planned (now {Location.from_dict(t.location).uri}); "
            "cancel this run and start a new one",
            resource=f"tenant:{plan.tenant_id}",
        )
    status = p.keychain.status(plan.tenant_id)
    if plan.scope == "workspace" and plan.workspace_id not in status.workspaces:
        raise ValidationError(f"workspace {plan.workspace_id} of {plan.tenant_id} is no longer live")
    deks = doomed_deks(p, plan.erasure_scope)
    return {
        "scope": plan.scope,
        "description": plan.erasure_scope.describe(),
        "workspaces": list(plan.workspaces),
        "deks": sum(len(v) for v in deks.values()),
    }


def inventory(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    p.state.create_manifest(ctx.run_id, plan.location, fence=ctx.fence)
    page: list[ManifestEntry] = []
    for info in covered_objects(p, plan.erasure_scope, plan.location_value):
        page.append(ManifestEntry(info.name, info.size, 0, info.etag))
        if len(page) >= MANIFEST_PAGE:
            p.state.add_manifest_entries(ctx.run_id, page, fence=ctx.fence)
            page.clear()
            ctx.check()
    if page:
        p.state.add_manifest_entries(ctx.run_id, page, fence=ctx.fence)
    summary = ctx.manifest_summary()
    records = sum(1 for e in p.state.iter_manifest(ctx.run_id) if e.name.startswith(b"records/"))
    return {"objects": summary.entries, "bytes": summary.total_bytes, "records": records}


def _manifest_names(ctx: RunContext) -> list[bytes]:
    return [e.name for e in ctx.platform.state.iter_manifest(ctx.run_id)]


def unindex_step(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    ids = record_document_ids(p, plan.tenant_id, _manifest_names(ctx))
    result = unindex(p, plan.tenant_id, ids)
    return {"indices": list(result.indices), "documents_deleted": result.deleted, "ids_named": len(ids)}


def destroy_keys(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    mark = p.state.load_checkpoints(ctx.run_id, "destroy_keys").get(0)
    if mark is None:
        mark = {"head_version_before": p.keychain.status(plan.tenant_id).head_version}
        p.state.save_checkpoint(ctx.run_id, "destroy_keys", 0, mark, fence=ctx.fence)
    reason = f"{plan.reason} (erase run {ctx.run_id})"
    scope = plan.erasure_scope
    for ws in sorted(plan.workspaces):
        ctx.check()
        if plan.scope == "workspace":
            p.keychain.erase_workspace(plan.tenant_id, ws, reason=reason)
        else:
            assert scope.older_than is not None
            p.keychain.erase_buckets(plan.tenant_id, ws, scope.older_than, reason=reason)
        crashpoints.hit("erase:between-workspaces")
    records = _erasure_records(ctx, int(mark["head_version_before"]))
    return {
        "records": records,
        "dek_ids_destroyed": sum(len(r["dek_ids"]) for r in records),
        "workspaces_destroyed": sorted(r["workspace_id"] for r in records if r["l3_destroyed"]),
    }


def _erasure_records(ctx: RunContext, after_version: int) -> list[dict[str, Any]]:
    """The signed keychain erasure records this run's commits wrote, read back from the
    audit log (so a rerun after a crash between a commit and the step's completion still
    has the evidence of the first attempt), one per workspace that changed."""
    import json

    plan = _plan(ctx)
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in ctx.platform.state.iter_audit(tenant_id=plan.tenant_id):
        d = rec.details
        if rec.action != "keychain.erase" or "erasure_record" not in d:
            continue
        if int(d.get("head_version", 0)) <= after_version or d.get("workspace_id") not in plan.workspaces:
            continue
        found[(d["workspace_id"], int(d["head_version"]))] = json.loads(d["erasure_record"])
    return [found[k] for k in sorted(found)]


def delete_objects(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    known = set(_manifest_names(ctx))
    late = [info for info in covered_objects(p, plan.erasure_scope, plan.location_value) if info.name not in known]
    late_docs = 0
    if late:
        # Written into the scope after the inventory (a job that raced a workspace erasure):
        # just as erased; recorded, unindexed and deleted with the rest.
        p.state.add_manifest_entries(
            ctx.run_id, [ManifestEntry(i.name, i.size, 0, i.etag) for i in late], fence=ctx.fence
        )
        late_docs = unindex(p, plan.tenant_id, record_document_ids(p, plan.tenant_id, [i.name for i in late])).deleted
    store = p.store_for(plan.location_value)
    deleted = store.delete_many(_manifest_names(ctx))
    summary = ctx.manifest_summary()
    return {
        "objects_deleted": deleted,
        "bytes_deleted": summary.total_bytes,
        "late_objects": len(late),
        "late_documents_deleted": late_docs,
    }


def verify(ctx: RunContext) -> dict[str, Any]:
    """Nothing the erasure covers is left: no object under an erased DEK in storage, no
    document of an erased record in any index generation, no destroyed DEK that opens."""
    plan, p = _plan(ctx), ctx.platform
    left = [i.name for i in covered_objects(p, plan.erasure_scope, plan.location_value)]
    if left:
        raise IntegrityError(
            f"{len(left)} object(s) under erased keys are still in {plan.location_value.uri} (first: "
            f"{left[0][:80]!r}); rerun from delete_objects",
            resource=plan.location_value.uri,
        )
    store = p.store_for(plan.location_value)
    gone = [n for n in _manifest_names(ctx) if store.head(n) is None]
    stray = unindex(p, plan.tenant_id, record_document_ids(p, plan.tenant_id, gone)).deleted
    if stray:
        raise TransientError(
            f"{stray} index document(s) of erased records were still searchable (deleted now); rerun the step",
            resource=f"tenant:{plan.tenant_id}",
        )
    destroyed = [d for r in (ctx.run().step("destroy_keys").result or {}).get("records", []) for d in r["dek_ids"]]
    for dek_id in destroyed:
        try:
            p.keychain.dek_by_id(plan.tenant_id, dek_id)
        except KeyDestroyedError:
            continue
        except KeyUnavailableError:  # revoked meanwhile: it does not open either
            continue
        raise IntegrityError(f"DEK {dek_id} of {plan.tenant_id} still opens after its erasure")
    return {
        "objects_remaining": 0,
        "documents_remaining": 0,
        "deks_checked": len(destroyed),
        "result": "ok",
    }


def record(ctx: RunContext) -> dict[str, Any]:
    plan, p = _plan(ctx), ctx.platform
    kept = p.state.load_checkpoints(ctx.run_id, "record").get(0)
    if kept is not None:  # a rerun: the same signed document, not a second one
        return {"certificate": kept["certificate"], "audit_seq": kept.get("audit_seq")}
    run = ctx.run()
    keys = run.step("destroy_keys").result or {}
    removed = run.step("delete_objects").result or {}
    names = _manifest_names(ctx)
    doc_ids = record_document_ids(p, plan.tenant_id, names)
    unindexed = (run.step("unindex").result or {}).get("documents_deleted", 0) + removed.get(
        "late_documents_deleted", 0
    )
    cert = ErasureCertificate(
        tenant_id=plan.tenant_id,
        run_id=ctx.run_id,
        scope=plan.scope,
        workspace_id=plan.workspace_id,
        older_than=plan.erasure_scope.older_than,
        reason=plan.reason,
        trigger=plan.trigger,
        erased_at=datetime.now(UTC),
        key_records=tuple(keys.get("records", [])),
        dek_ids_destroyed=int(keys.get("dek_ids_destroyed", 0)),
        workspaces_destroyed=tuple(keys.get("workspaces_destroyed", [])),
        storage={
            "location": plan.location_value.uri,
            "objects_deleted": len(names),
            "bytes_deleted": int(removed.get("bytes_deleted", 0)),
            "names_sha256": digest_of_names(names),
            "remaining": 0,
        },
        index={
            "indices": list((run.step("unindex").result or {}).get("indices", [])),
            "documents_deleted": int(unindexed),
            "doc_ids_sha256": digest_of_names(doc_ids),
            "remaining": 0,
        },
    ).signed(p.require_signer())
    text = cert.to_json().decode("ascii")
    entry = p.state.append_audit(
        AuditEvent(
            actor=ctx.actor,
            action="erasure.record",
            tenant_id=plan.tenant_id,
            run_id=ctx.run_id,
            details={"certificate": text, "scope": plan.scope, "dek_ids_destroyed": cert.dek_ids_destroyed},
        )
    )
    p.state.save_checkpoint(ctx.run_id, "record", 0, {"certificate": text, "audit_seq": entry.seq}, fence=ctx.fence)
    return {"certificate": text, "audit_seq": entry.seq}


def report(ctx: RunContext) -> dict[str, Any]:
    from archive_kms.migration.steps import anchor_audit

    out = erase_report(ctx.platform, ctx.run(), True)
    if ctx.platform.anchors is not None:
        out["audit_anchor"] = anchor_audit(ctx, ctx.platform.anchors)
    return out


ERASE_STEP_FUNCTIONS: dict[str, Step] = {
    "preflight": preflight,
    "inventory": inventory,
    "unindex": unindex_step,
    "destroy_keys": destroy_keys,
    "delete_objects": delete_objects,
    "verify": verify,
    "record": record,
    "report": report,
}


def _cancel(platform: Platform, run: MigrationRun, plan: Any, fence: Any) -> list[str]:
    """Before ``unindex`` nothing was deleted or destroyed: only the inventory is dropped
    (its manifest stays with the cancelled run, as a record of what it would have taken)."""
    return ["nothing was deleted or destroyed"]


ERASE_FLOW = FlowDefinition(
    flow=Flow.ERASE.value,
    steps=ERASE_STEPS,
    point_of_no_return=ERASE_POINT_OF_NO_RETURN,
    plan_from_params=ErasurePlan.from_params,
    step_functions=lambda: ERASE_STEP_FUNCTIONS,
    cancel=_cancel,
    summary="its documents are out of the index",
    rerun_consequence="undo nothing: the erasure goes on",
)


# --- report and dry run -------------------------------------------------------------------------


def certificate_of(run: MigrationRun) -> str | None:
    """The signed erasure record of a completed ``record`` step, as its JSON text."""
    try:
        return (run.step("record").result or {}).get("certificate")
    except KeyError:
        return None


def erase_report(platform: HasRunLedger, run: MigrationRun, final: bool = False) -> dict[str, Any]:
    from archive_kms.migration.report import progress

    plan = ErasurePlan.from_params(run.params)
    keys = run.step("destroy_keys").result or {}
    removed = run.step("delete_objects").result or {}
    unindexed = run.step("unindex").result or {}
    inventory_result = run.step("inventory").result or {}
    return {
        "run_id": run.run_id,
        "tenant": run.tenant_id,
        "flow": run.flow.value,
        "mode": run.mode,
        "state": "completed" if final else run.state.value,
        "scope": plan.scope,
        "older_than": plan.older_than,
        "workspace": plan.workspace_id,
        "trigger": plan.trigger,
        "reason": plan.reason,
        "location": plan.location_value.uri,
        "objects": inventory_result.get("objects", 0) + removed.get("late_objects", 0),
        "bytes": removed.get("bytes_deleted", inventory_result.get("bytes", 0)),
        "deks_destroyed": keys.get("dek_ids_destroyed"),
        "workspaces_destroyed": keys.get("workspaces_destroyed"),
        "objects_deleted": removed.get("objects_deleted"),
        "index_documents_deleted": (unindexed.get("documents_deleted") or 0)
        + (removed.get("late_documents_deleted") or 0)
        if unindexed
        else None,
        "verification": (run.step("verify").result or {}).get("result", "pending"),
        "erasure_record": "signed" if certificate_of(run) else "pending",
        "total_seconds": total_seconds(run),
        "progress": progress(platform, run),
        "steps": step_rows(run),
    }


register_report(Flow.ERASE.value, erase_report)


def _describe_erase(platform: Platform, tenant_id: str) -> list[str]:
    """The console's blast-radius lines for ``erase``: what the tenant's retention policy
    would erase now (the scheduled erasure)."""
    policy = platform.state.get_retention(tenant_id)
    if policy is None:
        raise ValidationError(
            f"tenant {tenant_id} has no retention policy: set one (`archive-kms retention set {tenant_id} --days N`) "
            "or preview a workspace erasure with `archive-kms erase TENANT --workspace W --dry-run`"
        )
    cutoff = datetime.now(UTC) - timedelta(seconds=policy.retention_seconds)
    b = erasure_blast_radius(platform, tenant_id, before=cutoff)
    return (
        [f"retention {policy.retention_seconds} s: {b.description}"]
        + b.would
        + [f"totals: {b.deks} DEKs, {b.objects} objects ({b.bytes} bytes), {b.index_documents} index documents"]
    )


register_dry_run("erase", _describe_erase)


def certificate_json(run: MigrationRun) -> bytes:
    """The erasure record of a completed erase run, as the bytes a customer verifies."""
    text = certificate_of(run)
    if text is None:
        raise StateError(f"run {run.run_id} has no signed erasure record yet", resource=f"run:{run.run_id}")
    return text.encode("ascii")
