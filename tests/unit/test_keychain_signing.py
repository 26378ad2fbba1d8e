"""The platform signing key: load/generate, key ids, purpose separation, rotation, hygiene."""

from __future__ import annotations

import os
import pickle
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from archive_kms.config import Settings
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import ConfigurationError, IntegrityError, ValidationError


def test_sign_and_verify_with_purpose_separation() -> None:
    signer = Signer.generate()
    sig = signer.sign(b"message", purpose="keychain-record/v1")
    verifier = signer.verifier()
    verifier.verify(b"message", sig, key_id=signer.key_id, purpose="keychain-record/v1")
    with pytest.raises(IntegrityError):  # same bytes, another kind of document
        verifier.verify(b"message", sig, key_id=signer.key_id, purpose="erasure-record/v1")
    with pytest.raises(IntegrityError):
        verifier.verify(b"messagE", sig, key_id=signer.key_id, purpose="keychain-record/v1")
    with pytest.raises(IntegrityError):
        verifier.verify(b"message", sig[:-1], key_id=signer.key_id, purpose="keychain-record/v1")
    with pytest.raises(IntegrityError):
        verifier.verify(b"message", sig, key_id="ed25519:0000000000000000", purpose="keychain-record/v1")
    with pytest.raises(ValidationError):
        signer.sign(b"m", purpose="two\nlines")


def test_verifier_accepts_old_and_new_keys_during_rotation() -> None:
    old, new = Signer.generate(), Signer.generate()
    both = Verifier.from_public_pem(old.public_key_pem(), new.public_key_pem())
    assert set(both.key_ids) == {old.key_id, new.key_id}
    for s in (old, new):
        both.verify(b"m", s.sign(b"m", purpose="p"), key_id=s.key_id, purpose="p")
    with pytest.raises(IntegrityError):
        new.verifier().verify(b"m", old.sign(b"m", purpose="p"), key_id=old.key_id, purpose="p")


def test_key_file_round_trip_is_owner_only_and_never_overwritten(tmp_path) -> None:
    path = tmp_path / "signing.pem"
    created = Signer.create_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Signer.from_pem_file(path)
    assert loaded.key_id == created.key_id
    created.verifier().verify(b"m", loaded.sign(b"m", purpose="p"), key_id=loaded.key_id, purpose="p")
    with pytest.raises(ConfigurationError):
        Signer.create_key_file(path)


def test_load_errors_name_the_path_not_the_contents(tmp_path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError) as info:
        Signer.from_pem_file(missing)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"SECRET-LOOKING-CONTENT")
    with pytest.raises(ConfigurationError) as info:
        Signer.from_pem_file(garbage)
    assert "SECRET-LOOKING-CONTENT" not in str(info.value)

    from cryptography.hazmat.primitives.asymmetric import ec

    wrong = tmp_path / "ec.pem"
    wrong.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigurationError):
        Signer.from_pem_file(wrong)


def test_from_settings_needs_the_path_setting() -> None:
    with pytest.raises(ConfigurationError) as info:
        Signer.from_settings(Settings())
    assert "keychain_signing_key_path" in str(info.value)


def test_private_key_never_shown_or_pickled() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    signer = Signer(key)
    for text in (repr(signer), str(signer), repr(signer.verifier())):
        assert raw.hex() not in text and signer.key_id in text
    with pytest.raises(TypeError):
        pickle.dumps(signer)
    assert not any(name for name in dir(signer) if "private" in name and not name.startswith("_"))
