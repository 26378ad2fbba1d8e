"""What a migration process holds before the first byte moves (docs/benchmarks.md, session 5):
every AWS client shares one botocore data loader, and Azure's clients are built on first use."""

from __future__ import annotations

import threading

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.errors import ConfigurationError
from archive_kms.storage import locations as L
from archive_kms.storage.provisioning import CloudProvisioner


def _settings() -> Settings:
    return Settings(aws_endpoint_url="http://127.0.0.1:9", aws_access_key_id="test", aws_secret_access_key="test")


def test_aws_clients_share_one_data_loader() -> None:
    s = _settings()
    s3 = clients.aws_client("s3", s)
    kms_a = clients.kms_client(s)
    kms_b = clients.kms_client(s, region="eu-west-1")
    assert s3._loader is kms_a._loader is kms_b._loader
    # each client still has its own session and region
    assert kms_b.meta.region_name == "eu-west-1" and kms_a.meta.region_name == s.aws_region


def test_the_shared_loader_still_finds_boto3_resource_models() -> None:
    session = clients.boto3_session(_settings())
    assert "s3" in session.get_available_resources()
    session.resource("s3", endpoint_url="http://127.0.0.1:9")  # loads resources-1 through the loader


def test_tenant_accounts_are_built_on_first_use_and_once() -> None:
    built: list[int] = []
    gate = threading.Barrier(4)

    class _Accounts:
        def exists(self, location: object) -> bool:
            return True

    def factory() -> _Accounts:
        built.append(1)
        return _Accounts()

    p = CloudProvisioner(_settings(), accounts_factory=factory)  # type: ignore[arg-type]
    assert built == []  # nothing built by the constructor
    loc = L.dedicated_azure_location("acme", account_prefix="akms")
    results: list[bool] = []

    def probe() -> None:
        gate.wait()
        results.append(p.exists(loc))

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and built == [1]


def test_a_factory_that_finds_no_accounts_still_names_the_settings() -> None:
    p = CloudProvisioner(Settings(aws_endpoint_url=None, azure_account_pool=[]), accounts_factory=lambda: None)
    loc = L.dedicated_azure_location("acme", account_prefix="akms")
    with pytest.raises(ConfigurationError, match="azure_subscription_id.*azure_account_pool"):
        p.exists(loc)


def test_accounts_and_a_factory_together_are_refused() -> None:
    from archive_kms.errors import ValidationError

    with pytest.raises(ValidationError, match="accounts or accounts_factory"):
        CloudProvisioner(_settings(), accounts=object(), accounts_factory=lambda: None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["AccountName=;;;garbage", "", ";;", "AccountName=;AccountKey=k", "garbage"])
def test_a_malformed_connection_string_is_refused_without_the_azure_sdk(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="malformed") as info:
        clients.check_connection_string(bad)
    assert "garbage" not in str(info.value)


def test_a_well_formed_connection_string_passes_the_check() -> None:
    clients.check_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/x;"
    )
