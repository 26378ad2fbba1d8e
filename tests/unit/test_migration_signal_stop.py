"""Graceful stop of a migration run on the in-memory platform (faults D3).

SIGTERM or SIGINT (main thread), or the caller's stop flag (any thread): the shards take
no new object, objects in flight finish (or, past the grace, their upload is aborted),
the ledger is flushed, the step is recorded as interrupted, the run ends failed with the
stop's reason, the lease is released so a plain ``resume`` continues at once, and the
previous signal handlers are back. Then the resumed run settles with I1-I5 intact.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from test_migration_engine import TENANT, archived_platform, assert_settled, digests, enable_plan, listing, start

from archive_kms.migration import Hooks, MigrationPlan, StopRequest, execute, request_stop, resume, stopping
from archive_kms.operations.archive import workspace_of
from archive_kms.operations.platform import Platform
from archive_kms.state.port import CopyStatus, RunState, StepState

MiB = 1024 * 1024


def stop_after_reads(store: Any, n: int, do_stop) -> dict[str, int]:
    """Call ``do_stop()`` once, from the shard thread that opens ``store``'s n-th object."""
    real = store.open_read
    seen = {"reads": 0, "at": 0}
    lock = threading.Lock()

    def open_read(name, **kw):
        with lock:
            seen["reads"] += 1
            fire = seen["reads"] == n
        if fire:
            seen["at"] = seen["reads"]
            do_stop()
        return real(name, **kw)

    store.open_read = open_read
    return seen


def assert_stopped(p: Platform, run_id: str, out, step: str, reason: str) -> None:
    """The run ended failed-resumable with ``reason``; ``step`` interrupted; lease released;
    every object committed at the destination is in the ledger; no upload left open."""
    assert out.state == "failed" and out.message == reason, out
    assert out.error.startswith("StopRequestedError: interrupted: " + reason), out.error
    run = p.state.get_run(run_id)
    assert run.state is RunState.FAILED
    rec = run.step(step)
    assert rec.state is StepState.FAILED and rec.error.startswith(f"interrupted: {reason}"), rec
    assert "archive-kms runs resume" in rec.error
    assert p.state.get_lease(TENANT) is None  # released: resume needs no --takeover, no TTL wait
    assert [a.details for a in p.state.iter_audit(tenant_id=TENANT) if a.action == "run.stop"][-1]["step"] == step
    counts = p.state.copy_counts(run_id)
    assert CopyStatus.FAILED not in counts and CopyStatus.QUARANTINED not in counts, counts
    dest = p.store_for(MigrationPlan.from_params(run.params).destination_location)
    recorded = {c.name for c in p.state.iter_copies(run_id)}
    assert {i.name for i in dest.list()} == recorded, "an object was committed but its ledger row not flushed"
    assert not list(dest.pending_uploads())


# --- the caller's flag ------------------------------------------------------------------------------


def test_stop_requested_mid_copy_stops_at_an_object_boundary_and_resume_continues_at_once():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    seen = stop_after_reads(
        p.store_for(plan.source_location), 6, lambda: request_stop(run_id, "stop requested by the test")
    )
    started = time.monotonic()
    out = execute(p, run_id, actor="test")
    assert time.monotonic() - started < 10

    assert seen["at"] == 6
    assert_stopped(p, run_id, out, "copy", "stop requested by the test")
    copied = p.state.copy_counts(run_id).get(CopyStatus.COPIED, 0)
    assert 6 <= copied < len(before), copied  # the in-flight objects finished; the rest were left
    assert p.state.get_tenant(TENANT).location == plan.source
    assert stopping.for_run(run_id) is None  # unregistered

    again = resume(p, run_id, actor="support")  # no takeover, no waiting for a lease to expire
    assert again.state == "completed", again
    copy = p.state.get_run(run_id).step("copy")
    assert copy.attempt == 2 and copy.result["objects"] == len(before) - copied
    assert_settled(p, plan, run_id, before)


def test_a_stop_between_steps_marks_the_next_step_interrupted_before_it_began():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    stop = StopRequest()

    def on_step(step: str, state: str, result: Any) -> None:
        if (step, state) == ("manifest", "completed"):
            stop.set("stopped by the operator")

    out = execute(p, run_id, actor="test", stop=stop, hooks=Hooks(on_step=on_step))
    assert_stopped(p, run_id, out, "copy", "stopped by the operator")
    copy = p.state.get_run(run_id).step("copy")
    assert copy.attempt == 0 and "before step copy" in copy.error
    assert p.state.copy_counts(run_id) == {}
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)


def test_a_stop_during_verify_leaves_unverified_rows_copied_for_the_resume():
    p = archived_platform()
    before = digests(p)
    plan = replace(enable_plan(p), verify="read-back")  # the mode whose verify reads the destination
    run_id = start(p, plan)
    seen = stop_after_reads(p.store_for(plan.destination_location), 4, lambda: request_stop(run_id, "verify stop"))
    out = execute(p, run_id, actor="test")
    assert seen["at"] == 4
    assert_stopped(p, run_id, out, "verify", "verify stop")
    counts = p.state.copy_counts(run_id)
    assert counts.get(CopyStatus.VERIFIED, 0) < len(before) and sum(counts.values()) == len(before), counts
    assert p.state.get_run(run_id).step("copy").state is StepState.COMPLETED
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)


def test_execute_in_another_thread_leaves_signals_alone_and_request_stop_reaches_it():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    copying, asked = threading.Event(), threading.Event()
    handlers: list[Any] = []

    def hold_until_asked() -> None:  # from a shard thread: the copy waits for the main thread's request
        handlers.append(signal.getsignal(signal.SIGTERM))
        copying.set()
        assert asked.wait(10)

    stop_after_reads(p.store_for(plan.source_location), 3, hold_until_asked)
    result: dict[str, Any] = {}
    original = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=lambda: result.update(out=execute(p, run_id, actor="test")))
    t.start()
    assert copying.wait(30)
    assert request_stop(run_id, "stopped from the main thread") is True
    asked.set()
    t.join(30)
    assert not t.is_alive()
    assert handlers == [original]  # no handler installed from a non-main thread
    assert_stopped(p, run_id, result["out"], "copy", "stopped from the main thread")
    assert p.state.copy_counts(run_id).get(CopyStatus.COPIED, 0) < len(before)  # stopped half way
    assert request_stop(run_id) is False  # no longer executing here
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)


# --- real signals in the main thread ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_gracefully_and_the_previous_handler_is_restored(sig):
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = start(p, plan)
    previous_calls: list[int] = []

    def previous(signum, frame):
        previous_calls.append(signum)

    old = signal.signal(sig, previous)
    try:

        def signal_and_wait_for_the_handler() -> None:
            # Python runs the handler in the main thread. Sent to the main thread itself, the
            # signal interrupts its wait for the shards (a process-wide kill may land on
            # another thread, and the main thread then sleeps on until a shard ends). Hold
            # this shard until the handler has run, or the other shards copy everything first.
            signal.pthread_kill(threading.main_thread().ident, sig)
            stop = stopping.for_run(run_id)
            assert stop is not None and stop.wait(10), "the engine's handler never ran"

        stop_after_reads(p.store_for(plan.source_location), 5, signal_and_wait_for_the_handler)
        out = execute(p, run_id, actor="test")
        assert signal.getsignal(sig) is previous  # restored
    finally:
        signal.signal(sig, old)
    assert previous_calls == []  # the engine's handler took it, not the previous one
    reason = f"stopped by signal ({sig.name})"
    assert_stopped(p, run_id, out, "copy", reason)
    assert p.state.copy_counts(run_id).get(CopyStatus.COPIED, 0) < len(before)  # stopped half way
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)


def test_handle_signals_false_installs_nothing():
    p = archived_platform()
    plan = enable_plan(p)
    run_id = start(p, plan)
    seen: list[Any] = []

    def on_step(step: str, state: str, result: Any) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    assert execute(p, run_id, actor="test", handle_signals=False, hooks=Hooks(on_step=on_step)).state == "completed"
    assert set(map(id, seen)) == {id(before)}


# --- objects in flight: finish within the grace, else aborted -------------------------------------------


def plant_big_object(p: Platform, plan, size: int = 6 * MiB) -> bytes:
    """A valid multi-segment attachment in the tenant's source (1 MiB segments)."""
    from archive_kms.crypto.envelope import ObjectBinding, encrypt_iter

    src = p.store_for(plan.source_location)
    ws = workspace_of(next(i.name for i in src.list()))
    name = b"attachments/" + ws.encode() + b"/00PBIGSTOP0000001"
    dek = p.keychain.dek_for_encrypt(TENANT, ws)
    chunks = (os.urandom(MiB) for _ in range(size // MiB))
    src.put_stream(
        name,
        encrypt_iter(chunks, dek=dek.key, dek_id=dek.dek_id, binding=ObjectBinding(TENANT, ws, name)),
        if_absent=True,
    )
    return name


def slow_upload_of(store: Any, name: bytes, per_chunk: float, started: threading.Event) -> None:
    real = store.put_stream

    def put_stream(n, chunks, **kw):
        if n != name:
            return real(n, chunks, **kw)

        def slowly():
            for c in chunks:
                started.set()
                time.sleep(per_chunk)
                yield c

        return real(n, slowly(), **kw)

    store.put_stream = put_stream


@pytest.mark.parametrize("grace,finishes", [(30.0, True), (0.1, False)], ids=["finishes", "aborted"])
def test_an_object_in_flight_finishes_within_the_grace_or_its_upload_is_aborted(monkeypatch, grace, finishes):
    monkeypatch.setattr(stopping, "STOP_GRACE_SECONDS", grace)
    p = archived_platform()
    plan = enable_plan(p)
    big = plant_big_object(p, plan)
    before = digests(p)
    run_id = start(p, plan)
    dst = p.store_for(plan.destination_location)
    uploading = threading.Event()
    slow_upload_of(dst, big, 0.25, uploading)
    pending_seen: list[int] = []

    def stop_when_uploading():
        assert uploading.wait(20)
        time.sleep(0.3)
        pending_seen.append(len(list(dst.pending_uploads())))
        request_stop(run_id, "stop while uploading")

    threading.Thread(target=stop_when_uploading, daemon=True).start()
    began = time.monotonic()
    out = execute(p, run_id, actor="test")
    took = time.monotonic() - began
    assert pending_seen and pending_seen[0] >= 1, "the big object was not in flight when the stop came"
    assert_stopped(p, run_id, out, "copy", "stop while uploading")
    rec = p.state.get_copy(run_id, big)
    if finishes:
        assert rec is not None and rec.status is CopyStatus.COPIED
        assert big in listing(p, plan.destination_location)
    else:
        assert rec is None and big not in listing(p, plan.destination_location)
        assert took < 6 * 0.25, took  # did not wait for the whole object
    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)
