"""Revocation on the real services (docs/key-lifecycle.md; ADRs 0022-0024).

- ``archive-kms revoke`` (``revoke_tenant``) against another *process* that reads and
  searches at 10 Hz with warm caches: no success after it returns; restore brings access
  back in that same process.
- The customer disables the master key at the provider (LocalStack KMS ``DisableKey``,
  the Key Vault emulator ``enabled=False``, a PyKMIP revoke): a warm process is refused
  within the key-state check period, the monitor records the revocation (actor
  ``monitor``), and (where the provider can re-enable) restore brings access back.
- A key-service outage (a fault proxy in front of LocalStack KMS) is not a revocation:
  reads serve per the grace policy or fail as "key service unavailable", and recover.
- A revoke during an enable run: the run stops, nothing is lost, it resumes after restore.

Timings are printed (``-s``), never asserted beyond generous bounds;
``bench/bench_revocation.py`` prints the targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import invariants, run_plan, storage_snapshot

from archive_kms.errors import KeyServiceUnavailableError, KeyUnavailableError, TenantRevokedError
from archive_kms.migration import plan_enable, resume
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.key_monitor import Classification, check_keys
from archive_kms.operations.key_warnings import list_warnings
from archive_kms.operations.platform import Platform
from archive_kms.operations.revocation import restore_tenant, revoke_tenant
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import Flow, RunState

PROBE = Path(__file__).resolve().parent / "probe_reader.py"
#: A warm process is refused within key_state_check_seconds (5 s) plus the call; generous.
DISABLE_BOUND_SECONDS = 30.0


class ProbeProcess:
    """``probe_reader.py`` in a subprocess: reads and searches one tenant at 10 Hz."""

    def __init__(self, settings: Any, tenant: str, record: Any, tmp_path: Path, env: dict[str, str] | None = None):
        self.out = tmp_path / f"probe-{uuid.uuid4().hex[:8]}.jsonl"
        full_env = {**os.environ, "ARCHIVE_KMS_STATE_URL": settings.state_url, **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(PROBE),
                tenant,
                record.workspace_id,
                record.object_type,
                record.record_id,
                str(self.out),
                "--hz",
                "10",
                "--seconds",
                "240",
            ],
            env=full_env,
        )

    def lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [x for x in self.lines() if "ready" in x]
            if ready:
                assert ready[0]["ready"], ready[0]
                return
            assert self.proc.poll() is None, f"the probe process ended: {self.lines()}"
            time.sleep(0.2)
        raise AssertionError("the probe process never got warm")

    def attempts(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [x for x in self.lines() if "op" in x and x["t"] >= since]

    def wait_for(self, ok: bool, since: float, timeout: float) -> dict[str, Any]:
        """The first attempt after ``since`` with this outcome (both ops once ``ok``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [x for x in self.attempts(since) if x["ok"] is ok]
            if got and (not ok or {x["op"] for x in got} == {"read", "search"}):
                return got[0]
            time.sleep(0.1)
        raise AssertionError(f"no {'success' if ok else 'refusal'} within {timeout} s: {self.attempts(since)[-4:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def probes():
    made: list[ProbeProcess] = []
    yield made
    for p in made:
        p.stop()


def _archive(platform: Platform, tid: str, records: int = 8) -> list[Any]:
    spec = JobSpec(f"{tid}-seed", tid, "synthetic", synthetic={"count": records, "seed": 3, "workspaces": 2})
    out = submit_job(platform.state, spec, platform.open_archive)
    assert out.decision == "run" and out.records == records, out
    return [r for r, _ in spec.materialise()]


def _read(platform: Platform, tid: str, rec: Any) -> Any:
    return platform.open_archive(tid).read_record(rec.workspace_id, rec.object_type, rec.record_id)


def test_revoke_refuses_a_warm_reader_in_another_process_and_restore_brings_it_back(
    flow_platform, new_tenant_id, probes, tmp_path
):
    p = flow_platform
    tid = new_tenant_id()
    create_tenant(p, tid, cloud="s3", actor="test")  # managed key: a plaintext index must refuse too
    recs = _archive(p, tid)
    probe = ProbeProcess(p.settings, tid, recs[0], tmp_path)
    probes.append(probe)
    probe.wait_ready()
    probe.wait_for(True, time.time(), 30)

    asked = time.time()
    receipt = revoke_tenant(p, tid, actor="alice@sec", reason="incident 7")
    returned = time.time()
    data = receipt.to_dict()
    print(f"\nrevoke receipt (managed key): {json.dumps(data, indent=1)}")
    assert receipt.ok, data.get("not_refusing_in_time")
    time.sleep(2.0)  # the probe keeps trying at 10 Hz
    after = probe.attempts(returned)
    assert after, "the probe made no attempt after revoke returned"
    assert [x for x in after if x["ok"]] == [], "served after revoke returned"
    assert {x["op"] for x in after} == {"read", "search"}
    assert all(x["error"] == "TenantRevokedError" and f"tenant {tid}: key revoked at" in x["message"] for x in after)
    first_refusal = probe.wait_for(False, asked, 1)
    print(f"another warm process refused {first_refusal['t'] - asked:.3f} s after the request")
    components = {c["component"]: c for c in data["components"]}
    for name in ("reads", "search", "reads (fresh process)", "search (fresh process)", "unwrap", "job writes"):
        assert components[name]["refusing"] is True, (name, components[name])
    runs = p.state.list_runs(tid)
    assert [(r.flow, r.state) for r in runs] == [(Flow.REVOKE, RunState.COMPLETED)]
    receipts = [a for a in p.state.iter_audit(tenant_id=tid) if a.action == "revoke.receipt"]
    assert len(receipts) == 1 and receipts[0].actor == "alice@sec"

    report = restore_tenant(p, tid, actor="bob@sec", reason="incident closed")
    restored = time.time()
    assert report.restored
    back = probe.wait_for(True, restored, 15)
    print(f"the warm process served again {back['t'] - restored:.3f} s after restore returned")
    assert _read(p, tid, recs[1]) == recs[1]
    assert p.state.get_tenant(tid).revoked is False


def _customer_tenant(p: Platform, new_tenant_id, key_ref: str) -> tuple[str, list[Any]]:
    tid = new_tenant_id()
    create_tenant(p, tid, cloud="s3", key_ref=key_ref, actor="test")
    return tid, _archive(p, tid)


@pytest.mark.parametrize("mode", ["byokms", "byokv", "kmip"])
def test_a_customer_side_disable_is_refused_in_a_warm_process_and_recorded_by_the_monitor(
    flow_platform, new_tenant_id, customer_key, probes, tmp_path, mode
):
    p = flow_platform
    key_ref = customer_key(mode, "s3")
    tid, recs = _customer_tenant(p, new_tenant_id, key_ref)
    probe = ProbeProcess(p.settings, tid, recs[0], tmp_path)  # default key-state settings
    probes.append(probe)
    probe.wait_ready()
    assert check_keys(p, tid).observations[0].classification is Classification.OK

    disabled_at = time.time()
    customer_key.disable(key_ref)
    refused = probe.wait_for(False, disabled_at, DISABLE_BOUND_SECONDS)
    print(f"\n{mode}: a warm process refused {refused['t'] - disabled_at:.2f} s after the customer disabled the key")
    time.sleep(1.0)
    later = probe.attempts(refused["t"] + 0.5)
    assert later and not [x for x in later if x["ok"]], "served again while the key is disabled"
    assert refused["error"] in ("KeyUnavailableError", "TenantRevokedError"), refused

    report = check_keys(p, tid)
    obs = report.observations[0]
    assert obs.classification is Classification.REVOKED, obs
    tenant = p.state.get_tenant(tid)
    assert tenant.revoked is True
    revoke_runs = [r for r in p.state.list_runs(tid) if r.flow is Flow.REVOKE]
    assert revoke_runs and revoke_runs[0].state is RunState.COMPLETED
    assert {a.actor for a in p.state.iter_audit(tenant_id=tid) if a.action == "revoke.request"} == {"monitor"}
    assert "key_disabled" in {w.kind for w in list_warnings(p.state, tid)}
    with pytest.raises(KeyUnavailableError):
        _read(p, tid, recs[1])

    if not customer_key.can_reenable(key_ref):  # KMIP: a revoke is final
        with pytest.raises(KeyUnavailableError):
            restore_tenant(p, tid, actor="bob@sec")
        assert p.state.get_tenant(tid).revoked is True
        return
    customer_key.enable(key_ref)
    restore_tenant(p, tid, actor="bob@sec", reason="customer re-enabled the key")
    back = probe.wait_for(True, time.time(), DISABLE_BOUND_SECONDS)
    assert back["ok"]
    assert _read(p, tid, recs[1]) == recs[1]
    assert check_keys(p, tid).observations[0].classification is Classification.OK


def test_a_key_service_outage_is_not_a_revocation(
    localstack, flow_settings, new_tenant_id, customer_key, _flow_cleanup
):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
    from fault_proxy import Always, Proxy, aws_op, kms_error

    up = flow_settings.aws_endpoint_url.removeprefix("http://").split(":")
    proxy = Proxy((up[0], int(up[1])), classify=aws_op)
    try:
        settings = flow_settings.model_copy(
            update={"aws_endpoint_url": proxy.url, "key_state_check_seconds": 0.5, "key_state_check_timeout_seconds": 1}
        )
        p = Platform.from_settings(settings)
        key_ref = customer_key("byokms", "s3")
        tid, recs = _customer_tenant(p, new_tenant_id, key_ref)
        assert _read(p, tid, recs[0]) == recs[0]  # warm
        down = [Always(lambda r: r.op.startswith("kms:"), kms_error(503, "DependencyTimeoutException"))]

        # default grace (serve-from-cache-for:60): warm keys keep serving through the outage
        proxy.set_rules(*down)
        time.sleep(1.5)
        assert _read(p, tid, recs[0]) == recs[0]
        obs = check_keys(p, tid).observations[0]
        assert obs.classification is Classification.UNREACHABLE, obs

        # deny-immediately: refused as "key service unavailable", never as revoked
        from archive_kms.operations.key_monitor import set_grace_policy

        set_grace_policy(p, tid, "deny-immediately", actor="test")
        deadline = time.monotonic() + 15
        while True:
            try:
                _read(p, tid, recs[0])
            except KeyServiceUnavailableError as exc:
                assert "revoked" not in str(exc)
                break
            assert time.monotonic() < deadline, "deny-immediately still served during the outage"
            time.sleep(0.2)
        assert p.state.get_tenant(tid).revoked is False
        assert [r for r in p.state.list_runs(tid) if r.flow is Flow.REVOKE] == []

        proxy.set_rules()  # the service is back: access returns by itself
        deadline = time.monotonic() + 15
        while True:
            try:
                assert _read(p, tid, recs[0]) == recs[0]
                break
            except KeyServiceUnavailableError:
                assert time.monotonic() < deadline, "access did not come back after the outage"
                time.sleep(0.2)
        assert check_keys(p, tid).observations[0].classification is Classification.OK
        assert p.state.get_tenant(tid).revoked is False
    finally:
        proxy.close()


def test_a_revoke_during_an_enable_run_stops_it_safely_and_it_resumes_after_restore(
    flow_platform, archived_tenant, customer_key
):
    p = flow_platform
    archived = archived_tenant("s3", records=60, seed=5)
    t = archived.tenant_id
    key_ref = customer_key("byokms", "s3")
    plan = plan_enable(p, t, "byokms", key_ref, cloud="s3", shards=2)

    real = p.keychain.dek_for_encrypt

    def slow_dek_for_encrypt(*a: Any, **kw: Any) -> Any:
        time.sleep(0.05)  # the copy takes a few seconds, so the revoke lands in it
        return real(*a, **kw)

    p.keychain.dek_for_encrypt = slow_dek_for_encrypt
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(out=run_plan(p, plan)))
    runner.start()
    from archive_kms.state.port import CopyStatus

    deadline = time.monotonic() + 120
    run_id = None
    while time.monotonic() < deadline:
        runs = [r for r in p.state.list_runs(t) if r.flow is Flow.ENABLE]
        if runs:
            run_id = runs[0].run_id
            counts = p.state.copy_counts(run_id)
            if counts.get(CopyStatus.COPIED, 0) + counts.get(CopyStatus.VERIFIED, 0) > 0:
                break
        time.sleep(0.02)
    assert run_id is not None, "the enable run never started copying"
    receipt = revoke_tenant(p, t, actor="alice@sec", reason="revoke wins")
    runner.join(timeout=120)
    assert not runner.is_alive()
    out = outcome["out"]
    print(f"\nenable run after revoke: {out.state}: {out.error}")
    assert out.state == RunState.FAILED.value, out
    assert "revoked" in (out.error or "").lower(), out.error
    assert receipt.ok, receipt.to_dict().get("not_refusing_in_time")
    with pytest.raises(TenantRevokedError):
        p.open_archive(t).search(Query())

    restore_tenant(p, t, actor="bob@sec", reason="resume the enable")
    p.keychain.dek_for_encrypt = real
    done = resume(p, run_id, actor="support")
    assert done.state == RunState.COMPLETED.value, done.error
    figures = invariants(p, t, archived.snapshot)  # nothing lost: every object, one document each
    assert figures["records"] == archived.record_count
    assert storage_snapshot(p, t) == archived.snapshot


def test_the_key_flows_run_through_prefect_and_the_monitor_sees_a_real_rotation(
    flow_platform, new_tenant_id, customer_key, monkeypatch
):
    """The ``key-monitor``, ``key-revoke`` and ``key-restore`` flows (what the deployments
    run; here in this process, as ``--wait`` does) on LocalStack KMS: ``RotateKeyOnDemand``
    changes ``CurrentKeyMaterialId``, which the monitor reports as a customer rotation."""
    from archive_kms import clients
    from archive_kms.keys.refs import parse_key_ref

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from flows.key_lifecycle import run_key_flow

    p = flow_platform
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", p.settings.state_url)  # the flows build their platform from env
    key_ref = customer_key("byokms", "s3")
    tid, recs = _customer_tenant(p, new_tenant_id, key_ref)

    # The monitor hands a rotation to the rotation flow (start_detected_rotation submits the
    # rotate run to the shared worker, whose state store is not this test's): record it.
    import archive_kms.migration.launch as launch

    handed: list[dict] = []
    recorded = types.SimpleNamespace(run_id="recorded", message="recorded by the test")
    monkeypatch.setattr(
        launch, "start_detected_rotation", lambda _p, _l, tenant_id, **kw: handed.append(kw) or recorded
    )
    monkeypatch.setattr("archive_kms.flows.launcher.PrefectLauncher.from_settings", lambda _s: None)

    first = run_key_flow("monitor", tenant=tid)
    assert [o["classification"] for o in first["observations"]] == ["ok"], first
    version = first["observations"][0]["key_version"]
    assert version

    kms = clients.kms_client(p.settings, max_attempts=2)
    kms.rotate_key_on_demand(KeyId=parse_key_ref(key_ref).api_key_id)
    deadline = time.monotonic() + 30
    while True:  # LocalStack rotates asynchronously, like AWS
        seen = run_key_flow("monitor", tenant=tid, dry_run=True)["observations"][0]
        if seen["classification"] == "rotation" or time.monotonic() > deadline:
            break
        time.sleep(1)
    rotated = run_key_flow("monitor", tenant=tid)["observations"][0]
    assert rotated["classification"] == "rotation", rotated
    warning = p.state.get_warning(f"rotation_detected:{tid}")
    assert warning is not None and warning.active
    assert warning.details["previous_version"] == version and warning.details["observed_version"] != version
    assert [(h["previous_version"], h["actor"]) for h in handed] == [(version, "monitor")], handed
    assert handed[0]["observed_version"] == warning.details["observed_version"]
    assert _read(p, tid, recs[0]) == recs[0]  # a rotation is not a revocation

    receipt = run_key_flow("revoke", tenant=tid, actor="alice@sec", reason="flow test")
    assert receipt["ok"], receipt["not_refusing_in_time"]
    with pytest.raises(TenantRevokedError):
        _read(p, tid, recs[0])
    restored = run_key_flow("restore", tenant=tid, actor="bob@sec", reason="flow test")
    assert restored["restored"] is True
    assert _read(p, tid, recs[0]) == recs[0]
    flows = [(r.flow, r.state) for r in p.state.list_runs(tid)]
    assert sorted(f.value for f, _ in flows) == ["restore", "revoke"] and all(s is RunState.COMPLETED for _, s in flows)


def test_the_cli_revokes_with_a_receipt_refuses_reads_and_searches_and_restores(flow_platform, new_tenant_id):
    """The public surface, in subprocesses on the real services: dry run, revoke (--wait:
    the receipt run in the CLI's process), read and search refused naming the tenant and
    when, restore, read again."""
    p = flow_platform
    tid = new_tenant_id()
    create_tenant(p, tid, cloud="s3", actor="test")
    recs = _archive(p, tid)
    r = recs[0]
    env = {**os.environ, "ARCHIVE_KMS_STATE_URL": p.settings.state_url}
    cli = [str(Path(sys.executable).with_name("archive-kms"))]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=180)

    dry = run("revoke", tid, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    radius = json.loads(dry.stdout)
    assert radius["objects"] >= len(recs) and radius["index_documents"] == len(recs), radius
    assert p.state.get_tenant(tid).revoked is False  # a dry run changes nothing

    revoked = run("revoke", tid, "--reason", "INC-9", "--yes", "--wait", "--json")
    assert revoked.returncode == 0, revoked.stderr
    receipt = json.loads(revoked.stdout)
    assert receipt["ok"] is True and receipt["tenant"] == tid, receipt
    read = run("read", tid, "--workspace", r.workspace_id, "--record", f"{r.object_type}/{r.record_id}")
    assert read.returncode == 2 and f"tenant {tid}: key revoked at" in read.stderr, (read.returncode, read.stderr)
    assert "Traceback" not in read.stderr
    search = run("search", tid, "invoice")
    assert search.returncode == 2 and "key revoked" in search.stderr, (search.returncode, search.stderr)

    restored = run("restore", tid, "--reason", "INC-9 closed", "--yes", "--wait", "--json")
    assert restored.returncode == 0, restored.stderr
    again = run("read", tid, "--workspace", r.workspace_id, "--record", f"{r.object_type}/{r.record_id}", "--json")
    assert again.returncode == 0, again.stderr
    assert r.record_id in again.stdout
