"""A deterministic keystream: AES-256-CTR encryption of zeros.

Used for synthetic attachment bytes (``synthetic.py``): any size, produced lazily in
chunks at memory speed, identical on every run for the same key. Not for secrecy.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from archive_kms.errors import ValidationError

__all__ = ["aes_ctr_keystream"]


def aes_ctr_keystream(
    key: bytes, size: int, *, chunk: int = 1 << 20, initial_counter: bytes = bytes(16)
) -> Iterator[bytes]:
    """``size`` bytes of the AES-CTR keystream of ``key`` from ``initial_counter`` (a
    128-bit big-endian counter block, default zero), in chunks of ``chunk`` bytes."""
    if len(key) != 32 or len(initial_counter) != 16 or chunk < 1:
        raise ValidationError("the keystream needs a 32-byte key, a 16-byte counter block and a positive chunk")
    enc = Cipher(algorithms.AES(key), modes.CTR(initial_counter)).encryptor()
    zeros = bytes(chunk)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield enc.update(zeros[:n])
        left -= n
