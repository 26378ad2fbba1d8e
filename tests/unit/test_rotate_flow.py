"""The rotate flow on the in-memory platform (issue #14): a customer rotation is detected,
the tenant paused (jobs deferred) and the run waits for a confirmation; forged, edited,
expired, mismatched and replayed confirmations change nothing and are audited; a valid
one resumes everything: L2 re-wrapped under the new version with 1 unwrap + 1 wrap at any
data size, the index rebuilt (old generation gone), deferred jobs replayed, the old
version reported safe to disable; cancel before the re-wrap undoes the pause."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.errors import ArchiveKmsError, IntegrityError, StateError, ValidationError
from archive_kms.migration import engine
from archive_kms.migration.engine import WAITING, waiting_on
from archive_kms.migration.rotate import canary
from archive_kms.migration.rotation_monitor import check_rotation, observe
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import RotationConfirmation, confirm_rotation, issue_confirmation
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import RotationState, RunState

TENANT = "acme"
KEY = "memory://customer-1"


def job(job_id: str, count: int, offset: int) -> JobSpec:
    return JobSpec(job_id, TENANT, "synthetic", synthetic={"count": count, "seed": 5, "offset": offset, "mix": "small"})


def rotated_tenant(records: int = 6) -> Platform:
    p = Platform.in_memory()
    create_tenant(p, TENANT, cloud="s3", provision_storage=False, key_ref=KEY)
    assert submit_job(p.state, job("j0", records, 0), p.open_archive).decision == "run"
    assert observe(p, TENANT) is None  # the baseline
    provider = p.resolve_provider(p.keychain.status(TENANT).l1_ref)
    provider._kms.rotate(provider._ref.name)  # the customer rotates their key
    return p


def searchable(p: Platform) -> int:
    result = p.open_archive(TENANT).search(Query(limit=1000))
    assert not result.failures
    return len(result.hits)


def waiting_run(p: Platform):
    observation, rotation, run = check_rotation(p, TENANT, actor="monitor")
    assert observation is not None and observation.previous_version == "1" and observation.observed_version == "2"
    out = engine.execute(p, run.run_id, actor="worker")
    assert out.state == WAITING
    rotation = p.state.get_rotation(rotation.rotation_id)
    assert rotation.state is RotationState.AWAITING and rotation.nonce
    return rotation, run


def test_rotation_waits_for_confirmation_then_rewraps_rebuilds_and_resumes():
    p = rotated_tenant()
    old_index = p.index.current_index(TENANT)
    rotation, run = waiting_run(p)
    assert waiting_on(p, p.state.get_run(run.run_id))["rotation_id"] == rotation.rotation_id
    # paused: a job is deferred, not written
    assert submit_job(p.state, job("j1", 2, 100), p.open_archive).decision == "deferred"
    # a resume without confirmation waits again and changes nothing
    assert engine.resume(p, run.run_id, actor="w").state == WAITING
    before = p.keychain.status(TENANT).l1_generation

    conf = issue_confirmation(p, TENANT, rotation.rotation_id, confirmed_by="alice@acme")
    confirm_rotation(p, conf.to_json(), tenant_id=TENANT, actor="console:alice")
    out = engine.resume(p, run.run_id, actor="w")
    assert out.state == RunState.COMPLETED.value, out
    done = p.state.get_run(run.run_id)
    assert (done.step("rewrap").result["provider_wraps"], done.step("rewrap").result["provider_unwraps"]) == (1, 1)
    assert p.keychain.status(TENANT).l1_generation == before + 1
    assert p.index.current_index(TENANT) != old_index
    assert [g.index for g in p.index.list_generations(TENANT)] == [p.index.current_index(TENANT)]
    assert searchable(p) == 8  # 6 + the 2 deferred and replayed
    rotation = p.state.get_rotation(rotation.rotation_id)
    assert rotation.state is RotationState.COMPLETED
    assert canary(p, TENANT, rotation)["safe_to_disable_old_version"]
    assert p.state.get_key_version(TENANT).version == "2"
    assert observe(p, TENANT) is None  # nothing new to rotate


@pytest.mark.parametrize("records", [4, 40])
def test_rewrap_costs_the_same_provider_calls_at_any_data_size(records):
    p = rotated_tenant(records)
    rotation, run = waiting_run(p)
    confirm_rotation(
        p, issue_confirmation(p, TENANT, rotation.rotation_id, confirmed_by="a").to_json(), tenant_id=TENANT, actor="a"
    )
    assert engine.resume(p, run.run_id, actor="w").state == "completed"
    r = p.state.get_run(run.run_id).step("rewrap").result
    assert (r["provider_wraps"], r["provider_unwraps"]) == (1, 1)


def _refused(p: Platform, data, tenant: str = TENANT, **kw) -> ArchiveKmsError:
    with pytest.raises(ArchiveKmsError) as err:
        confirm_rotation(p, data, tenant_id=tenant, actor="attacker", **kw)
    return err.value


def test_forged_edited_expired_mismatched_and_replayed_confirmations_change_nothing():
    p = rotated_tenant()
    rotation, run = waiting_run(p)
    good = issue_confirmation(p, TENANT, rotation.rotation_id, confirmed_by="alice")
    # forged: another platform's key
    other = Platform.in_memory()
    forged = RotationConfirmation(**{**good.__dict__, "signer_key_id": "", "signature": b""}).signed(
        other.require_signer()
    )
    assert isinstance(_refused(p, forged.to_json()), IntegrityError)
    # edited after signing
    obj = json.loads(good.to_json())
    obj["confirmed_by"] = "mallory"
    assert isinstance(_refused(p, json.dumps(obj)), IntegrityError)
    # another tenant
    assert isinstance(_refused(p, good.to_json(), tenant="other"), ValidationError)
    # expired
    late = datetime.now(UTC) + timedelta(hours=1)
    assert "expired" in str(_refused(p, good.to_json(), now=late))
    # another challenge (an old confirmation of the same rotation)
    stale = RotationConfirmation(**{**good.__dict__, "nonce": "00" * 16, "signer_key_id": "", "signature": b""})
    assert isinstance(_refused(p, stale.signed(p.require_signer()).to_json()), StateError)
    # a version the rotation did not observe
    wrong = RotationConfirmation(**{**good.__dict__, "observed_version": "9", "signer_key_id": "", "signature": b""})
    assert isinstance(_refused(p, wrong.signed(p.require_signer()).to_json()), ValidationError)
    # nothing changed
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.AWAITING
    assert engine.resume(p, run.run_id, actor="w").state == WAITING
    refused = [r for r in p.state.iter_audit() if r.action == "rotation.confirm_refused"]
    assert len(refused) == 6
    # the real one works once; its replay is refused
    confirm_rotation(p, good.to_json(), tenant_id=TENANT, actor="alice")
    assert isinstance(_refused(p, good.to_json()), StateError)
    assert engine.resume(p, run.run_id, actor="w").state == "completed"


def test_confirmation_refused_when_the_key_moved_again():
    p = rotated_tenant()
    rotation, _ = waiting_run(p)
    good = issue_confirmation(p, TENANT, rotation.rotation_id, confirmed_by="alice")
    provider = p.resolve_provider(p.keychain.status(TENANT).l1_ref)
    provider._kms.rotate(provider._ref.name)
    assert "changed again" in str(_refused(p, good.to_json()))
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.AWAITING


def test_cancel_while_waiting_reopens_the_gate_and_closes_the_rotation():
    p = rotated_tenant()
    rotation, run = waiting_run(p)
    assert submit_job(p.state, job("j1", 2, 100), p.open_archive).decision == "deferred"
    engine.cancel(p, run.run_id, actor="support")
    assert p.state.get_run(run.run_id).state is RunState.CANCELLED
    assert p.state.gate(TENANT).state.value == "open" and searchable(p) == 8
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.CANCELLED
    assert p.keychain.status(TENANT).l1_generation == 1


def test_the_warning_offers_confirm_and_turns_into_a_reminder():
    from archive_kms.api.rotation_actions import RotationWarnings

    p = rotated_tenant()
    rotation, run = waiting_run(p)
    (w,) = RotationWarnings().warnings(p, [p.state.get_tenant(TENANT)])
    assert (w.kind, w.severity, w.actions, w.details["reminder"]) == (
        "rotation_detected",
        "warning",
        ("confirm_rotation",),
        False,
    )
    long_ago = datetime.now(UTC) - timedelta(seconds=p.settings.rotation_reminder_seconds + 60)
    p.state.update_rotation(rotation.rotation_id, expect=[RotationState.AWAITING], awaiting_since=long_ago)
    (w,) = RotationWarnings().warnings(p, [p.state.get_tenant(TENANT)])
    assert w.severity == "critical" and w.details["reminder"] and "reminder" in w.message
    assert engine.resume(p, run.run_id, actor="w").state == WAITING
    assert [r.action for r in p.state.iter_audit(tenant_id=TENANT)].count("rotation.reminder") == 1
    assert engine.resume(p, run.run_id, actor="w").state == WAITING
    assert [r.action for r in p.state.iter_audit(tenant_id=TENANT)].count("rotation.reminder") == 1


class _Launcher:
    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, deployment, parameters, *, tags):
        from archive_kms.migration.launch import Launch

        self.submitted.append(parameters["run_id"])
        return Launch(f"fr-{len(self.submitted)}", deployment)

    def launches(self, run_id):
        return []

    def mark_crashed(self, flow_run_id, message):
        pass


def test_the_rotate_run_is_submitted_by_its_creator_only_or_after_the_grace(monkeypatch):
    """A monitor check and a `rotation check` at once submit the run once: the caller whose
    trigger created it. A run whose creator died before submitting it is submitted by the
    next check once ``UNSUBMITTED_GRACE`` has passed (issue 17)."""
    from archive_kms.migration import launch
    from archive_kms.migration.rotation_monitor import on_rotation_detected

    p = rotated_tenant()
    observation = observe(p, TENANT)
    _, run, created = on_rotation_detected(p, TENANT, observation, actor="monitor")  # creator, then died
    assert created
    launcher = _Launcher()
    seen = dict(key_ref=observation.key_ref, previous_version="1", observed_version="2", actor="monitor")
    found = launch.start_detected_rotation(p, launcher, TENANT, **seen)  # found, not submitted yet: in hand
    assert not found.created and launcher.submitted == []
    assert not launch.start_rotation_check(p, launcher, TENANT, actor="support").created
    monkeypatch.setattr(launch, "UNSUBMITTED_GRACE", timedelta(0))
    late = launch.start_rotation_check(p, launcher, TENANT, actor="support")
    assert late.created and launcher.submitted == [run.run_id]
    again = launch.start_detected_rotation(p, launcher, TENANT, **seen)
    assert not again.created and launcher.submitted == [run.run_id]
