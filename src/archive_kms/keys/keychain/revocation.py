"""Revocation: the flag in the signed head that every unwrap reads first (``heads.load``
with ``gate=True``), set by ``revoke`` and cleared by ``restore``. Revoking purges this
process's cached keys; other processes purge theirs on their next load of the head.

Scoped (granular) revocation: ``revoke_scope`` adds a :class:`ScopedRevocation` to the
signed head (one workspace's key, the DEKs of buckets before a time, or that range in one
workspace); ``wrapping.dek_key`` refuses every DEK it covers, before the cache is looked
at. ``restore_scope`` removes it after the same verified unwrap as ``restore``."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from archive_kms.domain.keychain import ScopedRevocation, TenantHead, time_out
from archive_kms.errors import KeyNotFoundError, ValidationError
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain.heads import Plan, TenantHeads
from archive_kms.keys.keychain.ids import as_ts, check_tenant, check_workspace, dt
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain.values import TenantKeyStatus, status_of
from archive_kms.keys.keychain.wrapping import KeyWrapping

__all__ = ["Revocation"]

log = logging.getLogger(__name__)


class Revocation:
    def __init__(self, heads: TenantHeads, checks: RecordChecks, keys: KeyWrapping, cache: KeyCache) -> None:
        self._heads = heads
        self._checks = checks
        self._keys = keys
        self._cache = cache

    def revoke(self, tenant_id: str) -> TenantKeyStatus:
        """Refuse every unwrap for the tenant from now on, in every process sharing the store
        (the flag is in the signed head, read before every unwrap); purge its cached keys.
        Idempotent."""
        check_tenant(tenant_id)
        self._cache.purge(tenant_id)

        def plan(head: TenantHead) -> Plan:
            if head.revoked:
                return Plan(result=None)
            now = self._heads.now()
            return Plan(
                result=None,
                head=replace(head, revoked=True, revoked_at=now),
                audit_details={"revoked_at": time_out(now)},
            )

        try:
            self._heads.write(tenant_id, plan, gate=False, audit_action="revoke")
        finally:
            self._cache.purge(tenant_id)  # again: a reader may have refilled it meanwhile
        log.warning("keychain: tenant %s revoked; caches purged", tenant_id)
        return status_of(self._heads.load(tenant_id, gate=False))

    def scope_of(self, workspace_id: str | None, before: datetime | float | None) -> tuple[str | None, datetime | None]:
        """A scope's canonical (workspace, before): ids checked, ``before`` in UTC to the
        microsecond and not in the future."""
        if workspace_id is None and before is None:
            raise ValidationError("a scoped revocation names a workspace, a time (before), or both")
        if workspace_id is not None:
            check_workspace(workspace_id)
        when = None
        if before is not None:
            when = dt(as_ts(before))
            if when > self._heads.now():
                raise ValidationError(
                    f"--before {time_out(when)} is in the future: a time range covers data already archived; "
                    "revoke the workspace or the whole tenant to stop new data"
                )
        return workspace_id, when

    def revoke_scope(
        self, tenant_id: str, workspace_id: str | None, before: datetime | float | None
    ) -> ScopedRevocation:
        """Add a scoped revocation (idempotent: an equal scope in force is returned as is)."""
        check_tenant(tenant_id)
        ws_id, when = self.scope_of(workspace_id, before)

        def plan(head: TenantHead) -> Plan:
            if ws_id is not None and head.workspace(ws_id) is None:
                raise KeyNotFoundError(
                    f"tenant {tenant_id} has no workspace {ws_id}", resource=f"keychain:{tenant_id}/{ws_id}"
                )
            key = (ws_id or "", time_out(when) or "")
            found = next((r for r in head.scoped_revocations if r.scope == key), None)
            if found is not None:
                return Plan(result=found)
            scope = ScopedRevocation(ws_id, when, self._heads.now())
            return Plan(
                result=scope,
                head=head.with_scoped_revocations([*head.scoped_revocations, scope]),
                audit_details={
                    "scope": "workspace" if when is None else ("range" if ws_id is None else "workspace-range"),
                    "workspace_id": ws_id,
                    "before": time_out(when),
                    "revoked_at": time_out(scope.revoked_at),
                },
            )

        try:
            added: ScopedRevocation = self._heads.write(tenant_id, plan, gate=False, audit_action="revoke")
            return added
        finally:
            self._cache.purge(tenant_id)  # what this process holds of the scope goes at once
            log.warning("keychain: tenant %s: scoped revocation (%s, %s)", tenant_id, ws_id, time_out(when))

    def restore_scope(
        self, tenant_id: str, workspace_id: str | None, before: datetime | float | None
    ) -> ScopedRevocation | None:
        """Remove the scoped revocation with exactly this scope after a verified unwrap of
        the L2 from the L1 (as ``restore``); returns what was removed, None if none was in
        force (idempotent)."""
        check_tenant(tenant_id)
        ws_id, when = (workspace_id, None) if before is None else self.scope_of(workspace_id, before)
        key = (ws_id or "", time_out(when) or "")

        def plan(head: TenantHead) -> Plan:
            found = next((r for r in head.scoped_revocations if r.scope == key), None)
            if found is None:
                return Plan(result=None)
            rec = self._checks.checked_l2(head)
            self._keys.unwrap_l2_from_provider(head, rec).wipe()  # the chain still opens
            rest = [r for r in head.scoped_revocations if r.scope != key]
            return Plan(
                result=found,
                head=head.with_scoped_revocations(rest),
                audit_details={
                    "scope": "workspace" if when is None else ("range" if ws_id is None else "workspace-range"),
                    "workspace_id": ws_id,
                    "before": time_out(when),
                },
            )

        removed: ScopedRevocation | None = self._heads.write(tenant_id, plan, gate=True, audit_action="restore")
        return removed

    def restore(self, tenant_id: str) -> TenantKeyStatus:
        """Re-enable a revoked tenant once its L1 works again: first unwraps the L2 key from
        the provider (1 unwrap; raises ``KeyUnavailableError`` and stays revoked if the L1
        is still disabled), then clears the flag. Idempotent."""
        check_tenant(tenant_id)

        def plan(head: TenantHead) -> Plan:
            if not head.revoked:
                return Plan(result=None)
            rec = self._checks.checked_l2(head)
            l2 = self._keys.unwrap_l2_from_provider(head, rec)
            return Plan(
                result=None,
                head=replace(head, revoked=False, revoked_at=None),
                cache_put=[(rec.record_id, l2)],
            )

        self._heads.write(tenant_id, plan, gate=False, audit_action="restore")
        log.warning("keychain: tenant %s restored", tenant_id)
        return status_of(self._heads.load(tenant_id, gate=False))
