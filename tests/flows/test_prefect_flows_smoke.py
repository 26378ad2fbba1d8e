"""The Prefect flows (archive_kms.flows.migration) on the real services and the stack's
Prefect server: enable with shard tasks on Prefect's thread pool and on a local Dask
cluster of two worker processes, a second trigger answered with the run already going,
and support resuming and rerunning through the support flow.

Each test reads back from the Prefect server what the flow reported (the flow run, one
task run per shard, the progress/report/summary artifacts), and checks the tenant with
the suite's invariants and with ``verify_tenant``.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
from archive_kms.flows.migration import artifact_key, enable, run_flow, support
from conftest import invariants
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect_polling import completed_task_runs

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.errors import StateError
from archive_kms.migration import STEPS, plan_enable, trigger
from archive_kms.operations.verification import verify_tenant
from archive_kms.state.port import RunState, StepState

RECORDS = 20
DEFAULT_SHARDS = 8

pytestmark = pytest.mark.slow


@pytest.fixture
def flow_env(flow_settings: Settings, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The flows build their platform from the environment, in this process and in every
    Dask worker process (which inherits it): point it at this test's state store."""
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    monkeypatch.setenv("ARCHIVE_KMS_LEASE_TTL_SECONDS", str(flow_settings.lease_ttl_seconds))
    assert Settings().state_url == flow_settings.state_url
    return flow_settings


def kms_key(settings: Settings) -> str:
    """A fresh customer key in LocalStack KMS."""
    meta = clients.aws_client("kms", settings).create_key(Description=f"archive-kms flow smoke {uuid.uuid4().hex[:8]}")
    return f"aws-kms://{meta['KeyMetadata']['Arn']}"


def assert_completed(answer: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    outcome, report = answer["outcome"], answer["report"]
    assert outcome["state"] == "completed", outcome
    assert outcome["tenant"] == tenant_id and outcome["flow"] == "enable", outcome
    assert report["state"] == "completed" and report["verification"] == "ok", report
    assert (report["lost"], report["duplicated"]) == (0, 0), report
    assert [s["state"] for s in report["steps"]] == ["completed"] * len(STEPS), report["steps"]
    return report


def assert_tenant_verifies(platform: Any, tenant: Any) -> None:
    invariants(platform, tenant.tenant_id, tenant.snapshot)
    v = verify_tenant(platform, tenant.tenant_id)
    assert v["ok"], v
    assert (v["objects"], v["records"], v["index_documents"]) == (len(tenant.snapshot), RECORDS, RECORDS), v
    assert v["location"] == f"s3://archive-kms-tenant-{tenant.tenant_id}/", v


def flow_run_on_server(flow_run_id: uuid.UUID, name: str) -> dict[str, Any]:
    """The flow run and its artifacts as the Prefect server has them, artifacts by key."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.name == name and run.state is not None and run.state.is_completed(), (run.name, run.state)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts}


def assert_artifacts(artifacts: dict[str, Any], tenant_id: str, run_id: str) -> None:
    progress = artifacts[artifact_key(tenant_id, "progress")]
    assert progress.type == "progress" and float(progress.data) == 100.0, progress
    table = artifacts[artifact_key(tenant_id, "report")]
    rows = {row["item"]: row["value"] for row in json.loads(table.data)}
    assert rows["run_id"] == run_id and rows["verification"] == "ok" and rows["objects"] != "", rows
    assert rows["throughput_mb_s"] and all(f"step {s}" in rows for s in STEPS), rows
    summary = artifacts[artifact_key(tenant_id)]
    assert summary.type == "markdown" and f"enable {tenant_id}: completed" in summary.data, summary.data


def test_enable_flow_with_shard_tasks_on_threads(flow_env: Settings, flow_platform: Any, archived_tenant) -> None:
    tenant = archived_tenant("s3", records=RECORDS)

    state = enable(tenant.tenant_id, "byokms", kms_key(flow_env), return_state=True)

    assert state.is_completed(), state
    answer = state.result()
    report = assert_completed(answer, tenant.tenant_id)
    assert report["objects"] == len(tenant.snapshot), report
    assert_tenant_verifies(flow_platform, tenant)
    assert [r["shard"] for r in answer["shards"]["copy"]] == list(range(DEFAULT_SHARDS))
    assert {r["pid"] for r in answer["shards"]["copy"]} == {os.getpid()}
    # The attested verify (the default, ADR 0018) reads no object: it runs in the flow, no shard tasks.
    assert "verify" not in answer["shards"], answer["shards"]

    flow_run_id = state.state_details.flow_run_id
    artifacts = flow_run_on_server(flow_run_id, f"enable-{tenant.tenant_id}")
    assert_artifacts(artifacts, tenant.tenant_id, answer["outcome"]["run_id"])
    shard_runs = completed_task_runs(flow_run_id, DEFAULT_SHARDS)
    assert sorted(r.name for r in shard_runs) == sorted(f"copy-shard-{n}" for n in range(DEFAULT_SHARDS))


@pytest.mark.timeout(600)
def test_enable_flow_with_shard_tasks_on_dask_worker_processes(
    flow_env: Settings, flow_platform: Any, archived_tenant
) -> None:
    tenant = archived_tenant("s3", records=RECORDS)

    answer = run_flow("enable", tenant=tenant.tenant_id, mode="byokms", key_ref=kms_key(flow_env), task_runner="dask")

    assert_completed(answer, tenant.tenant_id)
    assert_tenant_verifies(flow_platform, tenant)
    # Every copy shard ran outside this process, in the local cluster's worker processes (the
    # attested verify, the default, runs in the flow: ADR 0018).
    assert [r["shard"] for r in answer["shards"]["copy"]] == list(range(DEFAULT_SHARDS))
    assert "verify" not in answer["shards"], answer["shards"]
    workers = {r["pid"] for r in answer["shards"]["copy"]}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2, workers
    assert sum(r["objects"] for r in answer["shards"]["copy"]) == len(tenant.snapshot), answer["shards"]["copy"]


def test_second_trigger_gets_the_running_run_and_support_resumes_and_reruns_it(
    flow_env: Settings, flow_platform: Any, archived_tenant
) -> None:
    tenant = archived_tenant("s3", records=RECORDS)
    key = kms_key(flow_env)
    run, created = trigger(flow_platform, plan_enable(flow_platform, tenant.tenant_id, "byokms", key), actor="test")
    assert created

    # A worker that started it died before its first step: the flow answers with that run, untouched.
    again = enable(tenant.tenant_id, "byokms", key)
    assert again["outcome"] == {
        "run_id": run.run_id,
        "tenant": tenant.tenant_id,
        "flow": "enable",
        "state": "running",
        "created": False,
        "executed": [],
        "message": "already running",
        "error": None,
    }
    assert flow_platform.state.get_run(run.run_id).step("preflight").state is StepState.PENDING
    assert len(flow_platform.state.list_runs(tenant.tenant_id)) == 1

    resumed = support(run.run_id, "resume")
    assert_completed(resumed, tenant.tenant_id)
    assert resumed["outcome"]["executed"] == list(STEPS)
    assert_tenant_verifies(flow_platform, tenant)

    rerun = support(run.run_id, "rerun", from_step="verify")
    assert rerun["outcome"]["state"] == "completed" and rerun["outcome"]["executed"] == [], rerun["outcome"]
    assert "nothing changed" in rerun["outcome"]["message"], rerun["outcome"]
    assert flow_platform.state.get_run(run.run_id).state is RunState.COMPLETED


def test_a_failed_migration_ends_the_flow_run_failed_and_still_answers(
    flow_env: Settings, flow_platform: Any, archived_tenant
) -> None:
    """A refused preflight (disabled customer key): the Prefect flow run is Failed on the
    server (for the UI and automations), and run_flow still returns the run's answer."""
    tenant = archived_tenant("s3", records=RECORDS)
    ref = kms_key(flow_env)
    clients.aws_client("kms", flow_env).disable_key(KeyId=ref.removeprefix("aws-kms://"))

    state = enable(tenant.tenant_id, "byokms", ref, return_state=True)

    assert state.is_failed(), state
    with get_client(sync_client=True) as client:
        on_server = client.read_flow_run(state.state_details.flow_run_id)
    assert on_server.state is not None and on_server.state.is_failed(), on_server.state
    assert "preflight" in (on_server.state.message or ""), on_server.state.message
    answer = state.result(raise_on_failure=False)
    # refused before anything changed: the run is cancelled by itself (ADR 0021)
    assert answer["outcome"]["state"] == "refused" and "disabled" in answer["outcome"]["error"], answer["outcome"]
    assert answer["report"]["steps"][0] == {**answer["report"]["steps"][0], "step": "preflight", "state": "failed"}
    assert answer["report"]["state"] == "cancelled"
    assert flow_platform.state.get_tenant(tenant.tenant_id).key_mode.value == "managed"

    # Nothing blocks a new trigger: a new run, refused at preflight the same way while the key is disabled.
    again = run_flow("enable", tenant=tenant.tenant_id, mode="byokms", key_ref=ref)
    assert again["outcome"]["state"] == "refused" and again["outcome"]["run_id"] != answer["outcome"]["run_id"]
    assert flow_platform.state.list_runs(tenant.tenant_id, states=[RunState.FAILED]) == []

    # A refusal of the flow itself (an unknown run) is raised by run_flow as the error.
    with pytest.raises(StateError, match="unknown run 'nope'"):
        run_flow("support", run_id="nope", action="cancel")
