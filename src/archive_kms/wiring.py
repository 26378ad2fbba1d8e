"""Builds SDK clients from Settings: the only module that knows every backend's client.

Adapters take ready clients (style: pass clients in), so tests and the demo wire them
here from configuration; emulator endpoints are just endpoint values.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from archive_kms.config import Settings, get_settings
from archive_kms.errors import ConfigurationError


def _require(value: Any, name: str) -> Any:
    if value in (None, ""):
        raise ConfigurationError(
            f"setting {name} is not set: export ARCHIVE_KMS_{name.upper()} or run `archive-kms stack up`"
        )
    return value


def boto3_session(settings: Settings | None = None):  # -> boto3.Session
    import boto3

    s = settings or get_settings()
    return boto3.Session(
        aws_access_key_id=s.aws_access_key_id.get_secret_value() if s.aws_access_key_id else None,
        aws_secret_access_key=s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
        region_name=s.aws_region,
    )


def aws_client(service: str, settings: Settings | None = None, **config: Any):
    """A boto3 client for ``s3`` or ``kms`` with explicit checksum and retry configuration."""
    from botocore.config import Config

    s = settings or get_settings()
    cfg = Config(
        retries={"max_attempts": 8, "mode": "adaptive"},
        # boto3 >= 1.36 defaults to CRC checksums some S3-compatible stores reject;
        # compute them only when an operation requires it (faults.md A13), explicitly.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if service == "s3" else None,
        max_pool_connections=32,
        **config,
    )
    return boto3_session(s).client(service, endpoint_url=s.aws_endpoint_url, config=cfg)


def blob_service_client(settings: Settings | None = None):
    from azure.storage.blob import BlobServiceClient

    s = settings or get_settings()
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    if s.azure_blob_connection_string is None and s.azure_blob_account_url:
        cs = None
    else:
        cs = _require(s.azure_blob_connection_string, "azure_blob_connection_string")
    # The migration copies with tens of threads; requests' default pool keeps only 10
    # connections and discards the rest after every burst.
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    transport = RequestsTransport(session=session)
    if cs is None:  # Entra ID only (the account allows no shared key): the managed identity
        from azure.identity import DefaultAzureCredential

        return BlobServiceClient(s.azure_blob_account_url, credential=DefaultAzureCredential(), transport=transport)
    try:
        return BlobServiceClient.from_connection_string(cs.get_secret_value(), transport=transport)
    except ValueError:  # malformed: say which setting, never echo it (it holds the account key)
        raise ConfigurationError(
            "azure_blob_connection_string (ARCHIVE_KMS_AZURE_BLOB_CONNECTION_STRING) is malformed; expected "
            "DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...;BlobEndpoint=...",
            resource="azure_blob_connection_string",
        ) from None


def elasticsearch_client(settings: Settings | None = None):
    from elasticsearch import Elasticsearch

    s = settings or get_settings()
    return Elasticsearch(
        _require(s.elasticsearch_url, "elasticsearch_url"),
        request_timeout=30,
        max_retries=3,
        retry_on_timeout=True,
        connections_per_node=32,
    )


class StaticTokenCredential:
    """A bearer-token credential for Key Vault endpoints that accept any token (local
    emulator). Real deployments use azure-identity's DefaultAzureCredential instead."""

    def __init__(self, token: str = "local-emulator-token") -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, int(time.time()) + 3600)

    def __repr__(self) -> str:
        return "StaticTokenCredential(<hidden>)"


def keyvault_credential(settings: Settings | None = None):
    s = settings or get_settings()
    url = _require(s.azure_keyvault_url, "azure_keyvault_url")
    if url.startswith(("https://localhost", "https://127.0.0.1")):
        return StaticTokenCredential()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def keyvault_client_kwargs(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for KeyClient / CryptographyClient: TLS trust and challenge policy."""
    from azure.core.pipeline.transport import RequestsTransport

    s = settings or get_settings()
    kwargs: dict[str, Any] = {"verify_challenge_resource": s.azure_keyvault_verify_challenge_resource}
    if s.azure_keyvault_ca_bundle:
        kwargs["transport"] = RequestsTransport(connection_verify=s.azure_keyvault_ca_bundle)
    return kwargs


def keyvault_key_client(settings: Settings | None = None):
    from azure.keyvault.keys import KeyClient

    s = settings or get_settings()
    return KeyClient(
        vault_url=_require(s.azure_keyvault_url, "azure_keyvault_url"),
        credential=keyvault_credential(s),
        **keyvault_client_kwargs(s),
    )


def kmip_client(settings: Settings | None = None):
    """A PyKMIP ProxyKmipClient over mutual TLS that checks the server's host name (not yet
    opened: use ``with client:``)."""
    from kmip.pie.client import ProxyKmipClient

    from archive_kms.keys.kmip import verify_server_hostname

    s = settings or get_settings()
    return verify_server_hostname(
        ProxyKmipClient(
            hostname=s.kmip_host,
            port=s.kmip_port,
            cert=_require(s.kmip_client_cert, "kmip_client_cert"),
            key=_require(s.kmip_client_key, "kmip_client_key"),
            ca=_require(s.kmip_ca_cert, "kmip_ca_cert"),
            config_file="/dev/null",  # never read ~/.pykmip/pykmip.conf: configuration comes from Settings
            kmip_version=None,
        )
    )


# --- key providers (keys/) --------------------------------------------------------------


def kms_client(
    settings: Settings | None = None,
    *,
    region: str | None = None,
    max_attempts: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 15.0,
):
    """A boto3 KMS client for ``region`` (default: the configured region).

    A customer key named by ARN lives in the ARN's region, so BYOKMS adapters ask for that
    region. ``max_attempts`` is lower for one-shot operations a human retries (BYOK import),
    where eight adaptive retries of a bad upload only delay the precise error.
    """
    from botocore.config import Config

    s = settings or get_settings()
    cfg = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=32,
    )
    return boto3_session(s).client(
        "kms", region_name=region or s.aws_region, endpoint_url=s.aws_endpoint_url, config=cfg
    )


def keyvault_key_client_for(vault_url: str, settings: Settings | None = None):
    """A KeyClient for a customer's vault (BYOKV), with our credential and TLS settings."""
    from azure.keyvault.keys import KeyClient

    s = settings or get_settings()
    return KeyClient(vault_url=vault_url, credential=_keyvault_credential_for(vault_url), **keyvault_client_kwargs(s))


def _keyvault_credential_for(vault_url: str):
    # keyvault_credential's rule, applied to the vault the key reference names; the host is
    # compared exactly, so "https://localhost.example.com" does not get the static token.
    from urllib.parse import urlsplit

    if urlsplit(vault_url).hostname in ("localhost", "127.0.0.1"):
        return StaticTokenCredential()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def keyvault_crypto_client(key_id: str, settings: Settings | None = None):
    """A CryptographyClient for one versioned key id (``https://vault/keys/name/version``)."""
    from azure.keyvault.keys.crypto import CryptographyClient

    s = settings or get_settings()
    return CryptographyClient(key_id, credential=_keyvault_credential_for(key_id), **keyvault_client_kwargs(s))


# --- search index (search/) -------------------------------------------------------------


def search_index(settings: Settings | None = None, *, elasticsearch_url: str | None = None):
    """The Elasticsearch SearchIndex adapter. ``elasticsearch_url`` selects a tenant's
    dedicated cluster; by default the configured shared cluster is used."""
    from archive_kms.search.elasticsearch import ElasticsearchSearchIndex

    s = settings or get_settings()
    if elasticsearch_url is not None:
        s = s.model_copy(update={"elasticsearch_url": elasticsearch_url})
    return ElasticsearchSearchIndex(elasticsearch_client(s))


# --- the platform (operations/) ------------------------------------------------------------


def keychain_signer(settings: Settings | None = None):
    """The platform signing key. Configured by ``keychain_signing_key_path``; on a local
    stack without one, a key is created once in the stack directory (owner-only file)."""
    from archive_kms.config import stack_dir
    from archive_kms.keys.signing import Signer

    s = settings or get_settings()
    if s.keychain_signing_key_path:
        return Signer.from_settings(s)
    path = stack_dir() / "keychain-signing.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return Signer.create_key_file(path)
    return Signer.from_pem_file(path)


def build_platform(settings: Settings | None = None):
    """Every port on its real backend, from settings: SQL state store (SQLite or
    PostgreSQL), the keychain stored beside it, Elasticsearch, S3/Azure stores, and the
    key-provider registry."""
    from archive_kms.keys.keychain import Keychain
    from archive_kms.keys.registry import resolve
    from archive_kms.operations.platform import Platform
    from archive_kms.state.audit import SignerHeadSealer
    from archive_kms.state.sql import open_state
    from archive_kms.state.sql_keychain import SqlKeychainStore
    from archive_kms.storage import open_store

    s = settings or get_settings()
    signer = keychain_signer(s)
    # The audit chain's head is sealed with the platform key: a re-hashed, edited chain
    # does not verify without it.
    state = open_state(
        s.state_url, sealer=SignerHeadSealer(signer), job_stale_after=timedelta(seconds=s.job_lease_ttl_seconds)
    )
    providers: dict[str, Any] = {}

    def resolve_provider(ref: str):
        if ref not in providers:
            providers[ref] = resolve(ref, s)
        return providers[ref]

    # The keychain audits its commits in the same database and refuses a head older than
    # the audit log recorded (a restored old keychain: docs/adr/0007-keychain-rollback.md).
    keychain = Keychain.from_settings(s, SqlKeychainStore(state), resolve_provider, signer, audit=state)
    s3 = aws_client("s3", s) if s.aws_endpoint_url or s.aws_access_key_id else None
    blob = blob_service_client(s) if s.azure_blob_connection_string or s.azure_blob_account_url else None
    from archive_kms.storage.provisioning import CloudProvisioner

    return Platform(
        s,
        state,
        keychain,
        search_index(s),
        resolve_provider,
        lambda loc: open_store(loc, s, s3_client=s3, blob_service=blob),
        CloudProvisioner(s, s3_client=s3, blob_service=blob),
        anchors=anchor_store(s, s3),
    )


def anchor_store(settings: Settings | None = None, s3_client: Any = None):
    """Where audit anchors are published (``settings.audit_anchor_bucket``), or None."""
    from archive_kms.state.anchors_s3 import S3AnchorStore

    s = settings or get_settings()
    if not s.audit_anchor_bucket:
        return None
    return S3AnchorStore(
        s3_client or aws_client("s3", s), s.audit_anchor_bucket, retention_days=s.audit_anchor_retention_days
    )
