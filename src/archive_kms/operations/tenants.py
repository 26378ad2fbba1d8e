"""Creating a tenant: validated id, shared location, keychain under its L1 key, index
generation 1 behind the tenant's alias, registry entry, audit record.

Every derived name (prefix, container, index, alias) comes from the validated
``TenantId``; nothing is created before the id and the key reference are checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import StateError, ValidationError
from archive_kms.operations.platform import Platform
from archive_kms.search import alias_name
from archive_kms.state.port import AuditEvent, KeyMode, TenantRecord
from archive_kms.storage import Location, shared_azure_location, shared_s3_location
from archive_kms.storage.provisioning import LocationProvisioner

MANAGED_KEY_REF = "managed://platform"


@dataclass(frozen=True)
class TenantCreated:
    tenant_id: str
    location: str
    key_ref: str
    index: str


_MODE_BY_SCHEME = {
    "managed": KeyMode.MANAGED,
    "aws-kms": KeyMode.BYOKMS,
    "azure-kv": KeyMode.BYOKV,
    "kmip": KeyMode.KMIP,
    "memory": KeyMode.BYOKMS,
}


def key_mode_of(key_ref: str) -> KeyMode:
    """The key mode a reference implies (imported-material AWS keys are BYOK: the caller
    says so when it imported the material)."""
    scheme = key_ref.split("://", 1)[0]
    if scheme not in _MODE_BY_SCHEME:
        raise ValidationError(
            f"key reference {key_ref[:80]!r}: unknown scheme {scheme!r} "
            f"(use one of {', '.join(sorted(_MODE_BY_SCHEME))})"
        )
    return _MODE_BY_SCHEME[scheme]


def shared_location(platform: Platform, tenant: TenantId, cloud: str) -> Location:
    s = platform.settings
    if cloud in ("s3", "aws"):
        return shared_s3_location(tenant, s.shared_bucket)
    if cloud == "azure":
        return shared_azure_location(tenant, s.shared_azure_account)
    raise ValidationError(f"unknown cloud {cloud!r}: use s3 or azure")


def ensure_shared_container(provisioner: LocationProvisioner, location: Location) -> None:
    """The shared bucket (S3) or the tenant's container (Azure) exists (created if not;
    idempotent)."""
    provisioner.create(location)


def create_tenant(
    platform: Platform,
    tenant_id: str,
    *,
    cloud: str = "s3",
    key_ref: str | None = None,
    actor: str = "operator",
    provision_storage: bool = True,
) -> TenantCreated:
    """Register a new tenant on shared storage under the managed key (or ``key_ref``)."""
    tenant = TenantId(tenant_id)  # the one strict rule: raises ValidationError naming the problem
    if platform.state.get_tenant(tenant.value) is not None:
        raise StateError(f"tenant {tenant.value} already exists", resource=f"tenant:{tenant.value}")
    location = shared_location(platform, tenant, cloud)
    ref = key_ref or MANAGED_KEY_REF
    provider = platform.resolve_provider(ref)  # validates the reference before anything is created
    if provision_storage:
        ensure_shared_container(platform.provisioner, location)
    if not platform.keychain_exists(tenant.value):  # else an earlier attempt crashed after it: reuse
        platform.keychain.create_tenant(tenant.value, provider)
    key_mode = key_mode_of(ref)
    mode = platform.index_mode(key_mode)
    index = platform.index.create_generation(tenant.value, 1, mode)
    if platform.index.current_index(tenant.value) != index:
        platform.index.swap_alias(tenant.value, index, expected_current=None)
    platform.state.create_tenant(
        TenantRecord(
            tenant_id=tenant.value,
            key_mode=key_mode,
            location=location.to_dict(),
            key_ref=ref,
            index_alias=alias_name(tenant.value),
            index_generation=1,
        )
    )
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="tenant.create",
            tenant_id=tenant.value,
            details={"location": location.uri, "key_ref": ref, "index": index},
        )
    )
    return TenantCreated(tenant.value, location.uri, ref, index)
