"""The keychain's stored values: key records and the per-tenant head (what the keychain
signs and the state store keeps). Pure values with their canonical JSON; no keys, no I/O.

* :class:`KeyRecord` - one per key (L2 tenant key, L3 workspace key, L4 DEK): ids,
  tenant, parent id + parent generation, wrapped bytes, state, times, a record
  ``version`` that goes up by one on every change, and the platform signature.
* :class:`TenantHead` - one per tenant, also signed, with its own ``version``: the L1
  reference, the current L2 record (id, generation, version), per workspace its L3
  record and active DEK (id, generation, version) and its erasure watermarks, and the
  revocation flag and its scoped (granular) revocations, and its last *audited change* (the version and action of the newest
  commit the keychain records in the audit log). The keychain checks every record it loads
  against the head, which is how a replayed old record (e.g. a DEK back from DESTROYED to
  ACTIVE) is caught, and the head's version against the audit log, which is how a
  rolled-back keychain is caught.

Both are frozen dataclasses that serialise deterministically (``to_json``: canonical JSON,
sorted keys, no whitespace, bytes as base64, times as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and
round-trip exactly (``from_json(x.to_json()) == x``). ``signing_payload()`` is the same
JSON without the signature fields; the keychain signs and verifies it. A SQL store may
keep the JSON in one column and copy the id fields into indexed columns.

They live in ``domain/`` because two packages share them: ``keys.keychain`` (which makes
and checks them) and ``state`` (whose SQL tables store them), and neither imports the
other (ADR 0010). The port that persists them is ``keys.keychain_store.KeychainStore``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from archive_kms.errors import KeychainTamperedError, ValidationError

__all__ = [
    "AuditedChange",
    "KeyLevel",
    "KeyRecord",
    "KeyRecordState",
    "RecordRef",
    "ScopedRevocation",
    "SignedJson",
    "TenantHead",
    "WorkspaceHead",
    "b64_in",
    "canonical_json",
    "time_in",
    "time_out",
]

RECORD_FORMAT = "archive_kms.keychain.record/1"
HEAD_FORMAT = "archive_kms.keychain.head/1"
_TIME_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


class KeyLevel(str, enum.Enum):
    TENANT = "L2"
    WORKSPACE = "L3"
    DEK = "L4"


class KeyRecordState(str, enum.Enum):
    ACTIVE = "active"  # L2/L3: in use; L4: the one DEK that encrypts new objects
    DECRYPT_ONLY = "decrypt_only"  # L4 of a past bucket (or retired): decrypts, never encrypts
    DESTROYED = "destroyed"  # wrapped bytes deleted: crypto-erased; record kept as tombstone


# --- canonical JSON helpers -----------------------------------------------------------


def time_out(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime(_TIME_FMT)


def time_in(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("time must be a string")
    return datetime.strptime(value, _TIME_FMT).replace(tzinfo=UTC)


def b64_out(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def b64_in(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("bytes field must be a base64 string")
    return base64.b64decode(value.encode("ascii"), validate=True)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _parse_json(data: bytes | str, kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeychainTamperedError(f"stored {kind} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise KeychainTamperedError(f"stored {kind} is not a JSON object")
    return obj


def _require_utc(name: str, value: datetime | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError(f"{name} must be a timezone-aware datetime")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValidationError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{name} must be a non-empty str")


# --- records ----------------------------------------------------------------------------


class SignedJson:
    """Shared by the signed keychain values: the canonical JSON of ``_fields()`` (every
    field except the signature; the signer key id is included) is what gets signed, and
    ``to_json`` stores it with the signature."""

    __slots__ = ()

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def signing_payload(self) -> bytes:
        return canonical_json(self._fields())

    def to_json(self) -> bytes:
        return canonical_json({**self._fields(), "signature": b64_out(self.signature)})  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyRecord(SignedJson):
    """A wrapped key with its binding, state and signature.

    ``parent_id`` names what wrapped it: the L1 key reference (L2 records), the L2 record
    id (L3) or the L3 record id (L4); ``parent_version`` is that parent's *generation*
    (the L1 generation counts ``rotate_l1`` calls). ``wrap_ref`` is the exact key version
    that produced ``wrapped`` (for L2, ``WrappedKey.key_ref`` from the provider).
    """

    tenant_id: str
    record_id: str
    level: KeyLevel
    workspace_id: str | None
    bucket: int | None
    generation: int
    parent_id: str
    parent_version: int
    wrap_ref: str
    wrap_algorithm: str
    wrapped: bytes
    state: KeyRecordState
    created_at: datetime
    not_after: datetime | None
    updated_at: datetime
    version: int
    signer_key_id: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        for name in ("tenant_id", "record_id", "parent_id", "wrap_ref", "wrap_algorithm"):
            _check_str(name, getattr(self, name))
        if not isinstance(self.level, KeyLevel) or not isinstance(self.state, KeyRecordState):
            raise ValidationError("level and state must be KeyLevel / KeyRecordState members")
        if (self.workspace_id is None) != (self.level is KeyLevel.TENANT):
            raise ValidationError("workspace_id is required for L3/L4 records and absent for L2")
        if (self.bucket is None) != (self.level is not KeyLevel.DEK):
            raise ValidationError("bucket is required for L4 records and absent otherwise")
        if self.bucket is not None:
            _check_int("bucket", self.bucket, 0)
        _check_int("generation", self.generation, 1)
        _check_int("parent_version", self.parent_version, 1)
        _check_int("version", self.version, 1)
        if not isinstance(self.wrapped, bytes) or not isinstance(self.signature, bytes):
            raise ValidationError("wrapped and signature must be bytes")
        if (self.state is KeyRecordState.DESTROYED) != (self.wrapped == b""):
            raise ValidationError("a record has wrapped bytes exactly when it is not DESTROYED")
        _require_utc("created_at", self.created_at)
        _require_utc("updated_at", self.updated_at)
        _require_utc("not_after", self.not_after, optional=True)

    def __repr__(self) -> str:
        return (
            f"KeyRecord({self.tenant_id}:{self.record_id} {self.level.value} {self.state.value} "
            f"v{self.version}, parent={self.parent_id}@{self.parent_version}, {len(self.wrapped)} wrapped bytes)"
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "tenant_id": self.tenant_id,
            "record_id": self.record_id,
            "level": self.level.value,
            "workspace_id": self.workspace_id,
            "bucket": self.bucket,
            "generation": self.generation,
            "parent_id": self.parent_id,
            "parent_version": self.parent_version,
            "wrap_ref": self.wrap_ref,
            "wrap_algorithm": self.wrap_algorithm,
            "wrapped": b64_out(self.wrapped),
            "state": self.state.value,
            "created_at": time_out(self.created_at),
            "not_after": time_out(self.not_after),
            "updated_at": time_out(self.updated_at),
            "version": self.version,
            "signer_key_id": self.signer_key_id,
        }

    @classmethod
    def from_json(cls, data: bytes | str) -> KeyRecord:
        """Parse a stored record. Malformed input raises ``KeychainTamperedError``."""
        obj = _parse_json(data, "keychain record")
        try:
            if obj.pop("format") != RECORD_FORMAT:
                raise ValueError("unknown record format")
            expected = {f.name for f in fields(cls)}
            if set(obj) != expected:
                raise ValueError("unexpected or missing fields")
            return cls(
                tenant_id=obj["tenant_id"],
                record_id=obj["record_id"],
                level=KeyLevel(obj["level"]),
                workspace_id=obj["workspace_id"],
                bucket=obj["bucket"],
                generation=obj["generation"],
                parent_id=obj["parent_id"],
                parent_version=obj["parent_version"],
                wrap_ref=obj["wrap_ref"],
                wrap_algorithm=obj["wrap_algorithm"],
                wrapped=b64_in(obj["wrapped"]),
                state=KeyRecordState(obj["state"]),
                created_at=time_in(obj["created_at"]),  # type: ignore[arg-type]
                not_after=time_in(obj["not_after"]),
                updated_at=time_in(obj["updated_at"]),  # type: ignore[arg-type]
                version=obj["version"],
                signer_key_id=obj["signer_key_id"],
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, ValidationError, binascii.Error):
            raise KeychainTamperedError("stored keychain record is malformed") from None


@dataclass(frozen=True)
class RecordRef:
    """The head's pointer to one record: which id, which key generation, which record version."""

    record_id: str
    generation: int
    version: int

    def __post_init__(self) -> None:
        _check_str("record_id", self.record_id)
        _check_int("generation", self.generation, 1)
        _check_int("version", self.version, 1)

    def _json(self) -> list[Any]:
        return [self.record_id, self.generation, self.version]

    @classmethod
    def _from(cls, value: Any) -> RecordRef | None:
        if value is None:
            return None
        record_id, generation, version = value
        return cls(record_id, generation, version)


@dataclass(frozen=True)
class WorkspaceHead:
    """Per-workspace state in the tenant head.

    * ``l3``: the workspace key record (exact version);
    * ``active_dek``: the one DEK that encrypts now (exact version), or ``None``;
    * ``last_dek``: the newest DEK ever created (DEK ids grow: (bucket, generation));
    * ``erased_before_bucket``: every DEK of a bucket below this is DESTROYED;
    * ``erased``: the whole workspace (L3 and every DEK) is DESTROYED;
    * ``bucket_seconds``: the bucket width the DEK ids of this workspace were cut with.
    """

    workspace_id: str
    l3: RecordRef
    bucket_seconds: int
    active_dek: RecordRef | None = None
    last_dek: str | None = None
    erased_before_bucket: int = 0
    erased: bool = False

    def __post_init__(self) -> None:
        _check_str("workspace_id", self.workspace_id)
        _check_int("bucket_seconds", self.bucket_seconds, 1)
        _check_int("erased_before_bucket", self.erased_before_bucket, 0)
        if not isinstance(self.erased, bool):
            raise ValidationError("erased must be a bool")

    def _json(self) -> dict[str, Any]:
        return {
            "workspace_id": self.workspace_id,
            "l3": self.l3._json(),
            "bucket_seconds": self.bucket_seconds,
            "active_dek": self.active_dek._json() if self.active_dek else None,
            "last_dek": self.last_dek,
            "erased_before_bucket": self.erased_before_bucket,
            "erased": self.erased,
        }

    @classmethod
    def _from(cls, obj: dict[str, Any]) -> WorkspaceHead:
        if set(obj) != {f.name for f in fields(cls)}:
            raise ValueError("unexpected or missing workspace fields")
        return cls(
            workspace_id=obj["workspace_id"],
            l3=RecordRef._from(obj["l3"]),  # type: ignore[arg-type]
            bucket_seconds=obj["bucket_seconds"],
            active_dek=RecordRef._from(obj["active_dek"]),
            last_dek=obj["last_dek"],
            erased_before_bucket=obj["erased_before_bucket"],
            erased=obj["erased"],
        )


@dataclass(frozen=True)
class AuditedChange:
    """The newest commit of a head that the keychain records in the audit log: its head
    version and action (``create``, ``rotate_l1``, ``erase``, ...; routine DEK and
    workspace creation are not audited and leave it as it was). A head whose audited
    change is newer than anything the audit log holds lost its audit record to a crash
    between the commit and the append."""

    version: int
    action: str

    def __post_init__(self) -> None:
        _check_int("audited change version", self.version, 1)
        _check_str("audited change action", self.action)

    def _json(self) -> list[Any]:
        return [self.version, self.action]

    @classmethod
    def _from(cls, value: Any) -> AuditedChange:
        version, action = value
        return cls(version, action)


@dataclass(frozen=True)
class ScopedRevocation:
    """A granular revocation in force (docs/key-lifecycle.md, "Granular revocation"):
    one workspace's key (``workspace_id`` set, ``before`` None), the DEKs of every bucket
    that starts before ``before``'s bucket (``workspace_id`` None: in every workspace), or
    both (that range in that workspace). ``revoked_at``: when it was committed. A scope is
    identified by ``(workspace_id, before)``; the head keeps them sorted by that."""

    workspace_id: str | None
    before: datetime | None
    revoked_at: datetime

    def __post_init__(self) -> None:
        if self.workspace_id is None and self.before is None:
            raise ValidationError("a scoped revocation names a workspace, a time (before), or both")
        if self.workspace_id is not None:
            _check_str("workspace_id", self.workspace_id)
        _require_utc("before", self.before, optional=True)
        _require_utc("revoked_at", self.revoked_at)

    @property
    def scope(self) -> tuple[str, str]:
        """The sort and identity key: (workspace or "", before as canonical time or "")."""
        return (self.workspace_id or "", time_out(self.before) or "")

    def covers(self, workspace_id: str, bucket: int | None, bucket_seconds: int) -> bool:
        """Whether this scope refuses ``workspace_id``'s key (``bucket`` None) or its DEK of
        ``bucket``: a range scope covers buckets that start before ``before``'s bucket."""
        if self.workspace_id is not None and self.workspace_id != workspace_id:
            return False
        if self.before is None:
            return True
        if bucket is None:
            return False  # a time range never refuses the workspace key itself
        return bucket < int(self.before.timestamp()) // bucket_seconds

    def describe(self) -> str:
        parts = []
        if self.workspace_id is not None:
            parts.append(f"workspace {self.workspace_id}")
        if self.before is not None:
            parts.append(f"data keys of buckets before {time_out(self.before)}")
        return " and ".join(parts) if len(parts) == 1 else f"{parts[1]} in {parts[0]}"

    def _json(self) -> list[Any]:
        return [self.workspace_id, time_out(self.before), time_out(self.revoked_at)]

    @classmethod
    def _from(cls, value: Any) -> ScopedRevocation:
        workspace_id, before, revoked_at = value
        return cls(workspace_id, time_in(before), time_in(revoked_at))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TenantHead(SignedJson):
    """The signed root of a tenant's keychain; ``version`` goes up by one per commit.
    ``audited_change`` is ``None`` only in heads written before audited changes existed
    (it is then absent from the JSON, so those heads verify as they were signed).
    ``scoped_revocations``: granular revocations in force, sorted by scope; absent from
    the JSON while empty (heads written before they existed verify unchanged)."""

    tenant_id: str
    version: int
    l1_ref: str
    l1_generation: int
    l2: RecordRef
    workspaces: tuple[WorkspaceHead, ...]
    revoked: bool
    revoked_at: datetime | None
    updated_at: datetime
    audited_change: AuditedChange | None = None
    scoped_revocations: tuple[ScopedRevocation, ...] = ()
    signer_key_id: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_str("tenant_id", self.tenant_id)
        if not isinstance(self.scoped_revocations, tuple) or not all(
            isinstance(r, ScopedRevocation) for r in self.scoped_revocations
        ):
            raise ValidationError("scoped_revocations must be a tuple of ScopedRevocation")
        scopes = [r.scope for r in self.scoped_revocations]
        if scopes != sorted(set(scopes)):
            raise ValidationError("scoped revocations must be sorted by scope and unique")
        _check_str("l1_ref", self.l1_ref)
        _check_int("version", self.version, 1)
        _check_int("l1_generation", self.l1_generation, 1)
        if self.audited_change is not None and (
            not isinstance(self.audited_change, AuditedChange) or self.audited_change.version > self.version
        ):
            raise ValidationError("audited_change must be an AuditedChange no newer than the head")
        if not isinstance(self.workspaces, tuple):
            raise ValidationError("workspaces must be a tuple")
        ids = [w.workspace_id for w in self.workspaces]
        if ids != sorted(set(ids)):
            raise ValidationError("workspaces must be sorted by id and unique")
        if not isinstance(self.revoked, bool):
            raise ValidationError("revoked must be a bool")
        _require_utc("updated_at", self.updated_at)
        _require_utc("revoked_at", self.revoked_at, optional=True)

    @cached_property
    def _by_id(self) -> dict[str, WorkspaceHead]:
        return {w.workspace_id: w for w in self.workspaces}

    def workspace(self, workspace_id: str) -> WorkspaceHead | None:
        return self._by_id.get(workspace_id)

    def scoped_revocation(self, workspace_id: str, bucket: int | None, bucket_seconds: int) -> ScopedRevocation | None:
        """The first scoped revocation that refuses ``workspace_id``'s key (``bucket``
        None) or its DEK of ``bucket``, or None."""
        for r in self.scoped_revocations:
            if r.covers(workspace_id, bucket, bucket_seconds):
                return r
        return None

    def with_scoped_revocations(self, revocations: list[ScopedRevocation]) -> TenantHead:
        """A copy with these scoped revocations (sorted); signature fields cleared."""
        return replace(
            self,
            scoped_revocations=tuple(sorted(revocations, key=lambda r: r.scope)),
            signer_key_id="",
            signature=b"",
        )

    def with_workspace(self, ws: WorkspaceHead) -> TenantHead:
        """A copy with ``ws`` added or replaced (kept sorted); signature fields cleared."""
        others = [w for w in self.workspaces if w.workspace_id != ws.workspace_id]
        return replace(
            self,
            workspaces=tuple(sorted([*others, ws], key=lambda w: w.workspace_id)),
            signer_key_id="",
            signature=b"",
        )

    def __repr__(self) -> str:
        return (
            f"TenantHead({self.tenant_id} v{self.version}, l1={self.l1_ref}@{self.l1_generation}, "
            f"l2={self.l2.record_id}, {len(self.workspaces)} workspaces, revoked={self.revoked}, "
            f"audited={self.audited_change.version if self.audited_change else None})"
        )

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "tenant_id": self.tenant_id,
            "version": self.version,
            "l1_ref": self.l1_ref,
            "l1_generation": self.l1_generation,
            "l2": self.l2._json(),
            "workspaces": [w._json() for w in self.workspaces],
            "revoked": self.revoked,
            "revoked_at": time_out(self.revoked_at),
            "updated_at": time_out(self.updated_at),
            "signer_key_id": self.signer_key_id,
        }
        if self.audited_change is not None:  # absent otherwise: heads made before it verify as they were
            out["audited_change"] = self.audited_change._json()
        if self.scoped_revocations:  # likewise absent while empty
            out["scoped_revocations"] = [r._json() for r in self.scoped_revocations]
        return out

    @classmethod
    def from_json(cls, data: bytes | str) -> TenantHead:
        obj = _parse_json(data, "keychain head")
        try:
            if obj.pop("format") != HEAD_FORMAT:
                raise ValueError("unknown head format")
            optional = {"audited_change", "scoped_revocations"}
            required = {f.name for f in fields(cls)} - optional
            if not required <= set(obj) <= required | optional:
                raise ValueError("unexpected or missing fields")
            scoped = obj.get("scoped_revocations")
            if scoped is not None and (not isinstance(scoped, list) or not scoped):
                raise ValueError("scoped_revocations must be a non-empty list when present")
            return cls(
                tenant_id=obj["tenant_id"],
                version=obj["version"],
                l1_ref=obj["l1_ref"],
                l1_generation=obj["l1_generation"],
                l2=RecordRef._from(obj["l2"]),  # type: ignore[arg-type]
                workspaces=tuple(WorkspaceHead._from(w) for w in obj["workspaces"]),
                revoked=obj["revoked"],
                revoked_at=time_in(obj["revoked_at"]),
                updated_at=time_in(obj["updated_at"]),  # type: ignore[arg-type]
                audited_change=AuditedChange._from(obj["audited_change"]) if "audited_change" in obj else None,
                scoped_revocations=tuple(ScopedRevocation._from(r) for r in scoped or ()),
                signer_key_id=obj["signer_key_id"],
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, ValidationError, binascii.Error, AttributeError):
            raise KeychainTamperedError("stored keychain head is malformed") from None
