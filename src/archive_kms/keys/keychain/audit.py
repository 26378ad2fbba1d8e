"""The keychain's side of the audit log: the small port it needs, recording committed
head changes as ``keychain.<action>``, repairing a record lost to a crash, and reading the
highest head version the log vouches for (the rollback check in ``heads``; ADR 0007).

The port is declared here, not taken from ``state``: the keychain needs two methods of the
audit log, and ``keys`` does not import ``state`` (ADR 0010). The state store's
``AuditLog`` satisfies it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from archive_kms.domain.audit import AuditEvent, AuditRecord
from archive_kms.domain.keychain import TenantHead

__all__ = [
    "AUDIT_ACTION_PREFIX",
    "AUDIT_ACTOR",
    "DEFAULT_AUDIT_REFRESH_SECONDS",
    "AuditTrail",
    "KeychainAuditLog",
]

log = logging.getLogger(__name__)

AUDIT_ACTOR = "keychain"
AUDIT_ACTION_PREFIX = "keychain."
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


@dataclass(frozen=True)
class _AuditMark:
    """What this process knows from a tenant's audit chain: the highest keychain head
    version recorded, up to which record (``after_seq``), read when (monotonic)."""

    version: int
    after_seq: int
    read_at: float


def audited_head_version(rec: AuditRecord) -> int | None:
    """The head version a keychain audit record vouches for, or None for other records."""
    if not rec.action.startswith(AUDIT_ACTION_PREFIX):
        return None
    version = rec.details.get("head_version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    return None


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
    ) -> None:
        self._audit = audit
        self._refresh_seconds = refresh_seconds
        self._tenant_lock = tenant_lock
        self._lock = threading.Lock()
        self._marks: dict[str, _AuditMark] = {}
        self._pending: dict[str, list[AuditEvent]] = {}  # committed, append failed: retried on next load

    @property
    def enabled(self) -> bool:
        return self._audit is not None

    def audited_version(self, tenant_id: str, *, fresh: bool = False) -> int:
        """The highest keychain head version the audit log records for the tenant (0 with
        no audit log or no record). Read in full once per tenant per process, then only
        the records appended since, at most every ``refresh_seconds`` (or now, if
        ``fresh``); this process's own appends raise it as they land."""
        if self._audit is None:
            return 0
        with self._lock:
            mark = self._marks.get(tenant_id)
        now = time.monotonic()
        if mark is not None and not fresh and now - mark.read_at < self._refresh_seconds:
            return mark.version
        version, after_seq = (mark.version, mark.after_seq) if mark is not None else (0, 0)
        for rec in self._audit.iter_audit(tenant_id=tenant_id, after_seq=after_seq):
            after_seq = max(after_seq, rec.seq)
            vouched = audited_head_version(rec)
            if vouched is not None:
                version = max(version, vouched)
        with self._lock:
            current = self._marks.get(tenant_id)
            if current is not None:  # a concurrent reader or an own append: keep the larger of each
                version, after_seq = max(version, current.version), max(after_seq, current.after_seq)
            self._marks[tenant_id] = _AuditMark(version, after_seq, now)
        return version

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
