"""Cryptographic core: the object envelope (streaming AEAD) and the key-material type.

Pure code: no I/O beyond the file-like objects passed in, no Prefect. Raw key bytes are only
reachable through ``SecretBytes.reveal()`` (``crypto/secrets.py``).
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
