"""AWS KMS adapter and BYOK importer against botocore's Stubber: real KMS answers that the
emulator does not give (ValidTo, expired material, multi-Region replicas, AWS managed keys,
ExpiredImportTokenException, IncorrectKeyMaterialException...) map to the right state or
error, and requests carry the context and the pinned key id."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ConfigurationError,
    KeyAccessDeniedError,
    KeyError_,
    KeyImportError,
    KeyNotFoundError,
    KeyThrottledError,
    KeyUnavailableError,
    ServiceUnavailableError,
    WrongKeyError,
)
from archive_kms.keys.aws_kms import ALGORITHM, AwsKmsKeyProvider, _RedactKmsPlaintext, translate_client_error
from archive_kms.keys.byok import ByokImporter, ImportParameters, sha256_hex
from archive_kms.keys.port import KeyState, WrappedKey

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER = "arn:aws:kms:us-east-1:111122223333:key/99999999-12ab-34cd-56ef-1234567890ab"
REF = f"aws-kms://{ARN}"
CTX = {"tenant": "acme"}


@pytest.fixture
def kms():
    client = boto3.client(
        "kms",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    with Stubber(client) as stub:
        client.stub = stub  # type: ignore[attr-defined]
        yield client
        stub.assert_no_pending_responses()


def metadata(**overrides):
    md = {
        "AWSAccountId": "111122223333",
        "KeyId": ARN.rsplit("/", 1)[1],
        "Arn": ARN,
        "Enabled": True,
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": "Enabled",
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "MultiRegion": False,
        "CurrentKeyMaterialId": "m1" * 32,
    }
    md.update(overrides)
    return {"KeyMetadata": md}


def provider(kms, ref: str = REF) -> AwsKmsKeyProvider:
    return AwsKmsKeyProvider(ref, kms, clock=lambda: NOW)


def client_error(code: str, status: int = 400, message: str = "m") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Decrypt"
    )


# --- error translation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code,status,expected,retryable",
    [
        ("DisabledException", 400, KeyUnavailableError, False),
        ("KMSInvalidStateException", 400, KeyUnavailableError, False),
        ("NotFoundException", 400, KeyNotFoundError, False),
        ("AccessDeniedException", 400, KeyAccessDeniedError, False),
        ("InvalidGrantTokenException", 400, KeyAccessDeniedError, False),
        ("InvalidCiphertextException", 400, WrongKeyError, False),
        ("IncorrectKeyException", 400, WrongKeyError, False),
        ("ThrottlingException", 400, KeyThrottledError, True),
        ("LimitExceededException", 400, KeyThrottledError, True),
        ("KMSInternalException", 500, ServiceUnavailableError, True),
        ("DependencyTimeoutException", 503, ServiceUnavailableError, True),
        ("KeyUnavailableException", 500, ServiceUnavailableError, True),
        ("SomethingNew", 502, ServiceUnavailableError, True),
        ("InvalidKeyUsageException", 400, ConfigurationError, False),
        ("SomethingNew", 400, KeyError_, False),
    ],
)
def test_client_errors_translate_by_code(code, status, expected, retryable) -> None:
    error = translate_client_error(
        client_error(code, status), operation="Decrypt", key_ref=REF, state_of=lambda: KeyState.PENDING_DELETION
    )
    assert type(error) is expected
    assert error.retryable is retryable
    assert REF in str(error) and error.resource == REF


def test_invalid_state_names_the_state_from_describe_key() -> None:
    error = translate_client_error(
        client_error("KMSInvalidStateException"),
        operation="Decrypt",
        key_ref=REF,
        state_of=lambda: KeyState.PENDING_IMPORT,
    )
    assert isinstance(error, KeyUnavailableError) and error.state == "pending_import"
    assert "pending_import" in str(error)
    assert (
        translate_client_error(client_error("DisabledException"), operation="Decrypt", key_ref=REF).state == "disabled"
    )


def test_transport_errors_are_retryable() -> None:
    error = translate_client_error(
        EndpointConnectionError(endpoint_url="https://kms"), operation="Encrypt", key_ref=REF
    )
    assert isinstance(error, ServiceUnavailableError) and error.retryable


# --- requests ----------------------------------------------------------------------------


def test_wrap_sends_the_context_and_unwrap_pins_the_key(kms) -> None:
    secret = SecretBytes(b"k" * 32)
    kms.stub.add_response(
        "encrypt",
        {"CiphertextBlob": b"blob", "KeyId": ARN},
        {"KeyId": ARN, "Plaintext": b"k" * 32, "EncryptionContext": CTX, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
    )
    kms.stub.add_response(
        "decrypt",
        {"Plaintext": b"k" * 32, "KeyId": ARN},
        {"KeyId": ARN, "CiphertextBlob": b"blob", "EncryptionContext": CTX, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
    )
    wrapped = provider(kms).wrap(secret, context=CTX)
    assert wrapped == WrappedKey(key_ref=REF, algorithm=ALGORITHM, ciphertext=b"blob")
    assert provider(kms).unwrap(wrapped, context=CTX) == secret


def test_decrypt_answer_for_another_key_is_refused(kms) -> None:
    kms.stub.add_response("decrypt", {"Plaintext": b"k" * 32, "KeyId": OTHER})
    with pytest.raises(WrongKeyError):
        provider(kms).unwrap(WrappedKey(REF, ALGORITHM, b"blob"), context=CTX)


def test_wrapped_key_of_another_key_is_refused_without_a_call(kms) -> None:
    with pytest.raises(WrongKeyError, match="belongs to"):
        provider(kms).unwrap(WrappedKey(f"aws-kms://{OTHER}", ALGORITHM, b"blob"), context=CTX)
    with pytest.raises(WrongKeyError, match="not a KMS key ARN"):
        provider(kms).unwrap(WrappedKey("aws-kms://alias/x", ALGORITHM, b"blob"), context=CTX)


def test_alias_provider_unwraps_only_for_the_key_behind_the_alias(kms) -> None:
    alias = provider(kms, "aws-kms://alias/acme")
    kms.stub.add_response("describe_key", metadata(), {"KeyId": "alias/acme"})
    kms.stub.add_response("decrypt", {"Plaintext": b"k" * 32, "KeyId": ARN})
    assert alias.unwrap(WrappedKey(REF, ALGORITHM, b"blob"), context=CTX) == SecretBytes(b"k" * 32)
    # Another key: looked up again (the alias may have moved), still not it -> refused, no Decrypt.
    kms.stub.add_response("describe_key", metadata(), {"KeyId": "alias/acme"})
    with pytest.raises(WrongKeyError, match="points to"):
        alias.unwrap(WrappedKey(f"aws-kms://{OTHER}", ALGORITHM, b"blob"), context=CTX)


def test_invalid_state_on_unwrap_is_enriched_with_describe_key(kms) -> None:
    kms.stub.add_client_error("decrypt", "KMSInvalidStateException", "is pending deletion")
    kms.stub.add_response("describe_key", metadata(KeyState="PendingDeletion", Enabled=False))
    with pytest.raises(KeyUnavailableError) as info:
        provider(kms).unwrap(WrappedKey(REF, ALGORITHM, b"blob"), context=CTX)
    assert info.value.state == "pending_deletion"
    assert info.value.__context__ is None and info.value.__cause__ is None  # botocore frames not chained


# --- status ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,state",
    [
        ({}, KeyState.ENABLED),
        ({"KeyState": "Disabled", "Enabled": False}, KeyState.DISABLED),
        ({"KeyState": "PendingDeletion"}, KeyState.PENDING_DELETION),
        ({"KeyState": "PendingReplicaDeletion"}, KeyState.PENDING_DELETION),
        ({"KeyState": "PendingImport", "Origin": "EXTERNAL"}, KeyState.PENDING_IMPORT),
        ({"KeyState": "Unavailable"}, KeyState.DISABLED),
        (
            {"Origin": "EXTERNAL", "ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": NOW + timedelta(days=3)},
            KeyState.ENABLED,
        ),
        (
            {"Origin": "EXTERNAL", "ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": NOW - timedelta(seconds=1)},
            KeyState.MATERIAL_EXPIRED,
        ),
        (
            {
                "KeyState": "PendingImport",
                "Origin": "EXTERNAL",
                "ExpirationModel": "KEY_MATERIAL_EXPIRES",
                "ValidTo": NOW - timedelta(days=1),
            },
            KeyState.MATERIAL_EXPIRED,
        ),
    ],
)
def test_status_maps_key_metadata(kms, overrides, state) -> None:
    kms.stub.add_response("describe_key", metadata(**overrides), {"KeyId": ARN})
    status = provider(kms).status()
    assert status.state is state
    assert status.key_version == "m1" * 32
    assert status.expires_at == overrides.get("ValidTo")
    assert status.details["aws_key_state"] == overrides.get("KeyState", "Enabled")


@pytest.mark.parametrize(
    "code,state", [("NotFoundException", KeyState.NOT_FOUND), ("AccessDeniedException", KeyState.ACCESS_DENIED)]
)
def test_status_does_not_raise_for_missing_or_forbidden_keys(kms, code, state) -> None:
    kms.stub.add_client_error("describe_key", code)
    assert provider(kms).status().state is state


def test_status_raises_for_transport_trouble(kms) -> None:
    kms.stub.add_client_error("describe_key", "KMSInternalException", http_status_code=500)
    with pytest.raises(ServiceUnavailableError):
        provider(kms).status()


# --- preflight metadata ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,ref,problem",
    [
        ({"KeySpec": "RSA_2048"}, REF, "KeySpec is RSA_2048"),
        ({"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"}, REF, "KeyUsage is GENERATE_VERIFY_MAC"),
        ({"KeyUsage": "SIGN_VERIFY", "KeySpec": "ECC_NIST_P256"}, REF, "asymmetric or HMAC"),
        ({"KeyManager": "AWS"}, REF, "AWS managed key"),
        ({"MultiRegion": True, "MultiRegionConfiguration": {"MultiRegionKeyType": "REPLICA"}}, REF, "replica"),
        (
            {"Arn": ARN.replace("us-east-1", "eu-west-1")},
            REF.replace("us-east-1", "eu-west-1"),
            "client is for us-east-1",
        ),
        ({}, REF.replace("us-east-1", "eu-west-1"), "reference names eu-west-1"),
        ({}, REF.replace("111122223333", "444455556666"), "reference names 444455556666"),
    ],
)
def test_check_metadata_rejects_unsuitable_keys(kms, overrides, ref, problem) -> None:
    kms.stub.add_response("describe_key", metadata(**overrides))
    with pytest.raises(ConfigurationError) as info:
        provider(kms, ref).check_metadata()
    assert problem in str(info.value) and "SYMMETRIC_DEFAULT" in str(info.value)


def test_check_metadata_accepts_a_symmetric_customer_key(kms) -> None:
    kms.stub.add_response(
        "describe_key", metadata(MultiRegion=True, MultiRegionConfiguration={"MultiRegionKeyType": "PRIMARY"})
    )
    details = provider(kms).check_metadata()
    assert details["key_spec"] == "SYMMETRIC_DEFAULT" and details["multi_region_type"] == "PRIMARY"


# --- BYOK import errors ------------------------------------------------------------------


def params(expires: datetime = NOW + timedelta(hours=24)) -> ImportParameters:
    return ImportParameters(
        key_ref=REF,
        wrapping_algorithm="RSAES_OAEP_SHA_256",
        wrapping_key_spec="RSA_2048",
        public_key_pem="-",
        import_token=b"token",
        expires_at=expires,
    )


@pytest.mark.parametrize(
    "code,status,expected",
    [
        ("ExpiredImportTokenException", 400, KeyImportError),
        ("InvalidImportTokenException", 400, KeyImportError),
        ("InvalidCiphertextException", 400, KeyImportError),
        ("IncorrectKeyMaterialException", 400, KeyImportError),
        ("KMSInvalidStateException", 400, KeyImportError),
        ("NotFoundException", 400, KeyImportError),
        ("InternalError", 500, KeyImportError),
        ("ThrottlingException", 400, KeyThrottledError),
        ("AccessDeniedException", 400, KeyAccessDeniedError),
    ],
)
def test_import_failures_translate(kms, code, status, expected) -> None:
    upload = b"w" * 256
    kms.stub.add_client_error("import_key_material", code, "msg", http_status_code=status)
    importer = ByokImporter(kms, clock=lambda: NOW)
    with pytest.raises(expected) as info:
        importer.import_material(params(), upload, sha256_hex(upload))
    assert REF in str(info.value)
    if expected is KeyImportError:
        assert "stays pending import" in str(info.value)


def test_import_sends_expiry_and_never_an_import_type(kms) -> None:
    upload = b"w" * 256
    valid_to = NOW + timedelta(days=30)
    kms.stub.add_response(
        "import_key_material",
        {"KeyId": ARN, "KeyMaterialId": "m" * 64},
        {
            "KeyId": ARN,
            "ImportToken": b"token",
            "EncryptedKeyMaterial": upload,
            "ExpirationModel": "KEY_MATERIAL_EXPIRES",
            "ValidTo": valid_to,
        },
    )
    result = ByokImporter(kms, clock=lambda: NOW).import_material(
        params(), upload, sha256_hex(upload), valid_to=valid_to
    )
    assert result.valid_to == valid_to and result.key_material_id == "m" * 64


# --- logging hygiene ---------------------------------------------------------------------


def test_botocore_records_carrying_plaintext_are_redacted() -> None:
    redact = _RedactKmsPlaintext()
    body = logging.LogRecord(
        "botocore.parsers",
        logging.DEBUG,
        __file__,
        1,
        "Response body:\n%r",
        (b'{"KeyId":"k","Plaintext":"c2VjcmV0"}',),
        None,
    )
    assert redact.filter(body) and "c2VjcmV0" not in body.getMessage()
    other = logging.LogRecord(
        "botocore.parsers", logging.DEBUG, __file__, 1, "Response headers: %r", ({"x": "y"},), None
    )
    assert redact.filter(other) and other.getMessage() == "Response headers: {'x': 'y'}"
    assert any(isinstance(f, _RedactKmsPlaintext) for f in logging.getLogger("botocore.endpoint").filters)
