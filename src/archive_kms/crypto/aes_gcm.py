"""AES-256-GCM with associated data, one call per sealed value.

The AEAD for small sealed values outside the object envelope: the in-memory KMS's wrapped
keys and the search index's display fields. ``seal`` returns ``ciphertext || tag`` (16-byte
tag); the caller chooses the nonce (a fresh random 96-bit one per key use: each format
says how it draws and stores it) and the associated data that binds the value to its
context. ``unseal`` raises :class:`TagMismatch` for anything that does not authenticate
and returns nothing else, so callers translate it into the error their format names.

The streaming object envelope (``crypto/envelope.py``) keeps its own per-segment AEAD.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive_kms.errors import IntegrityError, ValidationError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "TagMismatch", "seal", "unseal"]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


class TagMismatch(IntegrityError):
    """The ciphertext, tag, nonce or associated data is not what was sealed (or the key is
    wrong). Carries no detail: GCM cannot tell which."""


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValidationError(f"AES-256-GCM needs a {KEY_SIZE}-byte key, got {len(key)} bytes")
    if len(nonce) != NONCE_SIZE:
        raise ValidationError(f"AES-256-GCM needs a {NONCE_SIZE}-byte nonce, got {len(nonce)} bytes")


def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``ciphertext || tag`` of ``plaintext`` under ``key`` and ``nonce``, authenticating ``aad``."""
    _check(key, nonce)
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ``sealed`` (``ciphertext || tag``); :class:`TagMismatch` if it does
    not authenticate under ``key``, ``nonce`` and ``aad``."""
    _check(key, nonce)
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise TagMismatch("AES-256-GCM authentication failed") from None
