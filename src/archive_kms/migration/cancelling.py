"""Cancelling an enable or remove run before cutover: the tenant is put back as it was
(the ``cancel`` of their ``FlowDefinition``; ``engine.cancel`` takes the lease, checks the
point of no return, records the run cancelled and audits it)."""

from __future__ import annotations

from datetime import timedelta

from archive_kms.errors import StateError
from archive_kms.migration.plan import MigrationPlan
from archive_kms.operations.platform import Platform
from archive_kms.state.port import Fence, MigrationRun, StepState

__all__ = ["undo_migration"]


def undo_migration(platform: Platform, run: MigrationRun, plan: MigrationPlan, fence: Fence) -> list[str]:
    """Put the tenant back as it was before ``run``: the tenant key re-wrapped under its
    original key (if ``bind_key`` ran), the destination and the new index generation deleted
    (only if this run created them), the old index writable again, the gate reopened with the
    deferred jobs replayed into the source. Returns what was undone, in words."""
    undone: list[str] = []
    run_id = run.run_id
    tenant = platform.state.get_tenant(plan.tenant_id)
    if tenant is None:
        raise StateError(f"tenant {plan.tenant_id} no longer exists; nothing to cancel into")
    if dict(tenant.location) != dict(plan.source):
        raise StateError(
            f"tenant {plan.tenant_id} no longer lives at {plan.source_location.uri}; not cancelling",
            resource=f"tenant:{plan.tenant_id}",
        )
    bind = run.step("bind_key")
    # The L1 recorded when the run was planned, never a bind result: a bind that crashed
    # after re-wrapping and was rerun records the *customer* key as its "from".
    original = plan.source_key_ref or (bind.result or {}).get("from") or (tenant.key_ref if tenant else None)
    if bind.state is not StepState.PENDING and original:
        current = platform.keychain.status(plan.tenant_id).l1_ref
        provider = platform.resolve_provider(original)
        if current != provider.key_ref:
            platform.keychain.rotate_l1(plan.tenant_id, provider)
            undone.append("bind_key")
    if run.step("create_destination").state is not StepState.PENDING:
        dest = plan.destination_location
        existed = (run.step("preflight").result or {}).get("destination_existed", True)
        if platform.provisioner.exists(dest):
            store = platform.store_for(dest)
            if existed:  # someone else's (empty) bucket/container: take back only what we wrote
                from archive_kms.storage.name_limits import name_problem

                for entry in platform.state.iter_manifest(run_id):
                    # A name too long for the destination was never written there (and
                    # cannot even be asked about): skip it rather than fail the cancel.
                    if name_problem(dest, entry.name) is None:
                        store.delete(entry.name)
                store.abort_stale_uploads(timedelta(0))
            else:
                platform.provisioner.delete(dest, store)
            undone.append("create_destination")
    if platform.index.current_index(plan.tenant_id) != plan.new_index:
        platform.index.delete_index(plan.new_index)  # no-op if the run never built it
    if run.step("cutover_point").state is not StepState.PENDING and plan.old_index is not None:
        platform.index.set_write_block(plan.old_index, False)
        undone.append("cutover_point")
    from archive_kms.operations.archive import replay_deferred

    if platform.state.gate(plan.tenant_id).paused_by_run == run_id:
        replayed = replay_deferred(platform.state, plan.tenant_id, run_id, platform.open_archive, fence=fence)
        undone.append(f"pause ({len(replayed)} deferred job(s) replayed into the source)")
    from archive_kms.migration.digests import purge_run_digests

    if purge_run_digests(platform.state, run_id, fence=fence):  # nothing verifies them any more
        undone.append("ledger digests")
    return undone
