"""Cryptographic core, and the only package that calls cryptographic primitives
(``cryptography.hazmat``; docs/adr/0008-layers.md):

* ``envelope``: the object format (streaming AES-256-GCM, per-object HKDF key);
* ``secrets``: ``SecretBytes``, the one type that holds raw key material;
* ``aes_gcm``: AES-256-GCM with associated data for small sealed values;
* ``kdf``: HKDF-SHA256;
* ``signing``: the platform signing key (``Signer``/``Verifier``): Ed25519 locally, or
  ECDSA P-256 through a ``RemoteSigningKey`` (KMS / Key Vault adapters in ``keys/``);
* ``rsa_oaep``: RSA-OAEP-SHA-256, the BYOK import wrap;
* ``rsa_aes_key_wrap``: CKM_RSA_AES_KEY_WRAP, the Key Vault BYOK (``.byok``) wrap;
* ``keystream``: the deterministic AES-CTR keystream of synthetic data.

No network I/O and no Prefect; the only files touched are the file-like objects passed in
and the signing key's PEM file. Raw key bytes are only reachable through
``SecretBytes.reveal()``.
"""

from archive_kms.crypto.envelope import (
    DecryptResult,
    EncryptResult,
    EnvelopeHeader,
    ObjectBinding,
    ciphertext_size,
    decrypt_iter,
    decrypt_stream,
    decrypt_to_bytes,
    encrypt_bytes,
    encrypt_iter,
    encrypt_stream,
    read_header,
)
from archive_kms.crypto.secrets import SecretBytes

__all__ = [
    "DecryptResult",
    "EncryptResult",
    "EnvelopeHeader",
    "ObjectBinding",
    "SecretBytes",
    "ciphertext_size",
    "decrypt_iter",
    "decrypt_stream",
    "decrypt_to_bytes",
    "encrypt_bytes",
    "encrypt_iter",
    "encrypt_stream",
    "read_header",
]
