"""Builds SDK clients from Settings: the only module that knows every backend's client.

Adapters take ready clients (style: pass clients in), so tests and the demo wire them
here from configuration; emulator endpoints are just endpoint values.
"""

from __future__ import annotations

import time
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
    cs = _require(s.azure_blob_connection_string, "azure_blob_connection_string")
    return BlobServiceClient.from_connection_string(cs.get_secret_value())


def elasticsearch_client(settings: Settings | None = None):
    from elasticsearch import Elasticsearch

    s = settings or get_settings()
    return Elasticsearch(_require(s.elasticsearch_url, "elasticsearch_url"), request_timeout=30, max_retries=3,
                         retry_on_timeout=True)


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
    return KeyClient(vault_url=_require(s.azure_keyvault_url, "azure_keyvault_url"),
                     credential=keyvault_credential(s), **keyvault_client_kwargs(s))


def kmip_client(settings: Settings | None = None):
    """A PyKMIP ProxyKmipClient over mutual TLS (not yet opened: use ``with client:``)."""
    from kmip.pie.client import ProxyKmipClient

    s = settings or get_settings()
    return ProxyKmipClient(
        hostname=s.kmip_host,
        port=s.kmip_port,
        cert=_require(s.kmip_client_cert, "kmip_client_cert"),
        key=_require(s.kmip_client_key, "kmip_client_key"),
        ca=_require(s.kmip_ca_cert, "kmip_ca_cert"),
        config_file="/dev/null",  # never read ~/.pykmip/pykmip.conf: configuration comes from Settings
        kmip_version=None,
    )
