"""Poison objects: quarantine, audited waivers, and what the later steps do with them
(faults D9, A11, A12, F3; ADR 0006).

A source object that does not authenticate after ``SOURCE_READ_ATTEMPTS`` reads
(tampered or truncated ciphertext, a malformed header, or an envelope bound to another
tenant, workspace or object) is **quarantined**: its copy-ledger row gets the status
``quarantined`` and, in its ``error`` column, a small JSON document with the reason, the
kind (``corrupt`` or ``foreign``), the number of reads and the time. It holds no plaintext
and no key material: the reasons are the envelope's own messages.

Only failures of the *source* qualify. A destination copy that does not authenticate is
replaced from the source (verify marks it failed, the next copy rewrites it). A store or
KMS error that a retry may cure, and an unusable key, leave ``failed`` rows and fail the
step, resumably, as before.

Cutover is blocked while any quarantined object is not waived (``require_resolved``).
``engine.waive`` records a waiver per object: first an ``object.waive`` audit record
(actor, object, reason), then the waiver in the ledger row. Verify refuses a waived row
that has no audit record (I6). A waived object is left out of the destination, the new
index and the reconciliation (manifest - waived == verified == destination listing), and
``cleanup_source`` keeps its source object where it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from archive_kms.errors import IntegrityError
from archive_kms.state.port import CopyRecord, CopyStatus, LedgerRepo

#: Reads of a source object that must all fail authentication before it is quarantined;
#: each read starts from the first byte (a read cut short by the network is resumed or
#: fails as transient in the store adapter, it does not come here).
SOURCE_READ_ATTEMPTS = 3
MAX_WAIVER_REASON_CHARS = 1000
#: Quarantined objects listed by name in a report (the counts are always exact).
REPORT_LIMIT = 100
WAIVE_ACTION = "object.waive"

CORRUPT = "corrupt"  # does not authenticate: tampered, truncated, malformed, another object's
FOREIGN = "foreign"  # a well-formed envelope bound to another tenant or workspace (faults F3)


class PoisonSourceError(IntegrityError):
    """The *source* object does not authenticate, read after read: copying it cannot
    succeed until someone fixes or removes it."""

    def __init__(self, message: str, *, resource: str | None = None, kind: str = CORRUPT, attempts: int = 1) -> None:
        super().__init__(message, resource=resource)
        self.kind, self.attempts = kind, attempts


class ObjectsQuarantinedError(IntegrityError):
    """Cutover is blocked: quarantined objects are not waived."""


def kind_of(exc: BaseException) -> str:
    text = str(exc)
    return FOREIGN if "bound to another tenant" in text or "bound to another workspace" in text else CORRUPT


def display_name(name: bytes) -> str:
    """An object name for people and for ``runs waive --object`` (UTF-8; undecodable
    bytes as ``\\xNN``, for which ``--object-hex`` takes the hex form)."""
    return name.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Waiver:
    actor: str
    reason: str
    at: str  # ISO 8601, UTC
    audit_seq: int  # the object.waive audit record that authorises it


@dataclass(frozen=True)
class Quarantine:
    reason: str  # "<ErrorType>: <message>" of the last read
    kind: str = CORRUPT
    attempts: int = 0
    at: str = ""
    waiver: Waiver | None = None

    @property
    def waived(self) -> bool:
        return self.waiver is not None

    def to_error(self) -> str:
        """The ledger row's ``error`` column."""
        return json.dumps({"quarantine": asdict(self)}, sort_keys=True)

    @classmethod
    def from_error(cls, error: str | None) -> Quarantine:
        """Read what ``to_error`` wrote; a plain message (not ours) becomes its reason."""
        try:
            data = json.loads(error or "")["quarantine"]
            waiver = data.get("waiver")
            return cls(
                reason=str(data.get("reason", "")),
                kind=str(data.get("kind", CORRUPT)),
                attempts=int(data.get("attempts", 0)),
                at=str(data.get("at", "")),
                waiver=Waiver(**waiver) if waiver else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls(reason=error or "")

    def with_waiver(self, waiver: Waiver | None) -> Quarantine:
        return Quarantine(self.reason, self.kind, self.attempts, self.at, waiver)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def quarantine_record(name: bytes, exc: PoisonSourceError, *, waiver: Waiver | None = None) -> CopyRecord:
    q = Quarantine(f"{type(exc).__name__}: {exc}"[:500], exc.kind, exc.attempts, now_iso(), waiver)
    return CopyRecord(name, CopyStatus.QUARANTINED, error=q.to_error())


def quarantined(state: LedgerRepo, run_id: str, *, shard: int | None = None) -> Iterator[tuple[bytes, Quarantine]]:
    """(name, quarantine) of every quarantined ledger row, ordered by name."""
    for rec in state.iter_copies(run_id, status=CopyStatus.QUARANTINED, shard=shard):
        yield rec.name, Quarantine.from_error(rec.error)


@dataclass
class QuarantineSummary:
    waived: set[bytes] = field(default_factory=set)
    unwaived: list[bytes] = field(default_factory=list)  # ordered by name

    @property
    def total(self) -> int:
        return len(self.waived) + len(self.unwaived)

    @property
    def names(self) -> set[bytes]:
        return self.waived | set(self.unwaived)


def summarize(state: Any, run_id: str) -> QuarantineSummary:
    out = QuarantineSummary()
    if not state.copy_counts(run_id).get(CopyStatus.QUARANTINED):
        return out  # the common case: one GROUP BY, no scan
    for name, q in quarantined(state, run_id):
        if q.waived:
            out.waived.add(name)
        else:
            out.unwaived.append(name)
    return out


def blocked_message(run_id: str, summary: QuarantineSummary) -> str:
    first = ", ".join(repr(display_name(n)[:120]) for n in summary.unwaived[:3])
    waived = f" ({len(summary.waived)} more already waived)" if summary.waived else ""
    return (
        f"{len(summary.unwaived)} object(s) quarantined{waived}: their source does not authenticate (corrupt or "
        f"another tenant's; see `archive-kms runs show {run_id}`). First: {first}. Run `archive-kms runs waive "
        f"{run_id} --object NAME --reason ...` (or --all) and then `archive-kms runs resume {run_id}`, or fix the "
        f"source and `archive-kms runs rerun {run_id} --from copy`"
    )


def require_resolved(state: Any, run_id: str) -> QuarantineSummary:
    """The run's quarantine; ``ObjectsQuarantinedError`` if any object is not waived."""
    summary = summarize(state, run_id)
    if summary.unwaived:
        raise ObjectsQuarantinedError(blocked_message(run_id, summary), resource=f"run:{run_id}")
    return summary


def waiver_audit_details(name: bytes, q: Quarantine, reason: str) -> dict[str, Any]:
    return {
        "object": display_name(name),
        "object_hex": name.hex(),
        "reason": reason,
        "kind": q.kind,
        "quarantine_reason": q.reason[:300],
    }


def check_waivers_audited(state: Any, tenant_id: str, run_id: str, waived: Iterable[bytes]) -> None:
    """Every waived ledger row has its ``object.waive`` audit record (I6: a waiver with no
    record did not happen). ``IntegrityError`` naming the first rows without one."""
    want = {n.hex(): n for n in waived}
    if not want:
        return
    for rec in state.iter_audit(tenant_id=tenant_id):
        if rec.action == WAIVE_ACTION and rec.run_id == run_id:
            want.pop(str(rec.details.get("object_hex", "")), None)
            if not want:
                return
    first = ", ".join(repr(display_name(n)[:120]) for n in sorted(want.values())[:3])
    raise IntegrityError(
        f"{len(want)} waived object(s) of run {run_id} have no {WAIVE_ACTION} audit record "
        f"(first: {first}): the ledger was changed outside `archive-kms runs waive`; waive them "
        "again, or fix the source and rerun from copy",
        resource=f"run:{run_id}",
    )


def report_section(state: LedgerRepo, run_id: str, source_uri: str | None) -> dict[str, Any]:
    """What the run report says about quarantine: counts, the first objects by name with
    their reason and waiver, and where their source objects are kept."""
    objects: list[dict[str, Any]] = []
    total = waived = 0
    if state.copy_counts(run_id).get(CopyStatus.QUARANTINED):
        for name, q in quarantined(state, run_id):
            total += 1
            waived += q.waived
            if len(objects) < REPORT_LIMIT:
                w = q.waiver
                objects.append(
                    {
                        "object": display_name(name),
                        "object_hex": name.hex(),
                        "kind": q.kind,
                        "reason": q.reason,
                        "attempts": q.attempts,
                        "quarantined_at": q.at,
                        "waived": w is not None,
                        "waived_by": w.actor if w else None,
                        "waiver_reason": w.reason if w else None,
                        "waived_at": w.at if w else None,
                        "source": source_uri,
                    }
                )
    return {
        "quarantined": total,
        "waived": waived,
        "quarantine": objects,
        "quarantine_kept_at": source_uri if total else None,
    }


__all__ = [
    "CORRUPT",
    "FOREIGN",
    "MAX_WAIVER_REASON_CHARS",
    "SOURCE_READ_ATTEMPTS",
    "WAIVE_ACTION",
    "ObjectsQuarantinedError",
    "PoisonSourceError",
    "Quarantine",
    "QuarantineSummary",
    "Waiver",
    "blocked_message",
    "check_waivers_audited",
    "display_name",
    "kind_of",
    "now_iso",
    "quarantine_record",
    "quarantined",
    "report_section",
    "require_resolved",
    "summarize",
    "waiver_audit_details",
]
