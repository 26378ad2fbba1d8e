"""Smoke test: the official azure-keyvault-keys SDK against our Key Vault emulator.

``localstack/keyvault_emulator.py`` stands in for Azure Key Vault (BYOKV mode). This module
proves that ``KeyClient`` and ``CryptographyClient`` work against it unmodified, with TLS
verified against the emulator's own certificate (never with verification off), and that it
enforces key state the way Azure does.

Unlike the other integration tests, which use the services ``archive-kms stack up``
started, **this module starts the emulator itself**: one subprocess on a free loopback port
with a temporary state directory, restarted once to check that keys survive a restart. It
uses none of the stack fixtures and needs nothing but the project venv, so it runs (and is
meant to pass) whether or not the stack is up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import selectors
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.keyvault.keys import KeyClient, KeyOperation, KeyType
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

EMULATOR = Path(__file__).resolve().parents[2] / "localstack" / "keyvault_emulator.py"
CHALLENGE = (
    'Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", '
    'resource="https://vault.azure.net"'
)
WRAP_OPS = [KeyOperation.wrap_key, KeyOperation.unwrap_key]
OAEP_256 = KeyWrapAlgorithm.rsa_oaep_256
LOG_LINE = re.compile(
    r"^keyvault-emulator: (?:(?:GET|POST|PUT|PATCH|DELETE) /[A-Za-z0-9/_-]* \d{3}|connection dropped \(\w+\))$"
)

pytestmark = pytest.mark.timeout(180)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StaticTokenCredential:
    """A TokenCredential that always returns the same bearer token (the emulator accepts any)."""

    def get_token(
        self, *scopes: str, claims: str | None = None, tenant_id: str | None = None, **kwargs: Any
    ) -> AccessToken:
        return AccessToken("emulator-test-token", int(time.time()) + 3600)


class Emulator:
    """The emulator as a subprocess; ``restart()`` keeps the port and the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / "emulator.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.startup_seconds: list[float] = []

    @property
    def cert(self) -> str:
        return str(self.state_dir / "tls" / "cert.pem")

    def start(self) -> None:
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(EMULATOR),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--state-dir",
                    str(self.state_dir),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                self.stop()
                pytest.fail(f"emulator not ready after 30 s; log:\n{self.log_path.read_text()}")
        line = self.proc.stdout.readline().strip()
        assert line == f"keyvault-emulator ready on {self.url}", (line, self.log_path.read_text())
        assert requests.get(f"{self.url}/ping", verify=self.cert, timeout=5).text == "pong"
        self.startup_seconds.append(time.monotonic() - started)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emu = Emulator(tmp_path_factory.mktemp("keyvault") / "state")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def transport(emulator: Emulator) -> RequestsTransport:
    return RequestsTransport(connection_verify=emulator.cert)


def key_client(emulator: Emulator) -> KeyClient:
    return KeyClient(
        emulator.url, StaticTokenCredential(), verify_challenge_resource=False, transport=transport(emulator)
    )


def crypto_client(emulator: Emulator, key_id: str) -> CryptographyClient:
    return CryptographyClient(
        key_id, StaticTokenCredential(), verify_challenge_resource=False, transport=transport(emulator)
    )


@pytest.fixture
def kc(emulator: Emulator) -> Iterator[KeyClient]:
    with key_client(emulator) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def server_op(kc: KeyClient, key_id: str, op: str, body: dict[str, Any]) -> Any:
    """A crypto operation done by the server (the CryptographyClient would wrap locally)."""
    path = urlsplit(key_id).path
    return kc.send_request(HttpRequest("POST", f"{path}/{op}", json=body))


def server_wrap(kc: KeyClient, key_id: str, plaintext: bytes, alg: str = OAEP_256.value) -> bytes:
    response = server_op(kc, key_id, "wrapkey", {"alg": alg, "value": b64url(plaintext)})
    assert response.status_code == 200, response.text()
    assert response.json()["kid"].startswith(key_id)
    return unb64url(response.json()["value"])


def error_of(response: Any) -> tuple[int, str, str]:
    err = response.json()["error"]
    return response.status_code, err["code"], err["message"]


# --------------------------------------------------------------------------- tests


def test_ping_tls_and_unauthenticated_challenge(emulator: Emulator) -> None:
    assert requests.get(f"{emulator.url}/ping", verify=emulator.cert, timeout=5).text == "pong"
    with pytest.raises(requests.exceptions.SSLError):  # real TLS: not trusted without its cert
        requests.get(f"{emulator.url}/ping", verify=True, timeout=5)

    response = requests.get(f"{emulator.url}/keys?api-version=7.6", verify=emulator.cert, timeout=5)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert response.json()["error"]["code"] == "Unauthorized"

    also_local = requests.get(
        f"https://localhost:{emulator.port}/keys?api-version=7.6",
        headers={"Authorization": "Bearer anything"},
        verify=emulator.cert,
        timeout=5,
    )
    assert also_local.status_code == 200  # certificate covers localhost too; any bearer token is accepted


def test_create_rsa_key_and_wrap_round_trips(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("wrap")
    key = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS, tags={"tenant": "t1"})
    assert key.key_type == KeyType.rsa
    assert key.key_operations == WRAP_OPS
    assert key.id.startswith(f"{emulator.url}/keys/{name}/")
    assert len(key.key.n) == 256 and key.key.e == b"\x01\x00\x01"
    assert key.properties.enabled is True and key.properties.tags == {"tenant": "t1"}
    assert key.properties.recovery_level == "Recoverable+Purgeable"

    cc = crypto_client(emulator, key.id)
    dek = os.urandom(32)

    # Server-side wrap, server-side unwrap.
    wrapped = server_wrap(kc, key.id, dek)
    assert len(wrapped) == 256
    assert cc.unwrap_key(OAEP_256, wrapped).key == dek

    # The SDK wraps locally with the public key it fetched; the server must unwrap that.
    wraps_before = sum("/wrapkey" in line for line in emulator.log_lines())
    local = cc.wrap_key(OAEP_256, dek)
    assert sum("/wrapkey" in line for line in emulator.log_lines()) == wraps_before, "expected a local wrap"
    assert local.key_id == key.id
    assert cc.unwrap_key(OAEP_256, local.encrypted_key).key == dek

    # RSA-OAEP (SHA-1) as well.
    assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep, server_wrap(kc, key.id, dek, "RSA-OAEP")).key == dek

    # A client given the versionless id resolves the current version.
    versionless = crypto_client(emulator, f"{emulator.url}/keys/{name}")
    assert versionless.unwrap_key(OAEP_256, wrapped).key == dek


def test_key_ops_are_enforced(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("ops")
    key = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS)

    denied = server_op(kc, key.id, "encrypt", {"alg": "RSA-OAEP-256", "value": b64url(b"x" * 16)})
    assert error_of(denied) == (403, "Forbidden", "Operation encrypt is not permitted on this key.")
    with pytest.raises(HttpResponseError) as info:  # local check refuses, server refuses too
        crypto_client(emulator, key.id).encrypt(EncryptionAlgorithm.rsa_oaep_256, b"x" * 16)
    assert info.value.status_code == 403

    wrapped = server_wrap(kc, key.id, b"k" * 32)
    kc.update_key_properties(name, key.properties.version, key_operations=[KeyOperation.wrap_key])
    with pytest.raises(HttpResponseError) as info:
        crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped)
    assert info.value.status_code == 403
    assert info.value.error.code == "Forbidden"
    assert info.value.error.message == "Operation unwrapKey is not permitted on this key."


def test_rotate_creates_version_and_old_version_still_unwraps(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("rot")
    old = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS)
    dek = os.urandom(32)
    wrapped_old = crypto_client(emulator, old.id).wrap_key(OAEP_256, dek).encrypted_key

    new = kc.rotate_key(name)
    assert new.properties.version != old.properties.version
    assert new.key_operations == WRAP_OPS
    assert new.key.n != old.key.n
    versions = {p.version for p in kc.list_properties_of_key_versions(name)}
    assert versions == {old.properties.version, new.properties.version}
    assert kc.get_key(name).properties.version == new.properties.version

    assert crypto_client(emulator, old.id).unwrap_key(OAEP_256, wrapped_old).key == dek
    with pytest.raises(HttpResponseError) as info:  # the new version is a different key
        crypto_client(emulator, new.id).unwrap_key(OAEP_256, wrapped_old)
    assert info.value.status_code == 400

    # A versionless server-side wrap uses the current version.
    response = server_op(kc, f"{emulator.url}/keys/{name}", "wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(dek)})
    assert response.json()["kid"] == new.id
    assert crypto_client(emulator, new.id).unwrap_key(OAEP_256, unb64url(response.json()["value"])).key == dek


def test_disabled_expired_and_not_yet_valid_versions_refuse(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("state")
    key = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS)
    version = key.properties.version
    dek = os.urandom(32)
    wrapped = server_wrap(kc, key.id, dek)
    cc = crypto_client(emulator, key.id)
    assert cc.unwrap_key(OAEP_256, wrapped).key == dek

    assert kc.update_key_properties(name, version, enabled=False).properties.enabled is False
    with pytest.raises(HttpResponseError) as info:
        cc.unwrap_key(OAEP_256, wrapped)
    assert info.value.status_code == 403
    assert info.value.error.code == "Forbidden"
    assert info.value.error.message == "Operation unwrapKey is not allowed on a disabled key."
    denied = server_op(kc, key.id, "wrapkey", {"alg": "RSA-OAEP-256", "value": b64url(dek)})
    assert error_of(denied)[:2] == (403, "Forbidden")
    assert kc.get_key(name, version).properties.enabled is False  # GET still answers, as in Azure

    assert kc.update_key_properties(name, version, enabled=True).properties.enabled is True
    assert cc.unwrap_key(OAEP_256, wrapped).key == dek

    from datetime import datetime, timedelta

    now = datetime.now(UTC)
    kc.update_key_properties(name, version, not_before=now + timedelta(hours=1))
    with pytest.raises(HttpResponseError) as info:
        crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped)
    assert info.value.status_code == 403 and "not yet valid" in info.value.error.message

    kc.update_key_properties(name, version, not_before=now - timedelta(hours=2), expires_on=now - timedelta(hours=1))
    with pytest.raises(HttpResponseError) as info:
        crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped)
    assert info.value.status_code == 403 and "expired" in info.value.error.message


def test_delete_recover_and_purge(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("del")
    key = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS)
    wrapped = server_wrap(kc, key.id, b"d" * 32)

    deleted = kc.begin_delete_key(name).result()
    assert deleted.recovery_id == f"{emulator.url}/deletedkeys/{name}"
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date > deleted.deleted_date
    with pytest.raises(ResourceNotFoundError):
        kc.get_key(name)
    with pytest.raises(ResourceNotFoundError):
        crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped)
    assert kc.get_deleted_key(name).properties.version == key.properties.version
    assert name in {d.name for d in kc.list_deleted_keys()}
    with pytest.raises(ResourceExistsError):  # the name is held while the key is recoverable
        kc.create_rsa_key(name, size=2048)

    recovered = kc.begin_recover_deleted_key(name).result()
    assert recovered.id == key.id
    assert crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped).key == b"d" * 32

    kc.begin_delete_key(name).wait()
    kc.purge_deleted_key(name)
    with pytest.raises(ResourceNotFoundError):
        kc.get_deleted_key(name)
    with pytest.raises(ResourceNotFoundError):
        kc.get_key(name)
    with pytest.raises(ResourceNotFoundError):
        kc.get_key(name, key.properties.version)
    assert name not in {p.name for p in kc.list_properties_of_keys()}


def test_bad_requests_answer_400_and_unknown_keys_404(emulator: Emulator, kc: KeyClient) -> None:
    name = unique("bad")
    key = kc.create_rsa_key(name, size=2048, key_operations=WRAP_OPS)
    cases = [
        {"alg": "RSA-OAEP-256", "value": "not base64!"},
        {"alg": "RSA1_5", "value": b64url(b"k" * 32)},
        {"alg": "A256KW", "value": b64url(b"k" * 32)},
        {"value": b64url(b"k" * 32)},
    ]
    for body in cases:
        status, code, _ = error_of(server_op(kc, key.id, "wrapkey", body))
        assert (status, code) == (400, "BadParameter"), body
    bad_json = HttpRequest(
        "POST", f"/keys/{name}/create", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert error_of(kc.send_request(bad_json))[:2] == (400, "BadParameter")
    garbage = {"alg": "RSA-OAEP-256", "value": b64url(b"\x00" * 256)}
    assert error_of(server_op(kc, key.id, "unwrapkey", garbage))[:2] == (400, "BadParameter")

    no_such_version = f"{emulator.url}/keys/{name}/{'0' * 32}"
    assert error_of(server_op(kc, no_such_version, "unwrapkey", garbage))[:2] == (404, "KeyNotFound")
    with pytest.raises(ResourceNotFoundError):
        kc.get_key(unique("missing"))
    with pytest.raises(ResourceNotFoundError):
        kc.get_key(name, "0" * 32)


def test_ec_p256_keys_sign_es256_as_key_vault_does(emulator: Emulator, kc: KeyClient) -> None:
    """An EC P-256 key (the platform signing key, ADR 0040): the JWK carries crv, x and y;
    ``sign`` takes a SHA-256 digest and answers the raw r || s (64 bytes, not DER), which
    verifies with the public key alone; key_ops and key state are enforced."""
    name = unique("ec")
    key = kc.create_ec_key(name, curve="P-256", hardware_protected=True)
    assert key.key_type == KeyType.ec_hsm and key.key.crv == "P-256"
    assert set(key.key_operations) == {"sign", "verify"}
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + key.key.x + key.key.y)
    digest = hashlib.sha256(b"keychain head").digest()
    result = crypto_client(emulator, key.id).sign(SignatureAlgorithm.es256, digest)
    assert result.key_id == key.id and len(result.signature) == 64
    r, s = int.from_bytes(result.signature[:32], "big"), int.from_bytes(result.signature[32:], "big")
    public.verify(encode_dss_signature(r, s), b"keychain head", ec.ECDSA(hashes.SHA256()))
    verified = server_op(
        kc, key.id, "verify", {"alg": "ES256", "digest": b64url(digest), "value": b64url(result.signature)}
    )
    assert verified.json()["value"] is True
    other = hashlib.sha256(b"another head").digest()
    refused = server_op(
        kc, key.id, "verify", {"alg": "ES256", "digest": b64url(other), "value": b64url(result.signature)}
    )
    assert refused.json()["value"] is False

    # the digest must be SHA-256 sized; only ES256 on P-256; an EC key cannot wrap or encrypt
    assert error_of(server_op(kc, key.id, "sign", {"alg": "ES256", "value": b64url(b"x" * 31)}))[:2] == (
        400,
        "BadParameter",
    )
    assert error_of(server_op(kc, key.id, "sign", {"alg": "ES384", "value": b64url(b"x" * 48)}))[:2] == (
        400,
        "BadParameter",
    )
    assert error_of(server_op(kc, key.id, "sign", {"alg": "RS256", "value": b64url(digest)}))[:2] == (
        400,
        "BadParameter",
    )
    with pytest.raises(HttpResponseError) as info:
        kc.create_ec_key(unique("p384"), curve="P-384")
    assert info.value.status_code == 400

    verify_only = kc.create_ec_key(unique("ecv"), curve="P-256", key_operations=[KeyOperation.verify])
    assert error_of(server_op(kc, verify_only.id, "sign", {"alg": "ES256", "value": b64url(digest)}))[:2] == (
        403,
        "Forbidden",
    )
    kc.update_key_properties(name, key.properties.version, enabled=False)
    status, code, message = error_of(server_op(kc, key.id, "sign", {"alg": "ES256", "value": b64url(digest)}))
    assert (status, code) == (403, "Forbidden") and "disabled" in message

    rotated = kc.rotate_key(name)  # a new EC version with a new key
    assert rotated.key.crv == "P-256" and rotated.key.x != key.key.x
    assert crypto_client(emulator, rotated.id).sign(SignatureAlgorithm.es256, digest).key_id == rotated.id


def test_keys_survive_a_restart(emulator: Emulator, kc: KeyClient) -> None:
    name, gone, off = unique("keep"), unique("gone"), unique("off")
    key = kc.create_rsa_key(name, size=3072, key_operations=WRAP_OPS)
    rotated = kc.rotate_key(name)
    dek = os.urandom(32)
    wrapped_v1 = server_wrap(kc, key.id, dek)
    kc.create_rsa_key(gone, size=2048)
    kc.begin_delete_key(gone).wait()
    disabled = kc.create_rsa_key(off, size=2048, key_operations=WRAP_OPS)
    kc.update_key_properties(off, disabled.properties.version, enabled=False)

    state = Path(emulator.state_dir) / "vault.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["format"] == 1

    emulator.restart()

    with key_client(emulator) as fresh:
        again = fresh.get_key(name)
        assert again.properties.version == rotated.properties.version
        assert again.key.n == rotated.key.n
        assert {p.version for p in fresh.list_properties_of_key_versions(name)} == {
            key.properties.version,
            rotated.properties.version,
        }
        assert crypto_client(emulator, key.id).unwrap_key(OAEP_256, wrapped_v1).key == dek
        assert fresh.get_deleted_key(gone).name == gone
        assert fresh.get_key(off).properties.enabled is False
        with pytest.raises(HttpResponseError) as info:
            crypto_client(emulator, disabled.id).unwrap_key(OAEP_256, b"\x00" * 256)
        assert info.value.status_code == 403


def test_log_names_method_path_and_status_only(emulator: Emulator) -> None:
    lines = emulator.log_lines()
    assert lines, "the emulator logged no requests"
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, bad
    print(f"emulator startup seconds: {[round(s, 2) for s in emulator.startup_seconds]}")
