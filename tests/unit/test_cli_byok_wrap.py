"""`archive-kms byok wrap`, the customer's side of Key Vault BYOK: the .byok file it writes
opens with the key exchange key's private half to exactly the given key, and bad input is a
one-line error with exit code 2 that writes nothing."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.keys.byok import sha256_hex

KID = "https://vault.example.net/keys/byok-0123-kek/" + "a" * 32


@pytest.fixture(scope="module")
def kek() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def files(tmp_path, kek):
    target = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "new.pem").write_bytes(
        target.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    (tmp_path / "wrapping-key.pem").write_bytes(
        kek.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return tmp_path, target


def wrap(tmp_path, *extra: str, key: str = "new.pem", out: str = "KEY.byok", kid: str = KID):
    args = ["byok", "wrap", "--key", str(tmp_path / key), "--kek", str(tmp_path / "wrapping-key.pem")]
    return CliRunner().invoke(cli.app, [*args, "--kek-kid", kid, "--out", str(tmp_path / out), *extra])


def test_the_byok_file_opens_to_the_given_key(files, kek) -> None:
    tmp_path, target = files
    result = wrap(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    blob = (tmp_path / "KEY.byok").read_bytes()
    assert json.loads(result.output)["sha256"] == sha256_hex(blob)
    doc = json.loads(blob)
    assert doc["schema_version"] == "1.0.0"
    assert doc["header"] == {"kid": KID, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"}
    raw = base64.urlsafe_b64decode(doc["ciphertext"] + "=" * (-len(doc["ciphertext"]) % 4))
    sha1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    aes_key = kek.decrypt(raw[:256], sha1)
    pkcs8 = keywrap.aes_key_unwrap_with_padding(aes_key, raw[256:])
    assert pkcs8 == target.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert target.private_numbers().d.to_bytes(256, "big").hex() not in result.output


@pytest.mark.parametrize("case", ["missing-key", "not-rsa", "not-a-key", "bad-kid", "out-exists"])
def test_bad_input_is_one_line_and_writes_nothing(files, case: str) -> None:
    tmp_path, _ = files
    key, kid, out = "new.pem", KID, "KEY.byok"
    if case == "missing-key":
        key = "absent.pem"
    elif case == "not-rsa":
        (tmp_path / "ec.pem").write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key = "ec.pem"
    elif case == "not-a-key":
        (tmp_path / "junk.pem").write_text("hello")
        key = "junk.pem"
    elif case == "bad-kid":
        kid = "byok-0123-kek"
    else:
        (tmp_path / "KEY.byok").write_text("keep me")
    result = wrap(tmp_path, key=key, kid=kid, out=out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    if case == "out-exists":
        assert (tmp_path / "KEY.byok").read_text() == "keep me"
    else:
        assert not (tmp_path / "KEY.byok").exists()
