"""The steps of the enable and remove flows, as plain idempotent functions.

Each step takes the ``RunContext`` and returns a small JSON result (stored with the step;
never key material). Running a step again after it completed, or after it crashed half
way, converges to the same state: every side effect is either conditional (create if
absent, swap alias if it still points at the old index, update the registry if it still
has the old version) or recorded in the ledger before the next one. The engine
(``migration.engine``) decides which steps run; ``docs/migration-flows.md`` explains each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from archive_kms import retry
from archive_kms.domain.records import Record
from archive_kms.errors import (
    AliasConflictError,
    ArchiveKmsError,
    AuditForkError,
    ConfigurationError,
    CopyFailedError,
    IntegrityError,
    KeyUnavailableError,
    SearchError,
    StateError,
    TransientError,
)
from archive_kms.keys.keychain import parse_dek_id
from archive_kms.keys.preflight import check_usable
from archive_kms.migration import quarantine
from archive_kms.migration.context import RunContext
from archive_kms.migration.plan import EnableMode
from archive_kms.migration.stopping import StopRequestedError
from archive_kms.migration.threads import beside, worker_threads
from archive_kms.operations.archive import RECORD_PREFIX, fence_stalled_jobs, replay_deferred
from archive_kms.search import alias_name, rebuild_generation
from archive_kms.state.anchors import AnchorStore
from archive_kms.state.port import CopyStatus, Flow, KeyMode, ManifestEntry, StepState
from archive_kms.storage import ObjectStore
from archive_kms.storage.name_limits import require_names_fit

Step = Callable[[RunContext], dict[str, Any]]

log = logging.getLogger(__name__)

MANIFEST_PAGE = 1000
PAUSE_WAIT_SECONDS = 300.0
#: ``RunContext.marks`` key: when cutover saw the registry point at the destination.
REGISTRY_SWITCHED = "registry_switched"


def _shard_of(name: bytes, shards: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name).digest()[:4], "big") % shards


# --- preflight ----------------------------------------------------------------------------


def _check_platform_vault(vault_url: str | None, key_ref: str, details: dict[str, Any]) -> None:
    """Mode byok on Azure: an RSA-HSM key imported into the platform's vault (ADR 0036); a
    key in the customer's own vault is mode byokv."""
    from urllib.parse import urlsplit

    from archive_kms.keys.refs import AzureKeyVaultKeyRef, parse_key_ref

    ref = parse_key_ref(key_ref)
    ours = urlsplit(vault_url or "")
    if not isinstance(ref, AzureKeyVaultKeyRef) or (ref.host, ref.port) != (
        ours.hostname,
        ours.port if ours.port != 443 else None,
    ):
        raise ConfigurationError(
            f"mode byok on Azure needs a key imported into the platform's vault ({vault_url or 'not configured'}); "
            f"{key_ref} is elsewhere: use --mode byokv for a key in your own vault",
            resource=key_ref,
        )
    if details.get("kty") != "RSA-HSM":
        raise ConfigurationError(
            f"mode byok on Azure needs an RSA-HSM key imported from a .byok file; {key_ref} is {details.get('kty')}",
            resource=key_ref,
        )


def preflight(ctx: RunContext) -> dict[str, Any]:
    """Refuse before any byte moves: tenant state, key usable (test wrap/unwrap under the
    customer key, metadata, origin), the current key still opens the keychain, the index
    answers, and the destination is free of anything this run did not write."""
    plan, p = ctx.plan, ctx.platform
    checks: list[str] = []
    t = p.state.get_tenant(plan.tenant_id)
    if t is None:
        raise StateError(f"tenant {plan.tenant_id} disappeared", resource=f"tenant:{plan.tenant_id}")
    status = p.keychain.status(plan.tenant_id)
    if t.revoked or status.revoked:
        raise KeyUnavailableError(
            f"tenant {plan.tenant_id} is revoked: restore it before migrating", resource=f"tenant:{plan.tenant_id}"
        )
    if dict(t.location) not in (dict(plan.source), dict(plan.destination)):
        raise StateError(
            f"tenant {plan.tenant_id} moved since this run was planned (now {t.location}); start a new run",
            resource=f"tenant:{plan.tenant_id}",
        )
    checks.append("tenant")

    # The key we move onto: usable, of the right kind, bound to the tenant.
    target = p.resolve_provider(plan.key_ref)
    report = check_usable(target, {"tenant": plan.tenant_id})
    details = dict(report.status.details or {}) | dict(report.metadata or {})
    origin = details.get("origin")
    if plan.mode == EnableMode.BYOK.value and origin not in (None, "EXTERNAL"):
        raise ConfigurationError(
            f"mode byok needs a KMS key with imported material (Origin EXTERNAL); "
            f"{plan.key_ref} has Origin {origin}: use --mode byokms for it",
            resource=plan.key_ref,
        )
    if plan.mode == EnableMode.BYOK.value and plan.key_ref.startswith("azure-kv://"):
        _check_platform_vault(p.settings.azure_keyvault_url, plan.key_ref, details)
    if plan.mode == EnableMode.BYOKMS.value and origin == "EXTERNAL":
        raise ConfigurationError(
            f"{plan.key_ref} holds imported material (Origin EXTERNAL): use --mode byok", resource=plan.key_ref
        )
    if report.status.expires_at is not None and report.status.expires_at <= datetime.now(UTC):
        raise KeyUnavailableError(
            f"imported key material of {plan.key_ref} expired at {report.status.expires_at}",
            resource=plan.key_ref,
            state="expired",
        )
    checks += [f"key:{c}" for c in report.checks]
    sse_arn = plan.destination_location.sse_kms_key_arn
    if sse_arn is not None:
        # S3 default encryption (SSE-KMS) only takes a key in the bucket's own region; a
        # key elsewhere would pass the wrap test and fail every PUT later.
        key_region, bucket_region = sse_arn.split(":")[3], p.settings.aws_region
        if key_region != bucket_region:
            raise ConfigurationError(
                f"key {plan.key_ref} is in region {key_region}, but the tenant's dedicated bucket is in "
                f"{bucket_region}: S3 default encryption needs a key in the bucket's region (create or replicate "
                f"the key in {bucket_region})",
                resource=plan.key_ref,
            )
        checks.append("key:region")

    # The key we move away from must still open the keychain (rotate_l1 unwraps with it).
    current = p.resolve_provider(status.l1_ref)
    cur_state = current.status().state
    if not cur_state.usable and status.l1_ref != target.key_ref:
        raise KeyUnavailableError(
            f"the tenant's current key {status.l1_ref} is {cur_state.value}: "
            "it must stay usable until the data is re-encrypted",
            resource=status.l1_ref,
        )
    checks.append("current-key")

    if plan.old_index is not None and p.index.current_index(plan.tenant_id) not in (plan.old_index, plan.new_index):
        raise SearchError(
            f"tenant {plan.tenant_id}'s alias no longer points at {plan.old_index}; start a new run",
            resource=alias_name(plan.tenant_id),
        )
    checks.append("index")

    dest_loc = plan.destination_location
    # Every source name must fit the target: a name that fits a dedicated bucket may not
    # fit under the shared prefix remove moves back to, and could never be copied.
    require_names_fit((info.name for info in p.store_for(plan.source_location).list()), dest_loc)
    checks.append("names")

    foreign = 0
    first: bytes | None = None
    dest_exists = p.provisioner.exists(dest_loc)
    created_by_us = ctx.run().step("create_destination").state is not StepState.PENDING
    if dest_exists:
        for info in p.store_for(dest_loc).list():
            if p.state.manifest_summary(ctx.run_id) is None or p.state.get_copy(ctx.run_id, info.name) is None:
                foreign += 1
                first = first or info.name
                if foreign >= 1000:
                    break
    if foreign:
        raise ConfigurationError(
            f"destination {dest_loc.uri} already holds {foreign}{'+' if foreign >= 1000 else ''} object(s) this run "
            f"did not write (first: {(first or b'')[:80]!r}); empty or remove it, or choose another destination",
            resource=dest_loc.uri,
        )
    checks.append("destination-free")
    return {
        "checks": checks,
        "destination_existed": dest_exists and not created_by_us,
        "key": {
            "ref": report.key_ref,
            "state": report.status.state.value,
            "wrap_ms": round(report.wrap_seconds * 1000, 1),
            "unwrap_ms": round(report.unwrap_seconds * 1000, 1),
            **{k: v for k, v in details.items() if k in ("origin", "key_spec", "region")},
        },
    }


# --- pause and the cutover point ------------------------------------------------------------


def pause(ctx: RunContext) -> dict[str, Any]:
    """Close the archive gate (new jobs are deferred) and wait for running jobs to finish.
    A job whose lease expired (its writer died, hangs or was frozen) is fenced, so it can
    never write again, and its partial output is rolled back; so is any job fenced or
    abandoned earlier whose rollback did not finish (ADR 0020). Only jobs that keep
    renewing their lease are waited for."""
    from datetime import timedelta

    p, tenant = ctx.platform, ctx.plan.tenant_id
    gate = p.state.pause(tenant, ctx.run_id, fence=ctx.fence)
    running: list[Any] = []
    rolled_back: list[dict[str, Any]] = []

    def drained() -> bool:
        rolled_back.extend(
            fence_stalled_jobs(
                p.state, p.open_archive, tenant, by=f"run {ctx.run_id}", actor=ctx.actor, run_id=ctx.run_id
            )
        )
        running[:] = p.state.running_jobs(tenant)
        if running:
            ctx.check()
        return not running

    retry.poll(
        drained,
        timeout=PAUSE_WAIT_SECONDS,
        backoff=retry.Backoff(base_delay=0.2, max_delay=0.2, jitter=False, factor=1),
        on_timeout=lambda: TransientError(
            f"{len(running)} archive job(s) of {tenant} still running after {PAUSE_WAIT_SECONDS:.0f} s and "
            f"renewing their lease (first: {running[0].job_id}); rerun the step, or give a hung one up with "
            f"`archive-kms jobs abandon {tenant} {running[0].job_id} --reason ...`"
        ),
    )
    out: dict[str, Any] = {"gate": gate.state.value, "paused_since": gate.since.isoformat()}
    if rolled_back:
        # A fenced writer's unfinished multipart upload must never complete later. Nothing
        # else writes here now: the gate is paused and no job runs.
        aborted = p.store_for(ctx.plan.source_location).abort_stale_uploads(timedelta(0))
        out |= {"jobs_rolled_back": rolled_back, "aborted_uploads": aborted}
    return out


def cutover_point(ctx: RunContext) -> dict[str, Any]:
    """Record what the tenant looked like when writes stopped, and write-block the old
    index so nothing can land in it unnoticed from here on (faults C5)."""
    p, plan = ctx.platform, ctx.plan
    gate = p.state.gate(plan.tenant_id)
    docs = None
    if plan.old_index is not None:
        p.index.refresh(plan.old_index)
        docs = p.index.count(plan.old_index)
        p.index.set_write_block(plan.old_index, True)
    return {
        "at": datetime.now(UTC).isoformat(),
        "gate_since": gate.since.isoformat(),
        "deferred_at_point": gate.pending,
        "old_index": plan.old_index,
        "old_index_documents": docs,
    }


# --- destination and key --------------------------------------------------------------------


def create_destination(ctx: RunContext) -> dict[str, Any]:
    loc = ctx.plan.destination_location
    existed = ctx.platform.provisioner.exists(loc)
    ctx.platform.provisioner.create(loc)
    return {"location": loc.uri, "created": not existed, "sse_kms_key_arn": loc.sse_kms_key_arn}


def bind_key(ctx: RunContext) -> dict[str, Any]:
    """Re-wrap the tenant key (L2) under the target key (1 unwrap with the old key, 1 wrap
    with the new one), then retire every workspace's active DEK so each copy is encrypted
    under a DEK created after the binding. ``dek_floor`` records the newest DEK per
    workspace at bind time; verify refuses any copy not newer than it."""
    p, plan = ctx.platform, ctx.plan
    kc = p.keychain
    before = kc.status(plan.tenant_id)
    target = p.resolve_provider(plan.key_ref)
    rewrapped = False
    # Compare with the reference the keychain records (the provider's): a resolver may spell
    # it differently from the plan (the in-memory one does), and then every rerun re-wrapped.
    if before.l1_ref != target.key_ref:
        kc.rotate_l1(plan.tenant_id, target)
        rewrapped = True
        ctx.audit("key.bind", {"from": before.l1_ref, "to": plan.key_ref})
    rekeyed: dict[str, Any] | None = None
    if plan.flow == Flow.ENABLE.value:
        # New L2 and L3 keys under the customer's key, so that a copy of the keychain from
        # before the bind plus the managed key opens no DEK made from now on (ADR 0005).
        # Called on every attempt: a rerun after a crash mid-rekey finishes it. Enable only:
        # new L2 = new search keys, and here the old index is the plaintext one.
        rekey = kc.rekey_below_l1(plan.tenant_id)
        if rekey.l2_rotated or rekey.l3_rotated:
            rekeyed = rekey.summary()
            ctx.audit("key.rekey", rekeyed)
    recorded = _first_dek_floor(ctx)
    if recorded is not None:
        floor = recorded.floor
    else:
        floor = {}
        for ws in kc.status(plan.tenant_id).workspaces:
            kc.retire_active_dek(plan.tenant_id, ws)
        for d in kc.list_deks(plan.tenant_id):
            _, bucket, gen = parse_dek_id(d.dek_id)
            if d.workspace_id not in floor or [bucket, gen] > floor[d.workspace_id]:
                floor[d.workspace_id] = [bucket, gen]
        # Copies already in the ledger with no floor on record (a run bound by older code,
        # or a lost record): they may use DEKs this new floor covers, and verified rows are
        # not read again, so this run must never erase below it.
        erasable = not p.state.copy_counts(ctx.run_id)
        ctx.audit("key.dek_floor", {"dek_floor": floor, "erasable": erasable})
    after = kc.status(plan.tenant_id)
    return {
        "from": before.l1_ref,
        "to": after.l1_ref,
        "rewrapped": rewrapped,
        "l1_generation": after.l1_generation,
        "rekeyed": rekeyed,
        "dek_floor": floor,
    }


@dataclass(frozen=True)
class _RecordedFloor:
    floor: dict[str, list[int]]
    erasable: bool  # False: copies existed before the floor was recorded; never erase below it


def _first_dek_floor(ctx: RunContext) -> _RecordedFloor | None:
    """The floor this run recorded the first time it bound the key, if it did. A rerun
    of bind_key keeps it: copies made (and verified) since are under DEKs newer than the
    first floor but maybe not a later one, and the DEKs below the floor are erased at the
    end of the run. Kept in the audit log, which a rerun never resets."""
    for rec in ctx.platform.state.iter_audit(tenant_id=ctx.plan.tenant_id):
        if rec.run_id == ctx.run_id and rec.action == "key.dek_floor":
            return _RecordedFloor(
                {ws: list(v) for ws, v in rec.details["dek_floor"].items()}, bool(rec.details.get("erasable", False))
            )
    return None


# --- manifest, copy, verify --------------------------------------------------------------------


def _listing_totals(store: Any) -> tuple[int, int]:
    """(objects, bytes) of a fresh listing, to compare with the manifest's summary."""
    count, total = 0, 0
    for info in store.list():
        count += 1
        total += info.size
    return count, total


def manifest(ctx: RunContext) -> dict[str, Any]:
    """List the source into the run's manifest (sharded by a hash of the name). A second,
    independent listing must agree (faults A10), which also proves nothing writes to
    the source any more."""
    p, plan = ctx.platform, ctx.plan
    src = p.store_for(plan.source_location)
    p.state.create_manifest(ctx.run_id, plan.source, fence=ctx.fence)
    page: list[ManifestEntry] = []
    new = 0
    for info in src.list():
        page.append(ManifestEntry(info.name, info.size, _shard_of(info.name, plan.shards), info.etag))
        if len(page) >= MANIFEST_PAGE:
            new += p.state.add_manifest_entries(ctx.run_id, page, fence=ctx.fence)
            page.clear()
            ctx.check()
    if page:
        new += p.state.add_manifest_entries(ctx.run_id, page, fence=ctx.fence)
    summary = ctx.manifest_summary()
    count, total = _listing_totals(src)
    if (count, total) != (summary.entries, summary.total_bytes):
        raise IntegrityError(
            f"two listings of {plan.source_location.uri} disagree ({summary.entries} objects / "
            f"{summary.total_bytes} bytes in the manifest, {count} / {total} now): something is "
            "still writing to the source; rerun the step",
            resource=plan.source_location.uri,
        )
    return {"objects": summary.entries, "bytes": summary.total_bytes, "shards": summary.shards, "new_entries": new}


def _shards(ctx: RunContext, step: str) -> list[dict[str, Any]]:
    """``ctx.run_shards`` for ``step``; StopRequestedError if the run is stopping (after
    every shard returned, with its ledger rows flushed). Uploads interrupted by the stop
    were aborted by their store; any left by a writer that died is aborted here too, now
    that no shard of this run writes (faults D3, I5)."""
    from datetime import timedelta

    results = ctx.run_shards(step, list(range(ctx.plan.shards)))
    if ctx.stopping or any(r.get("interrupted") for r in results):
        aborted = ctx.platform.store_for(ctx.plan.destination_location).abort_stale_uploads(timedelta(0))
        done = sum(r.get("objects", 0) + r.get("verified", 0) for r in results)
        raise StopRequestedError(
            f"{step} stopped after {done} more object(s): {ctx.stop.reason or 'stop requested'}"
            f" ({aborted} unfinished upload(s) aborted)"
        )
    return results


def _stop_on_source_changes(ctx: RunContext, results: list[dict[str, Any]]) -> None:
    """Not retryable: a source object is no longer what the manifest recorded. Nothing of
    it was copied, and the run stops here, before cutover (issue #10)."""
    changed = sum(r.get("source_changed", 0) for r in results)
    if changed:
        errors = [e for r in results for e in (r.get("errors") or []) if ": source " in e][:5]
        raise IntegrityError(
            f"{changed} source object(s) changed or were deleted after the manifest; they were not copied and "
            f"the run stops before cutover. Something wrote to the source during the run: restore the objects "
            f"as listed, then resume the run, or cancel it (`archive-kms runs cancel {ctx.run_id}`) and start "
            f"again. First: {'; '.join(errors)}",
            resource=ctx.plan.source_location.uri,
        )


def source_drift(
    ctx: RunContext, *, skip: frozenset[bytes] | set[bytes] = frozenset(), limit: int = 5
) -> tuple[int, list[str]]:
    """Compare a fresh listing of the source with the manifest, name by name: every
    manifest object must still be there with the size and ETag the manifest recorded,
    and nothing else may have appeared; ``skip`` (quarantined objects, which are not copied
    and which support may repair or remove) is left out. Returns (differences, the first
    ``limit`` described: which object, and what differs)."""
    from archive_kms.migration.copying import REPAIRED_ACTION
    from archive_kms.storage.port import same_etag

    p, plan = ctx.platform, ctx.plan
    recorded = {e.name: e for e in p.state.iter_manifest(ctx.run_id)}
    for rec in p.state.iter_audit(tenant_id=plan.tenant_id):  # quarantined sources support restored
        if rec.run_id == ctx.run_id and rec.action == REPAIRED_ACTION:
            name = bytes.fromhex(rec.details["object_hex"])
            recorded[name] = ManifestEntry(name, int(rec.details["size"]), etag=rec.details["etag"])
    found = 0
    described: list[str] = []

    def note(text: str) -> None:
        nonlocal found
        found += 1
        if len(described) < limit:
            described.append(text)

    for name in skip:
        recorded.pop(name, None)
    for info in p.store_for(plan.source_location).list():
        if info.name in skip:
            continue
        entry = recorded.pop(info.name, None)
        if entry is None:
            note(f"{info.name[:120]!r} appeared after the manifest ({info.size} bytes, ETag {info.etag})")
        elif info.size != entry.size or (entry.etag is not None and not same_etag(info.etag, entry.etag)):
            note(
                f"{info.name[:120]!r} changed after the manifest (recorded {entry.size} bytes, ETag {entry.etag}; "
                f"now {info.size} bytes, ETag {info.etag})"
            )
    for name, entry in recorded.items():
        note(f"{name[:120]!r} was deleted after the manifest (recorded {entry.size} bytes, ETag {entry.etag})")
    return found, described


def _raise_on_drift(ctx: RunContext, step: str, drift: tuple[int, list[str]]) -> None:
    """Stop before cutover if the source no longer holds exactly what the manifest
    recorded (``drift``: what ``source_drift`` found): the destination was proven against
    the manifest, and a change since then is data a stray writer would lose (issue #10)."""
    count, described = drift
    if count:
        raise IntegrityError(
            f"{step}: {ctx.plan.source_location.uri} is not what the manifest recorded: {count} difference(s): "
            f"{'; '.join(described)}. Something wrote to the source during the run; restore it as listed and "
            f"resume, or cancel the run (`archive-kms runs cancel {ctx.run_id}`)",
            resource=ctx.plan.source_location.uri,
        )


def copy(ctx: RunContext) -> dict[str, Any]:
    """Copy + re-encrypt every manifest entry not yet in the ledger, shards in parallel.
    Quarantined objects are tried again (their source may have been fixed); a source that
    still does not authenticate stays quarantined, which does not fail this step: verify
    checks everything else, then blocks the run before cutover until it is resolved."""
    started = time.monotonic()
    results = _shards(ctx, "copy")
    failed = sum(r["failed"] for r in results)
    out = {
        "objects": sum(r["objects"] for r in results),
        "written": sum(r["written"] for r in results),
        "already": sum(r["already"] for r in results),
        "bytes_plaintext": sum(r["bytes_plaintext"] for r in results),
        "failed": failed,
        "seconds": round(time.monotonic() - started, 3),
    }
    _stop_on_source_changes(ctx, results)
    if failed:
        errors = [e for r in results for e in (r.get("errors") or []) if ": quarantined: " not in e][:5]
        held = sum(r.get("quarantined", 0) for r in results)
        also = f" ({held} more quarantined: their source does not authenticate)" if held else ""
        permanent = sum(r.get("permanent", 0) for r in results)
        if permanent:  # a retry of the same input fails again: say so, never "transient"
            raise CopyFailedError(
                f"{failed} object(s) failed to copy{also}, {permanent} for a reason no retry fixes; they stay in "
                f"the ledger as failed: fix the cause, then rerun the step. First: {'; '.join(errors)}"
            )
        raise TransientError(
            f"{failed} object(s) failed to copy{also}; they stay in the ledger as failed and are "
            f"retried by a rerun of the step. First: {'; '.join(errors)}"
        )
    counts = ctx.platform.state.copy_counts(ctx.run_id)
    summary = ctx.manifest_summary()
    done = counts.get(CopyStatus.COPIED, 0) + counts.get(CopyStatus.VERIFIED, 0)
    held = counts.get(CopyStatus.QUARANTINED, 0)
    if done + held != summary.entries:
        raise IntegrityError(
            f"ledger has {done} of {summary.entries} objects copied (and {held} quarantined) after the copy step"
        )
    out["quarantined"] = held
    out["mb_per_s"] = round(out["bytes_plaintext"] / 1e6 / max(out["seconds"], 1e-6), 2)
    return out


def verify(ctx: RunContext) -> dict[str, Any]:
    """Every copied object proven in the run's verify mode (ADR 0018: ``attested``, from
    the destination listing against what the copy committed; ``read-back``, every object
    read back and checked by ``verify_shard``), the source compared with the manifest name
    by name, then manifest, ledger and destination listing reconciled name by name: 0 lost,
    0 duplicated, 0 unexpected, the quarantined objects left out. Quarantined objects not
    waived block the run here, once everything else is verified
    (``quarantine.ObjectsQuarantinedError``)."""
    from datetime import timedelta

    from archive_kms.migration.copying import ATTESTED, attest_copies

    p, plan = ctx.platform, ctx.plan
    recopied = 0
    if p.state.copy_counts(ctx.run_id).get(CopyStatus.FAILED):
        # Objects an earlier verify rejected (or a copy failed): copy them again first, so a
        # plain resume converges instead of failing on the same rows every time. A rejected
        # destination copy is replaced from the source (faults A12), never quarantined. A
        # source changed since the manifest fails here again (copy's IntegrityError).
        again = _shards(ctx, "copy")
        _stop_on_source_changes(ctx, again)
        recopied = sum(r["written"] + r["already"] for r in again)
    dst = p.store_for(plan.destination_location)
    # Which objects are quarantined is settled once the copies above are done (verify marks
    # rows verified or failed, never quarantined): the source is compared with the manifest
    # while the destination is listed and proven (two listings, no order between them).
    held = quarantine.summarize(p.state, ctx.run_id)
    with beside(source_drift, ctx, skip=held.names) as drift:
        aborted = dst.abort_stale_uploads(timedelta(0))  # uploads of crashed attempts (faults A5, I5)
        infos: dict[bytes, Any] = {}
        duplicates = 0
        for info in dst.list():
            if info.name in infos:
                duplicates += 1
            infos[info.name] = info
        if plan.verify == ATTESTED:
            results = [attest_copies(p, ctx.run_id, infos, ctx.fence, check=ctx.check)]
            ctx.report_progress("verify")
        else:
            results = _shards(ctx, "verify")
        mismatched = sum(r["mismatched"] for r in results)
        if mismatched:
            errors = [e for r in results for e in r["errors"]][:5]
            raise IntegrityError(
                f"{mismatched} object(s) failed verification and are marked failed; resume the run "
                f"(verify copies them again first). First: {'; '.join(errors)}"
            )
        quarantine.check_waivers_audited(p.state, plan.tenant_id, ctx.run_id, held.waived)
        _raise_on_drift(ctx, "verify", drift.result())
    manifest_names = {e.name for e in p.state.iter_manifest(ctx.run_id)}
    verified = {c.name for c in p.state.iter_copies(ctx.run_id, status=CopyStatus.VERIFIED)}
    listed = infos
    expected = manifest_names - held.names  # what the destination must hold: all but the quarantined
    lost = expected - set(listed)
    unexpected = set(listed) - expected  # a quarantined object at the destination counts here
    unverified = expected - verified
    out = {
        "objects": len(manifest_names),
        "verified": len(verified),
        "listed": len(listed),
        "lost": len(lost),
        "duplicated": duplicates,
        "unexpected": len(unexpected),
        "unverified": len(unverified),
        "quarantined": held.total,
        "waived": len(held.waived),
        "expected": len(expected),
        "reconciled": (
            f"manifest {len(manifest_names)} - quarantined {held.total} ({len(held.waived)} waived) = "
            f"ledger verified {len(verified)} = destination listing {len(listed)}"
        ),
        "aborted_uploads": aborted,
        "recopied": recopied,
        "mode": plan.verify,
        "source_unchanged": True,
        "result": "ok",
    }
    if lost or duplicates or unexpected or unverified:
        out["result"] = "mismatch"
        sample = sorted(lost | unexpected | unverified)[:3]
        raise IntegrityError(
            f"reconciliation failed for {plan.destination_location.uri}: {out} (e.g. {sample!r})",
            resource=plan.destination_location.uri,
        )
    if held.unwaived:
        raise quarantine.ObjectsQuarantinedError(
            quarantine.blocked_message(ctx.run_id, held), resource=f"run:{ctx.run_id}"
        )
    return out


# --- index and cutover ------------------------------------------------------------------------


def _records(ctx: RunContext, store: ObjectStore) -> Iterator[Record]:
    from concurrent.futures import Future

    from archive_kms.crypto.envelope import ObjectBinding, decrypt_iter
    from archive_kms.operations.archive import workspace_of
    from archive_kms.operations.reading import dek_lookup

    tenant, kc = ctx.plan.tenant_id, ctx.platform.keychain
    # The keychain's cache answers each lookup; revocation and erasure are checked on every
    # one (a revoked tenant is refused at the next record).
    dek_for = dek_lookup(kc, tenant)

    def load(name: bytes) -> Record:
        binding = ObjectBinding(tenant, workspace_of(name), name)
        with store.open_read(name) as reader:
            return Record.from_json(b"".join(decrypt_iter(reader, binding=binding, dek_for=dek_for)))

    names = (info.name for info in store.list(RECORD_PREFIX))
    threads = ctx.plan.parallel_shards * ctx.plan.threads_per_shard  # as many reads in flight as the copy
    with worker_threads(threads, name="akms-etl") as pool:
        window: list[Future[Record]] = []
        for name in names:
            ctx.check()  # a stop request ends the build here; a resume rebuilds (ids are deterministic)
            window.append(pool.submit(load, name))
            if len(window) >= 64:
                yield window.pop(0).result()
        for f in window:
            yield f.result()


def build_index(ctx: RunContext) -> dict[str, Any]:
    """Build the new index generation from the *new* storage (the ETL); the alias keeps
    pointing at the old generation, so searches during the run see the pre-run data."""
    p, plan = ctx.platform, ctx.plan
    mode = p.index_mode(plan.target_key_mode)
    keys = p.search_keys(plan.tenant_id, plan.target_key_mode)
    report = rebuild_generation(
        _records(ctx, p.store_for(plan.destination_location)), p.index, plan.tenant_id, plan.new_generation, mode, keys
    )
    report.require_complete()
    held = quarantine.require_resolved(p.state, ctx.run_id).names  # all waived, or verify would have stopped
    records = sum(1 for e in p.state.iter_manifest(ctx.run_id) if e.name.startswith(RECORD_PREFIX))
    left_out = sum(1 for n in held if n.startswith(RECORD_PREFIX))
    expected = records - left_out
    if report.count != expected:
        raise IntegrityError(
            f"index {report.index} holds {report.count} documents but the manifest has {records} "
            f"records ({left_out} of them waived)",
            resource=report.index,
        )
    return {
        "index": report.index,
        "mode": mode.value,
        "documents": report.count,
        "indexed": report.indexed,
        "reused": report.reused,
        "expected": expected,
        "waived_records": left_out,
        "seconds": round(report.seconds, 3),
    }


def cutover(ctx: RunContext) -> dict[str, Any]:
    """Point the registry (location, key mode, key, index generation) and the alias at the
    new storage and index. Each half is conditional, so a rerun after a crash between
    them finishes the other half; readers see old or new, never neither."""
    p, plan = ctx.platform, ctx.plan
    quarantine.require_resolved(p.state, ctx.run_id)  # never cut over with an object nobody accounted for
    t = ctx.tenant()
    registry_changed = dict(t.location) != dict(plan.destination)
    if registry_changed:
        p.state.update_tenant(
            replace(
                t,
                location=dict(plan.destination),
                key_mode=KeyMode(plan.mode),
                key_ref=plan.key_ref,
                index_alias=alias_name(plan.tenant_id),
                index_generation=plan.new_generation,
            ),
            fence=ctx.fence,
        )
    # From here no reader looks the old location up: the cutover grace counts from now
    # (``cleanup_source``), so the alias swap, the audit and cleanup's checks run inside it.
    # On a rerun that found the registry switched already, "now" is later than the switch:
    # the grace only gets longer.
    ctx.marks[REGISTRY_SWITCHED] = time.monotonic()
    switched_at = datetime.now(UTC).isoformat()
    current = p.index.current_index(plan.tenant_id)
    alias_changed = current != plan.new_index
    if alias_changed:
        if current != plan.old_index:
            raise AliasConflictError(
                f"alias of {plan.tenant_id} points at {current}, expected {plan.old_index}: "
                "another flow moved it; not swapping",
                resource=alias_name(plan.tenant_id),
            )
        p.index.swap_alias(plan.tenant_id, plan.new_index, expected_current=plan.old_index)
    ctx.audit(
        "tenant.cutover",
        {
            "location": plan.destination_location.uri,
            "index": plan.new_index,
            "key_mode": plan.mode,
            "key_ref": plan.key_ref,
        },
    )
    return {
        "location": plan.destination_location.uri,
        "index": plan.new_index,
        "registry_changed": registry_changed,
        "alias_changed": alias_changed,
        "registry_switched_at": switched_at,
    }


def _names_fingerprint(names: Any) -> tuple[int, str]:
    """(count, XOR of name hashes): compares two listings in constant memory."""
    import hashlib

    count, acc = 0, 0
    for name in names:
        count += 1
        acc ^= int.from_bytes(hashlib.sha256(name).digest()[:16], "big")
    return count, f"{acc:032x}"


def _recheck_before_deleting(ctx: RunContext, kept: set[bytes]) -> None:
    """The last look at reality before the only other copy goes (faults B5, D10, I1):
    the key the data now depends on answers, the destination holds exactly the manifest's
    names but the quarantined (``kept``) ones, and the source still holds exactly what the
    manifest listed."""
    p, plan = ctx.platform, ctx.plan
    state = p.resolve_provider(plan.key_ref).status().state
    if not state.usable:
        raise KeyUnavailableError(
            f"refusing to delete the source: the tenant's key {plan.key_ref} is "
            f"{state.value}; the source is kept until it is usable again",
            resource=plan.key_ref,
            state=state.value,
        )
    # The source is listed while the destination is (two listings, no order between them;
    # the destination's verdict is reported first, as before).
    with beside(source_drift, ctx) if not kept else nullcontext() as drift:
        manifest = _names_fingerprint(e.name for e in p.state.iter_manifest(ctx.run_id) if e.name not in kept)
        dest = _names_fingerprint(i.name for i in p.store_for(plan.destination_location).list())
        if dest != manifest:
            raise IntegrityError(
                f"refusing to delete the source: {plan.destination_location.uri} holds {dest[0]} "
                f"object(s), not the manifest's {manifest[0]} (or other names); rerun from verify",
                resource=plan.destination_location.uri,
            )
        drifted = drift.result() if drift is not None else None
    if drifted is not None:
        count, described = drifted
        if count:
            raise IntegrityError(
                f"refusing to delete the source: {plan.source_location.uri} is not what the manifest "
                f"recorded ({count} difference(s): {'; '.join(described)}); something wrote to it during the run",
                resource=plan.source_location.uri,
            )
        return
    # With waived objects kept, support may have removed one by hand: the source must hold
    # every other manifest name (at its size) and nothing outside the manifest; a kept one
    # may be gone.
    listed = _names_fingerprint(
        i.name + b"\0%d" % i.size for i in p.store_for(plan.source_location).list() if i.name not in kept
    )
    expected = _names_fingerprint(
        e.name + b"\0%d" % e.size for e in p.state.iter_manifest(ctx.run_id) if e.name not in kept
    )
    if listed != expected:
        raise IntegrityError(
            f"refusing to delete the source: {plan.source_location.uri} holds {listed[0]} object(s) "
            f"besides the kept ones, not the manifest's {expected[0]} (or other names); something "
            "wrote to it during the run",
            resource=plan.source_location.uri,
        )


def _delete_all_but(ctx: RunContext, store: ObjectStore, kept: set[bytes]) -> int:
    """Delete the manifest's objects from the source except ``kept``, in batches (the
    source entity stays: it still holds the kept ones). Deleting what is gone is a no-op,
    so a rerun converges."""

    names = (e.name for e in ctx.platform.state.iter_manifest(ctx.run_id) if e.name not in kept)
    return store.delete_many(names)  # 1,000 (S3) / 256 (Azure) names a request


def _grace_remaining(ctx: RunContext, started: float) -> float:
    """Seconds of the cutover grace still to wait at ``started`` (``time.monotonic()``).
    The grace counts from the moment cutover saw the registry point at the destination
    (ADR 0045): on this process's monotonic clock when the same execution ran cutover;
    from the wall-clock time cutover recorded otherwise (a resume, maybe elsewhere), never
    more than the whole grace (a clock behind the recorder's waits the whole grace, one
    ahead of it by more than the grace waits none); from ``started`` if cutover recorded
    none (a run cut over by older code)."""
    grace = float(ctx.plan.cutover_grace_seconds)
    mark = ctx.marks.get(REGISTRY_SWITCHED)
    if mark is not None:
        elapsed = started - mark
    else:
        recorded = (ctx.run().step("cutover").result or {}).get("registry_switched_at")
        if not recorded:
            return grace
        elapsed = (datetime.now(UTC) - datetime.fromisoformat(recorded)).total_seconds()
    return max(0.0, grace - max(0.0, elapsed))


def cleanup_source(ctx: RunContext) -> dict[str, Any]:
    """Delete the old storage entity and the old index once the cutover grace is over: a
    short wait, counted from cutover's registry switch, for reads that looked the location
    up just before it. The source objects of waived (quarantined) objects are kept where
    they are, named in the result and the report: the run never loses an object silently
    (ADR 0006)."""
    p, plan = ctx.platform, ctx.plan
    started = time.monotonic()
    grace_ends = started + _grace_remaining(ctx, started)  # the checks below run during the grace
    if dict(ctx.tenant().location) != dict(plan.destination):
        raise StateError("refusing to delete the source: the registry does not point at the destination yet")
    src_loc = plan.source_location
    kept = quarantine.summarize(p.state, ctx.run_id).names
    if not p.state.load_checkpoints(ctx.run_id, "cleanup_source").get(0, {}).get("deleting"):
        _recheck_before_deleting(ctx, kept)
        p.state.save_checkpoint(ctx.run_id, "cleanup_source", 0, {"deleting": True}, fence=ctx.fence)
    time.sleep(max(0.0, grace_ends - time.monotonic()))
    store = p.store_for(src_loc)
    index_deleted = plan.old_index is not None and plan.old_index != plan.new_index
    # The old index goes while the storage is deleted (independent services; searches
    # follow the alias, which cutover moved): both are in place again only if both end.
    # A failed deletion of the index is raised when the block is left.
    with beside(p.index.delete_index, plan.old_index) if index_deleted else nullcontext():
        deleted = _delete_all_but(ctx, store, kept) if kept else p.provisioner.delete(src_loc, store)
        left = {i.name for i in p.store_for(src_loc).list()} if p.provisioner.exists(src_loc) else set()
    if left - kept:
        raise IntegrityError(f"{len(left - kept)} object(s) still in {src_loc.uri} after cleanup; rerun the step")
    out: dict[str, Any] = {
        "location": src_loc.uri,
        "objects_deleted": deleted,
        "old_index": plan.old_index,
        "old_index_deleted": index_deleted,
    }
    if kept:
        missing = kept - left
        if missing:  # someone removed them by hand since: say so, the run has nothing to undo
            log.warning("%d quarantined source object(s) are no longer in %s", len(missing), src_loc.uri)
        shown = sorted(kept & left)[: quarantine.REPORT_LIMIT]
        out.update(
            {
                "kept": len(kept & left),
                "kept_at": src_loc.uri,
                "kept_missing": len(missing),
                "kept_objects": [quarantine.display_name(n) for n in shown],
            }
        )
    details: dict[str, Any] = {"location": src_loc.uri, "objects": deleted, "index": plan.old_index}
    if kept:
        details["kept_quarantined"] = len(kept & left)
    ctx.audit("storage.delete", details)
    return out


def resume(ctx: RunContext) -> dict[str, Any]:
    """Open the gate and replay the jobs deferred during the run, exactly once, into the
    tenant's new home."""
    from datetime import timedelta

    p, tenant = ctx.platform, ctx.plan.tenant_id
    # We hold the tenant's lease: claims left by a crashed attempt of this step are ours
    # to take over at once (reclaim_after=0), not in five minutes.
    outcomes = replay_deferred(p.state, tenant, ctx.run_id, p.open_archive, fence=ctx.fence, reclaim_after=timedelta(0))
    ran = [o for o in outcomes if o.decision == "run"]
    gate = p.state.gate(tenant)
    if gate.state.value != "open" or gate.pending:
        # Never "completed" with jobs still queued behind a draining gate (they would wait
        # for a replayer that is not coming).
        raise TransientError(
            f"{gate.pending} deferred archive job(s) of {tenant} not replayed yet (gate "
            f"{gate.state.value}; one may still be running from a crashed attempt); rerun the step"
        )
    return {
        "replayed": len(ran),
        "duplicates": len(outcomes) - len(ran),
        "records": sum(o.records for o in ran),
        "gate": gate.state.value,
        **_erase_old_deks(ctx),
    }


def _erase_old_deks(ctx: RunContext) -> dict[str, Any]:
    """Crypto-erase the DEKs the source was encrypted under (not newer than bind_key's
    ``dek_floor``): every object at the destination uses a newer one (verify checked), the
    source is deleted, and the deferred jobs sealed under them are replayed — so from here
    they protect nothing but old copies (backups) of data that is gone. Skipped while waived
    source objects are kept under them (ADR 0006: never lost silently). Idempotent: a rerun
    finds them destroyed and writes nothing."""
    p, tenant = ctx.platform, ctx.plan.tenant_id
    recorded = _first_dek_floor(ctx)  # the audited floor only: never one recomputed after copies existed
    if recorded is None or not recorded.floor:
        return {"old_deks_erased": 0, "old_deks_kept_for": "no DEK floor on record for this run"}
    if not recorded.erasable:
        return {"old_deks_erased": 0, "old_deks_kept_for": "the floor was recorded after copies existed"}
    floor = recorded.floor
    kept = quarantine.summarize(p.state, ctx.run_id).names
    if kept:
        return {"old_deks_erased": 0, "old_deks_kept_for": f"{len(kept)} waived source object(s)"}
    # The keychain writes each signed erasure record to the audit log (keychain.erase).
    records = p.keychain.erase_deks_below(tenant, floor, reason=f"re-encrypted by migration run {ctx.run_id}")
    return {"old_deks_erased": sum(len(rec.dek_ids) for rec in records)}


def report(ctx: RunContext) -> dict[str, Any]:
    from archive_kms.migration.digests import purge_run_digests
    from archive_kms.migration.report import build_report

    out = build_report(ctx.platform, ctx.run_id, final=True)
    # The keyed plaintext digests served verify; nothing compares them from here on.
    out["ledger_digests_purged"] = purge_run_digests(ctx.platform.state, ctx.run_id, fence=ctx.fence)
    if ctx.platform.anchors is not None:
        out["audit_anchor"] = anchor_audit(ctx, ctx.platform.anchors)
    return out


def anchor_audit(ctx: RunContext, anchors: AnchorStore) -> dict[str, Any]:
    """Publish the audit head (with this run's records) outside the database. A log that
    does not continue the latest anchor (a restored or replaced database) is fatal and
    alarmed: nothing is anchored over it and the run fails here (``AuditForkError``).
    Any other failure (the bucket unreachable) is reported, not fatal: the data has
    moved, and the next run, `audit anchor` or the scheduled anchor retries."""
    from archive_kms.operations.anchoring import publish

    try:
        anchor, where = publish(ctx.platform)
    except AuditForkError:
        raise
    except ArchiveKmsError as exc:
        log.warning("audit anchor not published after run %s: %s", ctx.run_id, type(exc).__name__)
        return {"published": False, "error": str(exc)}
    return {"published": True, "where": where, "count": anchor.count}


STEP_FUNCTIONS: dict[str, Step] = {
    "preflight": preflight,
    "pause": pause,
    "cutover_point": cutover_point,
    "create_destination": create_destination,
    "bind_key": bind_key,
    "manifest": manifest,
    "copy": copy,
    "verify": verify,
    "build_index": build_index,
    "cutover": cutover,
    "cleanup_source": cleanup_source,
    "resume": resume,
    "report": report,
}

__all__ = ["STEP_FUNCTIONS", "Step", "anchor_audit"]
