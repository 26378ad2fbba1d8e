"""Known-answer vectors for the primitives in ``archive_kms.crypto`` that the rest of the
library calls (the object envelope has its own vector suite): AES-256-GCM with AAD,
HKDF-SHA256, the AES-CTR keystream and RSA-OAEP-SHA-256. The values come from the
algorithms' specifications, so these tests fail if a wrapper passes a parameter wrongly
(salt, info, length, nonce, counter, padding)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from archive_kms.crypto import aes_gcm, rsa_oaep
from archive_kms.crypto.kdf import hkdf_sha256
from archive_kms.crypto.keystream import aes_ctr_keystream
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError, ValidationError

# The GCM specification (McGrew and Viega), test case 16: AES-256, 96-bit IV, with AAD.
GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
GCM_IV = bytes.fromhex("cafebabefacedbaddecaf888")
GCM_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_PLAINTEXT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_CIPHERTEXT = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
GCM_TAG = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")


def test_aes_gcm_known_answer():
    assert aes_gcm.seal(GCM_KEY, GCM_IV, GCM_PLAINTEXT, GCM_AAD) == GCM_CIPHERTEXT + GCM_TAG
    assert aes_gcm.unseal(GCM_KEY, GCM_IV, GCM_CIPHERTEXT + GCM_TAG, GCM_AAD) == GCM_PLAINTEXT


@pytest.mark.parametrize(
    "change",
    ["ciphertext", "tag", "aad", "nonce", "key", "truncated"],
)
def test_aes_gcm_refuses_anything_changed(change):
    key, nonce, sealed, aad = GCM_KEY, GCM_IV, bytearray(GCM_CIPHERTEXT + GCM_TAG), GCM_AAD
    if change == "ciphertext":
        sealed[0] ^= 1
    elif change == "tag":
        sealed[-1] ^= 1
    elif change == "aad":
        aad = aad + b"x"
    elif change == "nonce":
        nonce = bytes(12)
    elif change == "key":
        key = bytes(32)
    else:
        sealed = sealed[:-1]
    with pytest.raises(aes_gcm.TagMismatch) as err:
        aes_gcm.unseal(key, nonce, bytes(sealed), aad)
    assert isinstance(err.value, IntegrityError)


def test_aes_gcm_takes_only_256_bit_keys_and_96_bit_nonces():
    with pytest.raises(ValidationError, match="32-byte key"):
        aes_gcm.seal(bytes(16), GCM_IV, b"", b"")
    with pytest.raises(ValidationError, match="12-byte nonce"):
        aes_gcm.seal(GCM_KEY, bytes(16), b"", b"")


# RFC 5869, appendix A: test case 1 (salt and info) and test case 3 (no salt, no info).
HKDF_CASES = [
    (
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes.fromhex("0b" * 22),
        None,
        b"",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_CASES)
def test_hkdf_sha256_rfc5869(ikm, salt, info, length, okm):
    assert hkdf_sha256(ikm, info=info, salt=salt, length=length).hex() == okm


def test_hkdf_default_length_is_a_256_bit_key():
    assert len(hkdf_sha256(bytes(32), info=b"label")) == 32


def test_aes_ctr_keystream_nist_sp800_38a():
    """SP 800-38A F.5.5 (CTR-AES256.Encrypt): the keystream XOR the plaintext blocks is the
    ciphertext, across chunk boundaries that split blocks."""
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
    )
    ciphertext = bytes.fromhex(
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
    )
    chunks = list(aes_ctr_keystream(key, len(plaintext), chunk=7, initial_counter=counter))
    assert all(len(c) == 7 for c in chunks[:-1])
    stream = b"".join(chunks)
    assert bytes(a ^ b for a, b in zip(stream, plaintext, strict=True)) == ciphertext


def test_aes_ctr_keystream_sizes():
    assert b"".join(aes_ctr_keystream(bytes(32), 0)) == b""
    assert len(b"".join(aes_ctr_keystream(bytes(32), 100_001, chunk=4096))) == 100_001
    with pytest.raises(ValidationError):
        list(aes_ctr_keystream(bytes(16), 10))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(public) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_rsa_oaep_wrap_is_oaep_sha256_mgf1_sha256_without_label(rsa_key):
    material = SecretBytes(bytes(range(32)))
    wrapped = rsa_oaep.wrap(_pem(rsa_key.public_key()), material)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert rsa_key.decrypt(wrapped, oaep) == material.reveal()
    assert rsa_oaep.wrap(_pem(rsa_key.public_key()), material) != wrapped  # randomised padding


def test_rsa_oaep_refuses_keys_that_are_not_rsa():
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValidationError, match="RSA public key"):
        rsa_oaep.wrap(_pem(other), SecretBytes(bytes(32)))
    with pytest.raises(ValidationError, match="not a PEM public key"):
        rsa_oaep.wrap("not a key", SecretBytes(bytes(32)))


def test_spki_der_to_pem(rsa_key):
    public = rsa_key.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert rsa_oaep.spki_der_to_pem(der) == _pem(public)


# RFC 5649 section 6, the 20-octet example: the AES key wrap with padding CKM_RSA_AES_KEY_WRAP uses.
KWP_KEK = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
KWP_KEY = bytes.fromhex("c37b7e6492584340bed12207808941155068f738")
KWP_WRAPPED = bytes.fromhex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")


def test_rsa_aes_key_wrap_is_oaep_sha1_then_rfc5649(rsa_key):
    from cryptography.hazmat.primitives import keywrap

    from archive_kms.crypto import rsa_aes_key_wrap

    assert keywrap.aes_key_wrap_with_padding(KWP_KEK, KWP_KEY) == KWP_WRAPPED  # the primitive it calls
    target = bytes(range(256)) * 7  # any byte string; a PKCS#8 DER in use
    out = rsa_aes_key_wrap.wrap(_pem(rsa_key.public_key()), target)
    head = rsa_key.key_size // 8
    sha1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    aes_key = rsa_key.decrypt(out[:head], sha1)
    assert len(aes_key) == 32
    assert keywrap.aes_key_unwrap_with_padding(aes_key, out[head:]) == target
    assert len(out) == head + (len(target) + 7) // 8 * 8 + 8
    with pytest.raises(ValidationError, match="RSA public key"):
        rsa_aes_key_wrap.wrap(_pem(ec.generate_private_key(ec.SECP256R1()).public_key()), target)


def test_rsa_key_helpers_for_the_byok_file(rsa_key):
    from archive_kms.crypto import rsa_aes_key_wrap

    numbers = rsa_key.public_key().public_numbers()
    n, e = numbers.n.to_bytes(256, "big"), numbers.e.to_bytes(3, "big")
    assert rsa_aes_key_wrap.rsa_public_key_pem(n, e) == _pem(rsa_key.public_key())
    pkcs8 = rsa_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pkcs1_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    assert (
        rsa_aes_key_wrap.rsa_private_key_pkcs8_der(pkcs1_pem)
        == pkcs8
        == rsa_aes_key_wrap.rsa_private_key_pkcs8_der(pkcs8)
    )
    with pytest.raises(ValidationError, match="not an unencrypted RSA private key"):
        rsa_aes_key_wrap.rsa_private_key_pkcs8_der(b"nope")
