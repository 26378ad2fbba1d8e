"""Revocation runs, receipts, restore, granular revocation and the key-state monitor on the
in-memory platform (the same code runs on the real services in tests/flows/test_revocation.py).

A second keychain over the same stores (``Platform.probe_view``) plays another process.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.config import Settings
from archive_kms.domain.keychain import TenantHead
from archive_kms.errors import (
    KeychainTamperedError,
    KeyUnavailableError,
    StateError,
    TenantRevokedError,
    ValidationError,
)
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.refs import parse_key_ref
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.blast_radius import blast_radius
from archive_kms.operations.key_monitor import Classification, accept_key_version, check_keys, key_status
from archive_kms.operations.key_warnings import acknowledge_warning, list_warnings
from archive_kms.operations.platform import Platform
from archive_kms.operations.revocation import (
    RevocationScope,
    restore_tenant,
    revocation_preview,
    revoke_tenant,
)
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import Flow, GateState, RunState


@pytest.fixture()
def kms() -> MemoryKms:
    return MemoryKms()


@pytest.fixture()
def platform(kms: MemoryKms) -> Platform:
    p = Platform.in_memory(Settings(aws_endpoint_url=None, key_state_check_seconds=0.2), kms=kms)
    create_tenant(p, "acme", provision_storage=False, key_ref="memory://acme-cmk")
    submit_job(p.state, synthetic("seed", 12, workspaces=2), p.open_archive)
    return p


def synthetic(job_id: str, count: int, *, offset: int = 0, workspaces: int = 1) -> JobSpec:
    return JobSpec(
        job_id, "acme", "synthetic", synthetic={"count": count, "seed": 7, "offset": offset, "workspaces": workspaces}
    )


def records(count: int = 12, workspaces: int = 2) -> list:
    return [r for r, _ in synthetic("x", count, workspaces=workspaces).materialise()]


def key_name(p: Platform) -> str:
    return parse_key_ref(p.resolve_provider("memory://acme-cmk").key_ref).name


def audit_actions(p: Platform) -> list[str]:
    return [r.action for r in p.state.iter_audit(tenant_id="acme")]


def test_revoke_writes_a_receipt_refuses_everything_and_restore_replays_deferred_jobs(platform: Platform) -> None:
    warm = platform.probe_view().open_archive("acme")  # another process, warm
    rec = records()[0]
    warm.read_record(rec.workspace_id, rec.object_type, rec.record_id)
    assert len(warm.search(Query()).hits) == 12

    receipt = revoke_tenant(platform, "acme", actor="alice@sec", reason="incident 42")
    returned = time.time()
    data = receipt.to_dict()
    assert receipt.ok, data["not_refusing_in_time"]
    components = {c["component"]: c for c in data["components"]}
    for name in ("reads", "search", "reads (fresh process)", "search (fresh process)", "unwrap", "job writes"):
        assert components[name]["refusing"] is True, name
        assert "TenantRevokedError" in components[name]["error"], name
    assert components["archive jobs"]["refusing"] is True
    assert components["provider unwrap"]["refusing"] is False  # the customer's key itself still works
    assert data["requested_at"] <= data["committed_at"] <= data["refusing_everywhere_by"]

    for attempt in (
        lambda: warm.read_record(rec.workspace_id, rec.object_type, rec.record_id),
        lambda: warm.search(Query()),
    ):
        with pytest.raises(TenantRevokedError, match="tenant acme: key revoked at"):
            attempt()
    assert time.time() >= returned
    assert platform.state.get_tenant("acme").revoked is True
    assert submit_job(platform.state, synthetic("while-revoked", 3, offset=12), platform.open_archive).decision == (
        "deferred"
    )
    runs = platform.state.list_runs("acme")
    assert [(r.flow, r.state) for r in runs] == [(Flow.REVOKE, RunState.COMPLETED)]
    assert runs[0].step("receipt").result == data
    assert {"revoke.request", "keychain.revoke", "gate.pause", "revoke.receipt"} <= set(audit_actions(platform))
    assert [w.kind for w in list_warnings(platform.state, "acme")] == ["tenant_revoked"]

    report = restore_tenant(platform, "acme", actor="bob@sec", reason="incident closed")
    assert report.restored and report.data["replayed_jobs"] == 1
    assert warm.read_record(rec.workspace_id, rec.object_type, rec.record_id) == rec
    assert len(warm.search(Query(limit=100)).hits) == 15  # the deferred job was replayed, once
    assert platform.state.gate("acme").state is GateState.OPEN
    assert platform.state.get_tenant("acme").revoked is False
    assert list_warnings(platform.state, "acme") == []
    assert {"restore.request", "keychain.restore", "restore.complete"} <= set(audit_actions(platform))


def test_revoke_is_idempotent_and_says_so(platform: Platform) -> None:
    first = revoke_tenant(platform, "acme", actor="alice")
    second = revoke_tenant(platform, "acme", actor="alice")
    assert second.to_dict()["already_revoked"] is True and second.ok
    assert second.to_dict()["committed_at"] == first.to_dict()["committed_at"]
    assert audit_actions(platform).count("keychain.revoke") == 1


def test_restore_is_refused_while_the_key_is_unusable_and_the_tenant_stays_revoked(platform, kms) -> None:
    revoke_tenant(platform, "acme", actor="alice")
    kms.disable(key_name(platform))
    with pytest.raises(KeyUnavailableError):
        restore_tenant(platform, "acme", actor="bob")
    assert platform.keychain.status("acme").revoked
    failed = platform.state.list_runs("acme", states=[RunState.FAILED])
    assert [r.flow for r in failed] == [Flow.RESTORE] and failed[0].step("verify_unwrap").error
    assert "run_failed" in [w.kind for w in list_warnings(platform.state, "acme")]
    kms.enable(key_name(platform))
    assert restore_tenant(platform, "acme", actor="bob").restored


def test_restore_refuses_a_tenant_that_is_not_revoked(platform: Platform) -> None:
    with pytest.raises(ValidationError, match="not revoked: nothing to restore"):
        restore_tenant(platform, "acme", actor="bob")
    assert platform.state.list_runs("acme") == []


def test_dry_runs_change_nothing(platform: Platform) -> None:
    before = (platform.keychain.status("acme"), platform.state.gate("acme"), list(platform.state.iter_audit()))
    preview = blast_radius(platform, "acme", "revoke")
    assert preview.objects > 12 and preview.index_documents == 12 and preview.queued_jobs == 0
    ws = records()[0].workspace_id
    scoped = revocation_preview(platform, "acme", RevocationScope(ws), "revoke")
    assert 0 < scoped.objects < preview.objects and 0 < scoped.index_documents < 12
    after = (platform.keychain.status("acme"), platform.state.gate("acme"), list(platform.state.iter_audit()))
    assert before == after
    with pytest.raises(ValidationError, match="not revoked"):
        blast_radius(platform, "acme", "restore")


def test_a_workspace_revocation_leaves_the_rest_readable_and_withholds_its_search_hits(platform: Platform) -> None:
    recs = records()
    ws = recs[0].workspace_id
    inside = [r for r in recs if r.workspace_id == ws]
    outside = [r for r in recs if r.workspace_id != ws]
    assert inside and outside
    receipt = revoke_tenant(platform, "acme", actor="alice", scope=RevocationScope(ws))
    assert receipt.ok
    components = {c["component"]: c for c in receipt.to_dict()["components"]}
    assert components["reads outside the scope"]["refusing"] is False
    other = platform.probe_view().open_archive("acme")
    with pytest.raises(TenantRevokedError, match=f"workspace {ws}"):
        other.read_record(ws, inside[0].object_type, inside[0].record_id)
    assert other.read_record(outside[0].workspace_id, outside[0].object_type, outside[0].record_id) == outside[0]
    result = other.search(Query(limit=100))
    assert {h.workspace_id for h in result.hits} == {outside[0].workspace_id}
    assert len(result.failures) == len(inside) and all("withheld" in f.reason for f in result.failures)
    assert platform.state.get_tenant("acme").revoked is False  # the tenant is not revoked
    with pytest.raises(TenantRevokedError, match=f"workspace {ws}"):  # no new data into a revoked workspace
        platform.keychain.dek_for_encrypt("acme", ws)
    report = restore_tenant(platform, "acme", actor="bob", scope=RevocationScope(ws))
    assert report.restored
    assert other.read_record(ws, inside[0].object_type, inside[0].record_id) == inside[0]


def test_a_time_range_revocation_refuses_older_hours_only(kms: MemoryKms) -> None:
    clock = {"t": datetime(2026, 1, 1, 10, 30, tzinfo=UTC).timestamp()}
    p = Platform.in_memory(Settings(aws_endpoint_url=None), kms=kms, clock=lambda: clock["t"])
    create_tenant(p, "acme", provision_storage=False)
    old = JobSpec("old", "acme", "synthetic", synthetic={"count": 4, "seed": 1})
    new = JobSpec("new", "acme", "synthetic", synthetic={"count": 4, "seed": 2})
    submit_job(p.state, old, p.open_archive)  # the 10:00 hour
    clock["t"] += 3600  # 11:30
    submit_job(p.state, new, p.open_archive)  # the 11:00 hour
    recs = [r for r, _ in old.materialise()] + [r for r, _ in new.materialise()]
    before = datetime(2026, 1, 1, 11, 15, tzinfo=UTC)  # covers the hour that ended at 11:00
    p.keychain.revoke_scope("acme", before=before)
    other = p.probe_view().open_archive("acme")
    with pytest.raises(TenantRevokedError, match="data keys of buckets before 2026-01-01T11:15"):
        other.read_record(recs[0].workspace_id, recs[0].object_type, recs[0].record_id)
    assert other.read_record(recs[5].workspace_id, recs[5].object_type, recs[5].record_id) == recs[5]
    hits = other.search(Query(limit=100))
    assert sorted(h.record_id for h in hits) == sorted(r.record_id for r in recs[4:])
    with pytest.raises(ValidationError, match="in the future"):
        p.keychain.revoke_scope("acme", before=datetime(2030, 1, 1, tzinfo=UTC))
    assert p.keychain.restore_scope("acme", before=before) is not None
    time.sleep(p.keychain.revocation_check_seconds)  # what restore_tenant waits out for every process
    assert other.read_record(recs[0].workspace_id, recs[0].object_type, recs[0].record_id) == recs[0]


def test_scoped_revocations_are_signed_and_old_heads_still_verify(platform: Platform) -> None:
    ws = records()[0].workspace_id
    platform.keychain.revoke_scope("acme", workspace_id=ws)
    store = platform.keychain._heads.store  # the in-memory keychain store
    raw = store.heads["acme"]
    head = TenantHead.from_json(raw)
    assert [s.workspace_id for s in head.scoped_revocations] == [ws]
    assert TenantHead.from_json(head.to_json()) == head
    store.heads["acme"] = raw.replace(b'"scoped_revocations"', b'"scoped_revocationz"')  # drop it
    with pytest.raises(KeychainTamperedError):
        platform.probe_view().keychain.dek_by_id("acme", "l4/" + ws + "/1/1")


def test_unknown_tenants_workspaces_and_bad_reasons_are_refused_before_anything_changes(platform) -> None:
    with pytest.raises(StateError, match="unknown tenant"):
        revoke_tenant(platform, "ghost", actor="a")
    with pytest.raises(ValidationError, match="no live workspace"):
        revoke_tenant(platform, "acme", actor="a", scope=RevocationScope("nope"))
    with pytest.raises(ValidationError, match="printable"):
        revoke_tenant(platform, "acme", actor="a", reason="line\nbreak")
    assert not platform.keychain.status("acme").revoked and platform.state.list_runs("acme") == []


# --- the key-state monitor ------------------------------------------------------------------------


def test_the_monitor_tells_rotation_disable_and_outage_apart(platform: Platform, kms: MemoryKms) -> None:
    seen: list = []
    report = check_keys(platform, on_rotation_detected=lambda t, o: seen.append((t, o.previous_version, o.key_version)))
    assert [o.classification for o in report.observations] == [Classification.OK]
    name = key_name(platform)

    kms.rotate(name)
    for _ in range(2):  # seen twice, acted on once
        obs = check_keys(
            platform, on_rotation_detected=lambda t, o: seen.append((t, o.previous_version, o.key_version))
        )
        assert obs.observations[0].classification is Classification.ROTATION
    assert seen == [("acme", "1", "2")]
    warning = platform.state.get_warning("rotation_detected:acme")
    assert warning.details == {
        "tenant": "acme",
        "key_ref": "memory://" + name,
        "previous_version": "1",
        "observed_version": "2",
    }
    acknowledge_warning(platform.state, warning.warning_id, actor="alice")
    accept_key_version(platform, "acme", "2", actor="rotation")
    assert check_keys(platform).observations[0].classification is Classification.OK
    assert platform.state.get_warning("rotation_detected:acme").active is False

    from archive_kms.errors import ServiceUnavailableError

    kms.inject("status", ServiceUnavailableError("injected outage"), times=1000)
    obs = check_keys(platform).observations[0]
    assert obs.classification is Classification.UNREACHABLE and "injected outage" in obs.error
    assert not platform.keychain.status("acme").revoked  # an outage is never a revocation
    assert platform.state.get_warning("key_unavailable:acme").active
    kms._faults.clear()  # the provider answers again
    check_keys(platform)
    assert platform.state.get_warning("key_unavailable:acme").active is False

    kms.disable(name)
    dry = check_keys(platform, dry_run=True).observations[0]
    assert dry.classification is Classification.REVOKED and dry.action.startswith("would revoke")
    assert not platform.keychain.status("acme").revoked
    obs = check_keys(platform).observations[0]
    assert obs.action.startswith("revoked by run")
    assert platform.keychain.status("acme").revoked
    run = platform.state.list_runs("acme", limit=1)[0]
    receipt = run.step("receipt").result
    assert receipt["actor"] == "monitor" and receipt["ok"]
    provider = next(c for c in receipt["components"] if c["component"] == "provider unwrap")
    assert provider["refusing"] is True and "disabled" in provider["error"]
    assert check_keys(platform).observations[0].action.startswith("tenant already revoked")
    status = key_status(platform, "acme")
    assert status["revoked"] and {w["kind"] for w in status["warnings"]} == {"tenant_revoked", "key_disabled"}


def test_the_monitor_watches_customer_keys_only(platform: Platform) -> None:
    create_tenant(platform, "plain", provision_storage=False)  # managed key
    assert [o.tenant_id for o in check_keys(platform).observations] == ["acme"]
    with pytest.raises(ValidationError, match="managed key"):
        check_keys(platform, "plain")


def test_expiring_imported_material_raises_a_warning(platform: Platform, kms: MemoryKms) -> None:
    kms.set_valid_to(key_name(platform), datetime.now(UTC) + timedelta(days=2))
    obs = check_keys(platform).observations[0]
    assert obs.classification is Classification.OK and obs.action.startswith("key_expiring")
    assert platform.state.get_warning("key_expiring:acme").active
