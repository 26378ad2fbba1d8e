"""Provisioning: creating, probing and deleting a tenant's *location* (the bucket or
container itself), as opposed to the objects in it (``ObjectStore``).

``LocationProvisioner`` is the port the migration flows use; ``CloudProvisioner`` does it
on S3 / Azure Blob through the functions in ``storage.locations``; ``MemoryProvisioner``
does it over the in-memory stores of ``Platform.in_memory()``. Both answer the same
questions the same way: ``exists`` is False for a dedicated location never created or
deleted; the shared S3 bucket "exists" for every tenant prefix (the bucket is the
platform's; the prefix is the tenant's entity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from archive_kms import clients
from archive_kms.config import Settings
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


class CloudProvisioner:
    """S3 buckets and Azure containers. Takes ready SDK clients (the platform's); a client
    not given is built from ``settings`` on first use."""

    def __init__(self, settings: Settings, *, s3_client: Any = None, blob_service: Any = None) -> None:
        self._settings = settings
        self._s3 = s3_client
        self._blob = blob_service

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = clients.aws_client("s3", self._settings)
        return self._s3

    def _blob_service(self) -> Any:
        if self._blob is None:
            self._blob = clients.blob_service_client(self._settings)
        return self._blob

    def create(self, location: Location) -> None:
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
        if location.cloud is Cloud.S3:
            return _container_exists(location, self._s3_client(), None)
        return _container_exists(location, None, self._blob_service())

    def delete(self, location: Location, store: ObjectStore) -> int:
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


__all__ = ["CloudProvisioner", "LocationProvisioner", "MemoryProvisioner"]
