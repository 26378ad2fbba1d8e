"""Envelope API behaviour: round trips, inputs validated up front, binding, bounds, limits."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from pathlib import Path

import pytest

from archive_kms.crypto import envelope
from archive_kms.crypto.envelope import (
    DEFAULT_SEGMENT_SIZE,
    MAX_HEADER_LEN,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
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
from archive_kms.errors import FormatError, IntegrityError, ValidationError

DEK = SecretBytes(os.urandom(32))
BINDING = ObjectBinding("tenant-a", "ws-1", b"records/0001.json")
SEG = MIN_SEGMENT_SIZE


def _dek_for(header: EnvelopeHeader) -> SecretBytes:
    return DEK


def _encrypt(plaintext: bytes, **kw) -> bytes:
    kw = {"dek": DEK, "dek_id": "dek-1", "binding": BINDING, "segment_size": SEG, **kw}
    return encrypt_bytes(plaintext, **kw)


def test_encrypt_stream_round_trip_and_results():
    plaintext = os.urandom(3 * SEG + 7)
    dst = io.BytesIO()
    enc = encrypt_stream(io.BytesIO(plaintext), dst, dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=SEG)
    ct = dst.getvalue()
    assert enc.plaintext_size == len(plaintext)
    assert enc.ciphertext_size == len(ct) == ciphertext_size(len(plaintext), enc.header.encoded_len, SEG)
    assert enc.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert read_header(io.BytesIO(ct)) == enc.header

    out = io.BytesIO()
    dec = decrypt_stream(io.BytesIO(ct), out, binding=BINDING, dek_for=_dek_for)
    assert out.getvalue() == plaintext
    assert (dec.plaintext_size, dec.ciphertext_size, dec.plaintext_sha256) == (
        enc.plaintext_size,
        enc.ciphertext_size,
        enc.plaintext_sha256,
    )
    assert dec.header == enc.header


def test_encrypt_iter_rechunks_any_input_and_returns_result():
    plaintext = os.urandom(2 * SEG + 123)
    chunks = [plaintext[:1], b"", plaintext[1:5000], plaintext[5000:]]

    def collect():
        return (yield from encrypt_iter(chunks, dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=SEG))

    pieces = []
    gen = collect()
    try:
        while True:
            pieces.append(next(gen))
    except StopIteration as done:
        result = done.value
    header_len = result.header.encoded_len
    assert len(pieces[0]) == header_len  # header first, then one piece per segment
    assert [len(p) for p in pieces[1:]] == [SEG + 16, SEG + 16, 123 + 16]
    assert result.plaintext_size == len(plaintext) and result.ciphertext_size == sum(map(len, pieces))
    assert decrypt_to_bytes(b"".join(pieces), binding=BINDING, dek_for=_dek_for) == plaintext


def test_the_encryptors_buffer_grows_to_the_object_not_to_a_segment():
    """A small object does not touch a whole segment buffer (ADR 0046): with 16 copies in
    flight a 1 MiB buffer each was 16 MiB of RSS for objects of a few KB."""
    import tracemalloc

    plaintext = os.urandom(5_000)
    tracemalloc.start()
    try:
        pieces = list(encrypt_iter([plaintext], dek=DEK, dek_id="dek-1", binding=BINDING))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert DEFAULT_SEGMENT_SIZE >= 1024 * 1024
    assert peak < 64 * 1024, peak  # ~2 x 5 KB of plaintext and ciphertext, not 1 MiB
    assert decrypt_to_bytes(b"".join(pieces), binding=BINDING, dek_for=_dek_for) == plaintext


@pytest.mark.parametrize("cuts", [[], [1], [SEG - 1, SEG + 1], [SEG, 2 * SEG], [7, SEG + 7, 3 * SEG - 2]])
def test_a_reused_segment_buffer_seals_what_a_fresh_one_would(cuts):
    # The same salt and nonce prefix (the vectors' hook) make the two encryptions comparable.
    plaintext = os.urandom(3 * SEG + 5)
    bounds = [0, *cuts, len(plaintext)]
    chunks = [plaintext[a:b] for a, b in itertools.pairwise(bounds)]
    kw = {"dek": DEK, "dek_id": "dek-1", "binding": BINDING, "segment_size": SEG, "salt": b"s" * envelope.SALT_SIZE}
    kw["nonce_prefix"] = b"n" * envelope.NONCE_PREFIX_SIZE
    one = b"".join(envelope._encrypt_iter_with([plaintext], **kw))
    assert b"".join(envelope._encrypt_iter_with(chunks, **kw)) == one
    assert decrypt_to_bytes(one, binding=BINDING, dek_for=_dek_for) == plaintext


def test_decrypt_iter_yields_one_piece_per_segment():
    plaintext = os.urandom(2 * SEG)
    pieces = list(decrypt_iter(io.BytesIO(_encrypt(plaintext)), binding=BINDING, dek_for=_dek_for))
    assert pieces == [plaintext[:SEG], plaintext[SEG:]]


def test_empty_plaintext_is_one_empty_final_segment():
    ct = _encrypt(b"")
    header = read_header(io.BytesIO(ct))
    assert len(ct) == header.encoded_len + 16
    assert list(decrypt_iter(io.BytesIO(ct), binding=BINDING, dek_for=_dek_for)) == [b""]


def test_every_object_gets_a_fresh_salt_and_nonce_prefix():
    headers = [read_header(io.BytesIO(_encrypt(b"same"))) for _ in range(20)]
    assert len({h.salt for h in headers}) == 20
    assert len({h.nonce_prefix for h in headers}) == 20


def test_default_segment_size_and_bounds():
    ct = encrypt_bytes(b"x", dek=DEK, dek_id="d", binding=BINDING)
    assert read_header(io.BytesIO(ct)).segment_size == DEFAULT_SEGMENT_SIZE == 1024 * 1024
    for bad in (0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1, True, 4096.0):
        with pytest.raises(ValidationError, match="segment_size"):
            _encrypt(b"x", segment_size=bad)
    for good in (MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE):
        assert decrypt_to_bytes(_encrypt(b"abc", segment_size=good), binding=BINDING, dek_for=_dek_for) == b"abc"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tenant_id": ""}, "tenant_id must be 1..63"),
        ({"tenant_id": "t" * 64}, "tenant_id must be 1..63"),
        ({"tenant_id": "a\nb"}, "tenant_id must not contain control"),
        ({"tenant_id": "a\ud800"}, "tenant_id must not contain control"),
        ({"tenant_id": b"tenant"}, "tenant_id must be a str"),
        ({"workspace_id": "w" * 129}, "workspace_id must be 1..128"),
        ({"object_name": "records/1"}, "object_name must be bytes"),
        ({"object_name": b""}, "object_name must be 1..4096"),
        ({"object_name": b"x" * 4097}, "object_name must be 1..4096"),
    ],
)
def test_binding_is_validated_on_construction(kwargs, match):
    fields = {"tenant_id": "tenant-a", "workspace_id": "ws-1", "object_name": b"o", **kwargs}
    with pytest.raises(ValidationError, match=match):
        ObjectBinding(**fields)


def test_object_names_are_opaque_bytes():
    name = b"../\x00..\\%2e%2e/\xff\xfe/"
    binding = ObjectBinding("tenant-a", "ws-1", name)
    ct = encrypt_bytes(b"data", dek=DEK, dek_id="d", binding=binding, segment_size=SEG)
    assert decrypt_to_bytes(ct, binding=binding, dek_for=_dek_for) == b"data"
    with pytest.raises(IntegrityError):
        decrypt_to_bytes(ct, binding=ObjectBinding("tenant-a", "ws-1", name[:-1]), dek_for=_dek_for)


def test_bad_dek_or_dek_id_fails_before_anything_is_produced():
    with pytest.raises(ValidationError, match="SecretBytes of 32 bytes"):
        encrypt_iter([b"x"], dek=SecretBytes(os.urandom(16)), dek_id="d", binding=BINDING)
    with pytest.raises(ValidationError, match="SecretBytes of 32 bytes"):
        encrypt_iter([b"x"], dek=os.urandom(32), dek_id="d", binding=BINDING)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="dek_id must be 1..128"):
        encrypt_iter([b"x"], dek=DEK, dek_id="d" * 129, binding=BINDING)
    dst = io.BytesIO()
    with pytest.raises(ValidationError):
        encrypt_stream(io.BytesIO(b"x"), dst, dek=DEK, dek_id="", binding=BINDING)
    assert dst.getvalue() == b""


def test_dek_for_is_not_called_for_an_object_of_another_tenant_or_workspace():
    ct = _encrypt(b"secret record")
    calls = []

    def dek_for(header):
        calls.append(header)
        return DEK

    for binding, match in [
        (ObjectBinding("tenant-b", "ws-1", BINDING.object_name), "another tenant"),
        (ObjectBinding("tenant-a", "ws-2", BINDING.object_name), "another workspace"),
    ]:
        with pytest.raises(IntegrityError, match=match) as info:
            decrypt_iter(io.BytesIO(ct), binding=binding, dek_for=dek_for)
        assert "tenant-a" not in str(info.value)  # the object's real owner is not revealed
    assert calls == []


def test_dek_for_errors_propagate_unchanged():
    from archive_kms.errors import KeyUnavailableError

    def revoked(header):
        raise KeyUnavailableError("key disabled", resource="arn:aws:kms:...:key/1", state="Disabled")

    with pytest.raises(KeyUnavailableError):
        decrypt_iter(io.BytesIO(_encrypt(b"x")), binding=BINDING, dek_for=revoked)


def test_wrong_length_dek_from_dek_for_is_rejected():
    with pytest.raises(ValidationError):
        decrypt_iter(io.BytesIO(_encrypt(b"x")), binding=BINDING, dek_for=lambda h: SecretBytes(b"k" * 31))


def test_header_round_trips_and_is_canonical():
    ct = _encrypt(b"x")
    header = read_header(io.BytesIO(ct))
    assert ct.startswith(header.to_bytes())
    assert len(header.to_bytes()) == header.encoded_len
    assert read_header(io.BytesIO(header.to_bytes())) == header


def test_largest_header_is_within_bounds():
    binding = ObjectBinding("t" * 63, "w" * 128, b"o")
    ct = encrypt_bytes(b"", dek=DEK, dek_id="d" * 128, binding=binding, segment_size=SEG)
    header = read_header(io.BytesIO(ct))
    assert header.encoded_len == 50 + 3 + 63 + 128 + 128 == 372 <= MAX_HEADER_LEN
    assert decrypt_to_bytes(ct, binding=binding, dek_for=_dek_for) == b""


class _CountingReader(io.RawIOBase):
    """Records every read size: read_header must never ask for more than its bounds."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.requests.append(n)
        return self._src.read(n)


def test_read_header_reads_only_the_header_in_bounded_requests():
    ct = _encrypt(os.urandom(3 * SEG))
    reader = _CountingReader(ct)
    header = read_header(reader)
    assert sum(reader.requests) == header.encoded_len
    assert all(0 < n <= MAX_HEADER_LEN for n in reader.requests)


def test_oversize_header_len_is_rejected_before_reading_the_rest():
    reader = _CountingReader(b"AKMS\x01\xff\xff" + b"\x00" * 100_000)
    with pytest.raises(FormatError, match="header_len 65535 out of bounds"):
        read_header(reader)
    assert reader.requests == [7]


class _TrickleReader(io.RawIOBase):
    """Returns at most 3 bytes per read, like a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._src.read(min(n, 3) if n >= 0 else 3)


def test_short_reads_from_the_source_are_handled():
    plaintext = os.urandom(SEG + 10)
    ct = _encrypt(plaintext)
    assert b"".join(decrypt_iter(_TrickleReader(ct), binding=BINDING, dek_for=_dek_for)) == plaintext
    dst = io.BytesIO()
    encrypt_stream(_TrickleReader(plaintext), dst, dek=DEK, dek_id="d", binding=BINDING, segment_size=SEG)
    assert decrypt_to_bytes(dst.getvalue(), binding=BINDING, dek_for=_dek_for) == plaintext


def test_a_source_returning_more_than_asked_is_refused():
    class Greedy(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            return b"A" * (n + 10)

    with pytest.raises(ValidationError, match="more bytes than requested"):
        read_header(Greedy())


def test_segment_count_limit(monkeypatch):
    monkeypatch.setattr(envelope, "MAX_SEGMENTS", 2)
    assert decrypt_to_bytes(_encrypt(os.urandom(2 * SEG)), binding=BINDING, dek_for=_dek_for)
    with pytest.raises(ValidationError, match="object too large"):
        _encrypt(os.urandom(2 * SEG + 1))
    with pytest.raises(ValidationError, match="object too large"):
        ciphertext_size(2 * SEG + 1, 60, SEG)
    monkeypatch.undo()
    ct = _encrypt(os.urandom(2 * SEG + 1))
    monkeypatch.setattr(envelope, "MAX_SEGMENTS", 2)
    with pytest.raises(IntegrityError, match="too many segments"):
        decrypt_to_bytes(ct, binding=BINDING, dek_for=_dek_for)


def test_ciphertext_size_formula_and_limits():
    assert ciphertext_size(0, 60, SEG) == 60 + 16
    assert ciphertext_size(SEG, 60, SEG) == 60 + SEG + 16
    assert ciphertext_size(SEG + 1, 60, SEG) == 60 + SEG + 1 + 32
    max_object = MAX_SEGMENT_SIZE * (2**32 - 1)
    assert ciphertext_size(max_object, 60, MAX_SEGMENT_SIZE) == 60 + max_object + 16 * (2**32 - 1)
    with pytest.raises(ValidationError, match="object too large"):
        ciphertext_size(max_object + 1, 60, MAX_SEGMENT_SIZE)
    for args in [(-1, 60, SEG), (0, 55, SEG), (0, MAX_HEADER_LEN + 1, SEG), (0, 60, 100)]:
        with pytest.raises(ValidationError):
            ciphertext_size(*args)


def test_decrypt_stream_into_a_real_file_leaves_it_empty_on_failure(tmp_path):
    plaintext = os.urandom(3 * SEG)
    damaged = _encrypt(plaintext)[:-1]
    target = tmp_path / "staging.bin"
    with target.open("wb") as dst, pytest.raises(IntegrityError, match="segment 2 failed"):
        decrypt_stream(io.BytesIO(damaged), dst, binding=BINDING, dek_for=_dek_for)
    assert target.read_bytes() == b""


def test_a_destination_that_cannot_be_rolled_back_is_flagged():
    class NoTruncate(io.BytesIO):
        def truncate(self, size=None):
            raise OSError("truncate not supported")

    dst = NoTruncate()
    with pytest.raises(IntegrityError) as info:
        decrypt_stream(io.BytesIO(_encrypt(os.urandom(2 * SEG))[:-1]), dst, binding=BINDING, dek_for=_dek_for)
    assert any("discard it" in note for note in info.value.__notes__)


def test_the_deterministic_vector_hook_is_not_used_by_product_code():
    src = Path(envelope.__file__).parents[1]
    users = [p for p in src.rglob("*.py") if "_encrypt_iter_with" in p.read_text() and p.name != "envelope.py"]
    assert users == []
