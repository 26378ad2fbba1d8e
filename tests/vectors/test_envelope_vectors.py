"""Known-answer and tampered vectors for envelope format v1 (tests/vectors/data/envelope_v1.json).

Valid vectors must decrypt to the recorded plaintext digest *and* re-encrypt to the exact
same bytes. Tampered vectors must raise exactly the recorded error class with the recorded
message fragment, and release no plaintext: ``decrypt_stream`` leaves a seekable staging
buffer empty, ``decrypt_to_bytes`` returns nothing, and ``decrypt_iter`` yields only
segments whose tags verified (checked against the true plaintext of the reference object).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

from archive_kms import errors
from archive_kms.crypto import envelope
from archive_kms.crypto.envelope import ObjectBinding, decrypt_iter, decrypt_stream, decrypt_to_bytes, read_header
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError

HERE = Path(__file__).parent
DATA = json.loads((HERE / "data" / "envelope_v1.json").read_text())
VECTORS = DATA["vectors"]
VALID = [v for v in VECTORS if v["result"] == "valid"]
INVALID = [v for v in VECTORS if v["result"] == "invalid"]


@functools.cache
def _generator():
    spec = importlib.util.spec_from_file_location("generate_envelope_vectors", HERE / "generate_envelope_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _binding(v: dict) -> ObjectBinding:
    return ObjectBinding(v["tenant_id"], v["workspace_id"], bytes.fromhex(v["object_name"]))


def _dek_for(v: dict):
    def dek_for(header):
        return SecretBytes(bytes.fromhex(v["dek"]))

    return dek_for


def test_vector_file_is_complete_and_current():
    assert len(VALID) >= 8 and len(INVALID) >= 40
    assert {"IntegrityError", "FormatError"} == {v["error"] for v in INVALID}
    assert len({v["id"] for v in VECTORS}) == len(VECTORS)
    assert _generator().render() == (HERE / "data" / "envelope_v1.json").read_text()


@pytest.mark.parametrize("v", VALID, ids=[v["id"] for v in VALID])
def test_valid_vector(v):
    ct = bytes.fromhex(v["ciphertext"])
    header = read_header(io.BytesIO(ct))
    assert (header.tenant_id, header.workspace_id, header.dek_id) == (v["tenant_id"], v["workspace_id"], v["dek_id"])
    assert (header.salt.hex(), header.nonce_prefix.hex()) == (v["salt"], v["nonce_prefix"])
    assert header.segment_size == v["segment_size"] and header.encoded_len == v["header_len"]
    assert len(ct) == envelope.ciphertext_size(v["plaintext_size"], v["header_len"], v["segment_size"])

    dst = io.BytesIO()
    result = decrypt_stream(io.BytesIO(ct), dst, binding=_binding(v), dek_for=_dek_for(v))
    assert hashlib.sha256(dst.getvalue()).hexdigest() == v["plaintext_sha256"]
    assert result.plaintext_sha256 == v["plaintext_sha256"]
    assert (result.plaintext_size, result.ciphertext_size) == (v["plaintext_size"], len(ct))

    # Encryption direction: the same inputs give the same bytes.
    plaintext = _generator().plaintext(v["plaintext_size"])
    again = b"".join(
        envelope._encrypt_iter_with(
            [plaintext],
            dek=SecretBytes(bytes.fromhex(v["dek"])),
            dek_id=v["dek_id"],
            binding=_binding(v),
            segment_size=v["segment_size"],
            salt=bytes.fromhex(v["salt"]),
            nonce_prefix=bytes.fromhex(v["nonce_prefix"]),
        )
    )
    assert again == ct


@pytest.mark.parametrize("v", INVALID, ids=[v["id"] for v in INVALID])
def test_tampered_vector(v):
    ct = bytes.fromhex(v["ciphertext"])
    expected = getattr(errors, v["error"])

    staging = io.BytesIO()
    with pytest.raises(IntegrityError) as info:
        decrypt_stream(io.BytesIO(ct), staging, binding=_binding(v), dek_for=_dek_for(v))
    assert type(info.value) is expected
    assert v["error_contains"] in str(info.value)
    assert staging.getvalue() == b"", "decrypt_stream left plaintext in the staging destination"

    with pytest.raises(expected):
        decrypt_to_bytes(ct, binding=_binding(v), dek_for=_dek_for(v))

    # Streaming form: whatever was yielded before the error is an authenticated prefix made of
    # whole segments of the reference plaintext (all tampered vectors derive from it).
    released = []
    with pytest.raises(expected):
        for piece in decrypt_iter(io.BytesIO(ct), binding=_binding(v), dek_for=_dek_for(v)):
            released.append(piece)
    got = b"".join(released)
    assert got == _generator().plaintext(len(got))
    assert len(got) % 4096 == 0
