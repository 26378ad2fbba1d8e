"""Property tests (hypothesis) for the envelope: round trips, and bounded, well-typed failure
of the parser and decryptor on arbitrary input (fault F7)."""

from __future__ import annotations

import io
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_kms.crypto.envelope import (
    MAX_HEADER_LEN,
    MIN_SEGMENT_SIZE,
    ObjectBinding,
    ciphertext_size,
    decrypt_iter,
    decrypt_to_bytes,
    encrypt_bytes,
    encrypt_iter,
    read_header,
)
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import FormatError, IntegrityError

DEK = SecretBytes(os.urandom(32))
BINDING = ObjectBinding("tenant-a", "ws-1", b"records/0001.json")
SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
REFERENCE = encrypt_bytes(
    os.urandom(2 * MIN_SEGMENT_SIZE + 10), dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=MIN_SEGMENT_SIZE
)
REFERENCE_HEADER_LEN = read_header(io.BytesIO(REFERENCE)).encoded_len


class _SpyReader(io.RawIOBase):
    """Counts what the parser asks for, so a test can bound it."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)
        self.largest = 0
        self.total = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        assert n >= 0, "unbounded read"
        self.largest = max(self.largest, n)
        out = self._src.read(n)
        self.total += len(out)
        return out


@st.composite
def objects(draw):
    segment_size = draw(st.integers(MIN_SEGMENT_SIZE, 4 * MIN_SEGMENT_SIZE))
    size = draw(st.integers(0, 4 * segment_size))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=6)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
    return segment_size, data, chunks


@SETTINGS
@given(objects(), st.text(min_size=1, max_size=20).filter(str.isprintable), st.binary(min_size=1, max_size=64))
def test_round_trip_any_size_segment_size_and_chunking(obj, dek_id, name):
    segment_size, data, chunks = obj
    binding = ObjectBinding("tenant-a", "ws-1", name)
    pieces = list(encrypt_iter(chunks, dek=DEK, dek_id=dek_id, binding=binding, segment_size=segment_size))
    ct = b"".join(pieces)
    header = read_header(io.BytesIO(ct))
    assert len(ct) == ciphertext_size(len(data), header.encoded_len, segment_size)
    assert len(pieces) == 1 + max(1, -(-len(data) // segment_size))
    out = list(decrypt_iter(io.BytesIO(ct), binding=binding, dek_for=lambda h: DEK))
    assert b"".join(out) == data
    assert all(len(p) == segment_size for p in out[:-1])


def _check_header_parse(data: bytes) -> None:
    spy = _SpyReader(data)
    try:
        header = read_header(spy)
    except FormatError:
        pass
    else:
        assert spy.total == header.encoded_len
        assert header.to_bytes() == data[: header.encoded_len]  # only canonical headers parse
    assert spy.largest <= MAX_HEADER_LEN and spy.total <= MAX_HEADER_LEN


@SETTINGS
@given(st.binary(max_size=2 * MAX_HEADER_LEN))
def test_read_header_on_arbitrary_bytes(data):
    _check_header_parse(data)


@SETTINGS
@given(st.binary(max_size=1500))
def test_read_header_on_arbitrary_bytes_after_a_valid_preamble(data):
    _check_header_parse(b"AKMS\x01" + data)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, REFERENCE_HEADER_LEN - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_read_header_on_mutated_valid_headers(edits):
    data = bytearray(REFERENCE[:REFERENCE_HEADER_LEN])
    for pos, value in edits:
        data[pos] = value
    _check_header_parse(bytes(data) + b"\x00" * 64)


@SETTINGS
@given(st.binary(max_size=3 * MIN_SEGMENT_SIZE))
def test_decrypt_arbitrary_body_fails_only_with_integrity_error(body):
    try:
        decrypt_to_bytes(REFERENCE[:REFERENCE_HEADER_LEN] + body, binding=BINDING, dek_for=lambda h: DEK)
    except IntegrityError:
        return
    raise AssertionError("arbitrary body authenticated")


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(REFERENCE) - 1), st.integers(1, 255)), min_size=1, max_size=5))
def test_any_byte_edit_of_a_valid_object_is_rejected(edits):
    data = bytearray(REFERENCE)
    for pos, delta in edits:
        data[pos] = (data[pos] + delta) % 256
    if bytes(data) == REFERENCE:  # edits cancelled out
        return
    try:
        decrypt_to_bytes(bytes(data), binding=BINDING, dek_for=lambda h: DEK)
    except IntegrityError:  # FormatError is an IntegrityError
        return
    raise AssertionError("edited object authenticated")
