"""The StateStore contract, run against every backend: memory, SQLite, PostgreSQL.

Fixtures come from tests/state_fixtures.py (``state_store``, ``state_clock``,
``audit_tamper``, ``open_state_store``). Tests that need raw SQL (append-only triggers)
are parametrised over the SQL backends only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from state_fixtures import SQL_BACKENDS, MemoryAuditTamper, SqlAuditTamper

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer
from archive_kms.errors import (
    ConfigurationError,
    FencedError,
    LeaseHeldError,
    StateError,
    ValidationError,
    VersionConflictError,
)
from archive_kms.state import audit as chain
from archive_kms.state.port import (
    AuditEvent,
    CopyRecord,
    CopyStatus,
    Decision,
    DeferredJob,
    DeferredState,
    Flow,
    GateState,
    JobState,
    KeyMode,
    ManifestEntry,
    RunState,
    StateStore,
    StepState,
    TenantRecord,
)
from archive_kms.state.sql import SqlStateStore

# Storage locations are opaque JSON to the store (storage.Location.to_dict() in production).
SHARED = {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "archive-kms-shared", "prefix": "tenants/acme/"}
DEDICATED = {
    "tenant": "acme",
    "kind": "dedicated",
    "cloud": "s3",
    "bucket": "archive-kms-tenant-acme",
    "prefix": "",
    "sse_kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k",
}
STEPS = ["preflight", "pause", "manifest", "copy", "verify", "cutover", "resume"]


def tenant(store: StateStore, tid: str = "acme") -> TenantRecord:
    return store.create_tenant(
        TenantRecord(tid, KeyMode.MANAGED, SHARED, index_alias=f"archive-{tid}", index_generation=1)
    )


def in_threads(n: int, fn: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run ``fn(i)`` in ``n`` threads released together; ("ok", value) or ("err", exception)."""
    barrier = threading.Barrier(n)
    results: list[tuple[str, Any]] = [("err", RuntimeError("did not finish"))] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ("ok", fn(i))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = ("err", exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_backends_satisfy_the_protocol(state_store: Any) -> None:
    assert isinstance(state_store, StateStore)


# --- tenants ------------------------------------------------------------------------------


def test_tenant_create_get_list(state_store: StateStore) -> None:
    t = tenant(state_store)
    assert t.version == 1 and t.created_at is not None and t.created_at.tzinfo is not None
    assert state_store.get_tenant("acme") == t
    assert state_store.get_tenant("nobody") is None
    tenant(state_store, "beta")
    assert [x.tenant_id for x in state_store.list_tenants()] == ["acme", "beta"]
    with pytest.raises(StateError, match="already exists"):
        tenant(state_store)


@pytest.mark.parametrize("bad", ["Acme", "a", "../etc", "acme--1", "аcme", "x" * 40])
def test_tenant_ids_are_validated(state_store: StateStore, bad: str) -> None:
    with pytest.raises(ValidationError):
        state_store.create_tenant(TenantRecord(bad, KeyMode.MANAGED, SHARED))


def test_tenant_location_is_kept_verbatim_and_inputs_checked(state_store: StateStore) -> None:
    t = tenant(state_store)
    assert t.location == SHARED and state_store.get_tenant("acme").location == SHARED  # type: ignore[union-attr]
    t2 = state_store.update_tenant(replace(t, location=DEDICATED))
    assert state_store.get_tenant("acme").location == DEDICATED == t2.location  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="key mode"):
        state_store.create_tenant(TenantRecord("beta", "hsm", SHARED))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="location"):
        state_store.create_tenant(TenantRecord("beta", KeyMode.BYOK, {"bad": math.nan}))
    with pytest.raises(ValidationError, match="flow"):
        state_store.start_run("acme", "migrate", mode="byok", steps=STEPS)  # type: ignore[arg-type]
    assert state_store.get_tenant("beta") is None


def test_tenant_update_is_optimistic(state_store: StateStore) -> None:
    t = tenant(state_store)
    t2 = state_store.update_tenant(
        replace(t, key_mode=KeyMode.BYOK, key_ref="aws-kms://arn:x", location=DEDICATED, index_generation=2)
    )
    assert (t2.version, t2.key_mode, t2.location, t2.index_generation) == (2, KeyMode.BYOK, DEDICATED, 2)
    assert t2.created_at == t.created_at and t2.updated_at > t.updated_at  # type: ignore[operator]
    with pytest.raises(VersionConflictError, match="version 2") as info:
        state_store.update_tenant(replace(t, revoked=True))  # based on version 1
    assert info.value.retryable
    assert state_store.get_tenant("acme") == t2
    with pytest.raises(StateError, match="no tenant"):
        state_store.update_tenant(replace(t, tenant_id="ghost"))


def test_concurrent_tenant_updates_exactly_one_wins(state_store: StateStore) -> None:
    t = tenant(state_store)
    results = in_threads(6, lambda i: state_store.update_tenant(replace(t, index_generation=10 + i)))
    wins = [r for kind, r in results if kind == "ok"]
    assert len(wins) == 1, results
    assert all(isinstance(r, VersionConflictError) for kind, r in results if kind == "err")
    assert state_store.get_tenant("acme").version == 2  # type: ignore[union-attr]


# --- gate, deferred jobs, job ledger ------------------------------------------------------


def test_jobs_run_while_open_and_are_deferred_while_paused(state_store: StateStore) -> None:
    tenant(state_store)
    assert state_store.gate("acme").state is GateState.OPEN
    a = state_store.admit_job("acme", "job-1", {"records": 3})
    assert (a.decision, a.attempt) == (Decision.RUN, 1)
    status = state_store.pause("acme", "run-1")
    assert (status.state, status.paused_by_run) == (GateState.PAUSED, "run-1")
    assert state_store.admit_job("acme", "job-2", {"records": 5}).decision is Decision.DEFERRED
    assert [j.job_id for j in state_store.running_jobs("acme")] == ["job-1"]  # admitted before the pause
    assert state_store.gate("acme").pending == 1
    with pytest.raises(StateError, match="unknown|no tenant"):
        state_store.admit_job("ghost", "job-3", {})


def test_pause_is_owned_by_one_run(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    assert state_store.pause("acme", "run-1").state is GateState.PAUSED  # idempotent
    with pytest.raises(StateError, match="run-1"):
        state_store.pause("acme", "run-2")
    with pytest.raises(StateError, match="run-1"):
        state_store.resume("acme", "run-2")


def test_deferred_jobs_replay_exactly_once_in_order(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    for i in range(3):
        assert state_store.admit_job("acme", f"job-{i}", {"n": i}).decision is Decision.DEFERRED
    jobs = state_store.resume_and_drain("acme", "run-1")
    assert [(j.job_id, j.payload, j.state) for j in jobs] == [
        (f"job-{i}", {"n": i}, DeferredState.CLAIMED) for i in range(3)
    ]
    assert state_store.gate("acme").state is GateState.DRAINING
    for j in jobs:
        adm = state_store.start_job("acme", j.job_id)
        assert (adm.decision, adm.attempt) == (Decision.RUN, 1)
        done = state_store.finish_job(j.job_id, adm.attempt, object_count=7)  # type: ignore[arg-type]
        assert (done.state, done.object_count) == (JobState.COMPLETED, 7)
    assert state_store.gate("acme").state is GateState.OPEN  # the last acknowledgement opened it
    assert state_store.resume_and_drain("acme", "run-1") == []  # a second drain finds nothing
    assert state_store.claim_deferred("acme") == []
    assert all(
        j.state is DeferredState.REPLAYED and j.replayed_at is not None
        for j in state_store.list_deferred("acme", include_replayed=True)
    )
    for i in range(3):  # the same jobs sent again archive nothing
        assert state_store.admit_job("acme", f"job-{i}", {"n": i}).decision is Decision.DUPLICATE


def test_a_job_id_is_recorded_once(state_store: StateStore) -> None:
    tenant(state_store)
    tenant(state_store, "beta")
    job = DeferredJob("job-x", "acme", {"batch": [1, 2]})
    assert state_store.defer(job) is True
    assert state_store.defer(job) is False
    assert len(state_store.list_deferred("acme")) == 1
    with pytest.raises(StateError, match="already used"):
        state_store.defer(replace(job, payload={"batch": [9]}))
    with pytest.raises(StateError, match="already used"):
        state_store.defer(replace(job, tenant_id="beta"))
    # Admissions: the ledger's unique job id makes a resent job a duplicate.
    assert state_store.admit_job("acme", "job-y", {}).decision is Decision.RUN
    assert state_store.admit_job("acme", "job-y", {}).decision is Decision.DUPLICATE  # still running
    state_store.finish_job("job-y", 1, object_count=1)
    assert state_store.admit_job("acme", "job-y", {}).decision is Decision.DUPLICATE  # completed
    with pytest.raises(StateError):
        state_store.admit_job("beta", "job-y", {})
    results = in_threads(6, lambda i: state_store.admit_job("acme", "job-z", {}).decision)
    assert sorted(r for _, r in results) == sorted([Decision.RUN] + [Decision.DUPLICATE] * 5), results


def test_failed_job_is_retried_with_a_new_attempt(state_store: StateStore) -> None:
    tenant(state_store)
    assert state_store.admit_job("acme", "job-1", {}).attempt == 1
    state_store.finish_job("job-1", 1, error="S3 503")
    adm = state_store.admit_job("acme", "job-1", {})
    assert (adm.decision, adm.attempt) == (Decision.RUN, 2)
    with pytest.raises(FencedError):
        state_store.finish_job("job-1", 1, object_count=3)  # the old attempt cannot finish it
    assert state_store.finish_job("job-1", 2, object_count=3).state is JobState.COMPLETED
    assert state_store.finish_job("job-1", 2, object_count=3).state is JobState.COMPLETED  # retried ack


def test_crash_between_replay_and_acknowledgement(state_store: StateStore, state_clock: Any) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    state_store.admit_job("acme", "job-1", {"n": 1})
    [job] = state_store.resume_and_drain("acme", "run-1")
    first = state_store.start_job("acme", job.job_id)
    assert first.decision is Decision.RUN
    # ... the replayer dies here, before finish_job.
    assert state_store.claim_deferred("acme") == []  # the claim is still fresh
    assert state_store.gate("acme").state is GateState.DRAINING  # and the gate stays closed to new jobs
    assert state_store.admit_job("acme", "job-2", {}).decision is Decision.DEFERRED
    state_clock.advance(timedelta(minutes=20))  # past the claim expiry and the stale-job horizon
    again = state_store.claim_deferred("acme")
    assert [j.job_id for j in again] == ["job-1", "job-2"]
    second = state_store.start_job("acme", "job-1")
    assert (second.decision, second.attempt) == (Decision.RUN, 2)
    state_store.finish_job("job-1", 2, object_count=1)
    with pytest.raises(FencedError):
        state_store.finish_job("job-1", 1, object_count=1)  # the zombie wakes up: refused
    assert state_store.start_job("acme", "job-2").decision is Decision.RUN
    state_store.finish_job("job-2", 1)
    assert state_store.gate("acme").state is GateState.OPEN
    assert state_store.claim_deferred("acme") == []


# --- job leases, fencing and write journals (ADR 0020) ------------------------------------


def test_a_job_lease_is_renewed_and_lost_when_it_expires(state_store: StateStore, state_clock: Any) -> None:
    from archive_kms.state.port import DEFAULT_JOB_LEASE_TTL

    tenant(state_store)
    adm = state_store.admit_job("acme", "job-1", {})
    first = state_store.get_job("job-1").lease_expires_at  # type: ignore[union-attr]
    assert first is not None
    state_clock.advance(DEFAULT_JOB_LEASE_TTL / 2)
    renewed = state_store.renew_job_lease("job-1", adm.attempt)  # type: ignore[arg-type]
    assert renewed > first and state_store.get_job("job-1").lease_expires_at == renewed  # type: ignore[union-attr]
    state_store.record_job_writes("job-1", adm.attempt, [b"records/a", b"records/b", b"records/a"])  # type: ignore[arg-type]
    assert state_store.job_writes("job-1") == [b"records/a", b"records/b"]
    assert state_store.admit_job("acme", "job-1", {}).decision is Decision.DUPLICATE  # alive: not taken over
    state_clock.advance(DEFAULT_JOB_LEASE_TTL + timedelta(seconds=1))
    with pytest.raises(FencedError, match="lease expired"):
        state_store.renew_job_lease("job-1", adm.attempt)  # type: ignore[arg-type]
    with pytest.raises(FencedError, match="lease expired"):
        state_store.record_job_writes("job-1", adm.attempt, [b"records/c"])  # type: ignore[arg-type]
    # a retry takes the expired job over: the old attempt is fenced for good
    again = state_store.admit_job("acme", "job-1", {})
    assert (again.decision, again.attempt) == (Decision.RUN, 2)
    with pytest.raises(FencedError, match="no longer current"):
        state_store.renew_job_lease("job-1", 1)
    with pytest.raises(FencedError):
        state_store.finish_job("job-1", 1, object_count=1)
    state_store.record_job_writes("job-1", 2, [b"records/c"])
    assert state_store.finish_job("job-1", 2, object_count=3).state is JobState.COMPLETED
    assert state_store.job_writes("job-1") == []  # a completed job keeps what it wrote


def test_fencing_expired_jobs_and_their_rollback(state_store: StateStore, state_clock: Any) -> None:
    from archive_kms.state.port import DEFAULT_JOB_LEASE_TTL

    tenant(state_store)
    stuck = state_store.admit_job("acme", "stuck", {})
    state_store.record_job_writes("stuck", stuck.attempt, [b"records/s"])  # type: ignore[arg-type]
    alive = state_store.admit_job("acme", "alive", {})
    assert state_store.fence_expired_jobs("acme", by="run r1") == []  # nothing expired yet
    state_clock.advance(DEFAULT_JOB_LEASE_TTL + timedelta(seconds=1))

    fenced = {j.job_id: j for j in state_store.fence_expired_jobs("acme", by="run r1")}
    assert set(fenced) == {"stuck", "alive"}
    assert fenced["stuck"].state is JobState.FAILED and fenced["stuck"].error.startswith("superseded: lease expired")
    assert "fenced by run r1" in fenced["stuck"].error
    assert state_store.running_jobs("acme") == []
    with pytest.raises(FencedError):
        state_store.renew_job_lease("stuck", stuck.attempt)  # type: ignore[arg-type]
    with pytest.raises(FencedError):
        state_store.finish_job("stuck", stuck.attempt, object_count=1)  # type: ignore[arg-type]
    # the fenced job with a journal waits for its rollback; a retry is refused meanwhile
    assert [j.job_id for j in state_store.jobs_to_roll_back("acme")] == ["stuck"]
    with pytest.raises(StateError, match="not rolled back yet"):
        state_store.admit_job("acme", "stuck", {})
    state_store.clear_job_writes("stuck")
    assert state_store.jobs_to_roll_back("acme") == []
    assert state_store.admit_job("acme", "stuck", {}).attempt == 2
    del alive


def test_support_abandons_a_running_job(state_store: StateStore, state_clock: Any) -> None:
    tenant(state_store)
    tenant(state_store, "beta")
    adm = state_store.admit_job("acme", "job-1", {})
    state_store.record_job_writes("job-1", adm.attempt, [b"records/x"])  # type: ignore[arg-type]
    with pytest.raises(StateError, match="has no archive job"):
        state_store.abandon_job("beta", "job-1", reason="x", actor="support:a")  # another tenant's
    with pytest.raises(ValidationError):
        state_store.abandon_job("acme", "job-1", reason=" ", actor="support:a")
    held = state_store.get_job("job-1").lease_expires_at  # type: ignore[union-attr]
    gone = state_store.abandon_job("acme", "job-1", reason="writer hung", actor="support:a")
    assert gone.state is JobState.FAILED and gone.error == "abandoned: by support:a: writer hung"
    assert gone.lease_expires_at == held  # its writer may write until then
    with pytest.raises(FencedError):
        state_store.renew_job_lease("job-1", adm.attempt)  # type: ignore[arg-type]
    with pytest.raises(StateError, match="not running"):
        state_store.abandon_job("acme", "job-1", reason="again", actor="support:a")
    assert state_store.jobs_to_roll_back("acme") == []  # not before the writer's lease ran out
    state_clock.advance(held - state_clock() + timedelta(seconds=1))
    assert [j.job_id for j in state_store.jobs_to_roll_back("acme")] == ["job-1"]


def test_replaying_an_already_archived_job_archives_once(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.admit_job("acme", "job-1", {})
    state_store.finish_job("job-1", 1, object_count=4)
    state_store.pause("acme", "run-1")
    state_store.defer(DeferredJob("job-1", "acme", {}))  # e.g. resent through the deferral path
    [job] = state_store.resume_and_drain("acme", "run-1")
    assert state_store.start_job("acme", job.job_id).decision is Decision.DUPLICATE
    assert state_store.list_deferred("acme") == []  # marked replayed with the ledger check
    assert state_store.claim_deferred("acme") == []
    assert state_store.gate("acme").state is GateState.OPEN
    assert state_store.get_job("job-1").attempt == 1  # type: ignore[union-attr]


def test_new_jobs_queue_behind_the_drain(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    for name in ("a", "b"):
        state_store.admit_job("acme", name, {})
    assert [j.job_id for j in state_store.resume_and_drain("acme", "run-1", limit=1)] == ["a"]
    assert state_store.admit_job("acme", "c", {}).decision is Decision.DEFERRED  # FIFO: behind b
    assert [j.job_id for j in state_store.claim_deferred("acme")] == ["b", "c"]
    for name in ("a", "b", "c"):
        state_store.finish_job(name, state_store.start_job("acme", name).attempt)  # type: ignore[arg-type]
    assert state_store.gate("acme").state is GateState.OPEN
    assert state_store.admit_job("acme", "d", {}).decision is Decision.RUN


def test_replay_stops_when_paused_again(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    state_store.admit_job("acme", "a", {})
    state_store.resume_and_drain("acme", "run-1")
    state_store.pause("acme", "run-2")
    assert state_store.claim_deferred("acme") == []
    with pytest.raises(StateError, match="paused"):
        state_store.start_job("acme", "a")
    assert state_store.gate("acme").pending == 1


def test_no_job_starts_after_pause_commits(state_store: StateStore) -> None:
    """Writers admit jobs while a run pauses: every job that ran was admitted before the
    pause (so ``running_jobs`` right after the pause lists all of them)."""
    tenant(state_store)
    stop = threading.Event()
    outcomes: list[tuple[str, Decision]] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            job_id = f"w{w}-{i}"
            d = state_store.admit_job("acme", job_id, {}).decision
            with lock:
                outcomes.append((job_id, d))
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    state_store.pause("acme", "run-1")
    running_at_pause = {j.job_id for j in state_store.running_jobs("acme")}
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    ran = {j for j, d in outcomes if d is Decision.RUN}
    deferred = {j for j, d in outcomes if d is Decision.DEFERRED}
    assert ran and deferred, (len(ran), len(deferred))
    assert ran == running_at_pause
    assert deferred == {j.job_id for j in state_store.list_deferred("acme")}


# --- deferred content at rest: sealed while queued, purged once replayed -------------------
#
# The store keeps a deferred job's clear ``payload`` (metadata) and its ``sealed`` content
# apart: the seal is never compared, and goes in the transaction that marks the job
# replayed. The tests below first hold the store to that with opaque bytes, then run the
# archive-job writer (operations.archive) on each backend with a real keychain and read
# the rows back raw, as someone with database access would.


def test_sealed_content_is_kept_until_the_job_is_replayed(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    meta = {"kind": "inline", "digest": "d-1"}
    assert state_store.admit_job("acme", "job-1", meta, sealed=b"\x00opaque-1").decision is Decision.DEFERRED
    assert state_store.defer(DeferredJob("job-2", "acme", {"kind": "inline", "digest": "d-2"}, sealed=b"opaque-2"))
    [queued1, queued2] = state_store.list_deferred("acme")
    assert (queued1.payload, queued1.sealed, queued2.sealed) == (meta, b"\x00opaque-1", b"opaque-2")
    jobs = state_store.resume_and_drain("acme", "run-1")
    assert [j.sealed for j in jobs] == [b"\x00opaque-1", b"opaque-2"]  # the replayer gets the seal
    first = state_store.start_job("acme", "job-1")
    state_store.finish_job("job-1", first.attempt, error="S3 503")  # type: ignore[arg-type]
    assert state_store.list_deferred("acme")[0].sealed == b"\x00opaque-1"  # failed: kept for the retry
    state_store.finish_job("job-2", state_store.start_job("acme", "job-2").attempt)  # type: ignore[arg-type]
    again = state_store.claim_deferred("acme", reclaim_after=timedelta(0))
    assert [(j.job_id, j.sealed) for j in again] == [("job-1", b"\x00opaque-1")]
    state_store.finish_job("job-1", state_store.start_job("acme", "job-1").attempt)  # type: ignore[arg-type]
    done = state_store.list_deferred("acme", include_replayed=True)
    assert [(j.job_id, j.state, j.sealed) for j in done] == [
        ("job-1", DeferredState.REPLAYED, None),
        ("job-2", DeferredState.REPLAYED, None),
    ]
    assert done[0].payload == meta  # the clear metadata stays: a resent id is still known
    assert state_store.admit_job("acme", "job-1", meta, sealed=b"resent").decision is Decision.DUPLICATE
    assert state_store.gate("acme").state is GateState.OPEN


def test_a_job_found_done_at_replay_has_its_seal_purged(state_store: StateStore) -> None:
    tenant(state_store)
    first = state_store.admit_job("acme", "job-1", {"d": 1})
    state_store.finish_job("job-1", first.attempt, object_count=2)  # type: ignore[arg-type]
    state_store.pause("acme", "run-1")
    state_store.defer(DeferredJob("job-1", "acme", {"d": 1}, sealed=b"opaque"))  # resent through the deferral path
    [job] = state_store.resume_and_drain("acme", "run-1")
    assert job.sealed == b"opaque"
    assert state_store.start_job("acme", "job-1").decision is Decision.DUPLICATE
    [gone] = state_store.list_deferred("acme", include_replayed=True)
    assert (gone.state, gone.sealed, gone.payload) == (DeferredState.REPLAYED, None, {"d": 1})
    # and through mark_replayed, for callers that acknowledge separately
    state_store.pause("acme", "run-2")
    state_store.defer(DeferredJob("job-2", "acme", {"d": 2}, sealed=b"opaque-2"))
    state_store.mark_replayed("job-2")
    assert state_store.list_deferred("acme", include_replayed=True)[1].sealed is None


def test_the_seal_is_not_compared_and_its_payload_key_is_reserved(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    state_store.admit_job("acme", "job-1", {"digest": "a"}, sealed=b"first")
    assert state_store.admit_job("acme", "job-1", {"digest": "a"}, sealed=b"second").decision is Decision.DUPLICATE
    assert state_store.defer(DeferredJob("job-1", "acme", {"digest": "a"}, sealed=b"third")) is False
    assert state_store.list_deferred("acme")[0].sealed == b"first"  # the first seal is the one kept
    with pytest.raises(StateError, match="already used"):
        state_store.admit_job("acme", "job-1", {"digest": "b"}, sealed=b"first")
    with pytest.raises(ValidationError, match="reserved"):
        state_store.admit_job("acme", "job-2", {"sealed": "in the clear"})
    for bad in (b"", "text", 3):
        with pytest.raises(ValidationError, match="non-empty bytes"):
            state_store.admit_job("acme", "job-3", {}, sealed=bad)  # type: ignore[arg-type]
    assert [j.job_id for j in state_store.list_deferred("acme")] == ["job-1"]


def test_parking_a_job_keeps_its_seal_and_drains_the_gate(state_store: StateStore) -> None:
    tenant(state_store)
    tenant(state_store, "beta")
    state_store.pause("acme", "run-1")
    meta = {"kind": "inline", "digest": "d-1"}
    state_store.admit_job("acme", "job-1", meta, sealed=b"\x00refused-seal")
    state_store.admit_job("acme", "job-2", {"kind": "inline", "digest": "d-2"}, sealed=b"opaque-2")
    [claimed, _] = state_store.resume_and_drain("acme", "run-1")
    failed = state_store.start_job("acme", claimed.job_id)
    state_store.finish_job("job-1", failed.attempt, error="IntegrityError: refused")  # type: ignore[arg-type]
    state_store.finish_job("job-2", state_store.start_job("acme", "job-2").attempt)  # type: ignore[arg-type]
    assert state_store.gate("acme").state is GateState.DRAINING and state_store.gate("acme").pending == 1

    parked = state_store.park_deferred("acme", "job-1", reason="  seal refused: bit rot ", actor="support:alice")
    assert (parked.state, parked.sealed) == (DeferredState.REPLAYED, b"\x00refused-seal")
    assert parked.replayed_at is not None and parked.parked is not None
    assert (parked.parked["reason"], parked.parked["actor"]) == ("seal refused: bit rot", "support:alice")
    status = state_store.gate("acme")
    assert (status.state, status.pending) == (GateState.OPEN, 0)  # parking the last one drained it
    assert state_store.claim_deferred("acme") == []
    assert state_store.get_job("job-1").state is JobState.FAILED  # type: ignore[union-attr]  # ledger untouched
    listed = state_store.list_deferred("acme", include_replayed=True)
    assert [(j.job_id, j.parked is not None, j.sealed) for j in listed] == [
        ("job-1", True, b"\x00refused-seal"),
        ("job-2", False, None),
    ]
    assert listed[0].parked["reason"] == "seal refused: bit rot"  # type: ignore[index]
    assert listed[0].payload["digest"] == "d-1" and state_store.list_deferred("acme") == []
    # A resent id of a parked job is recognised, not queued or run again.
    assert state_store.admit_job("acme", "job-1", meta, sealed=b"resent").decision is Decision.DUPLICATE

    with pytest.raises(StateError, match="already parked by support:alice"):
        state_store.park_deferred("acme", "job-1", reason="again", actor="support:bob")
    with pytest.raises(StateError, match="already replayed"):
        state_store.park_deferred("acme", "job-2", reason="too late", actor="support")
    with pytest.raises(StateError, match="no queued job 'job-9'"):
        state_store.park_deferred("acme", "job-9", reason="unknown", actor="support")
    with pytest.raises(StateError, match="another tenant"):
        state_store.park_deferred("beta", "job-1", reason="wrong tenant", actor="support")
    with pytest.raises(StateError, match="no tenant"):
        state_store.park_deferred("ghost", "job-1", reason="no such tenant", actor="support")
    for reason, actor in (("", "support"), ("   ", "support"), ("why", ""), ("x" * 501, "support")):
        with pytest.raises(ValidationError, match="parking a job needs"):
            state_store.park_deferred("acme", "job-1", reason=reason, actor=actor)


def test_parking_a_deferred_job_while_paused_keeps_the_gate_paused(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.pause("acme", "run-1")
    state_store.defer(DeferredJob("job-1", "acme", {"d": 1}, sealed=b"opaque-1"))
    state_store.defer(DeferredJob("job-2", "acme", {"d": 2}, sealed=b"opaque-2"))
    state_store.park_deferred("acme", "job-1", reason="customer withdrew it", actor="support")
    status = state_store.gate("acme")
    assert (status.state, status.pending) == (GateState.PAUSED, 1)
    jobs = state_store.resume_and_drain("acme", "run-1")
    assert [j.job_id for j in jobs] == ["job-2"]  # the parked job is never handed to a replayer
    state_store.finish_job("job-2", state_store.start_job("acme", "job-2").attempt)  # type: ignore[arg-type]
    assert state_store.gate("acme").state is GateState.OPEN
    assert state_store.list_deferred("acme", include_replayed=True)[0].sealed == b"opaque-1"


class RawDeferredRows:
    """``deferred_jobs`` below the port: what someone with database access reads and edits."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def dump(self) -> str:
        """Every deferred row, every column, as stored (JSON as its text, bytes as latin-1)."""
        if isinstance(self.store, SqlStateStore):
            from sqlalchemy import text

            with self.store.engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT job_id, tenant_id, position, CAST(payload AS TEXT), received_at, "
                        "state, claimed_at, replayed_at FROM deferred_jobs"
                    )
                ).all()
            return "\n".join(" | ".join(str(v) for v in row) for row in rows)
        return "\n".join(
            f"{j.job_id} | {j.tenant_id} | {json.dumps(dict(j.payload))} | {j.state.value} | "
            + (j.sealed or b"").decode("latin-1")
            for j in self.store._deferred.values()
        )

    def document(self, job_id: str) -> dict[str, Any]:
        """The stored payload document (SQL) or payload plus seal (memory)."""
        if isinstance(self.store, SqlStateStore):
            from sqlalchemy import select

            from archive_kms.state.schema import deferred_jobs

            with self.store.engine.connect() as conn:
                return dict(
                    conn.execute(select(deferred_jobs.c.payload).where(deferred_jobs.c.job_id == job_id)).scalar_one()
                )
        job = self.store._deferred[job_id]
        return dict(job.payload) | ({} if job.sealed is None else {"sealed": job.sealed})

    def sealed(self, job_id: str) -> bytes | None:
        raw = self.document(job_id).get("sealed")
        return base64.b64decode(raw) if isinstance(raw, str) else raw

    def rewrite(self, job_id: str, *, sealed: bytes | None = None, payload: dict[str, Any] | None = None) -> None:
        """Replace the stored seal and/or clear payload of one row."""
        if isinstance(self.store, SqlStateStore):
            from sqlalchemy import update

            from archive_kms.state.schema import deferred_jobs

            document = self.document(job_id)
            if payload is not None:
                document = dict(payload) | ({"sealed": document["sealed"]} if "sealed" in document else {})
            if sealed is not None:
                document["sealed"] = base64.b64encode(sealed).decode()
            with self.store.engine.begin() as conn:
                conn.execute(update(deferred_jobs).where(deferred_jobs.c.job_id == job_id).values(payload=document))
            return
        job = self.store._deferred[job_id]
        self.store._deferred[job_id] = replace(
            job, payload=job.payload if payload is None else payload, sealed=job.sealed if sealed is None else sealed
        )


# Words of the records below; none may be found in the store while the job waits or after.
SECRET_WORDS = (
    "Pemberton-Ashgrove",
    "Quokkafjord",
    "zanzibar-merger-7731",
    "0013000000XyzQk",
    "5003000000PlmNo",
    "Ms. Ottoline Varga",
    "merger_term_sheet.pdf",
    "9.75e6",
)


def secret_job(job_id: str, files: Path, tenant_id: str = "acme") -> Any:
    """Two records (two workspaces) and an attachment file; ids differ per job id."""
    from archive_kms.operations.archive import JobSpec

    files.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(job_id.encode()).hexdigest()[:3].upper()
    sheet = files / "merger_term_sheet.pdf"
    sheet.write_bytes(b"%PDF-1.7 Quokkafjord term sheet")
    records = (
        {
            "object_type": "Account",
            "record_id": f"0013000000XyzQk{tag}",
            "workspace_id": "ws0",
            "fields": {
                "Name": "Pemberton-Ashgrove Holdings",
                "AnnualRevenue": 9.75e6,
                "Description": "Quokkafjord acquisition, code name zanzibar-merger-7731",
            },
            "attachments": [
                {"attachment_id": f"att-{tag}", "file_name": "merger_term_sheet.pdf", "size": sheet.stat().st_size}
            ],
        },
        {
            "object_type": "Case",
            "record_id": f"5003000000PlmNo{tag}",
            "workspace_id": "ws1",
            "fields": {"Subject": "Call back Ms. Ottoline Varga", "Priority": "High"},
        },
    )
    return JobSpec(job_id, tenant_id, "inline", records, {f"att-{tag}": str(sheet)})


def assert_no_secret(raw: str | bytes, what: str) -> None:
    text_ = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    found = [w for w in SECRET_WORDS if w.lower() in text_.lower()]
    assert not found, f"{what} holds record content: {found}"


def platform_on(store: StateStore, *tenants: str) -> Any:
    """The in-memory platform (keychain, storage, index) on this backend's state store,
    with customer-key (BYOKMS) tenants."""
    from archive_kms.operations.platform import Platform
    from archive_kms.operations.tenants import create_tenant

    p = replace(Platform.in_memory(), state=store)
    for tid in tenants or ("acme",):
        create_tenant(p, tid, key_ref=f"memory://customer-{tid}", provision_storage=False)
    return p


def read_back(p: Any, spec: Any) -> list[Any]:
    from archive_kms.domain.records import Record

    archive = p.open_archive(spec.tenant_id)
    return [
        archive.read_record(r.workspace_id, r.object_type, r.record_id)
        for r in (Record.from_json(raw) for raw in spec.records)
    ]


def test_deferred_records_are_sealed_at_rest_and_purged_after_replay(
    state_store: StateStore, state_url: str | None, tmp_path: Path
) -> None:
    from archive_kms.domain.records import Record
    from archive_kms.operations.archive import DEFERRED_FORMAT, replay_deferred, submit_job

    p = platform_on(state_store)
    rows = RawDeferredRows(state_store)
    spec = secret_job("job-secret", tmp_path)
    state_store.pause("acme", "run-1")
    assert submit_job(state_store, spec, p.open_archive).decision == "deferred"
    assert submit_job(state_store, spec, p.open_archive).decision == "duplicate"  # a resend: same digest

    assert_no_secret(rows.dump(), "the deferred_jobs row")
    document = rows.document("job-secret")
    assert set(document) == {"format", "kind", "record_count", "attachment_count", "digest", "sealed"}
    assert (document["format"], document["kind"], document["record_count"], document["attachment_count"]) == (
        DEFERRED_FORMAT,
        "inline",
        2,
        1,
    )
    assert document["digest"].startswith("hmac-sha256:")
    sealed = rows.sealed("job-secret")
    assert sealed is not None and sealed.startswith(b"AKMS")  # the project's envelope
    assert_no_secret(sealed, "the sealed content")
    if state_url is not None and state_url.startswith("sqlite:///"):  # nothing on disk either
        db = Path(state_url.removeprefix("sqlite:///"))
        for f in (db, db.with_name(db.name + "-wal")):
            if f.exists():
                assert_no_secret(f.read_bytes(), str(f))
    other = replace(spec, records=(spec.records[0], {**spec.records[1], "fields": {"Subject": "something else"}}))
    with pytest.raises(StateError, match="already used"):  # the same id with other content is not a resend
        submit_job(state_store, other, p.open_archive)

    [outcome] = replay_deferred(state_store, "acme", "run-1", p.open_archive)
    assert (outcome.decision, outcome.records, outcome.attachments) == ("run", 2, 1)
    assert read_back(p, spec) == [Record.from_json(r) for r in spec.records]
    [attachment_id] = spec.attachment_files
    assert b"".join(p.open_archive("acme").read_attachment("ws0", attachment_id)) == b"%PDF-1.7 Quokkafjord term sheet"
    [done] = state_store.list_deferred("acme", include_replayed=True)
    assert (done.state, done.sealed) == (DeferredState.REPLAYED, None)
    assert rows.sealed("job-secret") is None and "sealed" not in rows.document("job-secret")  # purged
    assert rows.document("job-secret")["digest"] == document["digest"]  # the row stays: exactly once
    assert_no_secret(rows.dump(), "the replayed row")
    assert state_store.get_job("job-secret").state is JobState.COMPLETED  # type: ignore[union-attr]
    assert submit_job(state_store, spec, p.open_archive).decision == "duplicate"


def test_a_failed_replay_keeps_the_seal_and_the_retry_purges_it(state_store: StateStore, tmp_path: Path) -> None:
    from archive_kms.operations.archive import replay_deferred, submit_job

    p = platform_on(state_store)
    rows = RawDeferredRows(state_store)
    spec = secret_job("job-1", tmp_path)
    state_store.pause("acme", "run-1")
    submit_job(state_store, spec, p.open_archive)
    sealed = rows.sealed("job-1")
    sheet = tmp_path / "merger_term_sheet.pdf"
    sheet.rename(tmp_path / "away")  # the attachment's durable source is briefly unavailable
    with pytest.raises(ValidationError, match="merger_term_sheet.pdf"):  # found before anything is written
        replay_deferred(state_store, "acme", "run-1", p.open_archive)
    assert state_store.get_job("job-1").state is JobState.FAILED  # type: ignore[union-attr]
    assert rows.sealed("job-1") == sealed and state_store.gate("acme").pending == 1
    (tmp_path / "away").rename(sheet)
    [outcome] = replay_deferred(state_store, "acme", "run-1", p.open_archive, reclaim_after=timedelta(0))
    assert outcome.decision == "run" and rows.sealed("job-1") is None
    assert state_store.gate("acme").state is GateState.OPEN


def test_a_resent_job_found_done_at_replay_is_purged_without_opening_it(
    state_store: StateStore, tmp_path: Path
) -> None:
    from archive_kms.operations.archive import replay_deferred, seal_job, submit_job

    p = platform_on(state_store)
    spec = secret_job("job-1", tmp_path)
    assert submit_job(state_store, spec, p.open_archive).decision == "run"
    state_store.pause("acme", "run-1")
    queued = seal_job(spec, p.keychain)
    state_store.defer(DeferredJob("job-1", "acme", queued.metadata, sealed=queued.sealed))
    [outcome] = replay_deferred(state_store, "acme", "run-1", p.open_archive)
    assert outcome.decision == "duplicate"
    assert RawDeferredRows(state_store).sealed("job-1") is None
    assert state_store.get_job("job-1").attempt == 1  # type: ignore[union-attr]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


TAMPERING: dict[str, Callable[[RawDeferredRows, dict[str, bytes]], None]] = {
    "bit flipped in the body": lambda rows, seals: rows.rewrite("job-b", sealed=_flip(seals["job-b"], -20)),
    "bit flipped in the header": lambda rows, seals: rows.rewrite("job-b", sealed=_flip(seals["job-b"], 20)),
    "truncated": lambda rows, seals: rows.rewrite("job-b", sealed=seals["job-b"][:-7]),
    "swapped from another job": lambda rows, seals: rows.rewrite("job-b", sealed=seals["job-a"]),
    "moved from another tenant": lambda rows, seals: rows.rewrite("job-b", sealed=seals["job-c"]),
    "whole row copied from another job": lambda rows, seals: rows.rewrite(
        "job-b", payload={k: v for k, v in rows.document("job-a").items() if k != "sealed"}, sealed=seals["job-a"]
    ),
    "clear counts edited": lambda rows, seals: rows.rewrite(
        "job-b", payload={k: v for k, v in rows.document("job-b").items() if k != "sealed"} | {"record_count": 1}
    ),
    "not base64": lambda rows, seals: rows.rewrite("job-b", sealed=b"\xff"),  # memory: raw bytes; SQL: below
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_tampered_or_moved_seal_is_refused_and_the_job_kept(
    state_store: StateStore, tmp_path: Path, how: str
) -> None:
    from archive_kms.errors import IntegrityError
    from archive_kms.operations.archive import replay_deferred, submit_job

    p = platform_on(state_store, "acme", "beta")
    rows = RawDeferredRows(state_store)
    specs = {
        job_id: secret_job(job_id, tmp_path / job_id, tenant_id=tid)
        for job_id, tid in (("job-a", "acme"), ("job-b", "acme"), ("job-c", "beta"))
    }
    state_store.pause("acme", "run-1")
    state_store.pause("beta", "run-2")
    for spec in specs.values():
        assert submit_job(state_store, spec, p.open_archive).decision == "deferred"
    seals = {k: rows.sealed(k) for k in specs}
    if how == "not base64" and isinstance(state_store, SqlStateStore):
        from sqlalchemy import update

        from archive_kms.state.schema import deferred_jobs

        with state_store.engine.begin() as conn:
            conn.execute(
                update(deferred_jobs)
                .where(deferred_jobs.c.job_id == "job-b")
                .values(payload=rows.document("job-b") | {"sealed": "%%% not base64 %%%"})
            )
    else:
        TAMPERING[how](rows, seals)  # type: ignore[arg-type]
    stored = rows.document("job-b")

    refused = "deferred job job-b of tenant acme: its sealed content was refused"
    with pytest.raises(IntegrityError, match=refused) as info:
        replay_deferred(state_store, "acme", "run-1", p.open_archive)
    assert "stays queued for support" in str(info.value)
    assert_no_secret(str(info.value), "the error")
    # job-a, ahead in the queue, replayed and was purged; job-b is kept, seal and all, for support
    assert state_store.get_job("job-a").state is JobState.COMPLETED  # type: ignore[union-attr]
    assert rows.sealed("job-a") is None
    failed = state_store.get_job("job-b")
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error is not None and failed.error.startswith("IntegrityError: deferred job job-b")
    [kept] = state_store.list_deferred("acme")
    assert (kept.job_id, kept.state) == ("job-b", DeferredState.CLAIMED)
    assert rows.document("job-b") == stored  # nothing purged or rewritten
    assert state_store.gate("acme").pending == 1 and state_store.gate("acme").state is GateState.DRAINING
    archived = {o.name for o in p.store_for(p.location_of("acme")).list()}
    assert len(archived) == 3 and len(read_back(p, specs["job-a"])) == 2  # job-a's 2 records + 1 attachment only
    assert not any(b"PlmNo" + specs["job-b"].records[1]["record_id"][-3:].encode() in n for n in archived)
    # A later replayer meets the same refusal: the job is never silently dropped.
    with pytest.raises(IntegrityError, match="job-b"):
        replay_deferred(state_store, "acme", "run-1", p.open_archive, reclaim_after=timedelta(0))
    assert [j.job_id for j in state_store.list_deferred("acme")] == ["job-b"]
    assert state_store.get_job("job-b").attempt == 2  # type: ignore[union-attr]
    # The other tenant's job, whose seal was the one copied, still replays.
    [c] = replay_deferred(state_store, "beta", "run-2", p.open_archive)
    assert c.decision == "run" and rows.sealed("job-c") is None
    # Support parks it: the gate drains past it and the stored document, seal and all, is kept verbatim.
    from archive_kms.operations.archive import park_deferred_job

    park_deferred_job(state_store, "acme", "job-b", reason=f"seal refused: {how}", actor="support")
    assert replay_deferred(state_store, "acme", "run-1", p.open_archive, reclaim_after=timedelta(0)) == []
    assert state_store.gate("acme").state is GateState.OPEN
    document = rows.document("job-b")
    assert document.pop("parked")["reason"] == f"seal refused: {how}" and document == stored


def test_a_job_queued_in_clear_by_an_earlier_version_still_replays(state_store: StateStore, tmp_path: Path) -> None:
    """Rows written before deferred content was sealed hold the spec itself."""
    from archive_kms.domain.records import Record
    from archive_kms.operations.archive import replay_deferred

    p = platform_on(state_store)
    spec = secret_job("job-old", tmp_path)
    state_store.pause("acme", "run-1")
    state_store.defer(DeferredJob("job-old", "acme", spec.to_payload()))
    [outcome] = replay_deferred(state_store, "acme", "run-1", p.open_archive)
    assert outcome.decision == "run"
    assert read_back(p, spec) == [Record.from_json(r) for r in spec.records]


# --- runs, steps, checkpoints -------------------------------------------------------------


def test_second_trigger_returns_the_running_run(state_store: StateStore) -> None:
    tenant(state_store)
    run, created = state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, params={"bucket": "b"})
    assert created and run.state is RunState.RUNNING
    assert [s.name for s in run.steps] == STEPS and all(s.state is StepState.PENDING for s in run.steps)
    again, created = state_store.start_run("acme", Flow.ROTATE, mode="byok", steps=["rewrap"])
    assert not created and again.run_id == run.run_id
    assert state_store.find_active_run("acme") == run
    assert state_store.get_run(run.run_id) == run
    with pytest.raises(StateError, match="no tenant"):
        state_store.start_run("ghost", Flow.ENABLE, mode="byok", steps=STEPS)


def test_concurrent_triggers_create_one_run(state_store: StateStore) -> None:
    tenant(state_store)
    results = in_threads(
        6, lambda i: state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id=f"run-{i}")
    )
    assert all(kind == "ok" for kind, _ in results), results
    created = [r for _, (r, c) in results if c]
    assert len(created) == 1
    assert {r.run_id for _, (r, _c) in results} == {created[0].run_id}
    assert len(state_store.list_runs("acme")) == 1


def test_run_ids_are_idempotent_keys(state_store: StateStore) -> None:
    tenant(state_store)
    tenant(state_store, "beta")
    run, _ = state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    state_store.set_run_state("r1", RunState.COMPLETED)
    again, created = state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    assert not created and again.state is RunState.COMPLETED
    with pytest.raises(StateError, match="already used"):
        state_store.start_run("beta", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")


def test_run_state_machine(state_store: StateStore) -> None:
    tenant(state_store)
    run, _ = state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    assert state_store.set_run_state("r1", RunState.FAILED).state is RunState.FAILED
    assert state_store.find_active_run("acme") is None
    other, created = state_store.start_run("acme", Flow.REVOKE, mode="byok", steps=["close-gate"], run_id="r2")
    assert created
    with pytest.raises(StateError, match="another running run"):
        state_store.set_run_state("r1", RunState.RUNNING)
    state_store.set_run_state("r2", RunState.COMPLETED)
    assert state_store.set_run_state("r1", RunState.RUNNING).state is RunState.RUNNING  # resume
    state_store.set_run_state("r1", RunState.COMPLETED)
    with pytest.raises(StateError, match="cannot move"):
        state_store.set_run_state("r1", RunState.RUNNING)
    assert [r.run_id for r in state_store.list_runs("acme")] == ["r2", "r1"]
    assert [r.run_id for r in state_store.list_runs(states=[RunState.COMPLETED], limit=1)] == ["r2"]


def test_step_lifecycle_and_rerun(state_store: StateStore) -> None:
    tenant(state_store)
    run, _ = state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    s = state_store.update_step("r1", "copy", StepState.RUNNING)
    assert (s.state, s.attempt, s.finished_at) == (StepState.RUNNING, 1, None)
    s = state_store.update_step("r1", "copy", StepState.FAILED, error="503 SlowDown")
    assert (s.state, s.error) == (StepState.FAILED, "503 SlowDown")
    assert state_store.update_step("r1", "copy", StepState.RUNNING).attempt == 2
    s = state_store.update_step("r1", "copy", StepState.COMPLETED, result={"copied": 10})
    assert (s.state, s.result, s.error) == (StepState.COMPLETED, {"copied": 10}, None)
    assert state_store.update_step("r1", "copy", StepState.COMPLETED).result == {"copied": 10}  # idempotent
    with pytest.raises(StateError, match="reset_steps"):
        state_store.update_step("r1", "copy", StepState.RUNNING)
    state_store.update_step("r1", "verify", StepState.RUNNING)
    state_store.save_checkpoint("r1", "copy", 0, {"after": "b"})
    state_store.save_checkpoint("r1", "manifest", 0, {"page": 3})
    run = state_store.reset_steps("r1", "copy")
    assert [(s.name, s.state) for s in run.steps][3:5] == [("copy", StepState.PENDING), ("verify", StepState.PENDING)]
    assert run.step("copy").attempt == 2  # history kept
    assert state_store.load_checkpoints("r1", "copy") == {}  # the rerun starts over
    assert state_store.load_checkpoints("r1", "manifest") == {0: {"page": 3}}
    assert state_store.update_step("r1", "copy", StepState.RUNNING).attempt == 3
    with pytest.raises(StateError, match="no step"):
        state_store.update_step("r1", "nope", StepState.RUNNING)
    state_store.set_run_state("r1", RunState.CANCELLED)
    with pytest.raises(StateError, match="cancelled"):
        state_store.update_step("r1", "copy", StepState.COMPLETED)


def test_checkpoints_upsert_per_shard(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    state_store.save_checkpoint("r1", "copy", 0, {"after": "a"})
    state_store.save_checkpoint("r1", "copy", 1, {"after": "m"})
    state_store.save_checkpoint("r1", "copy", 0, {"after": "c", "n": 2})
    assert state_store.load_checkpoints("r1", "copy") == {0: {"after": "c", "n": 2}, 1: {"after": "m"}}
    with pytest.raises(StateError):
        state_store.save_checkpoint("r1", "nope", 0, {})
    with pytest.raises(ValidationError):
        state_store.save_checkpoint("r1", "copy", 0, {"x": math.nan})


# --- manifests and the copy ledger --------------------------------------------------------

NAMES = [b"a/../b", b"\x00\xff", "caf\u00e9".encode(), b"z", b"m/n/o", b"%2e%2e/x"]


def test_manifest_and_copy_ledger(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    with pytest.raises(StateError, match="no manifest"):
        state_store.add_manifest_entries("r1", [ManifestEntry(b"x", 1)])
    state_store.create_manifest("r1", SHARED)
    state_store.create_manifest("r1", SHARED)  # idempotent
    with pytest.raises(StateError, match="another source"):
        state_store.create_manifest("r1", DEDICATED)
    entries = [ManifestEntry(n, size=10 * i, shard=i % 2, etag=f"e{i}") for i, n in enumerate(NAMES)]
    assert state_store.add_manifest_entries("r1", entries[:4]) == 4
    assert state_store.add_manifest_entries("r1", entries) == 2  # a relisting adds only the new ones
    with pytest.raises(StateError, match="other attributes"):
        state_store.add_manifest_entries("r1", [replace(entries[0], size=999)])
    summary = state_store.manifest_summary("r1")
    assert summary is not None
    assert (summary.entries, summary.total_bytes, summary.shards, summary.source) == (6, 150, 2, SHARED)
    assert [e.name for e in state_store.iter_manifest("r1", page_size=2)] == sorted(NAMES)
    assert [e.name for e in state_store.iter_manifest("r1", shard=1, page_size=1)] == sorted(NAMES[1::2])

    state_store.record_copy("r1", CopyRecord(NAMES[0], CopyStatus.COPIED, dest_etag="d0", dest_size=0))
    state_store.record_copy("r1", CopyRecord(NAMES[1], CopyStatus.FAILED, error="503"))
    state_store.record_copy("r1", CopyRecord(NAMES[2], CopyStatus.COPIED, dest_size=20))
    state_store.record_copy("r1", CopyRecord(NAMES[2], CopyStatus.VERIFIED, dest_size=20, plaintext_sha256="ab" * 32))
    with pytest.raises(StateError, match="not all in the manifest"):
        state_store.record_copy("r1", CopyRecord(b"never-listed", CopyStatus.COPIED))
    assert state_store.copy_counts("r1") == {CopyStatus.COPIED: 1, CopyStatus.FAILED: 1, CopyStatus.VERIFIED: 1}
    got = state_store.get_copy("r1", NAMES[2])
    assert got is not None and (got.status, got.plaintext_sha256) == (CopyStatus.VERIFIED, "ab" * 32)
    assert [c.name for c in state_store.iter_copies("r1", page_size=1)] == sorted(NAMES[:3])
    assert [c.name for c in state_store.iter_copies("r1", status=CopyStatus.FAILED)] == [NAMES[1]]
    todo = [e.name for e in state_store.iter_uncopied("r1", page_size=2)]
    assert todo == sorted([NAMES[1], *NAMES[3:]])
    assert [e.name for e in state_store.iter_uncopied("r1", shard=0)] == sorted([NAMES[4]])
    assert [c.name for c in state_store.iter_copies("r1", shard=0)] == sorted([NAMES[0], NAMES[2]])
    assert [c.name for c in state_store.iter_copies("r1", shard=1, status=CopyStatus.FAILED, page_size=1)] == [NAMES[1]]

    # A batch is one transaction: all rows or none.
    with pytest.raises(StateError, match="nothing recorded"):
        state_store.record_copies(
            "r1", [CopyRecord(NAMES[3], CopyStatus.COPIED), CopyRecord(b"nope", CopyStatus.COPIED)]
        )
    assert state_store.get_copy("r1", NAMES[3]) is None
    state_store.record_copies(
        "r1",
        [CopyRecord(NAMES[3], CopyStatus.COPIED, dest_size=3), CopyRecord(NAMES[1], CopyStatus.COPIED, dest_size=1)],
    )
    state_store.record_copies("r1", [])
    assert state_store.copy_counts("r1") == {CopyStatus.COPIED: 3, CopyStatus.VERIFIED: 1}


def test_manifest_names_are_bounded(state_store: StateStore) -> None:
    tenant(state_store)
    state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    state_store.create_manifest("r1", SHARED)
    with pytest.raises(ValidationError):
        state_store.add_manifest_entries("r1", [ManifestEntry(b"x" * 1025, 1)])
    with pytest.raises(ValidationError):
        state_store.add_manifest_entries("r1", [ManifestEntry(b"x", -1)])
    assert state_store.add_manifest_entries("r1", [ManifestEntry(b"x" * 1024, 1)]) == 1


# --- leases and fencing -------------------------------------------------------------------


def test_lease_is_exclusive(state_store: StateStore) -> None:
    tenant(state_store)
    lease = state_store.acquire_lease("acme", "run-1", timedelta(seconds=30))
    assert (lease.run_id, lease.token) == ("run-1", 1)
    with pytest.raises(LeaseHeldError, match="run-1"):
        state_store.acquire_lease("acme", "run-2", timedelta(seconds=30))
    assert state_store.get_lease("acme") == lease
    state_store.check_fence("acme", lease.token)
    with pytest.raises(StateError, match="no tenant"):
        state_store.acquire_lease("ghost", "run-1", timedelta(seconds=30))


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_acquirers_exactly_one_wins(state_store: StateStore, round_: int) -> None:
    tenant(state_store)
    results = in_threads(8, lambda i: state_store.acquire_lease("acme", f"run-{i}", timedelta(seconds=30)))
    wins = [r for kind, r in results if kind == "ok"]
    assert len(wins) == 1, results
    assert all(isinstance(r, LeaseHeldError) for kind, r in results if kind == "err"), results
    assert state_store.get_lease("acme") == wins[0]


def test_expired_lease_is_taken_over_and_the_old_holder_fenced(state_store: StateStore, state_clock: Any) -> None:
    tenant(state_store)
    state_store.start_run("acme", Flow.ENABLE, mode="byok", steps=STEPS, run_id="r1")
    old = state_store.acquire_lease("acme", "r1", timedelta(seconds=30))
    state_store.pause("acme", "r1", fence=old.fence)  # a fenced write with the current token
    state_clock.advance(timedelta(seconds=31))
    new = state_store.acquire_lease("acme", "r2", timedelta(seconds=30))
    assert new.token == old.token + 1
    with pytest.raises(FencedError, match="stale"):
        state_store.check_fence("acme", old.token)
    with pytest.raises(FencedError):
        state_store.update_step("r1", "copy", StepState.RUNNING, fence=old.fence)
    with pytest.raises(FencedError):
        state_store.save_checkpoint("r1", "copy", 0, {"after": "x"}, fence=old.fence)
    with pytest.raises(FencedError):
        state_store.update_tenant(state_store.get_tenant("acme"), fence=old.fence)  # type: ignore[arg-type]
    with pytest.raises(FencedError):
        state_store.resume("acme", "r1", fence=old.fence)
    with pytest.raises(FencedError):
        state_store.renew_lease(old, timedelta(seconds=30))
    assert state_store.release_lease(old) is False
    assert state_store.get_run("r1").step("copy").attempt == 0  # type: ignore[union-attr] - nothing written
    assert state_store.gate("acme").state is GateState.PAUSED
    state_store.check_fence("acme", new.token)
    assert state_store.renew_lease(new, timedelta(minutes=5)).token == new.token


def test_unexpired_lease_renews_and_releases(state_store: StateStore, state_clock: Any) -> None:
    tenant(state_store)
    lease = state_store.acquire_lease("acme", "r1", timedelta(seconds=30))
    state_clock.advance(timedelta(seconds=20))
    lease = state_store.renew_lease(lease, timedelta(seconds=30))
    state_clock.advance(timedelta(seconds=20))
    with pytest.raises(LeaseHeldError):  # renewed: not expired yet
        state_store.acquire_lease("acme", "r2", timedelta(seconds=30))
    assert state_store.release_lease(lease) is True
    assert state_store.get_lease("acme") is None
    with pytest.raises(FencedError, match="released"):
        state_store.check_fence("acme", lease.token)
    nxt = state_store.acquire_lease("acme", "r2", timedelta(seconds=30))
    assert nxt.token == lease.token + 1


def test_same_run_reacquiring_fences_its_previous_incarnation(state_store: StateStore) -> None:
    tenant(state_store)
    first = state_store.acquire_lease("acme", "r1", timedelta(seconds=30))
    second = state_store.acquire_lease("acme", "r1", timedelta(seconds=30))
    assert second.token == first.token + 1
    with pytest.raises(FencedError):
        state_store.check_fence("acme", first.token)


def test_fence_of_another_tenant_is_refused(state_store: StateStore) -> None:
    tenant(state_store)
    tenant(state_store, "beta")
    lease = state_store.acquire_lease("beta", "r1", timedelta(seconds=30))
    with pytest.raises(FencedError, match="beta"):
        state_store.pause("acme", "r1", fence=lease.fence)
    with pytest.raises(FencedError, match="no lease"):
        state_store.check_fence("acme", 1)


# --- audit log ----------------------------------------------------------------------------


def fill_audit(store: StateStore, n: int = 6) -> list[Any]:
    tenants = ["acme", "beta", None]
    return [
        store.append_audit(
            AuditEvent(
                "support:alice",
                f"step.{i}",
                tenants[i % 3],
                f"run-{i}",
                {"i": i, "obj": "caf\u00e9", "nested": {"b": [1, 2], "a": None}},
            )
        )
        for i in range(n)
    ]


def test_audit_appends_form_verifiable_chains(state_store: StateStore) -> None:
    recs = fill_audit(state_store)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0].prev_hash == chain.GENESIS and recs[1].prev_hash == recs[0].hash
    assert [(r.tenant_id, r.tenant_seq) for r in recs[:4]] == [("acme", 1), ("beta", 1), (None, None), ("acme", 2)]
    assert recs[3].tenant_prev_hash == recs[0].hash
    assert list(state_store.iter_audit()) == recs
    assert [r.seq for r in state_store.iter_audit(tenant_id="acme", page_size=1)] == [1, 4]
    assert [r.seq for r in state_store.iter_audit(after_seq=4)] == [5, 6]
    v = state_store.verify_audit()
    assert (v.ok, v.records, v.first_bad_seq, v.sealed) == (True, 6, None, False)
    assert state_store.verify_audit(tenant_id="beta").ok


def test_empty_audit_log_verifies(state_store: StateStore) -> None:
    assert state_store.verify_audit().ok
    export = list(state_store.export_audit("acme"))
    assert export == [chain.ChainHead("tenant:acme", 0, chain.GENESIS).to_json()]
    assert chain.verify_export(export).ok


def test_audit_verify_detects_an_edited_record(state_store: StateStore, audit_tamper: Any) -> None:
    fill_audit(state_store)
    audit_tamper.edit_details(3, {"i": 3, "obj": "forged"})
    v = state_store.verify_audit()
    assert (v.ok, v.first_bad_seq) == (False, 3)
    assert "edited" in (v.reason or "")


def test_audit_verify_detects_a_deleted_record(state_store: StateStore, audit_tamper: Any) -> None:
    fill_audit(state_store)
    audit_tamper.delete(3)
    v = state_store.verify_audit()
    assert (v.ok, v.first_bad_seq) == (False, 3)
    assert "missing" in (v.reason or "")


def test_audit_verify_detects_reordered_records(state_store: StateStore, audit_tamper: Any) -> None:
    fill_audit(state_store)
    audit_tamper.swap(3, 4)
    v = state_store.verify_audit()
    assert (v.ok, v.first_bad_seq) == (False, 3)


def test_audit_verify_detects_a_truncated_tail(state_store: StateStore, audit_tamper: Any) -> None:
    fill_audit(state_store)
    audit_tamper.truncate(2)
    v = state_store.verify_audit()
    assert (v.ok, v.first_bad_seq) == (False, 5)
    assert "truncated" in (v.reason or "")


def test_tenant_chain_detects_its_own_tampering(state_store: StateStore, audit_tamper: Any) -> None:
    fill_audit(state_store)
    audit_tamper.edit_details(4, {"i": 4})  # acme's second record
    assert state_store.verify_audit(tenant_id="beta").ok  # other tenants are unaffected
    v = state_store.verify_audit(tenant_id="acme")
    assert (v.ok, v.first_bad_seq) == (False, 4)


def test_concurrent_appends_keep_one_chain(state_store: StateStore) -> None:
    def append_many(i: int) -> int:
        for k in range(25):
            state_store.append_audit(
                AuditEvent(f"worker-{i}", "copy.shard", ["acme", "beta", None][k % 3], details={"k": k})
            )
        return i

    results = in_threads(8, append_many)
    assert all(kind == "ok" for kind, _ in results), results
    recs = list(state_store.iter_audit())
    assert [r.seq for r in recs] == list(range(1, 201))
    v = state_store.verify_audit()
    assert v.ok and v.records == 200, v
    assert state_store.verify_audit(tenant_id="acme").ok


def test_audit_details_must_be_plain_json(state_store: StateStore) -> None:
    key = SecretBytes(b"K" * 32)
    with pytest.raises(ValidationError) as info:
        state_store.append_audit(AuditEvent("a", "b", details={"key": key}))  # type: ignore[dict-item]
    assert "KKKK" not in str(info.value)
    with pytest.raises(ValidationError):
        state_store.append_audit(AuditEvent("a", "b", details={"x": math.inf}))
    with pytest.raises(ValidationError):
        state_store.append_audit(AuditEvent("", "b"))
    assert list(state_store.iter_audit()) == []


def test_tenant_export_verifies_offline_and_detects_tampering(state_store: StateStore) -> None:
    fill_audit(state_store, 9)
    lines = [json.loads(json.dumps(d)) for d in state_store.export_audit("acme")]  # through JSONL
    assert [d["type"] for d in lines] == ["record"] * 3 + ["head"]
    assert all(d["tenant"] == "acme" for d in lines[:-1])
    assert chain.verify_export(lines).ok
    anchor = (lines[1]["tenant_seq"], lines[1]["hash"])
    state_store.append_audit(AuditEvent("x", "later", "acme"))
    later = list(state_store.export_audit("acme"))
    assert chain.verify_export(later, anchor=anchor).ok
    edited = [dict(d) for d in later]
    edited[1]["details"] = {"i": "forged"}
    assert chain.verify_export(edited).first_bad_seq == edited[1]["seq"]
    dropped = later[:1] + later[2:]
    assert not chain.verify_export(dropped).ok
    rolled_back = later[:1] + [{**later[-1], "count": 1, "head_hash": later[0]["hash"]}]
    assert chain.verify_export(rolled_back).ok  # an unsealed head can be rolled back ...
    assert not chain.verify_export(rolled_back, anchor=anchor).ok  # ... which an anchor detects
    full = list(state_store.export_audit())
    assert full[-1]["chain"] == "global" and chain.verify_export(full).ok


def _tamper_for(store: Any) -> Any:
    return SqlAuditTamper(store) if isinstance(store, SqlStateStore) else MemoryAuditTamper(store)


def test_without_a_seal_key_a_full_rewrite_is_undetectable(state_store: StateStore) -> None:
    """The honest limit (docs/state-store.md): someone who can write the database can
    edit a record and re-hash everything after it; only a sealed head catches that."""
    fill_audit(state_store)
    tamper = _tamper_for(state_store)
    tamper.edit_details(2, {"i": 2, "obj": "forged"})
    tamper.rehash_from(2)
    assert state_store.verify_audit().ok


@pytest.mark.parametrize("sealer_kind", ["hmac", "ed25519"])
def test_sealed_heads_catch_rewrites_and_truncation(open_state_store: Callable[..., Any], sealer_kind: str) -> None:
    sealer = (
        chain.HmacHeadSealer(SecretBytes.random(32), "audit-2030")
        if sealer_kind == "hmac"
        else chain.SignerHeadSealer(Signer.generate())
    )
    store = open_state_store(sealer=sealer)
    fill_audit(store)
    v = store.verify_audit()
    assert v.ok and v.sealed
    tamper = _tamper_for(store)
    tamper.truncate(1)
    tamper.set_head(chain.GLOBAL_CHAIN, 5, next(r for r in store.iter_audit(after_seq=4)).hash)
    v = store.verify_audit()
    assert not v.ok and "seal" in (v.reason or "")
    store2 = open_state_store(sealer=sealer)
    fill_audit(store2)
    tamper2 = _tamper_for(store2)
    tamper2.edit_details(2, {"forged": True})
    tamper2.rehash_from(2)
    v = store2.verify_audit()
    assert not v.ok and "not sealed" in (v.reason or "")
    if sealer_kind == "ed25519":  # customers verify a tenant export with the public key only
        store3 = open_state_store(sealer=sealer)
        fill_audit(store3)
        export = list(store3.export_audit("acme"))
        public = chain.SignatureHeadVerifier(sealer._signer.verifier())  # type: ignore[union-attr]
        assert chain.verify_export(export, verifier=public).ok
        forged = export[:-1] + [{**export[-1], "count": 1, "head_hash": export[0]["hash"]}]
        assert not chain.verify_export(forged, verifier=public).ok


@pytest.mark.parametrize("state_backend", SQL_BACKENDS, indirect=True)
def test_enabling_sealing_on_an_existing_log_needs_a_reseal(
    state_store: SqlStateStore, open_state_store: Callable[..., Any]
) -> None:
    fill_audit(state_store)
    old = chain.SignerHeadSealer(Signer.generate())
    sealed = open_state_store(sealer=old)
    v = sealed.verify_audit()
    assert not v.ok and "not sealed" in (v.reason or "")
    assert sealed.reseal_audit_heads().sealed
    assert sealed.verify_audit().ok
    rotated = open_state_store(sealer=chain.SignerHeadSealer(Signer.generate()))  # signing key rotated
    assert not rotated.verify_audit().ok
    assert rotated.reseal_audit_heads().ok and rotated.verify_audit().ok
    _tamper_for(rotated).delete(2)
    outcome = rotated.reseal_audit_heads()  # a broken chain is never blessed
    assert (outcome.ok, outcome.first_bad_seq) == (False, 2)
    with pytest.raises(ConfigurationError):
        state_store.reseal_audit_heads()


@pytest.mark.parametrize("state_backend", SQL_BACKENDS, indirect=True)
def test_audit_table_refuses_update_and_delete(state_store: SqlStateStore) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    fill_audit(state_store, 2)
    for stmt in ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 2"):
        with pytest.raises(DBAPIError, match="append-only"):
            with state_store.engine.begin() as conn:
                conn.execute(text(stmt))
    assert state_store.verify_audit().ok


@pytest.mark.parametrize("state_backend", SQL_BACKENDS, indirect=True)
def test_reopening_keeps_state_and_schema_version(
    state_store: SqlStateStore, open_state_store: Callable[..., Any]
) -> None:
    tenant(state_store)
    fill_audit(state_store, 3)
    again = open_state_store()
    assert again.get_tenant("acme") is not None
    assert again.verify_audit().ok and again.verify_audit().records == 3


@pytest.mark.parametrize("state_backend", ["postgresql"], indirect=True)
def test_a_missing_database_is_a_configuration_error(state_url: str) -> None:
    from sqlalchemy.engine import make_url

    from archive_kms.state.sql import open_state

    url = make_url(state_url).set(database="no_such_database").render_as_string(hide_password=False)
    with pytest.raises(ConfigurationError, match="does not exist") as info:
        open_state(url)
    assert not info.value.retryable


# --- search generations (operations/search_guard.py signs them) ----------------------------


def test_a_search_generation_is_recorded_once_and_kept_byte_for_byte(state_store: StateStore) -> None:
    from datetime import UTC, datetime

    from archive_kms.domain.search_generations import SearchGeneration

    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    first = SearchGeneration("acme", 2, "archive-acme--2", "keyed", at, "ed25519:00", b"\x01" * 64)
    assert state_store.record_search_generation(first) == first
    later = SearchGeneration("acme", 2, "archive-acme--2", "plaintext", at, "ed25519:00", b"\x02" * 64)
    assert state_store.record_search_generation(later) == first  # the first record stands
    state_store.record_search_generation(SearchGeneration("acme", 1, "archive-acme--1", "plaintext", at))
    state_store.record_search_generation(SearchGeneration("beta", 1, "archive-beta--1", "keyed", at))
    assert [(g.generation, g.mode) for g in state_store.search_generations("acme")] == [(1, "plaintext"), (2, "keyed")]
    assert state_store.search_generations("acme")[1].to_json() == first.to_json()
    assert state_store.search_generations("nobody") == []
