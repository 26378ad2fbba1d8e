"""The console API, endpoint by endpoint: the happy path, a role without the permission
(403), another tenant's ids (404, never 403), malformed input (422 naming the field) and
unknown ids (404). The platform is the in-memory one (held to the contract suites); runs
are submitted to a recording launcher (held to the launcher contract). A run through a
real worker is tests/integration/test_console_worker_e2e.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console_fixtures import ACME, CUSTOMER_KEY, GLOBEX, ConsoleHarness

from archive_kms.migration import plan_enable, trigger
from archive_kms.migration.quarantine import Quarantine
from archive_kms.state.audit import verify_export
from archive_kms.state.port import CopyRecord, CopyStatus, ManifestEntry, RunState, StepState

ADMIN, OFFICER, SUPPORT, PLATFORM = "tenant_admin", "security_officer", "support_engineer", "platform_admin"


@pytest.fixture(scope="module")
def _harness(tmp_path_factory):
    harness = ConsoleHarness(tmp_path_factory.mktemp("console"))
    yield harness
    harness.close()


@pytest.fixture
def h(_harness, tmp_path):
    return _harness.reset(tmp_path)


def failed_run(h: ConsoleHarness, tenant: str = GLOBEX, *, quarantined: bytes | None = None) -> str:
    """A run of ``tenant`` that failed at preflight (and, if asked, holds one quarantined object)."""
    p = h.platform
    run, _ = trigger(p, plan_enable(p, tenant, "byokms", CUSTOMER_KEY), actor="test")
    p.state.update_step(run.run_id, "preflight", StepState.RUNNING)
    p.state.update_step(run.run_id, "preflight", StepState.FAILED, error="KeyUnavailableError: key disabled")
    p.state.set_run_state(run.run_id, RunState.FAILED)
    if quarantined is not None:
        p.state.create_manifest(run.run_id, run.params["source"])
        p.state.add_manifest_entries(run.run_id, [ManifestEntry(quarantined, 10)])
        error = Quarantine(reason="IntegrityError: tag mismatch", attempts=3).to_error()
        p.state.record_copy(run.run_id, CopyRecord(quarantined, CopyStatus.QUARANTINED, error=error))
    return run.run_id


def completed_run(h: ConsoleHarness) -> str:
    return h.platform.state.list_runs(ACME)[0].run_id


def assert_error(resp, status: int, *words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error", "detail"}, body
    for w in words:
        assert w in body["detail"], (w, body)
    assert "Traceback" not in resp.text


# --- authentication ------------------------------------------------------------------------------


def test_health_needs_no_token_and_everything_else_does(h):
    assert h.client.get("/api/health").json() == {"status": "ok"}
    assert_error(h.client.get("/api/me"), 401, "missing bearer token")
    resp = h.client.get("/api/tenants", headers={"Authorization": "Bearer not.a.jwt"})
    assert_error(resp, 401, "bearer token")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_me_says_who_and_what(h):
    me = h.call("GET", "/api/me", ADMIN).json()
    assert (me["subject"], me["role"], me["tenant"]) == ("alice", ADMIN, ACME)
    assert "migrate" in me["permissions"] and "support" not in me["permissions"]


def test_forged_expired_and_foreign_tokens_are_refused(h):
    from datetime import UTC, datetime, timedelta

    from archive_kms.api.auth import TokenKeys, issue_token

    other_keys = TokenKeys.generate()
    forged = issue_token(other_keys, subject="mallory", role=PLATFORM)
    assert_error(h.client.get("/api/me", headers={"Authorization": f"Bearer {forged}"}), 401, "unknown key")
    old = issue_token(
        h.keys,
        subject="alice",
        role=ADMIN,
        tenant_id=ACME,
        ttl=timedelta(seconds=60),
        now=datetime.now(UTC) - timedelta(hours=1),
    )
    assert_error(h.client.get("/api/me", headers={"Authorization": f"Bearer {old}"}), 401, "expired")
    # a token whose signature was tampered with (payload changed: role raised)
    head, payload, sig = h.token(ADMIN).split(".")
    import base64

    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = PLATFORM
    raised = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    resp = h.client.get("/api/me", headers={"Authorization": f"Bearer {head}.{raised}.{sig}"})
    assert_error(resp, 401, "signature")


def test_a_subject_is_exactly_the_documented_characters(h, monkeypatch):
    """docs/console-api.md: `sub` is 1-128 ASCII letters, digits and `. _ @ : + -`, starting with a
    letter or digit; "alice\n" is not "alice" (a second person to dual control) nor a valid sub."""
    import time
    import uuid

    from archive_kms.api.auth import issue_token
    from archive_kms.errors import ValidationError

    monkeypatch.setattr(h.console, "auth_failure_limit", 10**9)  # six bad tokens in a row are the point here
    for bad in ("alice\n", "-alice", "al ice", "é", "a" * 129, ""):
        with pytest.raises(ValidationError, match="sub: "):
            issue_token(h.keys, subject=bad, role=PLATFORM)
        now = int(time.time())
        claims = {"iss": "archive-kms", "aud": "archive-kms-console", "sub": bad, "role": PLATFORM}
        signed = h.keys.sign({**claims, "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex})
        assert_error(h.client.get("/api/me", headers={"Authorization": f"Bearer {signed}"}), 401)
    assert issue_token(h.keys, subject="a" * 128, role=PLATFORM)


def test_token_failures_are_rate_limited_per_client(h):
    for _ in range(5):
        assert h.client.get("/api/me", headers={"Authorization": "Bearer x.y.z"}).status_code == 401
    blocked = h.client.get("/api/me", headers={"Authorization": "Bearer x.y.z"})
    assert_error(blocked, 429, "too many bad tokens")
    assert blocked.headers["retry-after"] == "60"
    # a good token from the same client is refused too until the window ends
    assert h.call("GET", "/api/me", ADMIN).status_code == 429
    h.clock.advance(seconds=61)
    assert h.call("GET", "/api/me", ADMIN).status_code == 200


# --- tenants ---------------------------------------------------------------------------------------


def test_tenants_lists_only_the_callers_tenant_with_key_mode_and_state(h):
    rows = h.call("GET", "/api/tenants", ADMIN).json()
    assert [r["tenant"] for r in rows] == [ACME]
    (acme,) = rows
    assert acme["key_mode"] == "byokms" and acme["key_state"]["state"] == "active"
    assert acme["location"].startswith("s3://") and acme["gate"] == {"state": "open", "pending": 0}
    assert set(acme["actions"]) == {"enable", "remove", "confirm_rotation"}  # erase, check_rotation: key_lifecycle
    everyone = h.call("GET", "/api/tenants", SUPPORT, tenant=None).json()
    assert {r["tenant"] for r in everyone} == {ACME, GLOBEX}
    assert all(r["actions"] == [] for r in everyone)  # support: no key actions


@pytest.mark.parametrize(
    ("role", "tenant_claim", "path", "status"),
    [
        (ADMIN, ACME, f"/api/tenants/{ACME}", 200),
        (ADMIN, ACME, f"/api/tenants/{GLOBEX}", 404),  # another tenant: as if it did not exist
        (ADMIN, ACME, "/api/tenants/nope", 404),  # unknown
        (ADMIN, ACME, "/api/tenants/Bad..Id", 404),  # malformed id: never looked up
        (SUPPORT, None, f"/api/tenants/{GLOBEX}", 200),
    ],
)
def test_get_tenant(h, role, tenant_claim, path, status):
    resp = h.call("GET", path, role, tenant=tenant_claim)
    assert resp.status_code == status, resp.text
    if status == 404:
        assert_error(resp, 404, "unknown tenant")


@pytest.mark.parametrize(
    ("role", "tenant_claim", "path", "status", "words"),
    [
        (ADMIN, ACME, f"/api/tenants/{ACME}/blast-radius?action=remove", 200, ()),
        (SUPPORT, None, f"/api/tenants/{ACME}/blast-radius?action=remove", 403, ("support_engineer",)),
        (ADMIN, GLOBEX, f"/api/tenants/{ACME}/blast-radius?action=remove", 404, ("unknown tenant",)),
        (ADMIN, ACME, f"/api/tenants/{ACME}/blast-radius?action=bogus", 422, ("action",)),
        (ADMIN, ACME, f"/api/tenants/{ACME}/blast-radius", 422, ("action",)),
        (PLATFORM, None, "/api/tenants/nope/blast-radius?action=remove", 404, ("unknown tenant",)),
        (PLATFORM, None, f"/api/tenants/{GLOBEX}/blast-radius?action=remove", 422, ("nothing to remove",)),
    ],
)
def test_blast_radius(h, role, tenant_claim, path, status, words):
    resp = h.call("GET", path, role, tenant=tenant_claim)
    if status != 200:
        assert_error(resp, status, *words)
        return
    b = resp.json()
    objects = list(h.platform.store_for(h.platform.location_of(ACME)).list())
    assert (b["objects"], b["bytes"]) == (len(objects), sum(o.size for o in objects))
    assert b["index"] == h.platform.index.current_index(ACME) and b["index_documents"] == 6
    assert b["queued_jobs"] == 0 and b["running_runs"] == []
    assert any("delete" in w for w in b["would"]) and b["key_mode"] == "byokms"


# --- actions: enable, remove -------------------------------------------------------------------------


def test_enable_submits_the_deployment_and_returns_the_run(h):
    resp = h.call(
        "POST", f"/api/tenants/{GLOBEX}/enable", ADMIN, tenant=GLOBEX, json={"mode": "byokms", "key_ref": CUSTOMER_KEY}
    )
    assert resp.status_code == 202, resp.text
    out = resp.json()
    assert out["status"] == "started"
    run = out["run"]
    assert run["created"] and run["deployment"] == "migration-enable/enable"
    assert run["progress_url"] == f"/api/runs/{run['run_id']}"
    (sub,) = h.launcher.submitted
    assert sub["parameters"]["run_id"] == run["run_id"] and sub["parameters"]["mode"] == "byokms"
    assert sub["parameters"]["actor"] == f"console:{ADMIN}:alice"
    assert f"tenant:{GLOBEX}" in sub["tags"] and f"run:{run['run_id']}" in sub["tags"]
    stored = h.platform.state.get_run(run["run_id"])
    assert stored.state is RunState.RUNNING and stored.tenant_id == GLOBEX
    # the same trigger again: the run already going, nothing submitted twice
    again = h.call(
        "POST", f"/api/tenants/{GLOBEX}/enable", ADMIN, tenant=GLOBEX, json={"mode": "byokms", "key_ref": CUSTOMER_KEY}
    ).json()
    assert again["status"] == "already_running" and again["run"]["run_id"] == run["run_id"]
    assert len(h.launcher.submitted) == 1


def test_enable_with_the_deployment_missing_leaves_no_run_behind(h):
    h.launcher.known_deployments.clear()
    resp = h.call(
        "POST", f"/api/tenants/{GLOBEX}/enable", ADMIN, tenant=GLOBEX, json={"mode": "byokms", "key_ref": CUSTOMER_KEY}
    )
    assert_error(resp, 503, "deployment")
    (run,) = h.platform.state.list_runs(GLOBEX)
    assert run.state is RunState.CANCELLED  # nothing of it ran; the tenant is free again


@pytest.mark.parametrize(
    ("role", "tenant_claim", "tenant", "body", "status", "words"),
    [
        (SUPPORT, None, GLOBEX, {"mode": "byokms", "key_ref": CUSTOMER_KEY}, 403, ("support_engineer",)),
        (ADMIN, ACME, GLOBEX, {"mode": "byokms", "key_ref": CUSTOMER_KEY}, 404, ("unknown tenant",)),
        (ADMIN, GLOBEX, GLOBEX, {"mode": "byoxx", "key_ref": CUSTOMER_KEY}, 422, ("mode",)),
        (ADMIN, GLOBEX, GLOBEX, {"mode": "byokms"}, 422, ("key_ref",)),
        (ADMIN, GLOBEX, GLOBEX, {"mode": "byokms", "key_ref": CUSTOMER_KEY, "shards": 0}, 422, ("shards",)),
        (ADMIN, GLOBEX, GLOBEX, {"mode": "byokms", "key_ref": CUSTOMER_KEY, "extra": 1}, 422, ("extra",)),
        (ADMIN, GLOBEX, GLOBEX, {"mode": "byokms", "key_ref": "no-scheme-here"}, 422, ("key",)),
        (PLATFORM, None, "nope", {"mode": "byokms", "key_ref": CUSTOMER_KEY}, 404, ("unknown tenant",)),
        (ADMIN, ACME, ACME, {"mode": "byokms", "key_ref": CUSTOMER_KEY}, 422, ("remove",)),  # already own key
    ],
)
def test_enable_refusals(h, role, tenant_claim, tenant, body, status, words):
    resp = h.call("POST", f"/api/tenants/{tenant}/enable", role, tenant=tenant_claim, json=body)
    assert_error(resp, status, *words)
    assert h.launcher.submitted == []


@pytest.mark.parametrize(
    ("role", "tenant_claim", "tenant", "body", "status", "words"),
    [
        (SUPPORT, None, ACME, {"reason": "offboarding"}, 403, ("support_engineer",)),
        (ADMIN, GLOBEX, ACME, {"reason": "offboarding"}, 404, ("unknown tenant",)),
        (ADMIN, ACME, ACME, {}, 422, ("reason",)),
        (ADMIN, ACME, ACME, {"reason": "line\nbreak"}, 422, ("reason",)),
        (ADMIN, ACME, ACME, {"reason": "x", "shards": 999}, 422, ("shards",)),
        (PLATFORM, None, "nope", {"reason": "x"}, 404, ("unknown tenant",)),
        (PLATFORM, None, GLOBEX, {"reason": "x"}, 422, ("nothing to remove",)),
    ],
)
def test_remove_refusals(h, role, tenant_claim, tenant, body, status, words):
    resp = h.call("POST", f"/api/tenants/{tenant}/remove", role, tenant=tenant_claim, json=body)
    assert_error(resp, status, *words)
    assert h.store.list_requests() == []


def test_remove_with_a_failed_run_in_the_way_is_refused_before_any_request(h):
    from archive_kms.migration import plan_remove

    p = h.platform
    run, _ = trigger(p, plan_remove(p, ACME), actor="test")
    p.state.update_step(run.run_id, "preflight", StepState.RUNNING)
    p.state.update_step(run.run_id, "preflight", StepState.FAILED, error="boom")
    p.state.set_run_state(run.run_id, RunState.FAILED)
    resp = h.call("POST", f"/api/tenants/{ACME}/remove", ADMIN, json={"reason": "offboarding"})
    assert_error(resp, 409, run.run_id, "runs resume", "runs cancel")
    assert h.store.list_requests() == []


def test_remove_asks_for_a_second_approver_and_starts_nothing(h):
    resp = h.call("POST", f"/api/tenants/{ACME}/remove", ADMIN, json={"reason": "offboarding"})
    assert resp.status_code == 202, resp.text
    out = resp.json()
    assert out["status"] == "approval_required" and out["run"] is None
    a = out["approval"]
    assert (a["action"], a["tenant"], a["requested_by"], a["state"], a["approvals_needed"]) == (
        "remove",
        ACME,
        "alice",
        "pending",
        1,
    )
    assert h.launcher.submitted == [] and h.platform.state.find_active_run(ACME) is None
    audited = [r for r in h.platform.state.iter_audit(tenant_id=ACME) if r.action == "approval.request"]
    assert [r.details["request"] for r in audited] == [a["request_id"]]


# --- warnings ----------------------------------------------------------------------------------------


def test_warnings_name_failed_and_waiting_runs_in_scope_only(h):
    run_id = failed_run(h, GLOBEX)
    support = h.call("GET", "/api/warnings", SUPPORT, tenant=None).json()
    (w,) = [x for x in support if x["kind"] == "run_failed"]
    assert (w["tenant"], w["run_id"], w["severity"]) == (GLOBEX, run_id, "critical")
    assert "preflight" in w["message"] and set(w["actions"]) == {"resume", "cancel"}
    assert [x for x in h.call("GET", "/api/warnings", ADMIN).json() if x["tenant"] == GLOBEX] == []
    assert_error(h.call("GET", f"/api/warnings?tenant={GLOBEX}", ADMIN), 404, "unknown tenant")
    assert_error(h.call("GET", "/api/warnings?tenant=nope", SUPPORT, tenant=None), 404, "unknown tenant")


def test_a_run_waiting_on_quarantined_objects_is_a_warning_offering_a_waiver(h):
    run_id = failed_run(h, GLOBEX, quarantined=b"records/ws/Case/1")
    (w,) = h.call("GET", f"/api/warnings?tenant={GLOBEX}", SUPPORT, tenant=None).json()
    assert (w["kind"], w["run_id"], w["details"]) == ("run_waiting", run_id, {"quarantined": 1})
    assert "waive" in w["actions"]


def test_an_unusable_master_key_is_a_warning(h, monkeypatch):
    from archive_kms.keys.port import KeyState, KeyStatus

    status = h.platform.keychain.status(ACME)
    provider = h.platform.resolve_provider(status.l1_ref)
    monkeypatch.setattr(type(provider), "status", lambda self: KeyStatus(self.key_ref, KeyState.DISABLED))
    (w,) = [x for x in h.call("GET", "/api/warnings", ADMIN).json() if x["kind"] == "key_unavailable"]
    assert w["tenant"] == ACME and w["details"]["key_state"] == "disabled"
    assert h.call("GET", f"/api/tenants/{ACME}", ADMIN).json()["key_state"]["state"] == "unavailable"


def test_a_security_alarm_is_a_critical_warning_in_its_tenants_scope(h):
    from archive_kms.alarms import raise_alarm

    raise_alarm(
        h.platform.state,
        "search_binding",
        "alias archive-globex moved to an index we never created",
        tenant_id=GLOBEX,
        details={"index": "archive-globex--9"},
    )
    (w,) = [
        x
        for x in h.call("GET", f"/api/warnings?tenant={GLOBEX}", SUPPORT, tenant=None).json()
        if x["kind"].startswith("alarm_")
    ]
    assert (w["kind"], w["severity"], w["tenant"]) == ("alarm_search_binding", "critical", GLOBEX)
    assert "never created" in w["message"]
    assert not [x for x in h.call("GET", "/api/warnings", ADMIN).json() if x["kind"].startswith("alarm_")]
    raise_alarm(h.platform.state, "audit_fork", "the audit log does not continue its latest anchor")
    assert [x["tenant"] for x in h.call("GET", "/api/warnings", ADMIN).json() if x["kind"] == "alarm_audit_fork"] == [
        "*"
    ]


# --- runs ----------------------------------------------------------------------------------------------


def test_runs_list_and_show_with_steps_progress_and_report(h):
    run_id = completed_run(h)
    rows = h.call("GET", "/api/runs", ADMIN).json()
    assert [r["run_id"] for r in rows] == [run_id] and rows[0]["state"] == "completed"
    shown = h.call("GET", f"/api/runs/{run_id}", ADMIN).json()
    assert next(s["step"] for s in shown["steps"]) == "preflight" and all(
        s["state"] == "completed" for s in shown["steps"]
    )
    assert shown["progress"]["steps_done"] == shown["progress"]["steps"] == 13
    assert shown["report"]["verification"] == "ok" and shown["report"]["lost"] == 0
    assert shown["links"]["self"] == f"/api/runs/{run_id}"


@pytest.mark.parametrize(
    ("role", "tenant_claim", "query", "status", "words"),
    [
        (ADMIN, ACME, f"?tenant={GLOBEX}", 404, ("unknown tenant",)),
        (ADMIN, ACME, "?limit=0", 422, ("limit",)),
        (ADMIN, ACME, "?state=exploded", 422, ("state",)),
        (SUPPORT, None, "?tenant=nope", 404, ("unknown tenant",)),
    ],
)
def test_runs_list_refusals(h, role, tenant_claim, query, status, words):
    assert_error(h.call("GET", f"/api/runs{query}", role, tenant=tenant_claim), status, *words)


def test_runs_list_of_a_tenant_scoped_caller_never_shows_other_tenants(h):
    failed_run(h, GLOBEX)
    assert {r["tenant"] for r in h.call("GET", "/api/runs", ADMIN).json()} == {ACME}
    assert {r["tenant"] for r in h.call("GET", "/api/runs", SUPPORT, tenant=None).json()} == {ACME, GLOBEX}


def test_get_run_of_another_tenant_or_unknown_is_404(h):
    other = failed_run(h, GLOBEX)
    assert_error(h.call("GET", f"/api/runs/{other}", ADMIN), 404, "unknown run")
    assert_error(h.call("GET", "/api/runs/run-doesnotexist", ADMIN), 404, "unknown run")
    assert_error(h.call("GET", "/api/runs/" + "x" * 300, ADMIN), 404, "unknown run")


@pytest.mark.parametrize(
    ("action", "body", "expected"),
    [
        ("resume", {}, {"action": "resume", "takeover": False}),
        ("rerun", {"from_step": "preflight"}, {"action": "rerun", "from_step": "preflight"}),
        ("cancel", {"takeover": True}, {"action": "cancel", "takeover": True}),
    ],
)
def test_support_actions_submit_the_support_deployment(h, action, body, expected):
    run_id = failed_run(h, GLOBEX)
    resp = h.call("POST", f"/api/runs/{run_id}/{action}", SUPPORT, sub="sam", tenant=None, json=body)
    assert resp.status_code == 202, resp.text
    out = resp.json()
    assert out["status"] == "started" and out["run"]["run_id"] == run_id and out["run"]["action"] == action
    (sub,) = h.launcher.submitted
    assert sub["deployment"] == "migration-support/support"
    assert {k: sub["parameters"][k] for k in expected} == expected
    assert sub["parameters"]["actor"] == f"console:{SUPPORT}:sam"
    assert [r.details["action"] for r in h.platform.state.iter_audit(tenant_id=GLOBEX) if r.action == "run.submit"] == [
        action
    ]


@pytest.mark.parametrize("action", ["resume", "rerun", "cancel", "waive"])
@pytest.mark.parametrize(
    ("case", "role", "tenant_claim", "body", "status", "words"),
    [
        ("wrong role", ADMIN, GLOBEX, None, 403, ("tenant_admin",)),
        ("wrong role", OFFICER, GLOBEX, None, 403, ("security_officer",)),
        ("other tenant", SUPPORT, ACME, None, 404, ("unknown run",)),
        ("malformed", SUPPORT, None, {"takeover": "maybe", "reason": "r", "from_step": "copy"}, 422, ("takeover",)),
        ("unknown", SUPPORT, None, "unknown", 404, ("unknown run",)),
    ],
)
def test_support_action_refusals(h, action, case, role, tenant_claim, body, status, words):
    run_id = failed_run(h, GLOBEX, quarantined=b"records/ws/Case/1")
    good = {"resume": {}, "rerun": {"from_step": "copy"}, "cancel": {}, "waive": {"reason": "lost", "all": True}}[
        action
    ]
    target = "run-unknown" if body == "unknown" else run_id
    payload = good if body in (None, "unknown") else body
    resp = h.call("POST", f"/api/runs/{target}/{action}", role, tenant=tenant_claim, json=payload)
    assert_error(resp, status, *words)
    assert h.launcher.submitted == []


def test_rerun_from_an_unknown_step_names_the_field(h):
    run_id = failed_run(h, GLOBEX)
    resp = h.call("POST", f"/api/runs/{run_id}/rerun", SUPPORT, tenant=None, json={"from_step": "copie"})
    assert_error(resp, 422, "from_step")


def test_cancel_of_a_completed_run_is_refused_with_the_reason(h):
    resp = h.call("POST", f"/api/runs/{completed_run(h)}/cancel", SUPPORT, tenant=None, json={})
    assert_error(resp, 422, "cutover")


def test_waive_a_quarantined_object_is_audited(h):
    name = b"records/ws/Case/1"
    run_id = failed_run(h, GLOBEX, quarantined=name)
    resp = h.call(
        "POST",
        f"/api/runs/{run_id}/waive",
        SUPPORT,
        sub="sam",
        tenant=None,
        json={"reason": "customer deleted it", "objects": [name.decode()]},
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["waived"] == [name.decode()] and out["remaining"] == 0
    (rec,) = [r for r in h.platform.state.iter_audit(tenant_id=GLOBEX) if r.action == "object.waive"]
    assert rec.actor == f"console:{SUPPORT}:sam"
    assert_error(
        h.call("POST", f"/api/runs/{run_id}/waive", SUPPORT, tenant=None, json={"reason": "x", "objects": ["nope"]}),
        422,
        "not quarantined",
    )


# --- approvals (listing; the dual-control rules are in test_console_dual_control.py) ----------------------


def _request_removal(h: ConsoleHarness) -> str:
    resp = h.call("POST", f"/api/tenants/{ACME}/remove", ADMIN, json={"reason": "offboarding"})
    assert resp.status_code == 202, resp.text
    return resp.json()["approval"]["request_id"]


def test_approvals_list_and_show_in_scope_only(h):
    rid = _request_removal(h)
    assert [a["request_id"] for a in h.call("GET", "/api/approvals", OFFICER, sub="bob").json()] == [rid]
    assert h.call("GET", "/api/approvals?state=pending", PLATFORM, tenant=None).json()[0]["request_id"] == rid
    assert h.call("GET", "/api/approvals", ADMIN, tenant=GLOBEX).json() == []
    assert h.call("GET", f"/api/approvals/{rid}", OFFICER, sub="bob").json()["state"] == "pending"
    assert_error(h.call("GET", f"/api/approvals/{rid}", ADMIN, tenant=GLOBEX), 404, "unknown approval request")
    assert_error(h.call("GET", "/api/approvals/apr-nope", ADMIN), 404, "unknown approval request")
    assert_error(h.call("GET", "/api/approvals?state=maybe", ADMIN), 422, "state")
    assert_error(h.call("GET", f"/api/approvals?tenant={GLOBEX}", ADMIN), 404, "unknown tenant")


@pytest.mark.parametrize("decision", ["approve", "reject"])
@pytest.mark.parametrize(
    ("case", "role", "tenant_claim", "body", "status", "words"),
    [
        ("wrong role", SUPPORT, None, {}, 403, ("support_engineer",)),
        ("other tenant", OFFICER, GLOBEX, {}, 404, ("unknown approval request",)),
        ("malformed", OFFICER, ACME, {"comment": 5}, 422, ("comment",)),
        ("malformed", OFFICER, ACME, {"comment": "ok", "approve": True}, 422, ("approve",)),
        ("unknown", OFFICER, ACME, "unknown", 404, ("unknown approval request",)),
    ],
)
def test_decision_refusals(h, decision, case, role, tenant_claim, body, status, words):
    rid = _request_removal(h)
    target = "apr-unknown" if body == "unknown" else rid
    resp = h.call(
        "POST",
        f"/api/approvals/{target}/{decision}",
        role,
        sub="bob",
        tenant=tenant_claim,
        json={} if body == "unknown" else body,
    )
    assert_error(resp, status, *words)
    assert h.store.get_request(rid).state.value == "pending" and h.launcher.submitted == []


def test_reject_closes_the_request_and_is_audited(h):
    rid = _request_removal(h)
    out = h.call("POST", f"/api/approvals/{rid}/reject", OFFICER, sub="bob", json={"comment": "not now"}).json()
    assert out["state"] == "rejected"
    assert_error(h.call("POST", f"/api/approvals/{rid}/approve", OFFICER, sub="carol", json={}), 409, "rejected")
    assert [r.action for r in h.platform.state.iter_audit(tenant_id=ACME) if r.action.startswith("approval.")] == [
        "approval.request",
        "approval.reject",
    ]


# --- audit log -------------------------------------------------------------------------------------------


def test_audit_page_export_and_verification(h):
    page = h.call("GET", "/api/audit?limit=5", ADMIN).json()
    assert len(page["records"]) == 5 and all(r["tenant_id"] == ACME for r in page["records"])
    assert page["next_after_seq"] == page["records"][-1]["seq"]
    export = h.call("GET", "/api/audit/export", ADMIN)
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in export.text.splitlines()]
    assert lines[-1]["type"] == "head" and lines[-1]["chain"] == f"tenant:{ACME}"
    assert all(x.get("tenant_id") in (ACME, None) for x in lines)
    # the customer's check: the endpoint, and offline with the published public key
    verdict = h.call(
        "POST", "/api/audit/verify", ADMIN, content=export.content, headers={"Content-Type": "application/x-ndjson"}
    ).json()
    assert verdict["ok"] and verdict["sealed"] and verdict["records"] == len(lines) - 1
    from archive_kms.crypto.signing import Verifier
    from archive_kms.state.audit import SignatureHeadVerifier

    pem = h.call("GET", "/api/audit/public-key", ADMIN).json()["pem"].encode()
    assert verify_export(lines, verifier=SignatureHeadVerifier(Verifier.from_public_pem(pem))).ok
    # one edited record is found
    tampered = list(lines)
    tampered[1] = {**tampered[1], "actor": "someone-else"}
    body = "\n".join(json.dumps(x) for x in tampered).encode()
    verdict = h.call(
        "POST", "/api/audit/verify", ADMIN, content=body, headers={"Content-Type": "application/x-ndjson"}
    ).json()
    assert not verdict["ok"] and verdict["first_bad_seq"] == tampered[1]["seq"]


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "words"),
    [
        ("GET", f"/api/audit?tenant={GLOBEX}", {}, 404, ("unknown tenant",)),
        ("GET", "/api/audit?after_seq=-1", {}, 422, ("after_seq",)),
        ("GET", "/api/audit?limit=100000", {}, 422, ("limit",)),
        ("GET", f"/api/audit/export?tenant={GLOBEX}", {}, 404, ("unknown tenant",)),
        ("PUT", "/api/audit/verify", {}, 405, ()),
        ("GET", "/api/audit/export?tenant=nope", {}, 404, ("unknown tenant",)),
        ("POST", "/api/audit/verify", {"content": b"not json\n"}, 200, ("line 1 is not JSON",)),
        ("POST", "/api/audit/verify", {"content": b""}, 200, ("empty",)),
        ("POST", "/api/audit/verify", {"content": b'{"type": "record"}\n'}, 200, ("exactly one head",)),
        ("POST", "/api/audit/verify", {"content": b"[1, 2]\n"}, 200, ("not a JSON object",)),
    ],
)
def test_audit_refusals(h, method, path, kw, status, words):
    if method == "POST":
        kw = {**kw, "headers": {"Content-Type": "application/x-ndjson"}}
    resp = h.call(method, path, ADMIN, **kw)
    if status == 200:  # a file that does not parse is a failed verification, not an error
        assert resp.status_code == 200 and resp.json()["ok"] is False, resp.text
        for w in words:
            assert w in resp.json()["reason"], resp.json()
        return
    assert_error(resp, status, *words)


def test_unscoped_audit_export_is_the_whole_log(h):
    lines = h.call("GET", "/api/audit/export", PLATFORM, tenant=None).text.splitlines()
    heads = [json.loads(x)["chain"] for x in lines if json.loads(x)["type"] == "head"]
    assert "global" in heads and f"tenant:{GLOBEX}" in heads


# --- the OpenAPI document and the page -------------------------------------------------------------------


def test_openapi_document_lists_every_route_with_bearer_security(h):
    doc = h.client.get("/api/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/api/tenants",
        "/api/tenants/{tenant}",
        "/api/tenants/{tenant}/enable",
        "/api/tenants/{tenant}/remove",
        "/api/tenants/{tenant}/blast-radius",
        "/api/warnings",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/resume",
        "/api/runs/{run_id}/rerun",
        "/api/runs/{run_id}/cancel",
        "/api/runs/{run_id}/waive",
        "/api/approvals",
        "/api/approvals/{request_id}",
        "/api/approvals/{request_id}/approve",
        "/api/approvals/{request_id}/reject",
        "/api/audit",
        "/api/audit/export",
        "/api/audit/verify",
        "/api/audit/public-key",
        "/api/me",
        "/api/health",
    } <= paths
    enable = doc["paths"]["/api/tenants/{tenant}/enable"]["post"]
    assert enable["security"] == [{"HTTPBearer": []}]
    schema = doc["components"]["schemas"]["EnableMode"]
    assert set(schema["enum"]) == {"byokms", "byok", "byokv", "kmip"}


DOCS = Path(__file__).resolve().parents[2] / "docs" / "console-api.md"


def _doc_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_documented_endpoints_are_the_apps_endpoints(h):
    """docs/console-api.md "Endpoints": every row is an operation of the app with the documented
    query parameters, and every operation of the app has its row."""
    doc = h.client.get("/api/openapi.json").json()
    served = {
        (method.upper(), path): sorted(p["name"] for p in op.get("parameters", []) if p["in"] == "query")
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    documented = {}
    for m in re.finditer(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/\S*?)(\[?\?[^`]*)?` \|", _doc_section("Endpoints"), re.M):
        method, path, query = m.group(1), m.group(2), m.group(3) or ""
        if path == "/" or path == "/openapi.json":  # the page, and the document itself
            continue
        documented[(method, "/api" + path)] = sorted(re.findall(r"[?&](\w+)=", query))
    assert documented.keys() == served.keys(), (
        sorted(documented.keys() - served.keys()),
        sorted(served.keys() - documented.keys()),
    )
    for op, params in documented.items():
        assert params == served[op], (op, params, served[op])
    assert h.client.get("/api/openapi.json").status_code == 200 and h.client.get("/").status_code == 200


def test_the_documented_roles_hold_the_documented_permissions():
    """docs/console-api.md "Roles": a cell other than "no" is the permission held."""
    from archive_kms.api.auth import ROLE_PERMISSIONS, Permission, Role

    rows = re.findall(r"^\| `(\w+)`[^|]* \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", _doc_section("Roles"), re.M)
    roles = [Role.TENANT_ADMIN, Role.SECURITY_OFFICER, Role.SUPPORT_ENGINEER, Role.PLATFORM_ADMIN]
    assert {r[0] for r in rows} == {p.value for p in Permission}
    for permission, *cells in rows:
        for role, cell in zip(roles, cells, strict=True):
            held = Permission(permission) in ROLE_PERMISSIONS[role]
            assert held == (cell.strip() != "no"), (permission, role, cell)


def test_every_error_kind_the_console_answers_is_in_the_documented_table():
    """docs/console-api.md "Errors": each (status, kind) the API code raises is a row of the table
    (500 `internal` is the prose under it)."""
    table = {
        int(m.group(1)): set(re.findall(r"`(\w+)`", m.group(2)))
        for m in re.finditer(r"^\| (\d{3}) \| ([^|]+) \|", _doc_section("Errors"), re.M)
    }
    source = "\n".join(
        p.read_text() for p in (Path(__file__).resolve().parents[2] / "src/archive_kms/api").glob("*.py")
    )
    raised = set(re.findall(r"(?:ApiError|_json_error)\(\s*(\d{3}),\s*\"(\w+)\"", source))
    raised |= {
        (str(s), k) for s, k in re.findall(r"(\d{3}): \"(\w+)\"", source.split("kinds = {", 1)[1].split("}", 1)[0])
    }
    assert len(raised) >= 12, raised
    undocumented = sorted(
        (s, k) for s, k in raised if k not in table.get(int(s), set()) and (s, k) != ("500", "internal")
    )
    assert not undocumented
    assert "500 with a reference" in _doc_section("Errors")


def test_each_documented_error_has_its_documented_status_and_kind(h):
    """docs/console-api.md "Errors": the table's kinds, answered by a request of each kind."""
    table = {
        int(m.group(1)): set(re.findall(r"`(\w+)`", m.group(2)))
        for m in re.finditer(r"^\| (\d{3}) \| ([^|]+) \|", _doc_section("Errors"), re.M)
    }
    json_type = {"Content-Type": "application/json"}
    cases = [
        (400, h.call("POST", f"/api/tenants/{ACME}/enable", ADMIN, content=b"{not json", headers=json_type)),
        (401, h.call("GET", "/api/tenants", None)),
        (403, h.call("POST", f"/api/tenants/{ACME}/enable", SUPPORT, json={"mode": "byokms", "key_ref": CUSTOMER_KEY})),
        (404, h.call("GET", "/api/tenants/no-such-tenant", PLATFORM, tenant=None)),
        (405, h.call("DELETE", "/api/tenants", ADMIN)),
        (415, h.call("POST", "/api/audit/verify", ADMIN, content=b"{}\n", headers={"Content-Type": "text/plain"})),
        (422, h.call("POST", f"/api/tenants/{ACME}/enable", ADMIN, json={"mode": "nope", "key_ref": CUSTOMER_KEY})),
    ]
    for status, resp in cases:
        assert resp.status_code == status, (status, resp.text)
        assert resp.json()["error"] in table[status], (status, resp.json(), table[status])
        assert set(resp.json()) == {"error", "detail"} and "\n" not in resp.json()["detail"]
    assert cases[1][1].headers["WWW-Authenticate"] == "Bearer"
    assert cases[4][1].headers["Allow"] == "GET"
    assert "mode" in cases[6][1].json()["detail"]


def test_the_page_is_served(h):
    page = h.client.get("/")
    assert page.status_code == 200 and "Archive Console" in page.text
    assert h.client.get("/static/app.js").status_code == 200


def test_audit_verify_takes_jsonl_only(h):
    resp = h.call("POST", "/api/audit/verify", ADMIN, content=b'{"type": "head"}\n')  # no Content-Type
    assert_error(resp, 415, "application/x-ndjson")


# --- key lifecycle: rotation with confirmation ------------------------------------------------------


def test_a_customer_rotation_is_checked_warned_and_confirmed_through_the_console(h):
    from archive_kms.migration import engine
    from archive_kms.migration.rotation_monitor import observe
    from archive_kms.state.port import RotationState

    p = h.platform
    observe(p, ACME)  # the version known so far
    provider = p.resolve_provider(p.keychain.status(ACME).l1_ref)
    provider._kms.rotate(provider._ref.name)  # the customer rotates
    assert_error(h.call("POST", f"/api/tenants/{ACME}/check_rotation", ADMIN, json={}), 403)  # key_lifecycle only
    started = h.call("POST", f"/api/tenants/{ACME}/check_rotation", OFFICER, json={})
    assert started.status_code == 202, started.text
    run_id = started.json()["run"]["run_id"]
    assert h.launcher.submitted[-1]["deployment"] == "key-rotate/rotate"
    assert engine.execute(p, run_id, actor="worker", handle_signals=False).state == engine.WAITING
    (w,) = [x for x in h.call("GET", "/api/warnings", ADMIN).json() if x["kind"] == "rotation_detected"]
    assert w["actions"] == ["confirm_rotation"] and w["run_id"] == run_id
    rotation_id = w["details"]["rotation_id"]
    body = {"rotation_id": rotation_id}
    assert_error(h.call("POST", f"/api/tenants/{ACME}/confirm_rotation", SUPPORT, tenant=None, json=body), 403)
    assert h.call("POST", f"/api/tenants/{ACME}/confirm_rotation", ADMIN, json={"rotation_id": "nope"}).status_code in (
        404,
        409,
    )
    ok = h.call("POST", f"/api/tenants/{ACME}/confirm_rotation", ADMIN, json={"rotation_id": rotation_id})
    assert ok.status_code == 202, ok.text
    assert h.launcher.submitted[-1]["parameters"] == {**h.launcher.submitted[-1]["parameters"], "action": "resume"}
    assert p.state.get_rotation(rotation_id).state is RotationState.CONFIRMED
    again = h.call("POST", f"/api/tenants/{ACME}/confirm_rotation", ADMIN, json={"rotation_id": rotation_id})
    assert again.status_code == 409, again.text
    assert engine.resume(p, run_id, actor="worker", handle_signals=False).state == "completed"
    assert [x for x in h.call("GET", "/api/warnings", ADMIN).json() if x["kind"] == "rotation_detected"] == []


# --- key lifecycle actions: the refusals every action gets -------------------------------------------

KEY_ACTION_BODIES = {
    "revoke": {"reason": "incident 42"},
    "restore": {"reason": "incident 42 closed"},
    "erase": {"reason": "retention", "scope": {"workspace": "default"}},
    "check_rotation": {},
    "confirm_rotation": {"rotation_id": "0" * 32},
}


@pytest.mark.parametrize("action", sorted(KEY_ACTION_BODIES))
@pytest.mark.parametrize(
    ("role", "tenant_claim", "tenant", "extra", "status", "words"),
    [
        (SUPPORT, None, ACME, {}, 403, ("support_engineer",)),  # support never takes a key action
        (OFFICER, GLOBEX, ACME, {}, 404, ("unknown tenant",)),  # another tenant: as if it did not exist
        (PLATFORM, None, "nope", {}, 404, ("unknown tenant",)),  # unknown
        (PLATFORM, None, "Bad..Id", {}, 404, ()),  # malformed id: never looked up
        (OFFICER, ACME, ACME, {"extra": 1}, 422, ("extra",)),  # malformed body
    ],
    ids=["wrong-role", "other-tenant", "unknown-tenant", "malformed-id", "malformed-body"],
)
def test_key_lifecycle_action_refusals(h, action, role, tenant_claim, tenant, extra, status, words):
    """revoke, restore, erase, check_rotation and confirm_rotation refuse like every tenant
    action, and a refusal submits nothing, requests no approval and changes no key."""
    before = h.platform.keychain.status(ACME)
    body = {**KEY_ACTION_BODIES[action], **extra}
    resp = h.call("POST", f"/api/tenants/{tenant}/{action}", role, tenant=tenant_claim, json=body)
    assert_error(resp, status, *words)
    assert h.launcher.submitted == [] and h.store.list_requests() == []
    assert h.platform.keychain.status(ACME) == before
    assert h.platform.state.list_rotations(ACME) == []


def test_a_tenant_admin_cannot_revoke_restore_or_erase(h):
    for action in ("revoke", "restore", "erase", "check_rotation"):
        resp = h.call("POST", f"/api/tenants/{ACME}/{action}", ADMIN, json=KEY_ACTION_BODIES[action])
        assert_error(resp, 403, "tenant_admin")
    assert h.launcher.submitted == []


def test_revoke_from_the_console_is_in_force_when_it_answers_and_restore_needs_two_people(h):
    from archive_kms.errors import TenantRevokedError

    archive = h.platform.open_archive(ACME)
    name = next(iter(archive.store.list())).name
    b"".join(archive.read_object(name))  # readable before
    resp = h.call("POST", f"/api/tenants/{ACME}/revoke", OFFICER, json=KEY_ACTION_BODIES["revoke"])
    assert resp.status_code == 202, resp.text
    assert h.launcher.submitted[-1]["deployment"] == "key-revoke/revoke"
    with pytest.raises(TenantRevokedError):
        b"".join(h.platform.open_archive(ACME).read_object(name))
    # restore: a request, not a run, until a second, different person approves
    asked = h.call("POST", f"/api/tenants/{ACME}/restore", OFFICER, json=KEY_ACTION_BODIES["restore"])
    assert asked.status_code == 202 and asked.json()["status"] == "approval_required", asked.text
    assert h.launcher.submitted[-1]["deployment"] == "key-revoke/revoke"  # nothing new submitted
