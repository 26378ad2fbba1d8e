"""The console's token key file (``api.auth.TokenKeys``), built on ``crypto.signing``:
written owner-only, read back as the same key, and a file holding anything else refused
with a message naming the file, never its contents."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from archive_kms.api.auth import TokenKeys
from archive_kms.errors import ConfigurationError


def test_key_file_round_trip(tmp_path):
    path = tmp_path / "keys" / "console-token.pem"
    written = TokenKeys.create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TokenKeys.from_pem_file(path).key_id == written.key_id
    with pytest.raises(FileExistsError):
        TokenKeys.create_key_file(path)  # never overwrites a key


def test_a_key_of_another_type_is_refused(tmp_path):
    path = tmp_path / "rsa.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ConfigurationError, match="must be an Ed25519 private key"):
        TokenKeys.from_pem_file(path)


def test_a_file_that_is_not_a_key_is_refused_without_its_contents(tmp_path):
    path = tmp_path / "notes.pem"
    path.write_bytes(b"s3cr3t-not-a-key")
    with pytest.raises(ConfigurationError, match="is not a PEM Ed25519 private key") as err:
        TokenKeys.from_pem_file(path)
    assert "s3cr3t" not in str(err.value)
