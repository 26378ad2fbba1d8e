"""Settings: one object, read from ``ARCHIVE_KMS_*`` environment variables and the
endpoints file that ``archive-kms stack up`` writes (``.stack/endpoints.json``).

Precedence: explicit arguments > environment > endpoints file > defaults. Emulator
endpoints are configuration only; no code path checks "am I on an emulator".
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def stack_dir() -> Path:
    """Where the local stack keeps its runtime state, logs and the endpoints file."""
    return Path(os.environ.get("ARCHIVE_KMS_STACK_DIR", PROJECT_ROOT / ".stack"))


def endpoints_file() -> Path:
    return Path(os.environ.get("ARCHIVE_KMS_ENDPOINTS_FILE", stack_dir() / "endpoints.json"))


class _EndpointsFileSource(PydanticBaseSettingsSource):
    """Flat JSON object whose keys are Settings field names."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = endpoints_file()
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHIVE_KMS_", extra="ignore")

    # AWS (LocalStack locally): S3 and KMS.
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    # The platform's own AWS account (12 digits), if known: names the KMS quota domains
    # (keys/limits.py; AWS throttles every request against the caller's account, ours, per
    # region). None = "platform".
    aws_account_id: str | None = Field(default=None, pattern=r"^\d{12}$")
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    # The client that streams S3 object reads (the copy's source GET, the read-back verify):
    # "boto3", or "obstore" (the Rust object_store client: ~30 % less client CPU for the
    # copy's data path, more resident memory). Writes, listings and deletes always use
    # boto3 (docs/adr/0043-s3-reads-through-obstore.md).
    s3_read_client: Literal["boto3", "obstore"] = "boto3"

    # Azure Blob (Azurite locally).
    azure_blob_connection_string: SecretStr | None = None
    # Or, for an account that allows no shared key (infra/azure): its blob endpoint
    # (https://ACCOUNT.blob.core.windows.net), reached with Microsoft Entra ID
    # (DefaultAzureCredential: the workers' managed identity). Used when no connection string is set.
    azure_blob_account_url: str | None = None

    # Where `enable --cloud azure` puts a tenant: "account" = its own storage account
    # (docs/storage-layout.md; created by the tenant-account provisioner below), "container" =
    # a container byok-<tenant> in the platform account (what earlier releases did).
    azure_dedicated_storage: Literal["account", "container"] = "account"
    # Tenant account names: <prefix><tenant id letters and digits><8 chars of its SHA-256>.
    azure_tenant_account_prefix: str = Field(default="akms", pattern=r"^[a-z0-9]{0,15}$")
    # Local stack: connection strings of the Azurite accounts (AZURITE_ACCOUNTS) that stand in
    # for tenant accounts; set = the Azurite pool provisioner, empty = Azure Resource Manager.
    azure_account_pool: list[SecretStr] = Field(default_factory=list)
    # Azure Resource Manager (real Azure): where tenant accounts are created, and how.
    azure_subscription_id: str | None = None
    azure_resource_group: str | None = None  # the tenant accounts' resource group
    azure_region: str | None = None  # e.g. westeurope
    # Resource id of the user-assigned identity a tenant account uses to reach the customer's
    # key (the workers' identity: customers already grant it on their key).
    azure_cmk_identity_id: str | None = None
    # Subnets (resource ids, service endpoint Microsoft.Storage) allowed to reach tenant
    # accounts; every other network is denied.
    azure_tenant_account_subnet_ids: list[str] = Field(default_factory=list)
    azure_tenant_account_sku: str = "Standard_GZRS"
    azure_tenant_account_soft_delete_days: int = Field(default=30, ge=7, le=365)
    azure_arm_endpoint: str = "https://management.azure.com"
    azure_arm_ca_bundle: str | None = None  # PEM path; None = system trust

    # Azure Key Vault (emulator locally): vault URL and TLS trust for it.
    azure_keyvault_url: str | None = None
    azure_keyvault_ca_bundle: str | None = None  # path to PEM; None = system trust
    azure_keyvault_verify_challenge_resource: bool = True

    # KMIP HSM.
    kmip_host: str = "127.0.0.1"
    kmip_port: int = 5696
    kmip_ca_cert: str | None = None
    kmip_client_cert: str | None = None
    kmip_client_key: str | None = None
    # Seconds a KMIP request may take (connect, TLS handshake, answer) before the client
    # gives up and the adapter reconnects once; a hung HSM then fails the call retryably.
    kmip_timeout_seconds: float = Field(default=30.0, gt=0)

    # Elasticsearch.
    elasticsearch_url: str | None = None

    # State store: SQLite by default, PostgreSQL by URL.
    state_url: str = Field(default_factory=lambda: f"sqlite:///{stack_dir() / 'state.db'}")
    # The local PostgreSQL server the stack runs; tests run the state store on it too.
    postgres_url: str | None = None

    # The PostgreSQL connection pool of one process (docs/state-store.md "Connection pool"):
    # state_pool_size connections kept open, at most state_pool_max_overflow more under load;
    # a caller waits state_pool_timeout_seconds for one, then gets a retryable error. Every
    # process of the fleet holds at most size + overflow: keep the sum under the server's
    # max_connections.
    state_pool_size: int = Field(default=5, ge=1, le=200)
    state_pool_max_overflow: int = Field(default=5, ge=0, le=200)
    state_pool_timeout_seconds: float = Field(default=30.0, gt=0)

    # Prefect API the flows report to (the stack's server locally); None = Prefect's own default.
    prefect_api_url: str | None = None

    # Naming.
    shared_bucket: str = "archive-kms-shared"
    shared_azure_account: str = "devstoreaccount1"

    # Keys.
    # The platform signing key that signs keychain records, audit seals and anchors, search
    # generations, rotation confirmations and erasure records: either a local Ed25519 PEM
    # file (keychain_signing_key_path) or a key held by AWS KMS / Azure Key Vault that
    # signs with ECDSA P-256 (keychain_signing_key_ref: aws-kms://... or azure-kv://...,
    # the tenant key reference syntax; the private key never reaches a worker). Set one,
    # never both (docs/key-hierarchy.md section 7, docs/adr/0040-remote-signing-key.md).
    keychain_signing_key_path: str | None = None
    keychain_signing_key_ref: str | None = None
    # Public keys (one PEM file, one or more keys) of the signing keys this one replaced:
    # what they signed still verifies, by key id (docs/key-hierarchy.md, section 7).
    keychain_previous_public_keys_path: str | None = None
    # Development only: with no signing key configured, create one in the stack directory
    # (the local stack, which has an endpoints file, always may). Anywhere else a missing
    # key is a configuration error: a worker never signs with a key of its own making.
    keychain_signing_key_autocreate: bool = False
    key_cache_ttl_seconds: float = 60.0
    dek_bucket_seconds: int = 3600
    # Key rotation (docs/key-lifecycle.md "Rotation"): a rotation waiting longer than this
    # for the customer's confirmation is marked for a reminder warning.
    rotation_reminder_seconds: float = Field(default=86_400.0, gt=0)
    # How old a keychain head this process verified may be when a read uses it again:
    # a revocation, erasure or rotation committed elsewhere takes effect here within it
    # (0 = read the state store on every use). `archive-kms revoke` waits it out before
    # probing, so nothing is served anywhere once it returns (docs/key-lifecycle.md).
    revocation_check_seconds: float = Field(default=0.5, ge=0, le=10)
    # How often a process asks the provider for a tenant's master-key state before using
    # its keys (0 = never): a key the customer disabled is refused within about this long.
    key_state_check_seconds: float = Field(default=5.0, ge=0, le=300)
    # How long a read waits for that answer before treating the key service as unreachable.
    key_state_check_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # What an unreachable key service does, unless the tenant has its own policy
    # (`archive-kms keys policy`): deny-immediately | serve-from-cache-for:SECONDS | alert-only.
    key_outage_grace: str = "serve-from-cache-for:60"

    # Audit anchors: the audit log's head published to an S3 bucket with Object Lock
    # (compliance mode), so a rollback of the database is found. None = not published.
    audit_anchor_bucket: str | None = None
    audit_anchor_retention_days: int = Field(default=365, ge=1)

    # Many tenants at once (docs/capacity.md, docs/adr/0033-fleet-limits.md). Flow runs that
    # execute at once across every worker: the Prefect global concurrency limit
    # "archive-kms-runs" (created with this value if missing; `archive-kms limits apply`
    # sets it).
    max_concurrent_runs: int = Field(default=8, ge=1, le=10_000)
    # Requests per second the fleet's flow runs may send to one quota domain of each key
    # service (an AWS account+region, a Key Vault, a KMIP HSM): a Prefect rate limit per
    # domain ("archive-kms-l1:<domain>", slot decay = this rate, burst = one second of it).
    # Set to a share of the service's quota (docs/capacity.md gives the quotas).
    l1_requests_per_second_aws_kms: float = Field(default=500.0, gt=0)
    l1_requests_per_second_azure_kv: float = Field(default=100.0, gt=0)
    l1_requests_per_second_kmip: float = Field(default=50.0, gt=0)
    # How long a request may wait for its rate limit before it fails (retryable).
    l1_limit_timeout_seconds: float = Field(default=300.0, gt=0)

    # Migration flows.
    # A run's tenant lease: renewed every third of it; a crashed worker's run can be
    # resumed by another process once it expires (or at once with --takeover).
    lease_ttl_seconds: float = Field(default=60.0, gt=0)
    # A running archive job's lease (ADR 0020): its writer renews it every third of it; a
    # writer that stops renewing (died, hangs, frozen) is fenced once it expires.
    job_lease_ttl_seconds: float = Field(default=60.0, gt=0)
    # Dask scheduler for the copy/verify shard tasks with --task-runner dask; None = a
    # local cluster of two worker processes.
    dask_address: str | None = None
    # How verify proves each copied object (ADR 0018): "attested" (the copy checks its new
    # ciphertext in memory and the store validates a checksum of it on every request;
    # verify compares the destination listing with what was committed) or "read-back"
    # (verify also reads every object back, decrypts it and compares its keyed digest).
    # Recorded in the run's plan when the run is triggered.
    migration_verify: Literal["attested", "read-back"] = "attested"
    # Object data (MiB) the copies of one migration process may hold at once: each object
    # is charged before it starts, by its size (ADR 0019, ADR 0046: the part being cut,
    # one more part for an object of several parts, and 7 segment buffers of at most
    # min(size, 1 MiB)).
    migration_copy_buffer_mib: int = Field(default=32, ge=4, le=4096)
    # Destination parts (MiB) uploading in the store's threads during a copy, shared by
    # every copy of the process; beyond it a writer uploads its own part (ADR 0046). Peak
    # RSS of a migration process is about its floor + both budgets.
    migration_upload_buffer_mib: int = Field(default=8, ge=0, le=1024)

    # Archive Console (src/archive_kms/api, docs/console-api.md).
    # Ed25519 PEM private key that signs console tokens; None on a local stack = a key
    # created once in the stack directory (console-token-signing.pem).
    console_token_signing_key_path: str | None = None
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8700, ge=1, le=65535)
    # A dual-control request not approved by a second person within this time expires.
    console_approval_ttl_seconds: float = Field(default=3600.0, gt=0)
    # Bad bearer tokens from one client: after this many within the window, 429 until it ends.
    console_auth_failure_limit: int = Field(default=10, ge=1)
    console_auth_failure_window_seconds: float = Field(default=60.0, gt=0)
    # How long a tenant's master-key state (provider status) is reused by the console.
    console_key_probe_ttl_seconds: float = Field(default=30.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _EndpointsFileSource(settings_cls))


def setting_default(name: str) -> Any:
    """The default of setting ``name``: what a module constant that stands for that
    default is set to, so the setting is its one source (``DEFAULT_LEASE_TTL`` =
    ``lease_ttl_seconds``'s default, ...)."""
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        raise TypeError(f"setting {name} has a computed default")
    return field.default


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
