"""Provisioning: creating, probing and deleting a tenant's *location* (the bucket or
container itself), as opposed to the objects in it (``ObjectStore``).

``LocationProvisioner`` is the port the migration flows use; ``CloudProvisioner`` does it
on S3 / Azure Blob through the functions in ``storage.locations``, and hands a tenant's
own Azure storage account (``Location.own_account``) to a ``TenantAccountProvisioner``:
``storage.azure_accounts.ArmAccountProvisioner`` (Azure Resource Manager) or, on the local
stack, ``storage.azurite_pool.AzuritePoolProvisioner`` (Azurite accounts standing in);
both are held to ``tests/contract/test_tenant_account_contract.py``.
``MemoryProvisioner`` does it over the in-memory stores of ``Platform.in_memory()``. All
answer the same questions the same way: ``exists`` is False for a dedicated location never
created or deleted; the shared S3 bucket "exists" for every tenant prefix (the bucket is
the platform's; the prefix is the tenant's entity).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.errors import ConfigurationError, ValidationError
from archive_kms.storage.locations import (
    Cloud,
    Kind,
    Location,
    _container_exists,
    create_azure_container,
    create_dedicated_s3_bucket,
    delete_location,
)
from archive_kms.storage.port import ObjectStore


@runtime_checkable
class LocationProvisioner(Protocol):
    def create(self, location: Location) -> None:
        """Create the location (idempotent), and wait until its configuration reads back."""
        ...

    def exists(self, location: Location) -> bool:
        """Whether the bucket/container is there."""
        ...

    def delete(self, location: Location, store: ObjectStore) -> int:
        """Delete every object in it and then the bucket/container (the shared bucket keeps
        existing; only the tenant's prefix is emptied). Idempotent; returns objects deleted."""
        ...


@runtime_checkable
class TenantAccountProvisioner(LocationProvisioner, Protocol):
    """A tenant's own storage account (``Location.own_account``), created with the location
    and deleted with it. Contract, on top of ``LocationProvisioner``'s:

    - ``create`` makes the account (encrypted with ``location.cmk_key_url`` when given),
      its container, and waits until both are usable; again on a location of this tenant
      it converges and returns. An account of that name that is not this tenant's (another
      owner, another tenant) raises ``StorageError`` and is left alone.
    - ``exists`` is True only for this tenant's account with its container.
    - ``delete`` removes the account with everything in it (returns the objects the store
      listed); a missing account counts as done; another owner's raises ``StorageError``.
    - A location that is not a tenant's own account raises ``ValidationError`` (names are
      validated by ``Location``).
    """

    def blob_service(self, location: Location) -> Any:
        """The Blob client (azure-storage-blob ``BlobServiceClient``) for the location's
        account; ``StorageError`` if the account is not there."""
        ...


def require_own_account(location: Location) -> Location:
    """``ValidationError`` unless ``location`` is a tenant's own Azure storage account."""
    if not (location.own_account and location.cloud is Cloud.AZURE and location.kind is Kind.DEDICATED):
        raise ValidationError(f"{location.uri} is not a tenant's own storage account")
    return location


class CloudProvisioner:
    """S3 buckets and Azure containers, and tenants' own Azure accounts through
    ``accounts``. Takes ready SDK clients (the platform's); a client not given is built
    from ``settings`` on first use, and ``accounts_factory`` (instead of ``accounts``) is
    called on first use, so a process that never touches Azure never imports its SDK."""

    def __init__(
        self,
        settings: Settings,
        *,
        s3_client: Any = None,
        blob_service: Any = None,
        accounts: TenantAccountProvisioner | None = None,
        accounts_factory: Callable[[], TenantAccountProvisioner | None] | None = None,
    ) -> None:
        if accounts is not None and accounts_factory is not None:
            raise ValidationError("give accounts or accounts_factory, not both")
        self._settings = settings
        self._s3 = s3_client
        self._blob = blob_service
        self._accounts = accounts
        self._accounts_factory = accounts_factory
        self._lock = threading.Lock()  # each lazy client is built once

    def tenant_accounts(self) -> TenantAccountProvisioner:
        """The provisioner of tenants' own storage accounts; ConfigurationError naming the
        settings when none is configured."""
        if self._accounts is None and self._accounts_factory is not None:
            with self._lock:
                if self._accounts_factory is not None:
                    self._accounts = self._accounts_factory()
                    self._accounts_factory = None
        if self._accounts is None:
            raise ConfigurationError(
                "no provisioner for tenants' own Azure storage accounts: set azure_subscription_id, "
                "azure_resource_group, azure_region and azure_cmk_identity_id (Azure Resource Manager; "
                "docs/deployment.md), or azure_account_pool (the local stack's Azurite pool: `archive-kms stack up`), "
                "or azure_dedicated_storage=container",
                resource="azure_dedicated_storage",
            )
        return self._accounts

    def blob_service(self, location: Location) -> Any:
        """The Blob client for an Azure location's account."""
        if location.own_account:
            return self.tenant_accounts().blob_service(location)
        return self._blob_service()

    def shared_blob_service(self) -> Any:
        """The platform's Blob client (shared Azure account), built on first use."""
        return self._blob_service()

    def _s3_client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                self._s3 = clients.aws_client("s3", self._settings)
            return self._s3

    def _blob_service(self) -> Any:
        with self._lock:
            if self._blob is None:
                self._blob = clients.blob_service_client(self._settings)
            return self._blob

    def create(self, location: Location) -> None:
        if location.own_account:
            self.tenant_accounts().create(location)
            return
        if location.cloud is Cloud.S3:
            s3 = self._s3_client()
            if location.kind is Kind.DEDICATED:
                create_dedicated_s3_bucket(s3, location, region=self._settings.aws_region)
            else:
                try:
                    s3.head_bucket(Bucket=location.bucket)
                except Exception:  # noqa: BLE001 - create on any miss; create_bucket reports real errors
                    s3.create_bucket(Bucket=location.bucket)
            return
        create_azure_container(self._blob_service(), location)

    def exists(self, location: Location) -> bool:
        if location.own_account:
            return self.tenant_accounts().exists(location)
        if location.cloud is Cloud.S3:
            return _container_exists(location, self._s3_client(), None)
        return _container_exists(location, None, self._blob_service())

    def delete(self, location: Location, store: ObjectStore) -> int:
        if location.own_account:
            return self.tenant_accounts().delete(location, store)
        if location.cloud is Cloud.S3:
            return delete_location(location, store, s3_client=self._s3_client())
        return delete_location(location, store, blob_service=self._blob_service())


class MemoryProvisioner:
    """Locations over ``Platform.in_memory()``'s stores: a set of created location URIs."""

    def __init__(self, open_store: Callable[[Location], ObjectStore]) -> None:
        self._open_store = open_store
        self._created: set[str] = set()

    def create(self, location: Location) -> None:
        self._created.add(location.uri)

    def exists(self, location: Location) -> bool:
        return location.kind is Kind.SHARED or location.uri in self._created

    def delete(self, location: Location, store: ObjectStore) -> int:
        count = store.delete_many([info.name for info in store.list()])
        self._created.discard(location.uri)
        return count


__all__ = [
    "CloudProvisioner",
    "LocationProvisioner",
    "MemoryProvisioner",
    "TenantAccountProvisioner",
    "require_own_account",
]
