"""The erase flow on the in-memory platform: erasure by time bucket (retention) and of a
whole workspace takes the keys, the objects and their index documents, leaves everything
else readable and searchable, and signs a record that verifies offline (and a tampered one
does not); a failure injected after every step's side effects is resumed to the same end;
revoked keyed tenants and bad scopes are refused; the scheduled retention decides per
tenant (issue #14; issue #11 finding 6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from archive_kms.crypto.signing import Verifier
from archive_kms.errors import KeyDestroyedError, KeyUnavailableError, TransientError, ValidationError
from archive_kms.migration import engine
from archive_kms.migration.erase import (
    ERASE_STEP_FUNCTIONS,
    ERASE_STEPS,
    certificate_json,
    plan_erase,
    plan_retention_erasures,
)
from archive_kms.operations.archive import RECORD_PREFIX, JobSpec, submit_job
from archive_kms.operations.erasure import erasure_blast_radius
from archive_kms.operations.erasure_record import verify_certificate
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query

TENANT = "acme"
T0 = datetime(2030, 1, 1, 10, 15, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at.timestamp()


def job(job_id: str, count: int, offset: int, tenant: str = TENANT) -> JobSpec:
    return JobSpec(
        job_id,
        tenant,
        "synthetic",
        synthetic={"count": count, "seed": 11, "offset": offset, "mix": "small", "workspaces": 2},
    )


def two_hours(key_ref: str | None = None) -> tuple[Platform, Clock, set[bytes], set[bytes]]:
    """A tenant with 8 records archived at T0 and 6 more two hours later (other buckets)."""
    clock = Clock(T0)
    p = Platform.in_memory(clock=clock)
    create_tenant(p, TENANT, cloud="s3", provision_storage=False, key_ref=key_ref)
    store = p.store_for(p.location_of(TENANT))
    assert submit_job(p.state, job("old", 8, 0), p.open_archive).decision == "run"
    old = {i.name for i in store.list()}
    clock.at = T0 + timedelta(hours=2)
    assert submit_job(p.state, job("new", 6, 100), p.open_archive).decision == "run"
    new = {i.name for i in store.list()} - old
    return p, clock, old, new


def names(p: Platform) -> set[bytes]:
    return {i.name for i in p.store_for(p.location_of(TENANT)).list()}


def searchable(p: Platform) -> set[tuple[str, str, str]]:
    result = p.open_archive(TENANT).search(Query(limit=1000))
    assert not result.failures
    return {(h.workspace_id, h.object_type, h.record_id) for h in result.hits}


def records_of(objects: set[bytes]) -> set[tuple[str, str, str]]:
    out = set()
    for n in objects:
        if n.startswith(RECORD_PREFIX):
            _, ws, typ, rid = n.decode().split("/", 3)
            out.add((ws, typ, rid))
    return out


def run(p: Platform, plan: Any) -> Any:
    started, created = engine.trigger(p, plan, actor="test")
    assert created
    return engine.execute(p, started.run_id, actor="test", handle_signals=False)


def readable(p: Platform, name: bytes) -> bool:
    try:
        b"".join(p.open_archive(TENANT).read_object(name))
        return True
    except KeyDestroyedError:
        return False


@pytest.mark.parametrize("key_ref", [None, "memory://customer-1"], ids=["managed", "keyed"])
def test_retention_erasure_takes_keys_objects_and_documents_of_expired_buckets_only(key_ref):
    p, clock, old, new = two_hours(key_ref)
    assert searchable(p) == records_of(old | new)
    cutoff = T0 + timedelta(hours=1)
    preview = erasure_blast_radius(p, TENANT, before=cutoff, now=clock.at)
    assert (preview.objects, preview.records, preview.deks) == (len(old), len(records_of(old)), 2)
    assert names(p) == old | new  # the dry run changed nothing

    outcome = run(p, plan_erase(p, TENANT, before=cutoff, now=clock.at, reason="retention test"))
    assert outcome.state == "completed", outcome
    assert names(p) == new  # storage reclaimed
    assert searchable(p) == records_of(new)  # and search forgot them (finding 6)
    assert all(readable(p, n) for n in new)
    completed = p.state.get_run(outcome.run_id)
    destroyed = [d for r in completed.step("destroy_keys").result["records"] for d in r["dek_ids"]]
    assert len(destroyed) == 2
    for dek in destroyed:
        with pytest.raises(KeyDestroyedError):
            p.keychain.dek_by_id(TENANT, dek)

    record = certificate_json(completed)
    verifier = Verifier.from_public_pem(p.require_signer().public_key_pem())
    check = verify_certificate(record, verifier)
    assert check.ok, check.reason
    summary = check.summary()
    # one document per erased record, whichever id scheme its generation uses
    assert (summary["objects_deleted"], summary["dek_ids_destroyed"], summary["documents_deleted"]) == (
        len(old),
        2,
        len(records_of(old)),
    )
    audit = [r for r in p.state.iter_audit(tenant_id=TENANT) if r.action == "erasure.record"]
    assert len(audit) == 1 and audit[0].details["certificate"] == record.decode()


def test_a_tampered_or_foreign_record_does_not_verify():
    p, clock, old, _ = two_hours()
    outcome = run(p, plan_erase(p, TENANT, before=T0 + timedelta(hours=1), now=clock.at))
    record = json.loads(certificate_json(p.state.get_run(outcome.run_id)))
    verifier = Verifier.from_public_pem(p.require_signer().public_key_pem())

    def check(doc: dict[str, Any]) -> Any:
        return verify_certificate(json.dumps(doc, sort_keys=True, separators=(",", ":")), verifier)

    assert check(record).ok
    for edit in (
        lambda d: d["storage"].__setitem__("objects_deleted", 1),
        lambda d: d.__setitem__("tenant_id", "other"),
        lambda d: d["keys"]["records"][0]["dek_ids"].pop(),
        lambda d: d["keys"].__setitem__("dek_ids_destroyed", 5),
        lambda d: d["index"].__setitem__("remaining", 3),
        lambda d: d.__setitem__("reason", "nothing happened"),
    ):
        doc = json.loads(json.dumps(record))
        edit(doc)
        assert not check(doc).ok, doc
    other = Verifier.from_public_pem(Platform.in_memory().require_signer().public_key_pem())
    assert not verify_certificate(json.dumps(record), other).ok  # another platform's key
    assert not verify_certificate(b"{not json", verifier).ok


def test_workspace_erasure_takes_the_whole_workspace():
    p, clock, old, new = two_hours("memory://customer-1")
    ws0 = {n for n in old | new if n.split(b"/")[1] == b"ws0"}
    outcome = run(p, plan_erase(p, TENANT, workspace="ws0", now=clock.at))
    assert outcome.state == "completed", outcome
    assert names(p) == (old | new) - ws0
    assert searchable(p) == records_of((old | new) - ws0)
    assert "ws0" in p.keychain.status(TENANT).erased_workspaces
    run_ = p.state.get_run(outcome.run_id)
    check = verify_certificate(certificate_json(run_), Verifier.from_public_pem(p.require_signer().public_key_pem()))
    assert check.ok and check.certificate.workspaces_destroyed == ("ws0",)


@pytest.mark.parametrize("step", ERASE_STEPS)
def test_a_failure_after_each_step_resumes_to_the_same_end(monkeypatch, step):
    p, clock, old, new = two_hours("memory://customer-1")
    real = ERASE_STEP_FUNCTIONS[step]
    state = {"failed": False}

    def once(ctx):
        out = real(ctx)
        if not state["failed"]:
            state["failed"] = True
            raise TransientError(f"injected after {step}")
        return out

    monkeypatch.setitem(ERASE_STEP_FUNCTIONS, step, once)
    plan = plan_erase(p, TENANT, before=T0 + timedelta(hours=1), now=clock.at)
    first = run(p, plan)
    if step == "preflight":  # a run refused at preflight ends cancelled with nothing changed (ADR 0021)
        assert first.state == "refused" and names(p) == old | new and searchable(p) == records_of(old | new)
        return
    assert first.state == "failed" and step in first.message
    done = engine.resume(p, first.run_id, actor="support", handle_signals=False)
    assert done.state == "completed", done
    assert names(p) == new and searchable(p) == records_of(new)
    completed = p.state.get_run(first.run_id)
    check = verify_certificate(
        certificate_json(completed), Verifier.from_public_pem(p.require_signer().public_key_pem())
    )
    assert check.ok and check.certificate.dek_ids_destroyed == 2  # the evidence of the first attempt survives


def test_cancel_before_unindex_changes_nothing_and_rerun_past_it_is_refused(monkeypatch):
    p, clock, old, new = two_hours()
    real = ERASE_STEP_FUNCTIONS["inventory"]
    monkeypatch.setitem(ERASE_STEP_FUNCTIONS, "inventory", lambda ctx: (_ for _ in ()).throw(TransientError("x")))
    first = run(p, plan_erase(p, TENANT, before=T0 + timedelta(hours=1), now=clock.at))
    assert engine.cancel(p, first.run_id, actor="support").state == "cancelled"
    assert names(p) == old | new and searchable(p) == records_of(old | new)

    monkeypatch.setitem(ERASE_STEP_FUNCTIONS, "inventory", real)
    monkeypatch.setitem(ERASE_STEP_FUNCTIONS, "verify", lambda ctx: (_ for _ in ()).throw(TransientError("x")))
    second = run(p, plan_erase(p, TENANT, before=T0 + timedelta(hours=1), now=clock.at))
    assert second.state == "failed"
    with pytest.raises(ValidationError, match="past unindex"):
        engine.rerun(p, second.run_id, "inventory", actor="support", handle_signals=False)
    with pytest.raises(ValidationError, match="cannot be cancelled"):
        engine.cancel(p, second.run_id, actor="support")


def test_bad_scopes_and_revoked_keyed_tenants_are_refused():
    p, clock, _, _ = two_hours("memory://customer-1")
    with pytest.raises(ValidationError, match="--before TIME .* or --workspace"):
        plan_erase(p, TENANT, now=clock.at)
    with pytest.raises(ValidationError, match="in the future"):
        plan_erase(p, TENANT, before=clock.at + timedelta(hours=3), now=clock.at)
    with pytest.raises(ValidationError, match="no workspace 'nope'"):
        plan_erase(p, TENANT, workspace="nope", now=clock.at)
    with pytest.raises(ValidationError, match="with a zone"):
        plan_erase(p, TENANT, before=datetime(2030, 1, 1), now=clock.at)
    p.keychain.revoke(TENANT)
    with pytest.raises(KeyUnavailableError, match="revoked and its search index is keyed"):
        plan_erase(p, TENANT, workspace="ws0", now=clock.at)


def test_the_scheduled_retention_erases_what_expired_and_says_why_not_elsewhere():
    p, clock, old, new = two_hours()
    create_tenant(p, "beta", cloud="s3", provision_storage=False)
    assert plan_retention_erasures(p, now=clock.at) == []  # no policies
    p.state.set_retention(TENANT, 3600, actor="ops")  # 1 h: T0's bucket ended 1.75 h before now
    p.state.set_retention("beta", 3600, actor="ops")
    decisions = {d.tenant_id: d for d in plan_retention_erasures(p, now=clock.at)}
    assert decisions["beta"].plan is None and decisions["beta"].why == "nothing has expired"
    plan = decisions[TENANT].plan
    assert plan is not None and plan.trigger == "retention" and plan.retention_seconds == 3600
    assert run(p, plan).state == "completed"
    assert names(p) == new
    again = {d.tenant_id: d for d in plan_retention_erasures(p, now=clock.at)}
    assert again[TENANT].plan is None  # nothing left to erase
    p.state.set_retention(TENANT, 4 * 3600, actor="ops")  # 4 h: nothing of the new job has expired
    clock.at += timedelta(hours=1)
    assert {d.tenant_id: d for d in plan_retention_erasures(p, now=clock.at)}[TENANT].plan is None


def test_an_erasure_waits_for_a_running_migration_of_the_tenant():
    from archive_kms.errors import StateError
    from archive_kms.migration import plan_enable

    p, clock, _, _ = two_hours()
    engine.trigger(p, plan_enable(p, TENANT, "byokms", "memory://customer-2"), actor="test")
    with pytest.raises(StateError, match="running enable run"):
        engine.trigger(p, plan_erase(p, TENANT, before=T0 + timedelta(hours=1), now=clock.at), actor="test")
    assert [d.why for d in plan_retention_erasures(p, now=clock.at)] == []  # no policy yet
    p.state.set_retention(TENANT, 3600, actor="ops")
    assert [d.why for d in plan_retention_erasures(p, now=clock.at)] == ["a run is going"]
