"""What the keychain's public methods return (besides keys and erasure records)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.keychain import KeyRecordState, TenantHead

__all__ = ["DataKey", "DekInfo", "ProviderCallCounts", "RekeyReport", "TenantKeyStatus", "status_of"]


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


def status_of(head: TenantHead) -> TenantKeyStatus:
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
