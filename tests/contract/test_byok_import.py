"""BYOK import (keys/byok.py) against LocalStack KMS: what the customer uploads is checked
before any KMS call, bad uploads leave the key PendingImport, expiry is reported, and the
same material can be imported again after deletion.

Two LocalStack 2026.3.0 gaps are marked ``xfail(strict=True)`` (they turn into failures
the day LocalStack fixes them, so the marks cannot outlive the defects):

* it accepts ``ValidTo`` but never reports it in DescribeKey (``# TODO actually set validTo
  and make the key expire`` in localstack/services/kms/provider.py, ImportKeyMaterial);
* after DeleteImportedKeyMaterial it keeps ``CurrentKeyMaterialId``, so a reimport is parked
  as "pending rotation" and every Encrypt/Decrypt then fails with a 500
  (``key must be bytes-like``).

The mapping of real KMS's answers for those cases is covered with botocore's Stubber in
tests/unit/test_aws_kms_adapter.py.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import KeyImportError, KeyUnavailableError, ServiceUnavailableError, ValidationError
from archive_kms.keys.aws_kms import AwsKmsKeyProvider
from archive_kms.keys.byok import ByokImporter, customer_wrap, sha256_hex
from archive_kms.keys.port import KeyState
from archive_kms.keys.refs import parse_key_ref

CTX = {"tenant": "acme"}


class CallCounter:
    """Counts KMS API calls made through a client (botocore before-call event)."""

    def __init__(self, client) -> None:
        self.operations: list[str] = []
        client.meta.events.register("before-call.kms.*", self._seen)

    def _seen(self, model, **_) -> None:
        self.operations.append(model.name)


@pytest.fixture
def kms(localstack):
    return clients.kms_client(localstack, max_attempts=2)


@pytest.fixture
def importer(kms):
    return ByokImporter(kms)


@pytest.fixture
def byok_key(importer, kms):
    ref = importer.create_key(description="byok import test", tags={"tenant": "acme"})
    yield ref
    kms.schedule_key_deletion(KeyId=parse_key_ref(ref).api_key_id, PendingWindowInDays=7)


def _state(kms, ref: str) -> KeyState:
    return AwsKmsKeyProvider(ref, kms).status().state


def test_import_parameters_are_published_as_pem(importer, byok_key) -> None:
    params = importer.import_parameters(byok_key)
    assert params.key_ref == byok_key
    assert params.wrapping_algorithm == "RSAES_OAEP_SHA_256" and params.wrapping_key_spec == "RSA_4096"
    assert load_pem_public_key(params.public_key_pem.encode()).key_size == 4096
    assert params.expires_at > datetime.now(UTC)
    assert params.import_token and "import_token" not in repr(params)


def test_customer_upload_round_trip_and_status(importer, kms, byok_key) -> None:
    assert _state(kms, byok_key) is KeyState.PENDING_IMPORT
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    result = importer.import_material(params, upload, sha256_hex(upload).upper())  # hex case is free

    assert result.wrapped_sha256 == sha256_hex(upload) and result.expiration_model == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    provider = AwsKmsKeyProvider(byok_key, kms)
    status = provider.status()
    assert status.state is KeyState.ENABLED and status.details["origin"] == "EXTERNAL"
    secret = SecretBytes.random(32)
    assert provider.unwrap(provider.wrap(secret, context=CTX), context=CTX) == secret


def test_digest_mismatch_is_refused_before_any_kms_call(importer, kms, byok_key) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    stated = sha256_hex(upload[:-1] + bytes([upload[-1] ^ 1]))  # the customer hashed another file
    calls = CallCounter(kms)

    with pytest.raises(KeyImportError) as info:
        importer.import_material(params, upload, stated)

    assert calls.operations == []
    message = str(info.value)
    assert stated in message and sha256_hex(upload) in message and byok_key in message
    assert _state(kms, byok_key) is KeyState.PENDING_IMPORT


@pytest.mark.parametrize("digest", ["", "abc", "g" * 64, "sha256:" + "0" * 64, "0" * 63])
def test_malformed_digest_is_a_validation_error(importer, kms, byok_key, digest: str) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    calls = CallCounter(kms)
    with pytest.raises(ValidationError, match="64 hex digits"):
        importer.import_material(params, upload, digest)
    assert calls.operations == []


def test_wrong_length_upload_is_refused_before_any_kms_call(importer, kms, byok_key) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_4096")
    other = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(other.public_key_pem, SecretBytes.random(32))  # wrapped under the wrong RSA size
    calls = CallCounter(kms)
    with pytest.raises(KeyImportError, match="256 bytes.*512 bytes"):
        importer.import_material(params, upload, sha256_hex(upload))
    assert calls.operations == []


def test_expired_import_parameters_are_refused_and_key_stays_pending(kms, byok_key) -> None:
    params = ByokImporter(kms).import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    later = ByokImporter(kms, clock=lambda: params.expires_at + timedelta(seconds=1))
    calls = CallCounter(kms)
    with pytest.raises(KeyImportError, match="expired"):
        later.import_material(params, upload, sha256_hex(upload))
    assert calls.operations == []
    assert _state(kms, byok_key) is KeyState.PENDING_IMPORT


@pytest.mark.parametrize("how", ["random-bytes", "sha1-oaep", "other-keys-token"])
def test_wrongly_wrapped_upload_fails_and_key_stays_pending(importer, kms, byok_key, how: str) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    material = SecretBytes.random(32)
    if how == "random-bytes":
        upload = os.urandom(256)
    elif how == "sha1-oaep":  # the customer picked RSAES_OAEP_SHA_1
        public = load_pem_public_key(params.public_key_pem.encode())
        upload = public.encrypt(
            material.reveal(), padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        )
    else:  # wrapped for our key, presented with another key's token
        other_ref = importer.create_key(description="byok other")
        other = importer.import_parameters(other_ref, wrapping_key_spec="RSA_2048")
        upload = customer_wrap(params.public_key_pem, material)
        params = replace(params, import_token=other.import_token)
        kms.schedule_key_deletion(KeyId=parse_key_ref(other_ref).api_key_id, PendingWindowInDays=7)

    with pytest.raises(KeyImportError) as info:
        importer.import_material(params, upload, sha256_hex(upload))
    assert "stays pending import" in str(info.value) and byok_key in str(info.value)
    assert _state(kms, byok_key) is KeyState.PENDING_IMPORT
    with pytest.raises(KeyUnavailableError) as refused:
        AwsKmsKeyProvider(byok_key, kms).wrap(SecretBytes.random(32), context=CTX)
    assert refused.value.state == KeyState.PENDING_IMPORT.value


def test_valid_to_must_be_in_the_next_365_days(importer, byok_key) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    now = datetime.now(UTC)
    for bad in (now - timedelta(minutes=1), now + timedelta(days=366)):
        with pytest.raises(ValidationError, match="365 days"):
            importer.import_material(params, upload, sha256_hex(upload), valid_to=bad)
    with pytest.raises(ValidationError, match="timezone"):
        importer.import_material(params, upload, sha256_hex(upload), valid_to=datetime.now() + timedelta(days=1))


def test_expiring_material_reports_its_expiration_model(importer, kms, byok_key) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    valid_to = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    result = importer.import_material(params, upload, sha256_hex(upload), valid_to=valid_to)
    assert result.valid_to == valid_to and result.expiration_model == "KEY_MATERIAL_EXPIRES"
    status = AwsKmsKeyProvider(byok_key, kms).status()
    assert status.state is KeyState.ENABLED
    assert status.details["expiration_model"] == "KEY_MATERIAL_EXPIRES"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="LocalStack 2026.3.0 does not store or report ValidTo (provider.py: "
    "'TODO actually set validTo and make the key expire')",
)
def test_status_reports_when_imported_material_expires(importer, kms, byok_key) -> None:
    params = importer.import_parameters(byok_key, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))
    valid_to = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    importer.import_material(params, upload, sha256_hex(upload), valid_to=valid_to)
    assert AwsKmsKeyProvider(byok_key, kms).status().expires_at == valid_to


def _import_then_delete(importer, kms, ref):
    material = SecretBytes.random(32)  # the customer keeps this; we never see it
    params = importer.import_parameters(ref, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, material)
    importer.import_material(params, upload, sha256_hex(upload))
    provider = AwsKmsKeyProvider(ref, kms)
    secret = SecretBytes.random(32)
    wrapped = provider.wrap(secret, context=CTX)
    importer.delete_material(ref)
    assert provider.status().state is KeyState.PENDING_IMPORT
    with pytest.raises(KeyUnavailableError) as info:
        provider.unwrap(wrapped, context=CTX)
    assert info.value.state == KeyState.PENDING_IMPORT.value
    # The customer uploads the same material again, wrapped under fresh parameters.
    params = importer.import_parameters(ref, wrapping_key_spec="RSA_2048")
    upload = customer_wrap(params.public_key_pem, material)
    importer.import_material(params, upload, sha256_hex(upload))
    return provider, wrapped, secret


def test_reimport_after_deletion_makes_the_key_enabled_again(importer, kms, byok_key) -> None:
    provider, _, _ = _import_then_delete(importer, kms, byok_key)
    assert provider.status().state is KeyState.ENABLED


@pytest.mark.xfail(
    strict=True,
    raises=ServiceUnavailableError,
    reason="LocalStack 2026.3.0 keeps CurrentKeyMaterialId after "
    "DeleteImportedKeyMaterial, parks the reimported material as 'pending "
    "rotation' and then fails Encrypt/Decrypt with 500 'key must be bytes-like'",
)
def test_reimport_after_deletion_restores_unwrap(importer, kms, byok_key) -> None:
    provider, wrapped, secret = _import_then_delete(importer, kms, byok_key)
    assert provider.unwrap(wrapped, context=CTX) == secret
