"""The keychain's two primitives on key bytes (no I/O, no key store): wrapping an L3 or
L4 key under its parent, and deriving the tenant's search material from its L2 key.

Wrap format (``docs/key-hierarchy.md`` section 1, byte for byte)::

    wrapped = nonce(12) || AES-256-GCM(parent, key, AAD)              60 bytes for a 32-byte key
    AAD     = "archive_kms/v1/keychain-wrap"
              || for each of (tenant, level, workspace, record id, generation,
                              parent id, parent generation):
                     u32 big-endian length || UTF-8 bytes

so a wrapped key opens only as itself, under its own parent, for its own tenant. The
keychain (``keys.keychain.wrapping``) builds the AAD fields from the key record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError, WrongKeyError

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "WRAPPED_KEY_SIZE",
    "WRAP_ALGORITHM",
    "derive_search_material",
    "open_key",
    "seal_key",
    "wrap_aad",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
WRAPPED_KEY_SIZE = NONCE_SIZE + KEY_SIZE + TAG_SIZE
WRAP_ALGORITHM = "A256GCM"  # the name the key records carry

_WRAP_LABEL = b"archive_kms/v1/keychain-wrap"
_U32 = struct.Struct(">I")
_SEARCH_LABEL = b"archive_kms/v1/search-material/"


def wrap_aad(fields: Sequence[str]) -> bytes:
    """The wrap label followed by each field, u32-length-prefixed (UTF-8)."""
    out = [_WRAP_LABEL]
    for field in fields:
        b = field.encode("utf-8")
        out += [_U32.pack(len(b)), b]
    return b"".join(out)


def seal_key(parent: SecretBytes, key: SecretBytes, aad: bytes) -> bytes:
    """``nonce || AES-256-GCM(parent, key, aad)`` with a fresh random nonce."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(parent.reveal()).encrypt(nonce, key.reveal(), aad)


def open_key(parent: SecretBytes, wrapped: bytes, aad: bytes) -> SecretBytes:
    """The key ``seal_key`` wrapped. ``IntegrityError`` if ``wrapped`` is not
    ``WRAPPED_KEY_SIZE`` bytes; ``WrongKeyError`` if it does not authenticate under
    ``parent`` and ``aad``. The caller names the key in its own error."""
    if len(wrapped) != WRAPPED_KEY_SIZE:
        raise IntegrityError(f"a wrapped key has {WRAPPED_KEY_SIZE} bytes, got {len(wrapped)}")
    try:
        return SecretBytes(AESGCM(parent.reveal()).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], aad))
    except InvalidTag:
        raise WrongKeyError("the wrapped key does not open under this parent key") from None


def derive_search_material(l2: SecretBytes, tenant_id: str, l2_id: str) -> SecretBytes:
    """HKDF-SHA256 (no salt, 32 bytes) of the L2 key with info
    ``"archive_kms/v1/search-material/" || tenant || "/" || L2 record id``: the input of
    the tenant's search keys (``search.derive_search_keys``)."""
    info = _SEARCH_LABEL + tenant_id.encode() + b"/" + l2_id.encode()
    return SecretBytes(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(l2.reveal()))
