"""Audit anchors: the audit log's global head, published where the database's owner
cannot take it back, each anchor chained to the one before it.

The sealed chain heads (``state/audit.py``) stop an attacker who can write the database
but lacks the sealing key from editing, deleting or truncating records. They do not stop
a **rollback**: restore an older copy of the log together with the sealed head saved with
it, and everything verifies. Nor does anything inside the database. So the head is
published, after every migration run and on a schedule (the ``audit-anchor`` deployment),
to an ``AnchorStore`` outside it: an S3 bucket with Object Lock in compliance mode
(``anchors_s3.py``), where nobody, including the platform's own administrators, can delete
or overwrite an anchor before its retention ends.

An anchor is ``(count, head_hash)`` of the global chain, filed under the log's identity
(``log_id``: the hash of its first record, so two databases never share anchors, and a
restored backup of the same log finds its own). Because each record's hash covers the
previous one, "record ``count`` still has hash ``head_hash``" proves that nothing at or
below the anchor changed. Format 2 (this code) adds:

* ``prev``: the ``(count, head_hash)`` of the latest anchor when this one was published,
  so anchors form a chain, and
* a signature by the platform signing key (purpose ``audit-anchor/v1``), so an anchor
  written by someone else who can put objects in the bucket is told apart.

Three rules use them:

1. **Publishing continues the chain or refuses.** ``publish_anchor`` reads the latest
   anchor first; if the log no longer holds it (a whole-database restore to an earlier
   state, a log replaced), or its signature does not verify, that is a fork: an alarm
   (``archive_kms.alarms``) and ``AuditForkError``, and nothing is anchored over it.
2. **Verification walks every anchor.** ``verify_with_anchor`` lists all anchors of the
   log and checks each one against the log (one pass), the latest one's signature, and
   that its ``prev`` names an anchor that is there. A forged anchor at a higher count that
   matches a rolled-back log is found because the real ones below it (which cannot be
   deleted) no longer match.
3. **Loading a tenant checks the latest anchor** (``check_latest_anchor``, wired into the
   keychain at the composition root): a process that finds the log below its latest anchor
   refuses to use any keychain, so a restored database cannot decrypt what was erased
   after its backup was taken.

Format 1 anchors (no ``prev``, no signature) published by earlier releases still read and
verify against the log.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from archive_kms.alarms import AlarmLog, raise_alarm
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import AuditForkError, IntegrityError, StateError, ValidationError
from archive_kms.state.port import AuditVerification

__all__ = [
    "ANCHOR_PURPOSE",
    "AnchorPoint",
    "AnchorStore",
    "AuditAnchor",
    "LatestAnchorCheck",
    "MemoryAnchorStore",
    "check_anchor",
    "check_latest_anchor",
    "latest_signed",
    "log_id",
    "publish_anchor",
    "verify_with_anchor",
]

ANCHOR_FORMAT_V1 = "archive_kms.audit.anchor/1"
ANCHOR_FORMAT = "archive_kms.audit.anchor/2"
ANCHOR_PURPOSE = "audit-anchor/v1"
_HEX = frozenset("0123456789abcdef")


def _check_hash(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise ValidationError(f"an audit anchor's {name} is 64 lowercase hex digits")


@dataclass(frozen=True)
class AuditAnchor:
    log_id: str  # hash of the log's first record: which log this anchors
    count: int  # records on the global chain when anchored
    head_hash: str  # hash of record ``count``
    anchored_at: datetime
    prev: tuple[int, str] | None = None  # (count, head_hash) of the latest anchor before this one
    signer_key_id: str = ""
    signature: bytes = b""
    format: str = ANCHOR_FORMAT

    def __post_init__(self) -> None:
        _check_hash("log id", self.log_id)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValidationError("an audit anchor needs a record count >= 1")
        _check_hash("head hash", self.head_hash)
        if self.prev is not None:
            count, head = self.prev
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count < self.count:
                raise ValidationError("an audit anchor's predecessor has a lower record count")
            _check_hash("predecessor hash", head)

    @property
    def point(self) -> tuple[int, str]:
        return self.count, self.head_hash

    def _fields(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": self.format,
            "chain": "global",
            "log_id": self.log_id,
            "count": self.count,
            "head_hash": self.head_hash,
            "anchored_at": self.anchored_at.isoformat(),
        }
        if self.format == ANCHOR_FORMAT:
            doc["prev"] = None if self.prev is None else {"count": self.prev[0], "head_hash": self.prev[1]}
            doc["signer_key_id"] = self.signer_key_id
        return doc

    def signing_payload(self) -> bytes:
        return json.dumps(self._fields(), sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        doc = self._fields()
        if self.format == ANCHOR_FORMAT:
            doc["signature"] = base64.b64encode(self.signature).decode("ascii")
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, signer: Signer) -> AuditAnchor:
        unsigned = replace(self, format=ANCHOR_FORMAT, signer_key_id=signer.key_id, signature=b"")
        return replace(unsigned, signature=signer.sign(unsigned.signing_payload(), purpose=ANCHOR_PURPOSE))

    def signature_problem(self, verifier: Verifier) -> str | None:
        """None if this anchor carries the platform's valid signature, else why not."""
        if self.format != ANCHOR_FORMAT or not self.signature:
            return "it is not signed"
        try:
            verifier.verify(self.signing_payload(), self.signature, key_id=self.signer_key_id, purpose=ANCHOR_PURPOSE)
        except IntegrityError as exc:
            return str(exc)
        return None

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> AuditAnchor:
        try:
            doc = json.loads(data)
            fmt = doc.get("format")
            if fmt not in (ANCHOR_FORMAT, ANCHOR_FORMAT_V1) or doc.get("chain") != "global":
                raise ValueError("unknown format")
            prev = None
            if fmt == ANCHOR_FORMAT and doc.get("prev") is not None:
                prev = (int(doc["prev"]["count"]), str(doc["prev"]["head_hash"]))
            return cls(
                str(doc["log_id"]),
                int(doc["count"]),
                str(doc["head_hash"]),
                datetime.fromisoformat(doc["anchored_at"]),
                prev,
                str(doc.get("signer_key_id", "")),
                base64.b64decode(doc["signature"], validate=True) if fmt == ANCHOR_FORMAT else b"",
                fmt,
            )
        except (ValueError, KeyError, TypeError, ValidationError, binascii.Error) as exc:
            raise IntegrityError(f"audit anchor {where} is malformed ({exc})", resource=where) from None


@dataclass(frozen=True)
class AnchorPoint:
    """One published anchor as a listing shows it: its count and head hash, and where."""

    count: int
    head_hash: str
    where: str


@runtime_checkable
class AnchorStore(Protocol):
    """Where anchors are published. Write-once: an anchor cannot be changed or deleted."""

    def publish(self, anchor: AuditAnchor) -> str:
        """Store ``anchor``; returns where (a URI). Publishing the same anchor twice keeps the first."""
        ...

    def latest(self, log_id: str) -> AuditAnchor | None:
        """The anchor of log ``log_id`` with the highest count, ``None`` if none was published."""
        ...

    def points(self, log_id: str) -> list[AnchorPoint]:
        """Every anchor of log ``log_id`` (count, head hash), lowest count first."""
        ...

    def read(self, log_id: str, point: AnchorPoint) -> AuditAnchor:
        """The anchor at ``point`` (from ``points``); ``IntegrityError`` if it is not the one its name says."""
        ...


class MemoryAnchorStore:
    """Anchors in a dict (unit tests, ``Platform.in_memory()``), filed like the S3 store:
    by count and head hash, so two anchors of one count can both be there."""

    def __init__(self) -> None:
        self._anchors: dict[tuple[str, int, str], bytes] = {}
        self._lock = threading.Lock()

    def publish(self, anchor: AuditAnchor) -> str:
        with self._lock:
            self._anchors.setdefault((anchor.log_id, anchor.count, anchor.head_hash), anchor.to_bytes())
        return f"memory://audit-anchors/{anchor.log_id}/{anchor.count}-{anchor.head_hash}"

    def latest(self, log_id: str) -> AuditAnchor | None:
        points = self.points(log_id)
        return self.read(log_id, points[-1]) if points else None

    def read(self, log_id: str, point: AnchorPoint) -> AuditAnchor:
        with self._lock:
            return AuditAnchor.from_bytes(self._anchors[(log_id, point.count, point.head_hash)], where=point.where)

    def points(self, log_id: str) -> list[AnchorPoint]:
        with self._lock:
            keys = sorted((c, h) for (lid, c, h) in self._anchors if lid == log_id)
        return [AnchorPoint(c, h, f"memory://audit-anchors/{log_id}/{c}-{h}") for c, h in keys]


def _last_record(state: Any, count: int) -> Any:
    return next(iter(state.iter_audit(after_seq=count - 1, page_size=1)), None)


def log_id(state: Any) -> str | None:
    """The log's identity: the hash of its first record (``None`` for an empty log)."""
    first = _last_record(state, 1)
    return first.hash if first is not None and first.seq == 1 else None


def check_anchor(state: Any, anchor: AuditAnchor | AnchorPoint) -> AuditVerification:
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


def _check_points(state: Any, points: Iterable[AnchorPoint]) -> AuditVerification:
    """Every anchor against the log in one pass over it (lowest count first)."""
    wanted: dict[int, list[AnchorPoint]] = {}
    for p in points:
        wanted.setdefault(p.count, []).append(p)
    if not wanted:
        return AuditVerification(True, None, "", 0)
    highest = max(wanted)
    seen = 0
    for rec in state.iter_audit():
        seen = rec.seq
        for p in wanted.get(rec.seq, ()):
            if rec.hash != p.head_hash:
                return AuditVerification(
                    False,
                    rec.seq,
                    f"record {rec.seq} has another hash than the anchor at {p.where}: the log was rewritten or "
                    "replaced by another history since that anchor (a fork)",
                )
        if rec.seq >= highest:
            break
    if seen < highest:
        return AuditVerification(
            False,
            None,
            f"the log has {seen} records but an anchor ({wanted[highest][0].where}) covers {highest}: it was "
            "rolled back or truncated since the anchor",
        )
    return AuditVerification(True, None, "", len(wanted))


def latest_signed(
    store: AnchorStore, lid: str, verifier: Verifier | None
) -> tuple[AuditAnchor | None, AuditAnchor | None]:
    """``(top, trusted)``: the anchor with the highest count, and the one a decision may
    rest on: the highest anchor the platform signed (``verifier``), walking down past
    anchors it did not sign (anyone who can write the bucket can add those). A log with
    no signed anchor at all (anchored only by earlier releases, format 1): the top one.
    No verifier: the top one."""
    points = store.points(lid)
    if not points:
        return None, None
    top = store.read(lid, points[-1])
    if verifier is None:
        return top, top
    for point in reversed(points):
        anchor = top if point is points[-1] else store.read(lid, point)
        if anchor.format == ANCHOR_FORMAT and anchor.signature_problem(verifier) is None:
            return top, anchor
    return top, top


def _chain_problem(latest: AuditAnchor, points: list[AnchorPoint], verifier: Verifier | None) -> str | None:
    """Why the latest anchor does not continue the published chain, or None."""
    if latest.format != ANCHOR_FORMAT:
        return None  # an anchor of an earlier release: no link, no signature to check
    if verifier is not None:
        problem = latest.signature_problem(verifier)
        if problem is not None:
            return f"the latest anchor (record {latest.count}) is not the platform's: {problem}"
    below = {(p.count, p.head_hash) for p in points if p.count < latest.count}
    if latest.prev is None:
        if below:
            return (
                f"the latest anchor (record {latest.count}) names no predecessor, but {len(below)} anchor(s) precede it"
            )
        return None
    if latest.prev not in below:
        return (
            f"the latest anchor (record {latest.count}) names predecessor record {latest.prev[0]}, "
            "which is not an anchor of this log"
        )
    return None


def publish_anchor(
    state: Any,
    store: AnchorStore,
    *,
    signer: Signer | None = None,
    verifier: Verifier | None = None,
    alarms: AlarmLog | None = None,
    now: datetime | None = None,
) -> tuple[AuditAnchor, str]:
    """Verify the whole log, check that it continues the latest anchor, then publish its
    global head chained to that anchor (signed by ``signer``). Refuses to anchor a log
    that does not verify (that would bless the damage) and, with an alarm and
    ``AuditForkError``, a log that no longer holds the latest anchor (or whose latest
    anchor is not the platform's). Publishing with no new record is a no-op that returns
    the latest anchor."""
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
    lid = log_id(state) or ""
    verifier = verifier or (signer.verifier() if signer is not None else None)
    top, latest = latest_signed(store, lid, verifier)
    if latest is not None:
        continued = check_anchor(state, latest)
        problem = None if continued.ok else continued.reason
        if problem is None and top is not None and top.point != latest.point:
            sig = top.signature_problem(verifier) if verifier is not None else "it is not signed"
            problem = f"the latest anchor (record {top.count}) is not the platform's: {sig}"
        if problem is not None:
            message = (
                f"refusing to anchor the audit log ({v.records} records): it does not continue the latest anchor "
                f"(record {latest.count}): {problem}. A whole-database restore, a replaced log or a forged "
                "anchor; investigate before anything is anchored over it (docs/state-store.md, Anchors)"
            )
            raise_alarm(
                alarms, "audit_fork", message, details={"log_id": lid, "anchored": latest.count, "log": v.records}
            )
            raise AuditForkError(message, resource="audit")
        if latest.count == v.records:
            return latest, store.publish(latest)  # nothing new since: the same anchor
    anchor = AuditAnchor(
        lid,
        v.records,
        last.hash,
        now or datetime.now(UTC),
        prev=None if latest is None else latest.point,
    )
    if signer is not None:
        anchor = anchor.signed(signer)
    return anchor, store.publish(anchor)


def verify_with_anchor(
    state: Any,
    store: AnchorStore | None,
    *,
    tenant_id: str | None = None,
    verifier: Verifier | None = None,
) -> tuple[AuditVerification, AuditAnchor | None]:
    """``verify_audit`` and, when anchors are published, every anchor of the log: each
    one's record must still be in the log with its hash (the anchors always cover the
    global chain, so every tenant's records), and the latest one must be signed by the
    platform (``verifier``) and name a published predecessor. Returns the verification
    and the latest anchor."""
    v = state.verify_audit(tenant_id=tenant_id)
    lid = log_id(state)
    if store is None or lid is None:
        return v, None
    points = store.points(lid)
    latest = store.latest(lid) if points else None
    if not v.ok or latest is None:
        return v, latest
    if tenant_id is not None:
        whole = state.verify_audit()
        if not whole.ok:
            return whole, latest
    checked = _check_points(state, points)
    if not checked.ok:
        return checked, latest
    problem = _chain_problem(latest, points, verifier)
    if problem is not None:
        return AuditVerification(False, None, problem, v.records), latest
    return v, latest


class LatestAnchorCheck:
    """``check()`` raises ``AuditForkError`` (after an alarm) if the log no longer holds
    the latest anchor: the keychain calls it when it first reads a tenant's audit trail
    in a process and then at most every ``every`` seconds, so a whole-database restore
    to before an erasure is refused by every fresh process instead of decrypting what was
    erased. A store that cannot be read is not a fork: the error goes to the caller."""

    def __init__(
        self,
        state: Any,
        store: AnchorStore,
        *,
        alarms: AlarmLog | None = None,
        verifier: Verifier | None = None,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state, self._store, self._alarms, self._verifier = state, store, alarms, verifier
        self._every, self._clock = every, clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None

    def __call__(self) -> None:
        now = self._clock()
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self._every:
                return
        check_latest_anchor(self._state, self._store, alarms=self._alarms, verifier=self._verifier)
        with self._lock:
            self._checked_at = now


def check_latest_anchor(
    state: Any, store: AnchorStore, *, alarms: AlarmLog | None = None, verifier: Verifier | None = None
) -> AuditAnchor | None:
    """The latest anchor of the log the platform signed (``latest_signed``), checked
    against it; ``AuditForkError`` (alarmed) if the log no longer holds it. Anchors the
    platform did not sign neither vouch for a log nor lock it (``audit verify`` reports
    them)."""
    lid = log_id(state)
    if lid is None:
        return None
    _, latest = latest_signed(store, lid, verifier)
    if latest is None:
        return None
    checked = check_anchor(state, latest)
    if not checked.ok:
        message = (
            f"the audit log does not hold its latest anchor (record {latest.count}, {latest.anchored_at:%Y-%m-%d %H:%M} "
            f"UTC): {checked.reason}. The database was restored or replaced: refusing to use the keychain until "
            "an operator investigates (docs/state-store.md, Anchors)"
        )
        raise_alarm(alarms, "audit_fork", message, details={"log_id": lid, "anchored": latest.count})
        raise AuditForkError(message, resource="audit")
    return latest
