"""Keychain ids and times: what a tenant, workspace and DEK id may be, how DEK ids are
built and parsed, and the bucket of a time. Pure functions."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import cast

from archive_kms.config import setting_default
from archive_kms.errors import ValidationError

__all__ = [
    "DEFAULT_BUCKET_SECONDS",
    "MAX_DEK_ID_LEN",
    "as_ts",
    "bucket_of",
    "check_floor",
    "check_tenant",
    "check_workspace",
    "dek_id",
    "dt",
    "l2_id",
    "l3_id",
    "parse_dek_id",
]

DEFAULT_BUCKET_SECONDS: int = setting_default("dek_bucket_seconds")
MAX_DEK_ID_LEN = 128  # what the envelope header accepts

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_WORKSPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,95}\Z")
_UINT_RE = re.compile(r"(0|[1-9][0-9]{0,17})\Z")  # canonical: no sign, no leading zeros


def check_tenant(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not _TENANT_RE.match(tenant_id):
        raise ValidationError("tenant id must be 1..63 chars of [A-Za-z0-9._-], starting alphanumeric")
    return tenant_id


def check_workspace(workspace_id: object) -> str:
    if not isinstance(workspace_id, str) or not _WORKSPACE_RE.match(workspace_id):
        raise ValidationError("workspace id must be 1..96 chars of [A-Za-z0-9._:@-], starting alphanumeric")
    return workspace_id


def l2_id(generation: int) -> str:
    return f"l2/{generation}"


def l3_id(workspace_id: str, generation: int) -> str:
    return f"l3/{workspace_id}/{generation}"


def dek_id(workspace_id: str, bucket: int, generation: int) -> str:
    """The DEK id an object header carries: ``l4/<workspace>/<bucket>/<generation>``."""
    value = f"l4/{check_workspace(workspace_id)}/{bucket}/{generation}"
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


def check_floor(workspace_id: str, value: object) -> tuple[int, int]:
    """A DEK floor ``(bucket >= 0, generation >= 1)`` (``erase_deks_below``)."""
    try:
        bucket, generation = cast("tuple[object, object]", value)  # unpacking checks the shape
    except (TypeError, ValueError):
        raise ValidationError(f"floor of {workspace_id} must be (bucket, generation), got {value!r}") from None
    for n, least in ((bucket, 0), (generation, 1)):
        if not isinstance(n, int) or isinstance(n, bool) or n < least:
            raise ValidationError(f"floor of {workspace_id} must be (bucket >= 0, generation >= 1), got {value!r}")
    return cast(int, bucket), cast(int, generation)


def as_ts(value: datetime | float | int) -> float:
    """POSIX seconds of an aware datetime or a non-negative number."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValidationError("times must be timezone-aware datetimes (or POSIX timestamps)")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValidationError(f"not a time: {value!r}")


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
