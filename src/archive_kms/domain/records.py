"""What an archive holds: Salesforce-like records and their attachments.

A record is small JSON (object type, record id, fields); an attachment is a stream of
bytes from a few KB to hundreds of MB, archived as its own object. Both are encrypted
with the envelope format under the tenant's keychain and indexed for search.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

FieldValue = str | int | float | bool | None


@dataclass(frozen=True)
class AttachmentRef:
    """An attachment as a record lists it; the bytes travel separately as a stream."""

    attachment_id: str
    file_name: str
    size: int
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Record:
    object_type: str  # e.g. "Account", "Case", "EmailMessage"
    record_id: str  # Salesforce-style 18-char id
    fields: Mapping[str, FieldValue]
    attachments: tuple[AttachmentRef, ...] = ()
    workspace_id: str = "default"  # the archive workspace (an org): one L3 key each

    def to_json(self) -> bytes:
        """Canonical encoding (sorted keys, no whitespace): what gets encrypted and hashed."""
        return json.dumps(
            {
                "object_type": self.object_type,
                "record_id": self.record_id,
                "workspace_id": self.workspace_id,
                "fields": dict(self.fields),
                "attachments": [a.__dict__ for a in self.attachments],
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> Record:
        obj = json.loads(data) if isinstance(data, (bytes, str)) else dict(data)
        try:
            return cls(
                object_type=str(obj["object_type"]),
                record_id=str(obj["record_id"]),
                fields=dict(obj.get("fields") or {}),
                attachments=tuple(AttachmentRef(**a) for a in obj.get("attachments") or ()),
                workspace_id=str(obj.get("workspace_id") or "default"),
            )
        except (KeyError, TypeError) as e:
            from archive_kms.errors import ValidationError

            raise ValidationError(f"record is missing or has a malformed field: {e}") from None


@dataclass(frozen=True)
class AttachmentData:
    """An attachment's bytes, produced on demand (so a job never holds them all in memory)."""

    ref: AttachmentRef
    open: Callable[[], Iterator[bytes]] = field(repr=False)
