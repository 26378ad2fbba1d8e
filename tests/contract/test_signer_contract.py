"""The platform signer's contract, over its three backends on the real services: a local
Ed25519 PEM key, an ECDSA P-256 key in LocalStack KMS, and an EC P-256 key in the Key
Vault emulator (docs/key-hierarchy.md section 7, ADR 0040).

Each backend must: sign and verify round trip (64 bytes); keep purposes apart; refuse a
wrong key id, a tampered message or signature; give the same key id to a signer built in
another process; and refuse a signature made by a key other than the pinned one (a key
swapped behind the reference). The algorithm always comes from the verifier's key.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.signing import SIGNATURE_SIZE, RemoteSigningKey, Signer, Verifier
from archive_kms.errors import IntegrityError
from archive_kms.operations.platform import remote_signer

BACKENDS = ["pem", "aws-kms", "azure-kv"]


@dataclass
class SigningKeyFactory:
    """Makes signing keys of one backend: ``new()`` -> (signer, the settings that name it)."""

    backend: str
    settings: Settings
    tmp: Path
    cleanup: list[Callable[[], None]]

    def new(self) -> tuple[Signer, dict[str, str]]:
        if self.backend == "pem":
            path = self.tmp / f"{uuid.uuid4().hex}.pem"
            return Signer.create_key_file(path), {"ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH": str(path)}
        ref = self._create_remote_key()
        return remote_signer(ref, self.settings), {"ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_REF": ref}

    def _create_remote_key(self) -> str:
        if self.backend == "aws-kms":
            kms = clients.kms_client(self.settings)
            md = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Description="archive-kms signer test")[
                "KeyMetadata"
            ]
            self.cleanup.append(lambda: kms.schedule_key_deletion(KeyId=md["KeyId"], PendingWindowInDays=7))
            return f"aws-kms://{md['Arn']}"
        keys = clients.keyvault_key_client(self.settings)
        key = keys.create_ec_key(f"signer-{uuid.uuid4().hex[:12]}", curve="P-256")
        self.cleanup.append(lambda: keys.begin_delete_key(key.name).wait())
        host_port = self.settings.azure_keyvault_url.removeprefix("https://")  # type: ignore[union-attr]
        return f"azure-kv://{host_port}/keys/{key.name}"


@pytest.fixture(params=BACKENDS)
def signing_keys(request, localstack: Settings, keyvault: Settings, tmp_path: Path) -> Iterator[SigningKeyFactory]:
    factory = SigningKeyFactory(request.param, localstack, tmp_path, [])
    yield factory
    for undo in factory.cleanup:
        undo()


EXPECTED_PREFIX = {"pem": "ed25519:", "aws-kms": "ecdsa-p256:", "azure-kv": "ecdsa-p256:"}


def test_sign_and_verify_round_trip(signing_keys: SigningKeyFactory) -> None:
    signer, _ = signing_keys.new()
    assert signer.key_id.startswith(EXPECTED_PREFIX[signing_keys.backend])
    message = b"keychain record \x00\xff" * 100
    signature = signer.sign(message, purpose="keychain-record/v1")
    assert isinstance(signature, bytes) and len(signature) == SIGNATURE_SIZE
    signer.verifier().verify(message, signature, key_id=signer.key_id, purpose="keychain-record/v1")
    # A customer holding only the public PEM verifies the same signature.
    Verifier.from_public_pem(signer.public_key_pem()).verify(
        message, signature, key_id=signer.key_id, purpose="keychain-record/v1"
    )
    # Large messages are fine (a remote key is sent only the SHA-256 digest).
    big = os.urandom(1 << 20)
    signer.verifier().verify(big, signer.sign(big, purpose="p"), key_id=signer.key_id, purpose="p")


def test_purposes_are_kept_apart_and_tampering_is_refused(signing_keys: SigningKeyFactory) -> None:
    signer, _ = signing_keys.new()
    verifier = signer.verifier()
    signature = signer.sign(b"erase tenant t1", purpose="erasure-record/v1")
    with pytest.raises(IntegrityError, match="does not verify"):
        verifier.verify(b"erase tenant t1", signature, key_id=signer.key_id, purpose="keychain-record/v1")
    with pytest.raises(IntegrityError, match="does not verify"):
        verifier.verify(b"erase tenant t2", signature, key_id=signer.key_id, purpose="erasure-record/v1")
    for i in (0, 31, 32, 63):
        flipped = bytearray(signature)
        flipped[i] ^= 0x01
        with pytest.raises(IntegrityError):
            verifier.verify(b"erase tenant t1", bytes(flipped), key_id=signer.key_id, purpose="erasure-record/v1")
    with pytest.raises(IntegrityError, match="not 64 bytes"):
        verifier.verify(b"erase tenant t1", signature[:-1], key_id=signer.key_id, purpose="erasure-record/v1")


def test_a_wrong_key_id_is_refused(signing_keys: SigningKeyFactory) -> None:
    signer, _ = signing_keys.new()
    other, _ = signing_keys.new()
    both = Verifier.from_public_pem(signer.public_key_pem(), other.public_key_pem())
    signature = signer.sign(b"m", purpose="p")
    with pytest.raises(IntegrityError, match="does not verify"):
        both.verify(b"m", signature, key_id=other.key_id, purpose="p")
    with pytest.raises(IntegrityError, match="unknown key"):
        other.verifier().verify(b"m", signature, key_id=signer.key_id, purpose="p")
    # the other algorithm's key id for the same bytes: never checked another way
    foreign = ("ed25519:" if signer.algorithm != "ed25519" else "ecdsa-p256:") + signer.key_id.split(":")[1]
    with pytest.raises(IntegrityError, match="unknown key"):
        both.verify(b"m", signature, key_id=foreign, purpose="p")


def test_the_key_id_is_stable_across_processes(signing_keys: SigningKeyFactory) -> None:
    signer, env = signing_keys.new()
    code = (
        "from archive_kms.config import Settings\n"
        "from archive_kms.operations.platform import platform_signer\n"
        "s = platform_signer(Settings())\n"
        "import json; print(json.dumps([s.key_id, s.public_key_pem().decode()]))\n"
    )
    child_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    key_id, pem = json.loads(out.stdout.strip().splitlines()[-1])
    assert key_id == signer.key_id
    assert pem.encode() == signer.public_key_pem()


class _SwappedKey:
    """A remote key whose service answers with another key's signatures (the key behind the
    reference changed after the signer pinned its public key)."""

    def __init__(self, pinned: RemoteSigningKey, signing: RemoteSigningKey) -> None:
        self._pinned, self._signing = pinned, signing
        self.key_ref = pinned.key_ref

    def public_key(self) -> Any:
        return self._pinned.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        return self._signing.sign_digest(digest)


def test_a_signature_by_another_key_is_refused(signing_keys: SigningKeyFactory) -> None:
    signer, _ = signing_keys.new()
    other, _ = signing_keys.new()
    forged = other.sign(b"m", purpose="p")
    with pytest.raises(IntegrityError, match="does not verify"):
        signer.verifier().verify(b"m", forged, key_id=signer.key_id, purpose="p")
    if signing_keys.backend == "pem":
        return
    # The remote signer checks every signature against the pinned public key before use.
    swapped = Signer.remote(_SwappedKey(signer._remote, other._remote))  # type: ignore[arg-type]
    assert swapped.key_id == signer.key_id
    with pytest.raises(IntegrityError, match="pinned at start"):
        swapped.sign(b"m", purpose="p")


def test_the_signer_shows_no_key_material_and_cannot_be_pickled(signing_keys: SigningKeyFactory) -> None:
    signer, _ = signing_keys.new()
    shown = repr(signer) + str(signer)
    assert signer.key_id in shown and "PRIVATE" not in shown and "BEGIN" not in shown
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
