"""Poison objects on the in-memory platform: quarantine, audited waivers, cutover without
the waived objects and their sources kept (faults D9, A11, A12, F3; invariants I1-I4, I6;
ADR 0006).

A source object whose ciphertext was tampered with, truncated, or that belongs to another
tenant is quarantined after a bounded number of reads; the run verifies everything else
and stops before cutover, naming the objects and the two ways forward. A waiver (per
object or ``--all``, with a reason) is an audit record first; then ``resume`` cuts over
without them and ``cleanup_source`` keeps their source objects. Errors that a retry or a
human can cure (a store error, an unusable key) still fail the run resumably, and a
corrupt *destination* copy is rewritten from the source, never quarantined.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_migration_engine import (
    TENANT,
    actions,
    archived_platform,
    count_puts,
    digests,
    enable_plan,
    job,
    listing,
    record_ids,
    remove_plan,
    run_to_end,
    search_ids,
    start,
    wrap_step,
)

from archive_kms.errors import KeyUnavailableError, LeaseHeldError, TransientError, ValidationError
from archive_kms.migration import build_report, execute, rerun, resume, waive
from archive_kms.migration.quarantine import (
    SOURCE_READ_ATTEMPTS,
    WAIVE_ACTION,
    Quarantine,
    display_name,
)
from archive_kms.operations.archive import ATTACHMENT_PREFIX, RECORD_PREFIX, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import CopyRecord, CopyStatus, GateState, RunState, StepState

OTHER = "globex"


# --- planting poison ------------------------------------------------------------------------------


def raw(store: Any, name: bytes) -> bytes:
    with store.open_read(name) as reader:
        return reader.read()


def put_raw(store: Any, name: bytes, data: bytes) -> None:
    store.delete(name)
    store.put_stream(name, [data], if_absent=True)


def flip_a_byte(store: Any, name: bytes, *, from_end: int = 20) -> bytes:
    """Flip one bit of the stored ciphertext (in the last segment's body); the new bytes."""
    data = bytearray(raw(store, name))
    data[len(data) - from_end] ^= 0x01
    put_raw(store, name, bytes(data))
    return bytes(data)


def plant_foreign(p: Platform, store: Any) -> tuple[bytes, bytes]:
    """Another tenant's object, copied as is under this tenant's prefix (faults F3)."""
    create_tenant(p, OTHER, cloud="s3", provision_storage=False)
    assert submit_job(p.state, job("j-other", 4, tenant=OTHER), p.open_archive).decision == "run"
    other = p.store_for(p.location_of(OTHER))
    name = next(i.name for i in other.list() if i.name.startswith(ATTACHMENT_PREFIX))
    data = raw(other, name)
    prefix, ws, attachment_id = name.split(b"/", 2)
    foreign = b"/".join((prefix, ws, b"planted-" + attachment_id))
    put_raw(store, foreign, data)
    return foreign, data


def count_reads(store: Any, names: set[bytes]) -> dict[bytes, int]:
    reads = {n: 0 for n in names}
    real = store.open_read

    def open_read(name, **kw):
        if name in reads:
            reads[name] += 1
        return real(name, **kw)

    store.open_read = open_read
    return reads


def poisoned(p: Platform) -> dict[str, Any]:
    """The base tenant with one record made corrupt and one foreign attachment planted."""
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    corrupt = sorted(n for n in before if n.startswith(RECORD_PREFIX))[3]
    corrupt_bytes = flip_a_byte(src, corrupt)
    foreign, foreign_bytes = plant_foreign(p, src)
    return {
        "before": before,
        "plan": plan,
        "src": src,
        "corrupt": corrupt,
        "corrupt_bytes": corrupt_bytes,
        "foreign": foreign,
        "foreign_bytes": foreign_bytes,
    }


# --- quarantine, waive, resume --------------------------------------------------------------------


def test_corrupt_and_foreign_sources_are_quarantined_and_the_run_stops_before_cutover():
    p = archived_platform()
    w = poisoned(p)
    plan, corrupt, foreign = w["plan"], w["corrupt"], w["foreign"]
    reads = count_reads(w["src"], {corrupt, foreign})
    run_id = start(p, plan)

    out = execute(p, run_id, actor="test")

    assert out.state == "failed" and out.message == "step verify failed", out
    assert out.error.startswith("ObjectsQuarantinedError: 2 object(s) quarantined")
    for words in (
        f"archive-kms runs waive {run_id} --object NAME --reason",
        "--all",
        f"archive-kms runs rerun {run_id} --from copy",
        f"archive-kms runs resume {run_id}",
    ):
        assert words in out.error, (words, out.error)
    run = p.state.get_run(run_id)
    assert run.state is RunState.FAILED
    assert run.step("copy").state is StepState.COMPLETED and run.step("copy").result["quarantined"] == 2
    assert run.step("verify").state is StepState.FAILED and run.step("cutover").state is StepState.PENDING
    assert p.state.get_tenant(TENANT).location == plan.source  # not cut over
    # bounded: each poison source was read exactly SOURCE_READ_ATTEMPTS times, then left alone
    assert reads == {corrupt: SOURCE_READ_ATTEMPTS, foreign: SOURCE_READ_ATTEMPTS}

    # The ledger: both quarantined with a reason and kind (no plaintext, no key material);
    # everything else verified.
    counts = p.state.copy_counts(run_id)
    assert counts == {CopyStatus.VERIFIED: len(w["before"]) - 1, CopyStatus.QUARANTINED: 2}
    q_corrupt = Quarantine.from_error(p.state.get_copy(run_id, corrupt).error)
    q_foreign = Quarantine.from_error(p.state.get_copy(run_id, foreign).error)
    assert q_corrupt.kind == "corrupt" and "failed authentication" in q_corrupt.reason
    assert q_foreign.kind == "foreign" and "another tenant" in q_foreign.reason
    assert q_corrupt.attempts == q_foreign.attempts == SOURCE_READ_ATTEMPTS
    assert not q_corrupt.waived and not q_foreign.waived
    # nothing of them reached the destination
    assert {corrupt, foreign}.isdisjoint(listing(p, plan.destination_location))

    report = build_report(p, run_id)
    assert (report["quarantined"], report["waived"]) == (2, 0)
    assert {q["object"] for q in report["quarantine"]} == {display_name(corrupt), display_name(foreign)}
    assert {q["kind"] for q in report["quarantine"]} == {"corrupt", "foreign"}
    assert report["quarantine_kept_at"] == plan.source_location.uri
    assert report["progress"]["quarantined"] == 2
    text = json.dumps(report)
    for secret in ("BEGIN", "wrapped", "plaintext_sha"):
        assert secret not in text


def test_waive_each_then_resume_cuts_over_without_them_and_keeps_their_sources():
    p = archived_platform()
    w = poisoned(p)
    plan, corrupt, foreign, before = w["plan"], w["corrupt"], w["foreign"], w["before"]
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").state == "failed"

    one = waive(
        p,
        run_id,
        objects=[corrupt],
        reason="ticket 4711: record restored from the customer's export",
        actor="support:alice",
    )
    assert one.waived == (display_name(corrupt),) and one.remaining == 1
    blocked = resume(p, run_id, actor="support:alice")
    assert blocked.state == "failed" and "1 object(s) quarantined (1 more already waived)" in blocked.error
    assert display_name(foreign) in blocked.error and display_name(corrupt) not in blocked.error.split("First:")[1]

    rest = waive(
        p,
        run_id,
        all_objects=True,
        reason="foreign object planted by a test; reported to security",
        actor="support:bob",
    )
    assert rest.waived == (display_name(foreign),) and rest.remaining == 0
    again = waive(p, run_id, objects=[corrupt], reason="again", actor="support:carol")  # idempotent
    assert again.waived == () and again.already == (display_name(corrupt),)

    done = resume(p, run_id, actor="support:alice")
    assert done.state == "completed", done

    # The audit trail: one object.waive per object with actor, name and reason; chain intact.
    waivers = [r for r in p.state.iter_audit(tenant_id=TENANT) if r.action == WAIVE_ACTION]
    assert [(r.actor, r.details["object"], r.details["reason"]) for r in waivers] == [
        ("support:alice", display_name(corrupt), "ticket 4711: record restored from the customer's export"),
        ("support:bob", display_name(foreign), "foreign object planted by a test; reported to security"),
    ]
    assert all(r.run_id == run_id for r in waivers)
    assert p.state.verify_audit(tenant_id=TENANT).ok

    # I1-I4 for the rest: destination == manifest - waived == ledger verified; index the same.
    manifest = {e.name for e in p.state.iter_manifest(run_id)}
    waived = {corrupt, foreign}
    dest = listing(p, plan.destination_location)
    assert len(dest) == len(set(dest)) and set(dest) == manifest - waived == set(before) - {corrupt}
    assert {c.name for c in p.state.iter_copies(run_id, status=CopyStatus.VERIFIED)} == manifest - waived
    assert digests(p) == {n: d for n, d in before.items() if n != corrupt}  # byte-identical plaintext (I3)
    assert search_ids(p) == record_ids(set(before) - {corrupt})
    assert p.index.count(plan.new_index) == len(record_ids(before)) - 1
    run = p.state.get_run(run_id)
    verify = run.step("verify").result
    assert (verify["quarantined"], verify["waived"], verify["expected"]) == (2, 2, len(manifest) - 2)
    assert verify["reconciled"].startswith(
        f"manifest {len(manifest)} - quarantined 2 (2 waived) = ledger verified "
        f"{len(manifest) - 2} = destination listing {len(manifest) - 2}"
    )
    assert run.step("build_index").result["waived_records"] == 1

    # The waived sources were never lost: cleanup kept them, bytes unchanged, where the report says.
    src = w["src"]
    assert sorted(listing(p, plan.source_location)) == sorted(waived)
    assert raw(src, corrupt) == w["corrupt_bytes"] and raw(src, foreign) == w["foreign_bytes"]
    cleanup = run.step("cleanup_source").result
    assert (cleanup["kept"], cleanup["kept_at"]) == (2, plan.source_location.uri)
    report = build_report(p, run_id)
    assert report["state"] == "completed" and report["quarantine_kept_at"] == plan.source_location.uri
    assert all(q["waived"] and q["source"] == plan.source_location.uri for q in report["quarantine"])
    assert {q["waived_by"] for q in report["quarantine"]} == {"support:alice", "support:bob"}
    assert report["reconciliation"] == (
        f"{verify['reconciled']}; index documents {len(record_ids(before)) - 1} = manifest records - 1 waived"
    )
    assert p.state.gate(TENANT).state is GateState.OPEN and p.state.get_lease(TENANT) is None
    assert actions(p, run_id).count(WAIVE_ACTION) == 2


def test_fixing_the_source_and_rerunning_from_copy_needs_no_waiver():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    name = sorted(before)[6]
    good = raw(src, name)
    flip_a_byte(src, name)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").state == "failed"
    assert p.state.get_copy(run_id, name).status is CopyStatus.QUARANTINED

    put_raw(src, name, good)  # support restored the object from a backup
    out = rerun(p, run_id, "copy", actor="support")
    assert out.state == "completed", out
    assert p.state.copy_counts(run_id) == {CopyStatus.VERIFIED: len(before)}
    assert digests(p) == before and listing(p, plan.source_location) == []
    assert WAIVE_ACTION not in actions(p, run_id)


def test_a_source_that_authenticates_on_a_second_read_is_copied_not_quarantined():
    """Bounded attempts: a bad read followed by a good one is not poison."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    name = sorted(before)[2]
    good = raw(src, name)
    bad = bytearray(good)
    bad[-5] ^= 0x80
    real = src.open_read
    served = {"bad": 0}

    def open_read(n, **kw):
        if n == name and not served["bad"]:
            served["bad"] += 1
            put_raw(src, name, bytes(bad))
            reader = real(n)  # the bad version, whatever the manifest recorded (a store serving rot)
            put_raw(src, name, good)
            return reader
        return real(n, **kw)

    src.open_read = open_read
    run_id = run_to_end(p, plan)
    assert served["bad"] == 1
    assert p.state.copy_counts(run_id) == {CopyStatus.VERIFIED: len(before)}
    assert digests(p) == before


def rot_before_first_verify(monkeypatch, store: Any, name: bytes) -> None:
    """Flip a byte of ``name`` in ``store`` just before the first verify step runs."""
    state = {"done": False}

    def rot_then_verify(real, ctx):
        if not state["done"]:
            state["done"] = True
            flip_a_byte(store, name)
        return real(ctx)

    wrap_step(monkeypatch, "verify", rot_then_verify)


def test_destination_bit_rot_is_rewritten_from_the_source_not_quarantined(monkeypatch):
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    dst = p.store_for(plan.destination_location)
    name = sorted(before)[4]
    rot_before_first_verify(monkeypatch, dst, name)
    run_id = start(p, plan)
    first = execute(p, run_id, actor="test")
    assert first.state == "failed" and "failed verification" in first.error
    assert p.state.get_copy(run_id, name).status is CopyStatus.FAILED  # not quarantined
    written = count_puts(dst)
    out = resume(p, run_id, actor="support")
    assert out.state == "completed", out
    assert written == [name]  # re-copied from the source
    assert CopyStatus.QUARANTINED not in p.state.copy_counts(run_id)
    assert digests(p) == before


def test_verify_recopies_failed_objects_but_leaves_quarantined_ones_alone(monkeypatch):
    """verify's first pass copies again what failed; a quarantined source is not re-read."""
    p = archived_platform()
    w = poisoned(p)
    plan = w["plan"]
    dst = p.store_for(plan.destination_location)
    rotten = sorted(n for n in w["before"] if n != w["corrupt"])[0]
    rot_before_first_verify(monkeypatch, dst, rotten)
    reads = count_reads(w["src"], {w["corrupt"], w["foreign"], rotten})
    run_id = start(p, plan)
    first = execute(p, run_id, actor="test")
    assert first.state == "failed" and "failed verification" in first.error, first
    assert p.state.get_copy(run_id, rotten).status is CopyStatus.FAILED
    second = resume(p, run_id, actor="support")
    assert second.state == "failed" and second.error.startswith("ObjectsQuarantinedError: 2 object(s)"), second
    assert p.state.get_copy(run_id, rotten).status is CopyStatus.VERIFIED  # rewritten from the source
    assert reads[w["corrupt"]] == reads[w["foreign"]] == SOURCE_READ_ATTEMPTS  # not read again
    assert reads[rotten] >= 2  # copied, then compared with its source and rewritten
    assert p.state.get_run(run_id).step("verify").result is None


def test_a_key_that_is_unavailable_fails_the_run_resumably_and_quarantines_nothing():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    real = p.keychain.dek_by_id
    broken = {"on": True}

    def dek_by_id(tenant, dek_id):
        if broken["on"] and tenant == TENANT and threading_name().startswith("akms-shard"):
            raise KeyUnavailableError("injected: the customer disabled the key", state="disabled")
        return real(tenant, dek_id)

    p.keychain.dek_by_id = dek_by_id
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and out.message == "step copy failed", out
    assert "KeyUnavailableError" in out.error
    counts = p.state.copy_counts(run_id)
    # Revoke wins (docs/key-lifecycle.md): a refused key stops every shard at its object
    # boundary; nothing is quarantined and nothing was copied under the refused key.
    assert CopyStatus.QUARANTINED not in counts and CopyStatus.VERIFIED not in counts, counts
    assert CopyStatus.COPIED not in counts, counts

    broken["on"] = False  # the customer re-enabled the key
    assert resume(p, run_id, actor="support").state == "completed"
    assert digests(p) == before


def threading_name() -> str:
    import threading

    return threading.current_thread().name


def test_a_transient_store_error_fails_the_object_not_quarantines_it():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    name = sorted(before)[7]
    real = src.open_read
    calls = {"n": 0}

    def flaky(n, **kw):
        if n == name:
            calls["n"] += 1
            raise TransientError("injected: 503 SlowDown")
        return real(n, **kw)

    src.open_read = flaky
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and "1 object(s) failed to copy" in out.error and "SlowDown" in out.error
    assert calls["n"] == 1  # not re-read as if it were poison
    assert p.state.get_copy(run_id, name).status is CopyStatus.FAILED
    src.open_read = real
    assert resume(p, run_id, actor="support").state == "completed"
    assert digests(p) == before


# --- waiver rules ---------------------------------------------------------------------------------


def _quarantined_run() -> tuple[Platform, str, dict[str, Any]]:
    p = archived_platform()
    w = poisoned(p)
    run_id = start(p, w["plan"])
    assert execute(p, run_id, actor="test").state == "failed"
    return p, run_id, w


@pytest.mark.parametrize("reason", ["", "   ", "x" * 1001, "line\nbreak"])
def test_a_waiver_needs_a_reason(reason):
    p, run_id, w = _quarantined_run()
    with pytest.raises(ValidationError, match="reason"):
        waive(p, run_id, objects=[w["corrupt"]], reason=reason, actor="support")
    assert WAIVE_ACTION not in actions(p, run_id)


def test_waiving_an_object_that_is_not_quarantined_waives_nothing():
    p, run_id, w = _quarantined_run()
    healthy = next(n for n in w["before"] if n != w["corrupt"])
    with pytest.raises(ValidationError, match="not quarantined") as e:
        waive(p, run_id, objects=[w["corrupt"], healthy], reason="r", actor="support")
    assert display_name(healthy) in str(e.value)
    assert WAIVE_ACTION not in actions(p, run_id)
    assert not Quarantine.from_error(p.state.get_copy(run_id, w["corrupt"]).error).waived
    with pytest.raises(ValidationError, match="or pass --all"):
        waive(p, run_id, reason="r", actor="support")
    with pytest.raises(ValidationError, match="or pass --all"):
        waive(p, run_id, objects=[w["corrupt"]], all_objects=True, reason="r", actor="support")


def test_waive_is_refused_while_a_live_worker_holds_the_run_and_after_cutover():
    p, run_id, w = _quarantined_run()
    lease = p.state.acquire_lease(TENANT, run_id, __import__("datetime").timedelta(seconds=60))
    try:
        with pytest.raises(LeaseHeldError):
            waive(p, run_id, all_objects=True, reason="r", actor="support")
    finally:
        p.state.release_lease(lease)
    waive(p, run_id, all_objects=True, reason="r", actor="support")
    assert resume(p, run_id, actor="support").state == "completed"
    with pytest.raises(ValidationError, match="completed"):
        waive(p, run_id, all_objects=True, reason="r", actor="support")


def test_a_waiver_without_its_audit_record_does_not_count():
    """I6: a ledger row marked waived behind the tool's back blocks verify."""
    p, run_id, w = _quarantined_run()
    for name in (w["corrupt"], w["foreign"]):
        q = Quarantine.from_error(p.state.get_copy(run_id, name).error)
        forged = q.with_waiver(replace_waiver())
        p.state.record_copy(run_id, CopyRecord(name, CopyStatus.QUARANTINED, error=forged.to_error()))
    out = resume(p, run_id, actor="support")
    assert out.state == "failed" and "no object.waive audit record" in out.error, out
    assert p.state.get_tenant(TENANT).location == w["plan"].source


def replace_waiver():
    from archive_kms.migration.quarantine import Waiver

    return Waiver(actor="nobody", reason="edited the database", at="2020-01-01T00:00:00+00:00", audit_seq=1)


def test_cancel_of_a_quarantined_run_puts_the_tenant_back_with_the_poison_untouched():
    from archive_kms.migration import cancel

    p, run_id, w = _quarantined_run()
    out = cancel(p, run_id, actor="support")
    assert out.state == "cancelled"
    src = w["src"]
    assert raw(src, w["corrupt"]) == w["corrupt_bytes"] and raw(src, w["foreign"]) == w["foreign_bytes"]
    assert p.state.get_tenant(TENANT).location == w["plan"].source


# --- the remove flow: a dedicated source keeps its waived objects ---------------------------------


def test_remove_keeps_the_dedicated_source_holding_only_the_waived_object():
    p = archived_platform()
    before = digests(p)
    run_to_end(p, enable_plan(p))
    back = remove_plan(p)
    src = p.store_for(back.source_location)
    name = sorted(before)[5]
    bad = flip_a_byte(src, name)
    run_id = start(p, back)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and "1 object(s) quarantined" in out.error
    waive(p, run_id, objects=[name], reason="lost at the customer", actor="support")
    assert resume(p, run_id, actor="support").state == "completed"
    assert p.provisioner.exists(back.source_location)  # the dedicated container stays: it holds the object
    assert listing(p, back.source_location) == [name] and raw(src, name) == bad
    assert digests(p) == {n: d for n, d in before.items() if n != name}
    result = p.state.get_run(run_id).step("cleanup_source").result
    assert result["kept"] == 1 and result["kept_at"] == back.source_location.uri


def test_a_waived_source_removed_by_hand_before_cleanup_does_not_block_the_run():
    """Support waives a corrupt object and deletes it from the source before cleanup: the
    recheck compares the other names, so the run completes (it used to refuse forever)."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    corrupt = sorted(n for n in before if n.startswith(RECORD_PREFIX))[3]
    flip_a_byte(src, corrupt)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").state == "failed"
    waive(p, run_id, objects=[corrupt], reason="ticket 1: corrupt, the customer re-sends it", actor="support:a")
    src.delete(corrupt)
    out = resume(p, run_id, actor="support")
    assert out.state == "completed", out
    cleanup = p.state.get_run(run_id).step("cleanup_source").result
    assert (cleanup["kept"], cleanup["kept_missing"]) == (0, 1)
    assert listing(p, plan.source_location) == []


def test_a_source_changed_beside_a_kept_object_still_refuses_deletion():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    src = p.store_for(plan.source_location)
    corrupt = sorted(n for n in before if n.startswith(RECORD_PREFIX))[3]
    flip_a_byte(src, corrupt)
    run_id = start(p, plan)
    assert execute(p, run_id, actor="test").state == "failed"
    waive(p, run_id, objects=[corrupt], reason="ticket 2: corrupt", actor="support:a")
    put_raw(src, b"records/ws0/Account/late-writer", b"x" * 10)  # something wrote during the run
    out = resume(p, run_id, actor="support")
    # Found by verify's comparison of the source with the manifest, before cutover (issue #10).
    assert out.state == "failed" and "late-writer' appeared after the manifest" in out.error
    assert p.state.get_run(run_id).step("cutover").state.value == "pending"
    assert corrupt in listing(p, plan.source_location)  # nothing deleted
