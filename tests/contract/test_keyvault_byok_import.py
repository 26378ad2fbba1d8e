"""Key Vault BYOK import (keys/azure_byok.py) against the Key Vault emulator: a key
exchange key is published, a good ``.byok`` file imports a working key, and every bad
upload (digest mismatch, a file for another KEK, one wrapped under another key, a corrupt
blob, a KEK without ``import``, an RSA-2048 target, expired parameters) is refused as a
``KeyImportError`` with nothing half-made: no imported key left behind, the KEK still
there for the next try. Checks that need no vault run before any vault call (counted).
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import KeyImportError, KeyNotFoundError, ValidationError
from archive_kms.keys.azure_byok import KEK_VALIDITY, KeyVaultByokImporter, customer_transfer_blob
from archive_kms.keys.azure_key_vault import AzureKeyVaultKeyProvider
from archive_kms.keys.byok import sha256_hex
from archive_kms.keys.port import KeyState
from archive_kms.keys.refs import parse_key_ref

CTX = {"tenant": "acme"}


def rsa_private_key_der(bits: int) -> bytes:
    """A new RSA private key as PKCS#8 DER (what the customer's HSM exports under a KEK)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CountingClient:
    """A KeyClient proxy that records the names of the methods called on it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if callable(attr):
            self.calls.append(name)
        return attr


@pytest.fixture
def key_client(keyvault):
    return clients.keyvault_key_client(keyvault)


@pytest.fixture
def counting(key_client) -> CountingClient:
    return CountingClient(key_client)


@pytest.fixture
def importer(counting, keyvault) -> KeyVaultByokImporter:
    return KeyVaultByokImporter(counting, keyvault.azure_keyvault_url)


@pytest.fixture(scope="module")
def target_der() -> bytes:
    return rsa_private_key_der(3072)


@pytest.fixture
def params(importer, key_client):
    made = importer.create_import_parameters(wrapping_key_spec="RSA_2048", tags={"purpose": "contract-test"})
    yield made
    for ref in (made.key_ref, made.kek_ref):
        name = parse_key_ref(ref).name
        try:
            key_client.begin_delete_key(name).wait()
            key_client.purge_deleted_key(name)
        except ResourceNotFoundError:
            pass


def _name(ref: str) -> str:
    return parse_key_ref(ref).name


def _exists(key_client, ref: str) -> bool:
    try:
        key_client.get_key(_name(ref))
        return True
    except ResourceNotFoundError:
        return False


def _assert_nothing_imported(key_client, params) -> None:
    assert not _exists(key_client, params.key_ref), "a refused import left a key behind"
    assert _exists(key_client, params.kek_ref), "a refused import lost the key exchange key"


def _blob(params, der: bytes, **changes: Any) -> bytes:
    doc = json.loads(customer_transfer_blob(params.public_key_pem, params.kek_kid, der))
    for path, value in changes.items():
        where = doc["header"] if path in ("kid", "alg", "enc") else doc
        where[path] = value
    return json.dumps(doc).encode()


def test_the_key_exchange_key_is_published_and_can_only_import(params, key_client, keyvault) -> None:
    kek = key_client.get_key(_name(params.kek_ref))
    assert kek.key_type == "RSA-HSM" and [str(op) for op in kek.key_operations] == ["import"]
    assert kek.id == params.kek_kid
    public = load_pem_public_key(params.public_key_pem.encode())
    assert public.key_size == 2048 and public.public_numbers().n == int.from_bytes(kek.key.n, "big")
    assert kek.properties.expires_on == params.expires_at
    assert timedelta(hours=23) < params.expires_at - kek.properties.created_on <= KEK_VALIDITY
    assert not _exists(key_client, params.key_ref)  # the import creates it
    # a KEK cannot wrap (key_ops is import only)
    with pytest.raises(HttpResponseError) as refused:
        clients.keyvault_crypto_client(kek.id, keyvault).wrap_key("RSA-OAEP-256", b"k" * 32)
    assert refused.value.status_code == 403


def test_a_good_byok_file_imports_a_working_key(importer, params, key_client, keyvault, target_der) -> None:
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    result = importer.import_blob(params, blob, sha256_hex(blob).upper())  # hex case is free

    assert result.key_ref == params.key_ref and result.key_size == 3072 and result.byok_sha256 == sha256_hex(blob)
    provider = AzureKeyVaultKeyProvider.from_settings(parse_key_ref(params.key_ref), keyvault)
    status = provider.status()
    assert status.state is KeyState.ENABLED and status.key_version == result.key_version
    assert provider.check_metadata()["kty"] == "RSA-HSM"
    assert set(provider.check_metadata()["key_ops"].split(",")) == {"wrapKey", "unwrapKey"}
    secret = SecretBytes.random(32)
    assert provider.unwrap(provider.wrap(secret, context=CTX), context=CTX) == secret
    # the imported key is the customer's: its public half is the one they sent
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    n = load_der_private_key(target_der, password=None).private_numbers().public_numbers.n
    assert int.from_bytes(key_client.get_key(_name(params.key_ref)).key.n, "big") == n
    assert not _exists(key_client, params.kek_ref)  # the KEK is single-use


def test_a_digest_mismatch_is_refused_before_any_vault_call(importer, counting, params, key_client, target_der):
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    stated = sha256_hex(blob + b" ")  # the customer hashed another file
    counting.calls.clear()
    with pytest.raises(KeyImportError) as info:
        importer.import_blob(params, blob, stated)
    assert counting.calls == []
    assert stated in str(info.value) and sha256_hex(blob) in str(info.value) and params.key_ref in str(info.value)
    _assert_nothing_imported(key_client, params)


@pytest.mark.parametrize("digest", ["", "abc", "g" * 64, "sha256:" + "0" * 64])
def test_a_malformed_digest_is_a_validation_error(importer, counting, params, digest: str) -> None:
    counting.calls.clear()
    with pytest.raises(ValidationError, match="64 hex digits"):
        importer.import_blob(params, b"{}", digest)
    assert counting.calls == []


@pytest.mark.parametrize(
    "how,refused_by",
    [
        ("not-json", "us"),
        ("wrong-schema", "us"),
        ("wrong-enc", "us"),
        ("other-kek-kid", "us"),
        ("truncated-ciphertext", "us"),
        ("ciphertext-with-a-trailing-newline", "us"),
        ("flipped-wrapped-key-byte", "vault"),
        ("flipped-rsa-block-byte", "vault"),
        ("wrapped-under-another-kek", "vault"),
        ("not-a-private-key", "vault"),
    ],
)
def test_a_bad_byok_file_is_refused_and_nothing_is_imported(
    importer, counting, params, key_client, target_der, how: str, refused_by: str
) -> None:
    if how == "not-json":
        blob = b"\x00not a byok file"
    elif how == "wrong-schema":
        blob = _blob(params, target_der, schema_version="2.0.0")
    elif how == "wrong-enc":
        blob = _blob(params, target_der, enc="RSA-OAEP-256")
    elif how == "other-kek-kid":
        blob = _blob(params, target_der, kid=params.kek_kid.rsplit("/", 1)[0] + "/" + "0" * 32)
    elif how == "truncated-ciphertext":
        doc = json.loads(_blob(params, target_der))
        doc["ciphertext"] = doc["ciphertext"][:300]
        blob = json.dumps(doc).encode()
    elif how == "ciphertext-with-a-trailing-newline":  # "$" matches before a final newline; the check must not
        doc = json.loads(_blob(params, target_der))
        doc["ciphertext"] += "\n"
        blob = json.dumps(doc).encode()
    elif how in ("flipped-wrapped-key-byte", "flipped-rsa-block-byte"):
        doc = json.loads(_blob(params, target_der))
        raw = bytearray(base64.urlsafe_b64decode(doc["ciphertext"] + "=" * (-len(doc["ciphertext"]) % 4)))
        raw[-5 if how == "flipped-wrapped-key-byte" else 10] ^= 1
        doc["ciphertext"] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        blob = json.dumps(doc).encode()
    elif how == "wrapped-under-another-kek":  # right header, wrong public key
        other = importer.create_import_parameters(wrapping_key_spec="RSA_2048")
        try:
            blob = customer_transfer_blob(other.public_key_pem, params.kek_kid, target_der)
        finally:
            importer.discard(other)
    else:  # the customer wrapped random bytes, not a PKCS#8 key
        blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, b"\x01" * 64)
    counting.calls.clear()
    with pytest.raises(KeyImportError) as info:
        importer.import_blob(params, blob, sha256_hex(blob))
    assert params.key_ref in str(info.value)
    if refused_by == "us":
        assert counting.calls == [], "a malformed file reached the vault"
    else:
        assert counting.calls == ["get_key", "import_key"] and "Key Vault refused" in str(info.value)
    _assert_nothing_imported(key_client, params)


def test_a_kek_without_import_is_refused_by_the_vault(importer, params, key_client, target_der) -> None:
    """A .byok file made for a key that may not import (an ordinary wrap key) is refused."""
    plain = key_client.create_rsa_key(
        _name(params.kek_ref) + "-plain", size=2048, hardware_protected=True, key_operations=["wrapKey", "unwrapKey"]
    )
    try:
        numbers = plain.key
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        pem = (
            rsa.RSAPublicNumbers(int.from_bytes(numbers.e, "big"), int.from_bytes(numbers.n, "big"))
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        forged = replace(params, kek_kid=plain.id, public_key_pem=pem)
        blob = customer_transfer_blob(pem, plain.id, target_der)
        with pytest.raises(KeyImportError, match="import is not permitted"):
            importer.import_blob(forged, blob, sha256_hex(blob))
        assert not _exists(key_client, params.key_ref)
    finally:
        key_client.begin_delete_key(plain.name).wait()
        key_client.purge_deleted_key(plain.name)


def test_a_kek_must_be_rsa_hsm_with_import_only(key_client, params) -> None:
    name = _name(params.kek_ref) + "-bad"
    for kwargs in (
        {"hardware_protected": True, "key_operations": ["import", "wrapKey"]},
        {"hardware_protected": False, "key_operations": ["import"]},
    ):
        with pytest.raises(HttpResponseError) as refused:
            key_client.create_rsa_key(name, size=2048, **kwargs)
        assert refused.value.status_code == 400 and "key exchange key" in str(refused.value)
    with pytest.raises(HttpResponseError) as fixed:  # a KEK's operations are fixed
        key_client.update_key_properties(_name(params.kek_ref), key_operations=["import", "unwrapKey"])
    assert fixed.value.status_code == 400 and "fixed" in str(fixed.value)


def test_an_rsa_2048_target_is_refused_and_removed(importer, params, key_client) -> None:
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, rsa_private_key_der(2048))
    with pytest.raises(KeyImportError, match="RSA-2048; at least RSA-3072"):
        importer.import_blob(params, blob, sha256_hex(blob))
    assert not _exists(key_client, params.key_ref)


def test_expired_parameters_are_refused_before_any_vault_call(counting, keyvault, params, key_client, target_der):
    later = KeyVaultByokImporter(counting, keyvault.azure_keyvault_url, clock=lambda: params.expires_at)
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    counting.calls.clear()
    with pytest.raises(KeyImportError, match="expired"):
        later.import_blob(params, blob, sha256_hex(blob))
    assert counting.calls == []
    _assert_nothing_imported(key_client, params)


def test_retire_soft_deletes_the_imported_key_once(importer, params, key_client, keyvault, target_der) -> None:
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    importer.import_blob(params, blob, sha256_hex(blob))
    provider = AzureKeyVaultKeyProvider.from_settings(parse_key_ref(params.key_ref), keyvault)
    wrapped = provider.wrap(SecretBytes.random(32), context=CTX)

    importer.retire(params.key_ref)
    importer.retire(params.key_ref)  # a rerun finds it deleted already

    assert provider.status().state is KeyState.NOT_FOUND
    assert key_client.get_deleted_key(_name(params.key_ref)).name == _name(params.key_ref)  # recoverable
    with pytest.raises(KeyNotFoundError):  # deleted: nothing unwraps under it any more
        provider.unwrap(wrapped, context=CTX)


def test_keys_outside_the_platform_vault_are_refused(importer) -> None:
    with pytest.raises(ValidationError, match="platform's vault"):
        importer.retire("azure-kv://customer.vault.azure.net/keys/theirs")


def test_the_documented_python_example_makes_a_file_that_imports(importer, params, key_client, tmp_path) -> None:
    """docs/key-lifecycle.md section 13 gives customers a Python example: run it as written."""
    import re
    import subprocess

    doc = (Path(__file__).resolve().parents[2] / "docs" / "key-lifecycle.md").read_text()
    code = re.search(r"A minimal customer-side implementation.*?```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "wrapping-key.pem").write_text(params.public_key_pem)
    (tmp_path / "kek-kid.txt").write_text(params.kek_kid + "\n")
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    result = importer.import_blob(params, (tmp_path / "KEY.byok").read_bytes(), printed)
    assert result.key_size == 3072 and _exists(key_client, params.key_ref)


def test_a_repeated_upload_of_the_imported_file_is_recognised(importer, params, key_client, target_der) -> None:
    """The caller crashed after the import: the same file again finds the key (no second
    version); another file for the same key is refused."""
    blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    first = importer.import_blob(params, blob, sha256_hex(blob))
    again = importer.import_blob(params, blob, sha256_hex(blob))
    assert again == first
    assert len(list(key_client.list_properties_of_key_versions(_name(params.key_ref)))) == 1
    other = customer_transfer_blob(params.public_key_pem, params.kek_kid, target_der)
    with pytest.raises(KeyImportError, match="exists already, imported from another file"):
        importer.import_blob(params, other, sha256_hex(other))
