"""Wrapping and unwrapping keychain keys, and finding a key's bytes.

* L2 under L1: the tenant's ``KeyProvider`` (``provider_wrap`` / ``provider_unwrap``,
  counted: ``provider_calls``), with context ``{"tenant": id}``.
* L3 under L2 and L4 under L3: AES-256-GCM, ``crypto.keychain_keys``, with an AAD built
  from the key record (``seal`` / ``open_wrapped``; ``docs/key-hierarchy.md`` section 1).
* ``l2_key`` / ``l3_key`` / ``dek_key``: a key's bytes from the cache, else unwrapped
  down the chain from the L1 provider, each record checked against the head first. The
  caller has already passed the revocation gate; the L1 unwrap re-checks it.

Cached keys carry their lineage (``lineage_l2`` / ``lineage_l3``: the L1 reference and
generation and the ids and versions of the records above them): a key is served from the
cache only while the head still names the same lineage, so a DEK cached under a workspace
key that a rotation or an erasure has since replaced is unwrapped again from its record
(and then found destroyed) instead of served. A child's cache entry never outlives its
parent's (``KeyCache.put(parent=)``). ``dek_key`` also refuses a DEK that a scoped
(granular) revocation covers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from archive_kms.crypto.keychain_keys import KEY_SIZE, WRAPPED_KEY_SIZE, open_key, seal_key, wrap_aad
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.keychain import KeyRecord, KeyRecordState, TenantHead, WorkspaceHead, time_out
from archive_kms.errors import (
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    TenantRevokedError,
    WrongKeyError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain.heads import TenantHeads, lineage_l2, lineage_l3
from archive_kms.keys.keychain.ids import parse_dek_id
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain.values import ProviderCallCounts
from archive_kms.keys.port import KeyProvider, WrappedKey

__all__ = [
    "KeyWrapping",
    "ProviderResolver",
    "destroyed_error",
    "erased_error",
    "lineage_l2",
    "lineage_l3",
    "open_wrapped",
    "record_aad",
    "scoped_refusal",
    "seal",
]

ProviderResolver = Callable[[str], KeyProvider]


def record_aad(rec: KeyRecord) -> bytes:
    """The wrap AAD of an L3/L4 record: level, tenant, workspace, key id, generation and
    parent (id, generation)."""
    return wrap_aad(
        (
            rec.tenant_id,
            rec.level.value,
            rec.workspace_id or "",
            rec.record_id,
            str(rec.generation),
            rec.parent_id,
            str(rec.parent_version),
        )
    )


def seal(parent: SecretBytes, key: SecretBytes, rec: KeyRecord) -> bytes:
    """``key`` wrapped under ``parent`` for ``rec`` (whose ``wrapped`` is not read)."""
    return seal_key(parent, key, record_aad(rec))


def open_wrapped(parent: SecretBytes, rec: KeyRecord) -> SecretBytes:
    """The key ``rec`` holds, unwrapped under ``parent``."""
    if len(rec.wrapped) != WRAPPED_KEY_SIZE:
        raise KeychainTamperedError(
            f"wrapped key of {rec.record_id} has {len(rec.wrapped)} bytes", resource=f"keychain:{rec.tenant_id}"
        )
    try:
        return open_key(parent, rec.wrapped, record_aad(rec))
    except WrongKeyError:
        # The record's signature verified, so its bytes are ours: the parent key is not the
        # one that wrapped it (e.g. an L1 holding different material than before).
        raise WrongKeyError(
            f"{rec.record_id} of tenant {rec.tenant_id} does not open under {rec.parent_id}",
            resource=f"keychain:{rec.tenant_id}/{rec.record_id}",
        ) from None


def scoped_refusal(head: TenantHead, ws: WorkspaceHead, bucket: int | None, what: str) -> TenantRevokedError | None:
    """The error refusing ``what`` (a DEK of ``bucket``, or with None the workspace's new
    DEKs) if a scoped revocation covers it, else None."""
    scope = head.scoped_revocation(ws.workspace_id, bucket, ws.bucket_seconds)
    if scope is None:
        return None
    return TenantRevokedError(
        f"tenant {head.tenant_id}: {what} is under a revocation of {scope.describe()} since "
        f"{time_out(scope.revoked_at)}; refused until it is restored (`archive-kms restore "
        f"{head.tenant_id}{' --workspace ' + scope.workspace_id if scope.workspace_id else ''}"
        f"{' --before ' + (time_out(scope.before) or '') if scope.before else ''}`)",
        resource=f"keychain:{head.tenant_id}/{ws.workspace_id}",
        state="revoked",
    )


def destroyed_error(tenant_id: str, record_id: str) -> KeyDestroyedError:
    return KeyDestroyedError(
        f"DEK {record_id} of tenant {tenant_id} was crypto-erased; the data it protected is unrecoverable",
        resource=f"keychain:{tenant_id}/{record_id}",
        state="destroyed",
    )


def erased_error(tenant_id: str, workspace_id: str) -> KeyDestroyedError:
    return KeyDestroyedError(
        f"workspace {workspace_id} of tenant {tenant_id} was crypto-erased; use a new workspace id",
        resource=f"keychain:{tenant_id}/{workspace_id}",
        state="destroyed",
    )


class KeyWrapping:
    """L1 provider calls (counted) and key resolution through the cache."""

    def __init__(self, heads: TenantHeads, checks: RecordChecks, cache: KeyCache, resolve: ProviderResolver) -> None:
        self._heads = heads
        self._checks = checks
        self._cache = cache
        self.resolve = resolve
        self._lock = threading.Lock()
        self._wraps = 0
        self._unwraps = 0

    @property
    def provider_calls(self) -> ProviderCallCounts:
        with self._lock:
            return ProviderCallCounts(self._wraps, self._unwraps)

    # --- L2 under L1 ---------------------------------------------------------------------

    def provider_wrap(self, provider: KeyProvider, key: SecretBytes, tenant_id: str) -> WrappedKey:
        with self._lock:
            self._wraps += 1
        return provider.wrap(key, context={"tenant": tenant_id})

    def provider_unwrap(self, provider: KeyProvider, rec: KeyRecord, tenant_id: str) -> SecretBytes:
        with self._lock:
            self._unwraps += 1
        wrapped = WrappedKey(key_ref=rec.wrap_ref, algorithm=rec.wrap_algorithm, ciphertext=rec.wrapped)
        key = provider.unwrap(wrapped, context={"tenant": tenant_id})
        if not isinstance(key, SecretBytes) or len(key) != KEY_SIZE:
            raise WrongKeyError(
                f"L1 {provider.key_ref} returned no {KEY_SIZE}-byte key for tenant {tenant_id}",
                resource=provider.key_ref,
            )
        return key

    def unwrap_l2_from_provider(self, head: TenantHead, rec: KeyRecord) -> SecretBytes:
        """The L2 key of ``rec`` (checked against ``head``) from the head's L1, never the cache."""
        return self.provider_unwrap(self.resolve(head.l1_ref), rec, head.tenant_id)

    # --- key resolution (gate already passed by the caller) ---------------------------------

    def l2_key(self, head: TenantHead) -> SecretBytes:
        rid = head.l2.record_id
        tag = lineage_l2(head)
        cached = self._cache.get(head.tenant_id, rid, tag=tag)
        if cached is not None:
            return cached
        rec = self._checks.checked_l2(head)
        self._heads.gate(head.tenant_id)
        key = self.unwrap_l2_from_provider(head, rec)
        self._cache.put(head.tenant_id, rid, key, tag=tag)
        return key

    def l3_key(self, head: TenantHead, ws: WorkspaceHead) -> SecretBytes:
        if ws.erased:
            raise erased_error(head.tenant_id, ws.workspace_id)
        rid = ws.l3.record_id
        tag = lineage_l3(head, ws)
        cached = self._cache.get(head.tenant_id, rid, tag=tag)
        if cached is not None:
            return cached
        rec = self._checks.checked_l3(head, ws)
        key = open_wrapped(self.l2_key(head), rec)
        self._cache.put(head.tenant_id, rid, key, tag=tag, parent=head.l2.record_id)
        return key

    def dek_key(self, head: TenantHead, record_id: str) -> SecretBytes:
        tenant_id = head.tenant_id
        workspace_id, bucket, _ = parse_dek_id(record_id)
        ws = head.workspace(workspace_id)
        if ws is None:
            raise KeyNotFoundError(
                f"tenant {tenant_id} has no workspace {workspace_id} (DEK {record_id})",
                resource=f"keychain:{tenant_id}/{record_id}",
            )
        if ws.erased or bucket < ws.erased_before_bucket:
            raise destroyed_error(tenant_id, record_id)
        refused = scoped_refusal(head, ws, bucket, f"DEK {record_id}")
        if refused is not None:
            raise refused
        tag = lineage_l3(head, ws)
        cached = self._cache.get(tenant_id, record_id, tag=tag)
        if cached is not None:
            return cached
        rec = self._checks.checked_dek(head, ws, record_id)
        if rec.state is KeyRecordState.DESTROYED:
            raise destroyed_error(tenant_id, record_id)
        key = open_wrapped(self.l3_key(head, ws), rec)
        self._cache.put(tenant_id, record_id, key, tag=tag, parent=ws.l3.record_id)
        return key
