"""Where a tenant's objects live, and creating, opening and deleting those places.

Four kinds of ``Location`` (``docs/storage-layout.md``):

============  =========================================  ==========================================
              S3                                          Azure Blob
============  =========================================  ==========================================
shared        shared bucket, prefix ``tenants/<id>/``     shared account, container ``tenant-<id>``
dedicated     bucket ``<prefix>-<id>``, default           the tenant's own storage account
              encryption SSE-KMS under the tenant's key   ``<prefix><id><hash8>``, container
                                                          ``byok-<id>`` (``own_account``); or, as
                                                          earlier releases made them, container
                                                          ``byok-<id>`` in the platform account
============  =========================================  ==========================================

Every name comes from ``domain.tenants`` (validated id, validated output). Admin
functions take ready SDK clients; ``open_store`` builds them from settings
(``archive_kms.clients``) unless given.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from archive_kms import clients, retry
from archive_kms.config import Settings, get_settings
from archive_kms.domain.tenants import (
    DEFAULT_DEDICATED_BUCKET_PREFIX,
    DEFAULT_DEDICATED_CONTAINER_PREFIX,
    DEFAULT_SHARED_CONTAINER_PREFIX,
    TenantId,
    azure_container_name,
    azure_storage_account_name,
    check_azure_account_name,
    check_azure_container_name,
    check_s3_bucket_name,
    check_s3_key_prefix,
    check_tenant_account_name,
    dedicated_s3_bucket_name,
    shared_s3_prefix,
)
from archive_kms.errors import (
    ConfigurationError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    ValidationError,
)
from archive_kms.storage.port import ObjectStore

log = logging.getLogger(__name__)

# A key ARN, not an alias: S3 reports the key ARN on every object, and we compare.
_KMS_KEY_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]{1,128}", re.ASCII)
# A versionless Key Vault key URL: the account's encryption follows the customer's rotations.
_KV_KEY_URL_RE = re.compile(
    r"https://[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::\d{1,5})?/keys/[A-Za-z0-9-]{1,127}", re.ASCII
)


class Kind(str, enum.Enum):
    SHARED = "shared"
    DEDICATED = "dedicated"


class Cloud(str, enum.Enum):
    S3 = "s3"
    AZURE = "azure"


@dataclass(frozen=True)
class Location:
    """One tenant's storage place. Build with the ``*_location`` functions; the
    constructor re-checks every field, so a Location read back from the state store is as
    trustworthy as a fresh one."""

    tenant: TenantId
    kind: Kind
    cloud: Cloud
    bucket: str | None = None  # S3
    account: str | None = None  # Azure storage account
    container: str | None = None  # Azure
    prefix: str = ""  # key prefix inside the bucket/container ("" = the whole bucket/container)
    sse_kms_key_arn: str | None = None  # S3 dedicated: default encryption key, sent on every PUT
    # Azure dedicated: the account is the tenant's own (created and deleted with the location
    # by its provisioner), not the platform's.
    own_account: bool = False
    # Azure, own account: the customer's Key Vault key (versionless URL) that encrypts the
    # account; None = Microsoft-managed keys (the tenant's key is not in Key Vault: KMIP).
    cmk_key_url: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant", TenantId.of(self.tenant))
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "cloud", Cloud(self.cloud))
        if not isinstance(self.own_account, bool):
            raise ValidationError(f"own_account must be true or false, got {ascii(self.own_account)[:40]}")
        if self.prefix:
            check_s3_key_prefix(self.prefix)
        if self.cloud is Cloud.S3:
            if self.bucket is None or self.account is not None or self.container is not None:
                raise ValidationError("an S3 location has a bucket and no account/container")
            check_s3_bucket_name(self.bucket)
            if self.kind is Kind.SHARED and not self.prefix:
                raise ValidationError(f"shared S3 location for {self.tenant} needs a tenant prefix")
        else:
            if self.account is None or self.container is None or self.bucket is not None:
                raise ValidationError("an Azure location has an account and a container and no bucket")
            check_azure_account_name(self.account)
            check_azure_container_name(self.container)
            if self.sse_kms_key_arn is not None:
                raise ValidationError("sse_kms_key_arn applies to S3 locations only")
        if self.own_account:
            if self.cloud is not Cloud.AZURE or self.kind is not Kind.DEDICATED or self.prefix:
                raise ValidationError("own_account applies to dedicated Azure locations (a whole container) only")
            check_tenant_account_name(self.tenant, self.account or "")  # another tenant's account is refused
        if self.cmk_key_url is not None:
            if not self.own_account:
                raise ValidationError("cmk_key_url applies to a tenant's own storage account only")
            if _KV_KEY_URL_RE.fullmatch(self.cmk_key_url) is None:
                raise ValidationError(
                    f"cmk_key_url {ascii(self.cmk_key_url)[:120]} must be a versionless Key Vault key URL "
                    "(https://<vault host>[:port]/keys/<name>)"
                )
        if self.sse_kms_key_arn is not None and _KMS_KEY_ARN_RE.fullmatch(self.sse_kms_key_arn) is None:
            raise ValidationError(
                f"sse_kms_key_arn {ascii(self.sse_kms_key_arn)[:120]} must be a KMS key ARN "
                "(arn:aws:kms:<region>:<account>:key/<id>), not an alias or bare id"
            )

    @property
    def uri(self) -> str:
        if self.cloud is Cloud.S3:
            return f"s3://{self.bucket}/{self.prefix}"
        return f"azure://{self.account}/{self.container}/{self.prefix}"

    def to_dict(self) -> dict[str, str | bool | None]:
        """The stored form (docs/storage-layout.md, "Locations"). ``own_account`` and
        ``cmk_key_url`` appear only for a tenant's own account, so every other location
        keeps the exact dict earlier releases stored (plans and registry entries compare
        these dicts)."""
        out: dict[str, str | bool | None] = {
            "tenant": self.tenant.value,
            "kind": self.kind.value,
            "cloud": self.cloud.value,
            "bucket": self.bucket,
            "account": self.account,
            "container": self.container,
            "prefix": self.prefix,
            "sse_kms_key_arn": self.sse_kms_key_arn,
        }
        if self.own_account:
            out["own_account"] = True
            out["cmk_key_url"] = self.cmk_key_url
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Location:
        return cls(
            tenant=TenantId(data["tenant"]),
            kind=Kind(data["kind"]),
            cloud=Cloud(data["cloud"]),
            bucket=data.get("bucket"),
            account=data.get("account"),
            container=data.get("container"),
            prefix=data.get("prefix") or "",
            sse_kms_key_arn=data.get("sse_kms_key_arn"),
            own_account=data.get("own_account", False),
            cmk_key_url=data.get("cmk_key_url"),
        )


# --- constructors ---------------------------------------------------------------------------


def shared_s3_location(tenant: TenantId | str, bucket: str) -> Location:
    """The tenant's prefix ``tenants/<id>/`` in the shared bucket."""
    t = TenantId.of(tenant)
    return Location(t, Kind.SHARED, Cloud.S3, bucket=check_s3_bucket_name(bucket), prefix=shared_s3_prefix(t))


def dedicated_s3_location(
    tenant: TenantId | str, *, sse_kms_key_arn: str | None, bucket_prefix: str = DEFAULT_DEDICATED_BUCKET_PREFIX
) -> Location:
    """A bucket of its own. ``sse_kms_key_arn`` is the tenant's key for AWS-based modes
    (BYOK imported into our KMS, BYOKMS); None for modes whose key is not in AWS KMS."""
    t = TenantId.of(tenant)
    return Location(
        t,
        Kind.DEDICATED,
        Cloud.S3,
        bucket=dedicated_s3_bucket_name(t, prefix=bucket_prefix),
        sse_kms_key_arn=sse_kms_key_arn,
    )


def shared_azure_location(
    tenant: TenantId | str, account: str, *, container_prefix: str = DEFAULT_SHARED_CONTAINER_PREFIX
) -> Location:
    """Container ``tenant-<id>`` in the shared storage account."""
    t = TenantId.of(tenant)
    return Location(
        t, Kind.SHARED, Cloud.AZURE, account=account, container=azure_container_name(t, prefix=container_prefix)
    )


def dedicated_azure_location(
    tenant: TenantId | str,
    account: str | None = None,
    *,
    container_prefix: str = DEFAULT_DEDICATED_CONTAINER_PREFIX,
    account_prefix: str | None = None,
    cmk_key_url: str | None = None,
) -> Location:
    """A dedicated container ``byok-<id>``: with ``account_prefix``, in the tenant's own
    storage account ``<prefix><id><hash8>`` (``own_account``; ``cmk_key_url``: the
    customer's Key Vault key that encrypts it); with ``account``, in that platform account
    (how earlier releases placed BYOKV tenants; still read and removed)."""
    t = TenantId.of(tenant)
    if (account is None) == (account_prefix is None):
        raise ValidationError("give exactly one of account (platform account) or account_prefix (per-tenant account)")
    container = azure_container_name(t, prefix=container_prefix)
    if account is not None:
        if cmk_key_url is not None:
            raise ValidationError("cmk_key_url applies to a tenant's own storage account only")
        return Location(t, Kind.DEDICATED, Cloud.AZURE, account=account, container=container)
    return Location(
        t,
        Kind.DEDICATED,
        Cloud.AZURE,
        account=azure_storage_account_name(t, prefix=account_prefix or ""),
        container=container,
        own_account=True,
        cmk_key_url=cmk_key_url,
    )


# --- opening --------------------------------------------------------------------------------


def open_store(
    location: Location,
    settings: Settings | None = None,
    *,
    s3_client: Any = None,
    blob_service: Any = None,
    **tuning: Any,
) -> ObjectStore:
    """The ObjectStore for ``location``. Clients default to ones built from ``settings``
    (``archive_kms.clients``); ``tuning`` passes part_size / list_page_size / read_chunk_size."""
    if location.cloud is Cloud.S3:
        from archive_kms.storage.s3 import S3ObjectStore

        client = s3_client or clients.aws_client("s3", settings)
        bucket = location.bucket or ""
        s = settings or get_settings()
        if s.s3_read_client == "obstore" and "reads" not in tuning:
            from archive_kms.storage.s3_obstore import ObstoreS3Reads

            tuning["reads"] = ObstoreS3Reads(
                clients.obstore_s3_store(bucket, s), bucket, chunk_size=tuning.get("read_chunk_size", 1024 * 1024)
            )
        return S3ObjectStore(client, bucket, location.prefix, sse_kms_key_arn=location.sse_kms_key_arn, **tuning)
    from archive_kms.storage.azure_blob import AzureBlobObjectStore

    if location.own_account:
        # A tenant's own account is reached through the client its provisioner gives
        # (storage.provisioning: ARM-created account, or the Azurite pool account standing in).
        if blob_service is None:
            raise ConfigurationError(
                f"{location.uri}: no credentials configured for the tenant's own storage account "
                f"{location.account!r}: open it through the platform (its provisioner gives the account's client)",
                resource=location.uri,
            )
        svc = blob_service
    else:
        svc = blob_service or clients.blob_service_client(settings)
        if svc.account_name != location.account:
            raise ConfigurationError(
                f"{location.uri}: no credentials configured for storage account {location.account!r} "
                f"(the configured Blob connection is for {svc.account_name!r}); per-tenant storage accounts need "
                "an account-specific client passed as blob_service",
                resource=location.uri,
            )
    return AzureBlobObjectStore(svc.get_container_client(location.container), prefix=location.prefix, **tuning)


# --- creating --------------------------------------------------------------------------------


def _poll(
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> None:
    retry.poll(
        check,
        timeout=timeout,
        backoff=retry.Backoff(base_delay=interval, max_delay=interval, jitter=False, factor=1),
        on_timeout=lambda: ServiceUnavailableError(
            f"{what} did not read back within {timeout:.0f} s; retry the step", resource=what
        ),
        clock=monotonic,
        sleep=sleep,
    )


def create_dedicated_s3_bucket(
    s3: Any,
    location: Location,
    *,
    region: str,
    timeout: float = 60.0,
    interval: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Create (or finish creating) the dedicated bucket: private (public access block,
    ACLs disabled), default encryption SSE-KMS under the location's key with S3 Bucket
    Keys; then wait until that configuration reads back (faults A14) so the first PUT
    cannot race it. Idempotent: a re-run on a bucket we own re-applies and re-checks."""
    from botocore.exceptions import ClientError

    from archive_kms.storage.s3 import translate_error

    if location.cloud is not Cloud.S3 or location.kind is not Kind.DEDICATED:
        raise ValidationError(f"{location.uri} is not a dedicated S3 location")
    bucket = location.bucket or ""
    key_arn = location.sse_kms_key_arn

    def call(op: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return fn(Bucket=bucket, **kw)
        except Exception as exc:
            raise translate_error(exc, bucket=bucket, key=None, op=op) from exc

    try:
        kw: dict[str, Any] = {}
        if region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        s3.create_bucket(Bucket=bucket, ObjectOwnership="BucketOwnerEnforced", **kw)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "BucketAlreadyExists":
            raise StorageError(
                f"bucket name {bucket!r} is taken by another AWS account; choose another dedicated bucket prefix",
                resource=bucket,
            ) from exc
        if code != "BucketAlreadyOwnedByYou":
            raise translate_error(exc, bucket=bucket, key=None, op="CreateBucket") from exc
    except Exception as exc:
        raise translate_error(exc, bucket=bucket, key=None, op="CreateBucket") from exc

    pab = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    call("PutPublicAccessBlock", s3.put_public_access_block, PublicAccessBlockConfiguration=pab)
    if key_arn is not None:
        rule = {
            "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn},
            "BucketKeyEnabled": True,
        }
    else:
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    call("PutBucketEncryption", s3.put_bucket_encryption, ServerSideEncryptionConfiguration={"Rules": [rule]})

    def configured() -> bool:
        try:
            rules = call("GetBucketEncryption", s3.get_bucket_encryption)["ServerSideEncryptionConfiguration"]["Rules"]
            got_pab = call("GetPublicAccessBlock", s3.get_public_access_block)["PublicAccessBlockConfiguration"]
        except (StorageError, ServiceUnavailableError) as exc:
            log.info("s3://%s: configuration not readable yet: %s", bucket, exc)
            return False
        return got_pab == pab and any(_rule_matches(r, rule) for r in rules)

    _poll(
        f"s3://{bucket} default encryption and public access block",
        configured,
        timeout=timeout,
        interval=interval,
        sleep=sleep,
        monotonic=monotonic,
    )


def _rule_matches(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    g, w = got.get("ApplyServerSideEncryptionByDefault", {}), want["ApplyServerSideEncryptionByDefault"]
    if g.get("SSEAlgorithm") != w["SSEAlgorithm"]:
        return False
    if "KMSMasterKeyID" in w:
        return g.get("KMSMasterKeyID") == w["KMSMasterKeyID"] and bool(got.get("BucketKeyEnabled"))
    return True


#: Azure deletes a container in the background (up to ~30 s, longer under load); creating
#: one of the same name meanwhile answers 409 ContainerBeingDeleted.
CONTAINER_BEING_DELETED_WAIT_S = 120.0


def create_azure_container(
    blob_service: Any,
    location: Location,
    *,
    wait_s: float = CONTAINER_BEING_DELETED_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Create the location's container (private); an existing one is reused. A container
    of that name still being deleted (a quick remove-then-enable) is waited for, with
    backoff, up to ``wait_s``: "exists" would be wrong, as it is about to vanish."""
    from azure.core.exceptions import ResourceExistsError

    from archive_kms.storage.azure_blob import translate_error

    if location.cloud is not Cloud.AZURE:
        raise ValidationError(f"{location.uri} is not an Azure location")

    def created() -> bool:
        try:
            blob_service.create_container(location.container)
        except ResourceExistsError as exc:
            # ContainerAlreadyExists: reuse it; ContainerBeingDeleted: wait, it is about to vanish.
            return getattr(exc, "error_code", None) != "ContainerBeingDeleted"
        except Exception as exc:
            raise translate_error(exc, where=location.uri, op="Create Container") from exc
        return True

    retry.poll(
        created,
        timeout=wait_s,
        backoff=retry.Backoff(base_delay=0.5, max_delay=8.0, jitter=False),
        on_timeout=lambda: ServiceUnavailableError(
            f"container {location.container} is still being deleted after {wait_s:.0f}s; retry the step later",
            resource=location.uri,
        ),
        clock=clock,
        sleep=sleep,
        wait_must_fit=True,
    )


# --- deleting --------------------------------------------------------------------------------


def _container_exists(location: Location, s3_client: Any, blob_service: Any) -> bool:
    """Whether the dedicated bucket / Azure container is still there (the shared bucket
    always must be: a missing one is an error the listing will report)."""
    if location.cloud is Cloud.S3:
        if location.kind is Kind.SHARED:
            return True
        from archive_kms.storage.s3 import translate_error as s3_error

        try:
            s3_client.head_bucket(Bucket=location.bucket)
        except Exception as exc:
            err = s3_error(exc, bucket=location.bucket or "", key=None, op="HeadBucket")
            if isinstance(err, ObjectNotFoundError):  # HeadBucket answers a bare 404
                return False
            raise err from exc
        return True
    from archive_kms.storage.azure_blob import translate_error as az_error

    try:
        return bool(blob_service.get_container_client(location.container).exists())
    except Exception as exc:
        raise az_error(exc, where=location.uri, op="Get Container Properties") from exc


def delete_location(location: Location, store: ObjectStore, *, s3_client: Any = None, blob_service: Any = None) -> int:
    """Delete every object (and unfinished upload) in the location, then the bucket or
    container itself, except the shared bucket, which only loses the tenant's prefix.
    Idempotent; returns how many objects were deleted. The caller has verified that the
    data lives elsewhere: this is the last step of a migration, never a first one."""
    if location.kind is Kind.DEDICATED and location.cloud is Cloud.S3 and s3_client is None:
        raise ValidationError("deleting a dedicated S3 location needs s3_client to remove the bucket")
    if location.cloud is Cloud.AZURE and blob_service is None:
        raise ValidationError("deleting an Azure location needs blob_service to remove the container")
    if not _container_exists(location, s3_client, blob_service):
        return 0  # already deleted by an earlier run
    count = store.delete_many(info.name for info in store.list())  # batched: 1,000 (S3) / 256 (Azure) a request
    store.abort_stale_uploads(timedelta(0))
    if location.cloud is Cloud.S3 and location.kind is Kind.DEDICATED:
        from archive_kms.storage.s3 import translate_error as s3_error

        try:
            s3_client.delete_bucket(Bucket=location.bucket)
        except Exception as exc:
            err = s3_error(exc, bucket=location.bucket or "", key=None, op="DeleteBucket")
            if "does not exist" not in str(err):
                raise err from exc
    elif location.cloud is Cloud.AZURE:
        from azure.core.exceptions import ResourceNotFoundError

        from archive_kms.storage.azure_blob import translate_error as az_error

        try:
            blob_service.delete_container(location.container)
        except ResourceNotFoundError:
            pass
        except Exception as exc:
            raise az_error(exc, where=location.uri, op="Delete Container") from exc
    return count
