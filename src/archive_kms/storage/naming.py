"""Object names (opaque bytes) to backend keys and back.

A name is 1..N arbitrary bytes. Inside a location it becomes ``prefix + encode(name)``
where ``encode`` percent-encodes every byte outside ``[A-Za-z0-9_-]`` as ``%XX`` (uppercase
hex). Consequences, each one a reason for the choice:

* The encoded part contains no ``/``, ``.``, ``\\``, NUL or control characters, so no
  ``..`` segment, absolute path, ``//``, trailing ``/`` or ``.`` can exist: a name can
  never escape the prefix or container, and no SDK, proxy or console that normalises
  paths can fold two names into one.
* It is canonical (a byte has exactly one spelling), so distinct names never collide and
  :func:`decode_key` can refuse any key we did not write.
* It works byte by byte, so ``encode(a + b) == encode(a) + encode(b)``: a name prefix maps
  to a key prefix, which is how ``list(prefix)`` asks the backend for a prefix.

The price is that keys are ``%2F``-heavy for hierarchical names; readability in a console
is not a goal. The longest backend key is 1024 (S3: bytes, Azure: chars); the encoded key
must fit, so the longest name depends on its bytes (between ~330 and ~980 bytes).
"""

from __future__ import annotations

from archive_kms.errors import ValidationError

MAX_KEY_LEN = 1024

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ENCODE = [chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256)]
_HEX = "0123456789ABCDEF"


def encode_name(name: bytes) -> str:
    """The escape-safe, reversible encoding of one name (without any prefix)."""
    if not isinstance(name, bytes):
        raise ValidationError(f"object names are bytes, got {type(name).__name__}")
    return "".join(_ENCODE[b] for b in name)


def encode_prefix(name_prefix: bytes) -> str:
    """Encoding of a name prefix for listing (the empty prefix is allowed)."""
    return encode_name(name_prefix)


def object_key(prefix: str, name: bytes) -> str:
    """The backend key for ``name`` in a location whose key prefix is ``prefix``.

    Raises ``ValidationError`` for an empty name or one whose key would exceed 1024."""
    if not isinstance(name, bytes):
        raise ValidationError(f"object names are bytes, got {type(name).__name__}")
    if not name:
        raise ValidationError("object name must not be empty")
    key = prefix + encode_name(name)
    if len(key) > MAX_KEY_LEN:
        raise ValidationError(
            f"object name of {len(name)} bytes encodes to a {len(key)}-char key; the limit is {MAX_KEY_LEN} "
            f"including the location prefix {prefix!r} (bytes outside [A-Za-z0-9_-] take 3 chars)"
        )
    return key


def decode_key(prefix: str, key: str) -> bytes | None:
    """The name for a backend key, or ``None`` if the key is not one we could have
    written (outside the prefix, or not canonically encoded)."""
    if not key.startswith(prefix) or len(key) == len(prefix):
        return None
    out = bytearray()
    s = key[len(prefix) :]
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%":
            hi, lo = s[i + 1 : i + 2], s[i + 2 : i + 3]
            if not hi or not lo or hi not in _HEX or lo not in _HEX:
                return None
            b = int(hi + lo, 16)
            if b in _SAFE:  # a safe byte is never escaped: non-canonical
                return None
            out.append(b)
            i += 3
        else:
            o = ord(c)
            if o > 127 or o not in _SAFE:
                return None
            out.append(o)
            i += 1
    return bytes(out)
