"""Key preflight: prove a tenant's master key is usable before any byte moves.

:func:`check_usable` works with any ``KeyProvider``:

1. the context is valid (``keys.context.check_context``);
2. the key's metadata suits (adapters that implement ``check_metadata()``: AWS KMS
   symmetric ENCRYPT_DECRYPT in the right region and not a replica; Key Vault RSA >= 3072
   with wrapKey/unwrapKey; KMIP AES-256 with Encrypt/Decrypt) -> ``ConfigurationError``;
3. ``status()`` is ENABLED -> else ``KeyUnavailableError`` / ``KeyNotFoundError`` /
   ``KeyAccessDeniedError`` naming the state;
4. a random 32-byte probe wraps and unwraps back to itself (proves the encrypt *and*
   decrypt permissions) -> else ``IntegrityError``;
5. unwrapping the probe under another tenant's context is refused with ``WrongKeyError``,
   or ``KeyAccessDeniedError`` from a key policy that pins the tenant's context (proves
   the binding) -> else ``ConfigurationError``.

The probe is random and wiped; it is never logged. The report carries timings so the
console can show how slow the customer's key service is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ConfigurationError,
    IntegrityError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyUnavailableError,
    WrongKeyError,
)
from archive_kms.keys.context import check_context
from archive_kms.keys.port import KeyProvider, KeyState, KeyStatus

__all__ = ["PreflightReport", "SupportsMetadataCheck", "check_usable"]


@runtime_checkable
class SupportsMetadataCheck(Protocol):
    def check_metadata(self) -> dict[str, str]:
        """Raise ConfigurationError (saying what to change) if the key cannot be a tenant
        master key; return descriptive details otherwise."""
        ...


@dataclass(frozen=True)
class PreflightReport:
    key_ref: str
    status: KeyStatus
    wrap_seconds: float
    unwrap_seconds: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    checks: tuple[str, ...] = ()


def check_usable(
    provider: KeyProvider, context: Mapping[str, str], *, timer: Callable[[], float] = time.perf_counter
) -> PreflightReport:
    """Run the checks in the module docstring; raise the first failure."""
    ctx = check_context(context)
    checks = ["context"]
    metadata: dict[str, str] = {}
    if isinstance(provider, SupportsMetadataCheck):
        metadata = provider.check_metadata()
        checks.append("metadata")

    status = provider.status()
    if status.state is KeyState.NOT_FOUND:
        raise KeyNotFoundError(f"preflight: key {provider.key_ref} does not exist", resource=provider.key_ref)
    if status.state is KeyState.ACCESS_DENIED:
        raise KeyAccessDeniedError(f"preflight: we may not use key {provider.key_ref}", resource=provider.key_ref)
    if not status.state.usable:
        raise KeyUnavailableError(
            f"preflight: key {provider.key_ref} is {status.state.value}",
            resource=provider.key_ref,
            state=status.state.value,
        )
    checks.append("state")

    probe = SecretBytes.random(32)
    back: SecretBytes | None = None
    try:
        started = timer()
        wrapped = provider.wrap(probe, context=ctx)
        wrapped_at = timer()
        back = provider.unwrap(wrapped, context=ctx)
        unwrapped_at = timer()
        if back != probe:
            raise IntegrityError(
                f"preflight: key {provider.key_ref} unwrapped the probe to different bytes", resource=provider.key_ref
            )
        checks.append("round-trip")

        other = {**ctx, "tenant": ctx["tenant"] + "-preflight-other"}
        try:
            stray = provider.unwrap(wrapped, context=other)
        except (WrongKeyError, KeyAccessDeniedError):
            # AccessDenied here is a key policy pinning the tenant's context (the BYOKMS
            # policy of docs/customer-key-setup.md): the same call just succeeded under ours.
            checks.append("context-binding")
        else:
            stray.wipe()
            raise ConfigurationError(
                f"preflight: key {provider.key_ref} unwrapped under another tenant's "
                "context; the adapter does not bind the context",
                resource=provider.key_ref,
            )
    finally:
        probe.wipe()
        if back is not None:
            back.wipe()
    return PreflightReport(
        key_ref=provider.key_ref,
        status=status,
        wrap_seconds=wrapped_at - started,
        unwrap_seconds=unwrapped_at - wrapped_at,
        metadata=metadata,
        checks=tuple(checks),
    )
