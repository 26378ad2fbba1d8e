"""Key bytes never appear in repr/str of SecretBytes, headers and results, nor in any error
raised by the envelope code (message, repr, args, chained causes, formatted traceback).

Checked forms of every key (the DEK and the derived per-object key): raw bytes (latin-1),
hex (lower/upper), base64 (standard/url-safe), Python bytes repr, and every 8-byte window
of the hex. Object plaintext is checked the same way.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import traceback

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from archive_kms.crypto.envelope import (
    ObjectBinding,
    decrypt_iter,
    decrypt_stream,
    decrypt_to_bytes,
    encrypt_bytes,
    encrypt_stream,
    read_header,
)
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ArchiveKmsError, IntegrityError

SEG = 4096
RAW_DEK = os.urandom(32)
DEK = SecretBytes(RAW_DEK)
BINDING = ObjectBinding("tenant-a", "ws-1", b"records/0001.json")
PLAINTEXT = os.urandom(2 * SEG + 500)
CIPHERTEXT = encrypt_bytes(PLAINTEXT, dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=SEG)
HEADER = read_header(io.BytesIO(CIPHERTEXT))
OBJECT_KEY = HKDF(
    algorithm=hashes.SHA256(),
    length=32,
    salt=HEADER.salt,
    info=b"archive_kms/v1/object" + BINDING._context(),
).derive(RAW_DEK)


def _forms(secret: bytes) -> list[str]:
    hexed = secret.hex()
    forms = [
        secret.decode("latin-1"),
        hexed,
        hexed.upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
    ]
    forms += [hexed[i : i + 16] for i in range(0, len(hexed) - 15, 2)]
    return forms


SECRETS = {"dek": RAW_DEK, "object key": OBJECT_KEY, "plaintext": PLAINTEXT[:64]}


def assert_clean(text: str, what: str) -> None:
    for name, secret in SECRETS.items():
        for form in _forms(secret):
            assert form not in text, f"{name} appears in {what}"


def _exception_text(exc: BaseException) -> str:
    return "\n".join(
        [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    )


def test_the_helper_detects_each_form():
    for form in _forms(RAW_DEK)[:6]:
        with pytest.raises(AssertionError):
            assert_clean(f"error: {form}", "probe")


def test_secret_bytes_presentation():
    for text in (repr(DEK), str(DEK), f"{DEK}", f"{DEK!r:>80}", repr([DEK]), repr({"k": DEK})):
        assert_clean(text, "SecretBytes presentation")
    with pytest.raises(TypeError) as info:
        pickle.dumps(DEK)
    assert_clean(_exception_text(info.value), "pickle error")


def test_header_and_results_presentation():
    dst = io.BytesIO()
    enc = encrypt_stream(io.BytesIO(PLAINTEXT), dst, dek=DEK, dek_id="dek-1", binding=BINDING, segment_size=SEG)
    dec = decrypt_stream(io.BytesIO(dst.getvalue()), io.BytesIO(), binding=BINDING, dek_for=lambda h: DEK)
    for obj in (HEADER, enc, dec, enc.header, BINDING):
        assert_clean(repr(obj), type(obj).__name__)
        assert_clean(str(obj), type(obj).__name__)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _tamper_cases():
    hl = HEADER.encoded_len
    other_name = ObjectBinding("tenant-a", "ws-1", b"records/0002.json")
    other_tenant = ObjectBinding("tenant-b", "ws-1", BINDING.object_name)
    return {
        "flip-header": (_flip(CIPHERTEXT, 20), BINDING),
        "flip-body": (_flip(CIPHERTEXT, hl + 5000), BINDING),
        "flip-tag": (_flip(CIPHERTEXT, len(CIPHERTEXT) - 1), BINDING),
        "truncated-boundary": (CIPHERTEXT[: hl + SEG + 16], BINDING),
        "truncated-inside": (CIPHERTEXT[:-7], BINDING),
        "trailing": (CIPHERTEXT + b"\x00", BINDING),
        "wrong-name": (CIPHERTEXT, other_name),
        "wrong-tenant": (CIPHERTEXT, other_tenant),
        "bad-magic": (b"XXXX" + CIPHERTEXT[4:], BINDING),
        "bad-version": (CIPHERTEXT[:4] + b"\x09" + CIPHERTEXT[5:], BINDING),
        "header-only": (CIPHERTEXT[:hl], BINDING),
    }


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tamper_errors_carry_no_key_or_plaintext(case):
    data, binding = _tamper_cases()[case]
    errors = []
    for run in (
        lambda: decrypt_to_bytes(data, binding=binding, dek_for=lambda h: DEK),
        lambda: decrypt_stream(io.BytesIO(data), io.BytesIO(), binding=binding, dek_for=lambda h: DEK),
    ):
        with pytest.raises(ArchiveKmsError) as info:
            run()
        errors.append(info.value)
    iterator = None
    with pytest.raises(ArchiveKmsError) as info:
        iterator = decrypt_iter(io.BytesIO(data), binding=binding, dek_for=lambda h: DEK)
        list(iterator)
    errors.append(info.value)
    if iterator is not None:  # the "already failed" error chains the first one
        with pytest.raises(ArchiveKmsError) as again:
            next(iterator)
        errors.append(again.value)
    for exc in errors:
        assert_clean(_exception_text(exc), f"{case}: {type(exc).__name__}")


def test_caller_errors_carry_no_key():
    attempts = [
        lambda: encrypt_bytes(b"x", dek=SecretBytes(RAW_DEK[:31]), dek_id="d", binding=BINDING),
        lambda: encrypt_bytes(b"x", dek=RAW_DEK, dek_id="d", binding=BINDING),  # raw bytes instead of SecretBytes
        lambda: encrypt_bytes(b"x", dek=DEK, dek_id="d\n", binding=BINDING),
        lambda: decrypt_to_bytes(CIPHERTEXT, binding=BINDING, dek_for=lambda h: SecretBytes(OBJECT_KEY[:16])),
    ]
    wiped = SecretBytes(RAW_DEK)
    wiped.wipe()
    attempts.append(lambda: decrypt_to_bytes(CIPHERTEXT, binding=BINDING, dek_for=lambda h: wiped))
    for attempt in attempts:
        with pytest.raises(ArchiveKmsError) as info:
            attempt()
        assert_clean(_exception_text(info.value), f"{type(info.value).__name__}: {info.value}")


def test_wrong_key_error_carries_neither_key():
    other = SecretBytes(os.urandom(32))
    with pytest.raises(IntegrityError) as info:
        decrypt_to_bytes(CIPHERTEXT, binding=BINDING, dek_for=lambda h: other)
    text = _exception_text(info.value)
    assert_clean(text, "wrong-key error")
    for form in _forms(other.reveal()):
        assert form not in text, "the wrong key appears in the error"
