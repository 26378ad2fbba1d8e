"""Faults during a customer key rotation (issue 17; docs/key-lifecycle.md section 12).

* Key-service faults during a confirmed rotation run (faults.md B1, B2, B3): the key
  service (LocalStack KMS; the Key Vault emulator; the PyKMIP server, rotated by a new
  object under the same Name) behind the fault proxy of ``test_key_faults``, transient
  faults (throttling, 5xx; 429 with ``Retry-After``; KMIP: resets mid-request) from
  the detection on, and a sustained outage from ``rewrap`` (the point of no return) on.
  The early steps and the confirmation ride the transient faults out; the outage fails
  the run with a retryable error naming the key, before anything was re-wrapped, and is
  never taken for a revocation; a resume completes it (1 unwrap + 1 wrap, the old
  version safe to disable); the tenant reads (a fresh process: nothing cached) and
  searches its data afterwards; I1-I7.
* A monitor check racing a rotation confirmation (faults E3): threads, each with a
  platform of its own on one SQLite state store (as separate processes), released at
  once: the key-state monitor (whose ``on_rotation_detected`` is
  ``migration.launch.start_detected_rotation``) and ``rotation check`` detecting the same
  rotation; then two uses of one confirmation with the monitor and a check alongside;
  then a monitor check that observed the key before the run retired the old version and
  acts after it. Exactly one open rotation, one rotate run, submitted once, the
  confirmation accepted once (the other use refused), the run completed once, the
  monitor's warning cleared and not raised again, no second rotation; I1-I7.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from customer_keys import new_kmip_object_under_the_same_name
from fault_proxy import KMS_CRYPTO_OPS, RandomRate, Times, keyvault_error, kms_error, ops
from flows_support import invariants, storage_snapshot
from tcp_proxy import NthChunkReset
from test_key_faults import (
    UNAVAILABLE_ERRORS,
    KeyEnv,
    _apply,
    _check_wire,
    _kmip_env,
    _kms_env,
    _kv_env,
    _record_sleeps,
    assert_not_revoked,
    read_everything,
)

from archive_kms import clients
from archive_kms.errors import StateError
from archive_kms.migration import engine, resume
from archive_kms.migration.launch import (
    DEPLOYMENTS,
    Launch,
    LaunchState,
    confirm_and_resume,
    start_detected_rotation,
    start_rotation_check,
)
from archive_kms.migration.rotate import ROTATE_STEP_FUNCTIONS, rotate_report
from archive_kms.migration.rotation_monitor import check_rotation, observe
from archive_kms.operations import key_monitor
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import confirm_rotation, issue_confirmation
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import Flow, RotationState, RunState, WarningKind

SEED = 0x5EED_17
RECORDS = 6
#: How long a submission to the orchestrator takes in the race (a Prefect API round trip).
SUBMIT_SECONDS = 0.3


# --- a tenant on a customer key ----------------------------------------------------------------


def tenant_on_key(p: Platform, tid: str, cloud: str, key_ref: str) -> tuple[list, dict[bytes, str]]:
    """``tid`` created on ``key_ref`` with RECORDS archived records (with attachments);
    (records, storage snapshot)."""
    create_tenant(p, tid, cloud=cloud, key_ref=key_ref, actor="test")

    def spec_for(s: int) -> JobSpec:
        synthetic = {"count": RECORDS, "seed": s, "mix": "small", "workspaces": 2}
        return JobSpec(f"{tid}-seed", tid, "synthetic", synthetic=synthetic)

    spec = next(spec_for(s) for s in range(SEED, SEED + 100) if any(atts for _, atts in spec_for(s).materialise()))
    out = submit_job(p.state, spec, p.open_archive)
    assert out.decision == "run" and out.records == RECORDS, out
    return [r for r, _ in spec.materialise()], storage_snapshot(p, tid)


def rotate_at_provider(env_settings: Any, key_ref: str) -> None:
    if key_ref.startswith("aws-kms://"):
        clients.kms_client(env_settings).rotate_key_on_demand(KeyId=key_ref.removeprefix("aws-kms://"))
    elif key_ref.startswith("kmip://"):  # a new object under the same Name (ADR 0038)
        new_kmip_object_under_the_same_name(env_settings, key_ref)
    else:
        name = key_ref.split("/keys/", 1)[1].split("/", 1)[0]
        clients.keyvault_key_client(env_settings).rotate_key(name)


def searchable(p: Platform, tid: str) -> int:
    result = p.open_archive(tid).search(Query(limit=1000))
    assert not result.failures, result.failures
    return len(result.hits)


def confirm(p: Platform, tid: str, by: str = "alice") -> str:
    """A signed confirmation of the tenant's awaiting rotation (its JSON)."""
    rotation = p.state.find_open_rotation(tid)
    assert rotation is not None and rotation.state is RotationState.AWAITING, rotation
    return issue_confirmation(p, tid, rotation.rotation_id, confirmed_by=by).to_json()


# --- 1. key-service faults during a confirmed rotation --------------------------------------------


@pytest.fixture(params=["byokms", "byokv", "kmip"])
def rotation_env(request, flow_settings, customer_key, tmp_path, monkeypatch) -> Iterator[KeyEnv]:
    if request.param == "byokms":
        gen = _kms_env(flow_settings, customer_key)
    elif request.param == "kmip":
        request.getfixturevalue("kmip")
        gen = _kmip_env(flow_settings, customer_key)
    else:
        request.getfixturevalue("keyvault")
        gen = _kv_env(flow_settings, tmp_path)
    env = next(gen)
    _record_sleeps(env, monkeypatch)
    try:
        yield env
    finally:
        gen.close()


def _transient_rules(env: KeyEnv) -> list:
    rng = random.Random(SEED)
    if env.kind == "byokms":
        return [
            Times(ops("kms:DescribeKey"), kms_error(503, "DependencyTimeoutException"), n=2),
            Times(ops("kms:Encrypt"), kms_error(400, "ThrottlingException", "Rate exceeded"), n=1),
            Times(ops("kms:Decrypt"), kms_error(500, "KMSInternalException"), n=1),
            RandomRate(
                lambda r: r.op in KMS_CRYPTO_OPS or r.op == "kms:DescribeKey",
                kms_error(400, "ThrottlingException", "Rate exceeded"),
                0.15,
                rng.randrange(1 << 30),
            ),
        ]
    if env.kind == "kmip":
        # A KMIP call is one or two chunks on a kept connection: three of the first ones
        # reset mid-request (seeded); a call whose retry is reset too fails retryably.
        return [NthChunkReset(n) for n in sorted(rng.sample(range(2, 14), 3))]
    return [
        # 429 only where calls are serial (the wait before the retry is measured as the gap to
        # the next call of that operation; the key-state guard's getKey runs alongside others).
        Times(ops("getKey"), keyvault_error(500, "InternalServerError"), n=1),
        Times(ops("wrapKey"), keyvault_error(429, "Throttled", retry_after=1), n=2),
        Times(ops("unwrapKey"), keyvault_error(500, "InternalServerError"), n=1),
        RandomRate(ops("unwrapKey", "wrapKey", "getKey"), keyvault_error(503, "ServiceUnavailable"), 0.1, SEED),
    ]


def test_key_service_faults_during_a_confirmed_rotation(
    rotation_env, flow_platform, new_tenant_id, fault_case, monkeypatch
):
    """Detection, the wait and the confirmation under transient faults; from ``rewrap`` on
    a sustained outage: failed retryably, nothing re-wrapped, not a revocation; the
    resume (transient faults again) completes the rotation; cold reads and searches."""
    env = rotation_env
    p = env.platform()
    tid = new_tenant_id()
    records, snapshot = tenant_on_key(p, tid, env.cloud, env.key_ref)
    assert check_rotation(p, tid, actor="test") == (None, None, None)  # the baseline
    rotate_at_provider(env.settings, env.key_ref)

    _apply(env, _transient_rules(env))
    for _ in range(3):  # a check whose provider call failed reports no rotation: the next one does
        observation, rotation, run = check_rotation(p, tid, actor="test")
        if rotation is not None:
            break
    assert rotation is not None and run is not None and observation is not None
    waiting = engine.execute(p, run.run_id, actor="test", handle_signals=False)
    assert waiting.state == engine.WAITING, waiting
    confirm_rotation(p, confirm(p, tid), tenant_id=tid, actor="test")  # DescribeKey under faults

    def go_down() -> None:
        env.fast[0] = True
        env.outage(True)

    real_rewrap = ROTATE_STEP_FUNCTIONS["rewrap"]

    def rewrap_in_an_outage(ctx: Any) -> Any:  # the first time only: the resume runs it as it is
        monkeypatch.setitem(ROTATE_STEP_FUNCTIONS, "rewrap", real_rewrap)
        go_down()
        return real_rewrap(ctx)

    monkeypatch.setitem(ROTATE_STEP_FUNCTIONS, "rewrap", rewrap_in_an_outage)
    failed = resume(p, run.run_id, actor="test")
    assert failed.state == RunState.FAILED.value, failed
    assert failed.error.startswith(UNAVAILABLE_ERRORS), failed.error
    assert env.key_ref.split("/")[-1] in failed.error or "key" in failed.error.lower(), failed.error
    stored = p.state.get_run(run.run_id)
    assert stored.step("rewrap").state.value == "failed", [(s.name, s.state.value) for s in stored.steps]
    assert len(env.sleeps) >= 1, "the outage was not retried with backoff"
    fault_case.note(failed_at="rewrap", backoff_sleeps=len(env.sleeps), error=failed.error[:160])
    _apply(env, [])
    env.outage(False)
    env.fast[0] = False
    assert p.keychain.status(tid).l1_generation == 1, "re-wrapped although the run failed before it"
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.CONFIRMED
    assert_not_revoked(env, flow_platform, tid)
    assert flow_platform.state.get_warning(f"{WarningKind.KEY_DISABLED.value}:{tid}") is None

    _apply(env, _transient_rules(env))
    done = resume(env.platform(), run.run_id, actor="test")
    resumes = 2
    while env.kind == "kmip" and done.state == RunState.FAILED.value and resumes < 5:
        # KMIP: a call and its retry both reset (the seeded resets are consecutive chunks)
        assert done.error.startswith(UNAVAILABLE_ERRORS), done.error
        resumes += 1
        done = resume(env.platform(), run.run_id, actor="test")
    assert done.state == RunState.COMPLETED.value, done
    report = rotate_report(p, p.state.get_run(run.run_id))
    assert (report["provider_wraps"], report["provider_unwraps"]) == (1, 1), report
    assert report["safe_to_disable_old_version"] is True, report
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.COMPLETED
    assert p.keychain.status(tid).l1_generation == 2

    cold = env.platform()  # a fresh process: the L2 unwraps under the new version, through the faults
    read_everything(cold, tid, records)
    assert searchable(cold, tid) == RECORDS
    # B1: crypto calls bounded per object (in fact a handful for the whole rotation: only
    # the L2 and the proof go to the key service); B2: a 429 retried after its Retry-After.
    _check_wire(env, len(snapshot), fault_case)
    _apply(env, [])
    assert_not_revoked(env, flow_platform, tid)
    invariants(env.platform(), tid, snapshot, resumes=resumes)


# --- 2. a monitor check racing a rotation confirmation ----------------------------------------


class RecordingLauncher:
    """A ``RunLauncher`` that records submissions (the test executes the runs itself)."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def submit(self, deployment: str, parameters: Mapping[str, Any], *, tags: Sequence[str]) -> Launch:
        time.sleep(SUBMIT_SECONDS)  # an orchestrator's API call: the window a concurrent caller sees
        with self._lock:
            self.submitted.append((deployment, dict(parameters)))
            return Launch(f"fr-{len(self.submitted)}", deployment)

    def launches(self, run_id: str) -> list[LaunchState]:
        return []

    def mark_crashed(self, flow_run_id: str, message: str) -> None:
        pass

    def of(self, deployment: str) -> list[dict[str, Any]]:
        return [params for d, params in self.submitted if d == DEPLOYMENTS[deployment]]


def _all_at_once(actions: dict[str, Any]) -> dict[str, Any]:
    """Run every action in its own thread, released together; {name: result or exception}."""
    barrier = threading.Barrier(len(actions))
    results: dict[str, Any] = {}

    def go(name: str, action: Any) -> None:
        barrier.wait()
        try:
            results[name] = action()
        except Exception as exc:  # noqa: BLE001 - the caller judges each outcome
            results[name] = exc

    threads = [threading.Thread(target=go, args=item, name=item[0]) for item in actions.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return results


def test_a_monitor_check_races_a_rotation_confirmation(
    flow_settings, flow_platform, new_tenant_id, customer_key, fault_case, monkeypatch
):
    p = flow_platform
    tid = new_tenant_id()
    key_ref = customer_key("byokms", "s3")
    records, snapshot = tenant_on_key(p, tid, "s3", key_ref)
    launcher = RecordingLauncher()

    def monitor(platform: Platform) -> Any:
        def on_rotation(tenant: str, obs: Any) -> None:
            start_detected_rotation(
                platform,
                launcher,
                tenant,
                key_ref=obs.key_ref,
                previous_version=obs.previous_version,
                observed_version=obs.key_version,
                actor="monitor",
            )

        return key_monitor.check_keys(platform, tid, on_rotation_detected=on_rotation)

    # The baselines: the monitor's accepted version, the rotation check's known version.
    assert monitor(p).observations[0].classification is key_monitor.Classification.OK
    assert check_rotation(p, tid, actor="test") == (None, None, None)
    rotate_at_provider(flow_settings, key_ref)
    own = lambda: Platform.from_settings(flow_settings)  # noqa: E731 - a process of its own

    # Round 1: two monitor checks and two `rotation check`s detect the rotation at once.
    plats = [own() for _ in range(4)]
    first = _all_at_once(
        {
            "monitor-1": lambda: monitor(plats[0]),
            "monitor-2": lambda: monitor(plats[1]),
            "check-1": lambda: start_rotation_check(plats[2], launcher, tid, actor="support"),
            "check-2": lambda: start_rotation_check(plats[3], launcher, tid, actor="support"),
        }
    )
    fault_case.injected("concurrent rotation detection", 4)
    errors = {k: v for k, v in first.items() if isinstance(v, Exception)}
    assert not errors, errors
    rotations = p.state.list_rotations(tid)
    assert len(rotations) == 1, [(r.rotation_id, r.state.value) for r in rotations]
    rotation = rotations[0]
    runs = [r for r in p.state.list_runs(tid) if r.flow is Flow.ROTATE]
    assert len(runs) == 1, runs
    run_id = runs[0].run_id  # the rotation names it once the run's preflight ran
    assert len(launcher.of("rotate")) == 1, f"the rotate run was submitted {len(launcher.of('rotate'))} times"
    warning = p.state.get_warning(f"{WarningKind.ROTATION_DETECTED.value}:{tid}")
    assert warning is not None and warning.active, warning

    # The submitted run starts: it pauses the tenant and waits for the confirmation.
    assert engine.execute(p, run_id, actor="test", handle_signals=False).state == engine.WAITING
    assert p.state.get_rotation(rotation.rotation_id).run_id == run_id
    confirmation = confirm(p, tid)

    # Round 2: the same confirmation used twice, a monitor check and a `rotation check` alongside.
    plats = [own() for _ in range(4)]
    second = _all_at_once(
        {
            "confirm-1": lambda: confirm_and_resume(plats[0], launcher, tid, confirmation, actor="alice"),
            "confirm-2": lambda: confirm_and_resume(plats[1], launcher, tid, confirmation, actor="alice"),
            "monitor": lambda: monitor(plats[2]),
            "check": lambda: start_rotation_check(plats[3], launcher, tid, actor="support"),
        }
    )
    fault_case.injected("concurrent confirmation", 2)
    fault_case.injected("monitor check during a confirmation", 2)
    accepted = [k for k in ("confirm-1", "confirm-2") if not isinstance(second[k], Exception)]
    refused = [second[k] for k in ("confirm-1", "confirm-2") if isinstance(second[k], Exception)]
    assert len(accepted) == 1 and len(refused) == 1, second
    # refused by the state check (used already) or, concurrently, by the compare-and-set
    assert isinstance(refused[0], StateError), refused
    assert "not awaiting" in str(refused[0]) or "another confirmation challenge" in str(refused[0]), refused
    for k in ("monitor", "check"):
        assert not isinstance(second[k], Exception), second[k]
    audit = [a.action for a in p.state.iter_audit(tenant_id=tid)]
    assert audit.count("rotation.confirmed") == 1 and audit.count("rotation.confirm_refused") == 1, audit
    assert len(launcher.of("support")) == 1, launcher.submitted
    assert len(launcher.of("rotate")) == 1, launcher.submitted
    assert [r.rotation_id for r in p.state.list_rotations(tid)] == [rotation.rotation_id]
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.CONFIRMED

    # Round 3: a monitor check that observed the key (still at the old accepted version)
    # before the run retired it, and acts after the run completed.
    observed, completed = threading.Event(), threading.Event()
    real_observe = key_monitor.observe_key

    def slow_observe(platform: Platform, tenant_id: str) -> Any:
        obs = real_observe(platform, tenant_id)
        if threading.current_thread().name == "late-monitor":
            observed.set()
            assert completed.wait(120), "the run did not complete"
        return obs

    monkeypatch.setattr(key_monitor, "observe_key", slow_observe)
    late: dict[str, Any] = {}
    late_platform = own()

    def late_monitor() -> None:
        try:
            late["report"] = monitor(late_platform)
        except Exception as exc:  # noqa: BLE001
            late["error"] = exc

    thread = threading.Thread(target=late_monitor, name="late-monitor")
    thread.start()
    assert observed.wait(60), "the monitor did not observe the key"
    try:
        done = resume(p, run_id, actor="test")  # what the submitted support resume runs
    finally:
        completed.set()
        thread.join(120)
    fault_case.injected("monitor check across the run's retire")
    assert "error" not in late, late
    assert done.state == RunState.COMPLETED.value, done
    # It looked before the retire (at the old accepted version) and acts after: the version
    # is accepted by then, so the look is stale: nothing is raised or rotated again.
    assert late["report"].observations[0].classification is key_monitor.Classification.OK, late["report"]
    previous = p.state.get_rotation(rotation.rotation_id).previous_version
    new_version = p.state.get_rotation(rotation.rotation_id).observed_version
    # The monitor's callback with a look from before the retire (any process may still
    # hold one): handed the completed rotation and its run, nothing opened or submitted.
    stale = start_detected_rotation(
        own(), launcher, tid, key_ref=key_ref, previous_version=previous, observed_version=new_version, actor="monitor"
    )
    assert stale.run_id == run_id and not stale.created, stale

    # Exactly one of everything, and the monitor settles on the new version.
    assert [r.rotation_id for r in p.state.list_rotations(tid)] == [rotation.rotation_id], p.state.list_rotations(tid)
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.COMPLETED
    assert [r.run_id for r in p.state.list_runs(tid) if r.flow is Flow.ROTATE] == [run_id]
    assert len(launcher.of("rotate")) == 1 and len(launcher.of("support")) == 1, launcher.submitted
    audit = [a for a in p.state.iter_audit(tenant_id=tid)]
    assert [a.action for a in audit if a.run_id == run_id].count("run.complete") == 1
    assert sum(a.action == "rotation.detected" for a in audit) == 1, [a.action for a in audit]
    stored = p.state.get_key_observation(tid)
    assert stored.accepted_version == new_version, (stored.accepted_version, new_version)
    warning = p.state.get_warning(f"{WarningKind.ROTATION_DETECTED.value}:{tid}")
    assert warning is None or not warning.active, warning
    again = monitor(own())  # the next scheduled check: nothing to do
    assert again.observations[0].classification is key_monitor.Classification.OK, again.observations[0]
    assert check_rotation(p, tid, actor="test") == (None, None, None)
    assert observe(p, tid) is None
    assert p.keychain.status(tid).l1_generation == 2
    assert searchable(p, tid) == RECORDS
    invariants(p, tid, snapshot, resumes=1)
