"""What a migration run does, decided once before it starts and stored with the run.

A ``MigrationPlan`` names the tenant, the flow (enable / remove), the target key mode and
L1 key reference, the source and destination locations, the old index and the new index
generation, and the copy fan-out. It is computed when the run is triggered and kept in the
run's ``params``; every step, every rerun and every worker process reads it back from
there, so a resumed run does exactly what the first attempt set out to do even if the
tenant's registry entry has moved on (it does, at cutover).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from archive_kms.config import Settings
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import ConfigurationError, StateError, ValidationError
from archive_kms.keys.aws_kms import AwsKmsKeyProvider
from archive_kms.keys.port import KeyProvider
from archive_kms.keys.refs import AwsKmsKeyRef, AzureKeyVaultKeyRef, parse_key_ref
from archive_kms.operations.blast_radius import register_dry_run
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import MANAGED_KEY_REF, shared_location
from archive_kms.search import index_name
from archive_kms.state.port import Flow, KeyMode, TenantRecord, TenantRepo
from archive_kms.storage import (
    Cloud,
    Kind,
    Location,
    dedicated_azure_location,
    dedicated_s3_location,
)

#: The steps of both flows, in order (product.md "Flows"). Remove runs the same steps in
#: reverse direction: its destination is a new shared entity under the managed key.
STEPS: tuple[str, ...] = (
    "preflight",
    "pause",
    "cutover_point",
    "create_destination",
    "bind_key",
    "manifest",
    "copy",
    "verify",
    "build_index",
    "cutover",
    "cleanup_source",
    "resume",
    "report",
)

#: Once this step has completed, the tenant lives at the destination: rerunning any earlier
#: step would move it backwards (faults D8), so reruns may only start after it.
POINT_OF_NO_RETURN = "cutover"


class EnableMode(str, enum.Enum):
    BYOKMS = "byokms"  # customer's own AWS KMS key
    BYOK = "byok"  # customer's key material imported into our AWS KMS (S3) or our Key Vault (Azure)
    BYOKV = "byokv"  # customer's Azure Key Vault key
    KMIP = "kmip"  # master key in a KMIP HSM


_SCHEMES = {
    EnableMode.BYOKMS: ("aws-kms",),
    EnableMode.BYOK: ("aws-kms", "azure-kv"),
    EnableMode.BYOKV: ("azure-kv",),
    EnableMode.KMIP: ("kmip",),
}
_CLOUDS = {
    EnableMode.BYOKMS: ("s3",),
    EnableMode.BYOK: ("s3", "azure"),
    EnableMode.BYOKV: ("azure",),
    EnableMode.KMIP: ("s3", "azure"),
}

#: BYOK imports into the platform's key service of the tenant's cloud.
_BYOK_SCHEME_ON = {"s3": "aws-kms", "azure": "azure-kv"}


@dataclass(frozen=True)
class MigrationPlan:
    tenant_id: str
    flow: str  # Flow.ENABLE | Flow.REMOVE value
    mode: str  # target KeyMode value
    key_ref: str  # target L1 key reference
    source: Mapping[str, Any]  # Location.to_dict()
    destination: Mapping[str, Any]
    old_index: str | None
    new_generation: int
    shards: int = 8
    parallel_shards: int = 4  # shards copied at once by the default (thread) shard runner
    threads_per_shard: int = 4
    cutover_grace_seconds: float = 1.0  # readers that looked the location up before cutover finish first
    source_key_ref: str | None = None  # the tenant's L1 when the run was planned: what cancel re-binds to
    # How verify proves the copies (ADR 0018): "attested" or "read-back". A run planned by
    # code that did not record it reads every object back.
    verify: str = "read-back"

    @property
    def source_location(self) -> Location:
        return Location.from_dict(self.source)

    @property
    def destination_location(self) -> Location:
        return Location.from_dict(self.destination)

    @property
    def new_index(self) -> str:
        return index_name(self.tenant_id, self.new_generation)

    @property
    def target_key_mode(self) -> KeyMode:
        return KeyMode(self.mode)

    def to_params(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"], d["destination"] = dict(self.source), dict(self.destination)
        return d

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> MigrationPlan:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in params.items() if k in known})


VERIFY_MODES = ("attested", "read-back")


def _verify_mode(settings: Settings, verify: str | None) -> str:
    mode = settings.migration_verify if verify is None else verify
    if mode not in VERIFY_MODES:
        raise ValidationError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    return mode


def _fanout(shards: int | None, parallel: int | None, threads: int | None) -> dict[str, int]:
    # None means "not given"; 0 is a value, and out of bounds (``or`` would turn it into the default)
    out = {
        "shards": 8 if shards is None else shards,
        "parallel_shards": 4 if parallel is None else parallel,
        "threads_per_shard": 4 if threads is None else threads,
    }
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
            raise ValidationError(f"{k} must be an integer in 1..256, got {v!r}")
    return out


def _tenant(tenants: TenantRepo, tenant_id: str) -> TenantRecord:
    tid = TenantId(tenant_id).value  # the one strict rule, before any lookup
    t = tenants.get_tenant(tid)
    if t is None:
        raise StateError(
            f"unknown tenant {tid!r}: create it with `archive-kms tenant create`", resource=f"tenant:{tid}"
        )
    return t


def _sse_key_arn(resolve_provider: Callable[[str], KeyProvider], key_ref: str) -> str | None:
    """The KMS key ARN for the dedicated bucket's default encryption (defense in depth),
    for AWS-held customer keys; None for keys outside AWS KMS."""
    ref = parse_key_ref(key_ref)
    if not isinstance(ref, AwsKmsKeyRef):
        return None
    if ref.is_key_arn:
        return ref.api_key_id
    provider = resolve_provider(key_ref)  # an alias: the key it names now
    inner = getattr(provider, "inner", provider)  # keys.limits.LimitedKeyProvider wraps the adapter
    if not isinstance(inner, AwsKmsKeyProvider):
        raise ConfigurationError(f"{key_ref} resolves to {provider!r}, not an AWS KMS key", resource=key_ref)
    return provider.describe().arn  # type: ignore[attr-defined, no-any-return]


def _dedicated_azure(platform: Platform, tenant_id: str, ref: Any) -> Location:
    """The tenant's own storage account (``azure_dedicated_storage=account``, encrypted with
    the customer's Key Vault key, versionless, when the key is one), or a container in the
    platform account (``container``)."""
    s = platform.settings
    if s.azure_dedicated_storage == "container":
        return dedicated_azure_location(tenant_id, account=s.shared_azure_account)
    cmk = ref.with_version(None).key_id if isinstance(ref, AzureKeyVaultKeyRef) else None
    return dedicated_azure_location(tenant_id, account_prefix=s.azure_tenant_account_prefix, cmk_key_url=cmk)


def plan_enable(
    platform: Platform,
    tenant_id: str,
    mode: str,
    key_ref: str,
    *,
    cloud: str | None = None,
    shards: int | None = None,
    parallel_shards: int | None = None,
    threads_per_shard: int | None = None,
    verify: str | None = None,
) -> MigrationPlan:
    """Plan onboarding ``tenant_id`` onto ``key_ref`` in ``mode``; ValidationError naming
    what to fix for a mode/key/cloud mismatch."""
    t = _tenant(platform.state, tenant_id)
    try:
        m = EnableMode(mode)
    except ValueError:
        raise ValidationError(f"unknown mode {mode!r}: use one of {', '.join(x.value for x in EnableMode)}") from None
    ref = parse_key_ref(key_ref)  # ValidationError names the problem
    if ref.scheme not in _SCHEMES[m] and ref.scheme != "memory":
        raise ValidationError(
            f"mode {m.value} needs a {' or '.join(_SCHEMES[m])}:// key reference, got a {ref.scheme}:// one"
        )
    source = Location.from_dict(t.location)
    target_cloud = cloud or source.cloud.value
    if target_cloud not in _CLOUDS[m]:
        raise ValidationError(f"mode {m.value} runs on {' or '.join(_CLOUDS[m])}, not {target_cloud}")
    if m is EnableMode.BYOK and ref.scheme != "memory" and ref.scheme != _BYOK_SCHEME_ON[target_cloud]:
        raise ValidationError(
            f"mode byok on {target_cloud} needs a {_BYOK_SCHEME_ON[target_cloud]}:// key reference, got a "
            f"{ref.scheme}:// one (BYOK imports into the platform's "
            f"{'AWS KMS' if target_cloud == 's3' else 'Key Vault'})"
        )
    if target_cloud != source.cloud.value:
        raise ValidationError(
            f"tenant {t.tenant_id} lives on {source.cloud.value}; moving between clouds is "
            f"not supported (use --cloud {source.cloud.value})"
        )
    if t.key_mode is not KeyMode.MANAGED or source.kind is not Kind.SHARED:
        raise ValidationError(
            f"tenant {t.tenant_id} already uses its own key ({t.key_mode.value}, "
            f"{source.uri}); run `archive-kms remove {t.tenant_id}` first"
        )
    if source.cloud is Cloud.S3:
        dest = dedicated_s3_location(t.tenant_id, sse_kms_key_arn=_sse_key_arn(platform.resolve_provider, ref.uri))
    else:
        dest = _dedicated_azure(platform, t.tenant_id, ref)
    return MigrationPlan(
        tenant_id=t.tenant_id,
        flow=Flow.ENABLE.value,
        mode=KeyMode(m.value).value,
        key_ref=ref.uri,
        source=source.to_dict(),
        destination=dest.to_dict(),
        old_index=platform.index.current_index(t.tenant_id),
        new_generation=platform.next_generation(t.tenant_id),
        source_key_ref=platform.keychain.status(t.tenant_id).l1_ref,
        verify=_verify_mode(platform.settings, verify),
        **_fanout(shards, parallel_shards, threads_per_shard),
    )


def plan_remove(
    platform: Platform,
    tenant_id: str,
    *,
    shards: int | None = None,
    parallel_shards: int | None = None,
    threads_per_shard: int | None = None,
    verify: str | None = None,
) -> MigrationPlan:
    """Plan moving a customer-key tenant back to a new shared entity under the managed key."""
    t = _tenant(platform.state, tenant_id)
    source = Location.from_dict(t.location)
    if t.key_mode is KeyMode.MANAGED or source.kind is not Kind.DEDICATED:
        raise ValidationError(
            f"tenant {t.tenant_id} is on the managed key in shared storage already; nothing to remove"
        )
    dest = shared_location(platform, TenantId(t.tenant_id), source.cloud.value)
    return MigrationPlan(
        tenant_id=t.tenant_id,
        flow=Flow.REMOVE.value,
        mode=KeyMode.MANAGED.value,
        key_ref=MANAGED_KEY_REF,
        source=source.to_dict(),
        destination=dest.to_dict(),
        old_index=platform.index.current_index(t.tenant_id),
        new_generation=platform.next_generation(t.tenant_id),
        source_key_ref=platform.keychain.status(t.tenant_id).l1_ref,
        verify=_verify_mode(platform.settings, verify),
        **_fanout(shards, parallel_shards, threads_per_shard),
    )


def _describe_remove(platform: Platform, tenant_id: str) -> list[str]:
    """The remove flow's blast-radius lines (``operations.blast_radius``)."""
    plan = plan_remove(platform, tenant_id)  # the refusals the run would give
    source, dest = plan.source_location.uri, plan.destination_location.uri
    lines = [
        f"pause archive jobs of {tenant_id} (new jobs are queued and replayed after the run)",
        f"copy and re-encrypt every object from {source} to {dest} under the managed key ({plan.key_ref})",
        "verify every object (count, size, plaintext digest) before cutover",
        f"build index {plan.new_index} from the new storage (plaintext search index)",
        f"cut over, then delete {source}" + (f" and index {plan.old_index}" if plan.old_index else ""),
        f"the customer key {plan.source_key_ref} is no longer used for {tenant_id}",
    ]
    return lines


register_dry_run("remove", _describe_remove)


__all__ = [
    "MANAGED_KEY_REF",
    "POINT_OF_NO_RETURN",
    "STEPS",
    "EnableMode",
    "MigrationPlan",
    "plan_enable",
    "plan_remove",
]
