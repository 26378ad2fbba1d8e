"""Revocation: the flag in the signed head that every unwrap reads first (``heads.load``
with ``gate=True``), set by ``revoke`` and cleared by ``restore``. Revoking purges this
process's cached keys; other processes purge theirs on their next load of the head."""

from __future__ import annotations

import logging
from dataclasses import replace

from archive_kms.domain.keychain import TenantHead, time_out
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain.heads import Plan, TenantHeads
from archive_kms.keys.keychain.ids import check_tenant
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
