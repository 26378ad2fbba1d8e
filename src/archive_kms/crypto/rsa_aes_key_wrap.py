"""CKM_RSA_AES_KEY_WRAP as Azure Key Vault's BYOK specification uses it: the wrap a
customer's RSA key travels in to Key Vault (the ``ciphertext`` of a ``.byok`` file).

``wrap(kek_public_pem, target_pkcs8_der)`` = ``A || B``: ``A`` is RSA-OAEP with **SHA-1**
and MGF1-SHA-1, no label (as Key Vault specifies), of a fresh 32-byte AES key under the
key exchange key, exactly the modulus length; ``B`` is AES key wrap with padding (RFC 5649)
of the target key's PKCS#8 DER under that AES key. The vault does the unwrap; ``wrap`` is
the customer's side (tests, the demo, ``archive-kms byok wrap``; ``keys/azure_byok.py``
and docs/key-lifecycle.md section 13 document the procedure).
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from archive_kms.errors import ValidationError

__all__ = ["rsa_private_key_pkcs8_der", "rsa_public_key_pem", "wrap"]


def wrap(kek_public_pem: str, target_pkcs8_der: bytes) -> bytes:
    """The CKM_RSA_AES_KEY_WRAP ciphertext of ``target_pkcs8_der`` for the RSA key exchange key."""
    try:
        kek = serialization.load_pem_public_key(kek_public_pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ValidationError("the key exchange key is not a PEM public key") from None
    if not isinstance(kek, rsa.RSAPublicKey):
        raise ValidationError("the key exchange key must be an RSA public key")
    aes_key = secrets.token_bytes(32)
    oaep_sha1 = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return kek.encrypt(aes_key, oaep_sha1) + keywrap.aes_key_wrap_with_padding(aes_key, target_pkcs8_der)


def rsa_public_key_pem(n: bytes, e: bytes) -> str:
    """An RSA public key given as big-endian modulus and exponent (a JWK's ``n``, ``e``) as
    SubjectPublicKeyInfo PEM."""
    numbers = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big"))
    return (
        numbers.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def rsa_private_key_pkcs8_der(data: bytes) -> bytes:
    """An unencrypted RSA private key (PEM or DER, PKCS#8 or PKCS#1) as PKCS#8 DER."""
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValidationError("not an unencrypted RSA private key (PEM or DER)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValidationError("not an RSA private key")
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
