"""A fixed ECDSA P-256 signature (docs/key-hierarchy.md section 7, ADR 0040): the key id of
the public key, and a signature over a framed message in the r || s (low s) form,
verified by our ``Verifier`` and refused once any part changes. Written once from a fixed
private scalar; ECDSA signing is randomised, verification is not."""

from __future__ import annotations

import pytest

from archive_kms.crypto.signing import Verifier
from archive_kms.errors import IntegrityError

PUBLIC_PEM = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqNJmLsQwgma1p0mpwZ/zG9tt6OU7
9SXKWaQnEAIz5MoJNRZcw64FGOJFgeLvyaB6IIRx6MGB3EpmVVt83S/lcA==
-----END PUBLIC KEY-----
"""
KEY_ID = "ecdsa-p256:1474983cc18214ba"
MESSAGE = b'{"format":"test"}'
PURPOSE = "erasure-certificate/v1"
SIGNATURE = bytes.fromhex(
    "c9897792463fd8d09e990874bfa265f4586da395884e16a66bc47d22d158f5c0"
    "208ee6317938491a46880b7a636d7d4df76cc7401f443a233cd962340dd82868"
)
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def test_the_fixed_ecdsa_signature_verifies_under_its_key_id() -> None:
    verifier = Verifier.from_public_pem(PUBLIC_PEM)
    assert verifier.key_ids == (KEY_ID,)
    verifier.verify(MESSAGE, SIGNATURE, key_id=KEY_ID, purpose=PURPOSE)


@pytest.mark.parametrize(
    ("message", "signature", "purpose"),
    [
        (MESSAGE + b" ", SIGNATURE, PURPOSE),
        (MESSAGE, SIGNATURE, "erasure-record/v1"),
        (MESSAGE, SIGNATURE[:32] + (N - int.from_bytes(SIGNATURE[32:], "big")).to_bytes(32, "big"), PURPOSE),
        (MESSAGE, SIGNATURE[32:] + SIGNATURE[:32], PURPOSE),
    ],
    ids=["message", "purpose", "high-s twin", "r and s swapped"],
)
def test_any_change_is_refused(message: bytes, signature: bytes, purpose: str) -> None:
    with pytest.raises(IntegrityError):
        Verifier.from_public_pem(PUBLIC_PEM).verify(message, signature, key_id=KEY_ID, purpose=purpose)
