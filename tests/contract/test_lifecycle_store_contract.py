"""The ``LifecycleRepo`` contract (retention policies, key rotations with their single-use
confirmation challenge, last known key versions), on every state backend: memory, SQLite,
PostgreSQL (fixtures from tests/state_fixtures.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from archive_kms.errors import StateError, ValidationError
from archive_kms.state.port import KeyMode, KeyRotation, RotationState, TenantRecord

SHARED = {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "archive-kms-shared", "prefix": "tenants/acme/"}


def tenant(store: Any, tid: str = "acme") -> None:
    store.create_tenant(TenantRecord(tid, KeyMode.BYOKMS, SHARED, index_alias=f"archive-{tid}", index_generation=1))


def rotation(rid: str = "rot-1", tid: str = "acme", **kw: Any) -> KeyRotation:
    return KeyRotation(
        rotation_id=rid,
        tenant_id=tid,
        kind=kw.pop("kind", "customer"),
        key_ref=kw.pop("key_ref", "aws-kms://arn:aws:kms:us-east-1:111122223333:key/k"),
        previous_key_ref=kw.pop("previous_key_ref", "aws-kms://arn:aws:kms:us-east-1:111122223333:key/k"),
        previous_version=kw.pop("previous_version", "v1"),
        observed_version=kw.pop("observed_version", "v2"),
        **kw,
    )


def test_retention_is_set_replaced_listed_and_cleared(state_store):
    tenant(state_store)
    tenant(state_store, "beta")
    assert state_store.get_retention("acme") is None
    first = state_store.set_retention("acme", 3600, actor="ops:alice")
    assert (first.retention_seconds, first.updated_by) == (3600, "ops:alice") and first.updated_at is not None
    again = state_store.set_retention("acme", 7200, actor="ops:bob")
    assert state_store.get_retention("acme").retention_seconds == 7200 == again.retention_seconds
    state_store.set_retention("beta", 60, actor="ops")
    assert [p.tenant_id for p in state_store.list_retention()] == ["acme", "beta"]
    assert state_store.clear_retention("acme") is True
    assert state_store.clear_retention("acme") is False
    assert state_store.get_retention("acme") is None


@pytest.mark.parametrize("bad", [0, -5, 10**12, 1.5, True, "3600"])
def test_retention_out_of_bounds_is_refused(state_store, bad):
    tenant(state_store)
    with pytest.raises(ValidationError, match="retention"):
        state_store.set_retention("acme", bad, actor="ops")
    assert state_store.get_retention("acme") is None


def test_retention_of_an_unknown_tenant_is_refused(state_store):
    with pytest.raises(StateError, match="no tenant"):
        state_store.set_retention("ghost", 60, actor="ops")


def test_key_version_is_upserted(state_store):
    tenant(state_store)
    assert state_store.get_key_version("acme") is None
    state_store.record_key_version("acme", "azure-kv://h/keys/k", "a" * 32)
    state_store.record_key_version("acme", "azure-kv://h/keys/k", "b" * 32)
    mark = state_store.get_key_version("acme")
    assert (mark.key_ref, mark.version) == ("azure-kv://h/keys/k", "b" * 32) and mark.observed_at is not None


def test_one_open_rotation_per_tenant(state_store):
    tenant(state_store)
    made, created = state_store.open_rotation(rotation("rot-1"))
    assert created and made.state is RotationState.DETECTED and made.nonce is None and made.detected_at
    again, created = state_store.open_rotation(rotation("rot-2", observed_version="v3"))
    assert not created and again.rotation_id == "rot-1"
    assert state_store.find_open_rotation("acme").rotation_id == "rot-1"
    state_store.update_rotation("rot-1", expect=[RotationState.DETECTED], state=RotationState.CANCELLED)
    assert state_store.find_open_rotation("acme") is None
    second, created = state_store.open_rotation(rotation("rot-2", observed_version="v3"))
    assert created and second.rotation_id == "rot-2"
    assert [r.rotation_id for r in state_store.list_rotations("acme")] == ["rot-2", "rot-1"]
    assert [r.rotation_id for r in state_store.list_rotations(states=[RotationState.CANCELLED])] == ["rot-1"]


def test_a_challenge_is_consumed_exactly_once(state_store):
    tenant(state_store)
    state_store.open_rotation(rotation())
    state_store.update_rotation(
        "rot-1", expect=[RotationState.DETECTED], state=RotationState.AWAITING, nonce="n-1", details={"a": 1}
    )
    with pytest.raises(StateError, match="another confirmation challenge"):
        state_store.update_rotation(
            "rot-1", expect=[RotationState.AWAITING], match_nonce="forged", state=RotationState.CONFIRMED
        )
    assert state_store.get_rotation("rot-1").state is RotationState.AWAITING

    results: list[str] = []

    def consume() -> None:
        try:
            state_store.update_rotation(
                "rot-1",
                expect=[RotationState.AWAITING],
                match_nonce="n-1",
                state=RotationState.CONFIRMED,
                confirmed_by="officer",
                details={"b": 2},
            )
            results.append("ok")
        except StateError:
            results.append("refused")

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]
    done = state_store.get_rotation("rot-1")
    assert done.state is RotationState.CONFIRMED and done.confirmed_by == "officer"
    assert done.details == {"a": 1, "b": 2}  # merged
    with pytest.raises(StateError, match="is confirmed, not awaiting"):
        state_store.update_rotation(
            "rot-1", expect=[RotationState.AWAITING], match_nonce="n-1", state=RotationState.CONFIRMED
        )


def test_update_rotation_refuses_unknown_fields_and_rotations(state_store):
    tenant(state_store)
    state_store.open_rotation(rotation())
    with pytest.raises(ValidationError, match="cannot change tenant_id"):
        state_store.update_rotation("rot-1", expect=[RotationState.DETECTED], tenant_id="other")
    with pytest.raises(StateError, match="no rotation"):
        state_store.update_rotation("nope", expect=[RotationState.DETECTED], state=RotationState.CANCELLED)
    with pytest.raises(ValidationError, match="kind"):
        state_store.open_rotation(rotation("rot-x", kind="sideways"))
