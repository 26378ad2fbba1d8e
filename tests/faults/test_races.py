"""Races between people and processes over one run (faults E3, D7, D8; issue 17).

* Two support engineers rerun the same failed step at the same instant, each from a
  process of their own: the step runs once more (one of them executes it; the other is
  refused because a live worker holds the run, or finds the run completed and changes
  nothing); every rerun that got through has its audit record; I1-I7.
* A second trigger while a run is going, from another worker process: it is handed the
  running run (no second run, no second set of side effects), and its attempt to execute
  it is refused while the first worker holds the lease; the first run completes; I1-I7.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import kill_worker
from flows_support import invariants, prefect_texts
from harness import at_step, run_in_worker

from archive_kms.errors import TransientError
from archive_kms.migration import execute, plan_enable, thread_shard_runner, trigger
from archive_kms.state.port import RunState, StepState


def test_two_supports_rerun_the_same_step_at_once(
    fork_context, flow_settings, flow_platform, archived_tenant, customer_key, fault_case, monkeypatch
):
    p = flow_platform
    archived = archived_tenant("s3", records=6, seed=89)
    t = archived.tenant_id

    def copy_fails_once() -> None:
        raise TransientError("copy: injected failure, support will rerun it")

    at_step(monkeypatch, "copy", copy_fails_once)
    plan = replace(plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=2), cutover_grace_seconds=0.0)
    run, _ = trigger(p, plan, actor="test")
    first = execute(p, run.run_id, actor="test", shard_runner=thread_shard_runner, handle_signals=False)
    assert first.state == RunState.FAILED.value and "copy" in first.message, first
    monkeypatch.undo()

    start_at = time.time() + 1.5
    results: list = [None, None]

    def support(i: int) -> None:
        results[i] = run_in_worker(
            fork_context, kill_worker.support_action, flow_settings, "rerun", run.run_id, "copy", start_at
        )

    threads = [threading.Thread(target=support, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    fault_case.injected("concurrent support rerun", 2)
    outcomes, refusals = [], []
    for code, messages in results:
        assert code == 0, (code, messages)
        kind, value = messages[-1]
        (outcomes if kind == "outcome" else refusals).append(value)
    assert outcomes, f"neither rerun ran: {refusals}"
    for refused in refusals:
        # Refused at the start (the other holds the lease), or fenced off later: under load a
        # heartbeat can miss the 5 s lease, the other takes the lease over with a newer
        # token, and the stale holder's next write is refused (what fencing is for).
        held = refused.startswith("LeaseHeldError") and "live worker" in refused
        fenced = refused.startswith("FencedError") and "is stale" in refused
        assert held or fenced, refused
    executed = [o for o in outcomes if o["executed"]]
    assert len(executed) == 1, f"the step ran {len(executed)} times: {outcomes}"
    assert executed[0]["state"] == RunState.COMPLETED.value, executed[0]
    for other in (o for o in outcomes if not o["executed"]):
        # Came after the winner finished (a no-op on a completed run), or was taken over.
        assert other["state"] in (RunState.COMPLETED.value, "superseded"), other
    done = p.state.get_run(run.run_id)
    assert done.state is RunState.COMPLETED and done.step("copy").state is StepState.COMPLETED
    assert done.step("copy").attempt <= 3, done.step("copy")
    fault_case.note(outcomes=[(o["state"], len(o["executed"])) for o in outcomes], refused=len(refusals))
    invariants(p, t, archived.snapshot, reruns=len(outcomes))


def test_a_second_trigger_while_a_run_is_going(
    fork_context, flow_settings, flow_platform, archived_tenant, customer_key, fault_case, monkeypatch, prefect_api
):
    """The run goes through the Prefect flow (``migration-enable``, shard tasks on
    Prefect's thread runner); at its copy step another worker process triggers the same
    enable and tries to execute what it is handed. I7 also reads what Prefect kept of the
    runs (artifacts, parameters, logs)."""
    from archive_kms.flows.migration import run_flow

    p = flow_platform
    archived = archived_tenant("s3", records=6, seed=97)
    t = archived.tenant_id
    key = customer_key("byokms", "s3")
    seen: dict = {}

    def second_worker_now() -> None:
        seen["second"] = run_in_worker(fork_context, kill_worker.second_trigger, flow_settings, t, key)

    at_step(monkeypatch, "copy", second_worker_now)
    # The flow builds its platform from the environment: this test's state store.
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    monkeypatch.setenv("ARCHIVE_KMS_LEASE_TTL_SECONDS", str(flow_settings.lease_ttl_seconds))
    answer = run_flow("enable", tenant=t, mode="byokms", key_ref=key, shards=2, actor="test")
    assert answer["outcome"]["state"] == RunState.COMPLETED.value, answer["outcome"]
    run_id = answer["outcome"]["run_id"]
    fault_case.injected("second trigger during a run")

    code, messages = seen["second"]
    assert code == 0, (code, messages)
    (_, its_run, its_created), (kind, value) = messages
    assert its_run == run_id and its_created is False, messages
    assert kind == "refused" and value.startswith("LeaseHeldError"), messages
    assert [r.run_id for r in p.state.list_runs(t)] == [run_id]
    starts = [a for a in p.state.iter_audit(tenant_id=t) if a.action == "run.start"]
    assert len(starts) == 1, starts
    invariants(p, t, archived.snapshot, texts=prefect_texts(t))
