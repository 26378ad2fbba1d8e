"""RSA-OAEP with SHA-256 (MGF1-SHA-256, no label): the wrap BYOK key material travels in.

AWS KMS ``ImportKeyMaterial`` with ``RSAES_OAEP_SHA_256`` expects exactly this: the
customer encrypts their raw key material to the import public key KMS handed out
(``keys/byok.py`` documents the procedure; ``wrap`` is the customer's side of it, used by
tests, the demo and the docs).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError

__all__ = ["spki_der_to_pem", "wrap"]


def wrap(public_key_pem: str, material: SecretBytes) -> bytes:
    """``material`` encrypted to an RSA public key (SubjectPublicKeyInfo PEM) with OAEP-SHA-256."""
    try:
        public = serialization.load_pem_public_key(public_key_pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ValidationError("the wrapping key is not a PEM public key") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValidationError("the wrapping key must be an RSA public key")
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return public.encrypt(material.reveal(), oaep)


def spki_der_to_pem(der: bytes) -> str:
    """A DER SubjectPublicKeyInfo (what KMS returns) as PEM text."""
    public = serialization.load_der_public_key(der)
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )
