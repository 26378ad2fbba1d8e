"""Customer key rotation: what version a tenant's master key is at, and the customer's
**confirmation** of a rotation (``docs/key-lifecycle.md`` "Rotation").

A confirmation is a signed statement (the platform signing key, its own purpose
prefix) that a named principal confirmed one rotation of one tenant: it binds the tenant,
the rotation id, the rotation's single-use challenge (``nonce``), the key version the
rotation observed, and an expiry. The console issues one for an authenticated caller with
the ``confirm_rotation`` permission; an operator issues one with
``archive-kms confirm-rotation``. ``confirm_rotation`` accepts it only if all of these
hold, and changes nothing (but the audit log) otherwise:

1. it parses and its signature verifies under the platform's key (not forged, not edited);
2. it has not expired (and was not issued in the future);
3. the rotation exists, belongs to the tenant named, and waits for a confirmation;
4. it names the version the rotation observed (not another rotation of the same key);
5. the provider, read now, still says that version is current (independent of the
   statement: a confirmation of a key the customer rotated again meanwhile is refused);
6. its challenge is the rotation's current one, consumed by a compare-and-set in the state
   store (single use: a replay finds the challenge gone).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.keychain import SignedJson, b64_in, time_in, time_out
from archive_kms.errors import ArchiveKmsError, IntegrityError, StateError, ValidationError
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, KeyRotation, RotationState

__all__ = [
    "CONFIRMATION_FORMAT",
    "CONFIRMATION_PURPOSE",
    "RotationConfirmation",
    "confirm_rotation",
    "current_key_version",
    "issue_confirmation",
    "new_challenge",
]

CONFIRMATION_FORMAT = "archive_kms.rotation-confirmation/1"
CONFIRMATION_PURPOSE = "rotation-confirmation/v1"
DEFAULT_TTL = timedelta(minutes=15)
MAX_TTL = timedelta(hours=24)
#: How far in the future ``issued_at`` may be (clock skew between console and worker).
ISSUE_SKEW = timedelta(minutes=2)
MAX_CONFIRMATION_BYTES = 16 * 1024


def new_challenge() -> str:
    """A fresh single-use challenge for a rotation awaiting confirmation (128 bits)."""
    return secrets.token_hex(16)


def current_key_version(platform: Platform, key_ref: str) -> str | None:
    """The provider's current version of ``key_ref``, read now: KMS ``CurrentKeyMaterialId``
    (DescribeKey), Key Vault's current key version, the KMIP object's unique id."""
    return platform.resolve_provider(key_ref).status().key_version


@dataclass(frozen=True)
class RotationConfirmation(SignedJson):
    tenant_id: str
    rotation_id: str
    nonce: str = field(repr=False)
    observed_version: str | None
    confirmed_by: str
    issued_at: datetime
    expires_at: datetime
    signer_key_id: str = ""
    signature: bytes = field(default=b"", repr=False)

    def _fields(self) -> dict[str, Any]:
        return {
            "format": CONFIRMATION_FORMAT,
            "tenant_id": self.tenant_id,
            "rotation_id": self.rotation_id,
            "nonce": self.nonce,
            "observed_version": self.observed_version,
            "confirmed_by": self.confirmed_by,
            "issued_at": time_out(self.issued_at),
            "expires_at": time_out(self.expires_at),
            "signer_key_id": self.signer_key_id,
        }

    def signed(self, signer: Signer) -> RotationConfirmation:
        unsigned = replace(self, signer_key_id=signer.key_id, signature=b"")
        return replace(unsigned, signature=signer.sign(unsigned.signing_payload(), purpose=CONFIRMATION_PURPOSE))

    @classmethod
    def from_json(cls, data: bytes | str) -> RotationConfirmation:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if len(data) > MAX_CONFIRMATION_BYTES:
            raise IntegrityError("the rotation confirmation is too large")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != CONFIRMATION_FORMAT:
                raise ValueError
            if set(obj) != {*cls._keys(), "signature"}:
                raise ValueError
            return cls(
                tenant_id=str(obj["tenant_id"]),
                rotation_id=str(obj["rotation_id"]),
                nonce=str(obj["nonce"]),
                observed_version=None if obj["observed_version"] is None else str(obj["observed_version"]),
                confirmed_by=str(obj["confirmed_by"]),
                issued_at=time_in(obj["issued_at"]),  # type: ignore[arg-type]
                expires_at=time_in(obj["expires_at"]),  # type: ignore[arg-type]
                signer_key_id=str(obj["signer_key_id"]),
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            raise IntegrityError(f"not a well-formed {CONFIRMATION_FORMAT} document") from None

    @staticmethod
    def _keys() -> set[str]:
        return {
            "format",
            "tenant_id",
            "rotation_id",
            "nonce",
            "observed_version",
            "confirmed_by",
            "issued_at",
            "expires_at",
            "signer_key_id",
        }


def issue_confirmation(
    platform: Platform,
    tenant_id: str,
    rotation_id: str,
    *,
    confirmed_by: str,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
) -> RotationConfirmation:
    """A signed confirmation of ``rotation_id`` by ``confirmed_by`` (an authenticated
    principal), valid for ``ttl``. ``ValidationError`` / ``StateError`` if the rotation does
    not wait for one (nothing is signed then)."""
    if not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise ValidationError(f"a confirmation is valid 1 s to {int(MAX_TTL.total_seconds())} s")
    rotation = _awaiting(platform, tenant_id, rotation_id)
    assert rotation.nonce is not None
    issued = now or datetime.now(UTC)
    return RotationConfirmation(
        tenant_id=tenant_id,
        rotation_id=rotation_id,
        nonce=rotation.nonce,
        observed_version=rotation.observed_version,
        confirmed_by=confirmed_by,
        issued_at=issued,
        expires_at=issued + ttl,
    ).signed(platform.require_signer())


def _awaiting(platform: Platform, tenant_id: str, rotation_id: str) -> KeyRotation:
    rotation = platform.state.get_rotation(rotation_id)
    if rotation is None or rotation.tenant_id != tenant_id:
        raise StateError(f"tenant {tenant_id} has no rotation {rotation_id!r}", resource=f"rotation:{rotation_id}")
    if rotation.state is not RotationState.AWAITING or rotation.nonce is None:
        raise StateError(
            f"rotation {rotation_id} of {tenant_id} is {rotation.state.value}, not awaiting a confirmation",
            resource=f"rotation:{rotation_id}",
        )
    return rotation


def confirm_rotation(
    platform: Platform,
    data: bytes | str | RotationConfirmation,
    *,
    tenant_id: str,
    actor: str,
    verifier: Verifier | None = None,
    now: datetime | None = None,
) -> KeyRotation:
    """Accept a confirmation for ``tenant_id`` (the six checks of the module doc) and mark
    the rotation confirmed; the caller then resumes its run. Any refusal raises
    (``IntegrityError`` forged/malformed, ``ValidationError`` expired/mismatched,
    ``StateError`` replayed/not awaiting), changes nothing, and is audited as
    ``rotation.confirm_refused`` with the reason."""
    current = now or datetime.now(UTC)
    rotation_id = None
    try:
        conf = data if isinstance(data, RotationConfirmation) else RotationConfirmation.from_json(data)
        rotation_id = conf.rotation_id
        (verifier or platform.require_signer().verifier()).verify(
            conf.signing_payload(), conf.signature, key_id=conf.signer_key_id, purpose=CONFIRMATION_PURPOSE
        )
        if conf.tenant_id != tenant_id:
            raise ValidationError(f"the confirmation is for tenant {conf.tenant_id}, not {tenant_id}")
        if current > conf.expires_at:
            raise ValidationError(f"the confirmation expired at {time_out(conf.expires_at)}; issue a new one")
        if conf.issued_at > current + ISSUE_SKEW:
            raise ValidationError("the confirmation was issued in the future")
        rotation = platform.state.get_rotation(conf.rotation_id)
        if rotation is None or rotation.tenant_id != tenant_id:
            raise ValidationError(f"tenant {tenant_id} has no rotation {conf.rotation_id!r}")
        if rotation.state is not RotationState.AWAITING:
            raise StateError(
                f"rotation {conf.rotation_id} is {rotation.state.value}, not awaiting a confirmation "
                "(a confirmation is used once)",
                resource=f"rotation:{conf.rotation_id}",
            )
        if conf.observed_version != rotation.observed_version:
            raise ValidationError(
                f"the confirmation names key version {conf.observed_version}, the rotation observed "
                f"{rotation.observed_version}"
            )
        seen = current_key_version(platform, rotation.key_ref)
        if seen != rotation.observed_version:
            raise ValidationError(
                f"the key's current version is now {seen}, not {rotation.observed_version}: the key changed again; "
                "a new rotation will be detected"
            )
        done = platform.state.update_rotation(
            conf.rotation_id,
            expect=[RotationState.AWAITING],
            match_nonce=conf.nonce,
            state=RotationState.CONFIRMED,
            nonce=None,
            confirmed_by=conf.confirmed_by,
            confirmed_at=current,
            details={"confirmation_verified_version": seen},
        )
    except ArchiveKmsError as exc:
        platform.state.append_audit(
            AuditEvent(
                actor=actor,
                action="rotation.confirm_refused",
                tenant_id=tenant_id,
                details={"rotation_id": rotation_id, "reason": f"{type(exc).__name__}: {exc}"[:500]},
            )
        )
        raise
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="rotation.confirmed",
            tenant_id=tenant_id,
            run_id=done.run_id,
            details={
                "rotation_id": done.rotation_id,
                "confirmed_by": done.confirmed_by,
                "observed_version": done.observed_version,
            },
        )
    )
    return done
