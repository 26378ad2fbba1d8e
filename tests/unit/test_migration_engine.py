"""The migration engine on the in-memory platform: enable and remove end to end, a failure
injected in every step then resumed, copy failures and reruns, leases and fencing, preflight
refusals, archive jobs and searches during a run, and the report (issue #6; faults D5, D7,
D8, D10, E1, E3, E6, E7; invariants I1-I6).

Fan-out: 4 shards, 2 at a time, 2 threads each, so shards and threads really run
concurrently (concurrent DEK creation in one keychain once tripped its replay detector;
``test_keychain.py`` holds the regression test).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from archive_kms.errors import (
    FencedError,
    LeaseHeldError,
    StateError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.migration import (
    STEPS,
    Hooks,
    MigrationPlan,
    build_report,
    execute,
    plan_enable,
    plan_remove,
    progress,
    rerun,
    resume,
    trigger,
)
from archive_kms.migration import steps as steps_module
from archive_kms.migration.copying import copy_object, read_plaintext_digest
from archive_kms.migration.engine import REFUSED
from archive_kms.migration.plan import POINT_OF_NO_RETURN
from archive_kms.operations.archive import RECORD_PREFIX, JobSpec, submit_job, workspace_of
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import MANAGED_KEY_REF, create_tenant
from archive_kms.search import Query
from archive_kms.state.port import CopyStatus, GateState, KeyMode, RunState, StepState

TENANT = "acme"
CUSTOMER_KEY = "memory://customer-1"
RECORDS = 24  # plus attachments: ~30 objects, a few KB each


# --- helpers ---------------------------------------------------------------------------------


def job(job_id: str, count: int, *, offset: int = 0, tenant: str = TENANT) -> JobSpec:
    return JobSpec(
        job_id,
        tenant,
        "synthetic",
        synthetic={"count": count, "seed": 7, "offset": offset, "mix": "small", "workspaces": 2},
    )


def archived_platform(records: int = RECORDS) -> Platform:
    """A platform with one managed tenant on shared storage holding ``records`` records."""
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    outcome = submit_job(p.state, job("j-base", records), p.open_archive)
    assert outcome.decision == "run" and outcome.records == records
    return p


def fast(plan: MigrationPlan) -> MigrationPlan:
    """Concurrent fan-out (see the module docstring) and no cutover grace sleep."""
    return replace(plan, shards=4, parallel_shards=2, threads_per_shard=2, cutover_grace_seconds=0.0)


def enable_plan(p: Platform, key_ref: str = CUSTOMER_KEY, mode: str = "byokms") -> MigrationPlan:
    return fast(plan_enable(p, TENANT, mode, key_ref))


def remove_plan(p: Platform) -> MigrationPlan:
    return fast(plan_remove(p, TENANT))


def digests(p: Platform, tenant: str = TENANT) -> dict[bytes, str]:
    """Name -> SHA-256 of the plaintext, read through the tenant's archive where it lives now."""
    archive = p.open_archive(tenant)
    out = {}
    for info in archive.store.list():
        h = hashlib.sha256()
        for chunk in archive.read_object(info.name):
            h.update(chunk)
        out[info.name] = h.hexdigest()
    return out


def search_ids(p: Platform, tenant: str = TENANT) -> set[tuple[str, str, str]]:
    """(workspace, object type, record id) of every record the tenant's search answers with."""
    result = p.open_archive(tenant).search(Query(limit=1000))
    assert not result.failures
    assert result.total == len(result.hits)
    return {(h.workspace_id, h.object_type, h.record_id) for h in result.hits}


def record_ids(names: set[bytes] | dict[bytes, Any]) -> set[tuple[str, str, str]]:
    out = set()
    for name in names:
        if name.startswith(RECORD_PREFIX):
            _, ws, typ, rid = name.decode().split("/", 3)
            out.add((ws, typ, rid))
    return out


def listing(p: Platform, location) -> list[bytes]:
    return [i.name for i in p.store_for(location).list()]


def customer_l1(p: Platform, key_ref: str = CUSTOMER_KEY) -> str:
    """The key reference the keychain records for ``key_ref`` (the in-memory resolver maps
    every reference onto a key of its fake KMS)."""
    return p.resolve_provider(key_ref).key_ref


def start(p: Platform, plan: MigrationPlan, actor: str = "test") -> str:
    run, created = trigger(p, plan, actor=actor)
    assert created
    return run.run_id


def run_to_end(p: Platform, plan: MigrationPlan, **kw: Any) -> str:
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test", **kw)
    assert out.state == "completed", out
    return run_id


def assert_settled(p: Platform, plan: MigrationPlan, run_id: str, before: dict[bytes, str]) -> None:
    """I1-I4 and I6 after a run completed: 0 lost, 0 duplicated, byte-identical plaintext,
    ledger == destination listing == manifest, index ids == records, old location and
    index gone, audit chain intact."""
    run = p.state.get_run(run_id)
    assert run.state is RunState.COMPLETED, [(s.name, s.state.value, s.error) for s in run.steps]
    t = p.state.get_tenant(plan.tenant_id)
    assert dict(t.location) == dict(plan.destination)
    assert t.index_generation == plan.new_generation
    names = listing(p, plan.destination_location)
    assert len(names) == len(set(names))  # 0 duplicated
    assert set(names) == set(before)  # 0 lost, 0 unexpected
    assert digests(p) == before  # byte-identical plaintext (I3)
    manifest = {e.name for e in p.state.iter_manifest(run_id)}
    verified = {c.name for c in p.state.iter_copies(run_id, status=CopyStatus.VERIFIED)}
    assert manifest == verified == set(names)  # I4: ledger == listing
    assert p.state.copy_counts(run_id) == ({CopyStatus.VERIFIED: len(names)} if names else {})
    assert search_ids(p) == record_ids(before)  # I4: index ids
    assert p.index.current_index(plan.tenant_id) == plan.new_index
    assert p.index.count(plan.new_index) == len(record_ids(before))
    assert listing(p, plan.source_location) == []
    if plan.old_index:
        assert p.index.describe_generation(plan.old_index) is None
    assert p.state.gate(plan.tenant_id).state is GateState.OPEN
    assert p.state.get_lease(plan.tenant_id) is None  # released (I5)
    assert p.state.verify_audit(tenant_id=plan.tenant_id).ok


def actions(p: Platform, run_id: str) -> list[str]:
    return [r.action for r in p.state.iter_audit(tenant_id=TENANT) if r.run_id == run_id]


def wrap_step(monkeypatch, step: str, around: Callable[[Callable[[Any], dict], Any], dict]) -> list[int]:
    """Replace ``step`` in STEP_FUNCTIONS with ``around(real, ctx)``; returns a call counter."""
    real = steps_module.STEP_FUNCTIONS[step]
    calls = [0]

    def wrapped(ctx):
        calls[0] += 1
        return around(real, ctx)

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, step, wrapped)
    return calls


def fail_once(monkeypatch, step: str, *, after_side_effects: bool) -> list[int]:
    """Make ``step`` raise TransientError the first time (before, or after calling the real step)."""
    state = {"failed": False}

    def around(real, ctx):
        if state["failed"]:
            return real(ctx)
        state["failed"] = True
        if after_side_effects:
            real(ctx)
        raise TransientError(f"injected failure in {step}")

    return wrap_step(monkeypatch, step, around)


def count_puts(store) -> list[bytes]:
    """Record the names of committed writes to ``store`` (instance-level wrapper)."""
    written: list[bytes] = []
    real = store.put_stream

    def put_stream(name, chunks, **kw):
        info = real(name, chunks, **kw)
        written.append(name)
        return info

    store.put_stream = put_stream
    return written


# --- enable and remove end to end -----------------------------------------------------------------


def test_enable_then_remove_keeps_every_object_and_moves_everything_else():
    p = archived_platform()
    before = digests(p)
    assert len(before) > RECORDS  # records and attachments
    pre_search = search_ids(p)
    assert pre_search == record_ids(before)
    t0 = p.state.get_tenant(TENANT)
    assert t0.key_mode is KeyMode.MANAGED

    plan = enable_plan(p)
    assert plan.new_generation == t0.index_generation + 1
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)
    t1 = p.state.get_tenant(TENANT)
    assert (t1.key_mode, t1.key_ref) == (KeyMode.BYOKMS, CUSTOMER_KEY)
    assert dict(t1.location) != dict(t0.location) and t1.location["kind"] == "dedicated"
    assert t1.index_generation == t0.index_generation + 1
    assert p.keychain.status(TENANT).l1_ref == customer_l1(p)
    for action in ("run.start", "key.bind", "tenant.cutover", "storage.delete", "run.complete"):
        assert action in actions(p, run_id), action

    back = remove_plan(p)
    assert back.source == plan.destination and back.key_ref == MANAGED_KEY_REF
    run2 = run_to_end(p, back)
    assert_settled(p, back, run2, before)
    t2 = p.state.get_tenant(TENANT)
    assert (t2.key_mode, t2.key_ref) == (KeyMode.MANAGED, MANAGED_KEY_REF)
    assert t2.location["kind"] == "shared" and t2.index_generation == t0.index_generation + 2
    assert p.keychain.status(TENANT).l1_ref == customer_l1(p, MANAGED_KEY_REF)
    assert not p.provisioner.exists(plan.destination_location)  # the dedicated bucket is gone
    for action in ("run.start", "key.bind", "tenant.cutover", "storage.delete", "run.complete"):
        assert action in actions(p, run2), action
    assert p.state.verify_audit().ok


def test_every_copy_is_under_a_dek_created_after_the_bind():
    p = archived_platform()
    old_deks = {d.dek_id for d in p.keychain.list_deks(TENANT)}
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    run = p.state.get_run(run_id)
    bind = run.step("bind_key").result
    assert bind["rewrapped"] and bind["to"] == customer_l1(p)
    floor = bind["dek_floor"]
    assert set(floor) == {workspace_of(n) for n in listing(p, plan.destination_location)}
    store = p.store_for(plan.destination_location)
    seen = set()
    for name in listing(p, plan.destination_location):
        _, _, dek_id = read_plaintext_digest(store, p.keychain, TENANT, name)  # authenticated header
        ws, bucket, gen = dek_id.split("/")[1:]
        assert (int(bucket), int(gen)) > tuple(floor[ws]), (name, dek_id, floor)
        assert dek_id not in old_deks
        seen.add(dek_id)
    assert seen
    assert p.keychain.status(TENANT).l1_ref == customer_l1(p)

    # and back: DEKs newer than the second bind, L1 the managed key
    back = remove_plan(p)
    run2 = run_to_end(p, back)
    floor2 = p.state.get_run(run2).step("bind_key").result["dek_floor"]
    store2 = p.store_for(back.destination_location)
    for name in listing(p, back.destination_location):
        _, _, dek_id = read_plaintext_digest(store2, p.keychain, TENANT, name)
        ws, bucket, gen = dek_id.split("/")[1:]
        assert (int(bucket), int(gen)) > tuple(floor2[ws])
        assert dek_id not in seen
    assert p.keychain.status(TENANT).l1_ref == customer_l1(p, MANAGED_KEY_REF)


# --- a failure in every step, then resume ---------------------------------------------------------


@pytest.mark.parametrize("after_side_effects", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("step", STEPS)
def test_failure_in_each_step_then_resume_converges(monkeypatch, step, after_side_effects):
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    calls = fail_once(monkeypatch, step, after_side_effects=after_side_effects)
    run_id = start(p, plan)

    out = execute(p, run_id, actor="test")
    if step == "preflight":  # nothing changed yet: the run ends cancelled, a new one starts (ADR 0021)
        assert (out.state, out.error) == (REFUSED, f"TransientError: injected failure in {step}")
        assert p.state.get_run(run_id).state is RunState.CANCELLED
        assert p.state.get_lease(TENANT) is None and p.state.gate(TENANT).state is GateState.OPEN
        run_id = start(p, plan)
        assert execute(p, run_id, actor="test").state == "completed"
        assert calls[0] == 2
        assert_settled(p, plan, run_id, before)
        return
    assert out.state == "failed" and out.message == f"step {step} failed"
    assert out.error == f"TransientError: injected failure in {step}"
    run = p.state.get_run(run_id)
    assert run.state is RunState.FAILED
    assert run.step(step).state is StepState.FAILED and run.step(step).error == out.error
    done = STEPS[: STEPS.index(step)]
    assert [s.name for s in run.steps if s.state is StepState.COMPLETED] == list(done)
    assert p.state.get_lease(TENANT) is None
    assert "run.fail" in actions(p, run_id)

    out2 = resume(p, run_id, actor="support")
    assert out2.state == "completed", out2
    assert out2.executed == STEPS[STEPS.index(step) :]
    assert calls[0] == 2
    assert p.state.get_run(run_id).step(step).attempt == 2
    assert "run.resume" in actions(p, run_id)
    assert actions(p, run_id).count("key.bind") == 1  # a rerun of bind_key does not re-wrap
    assert_settled(p, plan, run_id, before)


def test_failure_in_each_step_of_remove_then_resume_converges(monkeypatch):
    """remove: one run per step would be slow; inject in a handful of steps of one run."""
    p = archived_platform()
    before = digests(p)
    run_to_end(p, enable_plan(p))
    back = remove_plan(p)
    run_id = start(p, back)
    for step in ("bind_key", "copy", "verify", "cutover", "cleanup_source"):
        fail_once(monkeypatch, step, after_side_effects=True)
    attempts = 0
    out = execute(p, run_id, actor="test")
    while out.state == "failed":
        attempts += 1
        assert attempts <= 5, out
        out = resume(p, run_id, actor="support")
    assert attempts == 5
    assert_settled(p, back, run_id, before)


# --- copy failures, objects committed but not recorded, verify mismatches ------------------------


def test_copy_failure_mid_shard_is_recorded_and_a_rerun_copies_only_what_is_missing():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    dst = p.store_for(plan.destination_location)
    poison = sorted(before)[3]
    real_put = dst.put_stream
    fired = []

    def flaky_put(name, chunks, **kw):
        if name == poison and not fired:
            fired.append(name)
            raise TransientError("injected: connection reset during upload")
        return real_put(name, chunks, **kw)

    dst.put_stream = flaky_put
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and out.message == "step copy failed"
    assert "1 object(s) failed to copy" in out.error and "connection reset" in out.error
    assert p.state.get_copy(run_id, poison).status is CopyStatus.FAILED
    assert "connection reset" in p.state.get_copy(run_id, poison).error
    assert p.state.copy_counts(run_id) == {CopyStatus.COPIED: len(before) - 1, CopyStatus.FAILED: 1}
    assert p.state.get_tenant(TENANT).location == plan.source  # nothing cut over

    written = count_puts(dst)
    out2 = rerun(p, run_id, "copy", actor="support")
    assert out2.state == "completed", out2
    assert written == [poison]  # only the missing object was written again
    copy_result = p.state.get_run(run_id).step("copy").result
    assert (copy_result["written"], copy_result["failed"]) == (1, 0)
    assert "run.rerun" in actions(p, run_id)
    assert_settled(p, plan, run_id, before)


def test_object_committed_but_never_recorded_is_verified_not_written_twice(monkeypatch):
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    name = sorted(before)[5]
    dst = p.store_for(plan.destination_location)
    written = count_puts(dst)

    def precommit(real, ctx):  # as if an earlier attempt committed it and died before the ledger write
        copy_object(p.store_for(plan.source_location), dst, p.keychain, TENANT, name)
        assert ctx.platform.state.get_copy(ctx.run_id, name) is None
        return real(ctx)

    wrap_step(monkeypatch, "copy", precommit)
    run_id = run_to_end(p, plan)
    result = p.state.get_run(run_id).step("copy").result
    assert (result["already"], result["written"]) == (1, len(before) - 1)
    assert sorted(written) == sorted(before)  # each name committed exactly once
    assert_settled(p, plan, run_id, before)


def _plant(p: Platform, store, name: bytes, plaintext: bytes) -> None:
    """Put a well-formed object under ``name`` whose plaintext is not the source's."""
    from archive_kms.crypto.envelope import ObjectBinding, encrypt_iter

    ws = workspace_of(name)
    dek = p.keychain.dek_for_encrypt(TENANT, ws)
    store.delete(name)
    store.put_stream(
        name,
        encrypt_iter([plaintext], dek=dek.key, dek_id=dek.dek_id, binding=ObjectBinding(TENANT, ws, name)),
        if_absent=True,
    )


def test_unrecorded_object_with_other_content_is_replaced_not_trusted(monkeypatch):
    """The already-there path compares with the source's plaintext (I3), not with itself."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    name = sorted(before)[2]
    dst = p.store_for(plan.destination_location)

    def plant_then_copy(real, ctx):
        _plant(p, dst, name, b"not what the source holds")
        return real(ctx)

    wrap_step(monkeypatch, "copy", plant_then_copy)
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)  # the planted object was replaced by a true copy


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("read-back", "plaintext differs from the manifest's version of the source"),
        ("attested", "committed (replaced since?)"),  # another object version than the copy's commit
    ],
)
def test_verify_mismatch_then_rerun_from_copy_rewrites_the_object(monkeypatch, mode, why):
    p = archived_platform()
    before = digests(p)
    plan = replace(enable_plan(p), verify=mode)
    name = sorted(before)[4]
    dst = p.store_for(plan.destination_location)
    state = {"done": False}

    def corrupt_then_verify(real, ctx):
        if not state["done"]:
            state["done"] = True
            _plant(p, dst, name, b"bit rot")
        return real(ctx)

    wrap_step(monkeypatch, "verify", corrupt_then_verify)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and out.message == "step verify failed"
    assert "IntegrityError" in out.error and why in out.error
    assert p.state.get_copy(run_id, name).status is CopyStatus.FAILED

    written = count_puts(dst)
    out2 = rerun(p, run_id, "copy", actor="support")
    assert out2.state == "completed", out2
    assert written == [name]
    assert_settled(p, plan, run_id, before)


def test_rerun_from_bind_key_after_copy_keeps_the_first_floor(monkeypatch):
    """A rerun of bind_key keeps the DEK floor of the run's first bind (recorded in the
    audit log): copies made since are under post-bind DEKs, so nothing is rewritten, and
    the old DEKs erased at the end are exactly those below that first floor."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    fail_once(monkeypatch, "verify", after_side_effects=False)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").message == "step verify failed"
    binds = actions(p, run_id).count("key.bind")
    first_floor = p.state.get_run(run_id).step("bind_key").result["dek_floor"]
    written = count_puts(p.store_for(plan.destination_location))

    out = rerun(p, run_id, "bind_key", actor="support")
    assert out.state == "completed", out
    assert written == []  # every copy was kept
    assert p.state.get_run(run_id).step("bind_key").result["dek_floor"] == first_floor
    assert actions(p, run_id).count("key.bind") == binds  # already bound: not re-wrapped again
    assert actions(p, run_id).count("key.dek_floor") == 1
    assert_settled(p, plan, run_id, before)


# --- reruns and resumes: no-ops, the point of no return, earlier steps ---------------------------


def snapshot(p: Platform, plan: MigrationPlan, run_id: str) -> dict[str, Any]:
    run = p.state.get_run(run_id)
    return {
        "tenant": p.state.get_tenant(TENANT),
        "objects": {i.name: i.etag for i in p.store_for(plan.destination_location).list()},
        "source": listing(p, plan.source_location),
        "alias": p.index.current_index(TENANT),
        "documents": p.index.count(plan.new_index),
        "keychain": p.keychain.status(TENANT),
        "run": (run.state, run.steps),
        "ledger": list(p.state.iter_copies(run_id)),
        "gate": p.state.gate(TENANT),
        "audit": [r.hash for r in p.state.iter_audit(tenant_id=TENANT)],
    }


@pytest.mark.parametrize("how", ["rerun-copy", "rerun-report", "resume", "execute"])
def test_rerun_or_resume_of_a_completed_run_changes_nothing_and_says_so(how):
    p = archived_platform()
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    before = snapshot(p, plan, run_id)

    if how.startswith("rerun"):
        step = how.split("-")[1]
        out = rerun(p, run_id, step, actor="support")
        assert out.message.startswith(f"run completed; step {step} completed at ") and "nothing changed" in out.message
        noop = "run.rerun.noop"
    elif how == "resume":
        out = resume(p, run_id, actor="support")
        assert out.message == "run already completed: nothing to resume"
        noop = "run.resume.noop"
    else:
        out = execute(p, run_id, actor="support")
        assert out.message == "run already completed"
        noop = None
    assert out.state == "completed" and out.executed == ()

    after = snapshot(p, plan, run_id)
    audit_after = after.pop("audit")
    audit_before = before.pop("audit")
    assert after == before
    assert audit_after[: len(audit_before)] == audit_before
    new = [r.action for r in p.state.iter_audit(tenant_id=TENANT)][len(audit_before) :]
    assert new == ([noop] if noop else [])  # a support action is audited even when it does nothing (I6)


def test_rerun_before_the_point_of_no_return_after_cutover_is_refused():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    with pytest.MonkeyPatch.context() as mp:
        fail_once(mp, "cleanup_source", after_side_effects=False)
        out = execute(p, run_id, actor="test")
    assert out.message == "step cleanup_source failed"
    frozen = snapshot(p, plan, run_id)

    for step in STEPS[: STEPS.index(POINT_OF_NO_RETURN) + 1]:
        with pytest.raises(ValidationError) as err:
            rerun(p, run_id, step, actor="support")
        msg = str(err.value)
        assert f"past {POINT_OF_NO_RETURN}" in msg and f"rerunning {step} would move it back" in msg
        assert "Rerun from cleanup_source or later" in msg
    assert snapshot(p, plan, run_id) == frozen  # refused before anything changed

    out = rerun(p, run_id, "cleanup_source", actor="support")
    assert out.state == "completed" and out.executed == ("cleanup_source", "resume", "report")
    assert_settled(p, plan, run_id, before)


@pytest.mark.parametrize("from_step", ["preflight", "manifest", "copy", "verify"])
def test_rerun_of_a_failed_run_from_an_earlier_step_completes(monkeypatch, from_step):
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    fail_once(monkeypatch, "build_index", after_side_effects=True)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").message == "step build_index failed"
    written = count_puts(p.store_for(plan.destination_location))

    out = rerun(p, run_id, from_step, actor="support")
    assert out.state == "completed", out
    assert out.executed == STEPS[STEPS.index(from_step) :]
    assert written == []  # the ledger said every object was copied and verified
    assert_settled(p, plan, run_id, before)


def test_rerun_names_an_unknown_step():
    p = archived_platform()
    run_id = start(p, enable_plan(p))
    with pytest.raises(ValidationError, match="unknown step 'cpoy'"):
        rerun(p, run_id, "cpoy", actor="support")
    with pytest.raises(StateError, match="unknown run"):
        resume(p, "0" * 32, actor="support")


# --- one run per tenant: triggers, leases, fencing ---------------------------------------------


def test_double_trigger_returns_the_same_run_and_the_other_flow_is_refused():
    p = archived_platform()
    plan = enable_plan(p)
    run, created = trigger(p, plan, actor="a")
    again, created2 = trigger(p, plan, actor="b")
    assert created and not created2 and again.run_id == run.run_id
    assert actions(p, run.run_id).count("run.start") == 1

    reverse = replace(plan, flow="remove")  # plan_remove itself refuses a tenant still on the managed key
    with pytest.raises(StateError, match=f"has a running enable run {run.run_id}"):
        trigger(p, reverse, actor="c")
    assert [r.run_id for r in p.state.list_runs(TENANT)] == [run.run_id]


def test_simultaneous_triggers_make_one_run():
    p = archived_platform()
    plan = enable_plan(p)
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def go():
        barrier.wait()
        run, created = trigger(p, plan, actor="racer")
        with lock:
            results.append((run.run_id, created))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    assert len({r for r, _ in results}) == 1 and sum(c for _, c in results) == 1
    assert len(p.state.list_runs(TENANT)) == 1


def test_takeover_fences_the_stalled_incarnation(monkeypatch):
    """A worker stalls inside ``manifest`` holding the lease; a second execute without
    takeover is refused, with takeover it gets a new token and finishes the run; the
    stalled one wakes up and cannot write anything (faults D5)."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    entered, release = threading.Event(), threading.Event()

    def stall_first(real, ctx):
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real(ctx)

    wrap_step(monkeypatch, "manifest", stall_first)
    stalled: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: stalled.update(out=execute(p, run_id, actor="worker-1")))
    worker.start()
    assert entered.wait(10)
    old = p.state.get_lease(TENANT)
    assert old.run_id == run_id

    with pytest.raises(LeaseHeldError, match="live worker"):
        execute(p, run_id, actor="worker-2")
    with pytest.raises(LeaseHeldError, match="live worker"):
        resume(p, run_id, actor="worker-2")
    with pytest.raises(LeaseHeldError, match="live worker"):
        rerun(p, run_id, "manifest", actor="worker-2")
    assert p.state.get_lease(TENANT).token == old.token

    checked: list[str] = []

    def on_step(step, state, result):
        if step == "manifest" and state == "running":  # the new holder is mid-run
            new = p.state.get_lease(TENANT)
            assert new.run_id == run_id and new.token > old.token
            with pytest.raises(FencedError):
                p.state.update_step(run_id, "manifest", StepState.FAILED, error="zombie", fence=old.fence)
            with pytest.raises(FencedError):
                p.state.set_run_state(run_id, RunState.FAILED, fence=old.fence)
            with pytest.raises(FencedError):
                p.state.pause(TENANT, run_id, fence=old.fence)
            with pytest.raises(FencedError):
                p.state.check_fence(TENANT, old.token)
            p.state.check_fence(TENANT, new.token)
            checked.append(step)

    out = execute(p, run_id, actor="worker-2", takeover=True, hooks=Hooks(on_step=on_step))
    assert checked == ["manifest"]
    assert out.state == "completed"
    settled = snapshot(p, plan, run_id)

    release.set()  # the stalled worker wakes up
    worker.join(10)
    assert stalled["out"].state == "superseded" and "FencedError" in stalled["out"].error
    assert p.state.get_run(run_id).state is RunState.COMPLETED
    assert snapshot(p, plan, run_id) == settled  # it wrote nothing
    assert_settled(p, plan, run_id, before)


def test_a_crashed_worker_is_resumed_once_its_lease_expires():
    """A worker that died without releasing (kill -9) leaves a lease; once it expires a
    plain resume takes over with a higher token (faults D6)."""
    from datetime import timedelta

    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    dead = p.state.acquire_lease(TENANT, run_id, timedelta(milliseconds=50))  # the dead worker's lease
    import time

    time.sleep(0.1)
    out = resume(p, run_id, actor="support")
    assert out.state == "completed"
    with pytest.raises(FencedError):
        p.state.renew_lease(dead, timedelta(seconds=60))
    assert_settled(p, plan, run_id, before)


# --- preflight refusals: before any byte moves --------------------------------------------------


def assert_nothing_moved(p: Platform, plan: MigrationPlan, run_id: str, managed_l1: str) -> None:
    run = p.state.get_run(run_id)
    # refused at preflight: the run is cancelled by itself, nothing to clean up (ADR 0021)
    assert run.state is RunState.CANCELLED and run.step("preflight").state is StepState.FAILED
    assert all(s.state is StepState.PENDING for s in run.steps[1:])
    assert "run.refused" in actions(p, run_id)
    assert trigger(p, plan_enable(p, TENANT, "byokms", CUSTOMER_KEY), actor="test")[1]  # not blocked
    assert not p.provisioner.exists(plan.destination_location)
    assert listing(p, plan.destination_location) == []
    assert p.keychain.status(TENANT).l1_ref == managed_l1
    assert p.state.gate(TENANT).state is GateState.OPEN
    assert p.state.manifest_summary(run_id) is None
    t = p.state.get_tenant(TENANT)
    assert dict(t.location) == dict(plan.source) and t.key_mode is KeyMode.MANAGED
    assert p.index.current_index(TENANT) == plan.old_index
    assert p.state.get_lease(TENANT) is None


def test_preflight_refuses_a_disabled_customer_key():
    p = archived_platform()
    managed_l1 = p.keychain.status(TENANT).l1_ref
    provider = p.resolve_provider(CUSTOMER_KEY)
    provider._kms.disable(provider.key_ref.removeprefix("memory://"))  # the customer disabled it
    plan = enable_plan(p)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == REFUSED
    assert out.error.startswith("KeyUnavailableError") and "is disabled" in out.error
    assert_nothing_moved(p, plan, run_id, managed_l1)


def test_preflight_refuses_a_destination_with_foreign_objects():
    p = archived_platform()
    managed_l1 = p.keychain.status(TENANT).l1_ref
    plan = enable_plan(p)
    dest = plan.destination_location
    p.provisioner.create(dest)
    p.store_for(dest).put_stream(b"someone-elses/file", [b"hello"])
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == REFUSED and out.error.startswith("ConfigurationError")
    assert f"destination {dest.uri} already holds 1 object(s)" in out.error and "someone-elses" in out.error
    assert listing(p, dest) == [b"someone-elses/file"]  # untouched
    p.provisioner.delete(dest, p.store_for(dest))  # for the common checks below
    assert_nothing_moved(p, plan, run_id, managed_l1)


@pytest.mark.parametrize("where", ["keychain", "registry"])
def test_preflight_refuses_a_revoked_tenant(where):
    p = archived_platform()
    managed_l1 = p.keychain.status(TENANT).l1_ref
    plan = enable_plan(p)
    if where == "keychain":
        p.keychain.revoke(TENANT)
    else:
        p.state.update_tenant(replace(p.state.get_tenant(TENANT), revoked=True))
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == REFUSED
    assert out.error == f"KeyUnavailableError: tenant {TENANT} is revoked: restore it before migrating"
    assert_nothing_moved(p, plan, run_id, managed_l1)


def test_preflight_refuses_a_tenant_that_moved_since_the_plan():
    p = archived_platform()
    plan = enable_plan(p)
    stale = replace(plan, source={**plan.source, "prefix": "tenants/elsewhere/"})
    run_id = start(p, stale)
    out = execute(p, run_id, actor="test")
    assert out.state == REFUSED and "moved since this run was planned" in out.error


def test_wrong_mode_for_the_key_scheme_is_refused_when_planning():
    p = archived_platform()
    arn = "aws-kms://arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(ValidationError, match="mode byokv needs a azure-kv:// key reference, got a aws-kms:// one"):
        plan_enable(p, TENANT, "byokv", arn)
    assert p.state.list_runs(TENANT) == []


# --- archive jobs and searches during a run ------------------------------------------------------


def test_jobs_during_the_run_are_deferred_and_replayed_once_into_the_new_location(monkeypatch):
    p = archived_platform()
    before = digests(p)
    pre_search = search_ids(p)
    plan = enable_plan(p)
    decisions: list[tuple[str, str]] = []

    def submit_during(job_id: str, offset: int):
        def around(real, ctx):
            for _ in range(2):  # a client retry is a duplicate, not a second job
                decisions.append((job_id, submit_job(p.state, job(job_id, 5, offset=offset), p.open_archive).decision))
            return real(ctx)

        return around

    wrap_step(monkeypatch, "copy", submit_during("j-during-copy", RECORDS))
    wrap_step(monkeypatch, "cleanup_source", submit_during("j-after-cutover", RECORDS + 5))
    searched: list[set] = []
    wrap_step(monkeypatch, "build_index", lambda real, ctx: (searched.append(search_ids(p)), real(ctx))[1])

    run_id = run_to_end(p, plan)
    assert decisions == [
        ("j-during-copy", "deferred"),
        ("j-during-copy", "duplicate"),
        ("j-after-cutover", "deferred"),
        ("j-after-cutover", "duplicate"),
    ]
    assert searched == [pre_search]  # the deferred jobs are not visible mid-run
    resumed = p.state.get_run(run_id).step("resume").result
    assert (resumed["replayed"], resumed["duplicates"], resumed["records"]) == (2, 0, 10)
    assert p.state.list_deferred(TENANT) == []

    after = digests(p)  # read from the dedicated bucket the tenant lives in now
    assert set(after) >= set(before) and all(after[n] == d for n, d in before.items())
    added = record_ids(after) - record_ids(before)
    assert len(added) == 10  # both jobs, once each
    assert search_ids(p) == record_ids(after)
    assert p.index.count(plan.new_index) == len(record_ids(after))
    assert listing(p, plan.source_location) == []  # nothing landed in the old location
    assert submit_job(p.state, job("j-during-copy", 5, offset=RECORDS), p.open_archive).decision == "duplicate"
    assert digests(p) == after


def test_searches_and_reads_during_the_run_see_the_pre_run_data(monkeypatch):
    p = archived_platform()
    before = digests(p)
    pre = search_ids(p)
    plan = enable_plan(p)
    seen: dict[str, set] = {}
    stale: dict[str, Any] = {}

    def observe(label: str):
        def around(real, ctx):
            seen[f"before {label}"] = search_ids(p)
            result = real(ctx)
            seen[f"after {label}"] = search_ids(p)
            return result

        return around

    for step in ("copy", "build_index", "cleanup_source"):
        wrap_step(monkeypatch, step, observe(step))

    def cutover(real, ctx):
        stale["archive"] = p.open_archive(TENANT)  # a reader that looked the location up before cutover
        seen["before cutover"] = search_ids(p)
        return real(ctx)

    wrap_step(monkeypatch, "cutover", cutover)
    run_to_end(p, plan)
    assert set(seen) == {
        "before copy",
        "after copy",
        "before build_index",
        "after build_index",
        "before cutover",
        "before cleanup_source",
        "after cleanup_source",
    }
    assert all(ids == pre for ids in seen.values()), {k: len(v) for k, v in seen.items()}
    # the stale reader's location is gone; its reads follow the tenant instead of a 404 (faults E7)
    archive = stale["archive"]
    assert archive.store is p.store_for(plan.source_location) and listing(p, plan.source_location) == []
    for name, digest in before.items():
        assert hashlib.sha256(b"".join(archive.read_object(name))).hexdigest() == digest


# --- progress, hooks and the report ---------------------------------------------------------------


def test_progress_hooks_and_report_numbers(monkeypatch):
    p = archived_platform()
    before = digests(p)
    src_sizes = {i.name: i.size for i in p.store_for(p.location_of(TENANT)).list()}
    plan = enable_plan(p)
    mid: dict[str, Any] = {}

    def peek(real, ctx):
        mid["progress"] = progress(p, p.state.get_run(ctx.run_id))
        mid["report"] = build_report(p, ctx.run_id)
        return real(ctx)

    wrap_step(monkeypatch, "verify", peek)
    events: list[tuple[str, str]] = []
    ticks: list[tuple[str, int, int]] = []
    hooks = Hooks(
        on_step=lambda step, state, result: events.append((step, state)),
        on_progress=lambda step, done, total: ticks.append((step, done, total)),
    )
    run_id = run_to_end(p, plan, hooks=hooks)
    n = len(before)

    assert mid["progress"] == {
        "steps_done": STEPS.index("verify"),
        "steps": len(STEPS),
        "objects": n,
        "copied": n,
        "verified": 0,
        "failed": 0,
        "quarantined": 0,
    }
    assert mid["report"]["state"] == "running" and mid["report"]["verification"] == "pending"
    assert events == [(s, state) for s in STEPS for state in ("running", "completed")]
    assert ticks[-2:] == [("copy", n, n), ("verify", n, n)]

    report = build_report(p, run_id)
    assert report["state"] == "completed" and report["flow"] == "enable" and report["mode"] == "byokms"
    assert (report["objects"], report["bytes"]) == (n, sum(src_sizes.values()))
    assert report["verification"] == "ok" and (report["lost"], report["duplicated"]) == (0, 0)
    assert report["bytes_plaintext_copied"] > 0 and report["throughput_mb_s"] > 0
    assert report["index_documents"] == RECORDS and report["index"] == plan.new_index
    assert report["deferred_replayed"] == 0
    assert report["source"] == plan.source_location.uri and report["destination"] == plan.destination_location.uri
    assert report["key_ref"] == CUSTOMER_KEY
    assert [s["step"] for s in report["steps"]] == list(STEPS)
    assert all(s["state"] == "completed" and s["attempts"] == 1 and s["error"] is None for s in report["steps"])
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0 for s in report["steps"])
    assert report["total_seconds"] >= max(s["seconds"] for s in report["steps"])
    assert report["progress"] == {
        "steps_done": len(STEPS),
        "steps": len(STEPS),
        "objects": n,
        "copied": n,
        "verified": n,
        "failed": 0,
        "quarantined": 0,
    }
    final = p.state.get_run(run_id).step("report").result
    assert final["state"] == "completed" and final["verification"] == "ok" and final["objects"] == n
    text = repr(report)
    for secret in ("BEGIN", "wrapped", "plaintext_sha"):  # no key material or digests in the report (I7)
        assert secret not in text


def test_report_of_a_failed_run_names_the_step_and_error(monkeypatch):
    p = archived_platform()
    plan = enable_plan(p)
    fail_once(monkeypatch, "verify", after_side_effects=False)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    report = build_report(p, run_id)
    assert report["state"] == "failed" and report["verification"] == "pending"
    by_step = {s["step"]: s for s in report["steps"]}
    assert by_step["verify"]["state"] == "failed" and by_step["verify"]["error"] == out.error
    assert by_step["build_index"]["state"] == "pending" and by_step["build_index"]["seconds"] is None
    assert out.to_dict() == {
        "run_id": run_id,
        "tenant": TENANT,
        "flow": "enable",
        "state": "failed",
        "created": True,
        "executed": list(STEPS[: STEPS.index("verify")]),
        "message": "step verify failed",
        "error": out.error,
    }


# --- other clouds and modes, empty tenants, jobs still running at pause ---------------------------


@pytest.mark.parametrize("cloud,mode", [("azure", "byokv"), ("azure", "kmip"), ("s3", "kmip"), ("s3", "byok")])
def test_enable_and_remove_per_cloud_and_mode(cloud, mode):
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud=cloud, provision_storage=False)
    submit_job(p.state, job("j-base", 12), p.open_archive)
    before = digests(p)
    plan = fast(plan_enable(p, TENANT, mode, CUSTOMER_KEY))
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)
    assert p.state.get_tenant(TENANT).key_mode is KeyMode(mode)
    assert plan.destination_location.cloud.value == cloud
    back = fast(plan_remove(p, TENANT))
    assert_settled(p, back, run_to_end(p, back), before)


def test_enable_of_a_tenant_with_no_objects():
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, {})
    report = build_report(p, run_id)
    assert (report["objects"], report["bytes"], report["verification"]) == (0, 0, "ok")


def test_pause_waits_for_a_running_job_whose_objects_are_then_copied():
    """A job admitted before the pause is still writing: pause waits for it, and its
    objects are in the manifest (faults E1, "during drain")."""
    from archive_kms.operations.archive import write_records

    p = archived_platform()
    spec = job("j-slow", 4, offset=RECORDS)
    admission = p.state.admit_job(TENANT, spec.job_id, spec.to_payload())
    assert admission.decision.value == "run"

    def slow_writer():
        import time

        time.sleep(0.3)
        counts = write_records(p.open_archive(TENANT), spec.materialise())
        p.state.finish_job(spec.job_id, admission.attempt, object_count=counts["written"])

    writer = threading.Thread(target=slow_writer)
    writer.start()
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    writer.join(5)
    assert p.state.get_run(run_id).step("pause").result["gate"] == "paused"
    after = digests(p)
    assert len(record_ids(after)) == RECORDS + 4
    assert search_ids(p) == record_ids(after)
    assert set(listing(p, plan.destination_location)) == {e.name for e in p.state.iter_manifest(run_id)}


def test_pause_gives_up_on_a_stuck_job_and_resume_finishes(monkeypatch):
    p = archived_platform()
    before = digests(p)
    spec = job("j-stuck", 2, offset=RECORDS)
    admission = p.state.admit_job(TENANT, spec.job_id, spec.to_payload())
    monkeypatch.setattr(steps_module, "PAUSE_WAIT_SECONDS", 0.3)
    plan = enable_plan(p)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.message == "step pause failed"
    assert "1 archive job(s) of acme still running" in out.error and "j-stuck" in out.error
    assert p.state.gate(TENANT).state is GateState.PAUSED  # stays closed for the resume
    p.state.finish_job(spec.job_id, admission.attempt, error="worker gave up")  # the job ends (without writing)
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)


def test_a_copy_failure_no_retry_fixes_is_not_called_transient():
    """Issue 10 (4): access denied on the destination fails the copy step as a
    CopyFailedError (fix the cause, then rerun), never as a TransientError; once the cause is
    fixed a rerun of the step completes."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    dst = p.store_for(plan.destination_location)
    denied = sorted(before)[2]
    real_put = dst.put_stream
    fixed: list[bool] = []

    def denying_put(name, chunks, **kw):
        if name == denied and not fixed:
            raise StorageError("injected: AccessDenied on PutObject (the bucket policy refuses the platform role)")
        return real_put(name, chunks, **kw)

    dst.put_stream = denying_put
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and out.message == "step copy failed"
    assert out.error.startswith("CopyFailedError: "), out.error
    assert "TransientError" not in out.error and "no retry fixes" in out.error and "AccessDenied" in out.error
    assert p.state.get_copy(run_id, denied).status is CopyStatus.FAILED
    assert p.state.get_tenant(TENANT).location == plan.source  # nothing cut over

    fixed.append(True)
    out2 = rerun(p, run_id, "copy", actor="support")
    assert out2.state == "completed", out2
