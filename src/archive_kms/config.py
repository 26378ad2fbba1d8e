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
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    # Azure Blob (Azurite locally).
    azure_blob_connection_string: SecretStr | None = None
    # Or, for an account that allows no shared key (infra/azure): its blob endpoint
    # (https://ACCOUNT.blob.core.windows.net), reached with Microsoft Entra ID
    # (DefaultAzureCredential: the workers' managed identity). Used when no connection string is set.
    azure_blob_account_url: str | None = None

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

    # Prefect API the flows report to (the stack's server locally); None = Prefect's own default.
    prefect_api_url: str | None = None

    # Naming.
    shared_bucket: str = "archive-kms-shared"
    shared_azure_account: str = "devstoreaccount1"

    # Keys.
    # Ed25519 platform signing key (PEM) that signs keychain records and erasure records.
    keychain_signing_key_path: str | None = None
    key_cache_ttl_seconds: float = 60.0
    dek_bucket_seconds: int = 3600
    # How old a keychain head this process verified may be when a read uses it again:
    # a revocation, erasure or rotation committed elsewhere takes effect here within it
    # (0 = read the state store on every use). `archive-kms revoke` waits it out before
    # probing, so nothing is served anywhere once it returns (docs/key-lifecycle.md).
    revocation_check_seconds: float = Field(default=0.5, ge=0, le=10)
    # How often a process asks the provider for a tenant's master-key state before using
    # its keys (0 = never): a key the customer disabled is refused within about this long.
    key_state_check_seconds: float = Field(default=5.0, ge=0, le=300)
    # How long a read waits for that answer before treating the key service as unreachable.
    key_state_check_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # What an unreachable key service does, unless the tenant has its own policy
    # (`archive-kms keys policy`): deny-immediately | serve-from-cache-for:SECONDS | alert-only.
    key_outage_grace: str = "serve-from-cache-for:60"

    # Audit anchors: the audit log's head published to an S3 bucket with Object Lock
    # (compliance mode), so a rollback of the database is found. None = not published.
    audit_anchor_bucket: str | None = None
    audit_anchor_retention_days: int = Field(default=365, ge=1)

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
    # is charged 2 x min(size, 8 MiB part) + 1 MiB before it starts (ADR 0019).
    migration_copy_buffer_mib: int = Field(default=96, ge=4, le=4096)

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
