"""The search-generation registry's value: one signed record per index generation we
created for a tenant, naming its index and the mode it was created in.

Elasticsearch's own ``_meta`` says which mode an index holds, but whoever operates the
cluster can write it; so the mode a search or a write uses comes from this record, which
the platform signing key signs when the generation is created (purpose
``search-generation/v1``) and the state store keeps (table ``search_generations``). A
generation's mode never changes, so an old record cannot be replayed over a newer one of
another mode: a generation number is recorded once (``docs/search-index.md``
"Generations we recorded").

A pure value with its canonical JSON (sorted keys, no whitespace, times as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``): ``signing_payload()`` is what is signed,
``to_json()`` what is stored, and ``from_json(x.to_json()) == x``. It lives in ``domain/``
because ``state`` stores it and ``operations`` signs and checks it (ADR 0010).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from archive_kms.domain.keychain import SignedJson, b64_in, time_in, time_out
from archive_kms.errors import IntegrityError, ValidationError

__all__ = ["GENERATION_FORMAT", "GENERATION_MODES", "GENERATION_PURPOSE", "SearchGeneration"]

GENERATION_FORMAT = "archive_kms.search.generation/1"
GENERATION_PURPOSE = "search-generation/v1"
GENERATION_MODES = ("plaintext", "keyed")  # search.IndexMode's values (domain imports nothing above it)


@dataclass(frozen=True)
class SearchGeneration(SignedJson):
    """Generation ``generation`` of ``tenant_id``'s index is ``index`` and holds ``mode``
    documents; recorded (and signed) at ``recorded_at`` by key ``signer_key_id``."""

    tenant_id: str
    generation: int
    index: str
    mode: str
    recorded_at: datetime
    signer_key_id: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.tenant_id, str) or not self.tenant_id:
            raise ValidationError("a search generation needs a tenant id")
        if isinstance(self.generation, bool) or not isinstance(self.generation, int) or self.generation < 1:
            raise ValidationError("a search generation number is an int >= 1")
        if not isinstance(self.index, str) or not self.index:
            raise ValidationError("a search generation needs its index name")
        if self.mode not in GENERATION_MODES:
            raise ValidationError(f"search generation mode must be one of {GENERATION_MODES}, not {self.mode!r}")
        if not isinstance(self.recorded_at, datetime) or self.recorded_at.tzinfo is None:
            raise ValidationError("recorded_at must be a timezone-aware datetime")
        if not isinstance(self.signature, bytes):
            raise ValidationError("signature must be bytes")

    def __repr__(self) -> str:
        return f"SearchGeneration({self.tenant_id} gen {self.generation} = {self.index}, {self.mode})"

    def _fields(self) -> dict[str, Any]:
        return {
            "format": GENERATION_FORMAT,
            "tenant_id": self.tenant_id,
            "generation": self.generation,
            "index": self.index,
            "mode": self.mode,
            "recorded_at": time_out(self.recorded_at),
            "signer_key_id": self.signer_key_id,
        }

    @classmethod
    def from_json(cls, data: bytes | str) -> SearchGeneration:
        """Parse a stored record; anything malformed is ``IntegrityError`` (an edited row)."""
        import json

        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.pop("format", None) != GENERATION_FORMAT:
                raise ValueError("unknown format")
            if set(obj) != {f.name for f in fields(cls)}:
                raise ValueError("unexpected or missing fields")
            return cls(
                tenant_id=obj["tenant_id"],
                generation=obj["generation"],
                index=obj["index"],
                mode=obj["mode"],
                recorded_at=time_in(obj["recorded_at"]),  # type: ignore[arg-type]
                signer_key_id=obj["signer_key_id"],
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, ValidationError, UnicodeDecodeError):
            raise IntegrityError("a stored search generation record is malformed (edited)") from None
