"""Parking a queued archive job whose seal no longer opens (review finding F2): without it,
one refused seal keeps the gate draining and the migration's ``resume`` step failing
forever. Runs the real engine on the in-memory platform."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_migration_engine import TENANT, archived_platform, enable_plan, start, wrap_step

from archive_kms.errors import IntegrityError, StateError
from archive_kms.migration import execute, resume
from archive_kms.operations.archive import JobSpec, park_deferred_job, replay_deferred, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import DeferredState, GateState, JobState, RunState

SECRET = "Quokkafjord-merger-7731"  # record content: never in the audit log
RECORDS = ({"object_type": "Account", "record_id": "0013000000AAA", "workspace_id": "ws0", "fields": {"Name": SECRET}},)
REASON = "seal fails authentication (bit rot); the customer resends the batch as j-inline-2"


def flip_last_byte_of_the_seal(p: Platform, job_id: str) -> bytes:
    """One flipped bit in the stored seal, as bit rot or an edit of the row would leave it."""
    queued = p.state._deferred[job_id]  # type: ignore[attr-defined]
    flipped = queued.sealed[:-1] + bytes([queued.sealed[-1] ^ 1])
    p.state._deferred[job_id] = replace(queued, sealed=flipped)  # type: ignore[attr-defined]
    return flipped


def test_parking_a_refused_job_lets_the_blocked_resume_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    p = archived_platform()
    plan = enable_plan(p)
    stored: dict[str, bytes] = {}

    def bind_with_a_job(real, ctx):
        outcome = submit_job(p.state, JobSpec("j-inline", TENANT, "inline", RECORDS, {}), p.open_archive)
        assert outcome.decision == "deferred"
        stored["seal"] = flip_last_byte_of_the_seal(p, "j-inline")
        return real(ctx)

    wrap_step(monkeypatch, "bind_key", bind_with_a_job)
    run_id = start(p, plan)
    first = execute(p, run_id, actor="test")
    assert first.state == "failed" and "deferred job j-inline" in (first.error or "")
    again = resume(p, run_id, actor="support")
    assert again.state == "failed" and "j-inline" in (again.error or "")
    assert "archive-kms jobs park" in (again.error or "")  # the error says what support can do
    assert p.state.gate(TENANT).state is GateState.DRAINING and p.state.gate(TENANT).pending == 1

    parked = park_deferred_job(p.state, TENANT, "j-inline", reason=REASON, actor="support:alice")
    assert parked.state is DeferredState.REPLAYED and parked.parked is not None
    assert (parked.parked["reason"], parked.parked["actor"]) == (REASON, "support:alice")
    assert p.state.gate(TENANT).state is GateState.OPEN  # it was the last one queued

    done = resume(p, run_id, actor="support")
    assert done.state == "completed", done
    assert p.state.get_run(run_id).state is RunState.COMPLETED  # type: ignore[union-attr]
    [kept] = p.state.list_deferred(TENANT, include_replayed=True)
    assert kept.sealed == stored["seal"]  # kept for forensics, byte for byte
    assert p.state.get_job("j-inline").state is JobState.FAILED  # type: ignore[union-attr]
    [audit] = [r for r in p.state.iter_audit(tenant_id=TENANT) if r.action == "job.parked"]
    assert dict(audit.details) == {"job_id": "j-inline", "reason": REASON, "actor": "support:alice"}
    assert audit.actor == "support:alice" and SECRET not in json.dumps(dict(audit.details))
    with pytest.raises(StateError, match="already parked by support:alice"):
        park_deferred_job(p.state, TENANT, "j-inline", reason=REASON, actor="support:bob")
    assert sum(r.action == "job.parked" for r in p.state.iter_audit(tenant_id=TENANT)) == 1


def test_a_seal_whose_key_was_crypto_erased_is_refused_then_parked() -> None:
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    p.state.pause(TENANT, "run-1")
    assert (
        submit_job(p.state, JobSpec("j-erased", TENANT, "inline", RECORDS, {}), p.open_archive).decision == "deferred"
    )
    p.open_archive(TENANT).keychain.erase_workspace(TENANT, "ws0", reason="workspace deleted")
    with pytest.raises(IntegrityError, match="j-erased .*sealed content was refused .*KeyDestroyedError"):
        replay_deferred(p.state, TENANT, "run-1", p.open_archive)
    assert p.state.gate(TENANT).state is GateState.DRAINING
    park_deferred_job(p.state, TENANT, "j-erased", reason="its workspace was erased", actor="support")
    assert replay_deferred(p.state, TENANT, "run-1", p.open_archive) == []
    assert p.state.gate(TENANT).state is GateState.OPEN
