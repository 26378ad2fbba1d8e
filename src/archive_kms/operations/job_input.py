"""What an archive job may contain, checked before anything is written (ADR 0020).

The rules are written out in ``docs/archive-jobs.md`` ("Job input"); every refusal is a
``ValidationError`` naming where the bad value is: ``FILE:LINE`` for a JSONL file, else
``record N of job J``. Nothing here touches storage, the index or the state store: the
archive writer (``operations.archive``) calls it before its first write, and again for a
deferred job when it is replayed.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archive_kms.domain.records import AttachmentRef, Record
from archive_kms.errors import ValidationError

#: ``--generate N``: one job is a batch; use ``--offset`` for the next one.
MAX_GENERATE = 10_000
#: A synthetic job built by code (benchmarks, scale runs): still bounded, records are planned in memory.
MAX_SYNTHETIC_RECORDS = 1_000_000
#: Records in one JSONL job (the same bound: a job is one batch, held in memory).
MAX_JOB_RECORDS = 10_000
#: A record's canonical JSON (what is encrypted and shown from the index).
MAX_RECORD_BYTES = 1024 * 1024
#: A JSONL line: a record plus its attachment entries and their paths.
MAX_LINE_BYTES = MAX_RECORD_BYTES + 256 * 1024
#: All records of one inline job together (they are held in memory, and sealed into the
#: state store while the job waits behind a paused gate). Attachments do not count.
MAX_JOB_RECORD_BYTES = 64 * 1024 * 1024
MAX_ID_CHARS = 255
MAX_FILE_NAME_CHARS = 255
MAX_JOB_ID_CHARS = 255
MAX_OFFSET = 10**9
MAX_ATTACHMENT_BYTES = 5 * 1024**4  # S3's largest object

RECORD_KEYS = ("object_type", "record_id", "workspace_id", "fields", "attachments")
ATTACHMENT_KEYS = ("attachment_id", "file_name", "size", "content_type", "path")
DEFAULT_WORKSPACE = "default"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}\Z")
# The keychain's workspace rule (its DEK ids and L3 ids are built from it).
_WORKSPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,95}\Z")


def _kind(value: Any) -> str:
    """A JSON value's type as a JSON user knows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _show(value: Any, limit: int = 60) -> str:
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_job_id(job_id: Any) -> str:
    """A job id (the idempotency id): 1..255 printable characters, no whitespace."""
    if not isinstance(job_id, str) or not job_id:
        raise ValidationError("--job-id must not be empty (omit it for a new id)")
    if len(job_id) > MAX_JOB_ID_CHARS or not job_id.isprintable() or any(c.isspace() for c in job_id):
        raise ValidationError(
            f"--job-id {_show(job_id)}: use 1..{MAX_JOB_ID_CHARS} printable characters without spaces"
        )
    return job_id


def check_synthetic(count: Any, seed: Any, offset: Any, *, max_count: int = MAX_GENERATE) -> None:
    """Bounds of a synthetic job (``--generate/--seed/--offset``; ``max_count`` for a
    spec built by code)."""
    for flag, value, low, high in (
        ("--generate", count, 1, max_count),
        ("--offset", offset, 0, MAX_OFFSET),
        ("--seed", seed, 0, 2**63 - 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            more = " (one job is a batch: archive more with further jobs and --offset)" if flag == "--generate" else ""
            raise ValidationError(f"{flag} {value!r}: use an integer in {low}..{high}{more}")


def _check_id(where: str, what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{where}: {what} must be a string, not {_kind(value)}")
    if not 1 <= len(value) <= MAX_ID_CHARS or not value.isprintable() or "/" in value:
        raise ValidationError(
            f"{where}: {what} {_show(value)} must be 1..{MAX_ID_CHARS} printable characters without '/'"
        )
    return value


def _check_scalar(where: str, field: str, value: Any) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{where}: field {field} is {value!r}; JSON numbers must be finite")
        return
    raise ValidationError(
        f"{where}: field {field} is {_kind(value)}; field values are strings, numbers, booleans or null"
    )


def check_record(record: Record, where: str) -> Record:
    """The value rules of a record (ids, workspace, field names and values, attachments),
    whatever built it; the search index adds its own bounds when the document is built."""
    if not _API_NAME.match(record.object_type if isinstance(record.object_type, str) else ""):
        raise ValidationError(
            f"{where}: object_type {_show(record.object_type)} must be an API name "
            "([A-Za-z][A-Za-z0-9_]*, at most 80 characters)"
        )
    _check_id(where, "record_id", record.record_id)
    if not isinstance(record.workspace_id, str) or not _WORKSPACE.match(record.workspace_id):
        raise ValidationError(
            f"{where}: workspace_id {_show(record.workspace_id)} must be 1..96 characters of "
            "[A-Za-z0-9._:@-], starting with a letter or digit"
        )
    for name, value in record.fields.items():
        if not isinstance(name, str) or not _API_NAME.match(name):
            raise ValidationError(
                f"{where}: field name {_show(name)} must be an API name ([A-Za-z][A-Za-z0-9_]*, at most 80)"
            )
        _check_scalar(where, name, value)
    for att in record.attachments:
        _check_id(where, "attachment_id", att.attachment_id)
        if not isinstance(att.file_name, str) or not 1 <= len(att.file_name) <= MAX_FILE_NAME_CHARS:
            raise ValidationError(f"{where}: attachment {att.attachment_id} needs a file_name of 1..255 characters")
        if not att.file_name.isprintable():
            raise ValidationError(f"{where}: file_name of attachment {att.attachment_id} is not printable")
        if isinstance(att.size, bool) or not isinstance(att.size, int) or not 0 <= att.size <= MAX_ATTACHMENT_BYTES:
            raise ValidationError(
                f"{where}: size of attachment {att.attachment_id} must be an integer in 0..{MAX_ATTACHMENT_BYTES}"
            )
        if not isinstance(att.content_type, str) or not 1 <= len(att.content_type) <= MAX_ID_CHARS:
            raise ValidationError(f"{where}: content_type of attachment {att.attachment_id} must be a short string")
    ids = [a.attachment_id for a in record.attachments]
    if len(set(ids)) != len(ids):
        raise ValidationError(f"{where}: an attachment id is listed twice in one record")
    size = len(record.to_json())
    if size > MAX_RECORD_BYTES:
        raise ValidationError(f"{where}: record is {size} bytes of JSON; at most {MAX_RECORD_BYTES}")
    return record


def parse_record(obj: Any, where: str, *, paths: bool = False) -> tuple[Record, dict[str, str]]:
    """A record from its JSON form (a JSONL line, an inline record of a job spec), typed
    strictly: no missing or unknown keys, no ``null`` ids, no number where a string
    belongs. Returns the record and, with ``paths``, its attachments' ``path`` entries
    as given (attachment id -> path), which a stored spec never carries."""
    if not isinstance(obj, Mapping):
        raise ValidationError(f"{where}: a record must be a JSON object, not {_kind(obj)}")
    unknown = [k for k in obj if k not in RECORD_KEYS]
    if unknown:
        raise ValidationError(f"{where}: unknown key {_show(unknown[0])} (a record has {', '.join(RECORD_KEYS)})")
    for key in ("object_type", "record_id"):
        if key not in obj:
            raise ValidationError(f"{where}: {key} is missing")
    for key in ("object_type", "record_id"):
        if not isinstance(obj[key], str):
            raise ValidationError(f"{where}: {key} must be a string, not {_kind(obj[key])}")
    workspace = obj.get("workspace_id", DEFAULT_WORKSPACE)
    if not isinstance(workspace, str):
        raise ValidationError(f"{where}: workspace_id must be a string, not {_kind(workspace)} (omit it for 'default')")
    fields = obj.get("fields", {})
    if not isinstance(fields, Mapping):
        raise ValidationError(f"{where}: fields must be a JSON object, not {_kind(fields)}")
    raw_atts = obj.get("attachments", [])
    if not isinstance(raw_atts, list):
        raise ValidationError(f"{where}: attachments must be an array of objects, not {_kind(raw_atts)}")
    refs: list[AttachmentRef] = []
    given: dict[str, str] = {}
    for n, att in enumerate(raw_atts, 1):
        at = f"{where}: attachment {n}"
        if not isinstance(att, Mapping):
            raise ValidationError(f"{at} must be a JSON object, not {_kind(att)}")
        allowed = ATTACHMENT_KEYS if paths else ATTACHMENT_KEYS[:-1]
        extra = [k for k in att if k not in allowed]
        if extra:
            raise ValidationError(f"{at}: unknown key {_show(extra[0])} (an attachment has {', '.join(allowed)})")
        for key in ("attachment_id", "file_name"):
            if not isinstance(att.get(key), str):
                raise ValidationError(f"{at}: {key} must be a string, not {_kind(att.get(key))}")
        size = att.get("size")
        if "size" in att and (isinstance(size, bool) or not isinstance(size, int)):
            raise ValidationError(f"{at}: size must be an integer number of bytes, not {_kind(size)}")
        if "size" not in att and not paths:
            raise ValidationError(f"{at}: size is missing")
        content_type = att.get("content_type", DEFAULT_CONTENT_TYPE)
        if not isinstance(content_type, str):
            raise ValidationError(f"{at}: content_type must be a string, not {_kind(content_type)}")
        if paths:
            path = att.get("path")
            if not isinstance(path, str) or not path:
                raise ValidationError(f"{at}: path must name the attachment's file (relative to the JSONL's folder)")
            given[att["attachment_id"]] = path
        refs.append(AttachmentRef(att["attachment_id"], att["file_name"], -1 if size is None else size, content_type))
    # A JSONL entry may leave size out (-1 here): the loader takes the file's size.
    return Record(obj["object_type"], obj["record_id"], dict(fields), tuple(refs), workspace), given


@dataclass(frozen=True)
class _Seen:
    where: str
    content: Any


class Duplicates:
    """Records and attachments seen so far in one job: the same id again with the same
    content is let through once (``add`` returns False); with other content it is an
    error naming both places."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str, str], _Seen] = {}
        self._attachments: dict[str, _Seen] = {}

    def add_record(self, record: Record, where: str) -> bool:
        key = (record.workspace_id, record.object_type, record.record_id)
        content = record.to_json()
        seen = self._records.get(key)
        if seen is None:
            self._records[key] = _Seen(where, content)
            return True
        if seen.content != content:
            raise ValidationError(
                f"{where}: record {record.object_type}/{record.record_id} (workspace {record.workspace_id}) is "
                f"also at {seen.where} with other content; one job may hold a record once"
            )
        return False

    def add_attachment(self, attachment_id: str, content: Any, where: str) -> bool:
        seen = self._attachments.get(attachment_id)
        if seen is None:
            self._attachments[attachment_id] = _Seen(where, content)
            return True
        if seen.content != content:
            raise ValidationError(
                f"{where}: attachment {attachment_id} is also at {seen.where} with another file or size; "
                "one attachment id names one file"
            )
        return False


def _confined(root: Path, given: str, where: str, attachment_id: str) -> Path:
    """The regular file ``given`` names, resolved (symlinks included) and inside ``root``."""
    raw = Path(given)
    candidate = raw if raw.is_absolute() else root / raw
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ValidationError(f"{where}: attachment {attachment_id}: no file at {_show(given)}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop, a permission error on the way
        raise ValidationError(
            f"{where}: attachment {attachment_id}: cannot read {_show(given)} ({getattr(e, 'strerror', None) or e})"
        ) from None
    if not resolved.is_relative_to(root):
        raise ValidationError(
            f"{where}: attachment {attachment_id}: {_show(given)} is outside {root} (attachment paths must stay in "
            "the JSONL's folder, or the folder given with --attachments-root)"
        )
    try:
        info = resolved.stat()
    except OSError as e:
        raise ValidationError(
            f"{where}: attachment {attachment_id}: cannot read {_show(given)} ({e.strerror})"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(f"{where}: attachment {attachment_id}: {_show(given)} is not a regular file")
    if not os.access(resolved, os.R_OK):
        raise ValidationError(f"{where}: attachment {attachment_id}: {_show(given)} is not readable")
    return resolved


def _lines(f: Any):
    """(line number, raw bytes) of an open binary file; an overlong line comes as None."""
    number = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class JobInput:
    """The checked content of a JSONL job file: records, their attachment files
    (attachment_id -> path) and where each record came from (``FILE:LINE``)."""

    records: tuple[dict[str, Any], ...]
    attachment_files: dict[str, str]
    origins: tuple[str, ...]


def read_jsonl(path: str | Path, *, job_id: str, attachments_root: str | Path | None = None) -> JobInput:
    """A job from a JSONL file (format: ``docs/archive-jobs.md``, "Job input"): one record
    per line, attachments as entries with a ``path`` inside the JSONL's folder (or
    ``attachments_root``). Everything is checked here, before the job is submitted; the
    first problem is raised as a ``ValidationError`` naming ``FILE:LINE``."""

    check_job_id(job_id)
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise ValidationError(f"--jsonl {shown}: no such file")
    if p.is_dir():
        raise ValidationError(f"--jsonl {shown} is a directory; give the JSONL file")
    if not p.is_file():
        raise ValidationError(f"--jsonl {shown} is not a regular file")
    root_given = attachments_root if attachments_root is not None else p.resolve().parent
    root = Path(root_given).resolve()
    if not root.is_dir():
        raise ValidationError(f"--attachments-root {attachments_root}: not a directory")
    try:
        f = p.open("rb")
    except OSError as e:
        raise ValidationError(f"--jsonl {shown}: cannot read it ({e.strerror})") from None
    with f:
        return _read_jsonl(f, shown, root)


def _read_jsonl(f: Any, shown: str, root: Path) -> JobInput:
    records: list[dict[str, Any]] = []
    origins: list[str] = []
    files: dict[str, str] = {}
    seen = Duplicates()
    total = 0
    for number, raw in _lines(f):
        where = f"{shown}:{number}"
        if raw is None:
            raise ValidationError(
                f"{where}: the line is longer than {MAX_LINE_BYTES} bytes (a record is at most {MAX_RECORD_BYTES})"
            )
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValidationError(
                f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except ValueError as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValidationError(f"{where}: not JSON ({msg})") from None
        record, given = parse_record(obj, where, paths=True)
        refs = []
        for ref in record.attachments:
            full = _confined(root, given[ref.attachment_id], where, ref.attachment_id)
            actual = full.stat().st_size
            if ref.size >= 0 and ref.size != actual:
                raise ValidationError(
                    f"{where}: attachment {ref.attachment_id} declares size {ref.size} but {given[ref.attachment_id]} "
                    f"has {actual} bytes"
                )
            ref = AttachmentRef(ref.attachment_id, ref.file_name, actual, ref.content_type)
            refs.append(ref)
            if seen.add_attachment(ref.attachment_id, (str(full), ref.file_name, ref.size, ref.content_type), where):
                files[ref.attachment_id] = str(full)
        record = check_record(
            Record(record.object_type, record.record_id, record.fields, tuple(refs), record.workspace_id), where
        )
        if not seen.add_record(record, where):
            continue  # the same record again, same content: archived once
        records.append(record_payload(record))
        origins.append(where)
        total += len(record.to_json())
        if len(records) > MAX_JOB_RECORDS:
            raise ValidationError(f"{where}: more than {MAX_JOB_RECORDS} records in one job; split the file")
        if total > MAX_JOB_RECORD_BYTES:
            raise ValidationError(
                f"{where}: the job's records pass {MAX_JOB_RECORD_BYTES} bytes of JSON; split the file"
            )
    if not records:
        raise ValidationError(f"--jsonl {shown}: no records (one JSON object per line)")
    return JobInput(tuple(records), files, tuple(origins))


def record_payload(record: Record) -> dict[str, Any]:
    """A record in the form a job spec carries (and seals): its canonical JSON as a dict."""
    return json.loads(record.to_json())


def _check_file(path: str, ref: AttachmentRef, where: str) -> None:
    """An attachment's file is still there, a regular file of the size the job recorded
    (a deferred job's files are read when it is replayed, maybe much later)."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise ValidationError(f"{where}: attachment {ref.attachment_id}: cannot read {path} ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(f"{where}: attachment {ref.attachment_id}: {path} is not a regular file")
    if info.st_size != ref.size:
        raise ValidationError(
            f"{where}: attachment {ref.attachment_id}: {path} has {info.st_size} bytes, the job recorded {ref.size}"
        )


def check_inline_records(
    job_id: str, records: Sequence[Any], files: Mapping[str, str], origins: Sequence[str] = ()
) -> list[Record]:
    """The records of an inline spec, each checked (``parse_record``, ``check_record``),
    no conflicting duplicate, every attachment with a file given."""
    if len(records) > MAX_JOB_RECORDS:
        raise ValidationError(f"job {job_id}: {len(records)} records; at most {MAX_JOB_RECORDS} per job")
    out: list[Record] = []
    seen = Duplicates()
    total = 0
    for i, raw in enumerate(records):
        where = origins[i] if i < len(origins) else f"record {i + 1} of job {job_id}"
        record, _ = parse_record(raw, where)
        check_record(record, where)
        for ref in record.attachments:
            path = files.get(ref.attachment_id)
            if path is None:
                raise ValidationError(f"{where}: attachment {ref.attachment_id} has no file; give it with the job")
            _check_file(path, ref, where)
            seen.add_attachment(ref.attachment_id, (path, ref.file_name, ref.size, ref.content_type), where)
        total += len(record.to_json())
        if total > MAX_JOB_RECORD_BYTES:
            raise ValidationError(f"{where}: job {job_id}'s records pass {MAX_JOB_RECORD_BYTES} bytes of JSON")
        if seen.add_record(record, where):
            out.append(record)
    return out


__all__ = [
    "MAX_GENERATE",
    "MAX_JOB_RECORDS",
    "MAX_LINE_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_SYNTHETIC_RECORDS",
    "Duplicates",
    "JobInput",
    "check_inline_records",
    "check_job_id",
    "check_record",
    "check_synthetic",
    "parse_record",
    "read_jsonl",
    "record_payload",
]
