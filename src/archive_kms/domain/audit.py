"""The audit log's values, shared by the state store that keeps the log (``state``) and
the components that write to it (the keychain, operations): what a caller appends
(:class:`AuditEvent`), what is stored (:class:`AuditRecord`) and what a verification
found (:class:`AuditVerification`). Pure values; the hash chain is ``state.audit``, the
log itself the ``AuditLog`` port in ``state.port``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from archive_kms.errors import ValidationError

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "AuditEvent",
    "AuditHead",
    "AuditRecord",
    "AuditVerification",
    "canonical_json",
    "canonical_record",
    "format_ts",
    "parse_ts",
    "recompute_hash",
    "record_hash",
]


@dataclass(frozen=True)
class AuditEvent:
    """What a caller appends. ``details`` must be JSON (str keys; no NaN/Infinity) and
    must never contain key material."""

    actor: str
    action: str
    tenant_id: str | None = None
    run_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """A stored audit record: on the global chain (``seq``/``prev_hash``) and, when it
    names a tenant, on that tenant's chain (``tenant_seq``/``tenant_prev_hash``).
    ``hash`` = SHA-256 of the canonical encoding of every other field (``state.audit``)."""

    seq: int
    ts: datetime
    actor: str
    action: str
    tenant_id: str | None
    run_id: str | None
    details: Mapping[str, Any]
    prev_hash: str
    tenant_seq: int | None
    tenant_prev_hash: str | None
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    first_bad_seq: int | None = None
    reason: str | None = None
    records: int = 0  # records examined
    sealed: bool = False  # chain heads' seals were checked with a key


@dataclass(frozen=True)
class AuditHead:
    """A chain's stored head as the store reads it: ``count`` records, the last one's
    ``head_hash``, and whether its seal verifies with the store's key (``None``: the store
    does not seal heads)."""

    count: int
    head_hash: str
    seal_ok: bool | None = None


# --- the hash chain's encoding (pure; ``state.audit`` builds the chain from these) ---------

GENESIS = "0" * 64
FORMAT_VERSION = 1


def format_ts(ts: datetime) -> str:
    if ts.tzinfo is None:
        raise ValidationError("audit timestamps must be timezone-aware")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def canonical_json(value: Any) -> str:
    """The one JSON encoding that is hashed. Raises ``ValidationError`` for values JSON
    cannot hold exactly (NaN, non-str keys, arbitrary objects such as SecretBytes)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        # The message names the type only: the value might be sensitive.
        raise ValidationError(
            f"audit details must be plain JSON: {type(exc).__name__}: {str(exc).split(':')[0][:80]}"
        ) from None


def canonical_record(
    *,
    seq: int,
    ts: datetime,
    actor: str,
    action: str,
    tenant_id: str | None,
    run_id: str | None,
    details: Mapping[str, Any],
    prev_hash: str,
    tenant_seq: int | None,
    tenant_prev_hash: str | None,
) -> bytes:
    doc = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "ts": format_ts(ts),
        "actor": actor,
        "action": action,
        "tenant": tenant_id,
        "run_id": run_id,
        "details": dict(details),
        "prev_hash": prev_hash,
        "tenant_seq": tenant_seq,
        "tenant_prev_hash": tenant_prev_hash,
    }
    return canonical_json(doc).encode("ascii")


def record_hash(**fields: Any) -> str:
    return hashlib.sha256(canonical_record(**fields)).hexdigest()


def recompute_hash(rec: AuditRecord) -> str:
    return record_hash(
        seq=rec.seq,
        ts=rec.ts,
        actor=rec.actor,
        action=rec.action,
        tenant_id=rec.tenant_id,
        run_id=rec.run_id,
        details=rec.details,
        prev_hash=rec.prev_hash,
        tenant_seq=rec.tenant_seq,
        tenant_prev_hash=rec.tenant_prev_hash,
    )
