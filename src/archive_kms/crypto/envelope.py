"""Object envelope, format version 1: streaming AES-256-GCM with a per-object HKDF key.

The byte-by-byte specification is ``docs/envelope-format.md``; this docstring is the
short version, and the two must agree.

Layout::

    header  (56..372 bytes, at most MAX_HEADER_LEN)
    segment 0: AES-256-GCM(plaintext[0:S])   || 16-byte tag
    segment 1: AES-256-GCM(plaintext[S:2S])  || 16-byte tag
    ...
    segment n-1 (final): 0..S plaintext bytes || 16-byte tag

* per-object key ``K = HKDF-SHA256(IKM=DEK, salt=header.salt, info=INFO)`` with
  ``INFO = b"archive_kms/v1/object" || u32(len(tenant)) || tenant || u32(len(name)) || name``;
* nonce of segment *i* = ``nonce_prefix (7) || u32be(i) || 0x01 if final else 0x00``;
* AAD of every segment = ``header bytes || u32(len(tenant)) || tenant || u32(len(name)) || name``.

Release rule ("authenticated prefix"): :func:`decrypt_iter` yields a segment's plaintext
only after that segment's tag verified. Truncation, reordering, a missing final segment
or trailing data are detected *when the damaged segment is reached*, so a consumer may
already hold the authenticated segments before it; it must treat the whole stream as
failed when an error is raised (abort the multipart upload, delete the staging object).
The iterator keeps raising once it failed. :func:`decrypt_stream` truncates a seekable
destination back to where it started on failure, so such a destination is left exactly
as it was; a non-seekable destination keeps the authenticated prefix and must be a
staging destination the caller discards. :func:`decrypt_to_bytes` returns nothing
unless the whole object verified.

Everything here is pure: no I/O beyond the file-like objects passed in, no Prefect.
Errors: ``ValidationError`` for bad caller inputs (before any byte is written),
``FormatError`` for a malformed or out-of-bounds header, ``IntegrityError`` for any
authentication or binding failure. Messages never contain key bytes or plaintext.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import FormatError, IntegrityError, ValidationError

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "MAX_HEADER_LEN",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "DecryptIterator",
    "DecryptResult",
    "EncryptResult",
    "EnvelopeHeader",
    "ObjectBinding",
    "Readable",
    "ciphertext_size",
    "decrypt_iter",
    "decrypt_stream",
    "decrypt_to_bytes",
    "encrypt_bytes",
    "encrypt_iter",
    "encrypt_stream",
    "read_header",
]


class Readable(Protocol):
    """A source of bytes: a binary file, or an object store's reader."""

    def read(self, size: int = -1, /) -> bytes: ...


MAGIC = b"AKMS"
VERSION = 1

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16

MIN_SEGMENT_SIZE = 4 * 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 1024 * 1024
#: Segment indices are 0 .. MAX_SEGMENTS-1 and fit the nonce's 32-bit counter.
MAX_SEGMENTS = 2**32 - 1

MAX_TENANT_ID_LEN = 63
MAX_WORKSPACE_ID_LEN = 128
MAX_DEK_ID_LEN = 128
MAX_OBJECT_NAME_LEN = 4096
MAX_HEADER_LEN = 1024

# magic(4) version(1) header_len(2)
_PREAMBLE = struct.Struct(">4sBH")
# segment_size(4) salt(32) nonce_prefix(7)
_FIXED = struct.Struct(f">I{SALT_SIZE}s{NONCE_PREFIX_SIZE}s")
_FIXED_LEN = _PREAMBLE.size + _FIXED.size  # 50
#: Smallest valid header: fixed part plus three 1-byte strings with their length bytes.
MIN_HEADER_LEN = _FIXED_LEN + 3 * 2

_INFO_LABEL = b"archive_kms/v1/object"
_U32 = struct.Struct(">I")
_NONCE_SUFFIX = struct.Struct(">IB")


# --- value types -------------------------------------------------------------------------


def _check_identifier(field: str, value: object, max_len: int) -> bytes:
    """Identifiers are printable Unicode strings of 1..max_len UTF-8 bytes."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a str")
    if not value.isprintable():  # also excludes lone surrogates, so encoding cannot fail
        raise ValidationError(f"{field} must not contain control or non-printable characters")
    encoded = value.encode("utf-8")
    if not 1 <= len(encoded) <= max_len:
        raise ValidationError(f"{field} must be 1..{max_len} UTF-8 bytes, got {len(encoded)}")
    return encoded


def _check_segment_size(segment_size: object) -> int:
    if (
        not isinstance(segment_size, int)
        or isinstance(segment_size, bool)
        or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE
    ):
        raise ValidationError(
            f"segment_size must be an int in {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}, got {segment_size!r}"
        )
    return segment_size


@dataclass(frozen=True)
class ObjectBinding:
    """Where an object belongs. Bound into the per-object key and every segment's AAD.

    ``object_name`` is the storage key as opaque bytes (1..4096 bytes); it is not stored in
    the envelope, so an object copied to another name or tenant fails to decrypt.
    """

    tenant_id: str
    workspace_id: str
    object_name: bytes

    def __post_init__(self) -> None:
        _check_identifier("tenant_id", self.tenant_id, MAX_TENANT_ID_LEN)
        _check_identifier("workspace_id", self.workspace_id, MAX_WORKSPACE_ID_LEN)
        if not isinstance(self.object_name, bytes):
            raise ValidationError("object_name must be bytes (encode the storage key)")
        if not 1 <= len(self.object_name) <= MAX_OBJECT_NAME_LEN:
            raise ValidationError(f"object_name must be 1..{MAX_OBJECT_NAME_LEN} bytes, got {len(self.object_name)}")

    def _context(self) -> bytes:
        """``u32(len(tenant)) || tenant || u32(len(name)) || name`` (used in INFO and AAD)."""
        tenant = self.tenant_id.encode("utf-8")
        return _U32.pack(len(tenant)) + tenant + _U32.pack(len(self.object_name)) + self.object_name


@dataclass(frozen=True)
class EnvelopeHeader:
    """The parsed envelope header. Nothing in it is secret (salt and nonce prefix are public)."""

    version: int
    tenant_id: str
    workspace_id: str
    dek_id: str
    salt: bytes
    nonce_prefix: bytes
    segment_size: int

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ValidationError(f"envelope version must be {VERSION}, got {self.version!r}")
        _check_identifier("tenant_id", self.tenant_id, MAX_TENANT_ID_LEN)
        _check_identifier("workspace_id", self.workspace_id, MAX_WORKSPACE_ID_LEN)
        _check_identifier("dek_id", self.dek_id, MAX_DEK_ID_LEN)
        if not isinstance(self.salt, bytes) or len(self.salt) != SALT_SIZE:
            raise ValidationError(f"salt must be {SALT_SIZE} bytes")
        if not isinstance(self.nonce_prefix, bytes) or len(self.nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValidationError(f"nonce_prefix must be {NONCE_PREFIX_SIZE} bytes")
        _check_segment_size(self.segment_size)

    def __repr__(self) -> str:
        return (
            f"EnvelopeHeader(version={self.version}, tenant_id={self.tenant_id!r}, "
            f"workspace_id={self.workspace_id!r}, dek_id={self.dek_id!r}, salt={self.salt.hex()}, "
            f"nonce_prefix={self.nonce_prefix.hex()}, segment_size={self.segment_size})"
        )

    def _strings(self) -> tuple[bytes, bytes, bytes]:
        return (
            self.tenant_id.encode("utf-8"),
            self.workspace_id.encode("utf-8"),
            self.dek_id.encode("utf-8"),
        )

    @property
    def encoded_len(self) -> int:
        """Length of this header on the wire (the ``header_len`` field)."""
        return _FIXED_LEN + sum(1 + len(s) for s in self._strings())

    def to_bytes(self) -> bytes:
        """The canonical encoding; ``read_header(BytesIO(h.to_bytes())) == h``."""
        return (
            _PREAMBLE.pack(MAGIC, self.version, self.encoded_len)
            + _FIXED.pack(self.segment_size, self.salt, self.nonce_prefix)
            + b"".join(bytes([len(s)]) + s for s in self._strings())
        )


@dataclass(frozen=True)
class EncryptResult:
    plaintext_size: int
    ciphertext_size: int
    plaintext_sha256: str  # hex
    header: EnvelopeHeader


@dataclass(frozen=True)
class DecryptResult:
    plaintext_size: int
    ciphertext_size: int
    plaintext_sha256: str  # hex
    header: EnvelopeHeader


# --- helpers -----------------------------------------------------------------------------


def _read_exact(src: Readable, n: int) -> bytes:
    """Read ``n`` bytes, fewer only at end of stream. Never accepts more than asked for."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        if len(chunk) > n - got:
            raise ValidationError("source stream returned more bytes than requested")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _derive_aead(dek: SecretBytes, salt: bytes, binding: ObjectBinding) -> AESGCM:
    if not isinstance(dek, SecretBytes) or len(dek) != KEY_SIZE:
        raise ValidationError(f"the DEK must be a SecretBytes of {KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=_INFO_LABEL + binding._context())
    return AESGCM(hkdf.derive(dek.reveal()))


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + _NONCE_SUFFIX.pack(index, 1 if final else 0)


def _parse_header(src: Readable) -> tuple[EnvelopeHeader, bytes]:
    """Read and validate a header; every length is bounded before anything is read for it."""
    preamble = _read_exact(src, _PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise FormatError(f"header truncated: {len(preamble)} of {_PREAMBLE.size} preamble bytes")
    magic, version, header_len = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise FormatError("bad magic: not an archive_kms envelope")
    if version != VERSION:
        raise FormatError(f"unsupported envelope version {version} (this build reads version {VERSION})")
    if not MIN_HEADER_LEN <= header_len <= MAX_HEADER_LEN:
        raise FormatError(f"header_len {header_len} out of bounds {MIN_HEADER_LEN}..{MAX_HEADER_LEN}")
    body = _read_exact(src, header_len - _PREAMBLE.size)
    if len(body) < header_len - _PREAMBLE.size:
        raise FormatError(f"header truncated: {_PREAMBLE.size + len(body)} of {header_len} bytes")

    segment_size, salt, nonce_prefix = _FIXED.unpack_from(body, 0)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise FormatError(f"segment_size {segment_size} out of bounds {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")
    pos = _FIXED.size
    strings: list[str] = []
    for field, max_len in (
        ("tenant_id", MAX_TENANT_ID_LEN),
        ("workspace_id", MAX_WORKSPACE_ID_LEN),
        ("dek_id", MAX_DEK_ID_LEN),
    ):
        if pos >= len(body):
            raise FormatError(f"header ends before the {field} length byte")
        length = body[pos]
        pos += 1
        if not 1 <= length <= max_len:
            raise FormatError(f"{field} length {length} out of bounds 1..{max_len}")
        if pos + length > len(body):
            raise FormatError(f"{field} ({length} bytes) overruns header_len {header_len}")
        try:
            strings.append(body[pos : pos + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise FormatError(f"{field} is not valid UTF-8") from None
        pos += length
    if pos != len(body):
        raise FormatError(f"header has {len(body) - pos} trailing byte(s) after dek_id")
    try:
        header = EnvelopeHeader(VERSION, strings[0], strings[1], strings[2], salt, nonce_prefix, segment_size)
    except ValidationError as exc:
        raise FormatError(f"invalid header field: {exc}") from None
    return header, preamble + body


# --- encryption --------------------------------------------------------------------------


def encrypt_iter(
    chunks: Iterable[bytes],
    *,
    dek: SecretBytes,
    dek_id: str,
    binding: ObjectBinding,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> Generator[bytes, None, EncryptResult]:
    """Encrypt plaintext ``chunks`` (any sizes) into envelope pieces: header, then segments.

    Inputs are validated and the key derived at call time, before anything is yielded.
    The generator's return value (``result = yield from encrypt_iter(...)``) is the
    :class:`EncryptResult`. Holds at most one segment of plaintext plus one input chunk.
    """
    return _encrypt_iter_with(
        chunks,
        dek=dek,
        dek_id=dek_id,
        binding=binding,
        segment_size=segment_size,
        salt=os.urandom(SALT_SIZE),
        nonce_prefix=os.urandom(NONCE_PREFIX_SIZE),
    )


def _encrypt_iter_with(
    chunks: Iterable[bytes],
    *,
    dek: SecretBytes,
    dek_id: str,
    binding: ObjectBinding,
    segment_size: int,
    salt: bytes,
    nonce_prefix: bytes,
) -> Generator[bytes, None, EncryptResult]:
    """Known-answer-vector hook: encrypt with a *given* salt and nonce prefix.

    Only ``tests/vectors/generate_envelope_vectors.py`` may call this. Reusing a salt and
    nonce prefix under one DEK and binding reuses (key, nonce) pairs and breaks GCM.
    """
    if not isinstance(binding, ObjectBinding):
        raise ValidationError("binding must be an ObjectBinding")
    header = EnvelopeHeader(VERSION, binding.tenant_id, binding.workspace_id, dek_id, salt, nonce_prefix, segment_size)
    header_bytes = header.to_bytes()
    aead = _derive_aead(dek, salt, binding)
    aad = header_bytes + binding._context()
    return _seal(chunks, header, header_bytes, aead, aad)


def _seal(
    chunks: Iterable[bytes], header: EnvelopeHeader, header_bytes: bytes, aead: AESGCM, aad: bytes
) -> Generator[bytes, None, EncryptResult]:
    size = header.segment_size
    prefix = header.nonce_prefix
    sha = hashlib.sha256()
    plaintext_size = 0
    ciphertext_size = len(header_bytes)
    index = 0

    def seal(data: bytes | bytearray | memoryview, final: bool) -> bytes:
        nonlocal index, ciphertext_size
        if index >= MAX_SEGMENTS:
            raise ValidationError(f"object too large: more than {MAX_SEGMENTS} segments of {size} bytes")
        out = aead.encrypt(_nonce(prefix, index, final), data, aad)
        index += 1
        ciphertext_size += len(out)
        return out

    yield header_bytes
    # The one plaintext buffer, reused for every segment. It grows to what the object needs,
    # at most one segment: a 5 KB object does not touch a 1 MiB buffer (ADR 0046).
    segment = bytearray()
    filled = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        pos = 0
        while pos < len(view):
            # A full segment is sealed as non-final only once a byte beyond it exists.
            if filled == size:
                yield seal(segment, final=False)
                filled = 0
            n = min(size - filled, len(view) - pos)
            piece = view[pos : pos + n]
            segment[filled : filled + n] = piece  # in place once the buffer is one segment long
            sha.update(piece)  # hash what is copied, so the digest always matches the ciphertext
            filled += n
            pos += n
        plaintext_size += len(view)
    with memoryview(segment) as whole, whole[:filled] as last:
        out = seal(last, final=True)
    yield out
    return EncryptResult(plaintext_size, ciphertext_size, sha.hexdigest(), header)


def _chunks_of(src: Readable, size: int) -> Iterator[bytes]:
    while chunk := src.read(size):
        yield chunk


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    dek: SecretBytes,
    dek_id: str,
    binding: ObjectBinding,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> EncryptResult:
    """Read plaintext from ``src`` to its end and write the envelope to ``dst``.

    Memory is bounded by about two segments whatever the object size.
    """
    pieces = encrypt_iter(
        _chunks_of(src, _check_segment_size(segment_size)),
        dek=dek,
        dek_id=dek_id,
        binding=binding,
        segment_size=segment_size,
    )
    while True:
        try:
            dst.write(next(pieces))
        except StopIteration as done:
            result: EncryptResult = done.value
            return result


def encrypt_bytes(
    plaintext: bytes,
    *,
    dek: SecretBytes,
    dek_id: str,
    binding: ObjectBinding,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> bytes:
    """Encrypt a small in-memory object and return the whole envelope."""
    return b"".join(encrypt_iter([plaintext], dek=dek, dek_id=dek_id, binding=binding, segment_size=segment_size))


# --- decryption --------------------------------------------------------------------------


def read_header(src: Readable) -> EnvelopeHeader:
    """Parse the header at the start of ``src`` (reads at most ``MAX_HEADER_LEN`` bytes).

    Nothing is authenticated yet: use the result only to pick the DEK to unwrap, then
    decrypt. Raises ``FormatError`` on any malformed, truncated or out-of-bounds field.
    """
    return _parse_header(src)[0]


class DecryptIterator(Iterator[bytes]):
    """Yields each segment's plaintext after its tag verified (see the module docstring).

    Once any error was raised, every later ``next()`` raises ``IntegrityError`` again, so
    a consumer that swallowed the first error cannot mistake the end for a clean EOF.
    ``result`` is available after the final segment verified.
    """

    def __init__(self, src: Readable, binding: ObjectBinding, dek_for: Callable[[EnvelopeHeader], SecretBytes]):
        if not isinstance(binding, ObjectBinding):
            raise ValidationError("binding must be an ObjectBinding")
        header, header_bytes = _parse_header(src)
        # Binding is checked before the DEK is asked for: no key call for a misplaced object.
        if header.tenant_id != binding.tenant_id:
            raise IntegrityError("envelope is bound to another tenant (header tenant_id differs from the expected one)")
        if header.workspace_id != binding.workspace_id:
            raise IntegrityError(
                "envelope is bound to another workspace (header workspace_id differs from the expected one)"
            )
        self.header = header
        self._src = src
        self._aead = _derive_aead(dek_for(header), header.salt, binding)
        self._aad = header_bytes + binding._context()
        self._sha = hashlib.sha256()
        self._index = 0
        self._carry = b""  # the byte read to learn whether a full segment was the last one
        self._plaintext_size = 0
        self._ciphertext_size = len(header_bytes)
        self._result: DecryptResult | None = None
        self._failed: BaseException | None = None

    @property
    def result(self) -> DecryptResult:
        if self._result is None:
            raise IntegrityError("decryption has not completed: the final segment was not verified yet")
        return self._result

    def __iter__(self) -> DecryptIterator:
        return self

    def __next__(self) -> bytes:
        if self._failed is not None:
            raise IntegrityError(
                f"decryption already failed ({type(self._failed).__name__}); discard everything it produced"
            ) from self._failed
        if self._result is not None:
            raise StopIteration
        try:
            return self._next_segment()
        except BaseException as exc:
            self._failed = exc
            raise

    def _next_segment(self) -> bytes:
        full = self.header.segment_size + TAG_SIZE
        index = self._index
        data = self._carry + _read_exact(self._src, full - len(self._carry))
        if len(data) == full:
            self._carry = _read_exact(self._src, 1)
            final = not self._carry
        else:
            self._carry = b""
            final = True
        if len(data) < TAG_SIZE:
            if not data:
                raise IntegrityError("stream truncated: no segment after the header")
            raise IntegrityError(f"stream truncated inside segment {index}: {len(data)} bytes, less than a tag")
        if index >= MAX_SEGMENTS:
            raise IntegrityError(f"too many segments: more than {MAX_SEGMENTS}")
        try:
            plaintext = self._aead.decrypt(_nonce(self.header.nonce_prefix, index, final), data, self._aad)
        except InvalidTag:
            raise IntegrityError(self._diagnose(index, data, final)) from None
        self._index += 1
        self._sha.update(plaintext)
        self._plaintext_size += len(plaintext)
        self._ciphertext_size += len(data)
        if final:
            self._result = DecryptResult(
                self._plaintext_size, self._ciphertext_size, self._sha.hexdigest(), self.header
            )
        return plaintext

    def _diagnose(self, index: int, data: bytes, final: bool) -> str:
        """Name the failure: retry the tag with the other last-segment flag (nothing released)."""
        if len(data) == self.header.segment_size + TAG_SIZE:
            try:
                self._aead.decrypt(_nonce(self.header.nonce_prefix, index, not final), data, self._aad)
            except InvalidTag:
                pass
            else:
                if final:
                    return f"stream truncated: final segment missing (stream ends after segment {index})"
                return f"trailing data after final segment {index}"
        return (
            f"segment {index} failed authentication "
            "(corrupted, truncated, reordered, or from another object, tenant or key)"
        )


def decrypt_iter(
    src: Readable,
    *,
    binding: ObjectBinding,
    dek_for: Callable[[EnvelopeHeader], SecretBytes],
) -> DecryptIterator:
    """Stream-decrypt ``src``: authenticated-prefix semantics (see the module docstring).

    The header is read and checked against ``binding`` now, before ``dek_for(header)`` is
    called; segments are read and verified one at a time as the iterator is consumed.
    """
    return DecryptIterator(src, binding, dek_for)


def decrypt_stream(
    src: Readable,
    dst: BinaryIO,
    *,
    binding: ObjectBinding,
    dek_for: Callable[[EnvelopeHeader], SecretBytes],
) -> DecryptResult:
    """Decrypt ``src`` into ``dst`` in constant memory; ``dst`` receives verified segments only.

    On any failure a seekable ``dst`` is truncated back to the position it had on entry,
    so it is left as it was. A non-seekable ``dst`` keeps the authenticated prefix written
    before the failure: pass a staging destination and discard it when this raises.
    """
    segments = decrypt_iter(src, binding=binding, dek_for=dek_for)
    start = dst.tell() if _seekable(dst) else None
    try:
        for plaintext in segments:
            dst.write(plaintext)
    except BaseException as exc:
        if start is not None:
            try:
                dst.seek(start)
                dst.truncate()
            except (OSError, ValueError):
                exc.add_note("the destination could not be truncated back: discard it, it holds a partial object")
        raise
    return segments.result


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def decrypt_to_bytes(
    ciphertext: bytes,
    *,
    binding: ObjectBinding,
    dek_for: Callable[[EnvelopeHeader], SecretBytes],
) -> bytes:
    """Decrypt a small in-memory envelope; returns the plaintext only if all of it verified."""
    return b"".join(decrypt_iter(io.BytesIO(ciphertext), binding=binding, dek_for=dek_for))


def ciphertext_size(plaintext_size: int, header_len: int, segment_size: int) -> int:
    """Envelope size for a plaintext size: ``header_len + plaintext_size + 16 * segments``,
    where ``segments = max(1, ceil(plaintext_size / segment_size))``."""
    _check_segment_size(segment_size)
    if not isinstance(plaintext_size, int) or plaintext_size < 0:
        raise ValidationError(f"plaintext_size must be a non-negative int, got {plaintext_size!r}")
    if not isinstance(header_len, int) or not MIN_HEADER_LEN <= header_len <= MAX_HEADER_LEN:
        raise ValidationError(f"header_len must be in {MIN_HEADER_LEN}..{MAX_HEADER_LEN}, got {header_len!r}")
    segments = max(1, -(-plaintext_size // segment_size))
    if segments > MAX_SEGMENTS:
        raise ValidationError(f"object too large: more than {MAX_SEGMENTS} segments of {segment_size} bytes")
    return header_len + plaintext_size + TAG_SIZE * segments
