"""The keychain's side of the audit log: the small port it needs, recording committed
head changes as ``keychain.<action>``, repairing a record lost to a crash, and reading the
highest head version the log vouches for (the rollback check in ``heads``; ADR 0007).

A number is trusted only from records on the tenant's verified chain (ADR 0028): each
record's hash recomputes, its ``tenant_seq`` and ``tenant_prev_hash`` link to the one
before, and the chain ends exactly at the tenant's stored head, whose seal verifies with
the platform key. Records beyond the sealed head (a concurrent append, or a row someone
inserted) are not read until a head covers them, so an INSERT into ``audit_log`` can
neither raise the version (a false lock) nor lower it. A chain that does not verify is
refused (``KeychainTamperedError``, alarmed) until an operator appends an audited
``keychain.unlock`` record (``Keychain.unlock``: CLI ``archive-kms keychain unlock``),
which names the head version it accepts and the breaks it accepts; it counts only if it is
itself on the verified chain (appended with the platform key).

Before reading the log the trail runs ``anchor_check`` (the latest audit anchor must still
be in the log: a whole-database restore is refused by every fresh process).

The port is declared here, not taken from ``state``: ``keys`` does not import ``state``
(ADR 0010). The state store's ``AuditLog`` satisfies it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from archive_kms.alarms import raise_alarm
from archive_kms.domain.audit import GENESIS, AuditEvent, AuditHead, AuditRecord, recompute_hash
from archive_kms.domain.keychain import TenantHead
from archive_kms.errors import KeychainTamperedError, ValidationError

__all__ = [
    "AUDIT_ACTION_PREFIX",
    "AUDIT_ACTOR",
    "DEFAULT_AUDIT_REFRESH_SECONDS",
    "UNLOCK_ACTION",
    "AuditTrail",
    "KeychainAuditLog",
    "TrailStatus",
]

log = logging.getLogger(__name__)

AUDIT_ACTOR = "keychain"
AUDIT_ACTION_PREFIX = "keychain."
UNLOCK_ACTION = "keychain.unlock"
DEFAULT_AUDIT_REFRESH_SECONDS = 60.0  # as long as a cached key may outlive a revoke


@runtime_checkable
class KeychainAuditLog(Protocol):
    """What the keychain needs of the audit log (``state.port.AuditLog`` has it)."""

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        """Append one record to the hash chain; raises if it was not written."""
        ...

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        """The tenant's records after ``after_seq``, in ``seq`` order."""
        ...

    def audit_head(self, *, tenant_id: str | None = None) -> AuditHead | None:
        """The tenant chain's stored head and whether its seal verifies."""
        ...


@dataclass(frozen=True)
class _AuditMark:
    """What this process knows from a tenant's verified audit chain: the highest keychain
    head version it vouches for, up to which record (``after_seq``, the global ``seq`` of
    the last verified record, and ``tip``, its tenant position and hash), read when
    (monotonic)."""

    version: int
    after_seq: int
    read_at: float
    tip: tuple[int, str] = (0, GENESIS)
    breaks: frozenset[int] = frozenset()  # positions where the chain broke, not yet accepted by an unlock


@dataclass(frozen=True)
class TrailStatus:
    """A tenant's audit chain as the keychain reads it (``AuditTrail.inspect``): the
    version it vouches for, and what is wrong with it (None if nothing)."""

    version: int
    records: int
    breaks: tuple[int, ...]
    problem: str | None


class _Broken(Exception):
    def __init__(self, problem: str, breaks: frozenset[int] = frozenset()) -> None:
        super().__init__(problem)
        self.problem = problem
        self.breaks = breaks


def audited_head_version(rec: AuditRecord) -> int | None:
    """The head version a keychain audit record vouches for, or None for other records
    (and for an unlock, which resets rather than raises: ``_vouched``)."""
    if not rec.action.startswith(AUDIT_ACTION_PREFIX) or rec.action == UNLOCK_ACTION:
        return None
    version = rec.details.get("head_version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    return None


def _hash_ok(rec: AuditRecord) -> bool:
    try:
        return recompute_hash(rec) == rec.hash
    except ValidationError:
        return False


def _vouched(rec: AuditRecord, version: int) -> tuple[int, frozenset[int]]:
    """The version after ``rec`` (an unlock resets it to the head version it accepts) and
    the chain breaks it accepts."""
    if rec.action == UNLOCK_ACTION:
        accepted = rec.details.get("accept_head_version")
        breaks = rec.details.get("accept_chain_breaks") or []
        if isinstance(accepted, int) and not isinstance(accepted, bool) and accepted >= 1:
            version = accepted
        return version, frozenset(b for b in breaks if isinstance(b, int))
    vouched = audited_head_version(rec)
    return (version if vouched is None else max(version, vouched)), frozenset()


def audit_event(head: TenantHead, version: int, action: str, details: Mapping[str, Any]) -> AuditEvent:
    """``keychain.<action>`` for head ``version``: ids and counts only, never key bytes."""
    return AuditEvent(
        actor=AUDIT_ACTOR,
        action=AUDIT_ACTION_PREFIX + action,
        tenant_id=head.tenant_id,
        details={"tenant_id": head.tenant_id, "head_version": version, "l1_ref": head.l1_ref, **details},
    )


class AuditTrail:
    """Records keychain commits in the audit log and tracks, per tenant, the highest head
    version it vouches for. Without a log (bare unit tests) it records nothing and vouches
    for version 0. ``tenant_lock`` is the keychain's per-tenant lock (``repair`` holds it)."""

    def __init__(
        self,
        audit: KeychainAuditLog | None,
        *,
        refresh_seconds: float,
        tenant_lock: Callable[[str], AbstractContextManager[Any]],
        anchor_check: Callable[[], None] | None = None,
    ) -> None:
        self._audit = audit
        self._refresh_seconds = refresh_seconds
        self._tenant_lock = tenant_lock
        self._anchor_check = anchor_check
        self._lock = threading.Lock()
        self._marks: dict[str, _AuditMark] = {}
        self._pending: dict[str, list[AuditEvent]] = {}  # committed, append failed: retried on next load
        self._alarmed: set[tuple[str, str]] = set()  # (tenant, problem): one alarm each per process

    @property
    def enabled(self) -> bool:
        return self._audit is not None

    def audited_version(self, tenant_id: str, *, fresh: bool = False) -> int:
        """The highest keychain head version the tenant's verified audit chain records (0
        with no audit log or no record). Read in full once per tenant per process, then
        only the records appended since, at most every ``refresh_seconds`` (or now, if
        ``fresh``); this process's own appends raise it as they land.
        ``KeychainTamperedError`` (alarmed) if the chain does not verify; whatever
        ``anchor_check`` raises if the log went back below its latest anchor."""
        if self._audit is None:
            return 0
        with self._lock:
            mark = self._marks.get(tenant_id)
        now = time.monotonic()
        if mark is not None and not fresh and now - mark.read_at < self._refresh_seconds:
            return mark.version
        if self._anchor_check is not None:
            self._anchor_check()
        try:
            read = self._read(tenant_id, mark or _AuditMark(0, 0, now), now)
        except _Broken as broken:
            self._alarm(tenant_id, broken.problem)
            raise KeychainTamperedError(
                f"the audit chain of tenant {tenant_id} does not verify ({broken.problem}): the keychain trusts no "
                "head version from it and refuses the tenant; investigate, then `archive-kms keychain unlock "
                f"{tenant_id} --reason ...` (docs/key-hierarchy.md section 7)",
                resource=f"audit:tenant:{tenant_id}",
            ) from None
        with self._lock:
            current = self._marks.get(tenant_id)
            if current is not None and current.tip[0] > read.tip[0]:
                read = current  # a concurrent reader got further
            self._marks[tenant_id] = read
        return read.version

    def inspect(self, tenant_id: str) -> TrailStatus:
        """The tenant's chain read afresh from its first record, without raising for a
        broken chain (what ``Keychain.unlock`` decides on)."""
        if self._audit is None:
            return TrailStatus(0, 0, (), None)
        try:
            read = self._read(tenant_id, _AuditMark(0, 0, time.monotonic()), time.monotonic())
        except _Broken as broken:
            return TrailStatus(0, 0, tuple(sorted(broken.breaks)), broken.problem)
        return TrailStatus(read.version, read.tip[0], (), None)

    def commits_above(self, tenant_id: str, version: int) -> list[dict[str, Any]]:
        """The audited keychain commits above head ``version`` (what accepting that head
        undoes): action, head version, seq; read from the records as stored."""
        if self._audit is None:
            return []
        out = []
        for rec in self._audit.iter_audit(tenant_id=tenant_id):
            vouched = audited_head_version(rec)
            if vouched is not None and vouched > version:
                out.append({"action": rec.action, "head_version": vouched, "seq": rec.seq})
        return out[:100]

    def append_unlock(self, tenant_id: str, *, actor: str, details: Mapping[str, Any]) -> None:
        """Append the operator's ``keychain.unlock`` record and forget this process's mark
        (the next load reads the chain again, through the unlock)."""
        if self._audit is None:
            return
        self._audit.append_audit(AuditEvent(actor=actor, action=UNLOCK_ACTION, tenant_id=tenant_id, details=details))
        with self._lock:
            self._marks.pop(tenant_id, None)
            self._alarmed = {a for a in self._alarmed if a[0] != tenant_id}

    def _alarm(self, tenant_id: str, problem: str) -> None:
        with self._lock:
            if (tenant_id, problem) in self._alarmed:
                return
            self._alarmed.add((tenant_id, problem))
        raise_alarm(self._audit, "keychain_audit_chain", problem, tenant_id=tenant_id)

    def _read(self, tenant_id: str, mark: _AuditMark, now: float) -> _AuditMark:
        """Extend ``mark`` along the tenant's chain up to its sealed head (module docstring)."""
        assert self._audit is not None
        head = self._audit.audit_head(tenant_id=tenant_id)
        count, tip = mark.tip
        if head is None:
            if count:
                raise _Broken(f"its head is missing but {count} records were verified before")
            return replace(mark, read_at=now)
        if head.seal_ok is False:
            raise _Broken("its head's seal does not verify with the platform key (the head was rewritten)")
        if head.count < count:
            raise _Broken(f"its head went back from record {count} to {head.count} (records deleted)")
        version, after, breaks = mark.version, mark.after_seq, set(mark.breaks)
        if head.count > count:
            for rec in self._audit.iter_audit(tenant_id=tenant_id, after_seq=after):
                position = rec.tenant_seq
                if position is None or position > head.count:
                    continue  # beyond the sealed head: trusted once a head covers it
                if position != count + 1 or rec.tenant_prev_hash != tip or not _hash_ok(rec):
                    breaks.add(count + 1)  # a record missing, moved, edited or inserted here
                count, tip, after = position, rec.hash, rec.seq
                version, accepted = _vouched(rec, version)
                breaks -= accepted
                if count == head.count:
                    break
        if (count, tip) != (head.count, head.head_hash):
            raise _Broken(
                f"its records end at record {count}, its sealed head says {head.count} "
                "(records deleted, or the head moved without them)",
                frozenset(breaks),
            )
        if breaks:
            raise _Broken(f"it is broken at tenant record(s) {sorted(breaks)}", frozenset(breaks))
        return _AuditMark(version, after, now, (count, tip), frozenset())

    def _note_audited(self, tenant_id: str, version: int) -> None:
        with self._lock:
            mark = self._marks.get(tenant_id)
            if mark is not None:  # without a mark the next load reads the whole chain anyway
                self._marks[tenant_id] = replace(mark, version=max(mark.version, version))

    def record_commit(self, head: TenantHead, details: Mapping[str, Any]) -> None:
        """Record a committed head change. If the append fails the commit stands: the event
        is kept and appended by the next load of the tenant in this process (another
        process writes a recovered record instead), and the error goes to the caller."""
        if self._audit is None or head.audited_change is None:
            return
        event = audit_event(head, head.version, head.audited_change.action, details)
        try:
            self._audit.append_audit(event)
        except Exception:
            with self._lock:
                self._pending.setdefault(head.tenant_id, []).append(event)
            log.error(
                "keychain: tenant %s head v%d committed but its audit record was not written; "
                "it is retried on the next load",
                head.tenant_id,
                head.version,
            )
            raise
        self._note_audited(head.tenant_id, head.version)

    def repair(self, head: TenantHead) -> None:
        """The head's audited change is newer than anything the audit log holds: a crash (or a
        failed append) between a commit and its audit record. Append the kept event if this
        process made the commit, else a ``recovered`` record naming the head version, so the
        log's high-water mark catches up. A concurrent committer may still append its own
        record: a duplicate for one version is harmless (the mark is a maximum). Under the
        tenant lock, so a thread of this process never "recovers" a commit another of its
        threads is still auditing."""
        tenant_id = head.tenant_id
        change = head.audited_change
        if self._audit is None or change is None:
            return
        with self._tenant_lock(tenant_id):
            audited = self.audited_version(tenant_id, fresh=True)  # another process may have appended it
            if change.version <= audited:
                return
            with self._lock:
                pending = self._pending.pop(tenant_id, [])
            try:
                while pending:
                    event = pending[0]
                    if event.details["head_version"] > audited:
                        self._audit.append_audit(event)
                        self._note_audited(tenant_id, event.details["head_version"])
                    pending.pop(0)
            finally:
                if pending:
                    with self._lock:
                        self._pending.setdefault(tenant_id, [])[:0] = pending
            if change.version <= self.audited_version(tenant_id):
                return
            # l1_ref is still the one of that commit: changing it (rotate_l1) is audited.
            self._audit.append_audit(
                audit_event(
                    head,
                    change.version,
                    change.action,
                    {
                        "recovered": True,
                        "found_at_head_version": head.version,
                        "note": "written on a later load: the commit's own audit record is missing "
                        "(crash between the keychain commit and the audit append)",
                    },
                )
            )
            self._note_audited(tenant_id, change.version)
            log.warning(
                "keychain: tenant %s head v%d (%s) had no audit record; recovered record written",
                tenant_id,
                change.version,
                change.action,
            )
