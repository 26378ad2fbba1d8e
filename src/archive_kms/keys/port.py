"""The KeyProvider port: an L1 key that wraps and unwraps our L2 tenant keys.

One adapter per backend (``aws_kms``, ``azure_key_vault``, ``kmip``, ``managed``,
``memory``), resolved from a key reference value by ``keys.registry``. The contract suite
in ``tests/contract/test_key_provider_contract.py`` holds every adapter, real and fake,
to the rules written here.

Contract
--------
- ``wrap`` never sees the L1 key material: the wrap happens inside the KMS / Key Vault /
  HSM (or with a public key for RSA wraps) and returns an opaque ``WrappedKey`` that
  records the exact key version used.
- ``unwrap(wrap(k, ctx), ctx) == k``. Unwrapping with a different ``context`` raises
  ``WrongKeyError``: the context binds the wrapped key to its tenant (KMS encryption
  context; for backends without AAD the adapter binds it itself, documented per adapter).
  So do a modified ciphertext, a wrapped key made by another key (checked against
  ``WrappedKey.key_ref`` before any call where possible) and another ``algorithm``.
  ``context`` is checked first (``keys.context.check_context``: ``tenant`` required).
- A key that is disabled, revoked, pending deletion, pending import, or whose material
  expired makes ``wrap``/``unwrap`` raise ``KeyUnavailableError`` (terminal, with
  ``.state`` set). Unknown key: ``KeyNotFoundError``. Permission: ``KeyAccessDeniedError``.
  Throttling / 5xx / timeouts: ``KeyThrottledError`` or ``ServiceUnavailableError``
  (retryable). Every message names the key reference, never key bytes.
- ``status`` reports the key's state in one vocabulary (``KeyState``) without raising for
  unusable states (it raises only for transport failures).

Adapters may also offer ``check_metadata()`` (``keys.preflight.SupportsMetadataCheck``):
is the key of a kind we can use (symmetric ENCRYPT_DECRYPT, RSA with wrapKey, AES-256...).
Per-backend details, state and error tables: ``docs/key-providers.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from archive_kms.crypto.secrets import SecretBytes


class KeyState(str, enum.Enum):
    """One vocabulary for every backend's key states."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    PENDING_IMPORT = "pending_import"  # BYOK: no material imported, or it was deleted
    MATERIAL_EXPIRED = "material_expired"
    REVOKED = "revoked"  # KMIP revoked / deactivated / compromised
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"

    @property
    def usable(self) -> bool:
        return self is KeyState.ENABLED


@dataclass(frozen=True)
class KeyStatus:
    """What ``KeyProvider.status`` reports."""

    key_ref: str
    state: KeyState
    key_version: str | None = None  # the version wraps use now (KV version, KMS material id, KMIP uid)
    expires_at: datetime | None = None  # BYOK imported material expiry
    details: Mapping[str, str] = field(default_factory=dict)  # key spec, usage, origin, region ...


@dataclass(frozen=True)
class WrappedKey:
    """An L2 key wrapped by an L1 key. Safe to store and log (ciphertext only)."""

    key_ref: str  # the reference as resolved, including the exact version used to wrap
    algorithm: str  # "aws-kms:SYMMETRIC_DEFAULT", "azure-kv:RSA-OAEP-256+ctx16", "kmip:AES-256-GCM", ...
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"WrappedKey(key_ref={self.key_ref!r}, algorithm={self.algorithm!r}, {len(self.ciphertext)} bytes)"


@runtime_checkable
class KeyProvider(Protocol):
    """An L1 key (customer master key or platform key)."""

    @property
    def key_ref(self) -> str:
        """The reference this provider was resolved from (e.g. ``aws-kms://arn:...``)."""
        ...

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        """Wrap ``key`` under the L1 key, bound to ``context`` (at least ``{"tenant": id}``)."""
        ...

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        """Unwrap; raises KeyUnavailableError / WrongKeyError / ... per the module contract."""
        ...

    def status(self) -> KeyStatus:
        """The key's state now, in the shared vocabulary."""
        ...
