"""The key-lifecycle part of the StateStore contract (``WarningRepo``, ``KeyWatchRepo``:
stored warnings, the monitor's key observations, per-tenant grace policies), run against
every backend: memory, SQLite, PostgreSQL (``state_store`` from tests/state_fixtures.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.errors import StateError, ValidationError
from archive_kms.state.port import KeyMode, ObservedKey, StateStore, TenantRecord, warning_id

SHARED = {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "archive-kms-shared", "prefix": "tenants/acme/"}


def tenant(store: StateStore, tid: str = "acme") -> str:
    store.create_tenant(TenantRecord(tid, KeyMode.BYOKMS, SHARED, index_alias=f"archive-{tid}", index_generation=1))
    return tid


def test_raise_again_updates_one_warning_and_clear_starts_a_new_episode(state_store, state_clock) -> None:
    tid = tenant(state_store)
    first, new = state_store.raise_warning(
        tid, "key_unavailable", severity="critical", message="no answer", details={"error": "timeout"}
    )
    assert new and first.warning_id == warning_id("key_unavailable", tid) == "key_unavailable:acme"
    assert (first.count, first.active, first.details) == (1, True, {"error": "timeout"})
    state_clock.advance(timedelta(seconds=30))
    again, new = state_store.raise_warning(tid, "key_unavailable", severity="critical", message="still no answer")
    assert not new and again.count == 2 and again.message == "still no answer"
    assert again.raised_at == first.raised_at and again.updated_at > first.updated_at
    acked = state_store.acknowledge_warning(again.warning_id, actor="alice@ops")
    assert acked.acknowledged_by == "alice@ops" and acked.active
    cleared = state_store.clear_warning(again.warning_id)
    assert cleared is not None and not cleared.active
    assert state_store.clear_warning(again.warning_id) is None  # not active any more
    assert state_store.list_warnings(tid) == []
    assert [w.warning_id for w in state_store.list_warnings(tid, active=None)] == [again.warning_id]
    state_clock.advance(timedelta(seconds=30))
    reopened, new = state_store.raise_warning(tid, "key_unavailable", severity="warning", message="down again")
    assert new and reopened.count == 1 and reopened.acknowledged_by is None and reopened.raised_at > first.raised_at


def test_warnings_are_listed_per_tenant_and_kind_newest_first(state_store, state_clock) -> None:
    a, b = tenant(state_store, "acme"), tenant(state_store, "beta")
    state_store.raise_warning(a, "rotation_detected", severity="warning", message="rotated", subject="aws-kms")
    state_clock.advance(timedelta(seconds=1))
    state_store.raise_warning(b, "key_disabled", severity="critical", message="disabled")
    state_clock.advance(timedelta(seconds=1))
    state_store.raise_warning(a, "run_failed", severity="critical", message="failed", subject="run-1")
    assert [w.warning_id for w in state_store.list_warnings()] == [
        "run_failed:acme:run-1",
        "key_disabled:beta",
        "rotation_detected:acme:aws-kms",
    ]
    assert [w.warning_id for w in state_store.list_warnings(a, kind="rotation_detected")] == [
        "rotation_detected:acme:aws-kms"
    ]
    assert state_store.get_warning("key_disabled:beta").severity == "critical"
    assert state_store.get_warning("nope:beta") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "Key-Down"},
        {"severity": "fatal"},
        {"message": ""},
        {"message": "x" * 1001},
        {"subject": "a b"},
        {"details": {"n": float("nan")}},
    ],
)
def test_bad_warnings_are_refused(state_store, kwargs) -> None:
    tid = tenant(state_store)
    args = {"kind": "key_unavailable", "severity": "critical", "message": "m", "subject": None, "details": None}
    args.update(kwargs)
    with pytest.raises(ValidationError):
        state_store.raise_warning(tid, args.pop("kind"), **args)
    assert state_store.list_warnings(active=None) == []


def test_unknown_tenants_and_warnings_are_refused(state_store) -> None:
    with pytest.raises(StateError):
        state_store.raise_warning("ghost", "key_unavailable", severity="critical", message="m")
    with pytest.raises(StateError):
        state_store.acknowledge_warning("key_unavailable:ghost", actor="alice")
    with pytest.raises(ValidationError):
        tenant(state_store)
        state_store.raise_warning("acme", "key_unavailable", severity="info", message="m")
        state_store.acknowledge_warning("key_unavailable:acme", actor="  ")


def test_key_observations_replace_the_previous_one(state_store) -> None:
    tid = tenant(state_store)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = ObservedKey(tid, "aws-kms://arn:k", "enabled", "m1", "m1", "ok", t0, details={"aws_key_state": "Enabled"})
    assert state_store.record_key_observation(first) == first
    later = ObservedKey(
        tid, "aws-kms://arn:k", "unreachable", "m1", "m1", "unreachable", t0 + timedelta(minutes=1), None, t0
    )
    state_store.record_key_observation(later)
    assert state_store.get_key_observation(tid) == later
    assert state_store.list_key_observations() == [later]
    assert state_store.get_key_observation("ghost") is None
    with pytest.raises(StateError):
        state_store.record_key_observation(ObservedKey("ghost", "r", "enabled", None, None, "ok", t0))


def test_grace_policy_per_tenant_set_changed_and_dropped(state_store) -> None:
    tid = tenant(state_store)
    assert state_store.get_grace_policy(tid) is None
    rec = state_store.set_grace_policy(tid, "deny-immediately", actor="sec@acme")
    assert (rec.policy, rec.updated_by) == ("deny-immediately", "sec@acme")
    state_store.set_grace_policy(tid, "serve-from-cache-for:300", actor="sec@acme")
    assert state_store.get_grace_policy(tid).policy == "serve-from-cache-for:300"
    assert state_store.set_grace_policy(tid, None, actor="sec@acme") is None
    assert state_store.get_grace_policy(tid) is None
    with pytest.raises(StateError):
        state_store.set_grace_policy("ghost", "alert-only", actor="x")
