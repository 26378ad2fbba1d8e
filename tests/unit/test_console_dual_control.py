"""Dual control on the console: a remove request needs a second, *different* person before
its run starts; the request and every decision are audited; a request expires."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console_fixtures import ACME, ConsoleHarness

ADMIN, OFFICER, PLATFORM = "tenant_admin", "security_officer", "platform_admin"


@pytest.fixture(scope="module")
def _harness(tmp_path_factory):
    harness = ConsoleHarness(tmp_path_factory.mktemp("console"))
    yield harness
    harness.close()


@pytest.fixture
def h(_harness, tmp_path):
    return _harness.reset(tmp_path)


def request_removal(h: ConsoleHarness, sub: str = "alice") -> str:
    resp = h.call("POST", f"/api/tenants/{ACME}/remove", ADMIN, sub=sub, json={"reason": "offboarding", "shards": 2})
    assert resp.status_code == 202, resp.text
    return resp.json()["approval"]["request_id"]


def approval_actions(h: ConsoleHarness) -> list[tuple[str, str]]:
    return [
        (r.action, r.actor) for r in h.platform.state.iter_audit(tenant_id=ACME) if r.action.startswith("approval.")
    ]


def nothing_started(h: ConsoleHarness) -> bool:
    return h.launcher.submitted == [] and h.platform.state.find_active_run(ACME) is None


def test_one_approver_is_not_enough(h):
    rid = request_removal(h)
    assert h.store.get_request(rid).state.value == "pending"
    assert nothing_started(h)
    assert h.call("GET", f"/api/approvals/{rid}", ADMIN).json()["approvals_needed"] == 1


def test_the_same_person_twice_is_not_enough(h):
    rid = request_removal(h, sub="alice")
    again = h.call("POST", f"/api/approvals/{rid}/approve", ADMIN, sub="alice", json={})
    assert again.status_code == 409 and "different person" in again.json()["detail"]
    # the same subject under another role is still the same person
    other_role = h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub="alice", json={})
    assert other_role.status_code == 409
    assert nothing_started(h)
    assert h.store.get_request(rid).state.value == "pending"
    assert approval_actions(h) == [("approval.request", f"console:{ADMIN}:alice")]


def test_two_different_approvers_run_it(h):
    rid = request_removal(h, sub="alice")
    resp = h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub="bob", json={"comment": "agreed"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "started"
    run_id = out["run"]["run_id"]
    assert out["approval"]["state"] == "executed" and out["approval"]["run_id"] == run_id
    assert [v["voter"] for v in out["approval"]["votes"]] == ["alice", "bob"]
    (sub,) = h.launcher.submitted
    assert sub["deployment"] == "migration-remove/remove"
    assert sub["parameters"]["run_id"] == run_id and sub["parameters"]["shards"] == 2
    assert sub["parameters"]["actor"] == "console:alice+bob"
    run = h.platform.state.get_run(run_id)
    assert run.flow.value == "remove" and run.state.value == "running"
    assert approval_actions(h) == [
        ("approval.request", f"console:{ADMIN}:alice"),
        ("approval.approve", f"console:{OFFICER}:bob"),
        ("approval.execute", f"console:{OFFICER}:bob"),
    ]
    (execute,) = [r for r in h.platform.state.iter_audit(tenant_id=ACME) if r.action == "approval.execute"]
    assert execute.run_id == run_id and execute.details["request"] == rid
    # a third approval changes nothing: the request is done
    late = h.call("POST", f"/api/approvals/{rid}/approve", PLATFORM, sub="carol", tenant=None, json={})
    assert late.status_code == 409 and "executed" in late.json()["detail"]
    assert len(h.launcher.submitted) == 1


def test_an_expired_approval_does_nothing(h):
    rid = request_removal(h, sub="alice")
    h.clock.advance(minutes=31)  # the harness's requests live 30 minutes
    resp = h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub="bob", json={})
    assert resp.status_code == 409 and "expired" in resp.json()["detail"], resp.text
    assert nothing_started(h)
    assert h.store.get_request(rid).state.value == "expired"
    assert [a for a, _ in approval_actions(h)] == ["approval.request", "approval.expire"]
    # and stays expired: a later approval is refused as well
    assert (
        h.call("POST", f"/api/approvals/{rid}/approve", PLATFORM, sub="carol", tenant=None, json={}).status_code == 409
    )
    assert nothing_started(h)


def test_listing_expires_overdue_requests(h):
    rid = request_removal(h)
    h.clock.advance(hours=2)
    (row,) = h.call("GET", "/api/approvals", OFFICER, sub="bob").json()
    assert (row["request_id"], row["state"]) == (rid, "expired")


def test_two_approvers_racing_start_one_run(h):
    rid = request_removal(h, sub="alice")

    def approve(sub: str) -> int:
        return h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub=sub, json={}).status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = list(pool.map(approve, ["bob", "carol"]))
    assert sorted(codes)[0] == 200, codes
    assert len(h.launcher.submitted) == 1
    assert h.store.get_request(rid).state.value == "executed"


def test_an_approved_request_whose_run_cannot_start_is_recorded_failed(h):
    rid = request_removal(h, sub="alice")
    h.launcher.known_deployments.clear()  # the orchestrator lost its deployments
    resp = h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub="bob", json={})
    assert resp.status_code == 503 and "deployment" in resp.json()["detail"]
    req = h.store.get_request(rid)
    assert req.state.value == "failed" and "ConfigurationError" in req.error
    assert h.platform.state.find_active_run(ACME) is None  # the triggered run was cancelled
    assert [a for a, _ in approval_actions(h)][-1] == "approval.fail"
