"""Tenants' own storage accounts on Azure, created and deleted through Azure Resource
Manager with azure-mgmt-storage (``storage.provisioning.TenantAccountProvisioner``).

``create`` sends, in this order (bodies are built by the ``*_body`` functions below and
specified in docs/storage-layout.md, "A tenant's own storage account"):

1. ``GET .../storageAccounts/{name}``: an account of that name in our resource group must
   carry our tag ``archive-kms-tenant = <tenant id>``, else it is someone else's
   (``StorageError``, nothing changed). A name held anywhere else in Azure: the PUT below
   answers 409 ``StorageAccountAlreadyTaken`` (``StorageError``, nothing created).
2. ``PUT .../storageAccounts/{name}`` (long-running: 202 + ``Location``, polled by the
   SDK): StorageV2, Entra ID only (no shared key), TLS 1.2, HTTPS only, no public blob
   access, network default Deny with the workers' subnets, infrastructure encryption, and
   with a customer key: encryption ``Microsoft.Keyvault`` under the versionless key through
   the configured user-assigned identity. Re-sent on every ``create``: ARM applies the
   same body as a no-op, so a rerun converges.
3. ``PUT .../blobServices/default``: blob versioning, blob and container soft delete.
4. With a customer key: ``PUT .../encryptionScopes/byok`` under the same key.
5. ``GET``/``PUT .../blobServices/default/containers/{container}``: private, default
   encryption scope ``byok`` that writes cannot override.
6. Waits (``retry.poll``) until the account reads back ``Succeeded`` with its blob
   endpoint and the container answers on the data plane to the workers' identity (role
   assignments take minutes to apply); timeout -> retryable ``ServiceUnavailableError``.

``delete`` counts the objects, then ``DELETE .../storageAccounts/{name}`` (the account goes
with everything in it) — only if the tag says it is this tenant's.

Proven here against a local stand-in of the Resource Manager endpoints that answers as the
REST reference documents (tests/contract/arm_fake.py, held to the same contract as the
Azurite pool); not proven here: real Azure's authorisation, key access checks, network
rules and timings (docs/adr/0031-tenant-storage-accounts.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from archive_kms import clients, retry
from archive_kms.config import Settings
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    KeyUnavailableError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.storage.locations import Location
from archive_kms.storage.port import ObjectStore
from archive_kms.storage.provisioning import require_own_account

#: Our tag on every tenant account: the tenant it belongs to.
TENANT_TAG = "archive-kms-tenant"
#: The encryption scope under the customer's key; the container's default.
ENCRYPTION_SCOPE = "byok"
#: How long create waits for the account and container to be usable.
USABLE_TIMEOUT_S = 900.0


# --- request bodies (docs/storage-layout.md) ----------------------------------------------------


def account_body(
    location: Location,
    *,
    region: str,
    sku: str,
    cmk_identity_id: str | None,
    subnet_ids: Sequence[str],
) -> dict[str, Any]:
    """The body of ``PUT .../storageAccounts/{name}``."""
    encryption: dict[str, Any] = {
        "requireInfrastructureEncryption": True,
        "services": {"blob": {"enabled": True, "keyType": "Account"}, "file": {"enabled": True, "keyType": "Account"}},
    }
    body: dict[str, Any] = {
        "location": region,
        "kind": "StorageV2",
        "sku": {"name": sku},
        "tags": {TENANT_TAG: location.tenant.value},
        "properties": {
            "allowSharedKeyAccess": False,
            "defaultToOAuthAuthentication": True,
            "allowBlobPublicAccess": False,
            "allowCrossTenantReplication": False,
            "minimumTlsVersion": "TLS1_2",
            "supportsHttpsTrafficOnly": True,
            "publicNetworkAccess": "Enabled",  # the subnets' service endpoints go through it; all else is denied
            "networkAcls": {
                "defaultAction": "Deny",
                "bypass": "AzureServices",
                "virtualNetworkRules": [{"id": s, "action": "Allow"} for s in subnet_ids],
            },
            "accessTier": "Hot",
            "encryption": encryption,
        },
    }
    if location.cmk_key_url is None:
        encryption["keySource"] = "Microsoft.Storage"
        return body
    if not cmk_identity_id:
        raise ConfigurationError(
            "azure_cmk_identity_id is not set: a tenant account under the customer's key needs the user-assigned "
            "identity it reaches the key with (docs/deployment.md)",
            resource="azure_cmk_identity_id",
        )
    vault, key_name = _split_key_url(location.cmk_key_url)
    body["identity"] = {"type": "UserAssigned", "userAssignedIdentities": {cmk_identity_id: {}}}
    encryption.update(
        {
            "keySource": "Microsoft.Keyvault",
            "identity": {"userAssignedIdentity": cmk_identity_id},
            # no keyversion: the account follows the customer's rotations
            "keyvaultproperties": {"keyvaulturi": vault, "keyname": key_name},
        }
    )
    return body


def blob_service_body(soft_delete_days: int) -> dict[str, Any]:
    """The body of ``PUT .../blobServices/default``."""
    return {
        "properties": {
            "isVersioningEnabled": True,
            "deleteRetentionPolicy": {"enabled": True, "days": soft_delete_days},
            "containerDeleteRetentionPolicy": {"enabled": True, "days": soft_delete_days},
        }
    }


def encryption_scope_body(cmk_key_url: str) -> dict[str, Any]:
    """The body of ``PUT .../encryptionScopes/byok``."""
    return {
        "properties": {
            "source": "Microsoft.KeyVault",
            "state": "Enabled",
            "requireInfrastructureEncryption": True,
            "keyVaultProperties": {"keyUri": cmk_key_url},
        }
    }


def container_body(location: Location) -> dict[str, Any]:
    """The body of ``PUT .../blobServices/default/containers/{container}``."""
    props: dict[str, Any] = {"publicAccess": "None"}
    if location.cmk_key_url is not None:
        props.update({"defaultEncryptionScope": ENCRYPTION_SCOPE, "denyEncryptionScopeOverride": True})
    return {"properties": props}


def _split_key_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rsplit("/", 1)[-1]


# --- errors -------------------------------------------------------------------------------------


def translate_arm_error(exc: BaseException, *, where: str, op: str) -> ArchiveKmsError:
    """An azure-mgmt / azure-core error as ours, naming the account and the operation."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ArchiveKmsError):
        return exc
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return ServiceUnavailableError(f"Resource Manager {op} on {where}: {type(exc).__name__} (retryable)")
    if not isinstance(exc, HttpResponseError):
        return StorageError(f"Resource Manager {op} on {where}: {type(exc).__name__}: {exc}"[:500], resource=where)
    status = int(exc.status_code or 0)
    err = getattr(exc, "error", None)
    code = str(getattr(err, "code", None) or "")
    message = str(getattr(err, "message", None) or exc.reason or "")[:300]
    text = f"Resource Manager {op} on {where} failed: {code or status}: {message}"
    if code.startswith("KeyVault") or (code in ("InvalidValuesForRequestParameters",) and "Key" in message):
        return KeyUnavailableError(
            f"{text}; the customer must grant the storage identity (azure_cmk_identity_id) the role "
            "Key Vault Crypto Service Encryption User on the key (docs/customer-key-setup.md)",
            resource=where,
            state=code,
        )
    if code in ("StorageAccountAlreadyTaken", "StorageAccountAlreadyExists"):
        return StorageError(
            f"{text}: the name is held outside resource group (another owner); choose another "
            "azure_tenant_account_prefix",
            resource=where,
        )
    if code in ("AccountNameInvalid", "StorageAccountNameNotValid"):
        return ValidationError(f"{text}", resource=where)
    if code in (
        "ResourceGroupNotFound",
        "SubscriptionNotFound",
        "InvalidSubscriptionId",
        "LocationNotAvailableForResourceType",
    ):
        return ConfigurationError(f"{text}; check the azure_* settings (docs/deployment.md)", resource=where)
    if status in (401, 403):
        return StorageError(
            f"{text}; grant the workers the tenant-account roles on the resource group (docs/deployment.md)",
            resource=where,
        )
    if status in (408, 429) or status >= 500:
        return ServiceUnavailableError(f"{text} (retryable)", resource=where)
    if status == 409:  # StorageAccountBeingCreated, StorageAccountOperationInProgress, ...
        return TransientError(f"{text} (another operation on it is in progress; retry)", resource=where)
    return StorageError(f"{text} (HTTP {status})", resource=where)


def _is_not_found(exc: BaseException) -> bool:
    """A 404 for the resource itself; a missing resource group or subscription is not
    "no account" but a configuration error."""
    from azure.core.exceptions import ResourceNotFoundError

    code = str(getattr(getattr(exc, "error", None), "code", None) or "")
    return isinstance(exc, ResourceNotFoundError) and code not in ("ResourceGroupNotFound", "SubscriptionNotFound")


# --- the provisioner ------------------------------------------------------------------------------


def container_usable(blob_service: Any, container: str) -> bool:
    """The data-plane check ``create`` waits for: the container answers to our identity.
    403 (role assignment not applied yet) and unanswered calls are "not yet"."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError

    try:
        return bool(blob_service.get_container_client(container).exists())
    except (HttpResponseError, ServiceRequestError):
        return False


class ArmAccountProvisioner:
    """Tenant accounts through Azure Resource Manager. ``mgmt`` is a ready
    ``azure.mgmt.storage.StorageManagementClient``; ``blob_client_for_url`` builds the
    data-plane client for an account's blob endpoint (Entra ID); ``data_plane_ready``
    decides when a new container is usable (default ``container_usable``)."""

    def __init__(
        self,
        mgmt: Any,
        *,
        resource_group: str,
        region: str,
        cmk_identity_id: str | None,
        subnet_ids: Sequence[str],
        sku: str = "Standard_GZRS",
        soft_delete_days: int = 30,
        blob_client_for_url: Callable[[str], Any] = clients.blob_service_client_for_url,
        data_plane_ready: Callable[[Any, str], bool] = container_usable,
        usable_timeout: float = USABLE_TIMEOUT_S,
        polling_interval: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not subnet_ids:
            raise ConfigurationError(
                "azure_tenant_account_subnet_ids is empty: tenant accounts deny every network but the workers' "
                "subnets; name them (docs/deployment.md)",
                resource="azure_tenant_account_subnet_ids",
            )
        self._mgmt = mgmt
        self._rg = resource_group
        self._region = region
        self._identity = cmk_identity_id
        self._subnets = list(subnet_ids)
        self._sku = sku
        self._soft_delete_days = soft_delete_days
        self._blob_client_for_url = blob_client_for_url
        self._ready = data_plane_ready
        self._timeout = usable_timeout
        self._lro: dict[str, Any] = {} if polling_interval is None else {"polling_interval": polling_interval}
        self._sleep = sleep
        self._clock = clock
        self._blob_clients: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> ArmAccountProvisioner:
        missing = [
            n for n in ("azure_subscription_id", "azure_resource_group", "azure_region") if not getattr(settings, n)
        ]
        if missing:
            raise ConfigurationError(
                f"tenant storage accounts through Resource Manager need {', '.join(missing)} (docs/deployment.md)",
                resource=missing[0],
            )
        return cls(
            clients.storage_management_client(settings),
            resource_group=settings.azure_resource_group or "",
            region=settings.azure_region or "",
            cmk_identity_id=settings.azure_cmk_identity_id,
            subnet_ids=settings.azure_tenant_account_subnet_ids,
            sku=settings.azure_tenant_account_sku,
            soft_delete_days=settings.azure_tenant_account_soft_delete_days,
            **kw,
        )

    def __repr__(self) -> str:
        return f"ArmAccountProvisioner(resource_group={self._rg!r}, region={self._region!r})"

    # --- the port ------------------------------------------------------------------------------

    def create(self, location: Location) -> None:
        require_own_account(location)
        name = location.account or ""
        body = account_body(
            location, region=self._region, sku=self._sku, cmk_identity_id=self._identity, subnet_ids=self._subnets
        )
        found = self._account(location)
        if found is not None:
            self._check_ours(location, found)
        # Not in our resource group: the PUT creates it, or answers 409 StorageAccountAlreadyTaken
        # for a name held anywhere else in Azure (no checkNameAvailability: it needs a
        # subscription-wide permission, and a check before the PUT would race it anyway).
        poller = self._call(
            location,
            "Create Storage Account",
            self._mgmt.storage_accounts.begin_create,
            self._rg,
            name,
            body,
            **self._lro,
        )
        self._call(location, "Create Storage Account (poll)", poller.result)
        self._call(
            location,
            "Set Blob Service Properties",
            self._mgmt.blob_services.set_service_properties,
            self._rg,
            name,
            blob_service_body(self._soft_delete_days),
        )
        if location.cmk_key_url is not None:
            self._call(
                location,
                "Put Encryption Scope",
                self._mgmt.encryption_scopes.put,
                self._rg,
                name,
                ENCRYPTION_SCOPE,
                encryption_scope_body(location.cmk_key_url),
            )
        self._ensure_container(location)
        self._wait_usable(location)

    def exists(self, location: Location) -> bool:
        require_own_account(location)
        found = self._account(location)
        if found is None or (found.get("tags") or {}).get(TENANT_TAG) != location.tenant.value:
            return False
        return self._container(location) is not None

    def delete(self, location: Location, store: ObjectStore) -> int:
        require_own_account(location)
        found = self._account(location)
        if found is None:
            return 0  # never created, or deleted by an earlier run
        self._check_ours(location, found)
        count = sum(1 for _ in store.list())
        self._call(location, "Delete Storage Account", self._mgmt.storage_accounts.delete, self._rg, location.account)
        self._blob_clients.pop(location.account or "", None)
        return count

    def blob_service(self, location: Location) -> Any:
        require_own_account(location)
        name = location.account or ""
        client = self._blob_clients.get(name)
        if client is None:
            found = self._account(location)
            if found is None:
                raise StorageError(
                    f"{location.uri}: the tenant's storage account does not exist", resource=location.uri
                )
            self._check_ours(location, found)
            endpoint = self._blob_endpoint(found)
            if endpoint is None:
                raise ServiceUnavailableError(
                    f"{location.uri}: the account has no blob endpoint yet; retry", resource=location.uri
                )
            client = self._blob_clients[name] = self._blob_client_for_url(endpoint)
        return client

    # --- helpers ---------------------------------------------------------------------------------

    def _call(self, location: Location, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as exc:
            raise translate_arm_error(exc, where=location.uri, op=op) from exc

    def _account(self, location: Location) -> Any:
        """The account's resource (a mapping of the REST JSON), or None."""
        try:
            return self._mgmt.storage_accounts.get_properties(self._rg, location.account)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise translate_arm_error(exc, where=location.uri, op="Get Storage Account") from exc

    def _container(self, location: Location) -> Any:
        try:
            return self._mgmt.blob_containers.get(self._rg, location.account, location.container)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise translate_arm_error(exc, where=location.uri, op="Get Container") from exc

    def _check_ours(self, location: Location, found: Any) -> None:
        owner = (found.get("tags") or {}).get(TENANT_TAG)
        if owner != location.tenant.value:
            raise StorageError(
                f"{location.uri}: a storage account named {location.account} exists in resource group {self._rg} "
                f"but is not tenant {location.tenant.value}'s (tag {TENANT_TAG}={owner!r}); not touching it",
                resource=location.uri,
            )

    def _ensure_container(self, location: Location) -> None:
        want = container_body(location)["properties"]
        found = self._container(location)
        if found is None:
            self._call(
                location,
                "Create Container",
                self._mgmt.blob_containers.create,
                self._rg,
                location.account,
                location.container,
                container_body(location),
            )
            return
        got = found.get("properties") or {}
        differs = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
        if differs:
            raise StorageError(
                f"{location.uri}: the container exists with other settings ({differs}); delete it or fix it by hand",
                resource=location.uri,
            )

    @staticmethod
    def _blob_endpoint(found: Any) -> str | None:
        props = found.get("properties") or {}
        if props.get("provisioningState") != "Succeeded":
            return None
        return (props.get("primaryEndpoints") or {}).get("blob")

    def _wait_usable(self, location: Location) -> None:
        def usable() -> bool:
            found = self._account(location)
            endpoint = None if found is None else self._blob_endpoint(found)
            if endpoint is None:
                return False
            client = self._blob_clients.setdefault(location.account or "", self._blob_client_for_url(endpoint))
            return self._ready(client, location.container or "")

        retry.poll(
            usable,
            timeout=self._timeout,
            backoff=retry.Backoff(base_delay=2.0, max_delay=30.0, jitter=False),
            on_timeout=lambda: ServiceUnavailableError(
                f"{location.uri}: the account or its container is not usable after {self._timeout:.0f} s "
                "(the workers' role on the resource group may not apply yet); rerun the step",
                resource=location.uri,
            ),
            clock=self._clock,
            sleep=self._sleep,
        )


__all__ = [
    "ENCRYPTION_SCOPE",
    "TENANT_TAG",
    "ArmAccountProvisioner",
    "account_body",
    "blob_service_body",
    "container_body",
    "container_usable",
    "encryption_scope_body",
    "translate_arm_error",
]
