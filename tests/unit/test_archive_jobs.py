"""Archive jobs on the in-memory platform: exactly-once writes, the gate, keyed search.

The same operations run on the real services in tests/integration/test_archive_e2e.py.
"""

from __future__ import annotations

import pytest

from archive_kms.operations.archive import JobSpec, replay_deferred, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query


@pytest.fixture()
def platform() -> Platform:
    p = Platform.in_memory()
    create_tenant(p, "acme", provision_storage=False)
    return p


def synthetic(job_id: str, count: int = 12, offset: int = 0) -> JobSpec:
    return JobSpec(job_id, "acme", "synthetic", synthetic={"count": count, "seed": 7, "offset": offset})


def objects(p: Platform) -> list[bytes]:
    return sorted(o.name for o in p.store_for(p.location_of("acme")).list())


def test_job_archives_records_and_attachments_and_they_read_back(platform):
    out = submit_job(platform.state, synthetic("job-1"), platform.open_archive)
    assert out.decision == "run" and out.records == 12 and out.objects_written == out.records + out.attachments
    archive = platform.open_archive("acme")
    spec_records = [r for r, _ in synthetic("job-1").materialise()]
    for record in spec_records:
        assert archive.read_record(record.workspace_id, record.object_type, record.record_id) == record
    first_with_att = next((r, a) for r, a in synthetic("job-1").materialise() if a)
    record, atts = first_with_att
    got = b"".join(archive.read_attachment(record.workspace_id, atts[0].ref.attachment_id))
    assert got == b"".join(atts[0].open())


def test_same_job_id_twice_archives_once(platform):
    submit_job(platform.state, synthetic("job-1"), platform.open_archive)
    before = objects(platform)
    again = submit_job(platform.state, synthetic("job-1"), platform.open_archive)
    assert again.decision == "duplicate"
    assert objects(platform) == before
    index = platform.index.current_index("acme")
    assert platform.index.count(index) == 12


def _crash_on_sixth_put(monkeypatch):
    import archive_kms.operations.archive as archive_mod

    real = archive_mod.TenantArchive.put_object
    calls = {"n": 0}

    def crash_after_five(self, name, ws, chunks, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("storage refused the sixth object")
        return real(self, name, ws, chunks, **kw)

    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", crash_after_five)
    return real


def test_a_job_failing_part_way_is_rolled_back_and_its_retry_converges(platform, monkeypatch):
    import archive_kms.operations.archive as archive_mod

    real = _crash_on_sixth_put(monkeypatch)
    with pytest.raises(RuntimeError):
        submit_job(platform.state, synthetic("job-crash"), platform.open_archive)
    assert objects(platform) == []  # the five objects it wrote were rolled back
    assert platform.index.count(platform.index.current_index("acme")) == 0
    assert platform.state.job_writes("job-crash") == []
    failed = [r for r in platform.state.iter_audit(tenant_id="acme") if r.action == "job.failed"]
    assert failed[-1].details["objects_deleted"] == 5
    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", real)
    retry = submit_job(platform.state, synthetic("job-crash"), platform.open_archive)
    assert (retry.decision, retry.objects_already_there) == ("run", 0)
    names = objects(platform)
    assert len(names) == len(set(names)) == retry.objects_written
    assert platform.index.count(platform.index.current_index("acme")) == 12


def test_a_job_whose_rollback_could_not_run_is_completed_by_its_retry(platform, monkeypatch):
    """A writer that dies without rolling back (here: the rollback fails too) leaves its
    journal; the retry finds its objects (writer tag) and completes the job."""
    import archive_kms.operations.archive as archive_mod

    real = _crash_on_sixth_put(monkeypatch)

    def storage_down(*args, **kw):
        raise RuntimeError("storage down")

    monkeypatch.setattr(archive_mod, "rollback_job_output", storage_down)
    with pytest.raises(RuntimeError):
        submit_job(platform.state, synthetic("job-crash"), platform.open_archive)
    assert len(objects(platform)) == 5 and len(platform.state.job_writes("job-crash")) > 5
    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", real)
    retry = submit_job(platform.state, synthetic("job-crash"), platform.open_archive)
    assert (retry.decision, retry.objects_already_there) == ("run", 5)
    names = objects(platform)
    assert len(names) == len(set(names)) == retry.objects_written + retry.objects_already_there
    assert platform.index.count(platform.index.current_index("acme")) == 12
    assert platform.state.job_writes("job-crash") == []  # completed: nothing to roll back any more


def test_jobs_sent_while_paused_are_deferred_then_replayed_once(platform):
    platform.state.pause("acme", "run-1")
    out = submit_job(platform.state, synthetic("job-p1", 5), platform.open_archive)
    out2 = submit_job(platform.state, synthetic("job-p2", 5, offset=5), platform.open_archive)
    dup = submit_job(platform.state, synthetic("job-p1", 5), platform.open_archive)
    assert (out.decision, out2.decision, dup.decision) == ("deferred", "deferred", "duplicate")
    assert objects(platform) == []
    replayed = replay_deferred(platform.state, "acme", "run-1", platform.open_archive)
    assert [o.job_id for o in replayed] == ["job-p1", "job-p2"]
    assert replay_deferred(platform.state, "acme", "run-1", platform.open_archive) == []
    assert platform.index.count(platform.index.current_index("acme")) == 10


def test_every_job_leaves_an_audit_record_with_counts_not_content(platform):
    submit_job(platform.state, synthetic("job-a1", 4), platform.open_archive)
    platform.state.pause("acme", "run-9")
    submit_job(platform.state, synthetic("job-a2", 3, offset=4), platform.open_archive)
    replay_deferred(platform.state, "acme", "run-9", platform.open_archive)
    jobs = [
        (r.action, r.actor, r.run_id, r.details["job_id"])
        for r in platform.state.iter_audit(tenant_id="acme")
        if r.action.startswith("job.")
    ]
    assert jobs == [
        ("job.run", "archive-writer", None, "job-a1"),
        ("job.deferred", "archive-writer", None, "job-a2"),
        ("job.run", "replay:run-9", "run-9", "job-a2"),
    ]
    ran = next(r for r in platform.state.iter_audit(tenant_id="acme") if r.action == "job.run")
    assert ran.details["records"] == 4 and ran.details["indexed"] == 4
    assert platform.state.verify_audit(tenant_id="acme").ok


def test_search_by_word_and_field_returns_decrypted_records(platform):
    submit_job(platform.state, synthetic("job-1"), platform.open_archive)
    archive = platform.open_archive("acme")
    record = next(r for r, _ in synthetic("job-1").materialise())
    word = record.fields["Description"].split()[-1]
    hits = archive.search(Query(text=word))
    assert record.record_id in {h.record_id for h in hits}
    by_field = archive.search(Query(filters={"Owner": record.fields["Owner"]}, object_type=record.object_type))
    assert all(h.fields["Owner"] == record.fields["Owner"] for h in by_field) and len(by_field) >= 1


def test_revoked_tenant_cannot_read(platform):
    from archive_kms.errors import TenantRevokedError

    submit_job(platform.state, synthetic("job-1", 3), platform.open_archive)
    record = next(r for r, _ in synthetic("job-1", 3).materialise())
    archive = platform.open_archive("acme")
    platform.keychain.revoke("acme")
    with pytest.raises(TenantRevokedError):
        archive.read_record(record.workspace_id, record.object_type, record.record_id)


def test_customer_key_tenant_gets_a_keyed_index_without_plaintext():
    p = Platform.in_memory()
    create_tenant(p, "globex", key_ref="memory://customer", provision_storage=False)
    spec = JobSpec("job-k", "globex", "synthetic", synthetic={"count": 8, "seed": 3})
    submit_job(p.state, spec, p.open_archive)
    archive = p.open_archive("globex")
    record = next(r for r, _ in spec.materialise())
    word = record.fields["Description"].split()[-1]
    assert record.record_id in {h.record_id for h in archive.search(Query(text=word))}
    assert p.index_mode(p.state.get_tenant("globex").key_mode).value == "keyed"


def test_bad_tenant_ids_are_refused_before_anything_is_created():
    from archive_kms.errors import ValidationError

    p = Platform.in_memory()
    for bad in ("", "..", "a/b", "Acme", "x" * 80, "ac*me", "-acme", "acme,b"):
        with pytest.raises(ValidationError):
            create_tenant(p, bad, provision_storage=False)
    assert p.state.list_tenants() == []
    assert p.index.list_generations("acme") == []


# --- deferred jobs keep their record content sealed (faults I7) -----------------------------


def inline(job_id: str, tenant: str = "acme", subject: str = "Renewal for Quokkafjord Ltd") -> JobSpec:
    record = {
        "object_type": "Case",
        "record_id": "5003000000QkfJ1AAA",
        "workspace_id": "ws0",
        "fields": {"Subject": subject, "Priority": "High"},
    }
    return JobSpec(job_id, tenant, "inline", (record,))


def test_a_job_without_record_content_is_queued_without_a_seal(platform):
    platform.state.pause("acme", "run-1")
    submit_job(platform.state, synthetic("job-s", 5, offset=3), platform.open_archive)
    [queued] = platform.state.list_deferred("acme")
    assert queued.sealed is None
    assert queued.payload == {
        "format": "akms-deferred-job/1",
        "kind": "synthetic",
        "record_count": 0,
        "attachment_count": 0,
        "synthetic": {"count": 5, "seed": 7, "offset": 3},
    }
    [out] = replay_deferred(platform.state, "acme", "run-1", platform.open_archive)
    assert (out.decision, out.records) == ("run", 5)


def test_the_content_digest_survives_an_l1_rebinding(platform):
    """A resend is recognised by the keyed digest, which comes from L2: re-wrapping L2
    under another L1 (what a migration's bind_key does) changes neither it nor the seal."""
    platform.state.pause("acme", "run-1")
    spec = inline("job-i")
    assert submit_job(platform.state, spec, platform.open_archive).decision == "deferred"
    digest = platform.state.list_deferred("acme")[0].payload["digest"]
    platform.keychain.rotate_l1("acme", platform.resolve_provider("memory://customer-acme"))
    platform.keychain.cache.purge("acme")
    assert submit_job(platform.state, spec, platform.open_archive).decision == "duplicate"
    assert platform.state.list_deferred("acme")[0].payload["digest"] == digest
    # bound to a customer key the tenant's plaintext index takes no records (search_guard);
    # back under the managed key (a cancelled run's undo) the job replays, digest unchanged
    platform.keychain.rotate_l1("acme", platform.resolve_provider("managed://platform"))
    assert submit_job(platform.state, spec, platform.open_archive).decision == "duplicate"
    [out] = replay_deferred(platform.state, "acme", "run-1", platform.open_archive)
    assert out.decision == "run"
    archive = platform.open_archive("acme")
    assert archive.read_record("ws0", "Case", "5003000000QkfJ1AAA").fields["Subject"] == "Renewal for Quokkafjord Ltd"


def test_a_seal_opens_only_for_its_own_job_and_tenant(platform):
    from archive_kms.errors import IntegrityError
    from archive_kms.operations.archive import open_queued, seal_job
    from archive_kms.state.port import DeferredJob

    create_tenant(platform, "beta", provision_storage=False)
    queued = seal_job(inline("job-1"), platform.keychain)
    mine = DeferredJob("job-1", "acme", queued.metadata, sealed=queued.sealed)
    assert open_queued(mine, platform.keychain) == inline("job-1")
    for moved in (
        DeferredJob("job-2", "acme", queued.metadata, sealed=queued.sealed),
        DeferredJob("job-1", "beta", queued.metadata, sealed=queued.sealed),
    ):
        with pytest.raises(
            IntegrityError,
            match=f"deferred job {moved.job_id} of tenant {moved.tenant_id}: its sealed content was refused",
        ) as info:
            open_queued(moved, platform.keychain)
        assert "Quokkafjord" not in str(info.value)
    other = seal_job(inline("job-1", subject="something else"), platform.keychain)
    assert other.metadata["digest"] != queued.metadata["digest"]  # other content, other digest
    with pytest.raises(IntegrityError, match="metadata does not match"):  # one job's metadata, another seal
        open_queued(DeferredJob("job-1", "acme", queued.metadata, sealed=other.sealed), platform.keychain)


def test_a_resend_is_recognised_after_the_digest_key_changed(platform):
    """``rotate_l2`` (or a re-key below L1 after a bind) replaces the key the digest comes
    from: a resent job is then recognised by opening its queued seal, or by the ledger."""
    from archive_kms.errors import StateError

    platform.state.pause("acme", "run-1")
    spec = inline("job-i")
    assert submit_job(platform.state, spec, platform.open_archive).decision == "deferred"
    platform.keychain.rotate_l2("acme")
    assert submit_job(platform.state, spec, platform.open_archive).decision == "duplicate"
    with pytest.raises(StateError, match="already used"):  # other content is still not a resend
        submit_job(platform.state, inline("job-i", subject="something else"), platform.open_archive)
    [out] = replay_deferred(platform.state, "acme", "run-1", platform.open_archive)
    assert out.decision == "run"
    platform.keychain.rotate_l2("acme")
    assert submit_job(platform.state, spec, platform.open_archive).decision == "duplicate"  # completed
    assert platform.state.get_job("job-i").attempt == 1
