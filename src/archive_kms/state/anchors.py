"""Audit anchors: the audit log's global head, published where the database's owner
cannot take it back.

The sealed chain heads (``state/audit.py``) stop an attacker who can write the database
but lacks the sealing key from editing, deleting or truncating records. They do not stop
a **rollback**: restore an older copy of the log together with the sealed head saved with
it, and everything verifies. Nor does anything inside the database. So the head is
published, from time to time, to an ``AnchorStore`` outside it: an S3 bucket with Object
Lock in compliance mode (``anchors_s3.py``), where nobody, including the platform's own
administrators, can delete or overwrite an anchor before its retention ends.

An anchor is ``(count, head_hash)`` of the global chain, filed under the log's identity
(``log_id``: the hash of its first record, so two databases never share anchors, and a
restored backup of the same log finds its own). Because each record's hash
covers the previous one, "record ``count`` still has hash ``head_hash``, and the chain
from genesis to the head verifies" proves that nothing at or below the anchor changed and
that the log was not rolled back below it. Anchors need no signature: a forged extra
anchor can only make verification fail (a false alarm), never hide tampering, and the
latest real one cannot be removed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from archive_kms.errors import IntegrityError, StateError, ValidationError
from archive_kms.state.port import AuditVerification

__all__ = [
    "AnchorStore",
    "AuditAnchor",
    "MemoryAnchorStore",
    "check_anchor",
    "log_id",
    "publish_anchor",
    "verify_with_anchor",
]

ANCHOR_FORMAT = "archive_kms.audit.anchor/1"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class AuditAnchor:
    log_id: str  # hash of the log's first record: which log this anchors
    count: int  # records on the global chain when anchored
    head_hash: str  # hash of record ``count``
    anchored_at: datetime

    def __post_init__(self) -> None:
        if len(self.log_id) != 64 or not set(self.log_id) <= _HEX:
            raise ValidationError("an audit anchor's log id is 64 lowercase hex digits")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValidationError("an audit anchor needs a record count >= 1")
        if len(self.head_hash) != 64 or not set(self.head_hash) <= _HEX:
            raise ValidationError("an audit anchor's head hash is 64 lowercase hex digits")

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": ANCHOR_FORMAT,
                "chain": "global",
                "log_id": self.log_id,
                "count": self.count,
                "head_hash": self.head_hash,
                "anchored_at": self.anchored_at.isoformat(),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> AuditAnchor:
        try:
            doc = json.loads(data)
            if doc.get("format") != ANCHOR_FORMAT or doc.get("chain") != "global":
                raise ValueError("unknown format")
            return cls(
                str(doc["log_id"]), int(doc["count"]), str(doc["head_hash"]), datetime.fromisoformat(doc["anchored_at"])
            )
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise IntegrityError(f"audit anchor {where} is malformed ({exc})", resource=where) from None


@runtime_checkable
class AnchorStore(Protocol):
    """Where anchors are published. Write-once: an anchor cannot be changed or deleted."""

    def publish(self, anchor: AuditAnchor) -> str:
        """Store ``anchor``; returns where (a URI). Publishing the same count twice keeps the first."""
        ...

    def latest(self, log_id: str) -> AuditAnchor | None:
        """The anchor of log ``log_id`` with the highest count, ``None`` if none was published."""
        ...


class MemoryAnchorStore:
    """Anchors in a dict (unit tests, ``Platform.in_memory()``)."""

    def __init__(self) -> None:
        self._anchors: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()

    def publish(self, anchor: AuditAnchor) -> str:
        with self._lock:
            self._anchors.setdefault((anchor.log_id, anchor.count), anchor.to_bytes())
        return f"memory://audit-anchors/{anchor.log_id}/{anchor.count}"

    def latest(self, log_id: str) -> AuditAnchor | None:
        with self._lock:
            counts = [c for (lid, c) in self._anchors if lid == log_id]
            if not counts:
                return None
            where = f"memory://audit-anchors/{log_id}/{max(counts)}"
            return AuditAnchor.from_bytes(self._anchors[(log_id, max(counts))], where=where)


def _last_record(state: Any, count: int) -> Any:
    return next(iter(state.iter_audit(after_seq=count - 1, page_size=1)), None)


def log_id(state: Any) -> str | None:
    """The log's identity: the hash of its first record (``None`` for an empty log)."""
    first = _last_record(state, 1)
    return first.hash if first is not None and first.seq == 1 else None


def publish_anchor(state: Any, store: AnchorStore, *, now: datetime | None = None) -> tuple[AuditAnchor, str]:
    """Verify the whole log, then publish its global head. Refuses to anchor a log that
    does not verify (that would bless the damage)."""
    v = state.verify_audit()
    if not v.ok:
        raise IntegrityError(
            f"the audit log does not verify (seq {v.first_bad_seq}: {v.reason}); it is not anchored", resource="audit"
        )
    if v.records == 0:
        raise StateError("the audit log is empty: nothing to anchor", resource="audit")
    last = _last_record(state, v.records)
    if last is None or last.seq != v.records:
        raise IntegrityError(f"audit record {v.records} vanished while anchoring", resource="audit")
    anchor = AuditAnchor(log_id(state) or "", v.records, last.hash, now or datetime.now(UTC))
    return anchor, store.publish(anchor)


def check_anchor(state: Any, anchor: AuditAnchor) -> AuditVerification:
    """Is the log still the one that was anchored? (Run with a verified log.)"""
    rec = _last_record(state, anchor.count)
    if rec is None or rec.seq != anchor.count:
        return AuditVerification(
            False,
            None,
            f"the log has fewer than {anchor.count} records, the anchored "
            "count: it was rolled back or truncated since the anchor",
        )
    if rec.hash != anchor.head_hash:
        return AuditVerification(
            False, anchor.count, "record at the anchor has another hash: the log was rewritten since the anchor"
        )
    return AuditVerification(True, None, "", anchor.count)


def verify_with_anchor(
    state: Any, store: AnchorStore | None, *, tenant_id: str | None = None
) -> tuple[AuditVerification, AuditAnchor | None]:
    """``verify_audit`` and, when anchors are published, the latest anchor. The anchor
    is always checked against the global chain: it covers every tenant's records."""
    v = state.verify_audit(tenant_id=tenant_id)
    lid = log_id(state)
    anchor = store.latest(lid) if store is not None and lid is not None else None
    if not v.ok or anchor is None:
        return v, anchor
    if tenant_id is not None:
        whole = state.verify_audit()
        if not whole.ok:
            return whole, anchor
    checked = check_anchor(state, anchor)
    return (v if checked.ok else checked), anchor
