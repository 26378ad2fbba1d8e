"""The audit log's values, shared by the state store that keeps the log (``state``) and
the components that write to it (the keychain, operations): what a caller appends
(:class:`AuditEvent`), what is stored (:class:`AuditRecord`) and what a verification
found (:class:`AuditVerification`). Pure values; the hash chain is ``state.audit``, the
log itself the ``AuditLog`` port in ``state.port``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["AuditEvent", "AuditRecord", "AuditVerification"]


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
