"""``SecretBytes``: the one type that holds raw key material.

Key material (DEKs, derived per-object keys, unwrapped tenant/workspace keys) travels as
``SecretBytes`` so that it cannot end up in a log line, an exception message, a Prefect
result or a pickle by accident:

* ``repr``/``str`` show only the length and a short fingerprint label,
  ``SecretBytes(<32 bytes, id=ab12cd34>)``. The fingerprint is the first 8 hex digits of
  HMAC-SHA256 under a key drawn at random when this module is imported, so two labels
  can be compared *within* one process (same key ⇒ same label) but a label cannot be used
  to confirm a guessed key offline or in another process.
* There is no ``__bytes__``, no iteration, no buffer protocol: raw bytes come only from the
  explicit :meth:`SecretBytes.reveal`.
* Pickling and ``copy``/``deepcopy`` raise ``TypeError``.
* ``==`` is constant-time (``hmac.compare_digest``) and only defined between two
  ``SecretBytes``; instances are unhashable.
* :meth:`SecretBytes.wipe` zeroes the private ``bytearray`` copy (best effort: Python may
  still hold other copies, e.g. the ``bytes`` returned by ``reveal``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import NoReturn

from archive_kms.errors import ValidationError

# Drawn once per process; never leaves it. Labels are therefore only comparable in-process.
_FINGERPRINT_KEY = os.urandom(32)


class SecretBytes:
    """Key material with a safe ``repr`` and an explicit :meth:`reveal`."""

    __slots__ = ("__weakref__", "_buf", "_label")

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("SecretBytes takes bytes, bytearray or memoryview")
        self._buf = bytearray(value)
        digest = hmac.new(_FINGERPRINT_KEY, self._buf, hashlib.sha256).hexdigest()
        self._label: str | None = digest[:8]

    @classmethod
    def random(cls, size: int = 32) -> SecretBytes:
        """Fresh key material from the OS CSPRNG."""
        if not 1 <= size <= 1024:
            raise ValidationError(f"secret size must be 1..1024 bytes, got {size}")
        return cls(os.urandom(size))

    # --- access --------------------------------------------------------------------------

    def reveal(self) -> bytes:
        """Return the raw key bytes. Raises ``ValidationError`` after :meth:`wipe`."""
        if self._label is None:
            raise ValidationError("secret was wiped and can no longer be used")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def fingerprint(self) -> str:
        """The 8-hex-digit in-process label shown by ``repr`` (``'wiped'`` after wipe)."""
        return self._label if self._label is not None else "wiped"

    def wipe(self) -> None:
        """Zero the private copy (best effort) and make further :meth:`reveal` calls fail."""
        self._buf[:] = bytes(len(self._buf))  # same length: overwritten in place
        self._label = None

    def __del__(self) -> None:  # best effort: zero our copy when collected
        try:
            self.wipe()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # --- safe presentation ---------------------------------------------------------------

    def __repr__(self) -> str:
        if self._label is None:
            return "SecretBytes(<wiped>)"
        return f"SecretBytes(<{len(self._buf)} bytes, id={self._label}>)"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    # --- comparison ----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]

    # --- no serialisation or copies ------------------------------------------------------

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled or copied; wrap the key for storage instead")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled or copied; wrap the key for storage instead")

    def __getstate__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled or copied; wrap the key for storage instead")
