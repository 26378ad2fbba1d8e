"""The platform signing key: signatures over keychain records, tenant heads, audit seals
and anchors, search generations, rotation confirmations and erasure records (as Crypteron
signs its KEKs with a master signing key).

Two algorithms, both giving 64-byte signatures (docs/key-hierarchy.md, ADR 0040):

* **Ed25519** - a local PKCS#8 PEM key (``keychain_signing_key_path``); key id
  ``ed25519:`` + 16 hex digits of SHA-256 of the raw 32-byte public key.
* **ECDSA P-256 with SHA-256** - a key held by AWS KMS or Azure Key Vault
  (``keychain_signing_key_ref``); the private key never leaves the service. Key id
  ``ecdsa-p256:`` + 16 hex digits of SHA-256 of the public key's SubjectPublicKeyInfo DER.
  The signature is r || s, each a 32-byte big-endian integer (IEEE P1363 / JWS ES256),
  with s normalised to the lower half of the group order (``s <= n/2``); a verifier
  refuses a high s, so a signature cannot be altered into a second valid one.

* :class:`Signer` signs. A local one holds the Ed25519 private key (loaded from a PEM file
  or generated in memory for tests); a remote one holds a :class:`RemoteSigningKey` (one
  adapter per service, in ``keys/``) and the public key it pinned when it was built: every
  signature the service returns is verified against that pinned key before it is used, so
  a key swapped behind the reference is refused, never trusted. Its ``repr`` shows only
  the key id (and the reference); it has no method that returns private key bytes and
  cannot be pickled.
* :class:`Verifier` holds one or more public keys, chosen by the ``key_id`` a signature
  names, so a signing-key rotation keeps old records verifiable (the newest key signs,
  any listed key verifies; records are re-signed by the new key on their next change).
  The algorithm is the selected *trusted public key's*, never something the signed
  document says: a document cannot ask for its signature to be checked another way.
  A ``Signer`` carries the public keys of the keys it replaced (``previous``; setting
  ``keychain_previous_public_keys_path``; either algorithm), and its ``verifier()`` lists
  them all. A customer verifies an erasure record with ``Verifier.from_public_pem(pem)`` alone.

Every signature is over ``framed = b"archive_kms/" + purpose + b"\\n" + message`` so a
signature made for one kind of document (a key record) can never be passed off as another
(an erasure record). Ed25519 signs ``framed``; ECDSA signs SHA-256(``framed``) (a remote
service is sent only the 32-byte digest, so any message size works).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from archive_kms.errors import ConfigurationError, IntegrityError, ValidationError

__all__ = [
    "ECDSA_P256",
    "ED25519",
    "SIGNATURE_SIZE",
    "Ed25519PrivateKey",
    "RemoteSigningKey",
    "Signer",
    "SigningPublicKey",
    "Verifier",
    "ecdsa_p256_public_key_from_xy",
    "ecdsa_raw_from_der",
    "generate_private_key",
    "key_id_of",
    "load_private_key_pem",
    "private_key_pem",
    "signing_public_key_from_der",
]

_DOMAIN = b"archive_kms/"
SIGNATURE_SIZE = 64
ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256"
# The order n of the P-256 group (FIPS 186-4 D.1.2.3): s is kept <= n // 2.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_HALF_ORDER = _P256_ORDER // 2

#: A public key the platform signs or verifies with: Ed25519, or ECDSA on P-256 only.
SigningPublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


def algorithm_of(public_key: object) -> str:
    """``"ed25519"`` or ``"ecdsa-p256"``; ``ValidationError`` for any other key (RSA, other
    curves): the only algorithms a platform signature may use."""
    if isinstance(public_key, Ed25519PublicKey):
        return ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return ECDSA_P256
    raise ValidationError("a platform signing key must be an Ed25519 or an ECDSA P-256 key")


def _signing_key(public_key: object) -> SigningPublicKey:
    """``public_key`` if it is an Ed25519 or P-256 key (``algorithm_of``), typed as such."""
    algorithm_of(public_key)
    assert isinstance(public_key, (Ed25519PublicKey, ec.EllipticCurvePublicKey))
    return public_key


def key_id_of(public_key: SigningPublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of SHA-256 of the raw public key, or
    ``ecdsa-p256:`` + the first 16 hex digits of SHA-256 of its SubjectPublicKeyInfo DER."""
    if algorithm_of(public_key) == ED25519:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "ecdsa-p256:" + hashlib.sha256(der).hexdigest()[:16]


def signing_public_key_from_der(der: bytes) -> SigningPublicKey:
    """A SubjectPublicKeyInfo DER public key (what KMS ``GetPublicKey`` returns), which must
    be Ed25519 or ECDSA P-256; ``ValidationError`` otherwise."""
    try:
        pk = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise ValidationError("not a DER SubjectPublicKeyInfo public key") from None
    return _signing_key(pk)


def ecdsa_p256_public_key_from_xy(x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public point (x, y) (a JWK's ``x`` and ``y``, 32 bytes each);
    ``ValidationError`` if it is not a point on the curve."""
    if len(x) != 32 or len(y) != 32:
        raise ValidationError("a P-256 public key has 32-byte x and y coordinates")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise ValidationError("the public key is not a point on P-256") from None


def ecdsa_raw_from_der(der: bytes) -> bytes:
    """A DER ECDSA-Sig-Value (what KMS ``Sign`` returns) as r || s, 32 + 32 bytes, with s in
    the lower half of the group order; ``IntegrityError`` if it is not a P-256 signature."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise IntegrityError("the signing service returned a malformed ECDSA signature") from None
    return _raw_low_s(r, s)


def _raw_low_s(r: int, s: int) -> bytes:
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        raise IntegrityError("the signing service returned an ECDSA signature out of range for P-256")
    if s > _P256_HALF_ORDER:
        s = _P256_ORDER - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _verify_with(public_key: SigningPublicKey, signature: bytes, framed: bytes) -> bool:
    """Whether ``signature`` (64 bytes) verifies over ``framed`` with ``public_key``, by the
    algorithm of that key (the only place the algorithm is chosen)."""
    if isinstance(public_key, Ed25519PublicKey):
        try:
            public_key.verify(signature, framed)
        except InvalidSignature:
            return False
        return True
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < _P256_ORDER and 0 < s <= _P256_HALF_ORDER):
        return False  # out of range, or the high-s twin of a valid signature
    try:
        public_key.verify(encode_dss_signature(r, s), framed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class RemoteSigningKey(Protocol):
    """A signing key held by a service (AWS KMS, Azure Key Vault): one adapter per service
    in ``keys/`` (``keys.signing_kms``, ``keys.signing_key_vault``). Errors are already ours
    (``archive_kms.errors``), one line naming the key reference."""

    @property
    def key_ref(self) -> str:
        """The configured reference (``aws-kms://...``, ``azure-kv://...``): not secret."""
        ...

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """Fetch the public key, after checking the key is enabled and allowed to sign with
        ECDSA P-256 / SHA-256 (``ConfigurationError`` / ``KeyUnavailableError`` otherwise)."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """The service's ECDSA signature over the 32-byte SHA-256 ``digest``, as r || s
        (64 bytes)."""
        ...


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
    """The platform's signing key: a local Ed25519 private key, or a remote ECDSA P-256 key
    with its public key pinned."""

    __slots__ = ("_key_id", "_previous", "_private", "_public", "_remote")

    _private: Ed25519PrivateKey | None
    _remote: RemoteSigningKey | None
    _public: SigningPublicKey

    def __init__(self, private_key: Ed25519PrivateKey, previous: Iterable[SigningPublicKey] = ()) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValidationError("the keychain signing key must be an Ed25519 private key")
        self._setup(private_key, None, private_key.public_key(), previous)

    def _setup(
        self,
        private_key: Ed25519PrivateKey | None,
        remote: RemoteSigningKey | None,
        public_key: SigningPublicKey,
        previous: Iterable[SigningPublicKey],
    ) -> None:
        self._private = private_key
        self._remote = remote
        self._public = public_key
        self._key_id = key_id_of(public_key)
        self._previous = tuple(previous)
        for pk in self._previous:
            try:
                algorithm_of(pk)
            except ValidationError:
                raise ValidationError("the previous signing keys must be Ed25519 or ECDSA P-256 public keys") from None

    @classmethod
    def remote(cls, key: RemoteSigningKey, previous: Iterable[SigningPublicKey] = ()) -> Signer:
        """A signer over a key held by KMS or Key Vault. Fetches the public key once and pins
        it (the key id comes from it); ``ConfigurationError`` if it is not a P-256 key."""
        public_key = key.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
            raise ConfigurationError(
                f"the keychain signing key {key.key_ref} is not an ECDSA P-256 key", resource=key.key_ref
            )
        signer = cls.__new__(cls)
        signer._setup(None, key, public_key, previous)
        return signer

    def with_previous(self, *pems: bytes) -> Signer:
        """This key, also verifying signatures of the keys it replaced (their public PEMs;
        one PEM may hold several keys, of either algorithm): the signing-key rotation."""
        keys = [pk for pem in pems for pk in _public_keys(pem)]
        signer = Signer.__new__(Signer)
        signer._setup(self._private, self._remote, self._public, (*self._previous, *keys))
        return signer

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

    @property
    def algorithm(self) -> str:
        """``"ed25519"`` (local PEM key) or ``"ecdsa-p256"`` (KMS / Key Vault key)."""
        return algorithm_of(self._public)

    @property
    def key_ref(self) -> str | None:
        """The KMS / Key Vault reference of a remote key; None for a local PEM key."""
        return self._remote.key_ref if self._remote is not None else None

    def sign(self, message: bytes, *, purpose: str) -> bytes:
        """A 64-byte signature over ``message`` for ``purpose``: Ed25519 locally, or ECDSA
        P-256 by the remote key, verified against the pinned public key before it is
        returned (``IntegrityError`` if it does not verify: nothing is signed by a key we
        did not pin)."""
        framed = _framed(purpose, message)
        if self._private is not None:
            return self._private.sign(framed)
        assert self._remote is not None
        raw = self._remote.sign_digest(hashlib.sha256(framed).digest())
        if not isinstance(raw, bytes) or len(raw) != SIGNATURE_SIZE:
            raise IntegrityError(
                f"the keychain signing key {self._remote.key_ref} returned a signature that is not "
                f"{SIGNATURE_SIZE} bytes",
                resource=self._remote.key_ref,
            )
        signature = _raw_low_s(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        if not _verify_with(self._public, signature, framed):
            raise IntegrityError(
                f"the keychain signing key {self._remote.key_ref} returned a signature that does not verify "
                f"with the public key pinned at start ({self._key_id}): the key behind the reference changed; "
                "refusing to use it",
                resource=self._remote.key_ref,
            )
        return signature

    def public_key_pem(self) -> bytes:
        """The public half as SubjectPublicKeyInfo PEM: what customers verify erasure records with."""
        return self._public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verifier(self) -> Verifier:
        """Verifies this key's signatures and those of the keys it replaced."""
        return Verifier([self._public, *self._previous])

    def __repr__(self) -> str:
        if self._remote is not None:
            return f"Signer(key_id={self._key_id!r}, key_ref={self._remote.key_ref!r})"
        return f"Signer(key_id={self._key_id!r})"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("the signing key cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("the signing key cannot be pickled or copied")


def _public_keys(pem: bytes, what: str = "a previous signing key") -> list[SigningPublicKey]:
    """Every public key in ``pem`` (concatenated PEM blocks), each Ed25519 or ECDSA P-256."""
    marker = b"-----BEGIN PUBLIC KEY-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    if not blocks:
        raise ValidationError("no PEM public key found")
    keys: list[SigningPublicKey] = []
    for block in blocks:
        try:
            pk = serialization.load_pem_public_key(block)
        except (ValueError, TypeError):
            raise ValidationError("not a PEM public key") from None
        try:
            keys.append(_signing_key(pk))
        except ValidationError:
            raise ValidationError(f"{what} must be an Ed25519 or ECDSA P-256 public key") from None
    return keys


class Verifier:
    """Public keys that signatures are checked against, chosen by key id; each key checks
    with its own algorithm (Ed25519 or ECDSA P-256 / SHA-256)."""

    __slots__ = ("_keys", "_primary")

    def __init__(self, public_keys: Iterable[SigningPublicKey]) -> None:
        keys: dict[str, SigningPublicKey] = {}
        for pk in public_keys:
            try:
                algorithm_of(pk)
            except ValidationError:
                raise ValidationError("verifier keys must be Ed25519 or ECDSA P-256 public keys") from None
            keys[key_id_of(pk)] = pk
        if not keys:
            raise ValidationError("a verifier needs at least one public key")
        self._keys = keys
        self._primary = next(iter(keys))

    @classmethod
    def from_public_pem(cls, *pems: bytes) -> Verifier:
        """The keys in ``pems`` (each may hold several concatenated PEM public keys)."""
        return cls([pk for pem in pems for pk in _public_keys(pem, "the keychain verification key")])

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @property
    def primary_key_id(self) -> str:
        """The first key given: for ``Signer.verifier()``, the key that signs now (the
        others are the keys it replaced)."""
        return self._primary

    def algorithm_of(self, key_id: str) -> str | None:
        """``"ed25519"`` or ``"ecdsa-p256"``: the algorithm of the trusted key ``key_id``
        (None if no such key). What a document's own algorithm label must equal."""
        pk = self._keys.get(key_id)
        return algorithm_of(pk) if pk is not None else None

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
        if not _verify_with(pk, signature, _framed(purpose, message)):
            raise IntegrityError(f"{purpose}: signature does not verify (key {key_id})")

    def __repr__(self) -> str:
        return f"Verifier(key_ids={list(self.key_ids)!r})"
