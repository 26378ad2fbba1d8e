"""Key derivation: HKDF-SHA256 (RFC 5869).

Every derived key in the library comes from here or from the envelope's per-object key:
search token and display keys from the tenant key (``search/tokens.py``), the per-document
display key (``search/documents.py``), the archive job digest key (``operations/archive.py``).
Each caller's ``info`` starts with its own versioned label, so the keys are independent.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["hkdf_sha256"]


def hkdf_sha256(ikm: bytes, *, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    """HKDF-SHA256 extract-and-expand of ``ikm`` to ``length`` bytes. ``salt=None`` is
    RFC 5869's "not provided" (a string of zeros), for input keys that are uniformly random."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
