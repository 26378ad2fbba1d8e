"""The composition root and the client factories (docs/adr/0009-composition-root.md).

``Platform.from_settings`` / ``Platform.in_memory`` are the only code that knows every
adapter; adapters build their SDK clients through ``archive_kms.clients`` and the key
registry names its adapter classes directly.
"""

from __future__ import annotations

import json
import subprocess
import sys

from archive_kms.keys.aws_kms import AwsKmsKeyProvider
from archive_kms.keys.azure_key_vault import AzureKeyVaultKeyProvider
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.managed import ManagedKeyProvider
from archive_kms.keys.registry import DEFAULT_ADAPTERS
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.storage import Location


def _modules_after(code: str) -> set[str]:
    """The top-level packages loaded by a fresh interpreter after running ``code``."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_registry_maps_each_scheme_to_its_adapter_class():
    assert dict(DEFAULT_ADAPTERS) == {
        "aws-kms": AwsKmsKeyProvider,
        "azure-kv": AzureKeyVaultKeyProvider,
        "kmip": KmipKeyProvider,
        "managed": ManagedKeyProvider,
    }


def test_resolving_an_aws_key_builds_a_kms_client_without_importing_other_sdks():
    loaded = _modules_after(
        "from archive_kms.config import Settings\n"
        "from archive_kms.keys.registry import KeyProviderRegistry\n"
        "s = Settings(aws_endpoint_url='http://127.0.0.1:9', aws_region='eu-west-1')\n"
        "p = KeyProviderRegistry(s).resolve('aws-kms://arn:aws:kms:eu-west-1:111122223333:key/"
        "0b5f1c9e-6f3c-4a57-9d1e-2f7f2a0c1d11')\n"
        "assert p._kms.meta.region_name == 'eu-west-1'\n"
    )
    assert "boto3" in loaded
    assert not loaded & {"azure", "kmip", "elasticsearch"}


def test_importing_the_platform_type_loads_no_backend():
    """Every operation and step imports ``Platform`` for its type; the cloud SDKs load only
    when a constructor builds a client (SQLAlchemy does load: the ``state`` package
    exports its SQL store)."""
    loaded = _modules_after("from archive_kms.operations.platform import Platform")
    assert not loaded & {"boto3", "botocore", "azure", "elasticsearch", "kmip", "prefect"}


def test_tenant_creation_provisions_its_shared_location_through_the_provisioner():
    platform = Platform.in_memory()
    created: list[str] = []

    class Recording:
        def __init__(self, inner):
            self._inner = inner

        def create(self, location: Location) -> None:
            created.append(location.uri)
            self._inner.create(location)

        def exists(self, location: Location) -> bool:
            return self._inner.exists(location)

        def delete(self, location, store) -> int:
            return self._inner.delete(location, store)

    platform.provisioner = Recording(platform.provisioner)
    create_tenant(platform, "acme", cloud="azure")
    assert created == [platform.location_of("acme").uri]
    create_tenant(platform, "globex", cloud="s3", provision_storage=False)
    assert len(created) == 1
