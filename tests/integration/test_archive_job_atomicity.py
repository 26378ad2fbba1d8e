"""Archive jobs are atomic and checked before writing, on the real services (issue 10,
defect 3): LocalStack S3, Azurite, Elasticsearch, SQLite state.

* A job that fails part-way (storage refuses an object after 250 records, a batch of
  documents already indexed) is rolled back: no object, no document, ``verify`` OK; the
  retry with the same job id archives everything once.
* Two lines with the same record id and other content, or one attachment id for two
  files, are refused naming both lines; nothing is written (this used to keep the first
  and report success).
* A record that is already archived by another job with other content is refused, not
  silently kept as it was.
* A name that fits the tenant's dedicated bucket but not the shared prefix ``remove``
  would bring it back to is refused when the job is submitted.
* ``record_id: null`` is refused, never stored as "None".
"""

from __future__ import annotations

import json
import uuid

import pytest

from archive_kms.errors import ValidationError
from archive_kms.operations import archive as archive_mod
from archive_kms.operations.archive import JobSpec, load_jsonl, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.operations.verification import verify_tenant


@pytest.fixture
def platform(localstack, azurite, elasticsearch, tmp_path):
    return Platform.from_settings(localstack.model_copy(update={"state_url": f"sqlite:///{tmp_path / 'state.db'}"}))


def tenant(platform, cloud: str = "s3") -> str:
    t = f"at{uuid.uuid4().hex[:8]}"
    create_tenant(platform, t, cloud=cloud, actor="test")
    return t


def stored(platform, t: str) -> list[bytes]:
    return [o.name for o in platform.open_archive(t).store.list()]


def documents(platform, t: str) -> int:
    index = platform.index.current_index(t)
    platform.index.refresh(index)
    return platform.index.count(index)


# S3: past the first batch of 200 index documents, so documents are rolled back too.
@pytest.mark.parametrize(
    ("cloud", "count", "records_before_failure", "docs"), [("s3", 250, 230, 200), ("azure", 30, 20, 0)]
)
def test_a_job_failing_part_way_is_rolled_back_and_the_retry_converges(
    platform, monkeypatch, cloud, count, records_before_failure, docs
):
    t = tenant(platform, cloud)
    spec = JobSpec(f"{t}-big", t, "synthetic", synthetic={"count": count, "seed": 4})
    real, calls = archive_mod.TenantArchive.put_object, {"n": 0}

    def fail_late(self, name, ws, chunks, **kw):
        if name.startswith(b"records/"):
            calls["n"] += 1
            if calls["n"] > records_before_failure:
                raise ConnectionResetError("storage went away mid-job")
        return real(self, name, ws, chunks, **kw)

    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", fail_late)
    with pytest.raises(ConnectionResetError):
        submit_job(platform.state, spec, platform.open_archive)
    monkeypatch.undo()
    assert stored(platform, t) == [] and documents(platform, t) == 0  # indexed documents were rolled back too
    failed = [r for r in platform.state.iter_audit(tenant_id=t) if r.action == "job.failed"][-1]
    assert failed.details["documents_deleted"] == docs and failed.details["objects_deleted"] > records_before_failure
    assert verify_tenant(platform, t)["ok"]

    retry = submit_job(platform.state, spec, platform.open_archive)
    assert (retry.decision, retry.records, retry.objects_already_there) == ("run", count, 0)
    assert len(stored(platform, t)) == retry.objects_written and documents(platform, t) == count
    assert verify_tenant(platform, t)["ok"]


def test_conflicting_duplicates_in_one_job_are_refused_naming_both_lines(platform, tmp_path):
    t = tenant(platform)
    f = tmp_path / "job.jsonl"
    f.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"object_type": "Case", "record_id": "500A", "fields": {"Subject": "first"}},
                {"object_type": "Case", "record_id": "500B", "fields": {"Subject": "other"}},
                {"object_type": "Case", "record_id": "500A", "fields": {"Subject": "second"}},
            )
        )
        + "\n"
    )
    with pytest.raises(ValidationError, match=rf"{f}:3: record Case/500A .* is also at {f}:1 with other content"):
        load_jsonl(f, job_id=f"{t}-dup", tenant_id=t)
    # an identical line again is the same record: archived once, not an error
    f.write_text((json.dumps({"object_type": "Case", "record_id": "500A", "fields": {"Subject": "x"}}) + "\n") * 2)
    out = submit_job(platform.state, load_jsonl(f, job_id=f"{t}-same", tenant_id=t), platform.open_archive)
    assert (out.decision, out.records) == ("run", 1)
    assert len(stored(platform, t)) == 1 and verify_tenant(platform, t)["ok"]

    (tmp_path / "a.bin").write_bytes(b"one")
    (tmp_path / "b.bin").write_bytes(b"two")
    att = {"attachment_id": "00PX", "file_name": "f.bin"}
    f.write_text(
        json.dumps({"object_type": "Case", "record_id": "1", "attachments": [{**att, "path": "a.bin"}]})
        + "\n"
        + json.dumps({"object_type": "Case", "record_id": "2", "attachments": [{**att, "path": "b.bin"}]})
        + "\n"
    )
    with pytest.raises(ValidationError, match=rf"{f}:2: attachment 00PX is also at {f}:1"):
        load_jsonl(f, job_id=f"{t}-att", tenant_id=t)
    # an inline spec built by code, not a file, is held to the same rule when it runs
    spec = JobSpec(
        f"{t}-inline",
        t,
        "inline",
        (
            {"object_type": "Case", "record_id": "9", "fields": {"S": "a"}},
            {"object_type": "Case", "record_id": "9", "fields": {"S": "b"}},
        ),
    )
    with pytest.raises(ValidationError, match=f"record 2 of job {t}-inline: record Case/9 .* also at record 1"):
        submit_job(platform.state, spec, platform.open_archive)
    assert len(stored(platform, t)) == 1 and platform.state.get_job(f"{t}-inline") is None


def test_a_record_archived_by_another_job_is_never_silently_kept(platform):
    t = tenant(platform)
    first = JobSpec(f"{t}-1", t, "inline", ({"object_type": "Case", "record_id": "500Z", "fields": {"S": "v1"}},))
    assert submit_job(platform.state, first, platform.open_archive).decision == "run"
    same = JobSpec(f"{t}-2", t, "inline", ({"object_type": "Case", "record_id": "500Z", "fields": {"S": "v1"}},))
    out = submit_job(platform.state, same, platform.open_archive)
    assert (out.decision, out.objects_already_there, out.objects_written) == ("run", 1, 0)
    other = JobSpec(
        f"{t}-3",
        t,
        "inline",
        (
            {"object_type": "Case", "record_id": "500Y", "fields": {"S": "new"}},
            {"object_type": "Case", "record_id": "500Z", "fields": {"S": "v2"}},
        ),
    )
    with pytest.raises(ValidationError, match="record Case/500Z .* is already archived with other content"):
        submit_job(platform.state, other, platform.open_archive)
    assert stored(platform, t) == [b"records/default/Case/500Z"]  # 500Y was not written either
    assert platform.open_archive(t).read_record("default", "Case", "500Z").fields == {"S": "v1"}
    assert verify_tenant(platform, t)["ok"]


def test_names_must_fit_every_location_the_tenant_may_live_in(platform):
    """A dedicated-bucket tenant's names must also fit ``tenants/<id>/`` of the shared
    bucket (where ``remove`` brings it back); records with ids in the 3-byte-UTF-8 range
    fill a key fast (each byte is 3 characters)."""
    from dataclasses import replace

    from archive_kms.storage import dedicated_s3_location
    from archive_kms.storage.naming import encode_name

    t = tenant(platform)
    dedicated = dedicated_s3_location(t, sse_kms_key_arn=None)
    platform.provisioner.create(dedicated)
    platform.state.update_tenant(replace(platform.state.get_tenant(t), location=dedicated.to_dict()))
    rid = "\u20ac" * 108 + "a" * 10  # 118 characters; each euro sign is 3 bytes, 9 key characters
    name = f"records/default/Case/{rid}".encode()
    assert len(encode_name(name)) <= 1024 < len(encode_name(name)) + len(f"tenants/{t}/")
    spec = JobSpec(f"{t}-long", t, "inline", ({"object_type": "Case", "record_id": rid},))
    with pytest.raises(ValidationError, match=f"tenants/{t}/"):
        submit_job(platform.state, spec, platform.open_archive)
    assert stored(platform, t) == []
    platform.provisioner.delete(dedicated, platform.store_for(dedicated))


def test_null_record_id_is_refused_not_stored_as_none(platform):
    t = tenant(platform)
    spec = JobSpec(f"{t}-null", t, "inline", ({"object_type": "Case", "record_id": None},))
    with pytest.raises(ValidationError, match="record_id must be a string, not null"):
        submit_job(platform.state, spec, platform.open_archive)
    assert stored(platform, t) == []
