"""An in-process key service and its KeyProvider: a real implementation, not a mock.

:class:`MemoryKms` plays the part of a KMS: it holds AES-256 keys (with versions) and
their state, and offers the administrative operations a customer or an HSM officer
performs (disable, enable, revoke, schedule deletion, delete material, expire, rotate,
destroy). :class:`MemoryKeyProvider` is the adapter; it is held to the same contract suite
(``tests/contract/test_key_provider_contract.py``) as the real backends.

Wrap: ``ciphertext = nonce (12) || AES-256-GCM(key_version, nonce, key, aad)`` with
``aad = b"archive_kms/memory-wrap/v1\\n" || canonical_context``; the wrapped key's
``key_ref`` is ``memory://NAME/VERSION``.

State machine (mirrors KMS and KMIP)::

    ENABLED  --disable-->  DISABLED  --enable-->  ENABLED
    ENABLED|DISABLED|PENDING_IMPORT  --schedule_deletion-->  PENDING_DELETION
    PENDING_DELETION  --cancel_deletion-->  DISABLED
    ENABLED|DISABLED  --delete_material-->  PENDING_IMPORT  --restore_material-->  ENABLED
    any  --revoke-->  REVOKED (terminal)           any  --destroy-->  (not found)
    material past ``valid_to`` (injected clock)  =>  MATERIAL_EXPIRED

Test hooks: ``calls`` counts operations per name (``wrap``, ``unwrap``, ``status``), and
:meth:`MemoryKms.inject` makes the next call(s) of an operation raise a given error
(throttling, outages) so callers' retry and cache behaviour can be tested.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from archive_kms.crypto import aes_gcm
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    KeyNotFoundError,
    KeyUnavailableError,
    ValidationError,
    WrongKeyError,
)
from archive_kms.keys.context import canonical_context
from archive_kms.keys.port import KeyState, KeyStatus, WrappedKey
from archive_kms.keys.refs import MemoryKeyRef, parse_key_ref, wrapped_key_ref

__all__ = ["ALGORITHM", "MemoryKeyProvider", "MemoryKms"]

ALGORITHM = "memory:AES-256-GCM"
_AAD_LABEL = b"archive_kms/memory-wrap/v1\n"
_NONCE = 12
_TAG = 16


@dataclass
class _Key:
    versions: list[SecretBytes]
    state: KeyState = KeyState.ENABLED
    valid_to: datetime | None = None
    details: dict[str, str] = field(default_factory=dict)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class MemoryKms:
    """The fake key service: keys by name, their versions and states. Thread-safe."""

    def __init__(self, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._faults: dict[str, list[ArchiveKmsError]] = {}
        self.calls: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"MemoryKms({len(self._keys)} keys)"

    # --- administration (what the customer / HSM officer does) ------------------------

    def create_key(self, name: str | None = None, *, valid_to: datetime | None = None) -> str:
        """Create an enabled AES-256 key; returns its reference ``memory://NAME``."""
        name = name or f"key-{os.urandom(6).hex()}"
        ref = parse_key_ref(f"memory://{name}")
        with self._lock:
            if name in self._keys:
                raise ValidationError(f"memory key {name!r} already exists")
            self._keys[name] = _Key(versions=[SecretBytes.random(32)], valid_to=valid_to)
        return ref.uri

    def rotate(self, name: str) -> int:
        """Add a new version; wraps use it from now on, unwraps of older versions still work."""
        with self._lock:
            key = self._get(name)
            key.versions.append(SecretBytes.random(32))
            return len(key.versions)

    def disable(self, name: str) -> None:
        self._transition(name, {KeyState.ENABLED, KeyState.DISABLED}, KeyState.DISABLED)

    def enable(self, name: str) -> None:
        self._transition(name, {KeyState.ENABLED, KeyState.DISABLED}, KeyState.ENABLED)

    def revoke(self, name: str) -> None:
        self._transition(name, set(KeyState), KeyState.REVOKED)

    def schedule_deletion(self, name: str) -> None:
        allowed = {KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT, KeyState.PENDING_DELETION}
        self._transition(name, allowed, KeyState.PENDING_DELETION)

    def cancel_deletion(self, name: str) -> None:
        self._transition(name, {KeyState.PENDING_DELETION}, KeyState.DISABLED)

    def delete_material(self, name: str) -> None:
        """Like KMS DeleteImportedKeyMaterial: unusable until the same material returns."""
        self._transition(name, {KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT}, KeyState.PENDING_IMPORT)

    def restore_material(self, name: str, *, valid_to: datetime | None = None) -> None:
        """Like reimporting the same material after deletion or expiry."""
        with self._lock:
            key = self._get(name)
            if key.state is not KeyState.PENDING_IMPORT and not self._expired(key):
                raise ValidationError(f"memory key {name!r} is {key.state.value}, not pending import")
            key.state, key.valid_to = KeyState.ENABLED, valid_to

    def set_valid_to(self, name: str, valid_to: datetime | None) -> None:
        with self._lock:
            self._get(name).valid_to = valid_to

    def destroy(self, name: str) -> None:
        with self._lock:
            key = self._keys.pop(name, None)
            if key is None:
                raise KeyNotFoundError(f"key memory://{name} does not exist", resource=f"memory://{name}")
            for version in key.versions:
                version.wipe()

    def inject(self, operation: str, error: ArchiveKmsError, *, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` (wrap/unwrap/status) raise ``error``."""
        with self._lock:
            self._faults.setdefault(operation, []).extend([error] * times)

    def provider(self, ref: str) -> MemoryKeyProvider:
        return MemoryKeyProvider(self, ref)

    def factory(self, ref: MemoryKeyRef, settings: object = None) -> MemoryKeyProvider:
        """A registry factory: ``registry.register("memory", kms.factory)``."""
        return MemoryKeyProvider(self, ref)

    # --- internals used by the provider ----------------------------------------------

    def _get(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise KeyNotFoundError(f"key memory://{name} does not exist", resource=f"memory://{name}")
        return key

    def _transition(self, name: str, allowed: set[KeyState], target: KeyState) -> None:
        with self._lock:
            key = self._get(name)
            if key.state not in allowed:
                raise ValidationError(f"memory key {name!r} is {key.state.value}; cannot move it to {target.value}")
            key.state = target

    def _expired(self, key: _Key) -> bool:
        return key.valid_to is not None and self._clock() >= key.valid_to

    def _state(self, key: _Key) -> KeyState:
        if key.state is KeyState.ENABLED and self._expired(key):
            return KeyState.MATERIAL_EXPIRED
        return key.state

    def _enter(self, operation: str) -> None:
        self.calls[operation] += 1
        queue = self._faults.get(operation)
        if queue:
            raise queue.pop(0)

    def _usable_version(self, ref: MemoryKeyRef, version: int | None) -> tuple[int, bytes]:
        """(version number, key bytes) if the key is usable; raises per the port contract."""
        with self._lock:
            key = self._get(ref.name)
            state = self._state(key)
            if not state.usable:
                raise KeyUnavailableError(f"key {ref.uri} is {state.value}", resource=ref.uri, state=state.value)
            number = version if version is not None else len(key.versions)
            if not 1 <= number <= len(key.versions):
                raise WrongKeyError(f"key {ref.uri} has no version {number}", resource=ref.uri)
            return number, key.versions[number - 1].reveal()


class MemoryKeyProvider:
    """KeyProvider over a :class:`MemoryKms` key."""

    def __init__(self, kms: MemoryKms, ref: str | MemoryKeyRef) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, MemoryKeyRef):
            raise ValidationError(f"MemoryKeyProvider needs a memory:// reference, got {parsed.uri}")
        self._kms = kms
        self._ref = parsed

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    def __repr__(self) -> str:
        return f"MemoryKeyProvider({self._ref.uri!r})"

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        aad = _AAD_LABEL + canonical_context(context)
        self._kms._enter("wrap")
        number, material = self._kms._usable_version(self._ref, self._ref.version)
        nonce = os.urandom(_NONCE)
        ciphertext = nonce + aes_gcm.seal(material, nonce, key.reveal(), aad)
        return WrappedKey(key_ref=self._ref.with_version(number).uri, algorithm=ALGORITHM, ciphertext=ciphertext)

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        aad = _AAD_LABEL + canonical_context(context)
        version = self._version_of(wrapped)
        self._kms._enter("unwrap")
        _, material = self._kms._usable_version(self._ref, version)
        data = wrapped.ciphertext
        if len(data) < _NONCE + _TAG:
            raise WrongKeyError(
                f"wrapped key for {self._ref.uri} is too short ({len(data)} bytes)", resource=self._ref.uri
            )
        try:
            return SecretBytes(aes_gcm.unseal(material, data[:_NONCE], data[_NONCE:], aad))
        except aes_gcm.TagMismatch:
            raise WrongKeyError(
                f"wrapped key does not authenticate under {wrapped.key_ref} with this context "
                "(wrong tenant/context, wrong key, or tampered)",
                resource=self._ref.uri,
            ) from None

    def status(self) -> KeyStatus:
        self._kms._enter("status")
        with self._kms._lock:
            key = self._kms._keys.get(self._ref.name)
            if key is None:
                return KeyStatus(key_ref=self._ref.uri, state=KeyState.NOT_FOUND)
            version = self._ref.version or len(key.versions)
            return KeyStatus(
                key_ref=self._ref.uri,
                state=self._kms._state(key),
                key_version=str(version),
                expires_at=key.valid_to,
                details={"algorithm": "AES-256-GCM", "versions": str(len(key.versions))},
            )

    def _version_of(self, wrapped: WrappedKey) -> int:
        ref = wrapped_key_ref(wrapped, algorithm=ALGORITHM, owner=self._ref.uri)
        if not isinstance(ref, MemoryKeyRef) or ref.name != self._ref.name or ref.version is None:
            raise WrongKeyError(f"wrapped key belongs to {ref.uri}, not {self._ref.uri}", resource=self._ref.uri)
        if self._ref.version is not None and ref.version != self._ref.version:
            raise WrongKeyError(f"wrapped key belongs to {ref.uri}, not {self._ref.uri}", resource=self._ref.uri)
        return ref.version
