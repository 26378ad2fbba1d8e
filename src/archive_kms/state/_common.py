"""Rules both StateStore backends apply identically (validation, state machines, fencing)."""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state.port import (
    ABANDONED_PREFIX,
    MAX_OBJECT_NAME_BYTES,
    SUPERSEDED_PREFIX,
    JobState,
    ManifestEntry,
    RunState,
    StepState,
)
from archive_kms.state.schema import STEP_NAME

E = TypeVar("E", bound=enum.Enum)


def member(enum_cls: type[E], value: Any, what: str) -> E:
    """``enum_cls(value)``, or ``ValidationError`` listing the allowed values."""
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_cls)
        raise ValidationError(f"{what} must be one of {allowed}; got {str(value)[:40]!r}") from None


RUN_MOVES: dict[RunState, set[RunState]] = {
    RunState.RUNNING: {RunState.FAILED, RunState.COMPLETED, RunState.CANCELLED},
    RunState.FAILED: {RunState.RUNNING, RunState.CANCELLED},
    RunState.COMPLETED: set(),
    RunState.CANCELLED: set(),
}


class LeaseRow(Protocol):
    run_id: str
    token: int
    released_at: datetime | None


ROLLBACK_PENDING = (
    "archive job {job_id!r} of tenant {tenant_id!r} was fenced or abandoned and its partial output is not rolled "
    "back yet; it starts again once that is done (a migration's pause step, or `archive-kms jobs abandon "
    "{tenant_id} {job_id} --reason ...`, finishes it)"
)


def awaits_rollback(state: str, error: str | None) -> bool:
    """A failed job attempt that was fenced or abandoned (``JobLeaseRepo``): while its
    journal is not empty, its partial output awaits a rollback."""
    return state == JobState.FAILED.value and (error or "").startswith((SUPERSEDED_PREFIX, ABANDONED_PREFIX))


def check_id(kind: str, value: Any, max_len: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValidationError(f"{kind} must be a non-empty str of at most {max_len} characters")


def check_steps(steps: Sequence[str]) -> None:
    if isinstance(steps, str) or not steps:
        raise ValidationError("a run needs a non-empty sequence of step names")
    for s in steps:
        check_id("step name", s, STEP_NAME)
    if len(set(steps)) != len(steps):
        raise ValidationError("step names of a run must be unique")


def check_entry(e: ManifestEntry) -> None:
    if not isinstance(e.name, (bytes, bytearray)) or not e.name or len(e.name) > MAX_OBJECT_NAME_BYTES:
        raise ValidationError(f"object names are 1..{MAX_OBJECT_NAME_BYTES} bytes")
    if not isinstance(e.size, int) or e.size < 0 or not isinstance(e.shard, int) or e.shard < 0:
        raise ValidationError("manifest entry size and shard must be non-negative ints")


def json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{what} must be a JSON object")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))  # a plain, JSON-exact copy
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be plain JSON ({type(exc).__name__})") from None


# A deferred job's sealed content travels beside its clear payload (``DeferredJob.sealed``).
# SQL rows keep both in the one ``payload`` document, the seal as base64 under this key, so
# a purge rewrites the document without it; callers may not use the key themselves.
SEALED_MEMBER = "sealed"


def job_payload(payload: Mapping[str, Any], sealed: Any) -> tuple[dict[str, Any], bytes | None]:
    """A deferred job's clear payload (plain JSON, reserved key absent) and sealed bytes, checked."""
    body = json_object(payload, "job payload")
    if SEALED_MEMBER in body:
        raise ValidationError(f"job payload key {SEALED_MEMBER!r} is reserved: pass sealed content as sealed=")
    if sealed is None:
        return body, None
    if not isinstance(sealed, (bytes, bytearray)) or not sealed:
        raise ValidationError("sealed job content must be non-empty bytes")
    return body, bytes(sealed)


def pack_payload(payload: Mapping[str, Any], sealed: bytes | None) -> dict[str, Any]:
    """The stored document: the clear payload, plus the seal in base64 while there is one."""
    document = dict(payload)
    if sealed is not None:
        document[SEALED_MEMBER] = base64.b64encode(sealed).decode("ascii")
    return document


def unpack_payload(document: Mapping[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """(clear payload, sealed bytes) of a stored document. A seal that is not valid base64
    (an edited row) is handed back as its raw text: it will not open, and the replayer
    says so, rather than the store failing every read of the tenant's queue."""
    payload = dict(document)
    raw = payload.pop(SEALED_MEMBER, None)
    if raw is None:
        return payload, None
    text = raw if isinstance(raw, str) else json.dumps(raw)
    try:
        return payload, base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return payload, text.encode("utf-8", "replace")


def check_token(row: LeaseRow | None, tenant_id: str, token: int) -> None:
    if row is None:
        raise FencedError(
            f"tenant {tenant_id!r} has no lease; token {token} is not valid", resource=f"lease:{tenant_id}"
        )
    if row.token != token:
        raise FencedError(
            f"lease of tenant {tenant_id!r} moved to run {row.run_id!r} (token {row.token}); token {token} is stale",
            resource=f"lease:{tenant_id}",
        )
    if row.released_at is not None:
        raise FencedError(f"lease of tenant {tenant_id!r} token {token} was released", resource=f"lease:{tenant_id}")


def step_transition(
    current: str,
    target: StepState,
    attempt: int,
    result: Mapping[str, Any] | None,
    error: str | None,
    now: datetime,
    run_id: str,
    step: str,
) -> dict[str, Any] | None:
    cur = StepState(current)
    if cur is StepState.COMPLETED and target is not StepState.COMPLETED:
        raise StateError(
            f"step {step!r} of run {run_id!r} is completed; reset_steps to rerun it", resource=f"run:{run_id}"
        )
    if cur is target and target is not StepState.RUNNING:
        return None  # idempotent repeat
    if target is StepState.RUNNING:
        return {
            "state": target.value,
            "attempt": attempt + 1,
            "started_at": now,
            "finished_at": None,
            "error": None,
            "result": None,
        }
    if target is StepState.PENDING:
        raise StateError("use reset_steps to move a step back to pending", resource=f"run:{run_id}")
    return {"state": target.value, "finished_at": now, "result": result, "error": error}


# --- key lifecycle -------------------------------------------------------------------------

#: Fields ``update_rotation`` may change (``details`` is merged, the others replaced).
ROTATION_CHANGES = frozenset(
    {
        "state",
        "run_id",
        "nonce",
        "observed_version",
        "awaiting_since",
        "confirmed_by",
        "confirmed_at",
        "completed_at",
        "details",
    }
)


def check_retention(retention_seconds: Any, actor: Any) -> int:
    from archive_kms.state.port import MAX_RETENTION_SECONDS

    if isinstance(retention_seconds, bool) or not isinstance(retention_seconds, int):
        raise ValidationError(f"retention must be a whole number of seconds, got {retention_seconds!r}")
    if not 1 <= retention_seconds <= MAX_RETENTION_SECONDS:
        raise ValidationError(
            f"retention must be between 1 second and {MAX_RETENTION_SECONDS // 86_400} days, got {retention_seconds} s"
        )
    check_id("actor", actor, 255)
    return retention_seconds


def check_rotation(rotation: Any) -> None:
    from archive_kms.state.port import ROTATION_KINDS

    check_id("rotation id", rotation.rotation_id, 64)
    if rotation.kind not in ROTATION_KINDS:
        raise ValidationError(f"rotation kind must be one of {', '.join(ROTATION_KINDS)}, got {rotation.kind!r}")
    for what in ("key_ref", "previous_key_ref"):
        check_id(what, getattr(rotation, what), 2048)
    for what in ("previous_version", "observed_version"):
        value = getattr(rotation, what)
        if value is not None:
            check_id(what, value, 255)


def check_rotation_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    from archive_kms.state.port import RotationState

    unknown = set(changes) - ROTATION_CHANGES
    if unknown:
        raise ValidationError(f"update_rotation cannot change {', '.join(sorted(unknown))}")
    out = dict(changes)
    if "state" in out:
        out["state"] = member(RotationState, out["state"], "rotation state")
    if "details" in out:
        out["details"] = json_object(out["details"], "rotation details")
    return out


def rotation_refusal(rotation_id: str, state: Any, expect: Any, nonce_matches: bool) -> StateError:
    """Why a compare-and-set on a rotation did not apply (single use of its challenge)."""
    if not nonce_matches:
        return StateError(
            f"rotation {rotation_id} has another confirmation challenge (an old or forged one was used)",
            resource=f"rotation:{rotation_id}",
        )
    wanted = ", ".join(s.value for s in expect)
    return StateError(f"rotation {rotation_id} is {state.value}, not {wanted}", resource=f"rotation:{rotation_id}")


# --- warnings and key observations (``WarningRepo``, ``KeyWatchRepo``) ------------------

_KIND = re.compile(r"^[a-z_]{1,32}$")
_SUBJECT = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")


def check_warning(kind: str, severity: str, message: str, subject: str | None, details: Any) -> dict[str, Any]:
    """A warning's fields as ``raise_warning`` accepts them; returns the details as plain JSON."""
    from archive_kms.state.port import MAX_WARNING_MESSAGE, WARNING_SEVERITIES

    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValidationError(f"warning kind {str(kind)[:40]!r}: 1..32 lowercase letters or '_'")
    if severity not in WARNING_SEVERITIES:
        raise ValidationError(f"warning severity {str(severity)[:20]!r}: one of {', '.join(WARNING_SEVERITIES)}")
    if not isinstance(message, str) or not message.strip() or len(message) > MAX_WARNING_MESSAGE:
        raise ValidationError(f"a warning needs a message of 1..{MAX_WARNING_MESSAGE} characters")
    if subject is not None and (not isinstance(subject, str) or not _SUBJECT.fullmatch(subject)):
        raise ValidationError(f"warning subject {str(subject)[:40]!r}: 1..128 of A-Z a-z 0-9 . _ : @ / -")
    return json_object(details or {}, "warning details")


def check_actor(actor: str) -> str:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 255:
        raise ValidationError("an actor (who did it) of 1..255 characters is required")
    return actor.strip()
