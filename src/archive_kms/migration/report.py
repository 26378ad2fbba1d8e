"""The run report: objects, bytes, throughput, verification result, quarantined and waived
objects, and time per step, built from what the state store recorded (so ``runs show`` gives the same report for a
run finished last week as the flow printed when it ended)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from archive_kms.errors import StateError
from archive_kms.migration.quarantine import report_section
from archive_kms.state.port import CopyStatus, Flow, LedgerRepo, MigrationRun, RunRepo, StepRecord, StepState


class RunLedger(RunRepo, LedgerRepo, Protocol):
    """The run records and the copy ledger: everything a report reads."""


class HasRunLedger(Protocol):
    """Anything with a state store that has them: the platform, or the CLI's state-only view."""

    @property
    def state(self) -> RunLedger: ...


def _seconds(step: StepRecord) -> float | None:
    if step.started_at is None or step.finished_at is None:
        return None
    return round((step.finished_at - step.started_at).total_seconds(), 3)


def progress(platform: HasRunLedger, run: MigrationRun) -> dict[str, Any]:
    summary = platform.state.manifest_summary(run.run_id)
    counts = platform.state.copy_counts(run.run_id) if summary else {}
    total = summary.entries if summary else 0
    copied = counts.get(CopyStatus.COPIED, 0) + counts.get(CopyStatus.VERIFIED, 0)
    done_steps = sum(s.state in (StepState.COMPLETED, StepState.SKIPPED) for s in run.steps)
    return {
        "steps_done": done_steps,
        "steps": len(run.steps),
        "objects": total,
        "copied": copied,
        "verified": counts.get(CopyStatus.VERIFIED, 0),
        "failed": counts.get(CopyStatus.FAILED, 0),
        "quarantined": counts.get(CopyStatus.QUARANTINED, 0),
    }


#: The report of a run of another kind than enable/remove: (platform, run, final) -> JSON.
ReportFn = Callable[[HasRunLedger, MigrationRun, bool], dict[str, Any]]
_REPORTS: dict[str, ReportFn] = {}


def register_report(flow: str, report: ReportFn) -> None:
    """Use ``report`` for runs of ``flow`` (rotate and erase register theirs where they are built)."""
    _REPORTS[flow] = report


def step_rows(run: MigrationRun) -> list[dict[str, Any]]:
    """Per step: state, attempts, seconds and error (every report has them)."""
    return [
        {"step": s.name, "state": s.state.value, "attempts": s.attempt, "seconds": _seconds(s), "error": s.error}
        for s in run.steps
    ]


def total_seconds(run: MigrationRun) -> float | None:
    """Seconds from the run's creation to its last step's end."""
    ends = [s.finished_at for s in run.steps if s.finished_at is not None]
    return round((max(ends) - run.created_at).total_seconds(), 3) if ends else None


def build_report(platform: HasRunLedger, run_id: str, *, final: bool = False) -> dict[str, Any]:
    run = platform.state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    other = _REPORTS.get(run.flow.value)
    if other is not None:
        return other(platform, run, final)
    params = run.params
    summary = platform.state.manifest_summary(run_id)
    steps = []
    for s in run.steps:
        steps.append(
            {"step": s.name, "state": s.state.value, "attempts": s.attempt, "seconds": _seconds(s), "error": s.error}
        )
    copy_result = _result(run, "copy")
    verify_result = _result(run, "verify")
    index_result = _result(run, "build_index")
    resume_result = _result(run, "resume")
    bind_result = _result(run, "bind_key")
    started = run.created_at
    ends = [s.finished_at for s in run.steps if s.finished_at is not None]
    total = round((max(ends) - started).total_seconds(), 3) if ends else None
    copy_seconds = (_seconds(run.step("copy")) if "copy" in _names(run) else None) or copy_result.get("seconds")
    plaintext = copy_result.get("bytes_plaintext")
    report = {
        "run_id": run.run_id,
        "tenant": run.tenant_id,
        "flow": run.flow.value,
        "mode": run.mode,
        "state": "completed" if final else run.state.value,
        "source": _uri(params.get("source")),
        "destination": _uri(params.get("destination")),
        "key_ref": params.get("key_ref"),
        "objects": summary.entries if summary else 0,
        "bytes": summary.total_bytes if summary else 0,
        "bytes_plaintext_copied": plaintext,
        "copy_seconds": copy_seconds,
        "throughput_mb_s": round(plaintext / 1e6 / copy_seconds, 2) if plaintext and copy_seconds else None,
        "verification": verify_result.get("result", "pending"),
        "lost": verify_result.get("lost"),
        "duplicated": verify_result.get("duplicated"),
        "reconciliation": _reconciliation(verify_result, index_result),
        "index": index_result.get("index"),
        "index_documents": index_result.get("documents"),
        "deferred_replayed": resume_result.get("replayed"),
        # key hygiene: L2/L3 replaced under the new key (enable), source-era DEKs crypto-erased
        "keys_rekeyed": bool(bind_result.get("rekeyed")),
        "old_deks_erased": resume_result.get("old_deks_erased"),
        "total_seconds": total,
        "progress": progress(platform, run),
        # quarantined / waived counts, the first objects with reason and waiver, and where
        # their source objects are kept (ADR 0006)
        **report_section(platform.state, run_id, _uri(params.get("source"))),
        "steps": steps,
    }
    if run.flow in (Flow.REVOKE, Flow.RESTORE):  # no copy: what each step found (the receipt too)
        report["results"] = {st.name: dict(st.result or {}) for st in run.steps}
    return report


def _names(run: MigrationRun) -> set[str]:
    return {s.name for s in run.steps}


def _result(run: MigrationRun, step: str) -> Mapping[str, Any]:
    """A step's result; {} for a step this run's flow does not have (revoke, restore)."""
    return (run.step(step).result or {}) if step in _names(run) else {}


def _reconciliation(verify_result: Mapping[str, Any], index_result: Mapping[str, Any]) -> str | None:
    """I4 in words, waived objects included: what verify and build_index checked."""
    text = verify_result.get("reconciled")
    if text and "expected" in index_result:
        text += (
            f"; index documents {index_result['documents']} = manifest records - "
            f"{index_result.get('waived_records', 0)} waived"
        )
    return text


def _uri(loc: Any) -> str | None:
    if not loc:
        return None
    from archive_kms.storage import Location

    return Location.from_dict(loc).uri


__all__ = ["ReportFn", "build_report", "progress", "register_report", "step_rows", "total_seconds"]
