"""The composition root and the client factories (docs/adr/0009-composition-root.md).

``Platform.from_settings`` / ``Platform.in_memory`` are the only code that knows every
adapter; adapters build their SDK clients through ``archive_kms.clients`` and the key
registry names its adapter classes directly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from archive_kms.keys.aws_kms import AwsKmsKeyProvider
from archive_kms.keys.azure_key_vault import AzureKeyVaultKeyProvider
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.managed import ManagedKeyProvider
from archive_kms.keys.registry import DEFAULT_ADAPTERS
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.storage import Location

_SNAPSHOT = "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"

_SCRIPT = f"""
import json, sys
from archive_kms.operations.platform import Platform
{_SNAPSHOT}
from archive_kms.config import Settings
from archive_kms.keys.registry import KeyProviderRegistry
s = Settings(aws_endpoint_url="http://127.0.0.1:9", aws_region="eu-west-1")
p = KeyProviderRegistry(s).resolve("aws-kms://arn:aws:kms:eu-west-1:111122223333:key/0b5f1c9e-6f3c-4a57-9d1e-2f7f2a0c1d11")
assert p._kms.meta.region_name == "eu-west-1"
{_SNAPSHOT}
"""


@pytest.fixture(scope="module")
def loaded() -> tuple[set[str], set[str]]:
    """Top-level packages a fresh interpreter has loaded after importing ``Platform``, and
    after then resolving an AWS KMS key through the registry (one subprocess for both)."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    after_import, after_resolve = (set(json.loads(line)) for line in out.stdout.strip().splitlines()[-2:])
    return after_import, after_resolve


def test_registry_maps_each_scheme_to_its_adapter_class():
    assert dict(DEFAULT_ADAPTERS) == {
        "aws-kms": AwsKmsKeyProvider,
        "azure-kv": AzureKeyVaultKeyProvider,
        "kmip": KmipKeyProvider,
        "managed": ManagedKeyProvider,
    }


def test_resolving_an_aws_key_builds_a_kms_client_without_importing_other_sdks(loaded):
    _, after_resolve = loaded
    assert "boto3" in after_resolve
    assert not after_resolve & {"azure", "kmip", "elasticsearch"}


def test_importing_the_platform_type_loads_no_backend(loaded):
    """Every operation and step imports ``Platform`` for its type; the cloud SDKs load only
    when a constructor builds a client (SQLAlchemy does load: the ``state`` package
    exports its SQL store)."""
    after_import, _ = loaded
    assert not after_import & {"boto3", "botocore", "azure", "elasticsearch", "kmip", "prefect"}


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
