"""A run triggered through the console API executes on the stack's Prefect worker (the
deployment, not this process) against the real services, and ``archive-kms runs show RUN
--follow`` follows it to the end and exits with its outcome.

The API, the worker and the CLI share the stack's configuration (its endpoints file and
state store): that is what a deployment looks like. The tenant id is unique and its
buckets and indices are removed at teardown (``flow_platform``'s cleanup)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from archive_kms.api.auth import issue_token, token_keys
from archive_kms.config import Settings
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.operations.verification import verify_tenant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from console_server import serving

FOLLOW_TIMEOUT_S = 240
ARCHIVE_KMS = str(Path(sys.executable).parent / "archive-kms")


@pytest.fixture
def stack_platform(localstack, elasticsearch, worker, prefect_api, flow_platform):
    """The platform on the stack's own settings (the worker's); ``flow_platform`` is asked
    for only for its teardown of the tenant ids ``new_tenant_id`` hands out."""
    return Platform.from_settings(Settings())


def test_enable_through_the_api_runs_on_the_worker_and_follow_sees_it_complete(
    stack_platform, new_tenant_id, customer_key, tmp_path
):
    from archive_kms.api.app import console_from_settings, create_app

    p = stack_platform
    tenant = new_tenant_id()
    create_tenant(p, tenant, cloud="s3", actor="test")
    spec = JobSpec(f"{tenant}-seed", tenant, "synthetic", synthetic={"count": 12, "seed": 5, "mix": "small"})
    archived = submit_job(p.state, spec, p.open_archive)
    assert archived.decision == "run" and archived.records == 12
    key_ref = customer_key("byokms", "s3")
    token = issue_token(token_keys(Settings()), subject="alice", role="tenant_admin", tenant_id=tenant)

    with serving(create_app(console_from_settings())) as base:
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        resp = api.post(f"/api/tenants/{tenant}/enable", json={"mode": "byokms", "key_ref": key_ref, "shards": 2})
        assert resp.status_code == 202, resp.text
        started = resp.json()["run"]
        run_id = started["run_id"]
        assert started["deployment"] == "migration-enable/enable" and started["flow_run_id"]

        t0 = time.monotonic()
        follow = subprocess.run(
            [ARCHIVE_KMS, "runs", "show", run_id, "--follow", "--interval", "0.5"],
            capture_output=True,
            text=True,
            timeout=FOLLOW_TIMEOUT_S,
        )
        followed_for = time.monotonic() - t0
        assert follow.returncode == 0, f"{follow.stdout[-3000:]}\n{follow.stderr[-3000:]}"
        assert f"run {run_id}: completed" in follow.stdout, follow.stdout[-2000:]
        assert "steps" in follow.stdout and "13/13" in follow.stdout, follow.stdout[-2000:]

        shown = api.get(f"/api/runs/{run_id}").json()
        assert shown["state"] == "completed" and shown["report"]["verification"] == "ok", shown["report"]
        assert shown["report"]["lost"] == 0 and shown["report"]["duplicated"] == 0
        (launch,) = shown["launches"]
        assert (launch["flow_run_id"], launch["state"]) == (started["flow_run_id"], "completed"), launch
        tenant_row = api.get(f"/api/tenants/{tenant}").json()
        assert tenant_row["key_mode"] == "byokms" and tenant_row["active_run"] is None

    # it ran in the worker's flow run: tagged with the tenant and the run, library logs in its log
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(started["flow_run_id"])
        assert {f"tenant:{tenant}", f"run:{run_id}"} <= set(flow_run.tags), flow_run.tags
        assert flow_run.parameters["run_id"] == run_id and flow_run.deployment_id is not None
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    library = [entry for entry in logs if entry.name.startswith("archive_kms.")]
    assert any("re-wrapped" in entry.message for entry in library), sorted({e.name for e in logs})
    assert verify_tenant(p, tenant)["ok"]
    print(f"\nconsole e2e: submitted -> completed on the worker, followed for {followed_for:.1f} s")


def test_follow_of_a_run_whose_flow_run_crashed_exits_1(stack_platform, new_tenant_id, customer_key):
    """A flow run that ends without settling the run (here: submitted with a run id the
    flow refuses) makes ``--follow`` stop and exit 1 instead of waiting forever."""
    from archive_kms.flows.launcher import PrefectLauncher

    from archive_kms.migration import plan_enable, trigger
    from archive_kms.migration.launch import run_tags

    p = stack_platform
    tenant = new_tenant_id()
    create_tenant(p, tenant, cloud="s3", actor="test")
    run, _ = trigger(p, plan_enable(p, tenant, "byokms", customer_key("byokms", "s3")), actor="test")
    launcher = PrefectLauncher.from_settings(Settings())
    # a remove flow run for an enable run: the flow refuses it and ends Failed; the run stays running
    launcher.submit(
        "migration-remove/remove", {"tenant": tenant, "run_id": run.run_id}, tags=run_tags(tenant, run.run_id)
    )
    follow = subprocess.run(
        [ARCHIVE_KMS, "runs", "show", run.run_id, "--follow", "--json", "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=FOLLOW_TIMEOUT_S,
    )
    assert follow.returncode == 1, f"{follow.stdout[-2000:]}\n{follow.stderr[-2000:]}"
    last = json.loads(follow.stdout.splitlines()[-1])
    assert last["done"] and last["outcome"] == "crashed" and last["state"] == "running", last
    assert last["flow_run"]["state"] == "failed", last
