"""The console's tables (``state.console.ConsoleStore``) on SQLite and PostgreSQL: approval
requests and their votes, the compare-and-set that lets exactly one approver start the run,
and the per-client token-failure window of the rate limit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.errors import StateError, ValidationError
from archive_kms.state.console import ApprovalState, ConsoleStore

pytestmark = pytest.mark.parametrize("state_backend", ["sqlite", "postgresql"], indirect=True)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(state_store):
    return ConsoleStore(state_store)


def new_request(store: ConsoleStore, **kw):
    args = dict(
        tenant_id="acme",
        action="remove",
        params={"reason": "x", "shards": None},
        requested_by="alice",
        role="tenant_admin",
        reason="x",
        now=T0,
        ttl=timedelta(minutes=10),
    )
    return store.create_request(**(args | kw))


def test_a_request_starts_pending_with_the_requesters_vote(store):
    r = new_request(store)
    assert (r.state, r.voters, r.expires_at) == (ApprovalState.PENDING, {"alice"}, T0 + timedelta(minutes=10))
    assert store.get_request(r.request_id) == r
    assert store.get_request("apr-nope") is None
    assert not r.expired(T0 + timedelta(minutes=9)) and r.expired(T0 + timedelta(minutes=10))


def test_votes_are_once_per_voter_and_never_decide(store):
    r = new_request(store)
    store.vote(r.request_id, voter="bob", role="security_officer", now=T0)
    again = store.vote(r.request_id, voter="bob", role="security_officer", now=T0 + timedelta(seconds=1))
    assert [v.voter for v in again.votes] == ["alice", "bob"] and again.state is ApprovalState.PENDING


def test_exactly_one_claimer_wins_and_finish_records_the_run(store):
    r = new_request(store)
    with ThreadPoolExecutor(max_workers=4) as pool:
        won = list(pool.map(lambda _: store.claim_approved(r.request_id, now=T0), range(4)))
    assert won.count(True) == 1
    done = store.finish(r.request_id, run_id="run-1")
    assert (done.state, done.run_id) == (ApprovalState.EXECUTED, "run-1")
    with pytest.raises(StateError):
        store.finish(r.request_id, run_id="run-2")
    with pytest.raises(StateError):
        store.vote(r.request_id, voter="carol", role="platform_admin", now=T0)


def test_close_as_rejected_or_expired_only_from_pending(store):
    r = new_request(store)
    assert store.close_request(r.request_id, ApprovalState.EXPIRED, now=T0).state is ApprovalState.EXPIRED
    assert store.close_request(r.request_id, ApprovalState.REJECTED, now=T0).state is ApprovalState.EXPIRED
    assert not store.claim_approved(r.request_id, now=T0)
    with pytest.raises(ValidationError):
        store.close_request(r.request_id, ApprovalState.EXECUTED, now=T0)


def test_listing_filters_by_tenant_and_state_newest_first(store):
    a = new_request(store, tenant_id="acme", now=T0)
    b = new_request(store, tenant_id="globex", now=T0 + timedelta(seconds=1))
    c = new_request(store, tenant_id="acme", now=T0 + timedelta(seconds=2))
    store.close_request(c.request_id, ApprovalState.REJECTED, now=T0)
    assert [r.request_id for r in store.list_requests()] == [c.request_id, b.request_id, a.request_id]
    assert [r.request_id for r in store.list_requests(tenant_ids=["acme"], state=ApprovalState.PENDING)] == [
        a.request_id
    ]


def test_auth_failures_count_within_a_window_per_client(store):
    w = timedelta(minutes=1)
    assert store.auth_failures("10.0.0.1", now=T0, window=w) == 0
    counts = [store.record_auth_failure("10.0.0.1", now=T0 + timedelta(seconds=i), window=w) for i in range(3)]
    assert counts == [1, 2, 3]
    assert store.auth_failures("10.0.0.1", now=T0 + timedelta(seconds=30), window=w) == 3
    assert store.auth_failures("10.0.0.2", now=T0, window=w) == 0
    assert store.auth_failures("10.0.0.1", now=T0 + timedelta(seconds=61), window=w) == 0
    assert store.record_auth_failure("10.0.0.1", now=T0 + timedelta(seconds=61), window=w) == 1
