"""Tenants' own storage accounts on the local stack: Azurite cannot create accounts, so a
pool of accounts configured in Azurite when it starts (``AZURITE_ACCOUNTS``, written by
``localstack/stack.py``) stands in for them, held to the same contract as the Resource
Manager provisioner (``storage.provisioning.TenantAccountProvisioner``;
``tests/contract/test_tenant_account_contract.py``).

A tenant's location keeps the account name the naming rule derives for it
(``akms<id><hash8>``); the pool maps that name to one pool account:

* **durably**, in the state store (``PoolAllocations``: ``state.account_pool``, table
  ``tenant_account_pool``): which pool account stands in for which tenant account;
* **in Azurite itself**, by a claim: the container ``akms-pool-claim`` in the pool account,
  created with create-if-absent, whose metadata names the tenant and its account. Two
  deployments (state stores) sharing one Azurite cannot both take an account: the second
  sees a claim that is not its own, releases its allocation and takes the next account.

"Create the account" = allocate and claim; "the account exists" = this tenant's
allocation and claim are there; "delete the account" = delete every container in the pool
account (the claim last) and release the allocation, so the account is empty for the next
tenant. What the pool does not stand in for: customer-managed keys (Azurite keeps the
``cmk_key_url`` in the claim but encrypts nothing), network rules, Entra ID-only access
(pool accounts use shared keys), account-level soft delete. docs/storage-layout.md and
docs/adr/0031-tenant-storage-accounts.md say what is and is not proven here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from archive_kms import retry
from archive_kms.errors import ArchiveKmsError, ConfigurationError, ServiceUnavailableError, StorageError
from archive_kms.storage.locations import Location, create_azure_container
from archive_kms.storage.port import ObjectStore
from archive_kms.storage.provisioning import require_own_account

log = logging.getLogger(__name__)

#: The container that marks a pool account as taken (its metadata: tenant, account).
CLAIM_CONTAINER = "akms-pool-claim"


class PoolAllocation(Protocol):
    @property
    def pool_account(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...


class PoolAllocations(Protocol):
    """Where allocations are recorded (``state.account_pool.SqlAccountPool``)."""

    def allocation(self, account: str) -> PoolAllocation | None:
        """The allocation of tenant account ``account``, or None."""
        ...

    def allocate(self, *, tenant_id: str, account: str, candidates: Sequence[str]) -> PoolAllocation | None:
        """Atomically give ``account`` the first free candidate (or return its allocation);
        None if none is free; StateError if ``account`` is allocated to another tenant."""
        ...

    def release(self, account: str, pool_account: str) -> bool:
        """Forget the allocation; idempotent."""
        ...


def _translate(exc: BaseException, *, pool_account: str, op: str) -> ArchiveKmsError:
    from archive_kms.storage.azure_blob import translate_error

    code = str(getattr(getattr(exc, "error_code", None), "value", getattr(exc, "error_code", None)) or "")
    if code == "ResourceNotFound":  # an account-level call: Azurite does not know the account
        return ConfigurationError(
            f"Azurite does not know the pool account {pool_account} ({op}): it was started without the account "
            "pool; restart it (`archive-kms stack down --only azurite && archive-kms stack up --only azurite`)",
            resource=f"azure://{pool_account}",
        )
    return translate_error(exc, where=f"azure://{pool_account}", op=op)


class AzuritePoolProvisioner:
    """Tenant accounts on a pool of Azurite accounts.

    ``pool``: pool account name -> its ``BlobServiceClient`` (from the connection strings in
    ``Settings.azure_account_pool``, built by ``archive_kms.clients``), in allocation order.
    """

    def __init__(
        self,
        pool: Mapping[str, Any],
        allocations: PoolAllocations,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not pool:
            raise ConfigurationError("the Azurite account pool is empty (azure_account_pool)")
        self._pool = dict(pool)
        self._allocations = allocations
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"AzuritePoolProvisioner({len(self._pool)} accounts)"

    # --- the port ------------------------------------------------------------------------

    def create(self, location: Location) -> None:
        require_own_account(location)
        account, tenant = location.account or "", location.tenant.value
        refused: set[str] = set()
        while True:
            found = self._allocations.allocation(account)
            if found is None:
                candidates = [p for p in self._pool if p not in refused]
                try:
                    found = self._allocations.allocate(tenant_id=tenant, account=account, candidates=candidates)
                except ArchiveKmsError as exc:
                    raise StorageError(f"{location.uri}: {exc}", resource=location.uri) from exc
                if found is None:
                    raise StorageError(
                        f"{location.uri}: no free account in the Azurite pool ({len(self._pool)} accounts, "
                        f"{len(refused)} claimed by another deployment): remove a tenant, or start Azurite with a "
                        "larger pool (ARCHIVE_KMS_AZURITE_POOL_SIZE)",
                        resource=location.uri,
                    )
            self._check_tenant(location, found)
            if self._claim(found.pool_account, location):
                break
            # Another deployment sharing this Azurite holds it: not ours to take.
            log.warning("pool account %s is claimed by another deployment; taking another", found.pool_account)
            self._allocations.release(account, found.pool_account)
            refused.add(found.pool_account)
        svc = self._pool[found.pool_account]
        try:
            create_azure_container(svc, location, sleep=self._sleep, clock=self._clock)
        except ArchiveKmsError:
            raise
        except Exception as exc:
            raise _translate(exc, pool_account=found.pool_account, op="Create Container") from exc

    def exists(self, location: Location) -> bool:
        require_own_account(location)
        found = self._allocations.allocation(location.account or "")
        if found is None or found.tenant_id != location.tenant.value or found.pool_account not in self._pool:
            return False
        svc = self._pool[found.pool_account]
        if self._claim_owner(found.pool_account) != self._owner(location):
            return False
        try:
            return bool(svc.get_container_client(location.container).exists())
        except Exception as exc:
            raise _translate(exc, pool_account=found.pool_account, op="Get Container Properties") from exc

    def delete(self, location: Location, store: ObjectStore) -> int:
        """Empty the pool account (every container, the claim last) and release it; the
        objects the store listed are counted. The account is deleted as a whole, as on Azure."""
        require_own_account(location)
        found = self._allocations.allocation(location.account or "")
        if found is None:
            return 0  # never created, or deleted by an earlier run
        self._check_tenant(location, found)
        pool_account = found.pool_account
        owner = self._claim_owner(pool_account) if pool_account in self._pool else None
        if owner is not None and owner != self._owner(location):
            # Another deployment claimed it after ours went (a delete that died between
            # dropping the claim and releasing), or before ours was ever made: nothing of
            # this tenant is there. Release the stale allocation, touch nothing.
            log.warning(
                "pool account %s is claimed by %s; releasing %s's stale allocation", pool_account, owner, location.uri
            )
            self._allocations.release(location.account or "", pool_account)
            return 0
        count = 0
        if owner is not None:
            svc = self._pool[pool_account]
            count = sum(1 for _ in store.list())
            try:
                names = [c.name for c in svc.list_containers() if c.name != CLAIM_CONTAINER]
                for name in names:
                    self._delete_container(svc, name)
                self._delete_container(svc, CLAIM_CONTAINER)
            except ArchiveKmsError:
                raise
            except Exception as exc:
                raise _translate(exc, pool_account=pool_account, op="Delete Container") from exc
        self._allocations.release(location.account or "", pool_account)
        return count

    def blob_service(self, location: Location) -> Any:
        require_own_account(location)
        found = self._allocations.allocation(location.account or "")
        if found is None or found.tenant_id != location.tenant.value or found.pool_account not in self._pool:
            raise StorageError(
                f"{location.uri}: the tenant's storage account does not exist (no pool account allocated to it)",
                resource=location.uri,
            )
        return self._pool[found.pool_account]

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _owner(location: Location) -> str:
        return f"{location.tenant.value}/{location.account}"

    @staticmethod
    def _check_tenant(location: Location, found: PoolAllocation) -> None:
        if found.tenant_id != location.tenant.value:
            raise StorageError(
                f"{location.uri}: storage account {location.account} belongs to tenant {found.tenant_id}, "
                f"not {location.tenant.value}",
                resource=location.uri,
            )

    def _claim(self, pool_account: str, location: Location) -> bool:
        """Claim ``pool_account`` for the location (create-if-absent); True if the claim is
        (now) ours, False if another owner holds it."""
        from azure.core.exceptions import ResourceExistsError

        if pool_account not in self._pool:
            raise ConfigurationError(
                f"{location.uri}: pool account {pool_account} is allocated but not configured "
                "(azure_account_pool lost it): restore the setting, or release the allocation",
                resource=location.uri,
            )
        svc = self._pool[pool_account]
        meta = {"tenant": location.tenant.value, "account": location.account or ""}
        if location.cmk_key_url:
            meta["cmkkeyurl"] = location.cmk_key_url

        def claimed() -> bool:
            try:
                svc.create_container(CLAIM_CONTAINER, metadata=meta)
            except ResourceExistsError as exc:
                # ContainerBeingDeleted: the previous tenant's claim is going away: wait
                return getattr(exc, "error_code", None) != "ContainerBeingDeleted"
            return True

        try:
            retry.poll(
                claimed,
                timeout=60.0,
                backoff=retry.Backoff(base_delay=0.5, max_delay=4.0, jitter=False),
                on_timeout=lambda: ServiceUnavailableError(
                    f"{location.uri}: the claim on pool account {pool_account} is still being deleted; retry",
                    resource=location.uri,
                ),
                clock=self._clock,
                sleep=self._sleep,
            )
        except ArchiveKmsError:
            raise
        except Exception as exc:
            raise _translate(exc, pool_account=pool_account, op="Create Container (claim)") from exc
        return self._claim_owner(pool_account) == self._owner(location)

    def _claim_owner(self, pool_account: str) -> str | None:
        """``tenant/account`` named by the claim, or None if unclaimed."""
        from azure.core.exceptions import ResourceNotFoundError

        svc = self._pool[pool_account]
        try:
            props = svc.get_container_client(CLAIM_CONTAINER).get_container_properties()
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ResourceNotFound":
                raise _translate(exc, pool_account=pool_account, op="Get Container Properties (claim)") from exc
            return None
        except Exception as exc:
            raise _translate(exc, pool_account=pool_account, op="Get Container Properties (claim)") from exc
        meta = props.metadata or {}
        return f"{meta.get('tenant', '?')}/{meta.get('account', '?')}"

    @staticmethod
    def _delete_container(svc: Any, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            svc.delete_container(name)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ResourceNotFound":
                raise
            # ContainerNotFound: already gone


__all__ = ["CLAIM_CONTAINER", "AzuritePoolProvisioner", "PoolAllocations"]
