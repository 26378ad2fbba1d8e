"""What a migration does to the tenant's keys beyond re-binding L1 (in memory):

* enable replaces L2 and every L3 under the customer's key (``key.rekey``), so a keychain
  copy from before the bind opens no key the new data uses;
* at the end of every run the DEKs the source was encrypted under (not newer than the
  run's first ``dek_floor``) are crypto-erased, with the signed erasure records in the
  audit log — except while waived source objects are kept under them;
* a job deferred during the run (sealed under a pre-bind DEK) is replayed before that;
* the report step anchors the audit head.
"""

from __future__ import annotations

from test_migration_engine import (
    TENANT,
    archived_platform,
    assert_settled,
    digests,
    enable_plan,
    job,
    remove_plan,
    run_to_end,
    start,
)

from archive_kms.keys.keychain import ErasureRecord, parse_dek_id
from archive_kms.keys.keychain_store import KeyRecordState
from archive_kms.migration import execute
from archive_kms.operations.archive import submit_job
from archive_kms.state.anchors import verify_with_anchor


def _audit(p, run_id: str, action: str) -> list:
    return [r for r in p.state.iter_audit(tenant_id=TENANT) if r.run_id == run_id and r.action == action]


def _deks_by_state(p) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for d in p.keychain.list_deks(TENANT):
        out.setdefault(d.state.value, set()).add(d.dek_id)
    return out


def _below(dek_id: str, floor: dict[str, list[int]]) -> bool:
    ws, bucket, gen = parse_dek_id(dek_id)
    return ws in floor and (bucket, gen) <= tuple(floor[ws])


def test_enable_rekeys_below_l1_and_erases_the_source_deks() -> None:
    p = archived_platform()
    before = digests(p)
    l2_before = p.keychain.status(TENANT).l2_id
    source_deks = {d.dek_id for d in p.keychain.list_deks(TENANT)}
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)  # every object still reads: nothing in use was erased

    assert p.keychain.status(TENANT).l2_id != l2_before
    (rekey,) = _audit(p, run_id, "key.rekey")
    assert rekey.details["l2_rotated"] and rekey.details["l3_rotated"]
    floor = p.state.get_run(run_id).step("bind_key").result["dek_floor"]
    states = _deks_by_state(p)
    assert source_deks <= states[KeyRecordState.DESTROYED.value]
    assert all(not _below(d, floor) for d in states.get(KeyRecordState.ACTIVE.value, set()))
    erased = [r for r in p.state.iter_audit(tenant_id=TENANT) if r.action == "keychain.erase"]
    records = [ErasureRecord.from_json(r.details["erasure_record"]) for r in erased]  # the signed JSON text
    assert {d for rec in records for d in rec.dek_ids} == states[KeyRecordState.DESTROYED.value]
    for rec in records:  # the signed erasure records, as the keychain made them: the signature verifies
        rec.verify(p.keychain._verifier)
    resumed = p.state.get_run(run_id).step("resume").result
    assert resumed["old_deks_erased"] == len(states[KeyRecordState.DESTROYED.value]) > 0


def test_remove_erases_the_customer_era_deks_and_does_not_rekey() -> None:
    p = archived_platform()
    run_to_end(p, enable_plan(p))
    before = digests(p)
    l2 = p.keychain.status(TENANT).l2_id
    live_before = {d.dek_id for d in p.keychain.list_deks(TENANT) if d.state is not KeyRecordState.DESTROYED}
    plan = remove_plan(p)
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)
    assert p.keychain.status(TENANT).l2_id == l2  # remove keeps L2 (the keyed index answers during the run)
    assert _audit(p, run_id, "key.rekey") == []
    destroyed = _deks_by_state(p)[KeyRecordState.DESTROYED.value]
    assert live_before <= destroyed


def test_a_job_deferred_before_the_bind_is_replayed_before_its_dek_is_erased(monkeypatch) -> None:
    from archive_kms.migration import steps as steps_module

    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    original = steps_module.STEP_FUNCTIONS["bind_key"]
    deferred = []

    def bind_after_a_job(ctx):
        deferred.append(submit_job(p.state, job("j-during", 3, offset=500), p.open_archive))  # sealed pre-bind
        return original(ctx)

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "bind_key", bind_after_a_job)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "completed", out
    assert deferred[0].decision == "deferred"
    assert p.state.get_run(run_id).step("resume").result["replayed"] == 1
    after = digests(p)
    assert set(before) < set(after) and all(after[n] == h for n, h in before.items())


def test_the_report_step_anchors_the_audit_head() -> None:
    p = archived_platform()
    run_id = run_to_end(p, enable_plan(p))
    anchor = p.state.get_run(run_id).step("report").result["audit_anchor"]
    assert anchor["published"] and anchor["count"] >= len(_audit(p, run_id, "run.start"))
    v, latest = verify_with_anchor(p.state, p.anchors)
    assert v.ok and latest.count == anchor["count"]


def test_a_rerun_that_finds_copies_but_no_recorded_floor_never_erases(monkeypatch) -> None:
    """A run bound by code that did not record its floor (or whose record is lost), whose
    copies were verified, then rerun from bind_key: the recomputed floor covers the DEKs
    the copies use, so erasing below it would destroy the destination. It must not."""
    from archive_kms.errors import TransientError
    from archive_kms.migration import rerun
    from archive_kms.migration import steps as steps_module
    from archive_kms.migration.engine import RunContext

    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    real_audit, real_build = RunContext.audit, steps_module.STEP_FUNCTIONS["build_index"]

    def audit_without_floor(self, action, details=None):
        if action != "key.dek_floor":
            real_audit(self, action, details)

    def index_down(ctx):
        raise TransientError("injected: search unavailable")

    monkeypatch.setattr(RunContext, "audit", audit_without_floor)
    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "build_index", index_down)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").message == "step build_index failed"
    assert _audit(p, run_id, "key.dek_floor") == []

    monkeypatch.setattr(RunContext, "audit", real_audit)
    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "build_index", real_build)
    out = rerun(p, run_id, "bind_key", actor="support")
    assert out.state == "completed", out
    (floor,) = _audit(p, run_id, "key.dek_floor")
    assert floor.details["erasable"] is False
    resumed = p.state.get_run(run_id).step("resume").result
    assert resumed["old_deks_erased"] == 0 and "after copies existed" in resumed["old_deks_kept_for"]
    assert_settled(p, plan, run_id, before)  # every destination object still decrypts


def test_the_report_says_what_happened_to_the_keys() -> None:
    p = archived_platform()
    run_id = run_to_end(p, enable_plan(p))
    from archive_kms.migration import build_report

    report = build_report(p, run_id)
    assert report["keys_rekeyed"] is True and report["old_deks_erased"] > 0
