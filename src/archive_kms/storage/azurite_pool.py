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

A claim also names the deployment that made it (``deploymenthost``, ``deploymentstate``:
the host and the path of its SQLite state store). A deployment that died without
deleting its tenants leaves claims behind; another deployment reclaims such an account
only on proof that the claimant is gone (ADR 0047): the claim names this host and a
SQLite state store that no longer exists or no longer holds the allocation. It then takes
a lease on the claim, checks under the lease that the claim is still the one judged,
empties the account and drops the claim. A claim without that record (an older version, or
a PostgreSQL state store) is never reclaimed.

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
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

from archive_kms import retry
from archive_kms.errors import ArchiveKmsError, ConfigurationError, ServiceUnavailableError, StorageError
from archive_kms.storage.locations import Location, create_azure_container
from archive_kms.storage.port import ObjectStore
from archive_kms.storage.provisioning import require_own_account

log = logging.getLogger(__name__)

#: The container that marks a pool account as taken (its metadata: tenant, account).
CLAIM_CONTAINER = "akms-pool-claim"
#: How long a reclaim's lease on a dead deployment's claim lasts (renewed while it works);
#: a reclaimer that dies leaves the claim to the next one after this.
RECLAIM_LEASE_SECONDS = 60


def host_id() -> str:
    """This machine: host name and machine id (a SQLite path means nothing on another host)."""
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                machine = f.read().strip()[:32]
            break
        except (OSError, UnicodeDecodeError):
            continue
    return f"{socket.gethostname()}/{machine}"


@dataclass(frozen=True)
class PoolDeployment:
    """This deployment, as its claims name it, and how to tell whether another deployment
    (named by its claim) is gone. ``state_path``: the absolute path of this deployment's
    SQLite state store, or None (then its claims can never be reclaimed by anyone).
    ``store_holds(path, pool_account=, account=, tenant_id=)``: whether the SQLite state
    store at ``path`` still holds that allocation (``state.account_pool.sqlite_store_holds``);
    it must answer False only on proof."""

    host: str
    state_path: str | None
    store_holds: Callable[..., bool]

    def claim_metadata(self) -> dict[str, str]:
        if self.state_path is None:
            return {}
        return {"deploymenthost": quote(self.host, safe="/"), "deploymentstate": quote(self.state_path, safe="/")}

    def claimant_gone(self, claim: Mapping[str, str], pool_account: str) -> bool:
        """True only if the claim names this host and a SQLite state store that no longer
        holds its allocation."""
        host, state = claim.get("deploymenthost"), claim.get("deploymentstate")
        if not host or not state or unquote(host) != self.host:
            return False
        path = unquote(state)
        if not os.path.isabs(path) or path == self.state_path:
            return False  # our own store: our allocations are ours to release
        return not self.store_holds(
            path, pool_account=pool_account, account=claim.get("account", ""), tenant_id=claim.get("tenant", "")
        )


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
        deployment: PoolDeployment | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not pool:
            raise ConfigurationError("the Azurite account pool is empty (azure_account_pool)")
        self._pool = dict(pool)
        self._allocations = allocations
        self._deployment = deployment
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"AzuritePoolProvisioner({len(self._pool)} accounts)"

    # --- the port ------------------------------------------------------------------------

    def create(self, location: Location) -> None:
        require_own_account(location)
        account, tenant = location.account or "", location.tenant.value
        refused: set[str] = set()
        reclaimed: set[str] = set()  # at most once each: a claim that comes back is a live owner's
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
            if found.pool_account not in reclaimed and self._reclaim(found.pool_account):
                reclaimed.add(found.pool_account)
                continue  # the claimant was gone: claim it again (our allocation stands)
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
        if self._deployment is not None:
            meta.update(self._deployment.claim_metadata())

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

    def _reclaim(self, pool_account: str) -> bool:
        """Take back ``pool_account`` from a deployment that is provably gone (ADR 0047):
        judge its claim, lease the claim (one reclaimer at a time), check under the lease
        that it is the same claim (ETag), empty the account and drop the claim. True if the
        account is free now; False if its claimant may be alive (or another reclaims it)."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        if self._deployment is None:
            return False
        claim = self._pool[pool_account].get_container_client(CLAIM_CONTAINER)
        try:
            props = claim.get_container_properties()
        except ResourceNotFoundError:
            return True  # dropped meanwhile: free
        except Exception as exc:
            raise _translate(exc, pool_account=pool_account, op="Get Container Properties (claim)") from exc
        meta = dict(props.metadata or {})
        if not self._deployment.claimant_gone(meta, pool_account):
            return False
        try:
            lease = claim.acquire_lease(lease_duration=RECLAIM_LEASE_SECONDS)
        except HttpResponseError:
            return False  # another reclaimer holds it (or the claim went): look again later
        svc = self._pool[pool_account]
        try:
            if claim.get_container_properties().etag != props.etag:
                lease.release()
                return False  # not the claim we judged
            log.warning(
                "pool account %s: reclaiming it from %s/%s, whose deployment (state store %s) is gone",
                pool_account,
                meta.get("tenant"),
                meta.get("account"),
                unquote(meta.get("deploymentstate", "")),
            )
            for name in [c.name for c in svc.list_containers() if c.name != CLAIM_CONTAINER]:
                lease.renew()
                self._delete_container(svc, name)
            svc.delete_container(CLAIM_CONTAINER, lease=lease)
        except ArchiveKmsError:
            raise
        except Exception as exc:
            raise _translate(exc, pool_account=pool_account, op="reclaim") from exc
        return True

    @staticmethod
    def _delete_container(svc: Any, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            svc.delete_container(name)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ResourceNotFound":
                raise
            # ContainerNotFound: already gone


__all__ = [
    "CLAIM_CONTAINER",
    "RECLAIM_LEASE_SECONDS",
    "AzuritePoolProvisioner",
    "PoolAllocations",
    "PoolDeployment",
    "host_id",
]
