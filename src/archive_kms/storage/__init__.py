"""Object storage: the ``ObjectStore`` port, its adapters (``s3``, ``azure_blob``,
``memory``) and tenant ``Location``s. See ``docs/storage-layout.md``."""

from archive_kms.storage.locations import (
    Cloud,
    Kind,
    Location,
    create_azure_container,
    create_dedicated_s3_bucket,
    dedicated_azure_location,
    dedicated_s3_location,
    delete_location,
    open_store,
    shared_azure_location,
    shared_s3_location,
)
from archive_kms.storage.port import ObjectInfo, ObjectReader, ObjectStore, PendingUpload

__all__ = [
    "Cloud",
    "Kind",
    "Location",
    "ObjectInfo",
    "ObjectReader",
    "ObjectStore",
    "PendingUpload",
    "create_azure_container",
    "create_dedicated_s3_bucket",
    "dedicated_azure_location",
    "dedicated_s3_location",
    "delete_location",
    "open_store",
    "shared_azure_location",
    "shared_s3_location",
]
