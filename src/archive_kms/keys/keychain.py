"""The keychain: the L2/L3/L4 key hierarchy under a tenant's L1 key. No Prefect, no I/O
beyond the store and the key provider passed in. ``docs/key-hierarchy.md`` is the
narrative; this docstring is the short version.

::

    L1  KeyProvider (customer / platform master key)      wraps L2 with context {"tenant": id}
    L2  tenant key     "l2/<g>"                  32 random bytes, stored only wrapped by L1
    L3  workspace key  "l3/<workspace>/<g>"      AES-256-GCM-wrapped by L2
    L4  DEK            "l4/<workspace>/<bucket>/<g>"  AES-256-GCM-wrapped by L3, one per
                       workspace per time bucket (floor(ts / bucket_seconds), hourly default)

The DEK id is what an object header carries; it is deterministic per (tenant, workspace,
bucket, generation) and ``dek_by_id`` needs nothing else. Wrap AAD binds level, tenant,
workspace, key id, generation and parent (id, generation).

Rotation has one rule (MultiFernet's): the newest key encrypts, any allowed key decrypts,
rotation re-wraps. Only the DEK of the newest bucket encrypts (ACTIVE); older DEKs are
DECRYPT_ONLY; DESTROYED keys are gone (crypto-erasure). ``rotate_l1`` re-wraps one L2
key (1 provider unwrap + 1 wrap, whatever the data volume); ``rotate_l2`` makes a new L2
and re-wraps the L3 keys (not the DEKs); ``rotate_l3`` makes a new workspace key and
re-wraps that workspace's DEKs. ``rekey_below_l1`` (after binding a new L1) replaces every
L2/L3 key a copy of the keychain from before the bind could open, so such a copy opens no
DEK made afterwards; ``erase_deks_below`` then destroys the DEKs up to a floor. Both DEK
erasures (``erase_buckets``, ``erase_deks_below``) replace the workspace key in the same
commit, so a kept copy of an erased DEK's row opens under no live key.

Every record and the per-tenant head are signed by the platform key and checked on
load: an edited, swapped (another tenant's) or replayed (older version) record raises
``KeychainTamperedError``. Before every unwrap, from cache or provider, the tenant's
revocation flag in the signed head is read; a revoked tenant gets ``TenantRevokedError``
and its cached keys are purged.

With an audit log (``audit=``, always in production wiring), every commit that changes
the tenant's security state (everything but routine DEK and workspace creation) is
recorded as ``keychain.<action>`` with the new head version; erasures carry their signed
``ErasureRecord``. The first load of a tenant's head in a process (and again every
``audit_refresh_seconds``) reads the highest head version the log recorded and refuses an
older head (``KeychainTamperedError``: the keychain was rolled back), so a fresh process
cannot be served a restored old keychain. ADR 0007 explains the choices.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    IntegrityError,
    KeychainTamperedError,
    KeyDestroyedError,
    KeyNotFoundError,
    StateError,
    TenantRevokedError,
    ValidationError,
    VersionConflictError,
    WrongKeyError,
)
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain_store import (
    AuditedChange,
    KeychainStore,
    KeyLevel,
    KeyRecord,
    KeyRecordState,
    RecordRef,
    SignedJson,
    TenantHead,
    WorkspaceHead,
    _b64_in,
    _time_in,
    _time_out,
)
from archive_kms.keys.port import KeyProvider, WrappedKey
from archive_kms.keys.signing import Signer, Verifier

if TYPE_CHECKING:
    from archive_kms.state.port import AuditEvent, AuditLog, AuditRecord

__all__ = [
    "DEFAULT_BUCKET_SECONDS",
    "DataKey",
    "DekInfo",
    "ErasureRecord",
    "Keychain",
    "ProviderCallCounts",
    "RekeyReport",
    "TenantKeyStatus",
    "bucket_of",
    "dek_id",
    "parse_dek_id",
]

log = logging.getLogger(__name__)

DEFAULT_BUCKET_SECONDS = 3600
KEY_SIZE = 32
NONCE_SIZE = 12
WRAP_ALGORITHM = "A256GCM"
MAX_DEK_ID_LEN = 128  # what the envelope header accepts

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_WORKSPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,95}\Z")
_UINT_RE = re.compile(r"(0|[1-9][0-9]{0,17})\Z")  # canonical: no sign, no leading zeros
_U32 = struct.Struct(">I")
_WRAP_LABEL = b"archive_kms/v1/keychain-wrap"

AUDIT_ACTOR = "keychain"
AUDIT_ACTION_PREFIX = "keychain."
DEFAULT_AUDIT_REFRESH_SECONDS = 60.0  # as long as a cached key may outlive a revoke

_RECORD_PURPOSE = "keychain-record/v1"
_HEAD_PURPOSE = "keychain-head/v1"
_ERASURE_PURPOSE = "erasure-record/v1"

ProviderResolver = Callable[[str], KeyProvider]
T = TypeVar("T")


# --- ids ----------------------------------------------------------------------------------


def _check_tenant(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not _TENANT_RE.match(tenant_id):
        raise ValidationError("tenant id must be 1..63 chars of [A-Za-z0-9._-], starting alphanumeric")
    return tenant_id


def _check_workspace(workspace_id: object) -> str:
    if not isinstance(workspace_id, str) or not _WORKSPACE_RE.match(workspace_id):
        raise ValidationError("workspace id must be 1..96 chars of [A-Za-z0-9._:@-], starting alphanumeric")
    return workspace_id


def _l2_id(generation: int) -> str:
    return f"l2/{generation}"


def _l3_id(workspace_id: str, generation: int) -> str:
    return f"l3/{workspace_id}/{generation}"


def dek_id(workspace_id: str, bucket: int, generation: int) -> str:
    """The DEK id an object header carries: ``l4/<workspace>/<bucket>/<generation>``."""
    value = f"l4/{_check_workspace(workspace_id)}/{bucket}/{generation}"
    if len(value) > MAX_DEK_ID_LEN:
        raise ValidationError(f"DEK id would exceed {MAX_DEK_ID_LEN} bytes; use a shorter workspace id")
    return value


def parse_dek_id(value: object) -> tuple[str, int, int]:
    """``(workspace_id, bucket, generation)`` of a canonical DEK id, else ``ValidationError``."""
    if not isinstance(value, str) or len(value) > MAX_DEK_ID_LEN:
        raise ValidationError("not a DEK id")
    parts = value.split("/")
    if (
        len(parts) != 4
        or parts[0] != "l4"
        or not _WORKSPACE_RE.match(parts[1])
        or not _UINT_RE.match(parts[2])
        or not _UINT_RE.match(parts[3])
        or parts[3] == "0"
    ):
        raise ValidationError(f"not a DEK id: {value!r} (expected l4/<workspace>/<bucket>/<generation>)")
    return parts[1], int(parts[2]), int(parts[3])


def bucket_of(ts: float, bucket_seconds: int) -> int:
    """The time bucket of a POSIX timestamp: ``floor(ts / bucket_seconds)``."""
    return int(ts // bucket_seconds)


def _as_ts(value: datetime | float | int) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValidationError("times must be timezone-aware datetimes (or POSIX timestamps)")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValidationError(f"not a time: {value!r}")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


# --- AES-GCM wrapping of L3 and L4 ------------------------------------------------------


def _wrap_aad(rec: KeyRecord) -> bytes:
    parts = (
        rec.tenant_id,
        rec.level.value,
        rec.workspace_id or "",
        rec.record_id,
        str(rec.generation),
        rec.parent_id,
        str(rec.parent_version),
    )
    out = [_WRAP_LABEL]
    for p in parts:
        b = p.encode("utf-8")
        out += [_U32.pack(len(b)), b]
    return b"".join(out)


def _seal(parent: SecretBytes, key: SecretBytes, rec: KeyRecord) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(parent.reveal()).encrypt(nonce, key.reveal(), _wrap_aad(rec))


def _open(parent: SecretBytes, rec: KeyRecord) -> SecretBytes:
    blob = rec.wrapped
    if len(blob) != NONCE_SIZE + KEY_SIZE + 16:
        raise KeychainTamperedError(
            f"wrapped key of {rec.record_id} has {len(blob)} bytes", resource=f"keychain:{rec.tenant_id}"
        )
    try:
        raw = AESGCM(parent.reveal()).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _wrap_aad(rec))
    except InvalidTag:
        # The record's signature verified, so its bytes are ours: the parent key is not the
        # one that wrapped it (e.g. an L1 holding different material than before).
        raise WrongKeyError(
            f"{rec.record_id} of tenant {rec.tenant_id} does not open under {rec.parent_id}",
            resource=f"keychain:{rec.tenant_id}/{rec.record_id}",
        ) from None
    return SecretBytes(raw)


# --- value types ---------------------------------------------------------------------------


class DataKey(NamedTuple):
    """``(dek_id, key)``: what ``dek_for_encrypt`` returns. ``key`` hides its bytes."""

    dek_id: str
    key: SecretBytes


@dataclass(frozen=True)
class DekInfo:
    dek_id: str
    workspace_id: str
    bucket: int
    generation: int
    state: KeyRecordState
    created_at: datetime
    not_after: datetime | None


@dataclass(frozen=True)
class TenantKeyStatus:
    tenant_id: str
    l1_ref: str
    l1_generation: int
    l2_id: str
    l2_generation: int
    revoked: bool
    revoked_at: datetime | None
    workspaces: tuple[str, ...]
    erased_workspaces: tuple[str, ...]
    head_version: int


@dataclass(frozen=True)
class ProviderCallCounts:
    """L1 provider calls made by one keychain (attempts, including failed ones)."""

    wrap: int
    unwrap: int

    def __sub__(self, other: ProviderCallCounts) -> ProviderCallCounts:
        return ProviderCallCounts(self.wrap - other.wrap, self.unwrap - other.unwrap)


@dataclass(frozen=True)
class RekeyReport:
    """What ``rekey_below_l1`` replaced; all empty on a rerun that found nothing old."""

    tenant_id: str
    l2_rotated: bool
    l3_rotated: tuple[str, ...]  # workspaces whose key was replaced
    deks_rewrapped: int
    status: TenantKeyStatus

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for an audit record (ids and counts only)."""
        return {
            "l2_id": self.status.l2_id,
            "l2_rotated": self.l2_rotated,
            "l3_rotated": list(self.l3_rotated),
            "deks_rewrapped": self.deks_rewrapped,
            "head_version": self.status.head_version,
        }


@dataclass(frozen=True)
class ErasureRecord(SignedJson):
    """Signed evidence that keys were destroyed (crypto-erasure).

    Verifies on its own: ``ErasureRecord.from_json(data).verify(Verifier.from_public_pem(pem))``
    with the platform's public key. ``head_version`` is the keychain head version that
    recorded the erasure: a keychain found below it later has been rolled back.
    ``l3_destroyed`` is true when the workspace key itself was destroyed (the workspace is
    gone). ``floor_dek_id`` is set for scope ``floor`` (``erase_deks_below``): the newest DEK
    id the erasure covered; it is left out of the JSON otherwise.
    """

    tenant_id: str
    workspace_id: str
    scope: str  # "buckets" | "workspace"
    dek_ids: tuple[str, ...]
    l3_destroyed: bool
    older_than: datetime | None
    reason: str
    erased_at: datetime
    head_version: int
    floor_dek_id: str | None = None  # scope "floor": the newest DEK id the erasure covered
    signer_key_id: str = ""
    signature: bytes = b""

    FORMAT = "archive_kms.erasure-record/1"

    def __repr__(self) -> str:
        return (
            f"ErasureRecord({self.tenant_id}/{self.workspace_id} {self.scope}: {len(self.dek_ids)} DEKs"
            f"{' + L3' if self.l3_destroyed else ''} at {_time_out(self.erased_at)}, head v{self.head_version}, "
            f"signed by {self.signer_key_id})"
        )

    def _fields(self) -> dict[str, Any]:
        out = {
            "format": self.FORMAT,
            "tenant_id": self.tenant_id,
            "workspace_id": self.workspace_id,
            "scope": self.scope,
            "dek_ids": list(self.dek_ids),
            "l3_destroyed": self.l3_destroyed,
            "older_than": _time_out(self.older_than),
            "reason": self.reason,
            "erased_at": _time_out(self.erased_at),
            "head_version": self.head_version,
            "signer_key_id": self.signer_key_id,
        }
        if self.floor_dek_id is not None:  # absent otherwise: records made before it verify as they were
            out["floor_dek_id"] = self.floor_dek_id
        return out

    @classmethod
    def from_json(cls, data: bytes | str) -> ErasureRecord:
        try:
            obj = json.loads(data)
            if obj.pop("format") != cls.FORMAT:
                raise ValueError("unknown format")
            return cls(
                tenant_id=obj["tenant_id"],
                workspace_id=obj["workspace_id"],
                scope=obj["scope"],
                dek_ids=tuple(obj["dek_ids"]),
                l3_destroyed=obj["l3_destroyed"],
                older_than=_time_in(obj["older_than"]),
                reason=obj["reason"],
                erased_at=_time_in(obj["erased_at"]),  # type: ignore[arg-type]
                head_version=obj["head_version"],
                floor_dek_id=obj.get("floor_dek_id"),
                signer_key_id=obj["signer_key_id"],
                signature=_b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise IntegrityError("erasure record is malformed") from None

    def verify(self, verifier: Verifier) -> None:
        """Return if the platform signed exactly this record; ``IntegrityError`` otherwise."""
        verifier.verify(self.signing_payload(), self.signature, key_id=self.signer_key_id, purpose=_ERASURE_PURPOSE)


# --- internals -----------------------------------------------------------------------------


class _Mismatch(Exception):
    """A record disagrees with the head it was checked against: a concurrent commit (re-read
    the head and retry) or tampering (the head did not move)."""

    def __init__(self, tenant_id: str, record_id: str, message: str) -> None:
        super().__init__(message)
        self.resource = f"keychain:{tenant_id}/{record_id}"
        self.message = f"tenant {tenant_id}, {record_id}: {message}"


@dataclass
class _Plan:
    """What a write operation wants committed, and what it returns once committed."""

    result: Any
    head: TenantHead | None = None  # None: nothing to write
    records: list[KeyRecord] = field(default_factory=list)
    cache_put: list[tuple[str, SecretBytes]] = field(default_factory=list)
    cache_drop: list[str] = field(default_factory=list)
    audit_details: dict[str, Any] = field(default_factory=dict)  # ids and counts only, never key bytes


@dataclass(frozen=True)
class _AuditMark:
    """What this process knows from a tenant's audit chain: the highest keychain head
    version recorded, up to which record (``after_seq``), read when (monotonic)."""

    version: int
    after_seq: int
    read_at: float


def _audited_head_version(rec: AuditRecord) -> int | None:
    """The head version a keychain audit record vouches for, or None for other records."""
    if not rec.action.startswith(AUDIT_ACTION_PREFIX):
        return None
    version = rec.details.get("head_version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    return None


def _only_ever_under_current_parent(ref: RecordRef) -> bool:
    """Whether a live L2/L3 key's bytes were only ever stored wrapped by its current parent.
    A record's version goes up on every change, and the only change a live L2 or L3 record
    gets is a re-wrap under a new parent (``rotate_l1``, ``rotate_l2``): version 1 means
    never re-wrapped. (Any other future bump only makes ``rekey_below_l1`` do more.)"""
    return ref.version == 1


DekSelector = Callable[[tuple[int, int]], bool]  # picks DEKs by (bucket, generation)


def _dek_order(rec: KeyRecord) -> tuple[int, int]:
    """A DEK's place in its workspace's order: (bucket, generation)."""
    return rec.bucket or 0, rec.generation


def _wrapped_by(dek: KeyRecord, l3: RecordRef) -> bool:
    """Whether the DEK record names ``l3`` (id and generation) as its parent. A tombstone
    that still does lost its bytes here only: any retained copy of its row opens under that
    live workspace key, until the key is replaced."""
    return dek.parent_id == l3.record_id and dek.parent_version == l3.generation


def _check_floor(workspace_id: str, value: object) -> tuple[int, int]:
    try:
        bucket, generation = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValidationError(f"floor of {workspace_id} must be (bucket, generation), got {value!r}") from None
    for n, least in ((bucket, 0), (generation, 1)):
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise ValidationError(f"floor of {workspace_id} must be (bucket >= 0, generation >= 1), got {value!r}")
    return bucket, generation


def _expect(cond: bool, rec: KeyRecord, message: str) -> None:
    if not cond:
        raise _Mismatch(rec.tenant_id, rec.record_id, message)


# --- the keychain --------------------------------------------------------------------------


class Keychain:
    """The tenant key hierarchy over a :class:`KeychainStore` and L1 :class:`KeyProvider` s.

    ``provider_resolver`` turns an L1 reference (``KeyProvider.key_ref``, as stored in the
    head) into a provider (``keys.registry`` in production). ``clock`` returns POSIX
    seconds (record times, the default ``now``); the cache has its own clock.
    ``bucket_seconds`` is the DEK bucket width for *new* workspaces; each workspace keeps
    the width it was created with, so its DEK ids never change meaning.

    ``audit`` is the state store's ``AuditLog``: committed head changes are recorded there
    and a head older than what it recorded is refused (rollback). Without it (bare unit
    tests) only this process's own high-water mark catches a rolled-back head; production
    wiring always passes it. ``audit_refresh_seconds``: how often a long-running process
    re-reads the tenant's new audit records (incrementally).
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
        audit: AuditLog | None = None,
        audit_refresh_seconds: float = DEFAULT_AUDIT_REFRESH_SECONDS,
    ) -> None:
        if not isinstance(bucket_seconds, int) or isinstance(bucket_seconds, bool) or bucket_seconds < 1:
            raise ValidationError(f"bucket_seconds must be an int >= 1, got {bucket_seconds!r}")
        self._store = store
        self._resolve = provider_resolver
        self._signer = signer
        self._verifier = verifier or signer.verifier()
        self._clock = clock
        self._cache = cache if cache is not None else KeyCache()
        self._bucket_seconds = bucket_seconds
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        self._tenant_locks: dict[str, threading.RLock] = {}  # re-entrant: a write's own load may repair the audit
        self._head_seen: dict[str, int] = {}  # high-water mark: a lower head is a replay
        self._verified_heads: dict[str, TenantHead] = {}  # last verified head per tenant
        self._audit = audit
        self._audit_refresh_seconds = audit_refresh_seconds
        self._audit_marks: dict[str, _AuditMark] = {}
        self._audit_pending: dict[str, list[AuditEvent]] = {}  # committed, append failed: retried on next load
        self._wraps = 0
        self._unwraps = 0

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        store: KeychainStore,
        provider_resolver: ProviderResolver,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
    ) -> Keychain:
        return cls(
            store,
            provider_resolver,
            signer,
            clock,
            KeyCache.from_settings(settings),
            bucket_seconds=settings.dek_bucket_seconds,
            audit=audit,
        )

    def __repr__(self) -> str:
        return f"Keychain(signer={self._signer.key_id!r}, cache={self._cache!r})"

    @property
    def cache(self) -> KeyCache:
        return self._cache

    @property
    def provider_calls(self) -> ProviderCallCounts:
        """Total L1 wrap/unwrap calls so far; subtract two snapshots to measure an operation."""
        with self._lock:
            return ProviderCallCounts(self._wraps, self._unwraps)

    # --- public API: tenants ----------------------------------------------------------

    def create_tenant(self, tenant_id: str, l1: KeyProvider) -> TenantKeyStatus:
        """Generate the tenant's L2 key and store it wrapped by ``l1`` (1 provider wrap).
        Raises ``StateError`` if the tenant already has a keychain."""
        _check_tenant(tenant_id)
        with self._tenant_lock(tenant_id):
            audited = self._audited_version(tenant_id)  # before the head, as in _load_head
            if self._store.get_head(tenant_id) is not None:
                raise StateError(f"tenant {tenant_id} already has a keychain", resource=f"keychain:{tenant_id}")
            if audited:  # a new keychain here would be one more rollback, and refused at once
                raise self._missing_error(tenant_id, audited)
            now = self._now()
            l2 = SecretBytes.random(KEY_SIZE)
            wrapped = self._provider_wrap(l1, l2, tenant_id)
            rec = KeyRecord(
                tenant_id=tenant_id,
                record_id=_l2_id(1),
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
            head = self._sign_head(head)
            self._store.commit(tenant_id, head=head, records=[self._sign_record(rec)], expected_head_version=None)
            self._note_head(tenant_id, head.version)
            self._cache.put(tenant_id, rec.record_id, l2)
            log.info("keychain: tenant %s created under L1 %s", tenant_id, l1.key_ref)
            self._audit_commit(head, {"l2_id": rec.record_id})
            return self._status(head)

    def status(self, tenant_id: str) -> TenantKeyStatus:
        """The tenant's key state (works while revoked; unwraps nothing)."""
        _check_tenant(tenant_id)
        return self._status(self._load_head(tenant_id, gate=False))

    def create_workspace(self, tenant_id: str, workspace_id: str) -> str:
        """Create the workspace's L3 key if missing; returns its record id. ``dek_for_encrypt``
        does this on demand, so calling it is optional."""
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)

        def plan(head: TenantHead) -> _Plan:
            ws = head.workspace(workspace_id)
            if ws is not None:
                if ws.erased:
                    raise self._erased_error(tenant_id, workspace_id)
                return _Plan(result=ws.l3.record_id)
            p = _Plan(result=None)
            ws, _ = self._new_workspace(head, workspace_id, p)
            p.result = ws.l3.record_id
            p.head = head.with_workspace(ws)
            return p

        return self._write(tenant_id, plan, gate=True)

    # --- public API: data keys ----------------------------------------------------------

    def dek_for_encrypt(self, tenant_id: str, workspace_id: str, now: datetime | float | None = None) -> DataKey:
        """The ACTIVE DEK for ``now``'s bucket, creating it (and the workspace key) on demand.

        When a new bucket starts, its DEK is created and the previous one becomes
        DECRYPT_ONLY. A ``now`` behind the newest DEK (clock skew between workers) gets the
        newest DEK: data lands in a later bucket and is erased later, never earlier.
        """
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)
        ts = self._clock() if now is None else _as_ts(now)

        def fast(head: TenantHead) -> DataKey | None:
            ws = head.workspace(workspace_id)
            if ws is None:
                return None
            if ws.erased:
                raise self._erased_error(tenant_id, workspace_id)
            active = ws.active_dek
            if active is not None and parse_dek_id(active.record_id)[1] >= bucket_of(ts, ws.bucket_seconds):
                return DataKey(active.record_id, self._dek_key(head, active.record_id))
            return None

        found = self._read(tenant_id, fast)
        if found is not None:
            return found

        def plan(head: TenantHead) -> _Plan:
            existing = fast(head)  # another worker may have created it meanwhile
            if existing is not None:
                return _Plan(result=existing)
            p = _Plan(result=None)
            ws = head.workspace(workspace_id)
            if ws is None:
                ws, l3 = self._new_workspace(head, workspace_id, p)
            else:
                l3 = self._l3_key(head, ws)
            bucket = max(bucket_of(ts, ws.bucket_seconds), ws.erased_before_bucket)
            generation = 1
            if ws.last_dek is not None:
                _, last_bucket, last_gen = parse_dek_id(ws.last_dek)
                bucket = max(bucket, last_bucket)  # DEK ids only grow
                if bucket == last_bucket:
                    generation = last_gen + 1
            new_id = dek_id(workspace_id, bucket, generation)
            now_dt = self._now()
            rec = KeyRecord(
                tenant_id=tenant_id,
                record_id=new_id,
                level=KeyLevel.DEK,
                workspace_id=workspace_id,
                bucket=bucket,
                generation=generation,
                parent_id=ws.l3.record_id,
                parent_version=ws.l3.generation,
                wrap_ref=ws.l3.record_id,
                wrap_algorithm=WRAP_ALGORITHM,
                wrapped=b"\0",  # placeholder, replaced below (the AAD needs the record)
                state=KeyRecordState.ACTIVE,
                created_at=now_dt,
                not_after=_dt((bucket + 1) * ws.bucket_seconds),
                updated_at=now_dt,
                version=1,
            )
            dek = SecretBytes.random(KEY_SIZE)
            p.records.append(replace(rec, wrapped=_seal(l3, dek, rec)))
            if ws.active_dek is not None:
                old = self._checked_dek(head, ws, ws.active_dek.record_id)
                p.records.append(self._bump(old, state=KeyRecordState.DECRYPT_ONLY))
            ws = replace(ws, active_dek=RecordRef(new_id, generation, 1), last_dek=new_id)
            p.head = head.with_workspace(ws)
            p.cache_put.append((new_id, dek))
            p.result = DataKey(new_id, SecretBytes(dek.reveal()))
            log.info("keychain: tenant %s new active DEK %s", tenant_id, new_id)
            return p

        return self._write(tenant_id, plan, gate=True)

    def dek_by_id(self, tenant_id: str, dek_id: str) -> SecretBytes:
        """The DEK named in an object header, for decryption (ACTIVE or DECRYPT_ONLY).

        Raises ``KeyDestroyedError`` if it was crypto-erased, ``TenantRevokedError`` if the
        tenant is revoked, ``KeyNotFoundError`` for an unknown id, ``KeychainTamperedError``
        if a record on the way fails its signature or binding checks.
        """
        _check_tenant(tenant_id)
        parse_dek_id(dek_id)
        return self._read(tenant_id, lambda head: self._dek_key(head, dek_id))

    def dek_for_header(self, header: Any) -> SecretBytes:
        """``dek_by_id`` for an object envelope header (``crypto.envelope.EnvelopeHeader``):
        pass ``dek_for=keychain.dek_for_header`` to the envelope's decrypt functions. The
        header's workspace must be the one its DEK id names."""
        if parse_dek_id(header.dek_id)[0] != header.workspace_id:
            raise IntegrityError(
                f"object header names workspace {header.workspace_id} but DEK {header.dek_id}",
                resource=f"keychain:{header.tenant_id}/{header.dek_id}",
            )
        return self.dek_by_id(header.tenant_id, header.dek_id)

    def search_key_material(self, tenant_id: str) -> SecretBytes:
        """Key material for the tenant's search keys (``search.derive_search_keys``):
        HKDF of the L2 key under its own label, so index tokens and display ciphertext
        die with the tenant key (revocation refuses it like any unwrap), and a new L2
        means a new index generation."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        _check_tenant(tenant_id)

        def derive(head: TenantHead) -> SecretBytes:
            l2 = self._l2_key(head)
            info = b"archive_kms/v1/search-material/" + tenant_id.encode() + b"/" + head.l2.record_id.encode()
            return SecretBytes(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(l2.reveal()))

        return self._read(tenant_id, derive)

    def retire_active_dek(self, tenant_id: str, workspace_id: str) -> str | None:
        """Make the workspace's active DEK DECRYPT_ONLY now (e.g. suspected exposure); the
        next ``dek_for_encrypt`` creates the next generation. Returns the retired id."""
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)

        def plan(head: TenantHead) -> _Plan:
            ws = self._workspace(head, workspace_id)
            if ws.active_dek is None:
                return _Plan(result=None)
            old = self._checked_dek(head, ws, ws.active_dek.record_id)
            return _Plan(
                result=old.record_id,
                head=head.with_workspace(replace(ws, active_dek=None)),
                records=[self._bump(old, state=KeyRecordState.DECRYPT_ONLY)],
                audit_details={"workspace_id": workspace_id, "dek_id": old.record_id},
            )

        return self._write(tenant_id, plan, gate=True, audit_action="retire_dek")

    def list_deks(self, tenant_id: str, workspace_id: str | None = None) -> list[DekInfo]:
        """Every DEK (tombstones included), each verified; works while revoked."""
        _check_tenant(tenant_id)
        if workspace_id is not None:
            _check_workspace(workspace_id)

        def read(head: TenantHead) -> list[DekInfo]:
            out = []
            for rec in self._store.list_records(tenant_id, level=KeyLevel.DEK, workspace_id=workspace_id):
                ws = head.workspace(rec.workspace_id or "")
                if ws is None:
                    raise _Mismatch(tenant_id, rec.record_id, "DEK of a workspace the head does not know")
                self._check_dek(head, ws, rec, rec.record_id)
                out.append(
                    DekInfo(
                        rec.record_id,
                        ws.workspace_id,
                        rec.bucket or 0,
                        rec.generation,
                        rec.state,
                        rec.created_at,
                        rec.not_after,
                    )
                )
            return sorted(out, key=lambda d: (d.workspace_id, d.bucket, d.generation))

        return self._read(tenant_id, read, gate=False)

    def reencrypt_path(self, tenant_id: str, workspace_id: str | None = None) -> list[str]:
        """The hook for a full re-encryption (a DEK or L3 key is believed compromised):
        every DEK id that can still decrypt, oldest first. The copy machinery decrypts each
        object under its header's DEK id, re-encrypts it with ``dek_for_encrypt`` into a
        *new workspace id*, verifies, then calls ``erase_workspace`` on the old one.
        (Rotating L1 or L2 needs no re-encryption: they are re-wrapped.)"""
        return [d.dek_id for d in self.list_deks(tenant_id, workspace_id) if d.state is not KeyRecordState.DESTROYED]

    # --- public API: rotation -------------------------------------------------------------

    def rotate_l1(self, tenant_id: str, new_l1: KeyProvider) -> TenantKeyStatus:
        """Re-wrap the tenant's L2 key under ``new_l1``: exactly 1 unwrap (old L1) + 1 wrap
        (new L1) whatever the data volume; no L3/L4 record changes. The unwrap always goes to
        the old provider, never the cache, so the stored L2 is proven to open under it."""
        _check_tenant(tenant_id)

        def plan(head: TenantHead) -> _Plan:
            rec = self._checked_l2(head)
            self._gate(tenant_id)
            l2 = self._provider_unwrap(self._resolve(head.l1_ref), rec, tenant_id)
            wrapped = self._provider_wrap(new_l1, l2, tenant_id)
            new = self._bump(
                rec,
                parent_id=new_l1.key_ref,
                parent_version=head.l1_generation + 1,
                wrap_ref=wrapped.key_ref,
                wrap_algorithm=wrapped.algorithm,
                wrapped=wrapped.ciphertext,
            )
            new_head = replace(
                head,
                l1_ref=new_l1.key_ref,
                l1_generation=head.l1_generation + 1,
                l2=replace(head.l2, version=new.version),
            )
            log.info("keychain: tenant %s L2 re-wrapped from %s to %s", tenant_id, head.l1_ref, new_l1.key_ref)
            return _Plan(
                result=None,
                head=new_head,
                records=[new],
                cache_put=[(rec.record_id, l2)],
                audit_details={
                    "previous_l1_ref": head.l1_ref,
                    "l1_generation": head.l1_generation + 1,
                    "l2_id": rec.record_id,
                },
            )

        self._write(tenant_id, plan, gate=True, audit_action="rotate_l1")
        return self.status(tenant_id)

    def rotate_l2(self, tenant_id: str) -> TenantKeyStatus:
        """A new L2 key (wrapped by the current L1: 1 wrap, plus 1 unwrap if the old L2 is
        not cached); every live L3 key is re-wrapped under it; the old L2 is DESTROYED.
        DEK records do not change, so existing objects keep decrypting."""
        _check_tenant(tenant_id)
        self._write(tenant_id, self._rotate_l2_plan, gate=True, audit_action="rotate_l2")
        return self.status(tenant_id)

    def rotate_l3(self, tenant_id: str, workspace_id: str) -> TenantKeyStatus:
        """A new workspace key (new key bytes) wrapped by the current L2; every live DEK of
        the workspace (ACTIVE and DECRYPT_ONLY) is re-wrapped under it with local AES-GCM
        (no provider call, beyond 1 L2 unwrap if the L2 is not cached); the old L3 is
        DESTROYED and dropped from this process's cache. Tombstones stay as they are. DEK
        key bytes do not change, so existing objects keep decrypting. One atomic commit."""
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)

        def plan(head: TenantHead) -> _Plan:
            ws = self._workspace(head, workspace_id)
            if ws.erased:
                raise self._erased_error(tenant_id, workspace_id)
            return self._rotate_l3_plan(head, ws)

        self._write(tenant_id, plan, gate=True, audit_action="rotate_l3")
        return self.status(tenant_id)

    def rekey_below_l1(self, tenant_id: str) -> RekeyReport:
        """Replace every key below L1 whose bytes were ever stored under a key other than
        its current parent: the L2 (``rotate_l2``) if ``rotate_l1`` re-wrapped it since it
        was made, then the L3 of every live workspace (``rotate_l3``) made under an older
        L2. Afterwards no L2 or L3 bytes in a copy of the keychain taken before the call
        wrap anything live, so such a copy plus an old L1 opens no DEK made from now on
        (DEKs that already existed keep their bytes: erase them with ``erase_deks_below``).

        Idempotent and resumable: each replacement is one atomic commit, and a rerun after
        a crash between them (or a second call) replaces only what is still old. Costs 1
        L1 wrap (+ at most 1 unwrap) when the L2 is replaced, 0 otherwise. A new L2 means
        new search keys (``search_key_material``): call it before a keyed index is built.
        """
        _check_tenant(tenant_id)

        def l2_plan(head: TenantHead) -> _Plan:
            if _only_ever_under_current_parent(head.l2):
                return _Plan(result=False)
            p = self._rotate_l2_plan(head)
            p.result = True
            p.audit_details["step"] = "l2"
            return p

        l2_rotated = self._write(tenant_id, l2_plan, gate=True, audit_action="rekey")
        rotated: list[str] = []
        rewrapped = 0
        for workspace_id in self.status(tenant_id).workspaces:

            def l3_plan(head: TenantHead, workspace_id: str = workspace_id) -> _Plan:
                ws = self._workspace(head, workspace_id)
                if ws.erased or _only_ever_under_current_parent(ws.l3):
                    return _Plan(result=None)
                p = self._rotate_l3_plan(head, ws)
                p.audit_details["step"] = "l3"
                return p

            count = self._write(tenant_id, l3_plan, gate=True, audit_action="rekey")
            if count is not None:
                rotated.append(workspace_id)
                rewrapped += count
        status = self.status(tenant_id)
        log.info(
            "keychain: tenant %s re-keyed below L1: L2 %s, %d workspace keys replaced, %d DEKs re-wrapped",
            tenant_id,
            "replaced" if l2_rotated else "kept",
            len(rotated),
            rewrapped,
        )
        return RekeyReport(tenant_id, bool(l2_rotated), tuple(rotated), rewrapped, status)

    # --- public API: revocation -------------------------------------------------------------

    def revoke(self, tenant_id: str) -> TenantKeyStatus:
        """Refuse every unwrap for the tenant from now on, in every process sharing the store
        (the flag is in the signed head, read before every unwrap); purge its cached keys.
        Idempotent."""
        _check_tenant(tenant_id)
        self._cache.purge(tenant_id)

        def plan(head: TenantHead) -> _Plan:
            if head.revoked:
                return _Plan(result=None)
            now = self._now()
            return _Plan(
                result=None,
                head=replace(head, revoked=True, revoked_at=now),
                audit_details={"revoked_at": _time_out(now)},
            )

        try:
            self._write(tenant_id, plan, gate=False, audit_action="revoke")
        finally:
            self._cache.purge(tenant_id)  # again: a reader may have refilled it meanwhile
        log.warning("keychain: tenant %s revoked; caches purged", tenant_id)
        return self.status(tenant_id)

    def restore(self, tenant_id: str) -> TenantKeyStatus:
        """Re-enable a revoked tenant once its L1 works again: first unwraps the L2 key from
        the provider (1 unwrap; raises ``KeyUnavailableError`` and stays revoked if the L1
        is still disabled), then clears the flag. Idempotent."""
        _check_tenant(tenant_id)

        def plan(head: TenantHead) -> _Plan:
            if not head.revoked:
                return _Plan(result=None)
            rec = self._checked_l2(head)
            l2 = self._provider_unwrap(self._resolve(head.l1_ref), rec, tenant_id)
            return _Plan(
                result=None,
                head=replace(head, revoked=False, revoked_at=None),
                cache_put=[(rec.record_id, l2)],
            )

        self._write(tenant_id, plan, gate=False, audit_action="restore")
        log.warning("keychain: tenant %s restored", tenant_id)
        return self.status(tenant_id)

    # --- public API: crypto-erasure -----------------------------------------------------------

    def erase_buckets(
        self,
        tenant_id: str,
        workspace_id: str,
        older_than: datetime | float,
        *,
        reason: str = "retention expired",
    ) -> ErasureRecord:
        """Destroy the DEKs of every bucket that starts before ``older_than``'s bucket
        (retention). ``older_than`` may not lie in a future bucket (that would destroy the
        DEK in use: use ``erase_workspace``). Returns the signed record of the DEKs destroyed
        by this call (empty if there was nothing left).

        The same commit replaces the workspace key (as ``rotate_l3``), re-wraps the
        surviving DEKs under the new one and raises the workspace's erasure watermark, so a
        retained copy of a destroyed DEK's row (dead tuple, replica, backup) opens under no
        live key. That needs the L2 (local AES-GCM, at most 1 L1 unwrap). While the tenant
        is revoked it only destroys and raises the watermark; the first call on the
        workspace after ``restore`` replaces the key (so does one on a workspace erased
        before this behaviour existed), even with nothing left to destroy."""
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)
        cutoff_ts = _as_ts(older_than)

        def plan(head: TenantHead) -> _Plan:
            ws = self._workspace(head, workspace_id)
            cutoff = bucket_of(cutoff_ts, ws.bucket_seconds)
            if cutoff > bucket_of(self._clock(), ws.bucket_seconds):
                raise ValidationError(
                    f"older_than {_time_out(_dt(cutoff_ts))} is in a future bucket; erase_buckets "
                    "never destroys the current DEK (use erase_workspace)"
                )
            p = self._erasure_plan(
                head, ws, lambda order: order[0] < cutoff, watermark=cutoff, replace_l3=not head.revoked
            )
            p.result = self._erasure_record(
                head, p, workspace_id, "buckets", older_than=_dt(cutoff_ts), reason=reason, l3_destroyed=False
            )
            return p

        record = self._write(tenant_id, plan, gate=False, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s: %d DEKs crypto-erased (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            reason,
        )
        return record

    def erase_workspace(self, tenant_id: str, workspace_id: str, *, reason: str = "workspace deleted") -> ErasureRecord:
        """Destroy the workspace's L3 key and every DEK under it; the workspace id can never
        be used again. Works while revoked. Returns the signed erasure record."""
        _check_tenant(tenant_id)
        _check_workspace(workspace_id)

        def plan(head: TenantHead) -> _Plan:
            ws = self._workspace(head, workspace_id)
            p = _Plan(result=None)
            if not ws.erased:
                for rec in self._store.list_records(tenant_id, level=KeyLevel.DEK, workspace_id=workspace_id):
                    self._check_dek(head, ws, rec, rec.record_id)
                    if rec.state is not KeyRecordState.DESTROYED:
                        p.records.append(self._destroy(rec))
                l3_rec = self._destroy(self._checked_l3(head, ws))
                p.cache_drop = [r.record_id for r in p.records] + [l3_rec.record_id]
                p.records.append(l3_rec)
                p.head = head.with_workspace(
                    replace(ws, erased=True, active_dek=None, l3=replace(ws.l3, version=l3_rec.version))
                )
            p.result = self._erasure_record(
                head, p, workspace_id, "workspace", older_than=None, reason=reason, l3_destroyed=not ws.erased
            )
            return p

        record = self._write(tenant_id, plan, gate=False, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s crypto-erased: %d DEKs and its L3 key (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            reason,
        )
        return record

    def erase_deks_below(
        self,
        tenant_id: str,
        floor: Mapping[str, Sequence[int]],
        *,
        reason: str = "superseded by a re-encrypted copy",
    ) -> list[ErasureRecord]:
        """Destroy, per workspace, every DEK not newer than its floor ``(bucket, generation)``
        (e.g. the migration's ``dek_floor``: the newest DEK at bind time), keeping the newer
        ones, in one commit per workspace. ``erase_buckets`` cannot do this: it cuts whole
        buckets, and the floor's bucket usually also holds DEKs made after it.

        The same commit replaces the workspace key (as ``rotate_l3``) and raises the
        workspace's erasure watermark to the floor's bucket, so a live copy of an erased DEK
        brought back from a backup names a destroyed parent and is refused
        (``KeychainTamperedError``), like one below the watermark (``KeyDestroyedError``).
        Needs the L2 (refused while revoked); a floor newer than the workspace's newest DEK
        is a ``ValidationError``. Returns one signed ``ErasureRecord`` (scope ``floor``) per
        workspace, in workspace order; a rerun destroys nothing more and returns empty ones.
        """
        _check_tenant(tenant_id)
        floors = {_check_workspace(ws): _check_floor(ws, value) for ws, value in floor.items()}
        head = self._load_head(tenant_id, gate=True)
        for workspace_id, through in floors.items():  # every floor checked before anything is destroyed
            self._check_floor_of(self._workspace(head, workspace_id), through)
        return [self._erase_through(tenant_id, ws, floors[ws], reason) for ws in sorted(floors)]

    @staticmethod
    def _check_floor_of(ws: WorkspaceHead, through: tuple[int, int]) -> None:
        if not ws.erased and (ws.last_dek is None or through > parse_dek_id(ws.last_dek)[1:]):
            raise ValidationError(
                f"floor {dek_id(ws.workspace_id, *through)} is newer than the newest DEK of workspace "
                f"{ws.workspace_id} ({ws.last_dek}); erase_deks_below only destroys DEKs that existed "
                "(use erase_workspace)"
            )

    def _erase_through(self, tenant_id: str, workspace_id: str, through: tuple[int, int], reason: str) -> ErasureRecord:
        floor_id = dek_id(workspace_id, *through)

        def plan(head: TenantHead) -> _Plan:
            ws = self._workspace(head, workspace_id)
            if not ws.erased:
                self._check_floor_of(ws, through)
            # Every DEK of a bucket below the floor's is at or below the floor: the watermark
            # may rise to the floor's bucket.
            p = self._erasure_plan(head, ws, lambda order: order <= through, watermark=through[0], replace_l3=True)
            p.result = self._erasure_record(
                head,
                p,
                workspace_id,
                "floor",
                older_than=None,
                reason=reason,
                l3_destroyed=False,
                floor_dek_id=floor_id,
            )
            return p

        record = self._write(tenant_id, plan, gate=True, audit_action="erase")
        log.info(
            "keychain: tenant %s workspace %s: %d DEKs up to %s crypto-erased (%s)",
            tenant_id,
            workspace_id,
            len(record.dek_ids),
            floor_id,
            reason,
        )
        return record

    # --- reading and writing under the head --------------------------------------------------

    def _tenant_lock(self, tenant_id: str) -> threading.RLock:
        with self._lock:
            return self._tenant_locks.setdefault(tenant_id, threading.RLock())

    def _read(self, tenant_id: str, fn: Callable[[TenantHead], T], *, gate: bool = True) -> T:
        head = self._load_head(tenant_id, gate=gate)
        for _ in range(self._max_attempts):
            try:
                return fn(head)
            except _Mismatch as m:
                head = self._recheck(tenant_id, head, m, gate)
        raise self._busy(tenant_id)

    def _write(
        self, tenant_id: str, fn: Callable[[TenantHead], _Plan], *, gate: bool, audit_action: str | None = None
    ) -> Any:
        """Plan against the current head and commit (compare-and-set), re-planning on a
        concurrent commit. ``audit_action``: the commit is recorded in the audit log as
        ``keychain.<audit_action>`` and named in the new head's ``audited_change``; None
        for routine DEK and workspace creation (ADR 0007)."""
        with self._tenant_lock(tenant_id):
            head = self._load_head(tenant_id, gate=gate)
            for _ in range(self._max_attempts):
                try:
                    plan = fn(head)
                except _Mismatch as m:
                    head = self._recheck(tenant_id, head, m, gate)
                    continue
                new_head = None
                if plan.head is not None:
                    new_head = replace(plan.head, version=head.version + 1, updated_at=self._now())
                    if audit_action is not None:
                        new_head = replace(new_head, audited_change=AuditedChange(new_head.version, audit_action))
                    new_head = self._sign_head(new_head)
                    records = [self._sign_record(r) for r in plan.records]
                    try:
                        self._store.commit(
                            tenant_id, head=new_head, records=records, expected_head_version=head.version
                        )
                    except VersionConflictError:  # another process committed first: re-plan
                        head = self._load_head(tenant_id, gate=gate)
                        continue
                    self._note_head(tenant_id, new_head.version)
                self._cache.discard(tenant_id, plan.cache_drop)
                for key_id, key in plan.cache_put:
                    self._cache.put(tenant_id, key_id, key)
                if new_head is not None and audit_action is not None:
                    self._audit_commit(new_head, plan.audit_details)  # after the cache: an erased key is gone
                return plan.result
            raise self._busy(tenant_id)

    def _recheck(self, tenant_id: str, head: TenantHead, m: _Mismatch, gate: bool) -> TenantHead:
        fresh = self._load_head(tenant_id, gate=gate)
        if fresh.version == head.version:
            log.error("keychain: tampering detected: %s", m.message)
            raise KeychainTamperedError(m.message, resource=m.resource) from None
        return fresh

    def _busy(self, tenant_id: str) -> VersionConflictError:
        return VersionConflictError(
            f"keychain of tenant {tenant_id} kept changing over {self._max_attempts} attempts; retry",
            resource=f"keychain:{tenant_id}",
        )

    def _load_head(self, tenant_id: str, *, gate: bool) -> TenantHead:
        # The replay checks compare with high-water marks as they were *before* this read:
        # a concurrent thread may raise the mark while we read, and a head older than that
        # newer mark is then a race, not a replay (the store only moves forward). The same
        # holds for the audit log's mark: a commit is audited only after it landed.
        with self._lock:
            seen = self._head_seen.get(tenant_id, 0)
        audited = self._audited_version(tenant_id)
        head = self._store.get_head(tenant_id)
        if head is None:
            if audited:
                raise self._missing_error(tenant_id, audited)
            raise KeyNotFoundError(f"tenant {tenant_id} has no keychain", resource=f"keychain:{tenant_id}")
        resource = f"keychain:{tenant_id}/head"
        with self._lock:
            known = self._verified_heads.get(tenant_id)
        if known != head:  # equal in every field (signature included) to one verified before: skip
            self._verify(head.signing_payload(), head.signature, head.signer_key_id, _HEAD_PURPOSE, resource)
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
                self._verified_heads[tenant_id] = head
        change = head.audited_change
        if self._audit is not None and change is not None and change.version > audited:
            self._repair_audit(head)
        if head.revoked:
            self._cache.purge(tenant_id)  # this process may not be the one that revoked
        if gate and head.revoked:
            raise TenantRevokedError(
                f"tenant {tenant_id}: key access is revoked; reads, writes and searches are refused until restore",
                resource=f"tenant:{tenant_id}",
                state="revoked",
            )
        return head

    def _gate(self, tenant_id: str) -> None:
        """Re-read the revocation flag right before a provider call (long operations)."""
        self._load_head(tenant_id, gate=True)

    def _note_head(self, tenant_id: str, version: int) -> None:
        with self._lock:
            self._head_seen[tenant_id] = max(version, self._head_seen.get(tenant_id, 0))

    @staticmethod
    def _missing_error(tenant_id: str, audited: int) -> KeychainTamperedError:
        return KeychainTamperedError(
            f"keychain of tenant {tenant_id} is missing but the audit log recorded version {audited}: deleted or "
            f"rolled back; restore the keychain rows from a backup at version {audited} or later, or investigate",
            resource=f"keychain:{tenant_id}/head",
        )

    # --- the audit log: recording commits, reading the high-water mark -------------------

    def _audited_version(self, tenant_id: str, *, fresh: bool = False) -> int:
        """The highest keychain head version the audit log records for the tenant (0 with
        no audit log or no record). Read in full once per tenant per process, then only
        the records appended since, at most every ``audit_refresh_seconds`` (or now, if
        ``fresh``); this process's own appends raise it as they land."""
        if self._audit is None:
            return 0
        with self._lock:
            mark = self._audit_marks.get(tenant_id)
        now = time.monotonic()
        if mark is not None and not fresh and now - mark.read_at < self._audit_refresh_seconds:
            return mark.version
        version, after_seq = (mark.version, mark.after_seq) if mark is not None else (0, 0)
        for rec in self._audit.iter_audit(tenant_id=tenant_id, after_seq=after_seq):
            after_seq = max(after_seq, rec.seq)
            vouched = _audited_head_version(rec)
            if vouched is not None:
                version = max(version, vouched)
        with self._lock:
            current = self._audit_marks.get(tenant_id)
            if current is not None:  # a concurrent reader or an own append: keep the larger of each
                version, after_seq = max(version, current.version), max(after_seq, current.after_seq)
            self._audit_marks[tenant_id] = _AuditMark(version, after_seq, now)
        return version

    def _note_audited(self, tenant_id: str, version: int) -> None:
        with self._lock:
            mark = self._audit_marks.get(tenant_id)
            if mark is not None:  # without a mark the next load reads the whole chain anyway
                self._audit_marks[tenant_id] = replace(mark, version=max(mark.version, version))

    @staticmethod
    def _audit_event(head: TenantHead, version: int, action: str, details: Mapping[str, Any]) -> AuditEvent:
        """``keychain.<action>`` for head ``version``: ids and counts only, never key bytes."""
        from archive_kms.state.port import AuditEvent  # the state package is heavy; only when auditing

        return AuditEvent(
            actor=AUDIT_ACTOR,
            action=AUDIT_ACTION_PREFIX + action,
            tenant_id=head.tenant_id,
            details={"tenant_id": head.tenant_id, "head_version": version, "l1_ref": head.l1_ref, **details},
        )

    def _audit_commit(self, head: TenantHead, details: Mapping[str, Any]) -> None:
        """Record a committed head change. If the append fails the commit stands: the event
        is kept and appended by the next load of the tenant in this process (another
        process writes a recovered record instead), and the error goes to the caller."""
        if self._audit is None or head.audited_change is None:
            return
        event = self._audit_event(head, head.version, head.audited_change.action, details)
        try:
            self._audit.append_audit(event)
        except Exception:
            with self._lock:
                self._audit_pending.setdefault(head.tenant_id, []).append(event)
            log.error(
                "keychain: tenant %s head v%d committed but its audit record was not written; "
                "it is retried on the next load",
                head.tenant_id,
                head.version,
            )
            raise
        self._note_audited(head.tenant_id, head.version)

    def _repair_audit(self, head: TenantHead) -> None:
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
            audited = self._audited_version(tenant_id, fresh=True)  # another process may have appended it
            if change.version <= audited:
                return
            with self._lock:
                pending = self._audit_pending.pop(tenant_id, [])
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
                        self._audit_pending.setdefault(tenant_id, [])[:0] = pending
            if change.version <= self._audited_version(tenant_id):
                return
            # l1_ref is still the one of that commit: changing it (rotate_l1) is audited.
            self._audit.append_audit(
                self._audit_event(
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

    # --- signing ---------------------------------------------------------------------------

    def _verify(self, payload: bytes, signature: bytes, key_id: str, purpose: str, resource: str) -> None:
        try:
            self._verifier.verify(payload, signature, key_id=key_id, purpose=purpose)
        except IntegrityError as exc:
            log.error("keychain: tampering detected: %s: %s", resource, exc)
            raise KeychainTamperedError(f"{resource}: {exc}", resource=resource) from None

    def _sign_record(self, rec: KeyRecord) -> KeyRecord:
        unsigned = replace(rec, signer_key_id=self._signer.key_id, signature=b"")
        return replace(unsigned, signature=self._signer.sign(unsigned.signing_payload(), purpose=_RECORD_PURPOSE))

    def _sign_head(self, head: TenantHead) -> TenantHead:
        unsigned = replace(head, signer_key_id=self._signer.key_id, signature=b"")
        return replace(unsigned, signature=self._signer.sign(unsigned.signing_payload(), purpose=_HEAD_PURPOSE))

    def _erasure_record(
        self,
        head: TenantHead,
        p: _Plan,
        workspace_id: str,
        scope: str,
        *,
        older_than: datetime | None,
        reason: str,
        l3_destroyed: bool,
        floor_dek_id: str | None = None,
    ) -> ErasureRecord:
        destroyed = (r.record_id for r in p.records if r.level is KeyLevel.DEK and r.state is KeyRecordState.DESTROYED)
        rec = ErasureRecord(
            tenant_id=head.tenant_id,
            workspace_id=workspace_id,
            scope=scope,
            dek_ids=tuple(sorted(destroyed, key=parse_dek_id)),
            l3_destroyed=l3_destroyed,
            older_than=older_than,
            reason=reason,
            erased_at=self._now(),
            head_version=head.version + 1 if p.head is not None else head.version,
            floor_dek_id=floor_dek_id,
            signer_key_id=self._signer.key_id,
        )
        rec = replace(rec, signature=self._signer.sign(rec.signing_payload(), purpose=_ERASURE_PURPOSE))
        # The commit's audit record carries the signed record verbatim: verifiable from the log alone.
        p.audit_details.update(workspace_id=workspace_id, scope=scope, erasure_record=rec.to_json().decode("ascii"))
        return rec

    # --- record loading and checks ---------------------------------------------------------

    def _record(self, tenant_id: str, record_id: str) -> KeyRecord:
        rec = self._store.get_record(tenant_id, record_id)
        if rec is None:
            raise _Mismatch(tenant_id, record_id, "record named by the head is missing")
        self._check_signed(tenant_id, record_id, rec)
        return rec

    def _check_signed(self, tenant_id: str, record_id: str, rec: KeyRecord) -> None:
        resource = f"keychain:{tenant_id}/{record_id}"
        self._verify(rec.signing_payload(), rec.signature, rec.signer_key_id, _RECORD_PURPOSE, resource)
        if rec.tenant_id != tenant_id or rec.record_id != record_id:
            log.error("keychain: tampering detected: %s holds %s/%s", resource, rec.tenant_id, rec.record_id)
            raise KeychainTamperedError(
                f"{resource}: the stored record belongs to tenant {rec.tenant_id}, id {rec.record_id} (swapped)",
                resource=resource,
            )

    def _checked_l2(self, head: TenantHead) -> KeyRecord:
        ref = head.l2
        rec = self._record(head.tenant_id, ref.record_id)
        _expect(rec.level is KeyLevel.TENANT and rec.generation == ref.generation, rec, "not the head's L2 key")
        _expect(rec.version == ref.version, rec, f"record version {rec.version}, head says {ref.version} (replayed)")
        _expect(rec.state is KeyRecordState.ACTIVE, rec, f"L2 key is {rec.state.value}, head says active")
        _expect(
            rec.parent_id == head.l1_ref and rec.parent_version == head.l1_generation,
            rec,
            "wrapped by another L1 than the head's",
        )
        return rec

    def _checked_l3(self, head: TenantHead, ws: WorkspaceHead) -> KeyRecord:
        ref = ws.l3
        rec = self._record(head.tenant_id, ref.record_id)
        _expect(
            rec.level is KeyLevel.WORKSPACE
            and rec.workspace_id == ws.workspace_id
            and rec.generation == ref.generation,
            rec,
            "not the head's workspace key",
        )
        _expect(rec.version == ref.version, rec, f"record version {rec.version}, head says {ref.version} (replayed)")
        _expect(rec.state is KeyRecordState.ACTIVE, rec, f"workspace key is {rec.state.value}, head says active")
        _expect(
            rec.parent_id == head.l2.record_id and rec.parent_version == head.l2.generation,
            rec,
            "wrapped by another L2 than the head's",
        )
        return rec

    def _checked_dek(self, head: TenantHead, ws: WorkspaceHead, record_id: str) -> KeyRecord:
        rec = self._store.get_record(head.tenant_id, record_id)
        if rec is None:
            # DEK ids are sparse (hours without data have none), so a missing id is unknown,
            # not evidence of tampering; commits are atomic, so it is not a race either.
            raise KeyNotFoundError(
                f"tenant {head.tenant_id} has no DEK {record_id}", resource=f"keychain:{head.tenant_id}/{record_id}"
            )
        self._check_dek(head, ws, rec, record_id)
        return rec

    def _check_dek(self, head: TenantHead, ws: WorkspaceHead, rec: KeyRecord, record_id: str) -> None:
        """A DEK record's signature, binding and state against the head."""
        self._check_signed(head.tenant_id, record_id, rec)
        w, bucket, gen = parse_dek_id(record_id)
        _expect(
            rec.level is KeyLevel.DEK
            and rec.workspace_id == w == ws.workspace_id
            and rec.bucket == bucket
            and rec.generation == gen,
            rec,
            "DEK record fields do not match its id",
        )
        _expect(
            ws.last_dek is not None and (bucket, gen) <= parse_dek_id(ws.last_dek)[1:],
            rec,
            "DEK newer than the newest the head knows",
        )
        if rec.state is not KeyRecordState.DESTROYED:
            # A tombstone's parent no longer matters; a live DEK must hang under the head's L3.
            _expect(
                rec.parent_id == ws.l3.record_id and rec.parent_version == ws.l3.generation,
                rec,
                "wrapped by another workspace key than the head's",
            )
        if ws.erased or bucket < ws.erased_before_bucket:
            _expect(
                rec.state is KeyRecordState.DESTROYED,
                rec,
                f"DEK is {rec.state.value} but the head records it as crypto-erased (replayed)",
            )
        active = ws.active_dek
        if active is not None and active.record_id == record_id:
            _expect(
                rec.version == active.version and rec.state is KeyRecordState.ACTIVE,
                rec,
                f"active DEK at version {rec.version} ({rec.state.value}), head says {active.version} (replayed)",
            )
        else:
            _expect(
                rec.state is not KeyRecordState.ACTIVE,
                rec,
                "DEK claims ACTIVE but the head's active DEK is another (replayed)",
            )

    # --- key resolution (gate already passed by the caller) ---------------------------------

    def _l2_key(self, head: TenantHead) -> SecretBytes:
        rid = head.l2.record_id
        cached = self._cache.get(head.tenant_id, rid)
        if cached is not None:
            return cached
        rec = self._checked_l2(head)
        self._gate(head.tenant_id)
        key = self._provider_unwrap(self._resolve(head.l1_ref), rec, head.tenant_id)
        self._cache.put(head.tenant_id, rid, key)
        return key

    def _l3_key(self, head: TenantHead, ws: WorkspaceHead) -> SecretBytes:
        if ws.erased:
            raise self._erased_error(head.tenant_id, ws.workspace_id)
        rid = ws.l3.record_id
        cached = self._cache.get(head.tenant_id, rid)
        if cached is not None:
            return cached
        rec = self._checked_l3(head, ws)
        key = _open(self._l2_key(head), rec)
        self._cache.put(head.tenant_id, rid, key)
        return key

    def _dek_key(self, head: TenantHead, record_id: str) -> SecretBytes:
        tenant_id = head.tenant_id
        workspace_id, bucket, _ = parse_dek_id(record_id)
        ws = head.workspace(workspace_id)
        if ws is None:
            raise KeyNotFoundError(
                f"tenant {tenant_id} has no workspace {workspace_id} (DEK {record_id})",
                resource=f"keychain:{tenant_id}/{record_id}",
            )
        if ws.erased or bucket < ws.erased_before_bucket:
            raise self._destroyed_error(tenant_id, record_id)
        cached = self._cache.get(tenant_id, record_id)
        if cached is not None:
            return cached
        rec = self._checked_dek(head, ws, record_id)
        if rec.state is KeyRecordState.DESTROYED:
            raise self._destroyed_error(tenant_id, record_id)
        key = _open(self._l3_key(head, ws), rec)
        self._cache.put(tenant_id, record_id, key)
        return key

    # --- helpers --------------------------------------------------------------------------

    def _new_workspace(self, head: TenantHead, workspace_id: str, p: _Plan) -> tuple[WorkspaceHead, SecretBytes]:
        l2 = self._l2_key(head)
        l3 = SecretBytes.random(KEY_SIZE)
        now = self._now()
        rec = KeyRecord(
            tenant_id=head.tenant_id,
            record_id=_l3_id(workspace_id, 1),
            level=KeyLevel.WORKSPACE,
            workspace_id=workspace_id,
            bucket=None,
            generation=1,
            parent_id=head.l2.record_id,
            parent_version=head.l2.generation,
            wrap_ref=head.l2.record_id,
            wrap_algorithm=WRAP_ALGORITHM,
            wrapped=b"\0",  # placeholder: the AAD needs the record first
            state=KeyRecordState.ACTIVE,
            created_at=now,
            not_after=None,
            updated_at=now,
            version=1,
        )
        p.records.append(replace(rec, wrapped=_seal(l2, l3, rec)))
        p.cache_put.append((rec.record_id, l3))
        log.info("keychain: tenant %s workspace %s created", head.tenant_id, workspace_id)
        ws = WorkspaceHead(workspace_id, RecordRef(rec.record_id, 1, 1), bucket_seconds=self._bucket_seconds)
        return ws, l3

    def _rotate_l2_plan(self, head: TenantHead) -> _Plan:
        """``rotate_l2`` as a plan: a new L2 under the current L1, the live L3 keys re-wrapped
        under it, the old L2 destroyed."""
        tenant_id = head.tenant_id
        old_rec = self._checked_l2(head)
        old_l2 = self._l2_key(head)
        new_l2 = SecretBytes.random(KEY_SIZE)
        self._gate(tenant_id)
        wrapped = self._provider_wrap(self._resolve(head.l1_ref), new_l2, tenant_id)
        gen = old_rec.generation + 1
        now = self._now()
        new_rec = replace(
            old_rec,
            record_id=_l2_id(gen),
            generation=gen,
            wrap_ref=wrapped.key_ref,
            wrap_algorithm=wrapped.algorithm,
            wrapped=wrapped.ciphertext,
            created_at=now,
            updated_at=now,
            version=1,
            signer_key_id="",
            signature=b"",
        )
        p = _Plan(result=None, records=[new_rec, self._destroy(old_rec)])
        workspaces = []
        for ws in head.workspaces:
            if ws.erased:  # its L3 is a tombstone; nothing to re-wrap
                workspaces.append(ws)
                continue
            l3_rec = self._checked_l3(head, ws)
            l3 = _open(old_l2, l3_rec)
            moved = self._bump(l3_rec, parent_id=new_rec.record_id, parent_version=gen, wrap_ref=new_rec.record_id)
            p.records.append(replace(moved, wrapped=_seal(new_l2, l3, moved)))
            workspaces.append(replace(ws, l3=replace(ws.l3, version=moved.version)))
        p.head = replace(head, l2=RecordRef(new_rec.record_id, gen, 1), workspaces=tuple(workspaces))
        p.cache_drop.append(old_rec.record_id)
        p.cache_put.append((new_rec.record_id, new_l2))
        p.audit_details.update(
            l2_id=new_rec.record_id, previous_l2_id=old_rec.record_id, l3_rewrapped=len(p.records) - 2
        )
        log.info(
            "keychain: tenant %s L2 rotated to %s; %d L3 keys re-wrapped",
            tenant_id,
            new_rec.record_id,
            len(p.records) - 2,
        )
        return p

    def _verified_deks(self, head: TenantHead, ws: WorkspaceHead) -> list[KeyRecord]:
        """Every DEK record of ``ws`` (tombstones included), each checked against the head."""
        deks = self._store.list_records(head.tenant_id, level=KeyLevel.DEK, workspace_id=ws.workspace_id)
        for rec in deks:
            self._check_dek(head, ws, rec, rec.record_id)
        return deks

    def _rotate_l3_plan(
        self,
        head: TenantHead,
        ws: WorkspaceHead,
        *,
        destroy: DekSelector | None = None,
        deks: Sequence[KeyRecord] | None = None,
    ) -> _Plan:
        """A new L3 for ``ws`` (new bytes, wrapped by the current L2), every live DEK
        re-wrapped under it, the old L3 destroyed; the plan's result is how many DEKs were
        re-wrapped. Live DEKs that ``destroy`` selects are destroyed instead of re-wrapped
        (the erasures). ``deks``: the workspace's DEK records, already verified against
        ``head`` (read here otherwise). Everything lands in one commit, so a crash leaves
        either the old or the new workspace key, never a mix."""
        tenant_id = head.tenant_id
        old_rec = self._checked_l3(head, ws)
        old_l3 = self._l3_key(head, ws)
        l2 = self._l2_key(head)
        gen = old_rec.generation + 1
        now = self._now()
        new_rec = replace(
            old_rec,
            record_id=_l3_id(ws.workspace_id, gen),
            generation=gen,
            parent_id=head.l2.record_id,
            parent_version=head.l2.generation,
            wrap_ref=head.l2.record_id,
            wrapped=b"\0",  # placeholder: the AAD needs the record first
            created_at=now,
            updated_at=now,
            version=1,
            signer_key_id="",
            signature=b"",
        )
        new_l3 = SecretBytes.random(KEY_SIZE)
        new_rec = replace(new_rec, wrapped=_seal(l2, new_l3, new_rec))
        p = _Plan(result=0, records=[new_rec, self._destroy(old_rec)])
        active = ws.active_dek
        for rec in self._verified_deks(head, ws) if deks is None else deks:
            if rec.state is KeyRecordState.DESTROYED:
                continue  # a tombstone keeps its old parent: it wraps nothing
            is_active = active is not None and active.record_id == rec.record_id
            if destroy is not None and destroy(_dek_order(rec)):
                p.records.append(self._destroy(rec))
                p.cache_drop.append(rec.record_id)
                if is_active:
                    active = None
                continue
            moved = self._bump(rec, parent_id=new_rec.record_id, parent_version=gen, wrap_ref=new_rec.record_id)
            p.records.append(replace(moved, wrapped=_seal(new_l3, _open(old_l3, rec), moved)))
            p.result += 1
            if is_active:
                active = replace(active, version=moved.version)  # type: ignore[arg-type]
        p.head = head.with_workspace(replace(ws, l3=RecordRef(new_rec.record_id, gen, 1), active_dek=active))
        p.cache_drop.append(old_rec.record_id)  # nothing names it any more; never serve it again
        p.cache_put.append((new_rec.record_id, new_l3))
        p.audit_details.update(
            workspace_id=ws.workspace_id,
            l3_id=new_rec.record_id,
            previous_l3_id=old_rec.record_id,
            deks_rewrapped=p.result,
        )
        log.info(
            "keychain: tenant %s workspace %s key rotated to %s; %d DEKs re-wrapped",
            tenant_id,
            ws.workspace_id,
            new_rec.record_id,
            p.result,
        )
        return p

    def _erasure_plan(
        self, head: TenantHead, ws: WorkspaceHead, doomed: DekSelector, *, watermark: int, replace_l3: bool
    ) -> _Plan:
        """The commit of ``erase_buckets`` and ``erase_deks_below``: destroy the live DEKs of
        ``ws`` that ``doomed`` selects and raise the erasure watermark to ``watermark`` (every
        bucket below it must be doomed). With ``replace_l3`` the same commit replaces the
        workspace key and re-wraps the surviving DEKs (``_rotate_l3_plan``), so a retained
        copy of a destroyed DEK's row opens under no live key; it does that also with
        nothing left to destroy if a tombstone still hangs under the live key (an erasure
        made without replacing it: while revoked, or by an older version). Without
        ``replace_l3`` (no L2: tenant revoked) it only destroys. ``head`` None: nothing to do."""
        if ws.erased:
            return _Plan(result=None)
        deks = self._verified_deks(head, ws)  # decide on verified records only
        live_doomed = [r for r in deks if r.state is not KeyRecordState.DESTROYED and doomed(_dek_order(r))]
        exposed = any(r.state is KeyRecordState.DESTROYED and _wrapped_by(r, ws.l3) for r in deks)
        if replace_l3 and (live_doomed or exposed):
            p = self._rotate_l3_plan(head, ws, destroy=doomed, deks=deks)
            ws = p.head.workspace(ws.workspace_id)  # type: ignore[union-attr]
        else:
            p = _Plan(result=None, records=[self._destroy(r) for r in live_doomed])
            p.cache_drop = [r.record_id for r in live_doomed]
            if ws.active_dek is not None and ws.active_dek.record_id in p.cache_drop:
                ws = replace(ws, active_dek=None)
        if p.records or watermark > ws.erased_before_bucket:
            p.head = head.with_workspace(replace(ws, erased_before_bucket=max(ws.erased_before_bucket, watermark)))
        return p

    def _workspace(self, head: TenantHead, workspace_id: str) -> WorkspaceHead:
        ws = head.workspace(workspace_id)
        if ws is None:
            raise KeyNotFoundError(
                f"tenant {head.tenant_id} has no workspace {workspace_id}",
                resource=f"keychain:{head.tenant_id}/{workspace_id}",
            )
        return ws

    def _bump(self, rec: KeyRecord, **changes: Any) -> KeyRecord:
        """The next version of a verified record (unsigned until commit)."""
        return replace(rec, **changes, version=rec.version + 1, updated_at=self._now(), signer_key_id="", signature=b"")

    def _destroy(self, rec: KeyRecord) -> KeyRecord:
        return self._bump(rec, state=KeyRecordState.DESTROYED, wrapped=b"")

    def _now(self) -> datetime:
        return _dt(self._clock())

    def _provider_wrap(self, provider: KeyProvider, key: SecretBytes, tenant_id: str) -> WrappedKey:
        with self._lock:
            self._wraps += 1
        return provider.wrap(key, context={"tenant": tenant_id})

    def _provider_unwrap(self, provider: KeyProvider, rec: KeyRecord, tenant_id: str) -> SecretBytes:
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

    @staticmethod
    def _destroyed_error(tenant_id: str, record_id: str) -> KeyDestroyedError:
        return KeyDestroyedError(
            f"DEK {record_id} of tenant {tenant_id} was crypto-erased; the data it protected is unrecoverable",
            resource=f"keychain:{tenant_id}/{record_id}",
            state="destroyed",
        )

    @staticmethod
    def _erased_error(tenant_id: str, workspace_id: str) -> KeyDestroyedError:
        return KeyDestroyedError(
            f"workspace {workspace_id} of tenant {tenant_id} was crypto-erased; use a new workspace id",
            resource=f"keychain:{tenant_id}/{workspace_id}",
            state="destroyed",
        )

    @staticmethod
    def _status(head: TenantHead) -> TenantKeyStatus:
        return TenantKeyStatus(
            tenant_id=head.tenant_id,
            l1_ref=head.l1_ref,
            l1_generation=head.l1_generation,
            l2_id=head.l2.record_id,
            l2_generation=head.l2.generation,
            revoked=head.revoked,
            revoked_at=head.revoked_at,
            workspaces=tuple(w.workspace_id for w in head.workspaces if not w.erased),
            erased_workspaces=tuple(w.workspace_id for w in head.workspaces if w.erased),
            head_version=head.version,
        )
