"""Reading and writing a tenant's keychain under its signed head.

Every operation runs against a verified head: ``read`` hands it to a function, ``write``
asks a function for a :class:`Plan` (records to commit, the new head, cache changes, audit
details) and commits it with a compare-and-set on the head version, re-planning when
another process committed first. Loading a head checks its signature, its tenant, this
process's high-water mark (a lower version is a replay) and the audit log's (a lower
version is a rollback, ADR 0007), and the revocation flag (``gate``); with a key-state
guard, ``gate`` also checks the tenant's master key at its provider (``access``).

Reads (``read``) may reuse the head this process verified less than ``recheck_seconds``
ago instead of reading the store again (``Settings.revocation_check_seconds``, 0.5 s in
production, 0 = every use reads the store). That bounds what a revocation, erasure or
rotation committed by another process can go unnoticed here: ``recheck_seconds``. Writes
always read the store (their compare-and-set needs the current head anyway).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.keychain import AuditedChange, KeyRecord, KeyRecordState, TenantHead, WorkspaceHead, time_out
from archive_kms.errors import (
    ArchiveKmsError,
    KeychainTamperedError,
    KeyNotFoundError,
    StateError,
    TenantRevokedError,
    VersionConflictError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain.access import KeyStateGuard
from archive_kms.keys.keychain.audit import AuditTrail
from archive_kms.keys.keychain.ids import dt
from archive_kms.keys.keychain.records import Mismatch, RecordChecks
from archive_kms.keys.keychain_store import KeychainStore

__all__ = ["Plan", "TenantHeads", "TenantLocks", "cache_lineage", "lineage_l2", "lineage_l3", "workspace_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Plan:
    """What a write operation wants committed, and what it returns once committed."""

    result: Any
    head: TenantHead | None = None  # None: nothing to write
    records: list[KeyRecord] = field(default_factory=list)
    cache_put: list[tuple[str, SecretBytes]] = field(default_factory=list)
    cache_drop: list[str] = field(default_factory=list)
    audit_details: dict[str, Any] = field(default_factory=dict)  # ids and counts only, never key bytes


class TenantLocks:
    """One re-entrant lock per tenant (a write's own load may repair the audit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}

    def __call__(self, tenant_id: str) -> threading.RLock:
        with self._lock:
            return self._locks.setdefault(tenant_id, threading.RLock())


def workspace_of(head: TenantHead, workspace_id: str) -> WorkspaceHead:
    ws = head.workspace(workspace_id)
    if ws is None:
        raise KeyNotFoundError(
            f"tenant {head.tenant_id} has no workspace {workspace_id}",
            resource=f"keychain:{head.tenant_id}/{workspace_id}",
        )
    return ws


def lineage_l2(head: TenantHead) -> str:
    """The cache tag of the head's L2: which L1 (and generation) wraps which L2 version."""
    return f"{head.l1_ref}@{head.l1_generation}|{head.l2.record_id}#{head.l2.version}"


def lineage_l3(head: TenantHead, ws: WorkspaceHead) -> str:
    """The cache tag of a workspace key, and of every DEK opened under it."""
    return f"{lineage_l2(head)}|{ws.l3.record_id}#{ws.l3.version}"


def cache_lineage(head: TenantHead, key_id: str) -> tuple[str, str | None]:
    """(tag, parent id) a key of ``head`` is cached with: an L2 under nothing, an L3 under
    the L2, a DEK under its workspace's L3."""
    if key_id == head.l2.record_id:
        return lineage_l2(head), None
    level, _, rest = key_id.partition("/")
    workspace_id = rest.split("/", 1)[0]
    ws = head.workspace(workspace_id)
    if ws is None or level not in ("l3", "l4"):
        return "", None  # not the head's: cached untagged, so a tagged read misses it
    if level == "l3":
        return lineage_l3(head, ws), head.l2.record_id
    return lineage_l3(head, ws), ws.l3.record_id


class TenantHeads:
    """Loads verified heads and commits plans under them (see the module docstring)."""

    def __init__(
        self,
        store: KeychainStore,
        checks: RecordChecks,
        trail: AuditTrail,
        cache: KeyCache,
        *,
        clock: Callable[[], float],
        max_attempts: int,
        locks: TenantLocks,
        recheck_seconds: float = 0.0,
        guard: KeyStateGuard | None = None,
    ) -> None:
        if recheck_seconds < 0:
            raise ValueError("recheck_seconds must be >= 0")
        self.store = store
        self.recheck_seconds = float(recheck_seconds)
        self.guard = guard
        self._checks = checks
        self._trail = trail
        self._cache = cache
        self._clock = clock
        self._max_attempts = max_attempts
        self.tenant_lock = locks
        self._lock = threading.Lock()
        self._head_seen: dict[str, int] = {}  # high-water mark: a lower head is a replay
        self._verified: dict[str, TenantHead] = {}  # last verified head per tenant
        self._loaded_at: dict[str, float] = {}  # when it was read from the store (the cache's clock)

    def now(self) -> datetime:
        return dt(self._clock())

    def bump(self, rec: KeyRecord, **changes: Any) -> KeyRecord:
        """The next version of a verified record (unsigned until commit)."""
        return replace(rec, **changes, version=rec.version + 1, updated_at=self.now(), signer_key_id="", signature=b"")

    def destroy(self, rec: KeyRecord) -> KeyRecord:
        return self.bump(rec, state=KeyRecordState.DESTROYED, wrapped=b"")

    # --- loading ----------------------------------------------------------------------------

    def load(self, tenant_id: str, *, gate: bool, max_age: float = 0.0) -> TenantHead:
        """The tenant's verified head; with ``gate``, ``TenantRevokedError`` if it is revoked
        and the key-state guard's refusal if its master key is unusable. ``max_age`` > 0:
        a head this process read from the store less than that long ago is used again."""
        if max_age > 0:
            with self._lock:
                known, at = self._verified.get(tenant_id), self._loaded_at.get(tenant_id)
            if known is not None and at is not None and self._cache.now() - at < max_age:
                return self._gated(known, gate)
        head = self._read(tenant_id)
        return self._gated(head, gate)

    def _gated(self, head: TenantHead, gate: bool) -> TenantHead:
        tenant_id = head.tenant_id
        if head.revoked:
            self._cache.purge(tenant_id)  # this process may not be the one that revoked
        if gate and head.revoked:
            raise TenantRevokedError(
                f"tenant {tenant_id}: key revoked at {time_out(head.revoked_at) or '?'}; reads, writes and "
                "searches are refused until it is restored (`archive-kms restore`)",
                resource=f"tenant:{tenant_id}",
                state="revoked",
            )
        if gate and self.guard is not None:
            self.guard.check(tenant_id, head.l1_ref)
        return head

    def revalidate(self, tenant_id: str) -> None:
        """What a use of the tenant's keys would check, without using them: called for the
        tenants this process holds keys of, so an idle process purges them too."""
        with self._lock:
            at = self._loaded_at.get(tenant_id)
        if at is None or self._cache.now() - at >= max(self.recheck_seconds, 0.25):
            head = self._read(tenant_id)
        else:
            with self._lock:
                head = self._verified[tenant_id]
        if head.revoked:
            self._cache.purge(tenant_id)
            return
        if self.guard is not None:
            verdict, last_ok = self.guard.current(tenant_id, head.l1_ref, wait=False)
            if verdict is None:
                return
            try:
                self.guard.enforce(verdict, last_ok)  # purges as a use would
            except ArchiveKmsError:
                pass

    def _read(self, tenant_id: str) -> TenantHead:
        # The replay checks compare with high-water marks as they were *before* this read:
        # a concurrent thread may raise the mark while we read, and a head older than that
        # newer mark is then a race, not a replay (the store only moves forward). The same
        # holds for the audit log's mark: a commit is audited only after it landed.
        with self._lock:
            seen = self._head_seen.get(tenant_id, 0)
        audited = self._trail.audited_version(tenant_id)
        head = self.store.get_head(tenant_id)
        if head is None:
            if audited:
                raise self.missing_error(tenant_id, audited)
            raise KeyNotFoundError(f"tenant {tenant_id} has no keychain", resource=f"keychain:{tenant_id}")
        resource = f"keychain:{tenant_id}/head"
        with self._lock:
            known = self._verified.get(tenant_id)
        if known != head:  # equal in every field (signature included) to one verified before: skip
            self._checks.verify_head(head, resource)
        if head.tenant_id != tenant_id:
            raise KeychainTamperedError(
                f"keychain head stored for tenant {tenant_id} belongs to tenant {head.tenant_id}", resource=resource
            )
        if head.version < seen:
            raise KeychainTamperedError(
                f"keychain head of tenant {tenant_id} went back from version {seen} to {head.version} (replayed)",
                resource=resource,
            )
        if head.version < audited:
            log.error(
                "keychain: tampering detected: tenant %s head v%d below audited v%d", tenant_id, head.version, audited
            )
            raise KeychainTamperedError(
                f"keychain of tenant {tenant_id} is at version {head.version} but the audit log recorded version "
                f"{audited}: rolled back; restore the keychain rows from a backup at version {audited} or later, "
                "or investigate (docs/key-hierarchy.md section 7)",
                resource=resource,
            )
        with self._lock:
            if head.version >= self._head_seen.get(tenant_id, 0):
                self._head_seen[tenant_id] = head.version
                self._verified[tenant_id] = head
                self._loaded_at[tenant_id] = self._cache.now()
        change = head.audited_change
        if self._trail.enabled and change is not None and change.version > audited:
            self._trail.repair(head)
        return head

    def gate(self, tenant_id: str) -> None:
        """Re-read the revocation flag right before a provider call (long operations)."""
        self.load(tenant_id, gate=True)

    def forget(self, tenant_id: str) -> None:
        """Make the next read of ``tenant_id`` go to the store (after this process changed it)."""
        with self._lock:
            self._loaded_at.pop(tenant_id, None)

    def _note(self, head: TenantHead) -> None:
        """This process committed ``head``: it is the current one (reads reuse it)."""
        tenant_id = head.tenant_id
        with self._lock:
            if head.version >= self._head_seen.get(tenant_id, 0):
                self._head_seen[tenant_id] = head.version
                self._verified[tenant_id] = head
                self._loaded_at[tenant_id] = self._cache.now()

    @staticmethod
    def missing_error(tenant_id: str, audited: int) -> KeychainTamperedError:
        return KeychainTamperedError(
            f"keychain of tenant {tenant_id} is missing but the audit log recorded version {audited}: deleted or "
            f"rolled back; restore the keychain rows from a backup at version {audited} or later, or investigate",
            resource=f"keychain:{tenant_id}/head",
        )

    # --- reading and writing ----------------------------------------------------------------

    def read(self, tenant_id: str, fn: Callable[[TenantHead], T], *, gate: bool = True, fresh: bool = False) -> T:
        """``fn`` of the tenant's verified head. A head this process verified less than
        ``recheck_seconds`` ago is reused, unless ``fresh``: choices about *new* data (which
        DEK encrypts it) are made on the current head, so a DEK another process just
        retired or erased is never given new data."""
        max_age = self.recheck_seconds if gate and not fresh else 0.0
        head = self.load(tenant_id, gate=gate, max_age=max_age)
        for _ in range(self._max_attempts):
            try:
                return fn(head)
            except Mismatch as m:
                head = self._recheck(tenant_id, head, m, gate)
            except KeyNotFoundError:
                # A head reused from this process's last look (``recheck_seconds``) may predate
                # a workspace or DEK another process created since: look at the store once more
                # before saying it does not exist (an object just written elsewhere reads).
                if max_age <= 0:
                    raise
                max_age = 0.0
                reloaded = self.load(tenant_id, gate=gate)
                if reloaded.version == head.version:
                    raise
                head = reloaded
        raise self._busy(tenant_id)

    def write(
        self, tenant_id: str, fn: Callable[[TenantHead], Plan], *, gate: bool, audit_action: str | None = None
    ) -> Any:
        """Plan against the current head and commit (compare-and-set), re-planning on a
        concurrent commit. ``audit_action``: the commit is recorded in the audit log as
        ``keychain.<audit_action>`` and named in the new head's ``audited_change``; None
        for routine DEK and workspace creation (ADR 0007)."""
        with self.tenant_lock(tenant_id):
            head = self.load(tenant_id, gate=gate)
            for _ in range(self._max_attempts):
                try:
                    plan = fn(head)
                except Mismatch as m:
                    head = self._recheck(tenant_id, head, m, gate)
                    continue
                new_head = None
                if plan.head is not None:
                    new_head = replace(plan.head, version=head.version + 1, updated_at=self.now())
                    if audit_action is not None:
                        new_head = replace(new_head, audited_change=AuditedChange(new_head.version, audit_action))
                    new_head = self._checks.sign_head(new_head)
                    records = [self._checks.sign_record(r) for r in plan.records]
                    try:
                        self.store.commit(tenant_id, head=new_head, records=records, expected_head_version=head.version)
                    except VersionConflictError:  # another process committed first: re-plan
                        head = self.load(tenant_id, gate=gate)
                        continue
                    self._note(new_head)
                self._cache.discard(tenant_id, plan.cache_drop)
                current = new_head or head
                for key_id, key in plan.cache_put:
                    tag, parent = cache_lineage(current, key_id)
                    self._cache.put(tenant_id, key_id, key, tag=tag, parent=parent)
                if new_head is not None and audit_action is not None:
                    self._trail.record_commit(new_head, plan.audit_details)  # after the cache: an erased key is gone
                return plan.result
            raise self._busy(tenant_id)

    def check_absent(self, tenant_id: str) -> None:
        """Before a tenant's first commit (hold ``tenant_lock``): ``StateError`` if it has a
        keychain, ``KeychainTamperedError`` if the audit log says it had one."""
        audited = self._trail.audited_version(tenant_id)  # before the head, as in load
        if self.store.get_head(tenant_id) is not None:
            raise StateError(f"tenant {tenant_id} already has a keychain", resource=f"keychain:{tenant_id}")
        if audited:  # a new keychain here would be one more rollback, and refused at once
            raise self.missing_error(tenant_id, audited)

    def commit_first(
        self, head: TenantHead, record: KeyRecord, key: SecretBytes, details: dict[str, Any]
    ) -> TenantHead:
        """Commit a new tenant's first head and its L2 record (after ``check_absent``), cache
        the L2 key and record the commit in the audit log."""
        tenant_id = head.tenant_id
        head = self._checks.sign_head(head)
        self.store.commit(tenant_id, head=head, records=[self._checks.sign_record(record)], expected_head_version=None)
        self._note(head)
        tag, parent = cache_lineage(head, record.record_id)
        self._cache.put(tenant_id, record.record_id, key, tag=tag, parent=parent)
        self._trail.record_commit(head, details)
        return head

    def _recheck(self, tenant_id: str, head: TenantHead, m: Mismatch, gate: bool) -> TenantHead:
        fresh = self.load(tenant_id, gate=gate)
        if fresh.version == head.version:
            log.error("keychain: tampering detected: %s", m.message)
            raise KeychainTamperedError(m.message, resource=m.resource) from None
        return fresh

    def _busy(self, tenant_id: str) -> VersionConflictError:
        return VersionConflictError(
            f"keychain of tenant {tenant_id} kept changing over {self._max_attempts} attempts; retry",
            resource=f"keychain:{tenant_id}",
        )
