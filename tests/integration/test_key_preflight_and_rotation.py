"""Preflight against the real services refuses unsuitable customer keys with a message that
says what to change (faults.md F16), and a customer-side rotation is visible in
``status().key_version`` while wraps made before it still unwrap (what the key-state
monitor relies on for BYOKMS / BYOKV)."""

from __future__ import annotations

import os
import uuid

import pytest
from kmip.core import enums

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ConfigurationError, KeyNotFoundError, KeyUnavailableError
from archive_kms.keys.port import KeyState
from archive_kms.keys.preflight import check_usable
from archive_kms.keys.registry import KeyProviderRegistry

CTX = {"tenant": "acme"}


@pytest.fixture
def kms(localstack):
    client = clients.kms_client(localstack)
    created: list[str] = []
    client.created = created  # type: ignore[attr-defined]
    yield client
    for arn in created:
        client.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)


def _kms_key(kms, **kwargs) -> str:
    arn = kms.create_key(Description="preflight test", **kwargs)["KeyMetadata"]["Arn"]
    kms.created.append(arn)
    return arn


@pytest.mark.parametrize(
    "spec,usage,problem",
    [
        ("RSA_2048", "ENCRYPT_DECRYPT", "KeySpec is RSA_2048"),
        ("HMAC_256", "GENERATE_VERIFY_MAC", "KeyUsage is GENERATE_VERIFY_MAC"),
        ("ECC_NIST_P256", "SIGN_VERIFY", "KeySpec is ECC_NIST_P256"),
    ],
)
def test_kms_preflight_rejects_asymmetric_and_hmac_keys(localstack, kms, spec, usage, problem) -> None:
    arn = _kms_key(kms, KeySpec=spec, KeyUsage=usage)
    provider = KeyProviderRegistry(localstack).resolve(f"aws-kms://{arn}")
    with pytest.raises(ConfigurationError) as info:
        check_usable(provider, CTX)
    assert problem in str(info.value) and arn in str(info.value)


def test_kms_preflight_in_the_wrong_region_finds_no_key(localstack, kms) -> None:
    arn = _kms_key(kms)
    elsewhere = arn.replace(f":{localstack.aws_region}:", ":eu-west-3:")
    with pytest.raises(KeyNotFoundError, match="region"):
        check_usable(KeyProviderRegistry(localstack).resolve(f"aws-kms://{elsewhere}"), CTX)


def test_kms_preflight_refuses_a_disabled_key_before_wrapping(localstack, kms) -> None:
    arn = _kms_key(kms)
    kms.disable_key(KeyId=arn)
    with pytest.raises(KeyUnavailableError) as info:
        check_usable(KeyProviderRegistry(localstack).resolve(f"aws-kms://{arn}"), CTX)
    assert info.value.state == "disabled"


def test_kms_rotation_changes_key_version_and_old_wraps_still_unwrap(localstack, kms) -> None:
    arn = _kms_key(kms)
    provider = KeyProviderRegistry(localstack).resolve(f"aws-kms://{arn}")
    secret = SecretBytes.random(32)
    before = provider.status().key_version
    wrapped = provider.wrap(secret, context=CTX)
    kms.rotate_key_on_demand(KeyId=arn)  # the customer rotates in their account
    after = provider.status().key_version
    assert before and after and after != before
    assert provider.unwrap(wrapped, context=CTX) == secret
    assert provider.unwrap(provider.wrap(secret, context=CTX), context=CTX) == secret


@pytest.fixture
def kv(keyvault):
    client = clients.keyvault_key_client(keyvault)
    names: list[str] = []
    client.names = names  # type: ignore[attr-defined]
    yield client
    for name in names:
        client.begin_delete_key(name).wait()
        client.purge_deleted_key(name)


def _kv_ref(keyvault, kv, create) -> str:
    name = f"pf-{uuid.uuid4().hex[:10]}"
    create(name)
    kv.names.append(name)
    return f"azure-kv://{keyvault.azure_keyvault_url.removeprefix('https://')}/keys/{name}"


def test_key_vault_preflight_rejects_keys_without_unwrap(keyvault, kv) -> None:
    ref = _kv_ref(keyvault, kv, lambda n: kv.create_rsa_key(n, size=3072, key_operations=["wrapKey", "sign"]))
    with pytest.raises(ConfigurationError, match="lack unwrapKey"):
        check_usable(KeyProviderRegistry(keyvault).resolve(ref), CTX)


def test_key_vault_preflight_requires_rsa_3072(keyvault, kv) -> None:
    """Issue 11 finding 9: the key wraps the long-lived L2; RSA-2048 is refused, 3072 passes."""
    small = _kv_ref(keyvault, kv, lambda n: kv.create_rsa_key(n, size=2048, key_operations=["wrapKey", "unwrapKey"]))
    with pytest.raises(ConfigurationError, match="it is RSA-2048; at least RSA-3072 is required"):
        check_usable(KeyProviderRegistry(keyvault).resolve(small), CTX)
    enough = _kv_ref(keyvault, kv, lambda n: kv.create_rsa_key(n, size=3072, key_operations=["wrapKey", "unwrapKey"]))
    check_usable(KeyProviderRegistry(keyvault).resolve(enough), CTX)


def test_key_vault_preflight_rejects_non_rsa_keys(keyvault, kv) -> None:
    ref = _kv_ref(keyvault, kv, lambda n: kv.create_oct_key(n, size=256, key_operations=["wrapKey", "unwrapKey"]))
    with pytest.raises(ConfigurationError, match="type is oct"):
        check_usable(KeyProviderRegistry(keyvault).resolve(ref), CTX)


def test_key_vault_rotation_is_a_new_version_and_old_wraps_still_unwrap(keyvault, kv) -> None:
    ref = _kv_ref(keyvault, kv, lambda n: kv.create_rsa_key(n, size=3072, key_operations=["wrapKey", "unwrapKey"]))
    provider = KeyProviderRegistry(keyvault).resolve(ref)
    secret = SecretBytes.random(32)
    old = provider.wrap(secret, context=CTX)
    before = provider.status().key_version
    rotated = kv.rotate_key(ref.rsplit("/", 1)[1])  # the customer rotates in their vault
    after = provider.status().key_version
    assert after == rotated.properties.version != before
    new = provider.wrap(secret, context=CTX)
    assert old.key_ref.endswith(before) and new.key_ref.endswith(after)
    assert provider.unwrap(old, context=CTX) == secret == provider.unwrap(new, context=CTX)
    # Disabling the old version refuses only what it wrapped.
    kv.update_key_properties(ref.rsplit("/", 1)[1], before, enabled=False)
    with pytest.raises(KeyUnavailableError):
        provider.unwrap(old, context=CTX)
    assert provider.unwrap(new, context=CTX) == secret
    assert provider.status().state is KeyState.ENABLED  # the current version is fine


def _kmip_key(kmip, *, length=256, masks=("ENCRYPT", "DECRYPT"), activate=True) -> str:
    from kmip.core.factories.attributes import AttributeFactory
    from kmip.core.objects import TemplateAttribute

    # ProxyKmipClient.create always adds Encrypt|Decrypt to the mask, so build the template.
    factory = AttributeFactory()
    template = TemplateAttribute(
        attributes=[
            factory.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES),
            factory.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, length),
            factory.create_attribute(
                enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK, [getattr(enums.CryptographicUsageMask, m) for m in masks]
            ),
            factory.create_attribute(enums.AttributeType.NAME, f"pf-{os.urandom(3).hex()}"),
        ]
    )
    client = clients.kmip_client(kmip)
    with client:
        result = client.proxy.create(enums.ObjectType.SYMMETRIC_KEY, template)
        assert result.result_status.value == enums.ResultStatus.SUCCESS, result.result_message
        uid = result.uuid
        if activate:
            client.activate(uid)
    return f"kmip://{kmip.kmip_host}:{kmip.kmip_port}/{uid}"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"length": 128}, ConfigurationError, "128 bits, not 256"),
        ({"masks": ("ENCRYPT",)}, ConfigurationError, "lacks Decrypt"),
        ({"activate": False}, KeyUnavailableError, "disabled"),
    ],
)
def test_kmip_preflight_rejects_unsuitable_keys(kmip, kwargs, error, match) -> None:
    ref = _kmip_key(kmip, **kwargs)
    with pytest.raises(error, match=match):
        check_usable(KeyProviderRegistry(kmip).resolve(ref), CTX)
