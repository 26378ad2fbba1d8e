"""Whether object names fit a location, checked before any byte moves.

A name becomes the backend key ``location prefix + percent-encode(name)``
(``storage.naming``; every byte outside ``[A-Za-z0-9_-]`` takes three characters). The
services limit that key:

* **S3**: at most 1,024 bytes of UTF-8 key, the location prefix (``tenants/<id>/`` in the
  shared bucket) included. Our keys are ASCII, so bytes = characters.
* **Azure Blob**: a blob name of at most 1,024 characters and at most 254 path segments
  (``/``-separated). The encoded name holds no ``/``, so only the location prefix adds
  segments (none today: a container per tenant).

The same name can fit one location and not another: a name that fits a dedicated bucket
(no prefix) may not fit under ``tenants/<id>/`` in the shared bucket, which is where
``remove`` brings a tenant back. Archive jobs check their names against every location
the tenant may live in (``tenant_locations``); migration preflight checks every source
name against the target (ADR 0020).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from archive_kms.errors import ValidationError
from archive_kms.storage.locations import Cloud, Location
from archive_kms.storage.naming import encode_name

S3_MAX_KEY_BYTES = 1024
AZURE_MAX_NAME_CHARS = 1024
AZURE_MAX_SEGMENTS = 254
#: How many offending names one error message shows (the count is always exact).
SHOWN = 5


@dataclass(frozen=True)
class NameProblem:
    """A name that does not fit ``location``, and why (a sentence)."""

    name: bytes
    location: str
    reason: str

    def describe(self) -> str:
        return f"{display(self.name)} {self.reason}"


def display(name: bytes, limit: int = 100) -> str:
    """A name as support can read and copy it (UTF-8 where it is, escapes elsewhere), bounded."""
    text = name.decode("utf-8", "backslashreplace")
    text = text if text.isprintable() else ascii(text)[1:-1]
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def name_problem(location: Location, name: bytes) -> NameProblem | None:
    """Why ``name`` does not fit ``location``, or None if it does."""
    if not isinstance(name, bytes) or not name:
        return NameProblem(bytes(name or b""), location.uri, "is empty")
    key = location.prefix + encode_name(name)
    if location.cloud is Cloud.S3:
        size = len(key.encode("utf-8"))
        if size > S3_MAX_KEY_BYTES:
            return NameProblem(
                name,
                location.uri,
                f"({len(name)} bytes) encodes to an S3 key of {size} bytes, over the {S3_MAX_KEY_BYTES}-byte "
                f"limit of {location.uri} (prefix {location.prefix!r} included)",
            )
        return None
    if len(key) > AZURE_MAX_NAME_CHARS:
        return NameProblem(
            name,
            location.uri,
            f"({len(name)} bytes) encodes to a blob name of {len(key)} characters, over Azure's "
            f"{AZURE_MAX_NAME_CHARS}-character limit in {location.uri}",
        )
    segments = key.count("/") + 1
    if segments > AZURE_MAX_SEGMENTS:
        return NameProblem(
            name, location.uri, f"has {segments} path segments, over Azure's {AZURE_MAX_SEGMENTS} in {location.uri}"
        )
    return None


def check_names(locations: Sequence[Location], names: Iterable[bytes]) -> Iterator[NameProblem]:
    """The first problem of each name that does not fit every one of ``locations``."""
    for name in names:
        for loc in locations:
            problem = name_problem(loc, name)
            if problem is not None:
                yield problem
                break


def summary(problems: Sequence[NameProblem], total: int | None = None) -> str:
    """One line naming up to ``SHOWN`` problems and the exact count."""
    count = len(problems) if total is None else total
    shown = "; ".join(p.describe() for p in problems[:SHOWN])
    more = f" (and {count - SHOWN} more)" if count > SHOWN else ""
    return f"{count} object name(s) do not fit: {shown}{more}"


def require_names_fit(names: Iterable[bytes], target: Location) -> None:
    """``ValidationError`` (terminal: no retry makes a name shorter) naming the objects
    whose names do not fit ``target`` and how many there are; used by migration preflight
    on every source name, before any byte moves."""
    problems: list[NameProblem] = []
    total = 0
    for name in names:
        problem = name_problem(target, name)
        if problem is not None:
            total += 1
            if len(problems) < SHOWN:
                problems.append(problem)
    if total:
        raise ValidationError(
            f"{summary(problems, total)} at the target {target.uri}; nothing was moved. Object names come from "
            "record and attachment ids and cannot be renamed: keep the tenant where it is, or erase those records "
            "first",
            resource=target.uri,
        )


def tenant_locations(current: Location, shared_bucket: str | None, shared_azure_account: str | None) -> list[Location]:
    """Where a tenant living at ``current`` may live later on the same cloud: ``current``
    and its shared location (``remove`` brings it back there). Names are checked against
    all of them, so no job writes a name that a later migration could not move."""
    from archive_kms.storage.locations import Kind, shared_azure_location, shared_s3_location

    out = [current]
    if current.kind is Kind.DEDICATED:
        if current.cloud is Cloud.S3 and shared_bucket:
            out.append(shared_s3_location(current.tenant, shared_bucket))
        elif current.cloud is Cloud.AZURE and shared_azure_account:
            out.append(shared_azure_location(current.tenant, shared_azure_account))
    return out


__all__ = [
    "AZURE_MAX_NAME_CHARS",
    "AZURE_MAX_SEGMENTS",
    "S3_MAX_KEY_BYTES",
    "NameProblem",
    "check_names",
    "display",
    "name_problem",
    "require_names_fit",
    "summary",
    "tenant_locations",
]
