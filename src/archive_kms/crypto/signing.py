"""The platform signing key: Ed25519 signatures over keychain records, tenant heads and
erasure records (as Crypteron signs its KEKs with a master signing key).

* :class:`Signer` holds the private key. It is loaded from a PKCS#8 PEM file (the path is
  configuration) or generated in memory for tests. Its ``repr`` shows only the key id;
  it has no method that returns private key bytes and cannot be pickled.
* :class:`Verifier` holds one or more public keys, chosen by the ``key_id`` a signature
  names, so a signing-key rotation keeps old records verifiable (the newest key signs,
  any listed key verifies; records are re-signed by the new key on their next change).
  A ``Signer`` carries the public keys of the keys it replaced (``previous``; setting
  ``keychain_previous_public_keys_path``), and its ``verifier()`` lists them all.
  A customer verifies an erasure record with ``Verifier.from_public_pem(pem)`` alone.

Every signature is over ``b"archive_kms/" + purpose + b"\\n" + message`` so a signature
made for one kind of document (a key record) can never be passed off as another (an
erasure record).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from archive_kms.errors import ConfigurationError, IntegrityError, ValidationError

__all__ = [
    "Ed25519PrivateKey",
    "Signer",
    "Verifier",
    "generate_private_key",
    "key_id_of",
    "load_private_key_pem",
    "private_key_pem",
]

_DOMAIN = b"archive_kms/"
SIGNATURE_SIZE = 64


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of SHA-256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key (for keys that are not the platform signing key: the
    console's token key)."""
    return Ed25519PrivateKey.generate()


def load_private_key_pem(data: bytes, password: bytes | None = None) -> object:
    """The private key in PEM ``data``, of whatever type it is (the caller checks it is an
    ``Ed25519PrivateKey``); ``ValueError`` if ``data`` is not a PEM private key or the
    password is wrong (the caller names the file, never its contents)."""
    try:
        return serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        raise ValueError("not a PEM private key, or the wrong password") from exc


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, to write to an owner-only file."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _framed(purpose: str, message: bytes) -> bytes:
    if not purpose or "\n" in purpose or not purpose.isascii():
        raise ValidationError("signature purpose must be a non-empty ASCII label without newlines")
    return _DOMAIN + purpose.encode("ascii") + b"\n" + message


class Signer:
    """The platform's private signing key."""

    __slots__ = ("_key_id", "_previous", "_private")

    def __init__(self, private_key: Ed25519PrivateKey, previous: Iterable[Ed25519PublicKey] = ()) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValidationError("the keychain signing key must be an Ed25519 private key")
        self._private = private_key
        self._key_id = key_id_of(private_key.public_key())
        self._previous = tuple(previous)
        if not all(isinstance(pk, Ed25519PublicKey) for pk in self._previous):
            raise ValidationError("the previous signing keys must be Ed25519 public keys")

    def with_previous(self, *pems: bytes) -> Signer:
        """This key, also verifying signatures of the keys it replaced (their public PEMs;
        one PEM may hold several keys): the signing-key rotation."""
        keys = [pk for pem in pems for pk in _public_keys(pem)]
        return Signer(self._private, (*self._previous, *keys))

    @classmethod
    def generate(cls) -> Signer:
        """A fresh in-memory key (tests, demos). Production loads one with :meth:`from_pem_file`."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike[str], password: bytes | None = None) -> Signer:
        """Load a PKCS#8 PEM Ed25519 private key. Errors name the path, never the contents."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the keychain signing key at {p}: {exc.strerror}", resource=str(p)
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError):
            raise ConfigurationError(
                f"{p} is not a PEM private key (or the password is wrong)", resource=str(p)
            ) from None
        finally:
            del data
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{p} holds a {type(key).__name__}, not an Ed25519 key", resource=str(p))
        return cls(key)

    @classmethod
    def from_settings(cls, settings: Any) -> Signer:
        """Load the key named by ``settings.keychain_signing_key_path``, with the public
        keys of the keys it replaced (``keychain_previous_public_keys_path``, a PEM file
        of one or more public keys), if set."""
        path = getattr(settings, "keychain_signing_key_path", None)
        if not path:
            raise ConfigurationError(
                "setting keychain_signing_key_path is not set: export "
                "ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH (create one with Signer.create_key_file)"
            )
        return cls.from_pem_file(path).with_previous_file(getattr(settings, "keychain_previous_public_keys_path", None))

    def with_previous_file(self, path: str | os.PathLike[str] | None) -> Signer:
        """``with_previous`` from a PEM file (None: this signer unchanged)."""
        if not path:
            return self
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the previous signing keys at {p}: {exc.strerror}", resource=str(p)
            ) from None
        try:
            return self.with_previous(data)
        except ValidationError as exc:
            raise ConfigurationError(f"{p}: {exc}", resource=str(p)) from None

    @classmethod
    def create_key_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Generate a key and write it as PKCS#8 PEM to a new file readable by its owner only.
        Refuses to overwrite an existing file (losing the key makes every record unverifiable)."""
        p = Path(path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(f"{p} exists; refusing to overwrite a signing key", resource=str(p)) from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return cls(key)

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, message: bytes, *, purpose: str) -> bytes:
        """A 64-byte Ed25519 signature over ``message`` for ``purpose``."""
        return self._private.sign(_framed(purpose, message))

    def public_key_pem(self) -> bytes:
        """The public half as SubjectPublicKeyInfo PEM: what customers verify erasure records with."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> Verifier:
        """Verifies this key's signatures and those of the keys it replaced."""
        return Verifier([self._private.public_key(), *self._previous])

    def __repr__(self) -> str:
        return f"Signer(key_id={self._key_id!r})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("the signing key cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("the signing key cannot be pickled or copied")


def _public_keys(pem: bytes) -> list[Ed25519PublicKey]:
    """Every public key in ``pem`` (concatenated PEM blocks), each Ed25519."""
    marker = b"-----BEGIN PUBLIC KEY-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    if not blocks:
        raise ValidationError("no PEM public key found")
    keys = []
    for block in blocks:
        try:
            pk = serialization.load_pem_public_key(block)
        except (ValueError, TypeError):
            raise ValidationError("not a PEM public key") from None
        if not isinstance(pk, Ed25519PublicKey):
            raise ValidationError("a previous signing key must be an Ed25519 public key")
        keys.append(pk)
    return keys


class Verifier:
    """Public keys that signatures are checked against, chosen by key id."""

    __slots__ = ("_keys",)

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        keys = {}
        for pk in public_keys:
            if not isinstance(pk, Ed25519PublicKey):
                raise ValidationError("verifier keys must be Ed25519 public keys")
            keys[key_id_of(pk)] = pk
        if not keys:
            raise ValidationError("a verifier needs at least one public key")
        self._keys = keys

    @classmethod
    def from_public_pem(cls, *pems: bytes) -> Verifier:
        keys = []
        for pem in pems:
            try:
                pk = serialization.load_pem_public_key(pem)
            except (ValueError, TypeError):
                raise ValidationError("not a PEM public key") from None
            if not isinstance(pk, Ed25519PublicKey):
                raise ValidationError("the keychain verification key must be Ed25519")
            keys.append(pk)
        return cls(keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def public_pem(self, key_id: str) -> bytes:
        """The public key ``key_id`` as PEM (what a customer verifies exports with)."""
        pk = self._keys.get(key_id)
        if pk is None:
            raise ValidationError(f"no public key {key_id!r}")
        return pk.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, message: bytes, signature: bytes, *, key_id: str, purpose: str) -> None:
        """Return if ``signature`` is ``key_id``'s signature over ``message`` for ``purpose``;
        raise ``IntegrityError`` otherwise (unknown key id, wrong length, bad signature)."""
        pk = self._keys.get(key_id)
        if pk is None:
            raise IntegrityError(f"{purpose}: signed by unknown key {key_id!r}")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise IntegrityError(f"{purpose}: signature is not {SIGNATURE_SIZE} bytes")
        try:
            pk.verify(signature, _framed(purpose, message))
        except InvalidSignature:
            raise IntegrityError(f"{purpose}: signature does not verify (key {key_id})") from None

    def __repr__(self) -> str:
        return f"Verifier(key_ids={list(self.key_ids)!r})"
