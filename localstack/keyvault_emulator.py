#!/usr/bin/env python3
"""Azure Key Vault (keys) emulator: a real HTTPS server on loopback for tests.

It speaks enough of the Azure Key Vault Keys REST API (api-version 7.x and 2025-07-01)
that the official ``azure-keyvault-keys`` SDK (``KeyClient``, ``CryptographyClient``) works
against it unmodified, and it enforces key state the way the real service does: a disabled,
expired or not-yet-valid key version refuses every cryptographic operation with 403
``Forbidden``; an operation outside the version's ``key_ops`` is refused with 403; unknown
and deleted keys answer 404 ``KeyNotFound``; malformed input answers 400 ``BadParameter``.

Usage::

    python localstack/keyvault_emulator.py --host 127.0.0.1 --port 8443 --state-dir DIR

On first start a self-signed server certificate for ``localhost`` and ``127.0.0.1`` is
written to ``DIR/tls/cert.pem`` and ``DIR/tls/key.pem``; clients trust exactly that file.
Vault state (keys, every version with its private material, attributes, deleted keys) is
kept in ``DIR/vault.json``, rewritten atomically after every mutation and reloaded at start.
That file holds private keys in the clear: it is test material, mode 0600.

Authentication works like Azure's: a request without ``Authorization: Bearer <token>``
gets 401 with a ``WWW-Authenticate`` challenge (resource ``https://vault.azure.net``), so
the SDK's challenge policy runs (clients pass ``verify_challenge_resource=False``); any
non-empty bearer token is then accepted. ``GET /ping`` answers ``pong`` without auth.

Dependencies: the standard library and ``cryptography``. Request log lines name the
method, the path and the status only, never bodies or key material.

EC keys on curve P-256 (``EC``/``EC-HSM``) sign and verify with ``ES256`` over a SHA-256
digest, the signature being the raw r || s (64 bytes) as Key Vault answers it: the
platform signing key held in a vault (docs/adr/0040-remote-signing-key.md).

BYOK: key exchange keys (RSA-HSM, key_ops ``import`` only) and the import of key transfer
blobs (``key_hsm``, CKM_RSA_AES_KEY_WRAP) as docs/adr/0037-key-vault-emulator-byok-import.md
says. Differences from the real service are listed in docs/adr/0003-azure-key-vault-emulator.md
and ADR 0037.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as _dt
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, keywrap, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

STATE_FORMAT = 1
MAX_BODY_BYTES = 1 << 20
IDLE_TIMEOUT_SECONDS = 120

CHALLENGE = (
    'Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", '
    'resource="https://vault.azure.net"'
)

# The SDK sends the newest version it knows (2025-07-01 for azure-keyvault-keys 4.11);
# older clients send 7.x. Previews are accepted as their base version.
API_VERSIONS = frozenset({"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"})

RSA_TYPES = ("RSA", "RSA-HSM")
OCT_TYPES = ("oct", "oct-HSM")
EC_TYPES = ("EC", "EC-HSM")
# The one curve this emulator creates (the platform signing key, ES256). A version keeps
# its curve as ``size`` (256), so the state file format is unchanged.
EC_CURVES = {"P-256": 256}
RSA_SIZES = (2048, 3072, 4096)
OCT_SIZES = (128, 192, 256)
ALL_KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_OPS = {
    "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
    "oct": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],
    "EC": ["sign", "verify"],
}
RECOVERY_LEVEL = "Recoverable+Purgeable"

KEY_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z]{1,64}$")
B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")

# Path segment of an operation -> the operation's name in key_ops and in error messages.
OPERATIONS = {
    "encrypt": "encrypt",
    "decrypt": "decrypt",
    "wrapkey": "wrapKey",
    "unwrapkey": "unwrapKey",
    "sign": "sign",
    "verify": "verify",
}
RSA_CIPHER_ALGS = ("RSA-OAEP", "RSA-OAEP-256")
RSA_SIGN_ALGS = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
    "PS512": hashes.SHA512,
}


class KVError(Exception):
    """An error answered to the client as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            err["innererror"] = {"code": self.inner}
        return {"error": err}


def bad_parameter(message: str) -> KVError:
    return KVError(400, "BadParameter", message)


def key_not_found(name: str, version: str | None = None) -> KVError:
    ident = f"{name}/{version}" if version else name
    return KVError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {ident} was not found in this key vault. If you recently deleted "
        "this key you may be able to recover it using the correct recovery command. For help resolving "
        "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


def deleted_key_not_found(name: str) -> KVError:
    return KVError(404, "KeyNotFound", f"Deleted Key not found: {name}")


# --------------------------------------------------------------------------- encoding


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not B64URL_RE.match(value):
        raise bad_parameter(f"The '{what}' value is not valid base64url.")
    stripped = value.rstrip("=")
    if len(stripped) % 4 == 1:
        raise bad_parameter(f"The '{what}' value is not valid base64url.")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise bad_parameter(f"The '{what}' value is not valid base64url.") from None


def int_to_b64url(n: int) -> str:
    return b64url_encode(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


def b64url_to_int(value: Any, what: str) -> int:
    raw = b64url_decode(value, what)
    if not raw:
        raise bad_parameter(f"The '{what}' value is empty.")
    return int.from_bytes(raw, "big")


# --------------------------------------------------------------------------- model


def key_family(kty: str) -> str:
    """ "RSA", "EC" or "oct": what a key type can do (its HSM variant does the same)."""
    if kty in RSA_TYPES:
        return "RSA"
    if kty in EC_TYPES:
        return "EC"
    return "oct"


def ec_curve_name(size: int) -> str:
    return next(name for name, bits in EC_CURVES.items() if bits == size)


@dataclass
class KeyVersion:
    version: str
    kty: str
    size: int
    key_ops: list[str]
    enabled: bool
    created: int
    updated: int
    nbf: int | None = None
    exp: int | None = None
    tags: dict[str, str] | None = None
    material: str = ""  # PKCS#8 PEM (RSA, EC) or base64url (oct). Never logged, never returned.
    _obj: Any = field(default=None, repr=False, compare=False)

    @property
    def family(self) -> str:
        return key_family(self.kty)

    def private_key(self) -> Any:
        if self._obj is None:
            if self.family in ("RSA", "EC"):
                self._obj = serialization.load_pem_private_key(self.material.encode("ascii"), password=None)
            else:
                self._obj = b64url_decode(self.material, "k")
        return self._obj

    def to_state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kty": self.kty,
            "size": self.size,
            "key_ops": self.key_ops,
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated,
            "nbf": self.nbf,
            "exp": self.exp,
            "tags": self.tags,
            "material": self.material,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> KeyVersion:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if not k.startswith("_")})


@dataclass
class KeyEntry:
    name: str
    versions: list[KeyVersion]  # creation order; the last one is the current version
    rotation_policy: dict[str, Any] | None = None
    deleted_date: int | None = None
    scheduled_purge_date: int | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_date is not None

    @property
    def latest(self) -> KeyVersion:
        return self.versions[-1]

    def find(self, version: str) -> KeyVersion | None:
        for v in self.versions:
            if v.version == version:
                return v
        return None

    def to_state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [v.to_state() for v in self.versions],
            "rotation_policy": self.rotation_policy,
            "deleted_date": self.deleted_date,
            "scheduled_purge_date": self.scheduled_purge_date,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> KeyEntry:
        return cls(
            name=data["name"],
            versions=[KeyVersion.from_state(v) for v in data["versions"]],
            rotation_policy=data.get("rotation_policy"),
            deleted_date=data.get("deleted_date"),
            scheduled_purge_date=data.get("scheduled_purge_date"),
        )


# --------------------------------------------------------------------------- request validation


def check_name(name: str) -> str:
    if not KEY_NAME_RE.match(name):
        raise bad_parameter(f"The key name '{name[:80]}' is invalid: use 1-127 characters from 0-9, a-z, A-Z and '-'.")
    return name


def check_version(version: str) -> str:
    if version and not VERSION_RE.match(version):
        raise bad_parameter("The key version is invalid.")
    return version


def parse_key_ops(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(op, str) for op in value):
        raise bad_parameter("'key_ops' must be a list of strings.")
    for op in value:
        if op not in ALL_KEY_OPS:
            raise bad_parameter(f"Invalid key operation '{op}'; allowed: {', '.join(ALL_KEY_OPS)}.")
    out: list[str] = []
    for op in value:
        if op not in out:
            out.append(op)
    return out


def parse_tags(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise bad_parameter("'tags' must be an object of string values.")
    if len(value) > 15:
        raise bad_parameter("At most 15 tags are allowed.")
    return dict(value)


def parse_time(attrs: dict[str, Any], name: str) -> int | None:
    value = attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_parameter(f"'attributes.{name}' must be a Unix time in seconds.")
    return int(value)


def parse_attributes(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_parameter("'attributes' must be an object.")
    out: dict[str, Any] = {}
    if value.get("enabled") is not None:
        if not isinstance(value["enabled"], bool):
            raise bad_parameter("'attributes.enabled' must be a boolean.")
        out["enabled"] = value["enabled"]
    for name in ("nbf", "exp"):
        if name in value:
            out[name] = parse_time(value, name)
    if value.get("exportable"):
        raise bad_parameter("Exportable keys (key release) are not supported by this emulator.")
    return out


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_parameter("The request body must be a JSON object.")
    return body


def check_import_ops(kty: str, key_ops: list[str] | None) -> None:
    """A key exchange key (key_ops ``import``) is an RSA-HSM key that can do nothing else,
    and no other key may have ``import``, as in Azure Key Vault."""
    if key_ops is None or "import" not in key_ops:
        return
    if kty != "RSA-HSM":
        raise bad_parameter("Only an RSA-HSM key can be a key exchange key (key_ops 'import').")
    if key_ops != ["import"]:
        raise bad_parameter("A key exchange key must have exactly one key operation: 'import'.")


# --------------------------------------------------------------------------- BYOK transfer blobs

BYOK_SCHEMA_VERSION = "1.0.0"
BYOK_ALG = "dir"
BYOK_ENC = "CKM_RSA_AES_KEY_WRAP"
MAX_TRANSFER_BLOB_BYTES = 64 * 1024
_KID_PATH_RE = re.compile(r"^/keys/([0-9A-Za-z-]{1,127})/([0-9A-Za-z]{1,64})/?$")


def _corrupt_blob(what: str) -> KVError:
    return bad_parameter(f"The key transfer blob (key_hsm) is invalid: {what}.")


def parse_transfer_blob(blob: bytes) -> tuple[str, str, bytes]:
    """The ``.byok`` JSON: ``schema_version``, ``header`` {``kid`` of a key exchange key
    version in this vault, ``alg`` "dir", ``enc`` "CKM_RSA_AES_KEY_WRAP"}, ``ciphertext``
    (base64url), optional ``generator``. Returns (KEK name, KEK version, ciphertext)."""
    if len(blob) > MAX_TRANSFER_BLOB_BYTES:
        raise _corrupt_blob("it is too large")
    try:
        doc = json.loads(blob.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _corrupt_blob("it is not JSON") from None
    if not isinstance(doc, dict):
        raise _corrupt_blob("it is not a JSON object")
    if doc.get("schema_version") != BYOK_SCHEMA_VERSION:
        raise _corrupt_blob(f"schema_version must be {BYOK_SCHEMA_VERSION!r}")
    header = doc.get("header")
    if not isinstance(header, dict):
        raise _corrupt_blob("'header' is missing")
    if header.get("alg") != BYOK_ALG or header.get("enc") != BYOK_ENC:
        raise _corrupt_blob(f"the header must say alg {BYOK_ALG!r} and enc {BYOK_ENC!r}")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise _corrupt_blob("header.kid (the key exchange key's identifier) is missing")
    match = _KID_PATH_RE.match(urlsplit(kid).path)
    if urlsplit(kid).scheme != "https" or match is None:
        raise _corrupt_blob("header.kid is not a versioned key identifier (https://VAULT/keys/NAME/VERSION)")
    ciphertext = doc.get("ciphertext")
    if not isinstance(ciphertext, str) or not ciphertext:
        raise _corrupt_blob("'ciphertext' is missing")
    try:
        raw = b64url_decode(ciphertext, "ciphertext")
    except KVError:
        raise _corrupt_blob("'ciphertext' is not base64url") from None
    return match.group(1), match.group(2), raw


def open_transfer_blob(kek: rsa.RSAPrivateKey, ciphertext: bytes) -> tuple[str, int]:
    """CKM_RSA_AES_KEY_WRAP: the first modulus-length bytes are RSA-OAEP (SHA-1, MGF1-SHA-1)
    of an ephemeral AES key under the KEK, the rest the target key (PKCS#8 DER) under AES key
    wrap with padding (RFC 5649). Returns the target key as PKCS#8 PEM and its size."""
    head = kek.key_size // 8
    if len(ciphertext) < head + 16:
        raise _corrupt_blob("the ciphertext is too short for this key exchange key")
    sha1 = asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    try:
        aes_key = kek.decrypt(ciphertext[:head], sha1)
    except ValueError:
        raise bad_parameter(
            "The key transfer blob could not be decrypted with the key exchange key named in its header "
            "(was it wrapped under another key exchange key?)."
        ) from None
    if len(aes_key) not in (16, 24, 32):
        raise _corrupt_blob("the wrapped AES key has a wrong length")
    try:
        der = keywrap.aes_key_unwrap_with_padding(aes_key, ciphertext[head:])
    except (ValueError, keywrap.InvalidUnwrap):
        raise _corrupt_blob(
            "the target key does not unwrap (AES key wrap with padding) under the wrapped AES key"
        ) from None
    try:
        target = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise _corrupt_blob("the target key is not a PKCS#8 private key") from None
    if not isinstance(target, rsa.RSAPrivateKey):
        raise bad_parameter("Only RSA target keys can be imported into a vault from a key transfer blob.")
    return stored_rsa_key(target)


def pkcs8_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    """How the vault keeps an RSA or EC private key: unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def stored_rsa_key(key: rsa.RSAPrivateKey) -> tuple[str, int]:
    """An imported RSA key as the vault keeps it, (PEM, size); a size Key Vault does not
    take is refused."""
    if key.key_size not in RSA_SIZES:
        raise bad_parameter(f"RSA key size {key.key_size} is not supported; use one of {RSA_SIZES}.")
    return pkcs8_pem(key), key.key_size


# --------------------------------------------------------------------------- the vault


class Vault:
    """All keys, their versions and deleted keys; persisted to one JSON file."""

    def __init__(self, state_file: Path, retention_days: int = 90) -> None:
        self._file = state_file
        self._lock = threading.RLock()
        self._keys: dict[str, KeyEntry] = {}  # by lower-cased name: Key Vault names are case-insensitive
        self.retention_days = retention_days
        self._load()

    # -- persistence

    def _load(self) -> None:
        if not self._file.exists():
            return
        try:
            data = json.loads(self._file.read_text(encoding="utf-8"))
        except ValueError:
            raise SystemExit(f"keyvault-emulator: {self._file} is not valid JSON; refusing to start") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise SystemExit(f"keyvault-emulator: {self._file} has an unknown format; refusing to start")
        for item in data.get("keys", []):
            entry = KeyEntry.from_state(item)
            self._keys[entry.name.lower()] = entry
        self._purge_expired_deletions()

    def _save(self) -> None:
        payload = json.dumps(
            {"format": STATE_FORMAT, "keys": [e.to_state() for e in self._keys.values()]},
            separators=(",", ":"),
        ).encode("utf-8")
        directory = self._file.parent
        fd, tmp = tempfile.mkstemp(prefix=".vault-", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._file)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _purge_expired_deletions(self) -> bool:
        now = int(time.time())
        gone = [
            k for k, e in self._keys.items() if e.scheduled_purge_date is not None and e.scheduled_purge_date <= now
        ]
        for k in gone:
            del self._keys[k]
        return bool(gone)

    # -- lookups (caller holds the lock)

    def _active(self, name: str) -> KeyEntry:
        entry = self._keys.get(name.lower())
        if entry is None or entry.deleted:
            raise key_not_found(name)
        return entry

    def _deleted(self, name: str) -> KeyEntry:
        entry = self._keys.get(name.lower())
        if entry is None or not entry.deleted:
            raise deleted_key_not_found(name)
        return entry

    def _version(self, name: str, version: str) -> tuple[KeyEntry, KeyVersion]:
        entry = self._active(name)
        if not version:
            return entry, entry.latest
        found = entry.find(version)
        if found is None:
            raise key_not_found(name, version)
        return entry, found

    # -- rendering

    def _attributes(self, v: KeyVersion) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": v.enabled,
            "created": v.created,
            "updated": v.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": self.retention_days,
            "exportable": False,
        }
        if v.nbf is not None:
            attrs["nbf"] = v.nbf
        if v.exp is not None:
            attrs["exp"] = v.exp
        return attrs

    @staticmethod
    def _jwk(base: str, entry: KeyEntry, v: KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": f"{base}/keys/{entry.name}/{v.version}",
            "kty": v.kty,
            "key_ops": list(v.key_ops),
        }
        if v.family == "RSA":
            pub = v.private_key().public_key().public_numbers()
            jwk["n"] = int_to_b64url(pub.n)
            jwk["e"] = int_to_b64url(pub.e)
        elif v.family == "EC":
            pub_ec = v.private_key().public_key().public_numbers()
            width = (v.size + 7) // 8
            jwk["crv"] = ec_curve_name(v.size)
            jwk["x"] = b64url_encode(pub_ec.x.to_bytes(width, "big"))
            jwk["y"] = b64url_encode(pub_ec.y.to_bytes(width, "big"))
        return jwk  # symmetric material is never released, as in Azure

    def _bundle(self, base: str, entry: KeyEntry, v: KeyVersion) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self._jwk(base, entry, v), "attributes": self._attributes(v)}
        if v.tags:
            out["tags"] = dict(v.tags)
        return out

    def _deleted_fields(self, base: str, entry: KeyEntry) -> dict[str, Any]:
        return {
            "recoveryId": f"{base}/deletedkeys/{entry.name}",
            "deletedDate": entry.deleted_date,
            "scheduledPurgeDate": entry.scheduled_purge_date,
        }

    def _item(self, kid: str, v: KeyVersion) -> dict[str, Any]:
        item: dict[str, Any] = {"kid": kid, "attributes": self._attributes(v)}
        if v.tags:
            item["tags"] = dict(v.tags)
        return item

    # -- key management

    @staticmethod
    def _new_material(kty: str, size: int) -> str:
        if kty in RSA_TYPES:
            return pkcs8_pem(rsa.generate_private_key(public_exponent=65537, key_size=size))
        if kty in EC_TYPES:
            assert size == EC_CURVES["P-256"]
            return pkcs8_pem(ec.generate_private_key(ec.SECP256R1()))
        return b64url_encode(secrets.token_bytes(size // 8))

    @staticmethod
    def _check_type_and_size(kty: Any, size: Any, crv: Any = None) -> tuple[str, int]:
        if kty in RSA_TYPES:
            size = 2048 if size is None else size
            if size not in RSA_SIZES:
                raise bad_parameter(f"RSA key size {size!r} is not supported; use one of {RSA_SIZES}.")
            return kty, size
        if kty in OCT_TYPES:
            size = 256 if size is None else size
            if size not in OCT_SIZES:
                raise bad_parameter(f"Symmetric key size {size!r} is not supported; use one of {OCT_SIZES}.")
            return kty, size
        if kty in EC_TYPES:
            crv = "P-256" if crv is None else crv
            if crv not in EC_CURVES:
                raise bad_parameter(f"Curve {crv!r} is not supported by this emulator; use one of {tuple(EC_CURVES)}.")
            if size is not None:
                raise bad_parameter("An EC key is sized by its curve ('crv'), not by 'key_size'.")
            return kty, EC_CURVES[crv]
        raise bad_parameter(f"Invalid key type {kty!r}.")

    def create(self, base: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        check_name(name)
        kty, size = self._check_type_and_size(body.get("kty"), body.get("key_size"), body.get("crv"))
        if body.get("public_exponent") not in (None, 65537):
            raise bad_parameter("Only the public exponent 65537 is supported.")
        if body.get("release_policy") is not None:
            raise bad_parameter("Key release policies are not supported by this emulator.")
        key_ops = parse_key_ops(body.get("key_ops"))
        check_import_ops(kty, key_ops)
        attrs = parse_attributes(body.get("attributes"))
        tags = parse_tags(body.get("tags"))
        with self._lock:  # fail fast on a deleted name before spending time on key generation
            self._check_name_free(name)
        material = self._new_material(kty, size)  # outside the lock: RSA-4096 takes a while
        return self._add_version(base, name, kty, size, key_ops, attrs, tags, material)

    def _check_name_free(self, name: str) -> None:
        entry = self._keys.get(name.lower())
        if entry is not None and entry.deleted:
            raise KVError(
                409,
                "Conflict",
                f"Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; "
                "in this state, the key can be recovered or purged.",
                inner="ObjectIsDeletedButRecoverable",
            )

    def _add_version(
        self,
        base: str,
        name: str,
        kty: str,
        size: int,
        key_ops: list[str] | None,
        attrs: dict[str, Any],
        tags: dict[str, str] | None,
        material: str,
    ) -> dict[str, Any]:
        now = int(time.time())
        family = key_family(kty)
        version = KeyVersion(
            version=uuid.uuid4().hex,
            kty=kty,
            size=size,
            key_ops=key_ops if key_ops is not None else list(DEFAULT_OPS[family]),
            enabled=attrs.get("enabled", True),
            created=now,
            updated=now,
            nbf=attrs.get("nbf"),
            exp=attrs.get("exp"),
            tags=tags,
            material=material,
        )
        with self._lock:
            self._check_name_free(name)
            entry = self._keys.get(name.lower())
            if entry is None:
                entry = KeyEntry(name=name, versions=[])
                self._keys[name.lower()] = entry
            entry.versions.append(version)
            self._save()
            return self._bundle(base, entry, version)

    def import_key(self, base: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        check_name(name)
        jwk = body.get("key")
        if not isinstance(jwk, dict):
            raise bad_parameter("'key' must be a JSON Web Key object.")
        kty = jwk.get("kty")
        if jwk.get("key_hsm") is not None:
            return self._import_byok(base, name, body, jwk)
        hsm = body.get("Hsm") is True or body.get("hsm") is True or (isinstance(kty, str) and kty.endswith("-HSM"))
        if kty in RSA_TYPES:
            material, size = self._import_rsa(jwk)
            kty = "RSA-HSM" if hsm else "RSA"
        elif kty in OCT_TYPES:
            raw = b64url_decode(jwk.get("k"), "k")
            size = len(raw) * 8
            if size not in OCT_SIZES:
                raise bad_parameter(f"Symmetric key size {size} is not supported; use one of {OCT_SIZES}.")
            material = b64url_encode(raw)
            kty = "oct-HSM" if hsm else "oct"
        elif kty in EC_TYPES:
            raise bad_parameter("Importing EC keys is not supported by this emulator; create them in the vault.")
        else:
            self._check_type_and_size(kty, None)
            raise bad_parameter(f"Invalid key type {kty!r}.")  # pragma: no cover - the check raises
        key_ops = parse_key_ops(jwk.get("key_ops"))
        attrs = parse_attributes(body.get("attributes"))
        tags = parse_tags(body.get("tags"))
        if body.get("release_policy") is not None:
            raise bad_parameter("Key release policies are not supported by this emulator.")
        return self._add_version(base, name, kty, size, key_ops, attrs, tags, material)

    def _import_byok(self, base: str, name: str, body: dict[str, Any], jwk: dict[str, Any]) -> dict[str, Any]:
        """BYOK: ``key_hsm`` is a key transfer blob (a ``.byok`` file) made for one of this
        vault's key exchange keys; see ``open_transfer_blob``."""
        if jwk.get("kty") != "RSA-HSM":
            raise bad_parameter(
                f"Key type {jwk.get('kty')!r} cannot be imported from a key transfer blob in a vault; use RSA-HSM."
            )
        if body.get("Hsm") is False or body.get("hsm") is False:
            raise bad_parameter("A key transfer blob (key_hsm) can only be imported as an HSM key.")
        key_ops = parse_key_ops(jwk.get("key_ops"))
        check_import_ops("RSA-HSM", key_ops)
        attrs = parse_attributes(body.get("attributes"))
        tags = parse_tags(body.get("tags"))
        if body.get("release_policy") is not None:
            raise bad_parameter("Key release policies are not supported by this emulator.")
        blob = b64url_decode(jwk["key_hsm"], "key_hsm")
        kek_name, kek_version, ciphertext = parse_transfer_blob(blob)
        with self._lock:
            entry = self._keys.get(kek_name.lower())
            kek = entry.find(kek_version) if entry is not None and not entry.deleted else None
            if kek is None:
                raise bad_parameter(
                    f"The key exchange key {kek_name}/{kek_version} named in the key transfer blob's header was "
                    "not found in this vault; the blob must be made for a key exchange key of the vault it is "
                    "imported into."
                )
            now = int(time.time())
            if kek.kty != "RSA-HSM":
                raise bad_parameter(f"The key exchange key {kek_name} is not an RSA-HSM key.")
            if "import" not in kek.key_ops:
                raise _forbidden(
                    f"Operation import is not permitted on the key exchange key {kek_name}.", "KeyOperationForbidden"
                )
            if not kek.enabled:
                raise _forbidden(f"Operation import is not allowed on a disabled key ({kek_name}).", "KeyDisabled")
            if kek.exp is not None and kek.exp <= now:
                raise _forbidden(f"Operation import is not allowed on an expired key ({kek_name}).", "KeyExpired")
            if kek.nbf is not None and kek.nbf > now:
                raise _forbidden(
                    f"Operation import is not allowed on a key that is not yet valid ({kek_name}).", "KeyNotYetValid"
                )
            kek_key = kek.private_key()
        pem, size = open_transfer_blob(kek_key, ciphertext)
        return self._add_version(base, name, "RSA-HSM", size, key_ops, attrs, tags, pem)

    @staticmethod
    def _import_rsa(jwk: dict[str, Any]) -> tuple[str, int]:
        if jwk.get("d") is None:
            raise bad_parameter("An RSA key import needs the private key ('d').")
        n = b64url_to_int(jwk.get("n"), "n")
        e = b64url_to_int(jwk.get("e"), "e")
        d = b64url_to_int(jwk.get("d"), "d")
        try:
            if all(jwk.get(p) is not None for p in ("p", "q")):
                p = b64url_to_int(jwk["p"], "p")
                q = b64url_to_int(jwk["q"], "q")
            else:
                p, q = rsa.rsa_recover_prime_factors(n, e, d)
            numbers = rsa.RSAPrivateNumbers(
                p=p,
                q=q,
                d=d,
                dmp1=rsa.rsa_crt_dmp1(d, p),
                dmq1=rsa.rsa_crt_dmq1(d, q),
                iqmp=rsa.rsa_crt_iqmp(p, q),
                public_numbers=rsa.RSAPublicNumbers(e, n),
            )
            key = numbers.private_key()
        except (ValueError, TypeError):
            raise bad_parameter("The RSA key parameters are not consistent.") from None
        return stored_rsa_key(key)

    def get(self, base: str, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            entry, v = self._version(name, version)
            return self._bundle(base, entry, v)

    def list_keys(self, base: str) -> dict[str, Any]:
        with self._lock:
            items = [
                self._item(f"{base}/keys/{e.name}", e.latest)
                for e in sorted(self._keys.values(), key=lambda e: e.name.lower())
                if not e.deleted
            ]
        return {"value": items, "nextLink": None}

    def list_versions(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._active(name)
            items = [self._item(f"{base}/keys/{entry.name}/{v.version}", v) for v in entry.versions]
        return {"value": items, "nextLink": None}

    def update(self, base: str, name: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
        key_ops = parse_key_ops(body.get("key_ops"))
        attrs = parse_attributes(body.get("attributes"))
        tags = parse_tags(body.get("tags"))
        if body.get("release_policy") is not None:
            raise bad_parameter("Key release policies are not supported by this emulator.")
        with self._lock:
            entry, v = self._version(name, version)
            if key_ops is not None:
                if "import" in v.key_ops and key_ops != v.key_ops:
                    raise bad_parameter("The key operations of a key exchange key are fixed ('import').")
                check_import_ops(v.kty, key_ops)
                v.key_ops = key_ops
            if "enabled" in attrs:
                v.enabled = attrs["enabled"]
            if "nbf" in attrs:
                v.nbf = attrs["nbf"]
            if "exp" in attrs:
                v.exp = attrs["exp"]
            if tags is not None:
                v.tags = tags
            v.updated = int(time.time())
            self._save()
            return self._bundle(base, entry, v)

    def rotate(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            current = self._active(name).latest
            kty, size, key_ops, tags = current.kty, current.size, list(current.key_ops), current.tags
        material = self._new_material(kty, size)
        return self._add_version(base, name, kty, size, key_ops, {}, dict(tags) if tags else None, material)

    def delete(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._active(name)
            now = int(time.time())
            entry.deleted_date = now
            entry.scheduled_purge_date = now + self.retention_days * 86400
            self._save()
            out = self._bundle(base, entry, entry.latest)
            out.update(self._deleted_fields(base, entry))
            return out

    def get_deleted(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            if self._purge_expired_deletions():
                self._save()
            entry = self._deleted(name)
            out = self._bundle(base, entry, entry.latest)
            out.update(self._deleted_fields(base, entry))
            return out

    def list_deleted(self, base: str) -> dict[str, Any]:
        with self._lock:
            if self._purge_expired_deletions():
                self._save()
            items = []
            for e in sorted(self._keys.values(), key=lambda e: e.name.lower()):
                if e.deleted:
                    item = self._item(f"{base}/keys/{e.name}", e.latest)
                    item.update(self._deleted_fields(base, e))
                    items.append(item)
        return {"value": items, "nextLink": None}

    def purge(self, name: str) -> None:
        with self._lock:
            entry = self._deleted(name)
            del self._keys[entry.name.lower()]
            self._save()

    def recover(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._deleted(name)
            entry.deleted_date = None
            entry.scheduled_purge_date = None
            self._save()
            return self._bundle(base, entry, entry.latest)

    def get_rotation_policy(self, base: str, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._active(name)
            policy = entry.rotation_policy or {
                "lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}],
                "attributes": {},
            }
            return {"id": f"{base}/keys/{entry.name}/rotationpolicy", **policy}

    def set_rotation_policy(self, base: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        actions = body.get("lifetimeActions", [])
        if not isinstance(actions, list):
            raise bad_parameter("'lifetimeActions' must be a list.")
        attrs = body.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise bad_parameter("'attributes' must be an object.")
        now = int(time.time())
        with self._lock:
            entry = self._active(name)
            created = (entry.rotation_policy or {}).get("attributes", {}).get("created", now)
            policy_attrs: dict[str, Any] = {"created": created, "updated": now}
            if attrs.get("expiryTime") is not None:
                policy_attrs["expiryTime"] = str(attrs["expiryTime"])
            entry.rotation_policy = {"lifetimeActions": actions, "attributes": policy_attrs}
            self._save()
        return self.get_rotation_policy(base, name)

    # -- cryptographic operations

    def operate(self, base: str, name: str, version: str, segment: str, body: dict[str, Any]) -> dict[str, Any]:
        op = OPERATIONS[segment]
        with self._lock:
            entry, v = self._version(name, version)
            now = int(time.time())
            if not v.enabled:
                raise _forbidden(f"Operation {op} is not allowed on a disabled key.", "KeyDisabled")
            if v.exp is not None and v.exp <= now:
                raise _forbidden(f"Operation {op} is not allowed on an expired key.", "KeyExpired")
            if v.nbf is not None and v.nbf > now:
                raise _forbidden(f"Operation {op} is not allowed on a key that is not yet valid.", "KeyNotYetValid")
            if op not in v.key_ops:
                raise _forbidden(f"Operation {op} is not permitted on this key.", "KeyOperationForbidden")
            kid = f"{base}/keys/{entry.name}/{v.version}"
            family = v.family
            key = v.private_key()
        alg = body.get("alg")
        if not isinstance(alg, str) or not alg:
            raise bad_parameter("'alg' is required.")
        if family == "RSA":
            result = _rsa_operation(key, op, alg, body)
        elif family == "EC":
            result = _ec_operation(key, op, alg, body)
        else:
            result = _oct_operation(key, op, alg, body)
        return {"kid": kid, **result}


def _forbidden(message: str, inner: str) -> KVError:
    return KVError(403, "Forbidden", message, inner=inner)


def _unsupported(alg: str, kind: str) -> KVError:
    if alg == "RSA1_5":
        return bad_parameter("Algorithm RSA1_5 is not supported by this emulator; use RSA-OAEP-256.")
    return bad_parameter(f"Algorithm {alg} is not supported for this {kind} key operation.")


def _oaep(alg: str) -> asym_padding.OAEP:
    h: hashes.HashAlgorithm = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
    return asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=h), algorithm=h, label=None)


def _rsa_operation(key: rsa.RSAPrivateKey, op: str, alg: str, body: dict[str, Any]) -> dict[str, Any]:
    if op in ("encrypt", "decrypt", "wrapKey", "unwrapKey"):
        if alg not in RSA_CIPHER_ALGS:
            raise _unsupported(alg, "RSA")
        value = b64url_decode(body.get("value"), "value")
        try:
            if op in ("encrypt", "wrapKey"):
                return {"value": b64url_encode(key.public_key().encrypt(value, _oaep(alg)))}
            return {"value": b64url_encode(key.decrypt(value, _oaep(alg)))}
        except ValueError:
            raise bad_parameter(f"The value could not be processed with {alg} by this key.") from None
    if alg not in RSA_SIGN_ALGS:
        raise _unsupported(alg, "RSA")
    hash_alg = RSA_SIGN_ALGS[alg]()
    pad: asym_padding.AsymmetricPadding = (
        asym_padding.PKCS1v15()
        if alg.startswith("RS")
        else asym_padding.PSS(mgf=asym_padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
    )
    if op == "sign":
        digest = b64url_decode(body.get("value"), "value")
        if len(digest) != hash_alg.digest_size:
            raise bad_parameter(f"The digest length does not match {alg}.")
        return {"value": b64url_encode(key.sign(digest, pad, Prehashed(hash_alg)))}
    digest = b64url_decode(body.get("digest"), "digest")
    signature = b64url_decode(body.get("value"), "value")
    if len(digest) != hash_alg.digest_size:
        raise bad_parameter(f"The digest length does not match {alg}.")
    try:
        key.public_key().verify(signature, digest, pad, Prehashed(hash_alg))
        return {"value": True}
    except InvalidSignature:
        return {"value": False}


EC_SIGN_ALGS = {"ES256": ("P-256", hashes.SHA256)}


def _ec_operation(key: ec.EllipticCurvePrivateKey, op: str, alg: str, body: dict[str, Any]) -> dict[str, Any]:
    """ES256 as Key Vault does it: ``sign`` takes the SHA-256 digest (32 bytes) and answers
    the raw signature r || s (32 + 32 bytes, big-endian, JWS / IEEE P1363), not DER;
    ``verify`` takes the digest and that raw form."""
    if op not in ("sign", "verify"):
        raise bad_parameter(f"Operation {op} is not supported for EC keys.")
    if alg not in EC_SIGN_ALGS or EC_CURVES[EC_SIGN_ALGS[alg][0]] != key.curve.key_size:
        raise _unsupported(alg, "EC")
    hash_alg = EC_SIGN_ALGS[alg][1]()
    width = (key.curve.key_size + 7) // 8
    if op == "sign":
        digest = b64url_decode(body.get("value"), "value")
        if len(digest) != hash_alg.digest_size:
            raise bad_parameter(f"The digest length does not match {alg}.")
        r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hash_alg))))
        return {"value": b64url_encode(r.to_bytes(width, "big") + s.to_bytes(width, "big"))}
    digest = b64url_decode(body.get("digest"), "digest")
    signature = b64url_decode(body.get("value"), "value")
    if len(digest) != hash_alg.digest_size:
        raise bad_parameter(f"The digest length does not match {alg}.")
    if len(signature) != 2 * width:
        return {"value": False}
    der = encode_dss_signature(int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big"))
    try:
        key.public_key().verify(der, digest, ec.ECDSA(Prehashed(hash_alg)))
        return {"value": True}
    except InvalidSignature:
        return {"value": False}


def _oct_operation(key: bytes, op: str, alg: str, body: dict[str, Any]) -> dict[str, Any]:
    bits = len(key) * 8
    if op in ("wrapKey", "unwrapKey"):
        if alg != f"A{bits}KW":
            raise _unsupported(alg, f"AES-{bits}")
        value = b64url_decode(body.get("value"), "value")
        try:
            if op == "wrapKey":
                return {"value": b64url_encode(keywrap.aes_key_wrap(key, value))}
            return {"value": b64url_encode(keywrap.aes_key_unwrap(key, value))}
        except (ValueError, keywrap.InvalidUnwrap):
            raise bad_parameter(f"The value could not be processed with {alg} by this key.") from None
    if op not in ("encrypt", "decrypt"):
        raise bad_parameter(f"Operation {op} is not supported for symmetric keys.")
    value = b64url_decode(body.get("value"), "value")
    aad = b64url_decode(body["aad"], "aad") if body.get("aad") is not None else None
    if alg == f"A{bits}GCM":
        if op == "encrypt":
            if body.get("iv") is not None:
                raise bad_parameter("The service generates the IV for AES-GCM; do not send one.")
            iv = secrets.token_bytes(12)
            sealed = AESGCM(key).encrypt(iv, value, aad)
            out = {"value": b64url_encode(sealed[:-16]), "iv": b64url_encode(iv), "tag": b64url_encode(sealed[-16:])}
            if aad is not None:
                out["aad"] = b64url_encode(aad)
            return out
        iv = b64url_decode(body.get("iv"), "iv")
        tag = b64url_decode(body.get("tag"), "tag")
        if len(iv) != 12 or len(tag) != 16:
            raise bad_parameter("AES-GCM needs a 12-byte IV and a 16-byte tag.")
        try:
            return {"value": b64url_encode(AESGCM(key).decrypt(iv, value + tag, aad))}
        except InvalidTag:
            raise bad_parameter("The ciphertext could not be authenticated.") from None
    if alg in (f"A{bits}CBC", f"A{bits}CBCPAD"):
        iv = b64url_decode(body.get("iv"), "iv")
        if len(iv) != 16:
            raise bad_parameter("AES-CBC needs a 16-byte IV.")
        pad = alg.endswith("PAD")
        cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
        try:
            if op == "encrypt":
                if pad:
                    padder = padding.PKCS7(128).padder()
                    value = padder.update(value) + padder.finalize()
                elif len(value) % 16:
                    raise bad_parameter("AES-CBC without padding needs a multiple of 16 bytes.")
                enc = cipher.encryptor()
                return {"value": b64url_encode(enc.update(value) + enc.finalize()), "iv": b64url_encode(iv)}
            if len(value) % 16:
                raise bad_parameter("The ciphertext length is not a multiple of 16 bytes.")
            dec = cipher.decryptor()
            plain = dec.update(value) + dec.finalize()
            if pad:
                unpadder = padding.PKCS7(128).unpadder()
                plain = unpadder.update(plain) + unpadder.finalize()
            return {"value": b64url_encode(plain)}
        except ValueError:
            raise bad_parameter("The ciphertext could not be decrypted.") from None
    raise _unsupported(alg, f"AES-{bits}")


# --------------------------------------------------------------------------- TLS


def ensure_certificate(tls_dir: Path, host: str) -> tuple[Path, Path]:
    """Self-signed (CA-less) P-256 server certificate for localhost, 127.0.0.1, ::1 and ``host``."""
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    try:
        extra: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        extra = x509.DNSName(host)
    if host and extra not in names:
        names.append(extra)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyvault-emulator")])
    now = _dt.datetime.now(_dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    for path, data, mode in ((key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644)):
        fd, tmp = tempfile.mkstemp(dir=tls_dir)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return cert_path, key_path


# --------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    # Keep-alive plus Nagle and delayed ACK stalled every response by ~40 ms.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "keyvault-emulator"
    timeout = IDLE_TIMEOUT_SECONDS
    server: EmulatorServer

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.request.do_handshake()  # in this connection's thread, not in the accept loop
        super().setup()

    # Every method goes through one dispatcher.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.server.quiet:
            return
        path = urlsplit(self.path).path if hasattr(self, "path") else "-"
        sys.stderr.write(f"keyvault-emulator: {getattr(self, 'command', '-')} {path} {int(code)}\n")

    def log_error(self, format: str, *args: Any) -> None:
        sys.stderr.write("keyvault-emulator: " + (format % args)[:200] + "\n")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(66)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise KVError(413, "RequestEntityTooLarge", "The request body is too large.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise KVError(413, "RequestEntityTooLarge", "The request body is too large.")
        return self.rfile.read(length) if length else b""

    def _base(self) -> str:
        host = self.headers.get("Host", "")
        if not HOST_RE.match(host):
            host = self.server.default_authority
        return f"https://{host}"

    def _send(
        self, status: int, body: Any = None, extra: dict[str, str] | None = None, text: str | None = None
    ) -> None:
        if text is not None:
            payload, ctype = text.encode("utf-8"), "text/plain; charset=utf-8"
        elif body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
            ctype = "application/json; charset=utf-8"
        else:
            payload, ctype = b"", None
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if status != 204:
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-keyvault-service-version", "1.9.0.0-emulator")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    def _dispatch(self) -> None:
        try:
            try:
                raw = self._read_body()
            except (ValueError, OSError):
                self.close_connection = True
                raise KVError(400, "BadParameter", "The request body could not be read.") from None
            status, body, extra, text = self._route(raw)
        except KVError as err:
            status, body, extra, text = err.status, err.body(), None, None
        except Exception as exc:  # noqa: BLE001 - never echo internals (or material) to the client or the log
            sys.stderr.write(f"keyvault-emulator: internal error {type(exc).__name__}\n")
            internal = {"error": {"code": "InternalServerError", "message": "Internal error."}}
            status, body, extra, text = 500, internal, None, None
        self._send(status, body, extra, text)

    def _route(self, raw: bytes) -> tuple[int, Any, dict[str, str] | None, str | None]:
        url = urlsplit(self.path)
        method = self.command
        if url.path == "/ping" and method == "GET":
            return 200, None, None, "pong"

        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (
                401,
                {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                {"WWW-Authenticate": CHALLENGE},
                None,
            )

        query = parse_qs(url.query)
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            raise bad_parameter("The 'api-version' query parameter is missing.")
        if api_version.split("-preview")[0] not in API_VERSIONS:
            raise bad_parameter(
                f"The specified version ({api_version[:20]}) is not recognized. Consider using the latest "
                "supported version (2025-07-01)."
            )

        body: dict[str, Any] = {}
        if method in ("POST", "PUT", "PATCH") and raw.strip():
            try:
                body = require_object(json.loads(raw))
            except (ValueError, UnicodeDecodeError):
                raise bad_parameter("The request body is not valid JSON.") from None

        vault = self.server.vault
        base = self._base()
        seg = [unquote(s) for s in url.path.split("/")[1:]]
        n = len(seg)

        if seg[0] == "keys":
            if n == 1 or (n == 2 and seg[1] == ""):
                if method == "GET":
                    return 200, vault.list_keys(base), None, None
                raise _method_not_allowed()
            name = seg[1]
            if n == 2 and name == "restore" and method == "POST":
                raise _not_supported("Key backup and restore")
            check_name(name)
            if n == 2:
                if method == "GET":
                    return 200, vault.get(base, name, ""), None, None
                if method == "PUT":
                    return 200, vault.import_key(base, name, body), None, None
                if method == "DELETE":
                    return 200, vault.delete(base, name), None, None
                if method == "PATCH":
                    return 200, vault.update(base, name, "", body), None, None
                raise _method_not_allowed()
            third = seg[2]
            if n == 3:
                if method == "POST":
                    if third == "create":
                        return 200, vault.create(base, name, body), None, None
                    if third == "rotate":
                        return 200, vault.rotate(base, name), None, None
                    if third in OPERATIONS:
                        return 200, vault.operate(base, name, "", third, body), None, None
                    if third == "backup":
                        raise _not_supported("Key backup and restore")
                    raise _unknown_path()
                if third == "versions" and method == "GET":
                    return 200, vault.list_versions(base, name), None, None
                if third == "rotationpolicy":
                    if method == "GET":
                        return 200, vault.get_rotation_policy(base, name), None, None
                    if method == "PUT":
                        return 200, vault.set_rotation_policy(base, name, body), None, None
                    raise _method_not_allowed()
                check_version(third)
                if method == "GET":
                    return 200, vault.get(base, name, third), None, None
                if method == "PATCH":
                    return 200, vault.update(base, name, third, body), None, None
                raise _method_not_allowed()
            if n == 4:
                check_version(third)
                op = seg[3]
                if method == "POST" and op in OPERATIONS:
                    return 200, vault.operate(base, name, third, op, body), None, None
                if op in ("release", "attestation"):
                    raise _not_supported(f"Key {op}")
            raise _unknown_path()

        if seg[0] == "deletedkeys":
            if n == 1 or (n == 2 and seg[1] == ""):
                if method == "GET":
                    return 200, vault.list_deleted(base), None, None
                raise _method_not_allowed()
            name = check_name(seg[1])
            if n == 2:
                if method == "GET":
                    return 200, vault.get_deleted(base, name), None, None
                if method == "DELETE":
                    vault.purge(name)
                    return 204, None, None, None
                raise _method_not_allowed()
            if n == 3 and seg[2] == "recover" and method == "POST":
                return 200, vault.recover(base, name), None, None
            raise _unknown_path()

        if seg == ["rng"] and method == "POST":
            count = body.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 128:
                raise bad_parameter("'count' must be an integer from 1 to 128.")
            return 200, {"value": b64url_encode(secrets.token_bytes(count))}, None, None

        raise _unknown_path()


def _method_not_allowed() -> KVError:
    return KVError(405, "MethodNotAllowed", "The requested method is not allowed on this resource.")


def _unknown_path() -> KVError:
    return KVError(404, "NotFound", "The requested resource does not exist.")


def _not_supported(what: str) -> KVError:
    return KVError(501, "NotSupported", f"{what} is not supported by this emulator.")


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], vault: Vault, context: ssl.SSLContext, quiet: bool) -> None:
        super().__init__(address, Handler)
        host = address[0]
        port = self.server_address[1]
        # Handshakes happen in the per-connection thread (Handler.setup), so a slow or
        # misbehaving client cannot stall the accept loop.
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.vault = vault
        self.quiet = quiet
        host = f"[{host}]" if ":" in host else host
        self.default_authority = f"{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, OSError)):
            if not self.quiet:
                sys.stderr.write(f"keyvault-emulator: connection dropped ({type(exc).__name__})\n")
            return
        sys.stderr.write(f"keyvault-emulator: connection error {type(exc).__name__}\n")


def build_server(
    host: str, port: int, state_dir: Path, quiet: bool = False, retention_days: int = 90
) -> EmulatorServer:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = ensure_certificate(state_dir / "tls", host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    vault = Vault(state_dir / "vault.json", retention_days=retention_days)
    server_cls = EmulatorServer
    if ":" in host:  # IPv6 literal
        server_cls = type("EmulatorServer6", (EmulatorServer,), {"address_family": socket.AF_INET6})
    return server_cls((host, port), vault, context, quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Azure Key Vault keys emulator (HTTPS, loopback, for tests).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port (printed in the ready line)")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--retention-days", type=int, default=90, help="soft-delete retention, 7-90 days")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    if not 7 <= args.retention_days <= 90:
        parser.error("--retention-days must be between 7 and 90")

    server = build_server(args.host, args.port, args.state_dir, quiet=args.quiet, retention_days=args.retention_days)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _stop)
        print(f"keyvault-emulator ready on https://{server.default_authority}", flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
