"""Target naming limits, cancel from a failed run, and refusals inside the flows, on the
real services (issue 10, defects 4 and 5).

* A name that fits the dedicated bucket (no key prefix) but not the shared bucket's
  ``tenants/<id>/``: a ``remove`` run that meets it at ``copy`` (it appeared after
  preflight) fails; ``archive-kms runs cancel`` must put the tenant back (it crashed with
  a traceback and left the gate paused). A new ``remove`` is then refused at preflight,
  naming the object, before any byte moves, and leaves no run to clean up.
* ``enable`` while a failed run exists, and ``runs cancel`` past cutover: one clean line
  from inside the Prefect flow, no traceback.

The CLI runs as real subprocesses (as an operator runs it), on the test's state store, with
``--wait`` (the flow runs in the CLI's process, where the refusals under test happen).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import run_plan, storage_snapshot

from archive_kms.errors import TransientError
from archive_kms.migration import plan_enable, plan_remove
from archive_kms.migration import steps as steps_module
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.state.port import GateState, RunState
from archive_kms.storage import Kind
from archive_kms.storage.naming import encode_name

CLI = str(Path(sys.executable).parent / "archive-kms")


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARCHIVE_KMS_STATE_URL": settings.state_url, "PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def long_name(prefix_len: int) -> bytes:
    """An attachment name whose key fits 1,024 without a prefix but not with ``prefix_len``."""
    head = b"attachments/default/"
    room = 1024 - len(encode_name(head))
    name = head + b"a" * (room - prefix_len // 2)
    assert len(encode_name(name)) <= 1024 < len(encode_name(name)) + prefix_len
    return name


def test_cancel_a_remove_run_that_failed_on_a_name_then_preflight_refuses_it(
    flow_platform, flow_settings, archived_tenant, customer_key, monkeypatch, prefect_api
):
    p = flow_platform
    archived = archived_tenant("s3", records=8)
    t = archived.tenant_id
    key_ref = customer_key("byokms")
    assert run_plan(p, plan_enable(p, t, "byokms", key_ref, shards=2)).state == RunState.COMPLETED.value
    dedicated = p.location_of(t)
    shared_prefix = len(f"tenants/{t}/")
    name = long_name(shared_prefix)

    # The long-named object appears after remove's preflight (as a writer of an older
    # version could have made it): copy meets it.
    real_preflight = steps_module.STEP_FUNCTIONS["preflight"]

    def preflight_then_plant(ctx):
        out = real_preflight(ctx)
        p.open_archive(t).put_object(name, "default", [b"an attachment"])
        return out

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "preflight", preflight_then_plant)
    plan = plan_remove(p, t, shards=2)
    failed = run_plan(p, plan)
    monkeypatch.undo()
    assert failed.state == RunState.FAILED.value and "copy" in (failed.message or ""), failed
    assert p.state.gate(t).state is GateState.PAUSED
    kept = storage_snapshot(p, t, dedicated)
    assert name in kept

    cancelled = cli(flow_settings, "runs", "cancel", failed.run_id, "--wait")
    assert cancelled.returncode == 0, cancelled.stderr[-3000:]
    assert "Traceback" not in cancelled.stdout + cancelled.stderr
    tenant = p.state.get_tenant(t)
    assert p.state.get_run(failed.run_id).state is RunState.CANCELLED
    assert dict(tenant.location) == dedicated.to_dict() and tenant.key_ref == key_ref
    assert p.keychain.status(t).l1_ref == key_ref
    assert p.state.gate(t).state is GateState.OPEN
    assert storage_snapshot(p, t, dedicated) == kept  # the dedicated bucket untouched
    assert list(p.store_for(plan.destination_location).list()) == []  # nothing left in the shared prefix
    after = JobSpec(f"{t}-after", t, "synthetic", synthetic={"count": 2, "seed": 5, "offset": 8})
    assert submit_job(p.state, after, p.open_archive).decision == "run"  # writer and old index work again

    # Now remove is refused at preflight, naming the object, nothing moved, no run left.
    refused = cli(flow_settings, "remove", t, "--wait")
    line = one_error_line(refused)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused at preflight" in line and "1 object name(s) do not fit" in line
    assert "aaaa" in line and f"tenants/{t}/" in line and "ValidationError" in line
    assert "TransientError" not in line  # permanent, never labelled transient
    runs = p.state.list_runs(t)
    assert runs[0].state is RunState.CANCELLED and p.state.find_active_run(t) is None
    assert p.location_of(t).kind is Kind.DEDICATED and p.state.gate(t).state is GateState.OPEN
    assert list(p.store_for(plan.destination_location).list()) == []


def test_refusals_inside_the_flows_are_one_line(
    flow_platform, flow_settings, archived_tenant, customer_key, monkeypatch, prefect_api
):
    p = flow_platform
    archived = archived_tenant("s3", records=6)
    t = archived.tenant_id
    key_ref = customer_key("byokms")

    def copy_fails(ctx):
        raise TransientError("injected: the destination went away")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "copy", copy_fails)
    failed = run_plan(p, plan_enable(p, t, "byokms", key_ref, shards=2))
    monkeypatch.undo()
    assert failed.state == RunState.FAILED.value

    again = cli(flow_settings, "enable", t, "--mode", "byokms", "--key-ref", key_ref, "--wait")
    line = one_error_line(again)
    assert again.returncode == 2 and f"has failed enable run {failed.run_id}" in line and "runs cancel" in line

    # Resume to the end but fail after cutover: cancel is then refused, cleanly.
    def cleanup_fails(ctx):
        raise TransientError("injected: cleanup interrupted")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "cleanup_source", cleanup_fails)
    from archive_kms.migration import resume

    late = resume(p, failed.run_id, actor="test")
    monkeypatch.undo()
    assert late.state == RunState.FAILED.value and "cleanup_source" in late.message
    past = cli(flow_settings, "runs", "cancel", failed.run_id, "--wait")
    line = one_error_line(past)
    assert past.returncode == 2 and "cannot be cancelled" in line
