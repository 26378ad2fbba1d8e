"""SDK client factories: boto3 (S3, KMS), Azure Blob, Azure Key Vault, Elasticsearch and
PyKMIP clients built from ``Settings``.

This module sits at the bottom of the layers, beside ``config`` and ``errors`` (the only
project modules it imports; docs/adr/0008-layers.md). Adapters take ready clients in their
constructors; their ``from_settings`` constructors build them here. The composition root
(``operations.platform.Platform.from_settings``) builds the shared ones once per platform.
SDKs are imported inside each factory, so building a KMS client does not import Azure.
Emulator endpoints are configuration values, never code paths.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from archive_kms.config import Settings, get_settings
from archive_kms.errors import ConfigurationError


def _require(value: Any, name: str) -> Any:
    if value in (None, ""):
        raise ConfigurationError(
            f"setting {name} is not set: export ARCHIVE_KMS_{name.upper()} or run `archive-kms stack up`"
        )
    return value


_data_loader: Any = None
_data_loader_lock = threading.Lock()


def _shared_data_loader() -> Any:
    """One botocore data loader per process: every session reads the service models and
    endpoint data through it, so they are parsed and held once, not once per client
    (~8 MiB per KMS client otherwise; docs/benchmarks.md, session 5). The loader only
    caches the SDK's own JSON files: no credentials, nothing per tenant."""
    global _data_loader
    with _data_loader_lock:
        if _data_loader is None:
            import boto3
            from botocore.loaders import create_loader

            _data_loader = create_loader()
            # what boto3.Session adds to its own loader (resource models)
            _data_loader.search_paths.append(os.path.join(os.path.dirname(boto3.__file__), "data"))
        return _data_loader


def boto3_session(settings: Settings | None = None):  # -> boto3.Session
    import boto3

    s = settings or get_settings()
    session = boto3.Session(
        aws_access_key_id=s.aws_access_key_id.get_secret_value() if s.aws_access_key_id else None,
        aws_secret_access_key=s.aws_secret_access_key.get_secret_value() if s.aws_secret_access_key else None,
        region_name=s.aws_region,
    )
    session._session.register_component("data_loader", _shared_data_loader())
    return session


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
        # No SigV4 hash of S3 bodies (UNSIGNED-PAYLOAD, also over plain HTTP): every write
        # carries an x-amz-checksum-sha256 that S3 validates and that SigV4 signs as a
        # header, so the body stays bound to the signature without a second SHA-256 pass
        # over every byte (ADR 0018).
        s3={"addressing_style": "path", "payload_signing_enabled": False} if service == "s3" else None,
        max_pool_connections=32,
        **config,
    )
    session = boto3_session(s)
    # botocore parses every response timestamp (Last-Modified of each GET) with dateutil
    # (~60 us of CPU each, 12x ours): the formats S3 and KMS send parse exactly with the standard library.
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return session.client(service, endpoint_url=s.aws_endpoint_url, config=cfg)


def obstore_s3_store(bucket: str, settings: Settings | None = None) -> Any:
    """An obstore ``S3Store`` for ``bucket`` (the streaming reads of ``storage.s3_obstore``,
    ADR 0043), addressed like ``aws_client("s3")``: same endpoint, region, path-style
    addressing and credentials (the settings' keys, else boto3's own credential chain, so
    an instance or task role works the same), the CA bundle boto3 honours
    (``AWS_CA_BUNDLE``), and the same attempts as botocore's (9, with jittered backoff). The
    overall request timeout is off (a large object streams for minutes); a stalled read
    times out after 60 s and is retried or resumed."""
    from datetime import timedelta

    from obstore.store import S3Store

    s = settings or get_settings()
    options: Any = {  # obstore.store.ClientConfig
        "allow_http": bool(s.aws_endpoint_url and s.aws_endpoint_url.startswith("http://")),
        "connect_timeout": timedelta(seconds=10),
        "read_timeout": timedelta(seconds=60),
        "timeout": timedelta(days=1),
        "pool_max_idle_per_host": "32",
    }
    ca_bundle = os.environ.get("AWS_CA_BUNDLE")
    if ca_bundle:
        with open(ca_bundle, "rb") as f:
            options["root_certificate"] = f.read()
    kwargs: dict[str, Any] = {}
    if s.aws_endpoint_url:
        kwargs["endpoint"] = s.aws_endpoint_url
    if s.aws_access_key_id and s.aws_secret_access_key:
        kwargs["access_key_id"] = s.aws_access_key_id.get_secret_value()
        kwargs["secret_access_key"] = s.aws_secret_access_key.get_secret_value()
    else:
        credentials = boto3_session(s).get_credentials()
        if credentials is None:
            raise ConfigurationError("no AWS credentials found for S3 (settings, environment or role)")

        def provider() -> dict[str, Any]:
            frozen = credentials.get_frozen_credentials()
            return {
                "access_key_id": frozen.access_key,
                "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": None,
            }

        kwargs["credential_provider"] = provider
    return S3Store(
        bucket,
        region=s.aws_region,
        virtual_hosted_style_request=False,
        client_options=options,
        retry_config={
            "max_retries": 8,
            "retry_timeout": timedelta(seconds=120),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=20), "base": 2},
        },
        **kwargs,
    )


def _blob_transport():
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    # The migration copies with tens of threads; requests' default pool keeps only 10
    # connections and discards the rest after every burst.
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session)


def blob_service_client(settings: Settings | None = None):

    s = settings or get_settings()
    if s.azure_blob_connection_string is None and s.azure_blob_account_url:
        cs = None
    else:
        cs = _require(s.azure_blob_connection_string, "azure_blob_connection_string")
    if cs is None:  # Entra ID only (the account allows no shared key): the managed identity
        return blob_service_client_for_url(s.azure_blob_account_url or "")
    return blob_service_client_from_connection_string(cs.get_secret_value())


def check_connection_string(connection_string: str, setting: str = "azure_blob_connection_string") -> None:
    """Refuse a connection string that is not ``key=value`` pairs naming an account, without
    importing the Azure SDK (the platform checks its settings before it builds any Azure
    client; the SDK checks the rest when the client is built). Never echoes the string."""
    pairs = [p for p in connection_string.split(";") if p.strip()]
    fields = dict(p.split("=", 1) for p in pairs if "=" in p)
    if not pairs or len(fields) != len(pairs) or not fields.get("AccountName", "x").strip():
        raise ConfigurationError(
            f"{setting} (ARCHIVE_KMS_{setting.upper()}) is malformed; expected "
            "DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...;BlobEndpoint=...",
            resource=setting,
        )


def blob_service_client_from_connection_string(connection_string: str, setting: str = "azure_blob_connection_string"):
    """A Blob client for one account from its connection string (shared key: Azurite).
    A malformed one is a ConfigurationError naming ``setting``, never echoing the string
    (it holds the account key)."""
    from azure.storage.blob import BlobServiceClient

    try:
        return BlobServiceClient.from_connection_string(connection_string, transport=_blob_transport())
    except ValueError:
        raise ConfigurationError(
            f"{setting} (ARCHIVE_KMS_{setting.upper()}) is malformed; expected "
            "DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...;BlobEndpoint=...",
            resource=setting,
        ) from None


def blob_service_client_for_url(account_url: str):
    """A Blob client for the account at ``account_url`` (``https://ACCOUNT.blob...``),
    authenticated with Microsoft Entra ID (DefaultAzureCredential: the workers' managed
    identity). Tenant accounts created through Resource Manager allow no shared key."""
    from azure.identity import DefaultAzureCredential
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient(account_url, credential=DefaultAzureCredential(), transport=_blob_transport())


def storage_management_client(settings: Settings | None = None):
    """An azure-mgmt-storage client (Azure Resource Manager) for the subscription that holds
    the tenant accounts. A loopback ``azure_arm_endpoint`` (a local stand-in) gets the static
    token; anything else DefaultAzureCredential."""
    from urllib.parse import urlsplit

    from azure.core.pipeline.transport import RequestsTransport
    from azure.mgmt.storage import StorageManagementClient

    s = settings or get_settings()
    endpoint = s.azure_arm_endpoint.rstrip("/")
    if urlsplit(endpoint).hostname in ("localhost", "127.0.0.1"):
        credential: Any = StaticTokenCredential()
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    kwargs: dict[str, Any] = {}
    if s.azure_arm_ca_bundle:
        kwargs["transport"] = RequestsTransport(connection_verify=s.azure_arm_ca_bundle)
    return StorageManagementClient(
        credential,
        _require(s.azure_subscription_id, "azure_subscription_id"),
        base_url=endpoint,
        credential_scopes=[f"{endpoint}/.default"],
        **kwargs,
    )


class _NoOptionalHttpBackends:
    """A ``sys.meta_path`` finder that refuses ``httpx``, ``requests`` and ``aiohttp`` to
    ``elastic_transport._node`` only (ADR 0046). The transport imports every HTTP library it
    finds installed, to offer it as a node class; ours is its default, urllib3. httpx came
    with the test extra and Prefect, and its package imports click, rich and pygments for
    its command line: ~9 MiB of RSS, with requests, in every process that searches. A
    library already imported is taken as it is (finders are not asked); any other importer,
    in any thread, is not affected. Choosing the node class (``node_class="urllib3"``) does
    not avoid them: ``elastic_transport._node`` imports every ``_http_*`` module, and each
    tries its library, when the package is imported (checked on 9.4). A test fails naming
    this layout if a release changes it (tests/unit/test_elasticsearch_client_imports.py)."""

    NAMES = frozenset({"httpx", "requests", "aiohttp"})

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in self.NAMES:
            frame: FrameType | None = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__", "").startswith("elastic_transport._node."):
                    raise ModuleNotFoundError(f"{name}: not used by our Elasticsearch client", name=name)
                frame = frame.f_back
        return None


_es_import_lock = threading.Lock()


def _import_elasticsearch():  # -> type[elasticsearch.Elasticsearch]
    with _es_import_lock:
        if "elastic_transport" not in sys.modules:
            finder = _NoOptionalHttpBackends()
            sys.meta_path.insert(0, finder)
            try:
                import elasticsearch  # noqa: F401 - imported here, behind the finder
            finally:
                sys.meta_path.remove(finder)
        from elasticsearch import Elasticsearch
    return Elasticsearch


def elasticsearch_client(settings: Settings | None = None):
    Elasticsearch = _import_elasticsearch()  # noqa: N806 - the class

    s = settings or get_settings()
    return Elasticsearch(
        _require(s.elasticsearch_url, "elasticsearch_url"),
        request_timeout=30,
        # A failed request (connection refused or reset, timeout) is retried 4 times with
        # capped exponential backoff and jitter, 3.75-7.5 s in all: a node restart or a blip
        # of a few seconds is ridden out. Without a backoff base the transport retried at
        # once and a one-second blip failed a whole rebuild (faults C1).
        max_retries=4,
        retry_backoff_base=0.5,
        retry_backoff_cap=4.0,
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


def verify_server_hostname(client: Any) -> Any:
    """Make a PyKMIP ``ProxyKmipClient`` check that the server's certificate names the host
    it connects to, and refuse anything below TLS 1.2.

    PyKMIP 0.11 verifies the chain but wraps the socket without ``server_hostname``: any
    certificate from the CA would do for any host, and the wrap request carries the tenant
    key in clear to whoever answers. Returns ``client``."""
    from kmip.services.kmip_client import KMIPProxy

    class _HostCheckingProxy(KMIPProxy):
        def _create_socket(self, sock: Any) -> None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_certs)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = True
            context.verify_mode = ssl.CERT_REQUIRED
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile)
            self.socket = context.wrap_socket(
                sock,
                server_side=False,
                server_hostname=self.host,
                do_handshake_on_connect=self.do_handshake_on_connect,
                suppress_ragged_eofs=self.suppress_ragged_eofs,
            )
            self.socket.settimeout(self.timeout)

    if not isinstance(client.proxy, KMIPProxy):
        raise TypeError(f"not a PyKMIP client proxy: {type(client.proxy).__name__}")
    client.proxy.__class__ = _HostCheckingProxy
    return client


def kmip_client(settings: Settings | None = None):
    """A PyKMIP ProxyKmipClient over mutual TLS that checks the server's host name (not yet
    opened: use ``with client:``)."""
    from kmip.pie.client import ProxyKmipClient

    s = settings or get_settings()
    client = ProxyKmipClient(
        hostname=s.kmip_host,
        port=s.kmip_port,
        cert=_require(s.kmip_client_cert, "kmip_client_cert"),
        key=_require(s.kmip_client_key, "kmip_client_key"),
        ca=_require(s.kmip_ca_cert, "kmip_ca_cert"),
        config_file="/dev/null",  # never read ~/.pykmip/pykmip.conf: configuration comes from Settings
        kmip_version=None,
    )
    client.proxy.timeout = s.kmip_timeout_seconds  # PyKMIP takes it only from a config file
    return verify_server_hostname(client)


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


def parse_timestamp(value: Any) -> datetime:
    """botocore's response timestamp parser, fast for what AWS sends: RFC 7231 dates in
    headers (``Wed, 21 Oct 2015 07:28:00 GMT``), ISO 8601 in XML and JSON bodies
    (``2015-10-21T07:28:00.000Z``), epoch seconds in JSON. Anything else goes to botocore's
    own (dateutil) parser. Always timezone-aware."""
    from email.utils import parsedate_to_datetime

    from botocore.utils import parse_timestamp as slow

    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, UTC)
        text = str(value).strip()
        if text[:1].isdigit():
            parsed = datetime.fromisoformat(text)
        else:
            parsed = parsedate_to_datetime(text)
        if parsed.tzinfo is not None:
            return parsed
    except (ValueError, TypeError, OverflowError):
        pass
    return slow(value)
