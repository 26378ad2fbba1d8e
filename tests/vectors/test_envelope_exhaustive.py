"""Exhaustive tamper tests (faults F1, F2) on a reference object of three 4 KiB segments.

* every single-bit flip anywhere (header, every segment body, every tag) is rejected and
  ``decrypt_stream`` leaves its seekable staging destination empty;
* every proper prefix is rejected; ``decrypt_stream`` releases nothing to a seekable
  destination, and ``decrypt_iter`` releases at most whole authenticated segments;
* a failed ``decrypt_iter`` keeps failing instead of ending like a clean EOF.
"""

from __future__ import annotations

import io
import os

import pytest

from archive_kms.crypto.envelope import (
    TAG_SIZE,
    ObjectBinding,
    decrypt_iter,
    decrypt_stream,
    encrypt_bytes,
    read_header,
)
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError

SEG = 4096
DEK = SecretBytes(os.urandom(32))
BINDING = ObjectBinding("tenant-a", "ws-1", b"records/0001.json")
PLAINTEXT = os.urandom(2 * SEG + 1800)
CIPHERTEXT = encrypt_bytes(PLAINTEXT, dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=SEG)
HEADER_LEN = read_header(io.BytesIO(CIPHERTEXT)).encoded_len


def _dek_for(header):
    return DEK


def test_reference_object_shape():
    assert len(CIPHERTEXT) == HEADER_LEN + len(PLAINTEXT) + 3 * TAG_SIZE
    dst = io.BytesIO()
    decrypt_stream(io.BytesIO(CIPHERTEXT), dst, binding=BINDING, dek_for=_dek_for)
    assert dst.getvalue() == PLAINTEXT


def test_every_single_bit_flip_is_rejected_and_releases_nothing():
    data = bytearray(CIPHERTEXT)
    accepted, leaked = [], []
    for pos in range(len(data)):
        original = data[pos]
        for bit in range(8):
            data[pos] = original ^ (1 << bit)
            staging = io.BytesIO()
            try:
                decrypt_stream(io.BytesIO(bytes(data)), staging, binding=BINDING, dek_for=_dek_for)
            except IntegrityError:
                if staging.getbuffer().nbytes:
                    leaked.append((pos, bit))
            else:
                accepted.append((pos, bit))
        data[pos] = original
    assert not accepted, f"{len(accepted)} bit flips accepted, first {accepted[:5]}"
    assert not leaked, f"{len(leaked)} bit flips left plaintext in the staging buffer, first {leaked[:5]}"


@pytest.mark.parametrize("api", ["decrypt_stream", "decrypt_iter"])
def test_every_truncation_is_rejected(api):
    for cut in range(len(CIPHERTEXT)):
        src = io.BytesIO(CIPHERTEXT[:cut])
        released = []
        with pytest.raises(IntegrityError):
            if api == "decrypt_stream":
                staging = io.BytesIO()
                try:
                    decrypt_stream(src, staging, binding=BINDING, dek_for=_dek_for)
                finally:
                    released.append(staging.getvalue())
            else:
                for piece in decrypt_iter(src, binding=BINDING, dek_for=_dek_for):
                    released.append(piece)
        got = b"".join(released)
        if api == "decrypt_stream":
            assert got == b"", f"cut={cut}: staging destination not empty"
        else:
            assert got == PLAINTEXT[: len(got)] and len(got) % SEG == 0, f"cut={cut}: released a partial segment"
            complete_segments = max(0, (cut - HEADER_LEN) // (SEG + TAG_SIZE))
            assert len(got) <= complete_segments * SEG


class _NonSeekableSink(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def test_non_seekable_destination_keeps_only_an_authenticated_prefix():
    damaged = bytearray(CIPHERTEXT)
    damaged[-1] ^= 1  # final tag
    sink = _NonSeekableSink()
    with pytest.raises(IntegrityError, match="segment 2 failed authentication"):
        decrypt_stream(io.BytesIO(bytes(damaged)), sink, binding=BINDING, dek_for=_dek_for)
    assert bytes(sink.data) == PLAINTEXT[: 2 * SEG]


def test_seekable_destination_is_restored_to_its_entry_position():
    damaged = CIPHERTEXT[:-1]
    staging = io.BytesIO(b"earlier content")
    staging.seek(0, io.SEEK_END)
    with pytest.raises(IntegrityError):
        decrypt_stream(io.BytesIO(damaged), staging, binding=BINDING, dek_for=_dek_for)
    assert staging.getvalue() == b"earlier content"


def test_failed_iterator_keeps_failing():
    it = decrypt_iter(io.BytesIO(CIPHERTEXT[:-1]), binding=BINDING, dek_for=_dek_for)
    assert next(it) == PLAINTEXT[:SEG]
    assert next(it) == PLAINTEXT[SEG : 2 * SEG]
    with pytest.raises(IntegrityError, match="segment 2 failed authentication"):
        next(it)
    for _ in range(3):
        with pytest.raises(IntegrityError, match="already failed"):
            next(it)
    with pytest.raises(IntegrityError, match="not completed"):
        it.result
