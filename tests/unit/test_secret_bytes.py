"""SecretBytes: explicit access, no pickling or copies, constant-time equality, wipe."""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import pickle
import subprocess
import sys

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError


def test_reveal_returns_the_bytes_and_length_is_public():
    raw = os.urandom(32)
    secret = SecretBytes(raw)
    assert secret.reveal() == raw and isinstance(secret.reveal(), bytes)
    assert len(secret) == 32
    assert SecretBytes(bytearray(raw)).reveal() == raw
    assert SecretBytes(memoryview(raw)).reveal() == raw


def test_input_is_copied():
    raw = bytearray(b"k" * 32)
    secret = SecretBytes(raw)
    raw[:] = b"x" * 32
    assert secret.reveal() == b"k" * 32


def test_repr_is_length_and_fingerprint_label():
    secret = SecretBytes(b"\x01" * 32)
    text = repr(secret)
    assert text == f"SecretBytes(<32 bytes, id={secret.fingerprint}>)"
    assert str(secret) == f"{secret}" == f"{secret!s}" == text
    assert len(secret.fingerprint) == 8 and int(secret.fingerprint, 16) >= 0
    # same key, same label (within this process); different key, different label
    assert SecretBytes(b"\x01" * 32).fingerprint == secret.fingerprint
    assert SecretBytes(b"\x02" * 32).fingerprint != secret.fingerprint


def test_fingerprint_is_not_a_plain_hash_and_differs_across_processes():
    raw = b"\x07" * 32
    label = SecretBytes(raw).fingerprint
    assert label != hashlib.sha256(raw).hexdigest()[:8]
    assert label != hmac.new(b"", raw, hashlib.sha256).hexdigest()[:8]
    code = "from archive_kms.crypto.secrets import SecretBytes; print(SecretBytes(b'\\x07' * 32).fingerprint)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert len(other) == 8 and other != label  # 2^-32 chance of a false failure


def test_no_implicit_bytes_conversion():
    secret = SecretBytes(b"k" * 32)
    with pytest.raises(TypeError):
        bytes(secret)
    with pytest.raises(TypeError):
        memoryview(secret)
    with pytest.raises(TypeError):
        iter(secret)
    assert not hasattr(secret, "__dict__")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_refused(protocol):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(SecretBytes(b"k" * 32), protocol=protocol)


def test_copy_is_refused():
    secret = SecretBytes(b"k" * 32)
    with pytest.raises(TypeError):
        copy.copy(secret)
    with pytest.raises(TypeError):
        copy.deepcopy({"key": secret})


def test_equality_is_between_secrets_only_and_unhashable():
    a, b, c = SecretBytes(b"k" * 32), SecretBytes(b"k" * 32), SecretBytes(b"j" * 32)
    assert a == b and not (a != b)
    assert a != c and not (a == c)
    assert a != SecretBytes(b"k" * 31)
    assert a != b"k" * 32  # never equal to raw bytes
    with pytest.raises(TypeError):
        hash(a)


def test_wipe_zeroes_the_copy_and_blocks_use():
    secret = SecretBytes(b"k" * 32)
    buf = secret._buf
    secret.wipe()
    assert bytes(buf) == b"\x00" * 32 and buf is secret._buf
    assert repr(secret) == "SecretBytes(<wiped>)"
    with pytest.raises(ValidationError, match="wiped"):
        secret.reveal()
    secret.wipe()  # idempotent


def test_random():
    a, b = SecretBytes.random(), SecretBytes.random()
    assert len(a) == 32 and a != b
    with pytest.raises(ValidationError):
        SecretBytes.random(0)
    with pytest.raises(TypeError):
        SecretBytes("a string")  # type: ignore[arg-type]
