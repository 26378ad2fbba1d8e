"""The two signature algorithms of the platform signing key (ADR 0040): key ids, the r || s
byte format with low s, and the algorithm always taken from the trusted key the key id
selects (a signature can never be checked the other way). The remote key here is a local
P-256 key behind the ``RemoteSigningKey`` port; the real services run the same checks in
tests/contract/test_signer_contract.py."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from archive_kms.crypto.signing import (
    Signer,
    Verifier,
    ecdsa_p256_public_key_from_xy,
    ecdsa_raw_from_der,
    key_id_of,
    signing_public_key_from_der,
)
from archive_kms.errors import ConfigurationError, IntegrityError, KeyUnavailableError, ValidationError

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class LocalP256:
    """A P-256 key behind the remote-key port; ``high_s`` answers the high-s twin."""

    key_ref = "aws-kms://alias/test-signing"

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None, *, high_s: bool = False) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.high_s = high_s
        self.calls = 0
        self.fail: Exception | None = None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        r, s = decode_dss_signature(self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        if self.high_s == (s <= N // 2):
            s = N - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _spki(pk) -> bytes:
    return pk.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem(pk) -> bytes:
    return pk.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_key_ids_name_the_algorithm() -> None:
    ed = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    raw = ed.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id_of(ed) == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    p256 = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1()).public_key()
    assert key_id_of(p256) == "ecdsa-p256:" + hashlib.sha256(_spki(p256)).hexdigest()[:16]
    for other in (
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa.generate_private_key(65537, 2048).public_key(),
    ):
        with pytest.raises(ValidationError, match="Ed25519 or an ECDSA P-256"):
            key_id_of(other)  # type: ignore[arg-type]


def test_a_remote_signature_is_r_s_low_s_and_verifies_as_ecdsa_sha256_over_the_framed_message() -> None:
    remote = LocalP256(high_s=True)  # the service answers high s: we normalise
    signer = Signer.remote(remote)
    assert signer.algorithm == "ecdsa-p256" and signer.key_ref == remote.key_ref
    sig = signer.sign(b"hello", purpose="audit-head/v1")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    assert len(sig) == 64 and 0 < r < N and 0 < s <= N // 2
    # What a second implementation does: ECDSA P-256 / SHA-256 over the framed message.
    framed = b"archive_kms/audit-head/v1\nhello"
    remote.key.public_key().verify(encode_dss_signature(r, s), framed, ec.ECDSA(hashes.SHA256()))
    signer.verifier().verify(b"hello", sig, key_id=signer.key_id, purpose="audit-head/v1")
    # The high-s twin is as valid to ECDSA, but refused: one signature per message.
    twin = r.to_bytes(32, "big") + (N - s).to_bytes(32, "big")
    remote.key.public_key().verify(encode_dss_signature(r, N - s), framed, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(IntegrityError, match="does not verify"):
        signer.verifier().verify(b"hello", twin, key_id=signer.key_id, purpose="audit-head/v1")
    for bad in (bytes(64), b"\x00" * 32 + sig[32:], N.to_bytes(32, "big") + sig[32:]):
        with pytest.raises(IntegrityError):
            signer.verifier().verify(b"hello", bad, key_id=signer.key_id, purpose="audit-head/v1")


def test_the_algorithm_comes_from_the_trusted_key_never_from_the_document() -> None:
    ed = Signer.generate()
    p256 = Signer.remote(LocalP256())
    both = Verifier.from_public_pem(ed.public_key_pem() + p256.public_key_pem())
    ed_sig, ec_sig = ed.sign(b"m", purpose="p"), p256.sign(b"m", purpose="p")
    both.verify(b"m", ed_sig, key_id=ed.key_id, purpose="p")
    both.verify(b"m", ec_sig, key_id=p256.key_id, purpose="p")
    # Each signature presented under the other key's id (and so the other algorithm): refused.
    with pytest.raises(IntegrityError, match="does not verify"):
        both.verify(b"m", ed_sig, key_id=p256.key_id, purpose="p")
    with pytest.raises(IntegrityError, match="does not verify"):
        both.verify(b"m", ec_sig, key_id=ed.key_id, purpose="p")
    # A key id that names the other algorithm over the same fingerprint selects no key.
    with pytest.raises(IntegrityError, match="unknown key"):
        both.verify(b"m", ec_sig, key_id="ed25519:" + p256.key_id.split(":")[1], purpose="p")


def test_only_p256_and_ed25519_keys_are_accepted() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())

    class WrongCurve(LocalP256):
        def public_key(self):  # type: ignore[override]
            return p384.public_key()

    with pytest.raises(ConfigurationError, match="is not an ECDSA P-256 key"):
        Signer.remote(WrongCurve())
    with pytest.raises(ValidationError, match="Ed25519 or ECDSA P-256"):
        Verifier.from_public_pem(_pem(p384.public_key()))
    with pytest.raises(ValidationError, match="previous signing key must be an Ed25519 or ECDSA P-256"):
        Signer.generate().with_previous(_pem(rsa.generate_private_key(65537, 2048).public_key()))
    with pytest.raises(ValidationError):
        signing_public_key_from_der(_spki(p384.public_key()))
    with pytest.raises(ValidationError, match="32-byte"):
        ecdsa_p256_public_key_from_xy(b"\x01" * 31, b"\x02" * 32)
    with pytest.raises(ValidationError, match="not a point"):
        ecdsa_p256_public_key_from_xy(b"\x01" * 32, b"\x02" * 32)


def test_der_signatures_from_kms_become_r_s() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(b"x").digest()
    der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    raw = ecdsa_raw_from_der(der)
    r, s = decode_dss_signature(der)
    assert int.from_bytes(raw[:32], "big") == r and int.from_bytes(raw[32:], "big") in (s, N - s)
    with pytest.raises(IntegrityError, match="malformed"):
        ecdsa_raw_from_der(b"\x30\x02\x01")
    with pytest.raises(IntegrityError, match="out of range"):
        ecdsa_raw_from_der(encode_dss_signature(N, 1))


def test_a_rotation_may_cross_algorithms() -> None:
    old = Signer.generate()
    new = Signer.remote(LocalP256()).with_previous(old.public_key_pem())
    assert set(new.verifier().key_ids) == {old.key_id, new.key_id}
    # what the console publishes as "the" public key: the one that signs now
    assert new.verifier().primary_key_id == new.key_id and old.verifier().primary_key_id == old.key_id
    new.verifier().verify(b"r", old.sign(b"r", purpose="p"), key_id=old.key_id, purpose="p")
    back = Signer.generate().with_previous(new.public_key_pem())  # and back to a PEM key
    back.verifier().verify(b"r", new.sign(b"r", purpose="p"), key_id=new.key_id, purpose="p")


def test_a_remote_key_that_fails_or_answers_garbage_signs_nothing() -> None:
    remote = LocalP256()
    signer = Signer.remote(remote)
    remote.fail = KeyUnavailableError("KMS Sign for aws-kms://alias/test-signing: the key is disabled")
    with pytest.raises(KeyUnavailableError, match="disabled"):
        signer.sign(b"m", purpose="p")

    class Short(LocalP256):
        def sign_digest(self, digest: bytes) -> bytes:
            return super().sign_digest(digest)[:63]

    with pytest.raises(IntegrityError, match="not 64 bytes"):
        Signer.remote(Short()).sign(b"m", purpose="p")
    other = LocalP256()

    class Swapped(LocalP256):
        def sign_digest(self, digest: bytes) -> bytes:
            return other.sign_digest(digest)

    with pytest.raises(IntegrityError, match="pinned at start"):
        Signer.remote(Swapped()).sign(b"m", purpose="p")
