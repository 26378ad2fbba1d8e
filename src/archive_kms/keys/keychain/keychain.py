"""The :class:`Keychain`: one object over the tenant key hierarchy, composed of the parts
in this package (the package docstring has the map). Its methods check their arguments'
shape and hand over to the part that owns the operation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from archive_kms.crypto.keychain_keys import KEY_SIZE
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.keychain import (
    AuditedChange,
    KeyLevel,
    KeyRecord,
    KeyRecordState,
    RecordRef,
    ScopedRevocation,
    TenantHead,
)
from archive_kms.errors import ArchiveKmsError, KeychainTamperedError, KeyNotFoundError, StateError, ValidationError
from archive_kms.keys.cache import KeyCache, add_sweep_hook
from archive_kms.keys.keychain.access import KeyStateGuard
from archive_kms.keys.keychain.audit import DEFAULT_AUDIT_REFRESH_SECONDS, AuditTrail, KeychainAuditLog
from archive_kms.keys.keychain.deks import DataKeys
from archive_kms.keys.keychain.erasure import Erasure, ErasureRecord
from archive_kms.keys.keychain.heads import TenantHeads, TenantLocks
from archive_kms.keys.keychain.ids import DEFAULT_BUCKET_SECONDS, check_tenant, l2_id, parse_dek_id
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain.revocation import Revocation
from archive_kms.keys.keychain.rotation import Rotation
from archive_kms.keys.keychain.values import (
    DataKey,
    DekInfo,
    ProviderCallCounts,
    RekeyReport,
    TenantKeyStatus,
    status_of,
)
from archive_kms.keys.keychain.wrapping import KeyWrapping, ProviderResolver
from archive_kms.keys.keychain_store import KeychainStore
from archive_kms.keys.port import KeyProvider

__all__ = ["Keychain"]

log = logging.getLogger(__name__)


class Keychain:
    """The tenant key hierarchy over a :class:`KeychainStore` and L1 :class:`KeyProvider` s.

    ``provider_resolver`` turns an L1 reference (``KeyProvider.key_ref``, as stored in the
    head) into a provider (``keys.registry`` in production). ``clock`` returns POSIX
    seconds (record times, the default ``now``); the cache has its own clock.
    ``bucket_seconds`` is the DEK bucket width for *new* workspaces; each workspace keeps
    the width it was created with, so its DEK ids never change meaning.

    ``audit`` is the state store's audit log (any :class:`KeychainAuditLog`): committed
    head changes are recorded there and a head older than what it recorded is refused
    (rollback). Without it (bare unit tests) only this process's own high-water mark
    catches a rolled-back head; production wiring always passes it.
    ``audit_refresh_seconds``: how often a long-running process re-reads the tenant's new
    audit records (incrementally). ``anchor_check`` raises if the audit log no longer
    holds its latest anchor outside the database (a whole-database restore): called
    whenever the trail is read (it throttles itself), so nothing is unwrapped from a
    restored database (``state.anchors.LatestAnchorCheck``).

    ``revocation_check_seconds``: how old a head this process verified may be when it is
    used again for a read (0: every use reads the store; production 0.5 s). Revocations,
    erasures and rotations committed by other processes take effect here within it.
    ``key_state_guard``: checks the tenant's master key at its provider before its keys
    are used (``access.KeyStateGuard``: bounded staleness, grace policy); None = no check.
    With either, the keychain re-checks the tenants it holds keys of once a second from
    the key cache's sweeper thread, so an idle process purges a revoked tenant's keys too.
    """

    def __init__(
        self,
        store: KeychainStore,
        provider_resolver: ProviderResolver,
        signer: Signer,
        clock: Callable[[], float] = time.time,
        cache: KeyCache | None = None,
        *,
        verifier: Verifier | None = None,
        bucket_seconds: int = DEFAULT_BUCKET_SECONDS,
        max_attempts: int = 8,
        audit: KeychainAuditLog | None = None,
        audit_refresh_seconds: float = DEFAULT_AUDIT_REFRESH_SECONDS,
        anchor_check: Callable[[], None] | None = None,
        revocation_check_seconds: float = 0.0,
        key_state_guard: KeyStateGuard | None = None,
    ) -> None:
        if not isinstance(bucket_seconds, int) or isinstance(bucket_seconds, bool) or bucket_seconds < 1:
            raise ValidationError(f"bucket_seconds must be an int >= 1, got {bucket_seconds!r}")
        self._signer = signer
        self._verifier = verifier or signer.verifier()
        self._cache = cache if cache is not None else KeyCache()
        locks = TenantLocks()
        checks = RecordChecks(store, signer, self._verifier)
        trail = AuditTrail(audit, refresh_seconds=audit_refresh_seconds, tenant_lock=locks, anchor_check=anchor_check)
        self._trail = trail
        heads = TenantHeads(
            store,
            checks,
            trail,
            self._cache,
            clock=clock,
            max_attempts=max_attempts,
            locks=locks,
            recheck_seconds=revocation_check_seconds,
            guard=key_state_guard,
        )
        self._guard = key_state_guard
        keys = KeyWrapping(heads, checks, self._cache, provider_resolver)
        rotation = Rotation(heads, checks, keys)
        self._checks, self._heads, self._keys = checks, heads, keys
        self._deks = DataKeys(heads, checks, keys, clock=clock, bucket_seconds=bucket_seconds)
        self._rotation = rotation
        self._revocation = Revocation(heads, checks, keys, self._cache)
        self._erasure = Erasure(heads, checks, rotation, signer, clock=clock)
        if revocation_check_seconds > 0 or key_state_guard is not None:
            add_sweep_hook(self.revalidate)

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        store: KeychainStore,
        provider_resolver: ProviderResolver,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
        audit: KeychainAuditLog | None = None,
        anchor_check: Callable[[], None] | None = None,
        policy_for: Callable[[str], Any] | None = None,
        on_key_state_change: Callable[..., None] | None = None,
    ) -> Keychain:
        """The production keychain: cache TTL, bucket width, revocation re-check and the
        key-state guard (interval, timeout) from ``settings``; ``policy_for(tenant)`` is
        the tenant's grace policy, ``on_key_state_change(verdict, previous)`` hears about
        master keys that became unusable, unreachable or usable again."""
        from archive_kms.keys.keychain.access import GracePolicy

        cache = KeyCache.from_settings(settings)
        default = GracePolicy.parse(settings.key_outage_grace)
        guard = None
        if settings.key_state_check_seconds > 0:
            guard = KeyStateGuard(
                provider_resolver,
                cache,
                check_seconds=settings.key_state_check_seconds,
                timeout_seconds=settings.key_state_check_timeout_seconds,
                policy_for=policy_for or (lambda tenant_id: default),
                on_change=on_key_state_change,
            )
        return cls(
            store,
            provider_resolver,
            signer,
            clock,
            cache,
            bucket_seconds=settings.dek_bucket_seconds,
            audit=audit,
            anchor_check=anchor_check,
            revocation_check_seconds=settings.revocation_check_seconds,
            key_state_guard=guard,
        )

    def __repr__(self) -> str:
        return f"Keychain(signer={self._signer.key_id!r}, cache={self._cache!r})"

    @property
    def cache(self) -> KeyCache:
        return self._cache

    @property
    def key_state_guard(self) -> KeyStateGuard | None:
        return self._guard

    @property
    def revocation_check_seconds(self) -> float:
        """How stale this keychain's view of another process's revocation may be."""
        return self._heads.recheck_seconds

    def revalidate(self) -> None:
        """Re-check every tenant this process holds keys of (revocation flag, master-key
        state) and purge what may no longer be used; the key cache's sweeper calls it."""
        for tenant_id in self._cache.tenants():
            try:
                self._heads.revalidate(tenant_id)
            except ArchiveKmsError as exc:  # e.g. the state store blinks: keys stay until their expiry
                log.debug("keychain: re-checking tenant %s failed: %s", tenant_id, type(exc).__name__)

    @property
    def provider_calls(self) -> ProviderCallCounts:
        """Total L1 wrap/unwrap calls so far; subtract two snapshots to measure an operation."""
        return self._keys.provider_calls

    # --- tenants --------------------------------------------------------------------------

    def create_tenant(self, tenant_id: str, l1: KeyProvider) -> TenantKeyStatus:
        """Generate the tenant's L2 key and store it wrapped by ``l1`` (1 provider wrap).
        Raises ``StateError`` if the tenant already has a keychain."""
        check_tenant(tenant_id)
        with self._heads.tenant_lock(tenant_id):
            self._heads.check_absent(tenant_id)
            now = self._heads.now()
            l2 = SecretBytes.random(KEY_SIZE)
            wrapped = self._keys.provider_wrap(l1, l2, tenant_id)
            rec = KeyRecord(
                tenant_id=tenant_id,
                record_id=l2_id(1),
                level=KeyLevel.TENANT,
                workspace_id=None,
                bucket=None,
                generation=1,
                parent_id=l1.key_ref,
                parent_version=1,
                wrap_ref=wrapped.key_ref,
                wrap_algorithm=wrapped.algorithm,
                wrapped=wrapped.ciphertext,
                state=KeyRecordState.ACTIVE,
                created_at=now,
                not_after=None,
                updated_at=now,
                version=1,
            )
            head = TenantHead(
                tenant_id=tenant_id,
                version=1,
                l1_ref=l1.key_ref,
                l1_generation=1,
                l2=RecordRef(rec.record_id, 1, 1),
                workspaces=(),
                revoked=False,
                revoked_at=None,
                updated_at=now,
                audited_change=AuditedChange(1, "create"),
            )
            log.info("keychain: tenant %s created under L1 %s", tenant_id, l1.key_ref)
            head = self._heads.commit_first(head, rec, l2, {"l2_id": rec.record_id})
            return status_of(head)

    def lock_status(self, tenant_id: str) -> dict[str, Any]:
        """Why the keychain refuses the tenant, if it does, without refusing: the head's
        version (signature checked), the version the verified audit chain vouches for,
        and the chain's problem (``Keychain.unlock`` decides on this)."""
        check_tenant(tenant_id)
        head = self._verified_head(tenant_id)
        trail = self._trail.inspect(tenant_id)
        locked = trail.problem is not None or head.version < trail.version
        return {
            "tenant": tenant_id,
            "locked": locked,
            "head_version": head.version,
            "audited_version": trail.version if trail.problem is None else None,
            "chain_problem": trail.problem,
            "chain_breaks": list(trail.breaks),
        }

    def unlock(self, tenant_id: str, *, reason: str, actor: str) -> dict[str, Any]:
        """The operator's override for a false lock (ADR 0028): append an audited
        ``keychain.unlock`` record that accepts the keychain head as it is now (its
        version becomes the audit log's high-water mark) and the chain breaks found now.
        It counts only because it is on the verified chain (appended with the platform's
        sealing key). Accepting a head below the audited version brings back whatever the
        audited commits in between did (an erasure, a revocation, a rotation): the report
        lists them. ``StateError`` if the tenant is not locked."""
        check_tenant(tenant_id)
        for what, text in (("reason", reason), ("actor", actor)):
            if not isinstance(text, str) or not text.strip() or len(text) > 500:
                raise ValidationError(f"unlocking a keychain needs a {what} of 1..500 characters")
        if not self._trail.enabled:
            raise StateError("this keychain has no audit log: nothing locks it, nothing to unlock")
        with self._heads.tenant_lock(tenant_id):
            status = self.lock_status(tenant_id)
            if not status["locked"]:
                raise StateError(
                    f"the keychain of tenant {tenant_id} is not locked (head v{status['head_version']}, audit log "
                    f"v{status['audited_version']}): nothing to unlock",
                    resource=f"keychain:{tenant_id}",
                )
            undone = self._trail.commits_above(tenant_id, status["head_version"])
            self._trail.append_unlock(
                tenant_id,
                actor=actor.strip(),
                details={
                    "tenant_id": tenant_id,
                    "accept_head_version": status["head_version"],
                    "accept_chain_breaks": status["chain_breaks"],
                    "audited_version_before": status["audited_version"],
                    "chain_problem": status["chain_problem"],
                    "undone": undone,
                    "reason": reason.strip(),
                    "actor": actor.strip(),
                },
            )
            log.warning("keychain: tenant %s unlocked by %s at head v%d", tenant_id, actor, status["head_version"])
        self.status(tenant_id)  # loads through every check again: raises if the unlock did not take
        return {**status, "locked": False, "unlocked_by": actor.strip(), "undone": undone}

    def _verified_head(self, tenant_id: str) -> TenantHead:
        head = self._heads.store.get_head(tenant_id)
        if head is None:
            raise KeyNotFoundError(f"tenant {tenant_id} has no keychain", resource=f"keychain:{tenant_id}")
        self._checks.verify_head(head, f"keychain:{tenant_id}/head")
        if head.tenant_id != tenant_id:
            raise KeychainTamperedError(
                f"keychain head stored for tenant {tenant_id} belongs to tenant {head.tenant_id}",
                resource=f"keychain:{tenant_id}/head",
            )
        return head

    def status(self, tenant_id: str) -> TenantKeyStatus:
        """The tenant's key state (works while revoked; unwraps nothing)."""
        check_tenant(tenant_id)
        return status_of(self._heads.load(tenant_id, gate=False))

    def check_access(self, tenant_id: str) -> None:
        """Raise what a use of the tenant's keys would raise now (revoked:
        ``TenantRevokedError``; master key unusable at its provider: ``KeyUnavailableError``;
        key service unreachable past the grace policy: ``KeyServiceUnavailableError``),
        without touching a key: the gate for what has no key of its own to ask for (a
        plaintext search index)."""
        check_tenant(tenant_id)
        self._heads.read(tenant_id, lambda head: None)

    def verify_l1_unwrap(self, tenant_id: str) -> None:
        """Unwrap the tenant's L2 from its master key right now, bypassing the cache and
        the revocation flag (the key is wiped at once): raises whatever the provider
        raises. What a revocation receipt probes and ``restore`` relies on."""
        check_tenant(tenant_id)

        def unwrap(head: TenantHead) -> None:
            rec = self._checks.checked_l2(head)
            self._keys.unwrap_l2_from_provider(head, rec).wipe()

        self._heads.read(tenant_id, unwrap, gate=False)

    # --- data keys (deks.DataKeys) ----------------------------------------------------------

    def create_workspace(self, tenant_id: str, workspace_id: str) -> str:
        """Create the workspace's L3 key if missing; returns its record id (optional:
        ``dek_for_encrypt`` does it on demand)."""
        return self._deks.create_workspace(tenant_id, workspace_id)

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK for ``now``'s bucket, created on demand (``DataKeys.dek_for_encrypt``)."""
        return self._deks.dek_for_encrypt(tenant_id, workspace_id, now)

    def dek_by_id(self, tenant_id: str, dek_id: str) -> SecretBytes:
        """The DEK an object header names, for decryption (``DataKeys.dek_by_id``)."""
        return self._deks.dek_by_id(tenant_id, dek_id)

    def dek_for_header(self, header: Any) -> SecretBytes:
        """``dek_by_id`` for an envelope header: pass ``dek_for=keychain.dek_for_header``."""
        return self._deks.dek_for_header(header)

    def search_key_material(self, tenant_id: str) -> SecretBytes:
        """The input of the tenant's search keys, derived from its L2 key."""
        return self._deks.search_key_material(tenant_id)

    def retire_active_dek(self, tenant_id: str, workspace_id: str) -> str | None:
        """Make the active DEK DECRYPT_ONLY now; returns the retired id."""
        return self._deks.retire_active_dek(tenant_id, workspace_id)

    def list_deks(self, tenant_id: str, workspace_id: str | None = None) -> list[DekInfo]:
        """Every DEK (tombstones included), each verified; works while revoked."""
        return self._deks.list_deks(tenant_id, workspace_id)

    def reencrypt_path(self, tenant_id: str, workspace_id: str | None = None) -> list[str]:
        """Every DEK id that can still decrypt, oldest first (``DataKeys.reencrypt_path``)."""
        return self._deks.reencrypt_path(tenant_id, workspace_id)

    # --- rotation (rotation.Rotation) -------------------------------------------------------

    def rotate_l1(self, tenant_id: str, new_l1: KeyProvider) -> TenantKeyStatus:
        """Re-wrap the L2 key under ``new_l1``: 1 unwrap + 1 wrap, whatever the data volume."""
        return self._rotation.rotate_l1(tenant_id, new_l1)

    def rotate_l2(self, tenant_id: str) -> TenantKeyStatus:
        """A new L2 key; the live L3 keys re-wrapped under it; the old L2 destroyed."""
        return self._rotation.rotate_l2(tenant_id)

    def rotate_l3(self, tenant_id: str, workspace_id: str) -> TenantKeyStatus:
        """A new workspace key; its live DEKs re-wrapped under it; the old one destroyed."""
        return self._rotation.rotate_l3(tenant_id, workspace_id)

    def rekey_below_l1(self, tenant_id: str) -> RekeyReport:
        """Replace every L2/L3 key a keychain copy from before the current L1 could open."""
        return self._rotation.rekey_below_l1(tenant_id)

    # --- revocation (revocation.Revocation) -------------------------------------------------

    def revoke(self, tenant_id: str) -> TenantKeyStatus:
        """Refuse every unwrap for the tenant in every process; purge cached keys. Idempotent."""
        return self._revocation.revoke(tenant_id)

    def restore(self, tenant_id: str) -> TenantKeyStatus:
        """Re-enable a revoked tenant once its L1 unwraps again. Idempotent."""
        status = self._revocation.restore(tenant_id)
        if self._guard is not None:
            self._guard.forget(tenant_id)  # ask the provider afresh
        return status

    def revoke_scope(
        self, tenant_id: str, *, workspace_id: str | None = None, before: datetime | float | None = None
    ) -> ScopedRevocation:
        """Granular revocation: one workspace's key (``workspace_id``), the DEKs of every
        bucket that ends at or before ``before`` (in every workspace, or in ``workspace_id``),
        refused in every process; the rest of the tenant stays readable. Idempotent."""
        return self._revocation.revoke_scope(tenant_id, workspace_id, before)

    def restore_scope(
        self, tenant_id: str, *, workspace_id: str | None = None, before: datetime | float | None = None
    ) -> ScopedRevocation | None:
        """Lift the scoped revocation with exactly this scope (after a verified unwrap of
        the L2); returns it, or None if none was in force."""
        return self._revocation.restore_scope(tenant_id, workspace_id, before)

    def scope_covers(
        self, tenant_id: str, workspace_id: str | None, before: datetime | float | None, dek_id: str
    ) -> bool:
        """Whether a scoped revocation of (``workspace_id``, ``before``) would refuse the DEK
        ``dek_id`` (its workspace's bucket width decides), in force or not."""
        check_tenant(tenant_id)
        ws_id, when = self._revocation.scope_of(workspace_id, before)
        target_ws, bucket, _ = parse_dek_id(dek_id)
        ws = self._heads.load(tenant_id, gate=False).workspace(target_ws)
        if ws is None:
            return False
        return ScopedRevocation(ws_id, when, self._heads.now()).covers(target_ws, bucket, ws.bucket_seconds)

    def scoped_revocations(self, tenant_id: str) -> tuple[ScopedRevocation, ...]:
        """The scoped revocations in force (works while revoked)."""
        check_tenant(tenant_id)
        return self._heads.load(tenant_id, gate=False).scoped_revocations

    # --- crypto-erasure (erasure.Erasure) ---------------------------------------------------

    def erase_buckets(
        self,
        tenant_id: str,
        workspace_id: str,
        older_than: datetime | float,
        *,
        reason: str = "retention expired",
    ) -> ErasureRecord:
        """Destroy the DEKs of every bucket before ``older_than``'s; signed record."""
        return self._erasure.erase_buckets(tenant_id, workspace_id, older_than, reason=reason)

    def erase_workspace(self, tenant_id: str, workspace_id: str, *, reason: str = "workspace deleted") -> ErasureRecord:
        """Destroy the workspace key and every DEK under it; signed record."""
        return self._erasure.erase_workspace(tenant_id, workspace_id, reason=reason)

    def erase_deks_below(
        self,
        tenant_id: str,
        floor: Mapping[str, Sequence[int]],
        *,
        reason: str = "superseded by a re-encrypted copy",
    ) -> list[ErasureRecord]:
        """Destroy, per workspace, every DEK up to its floor ``(bucket, generation)``."""
        return self._erasure.erase_deks_below(tenant_id, floor, reason=reason)
