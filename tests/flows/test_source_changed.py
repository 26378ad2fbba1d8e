"""A source object changed or deleted after the manifest is never copied and never cut over
(issue #10 defect 1), on the real services: S3 (LocalStack) with BYOKMS and Azure Blob
(Azurite) with BYOKV.

A worker runs ``enable`` and SIGKILLs itself at ``before:copy`` (the manifest is taken, no
object is copied yet). Then, as a stray writer would, one record object is replaced by a
*valid* envelope of other plaintext (same name, same tenant, same DEK, same size: only one
character of the record differs) and one attachment is deleted. A second worker resumes the
run: it must stop in ``copy``, before cutover, naming both objects and what differs; the
destination holds neither, the registry and the alias still point at the source, and a
second resume stops the same way (it is not a transient failure that a retry gets past).

Before the fix the copy read whatever the source held at that moment: the replaced object
was copied, verified (against its own digest), indexed and cut over, and only the deletion
was noticed, after cutover, as "something is still writing". ~25 s per cloud.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_crash_resume import KILLED, Workers

from archive_kms.crypto.envelope import ObjectBinding, decrypt_iter, encrypt_iter, read_header
from archive_kms.migration import MigrationPlan
from archive_kms.operations.archive import ATTACHMENT_PREFIX, RECORD_PREFIX, workspace_of
from archive_kms.state.port import CopyStatus, RunState, StepState
from archive_kms.storage import Location

CASES = [("s3", "byokms"), ("azure", "byokv")]


@pytest.fixture
def workers(flow_settings, tmp_path: Path) -> Iterator[Workers]:
    logs = tmp_path / "workers"
    logs.mkdir()
    w = Workers(flow_settings, logs)
    yield w
    w.reap()


def replace_with_other_plaintext(platform, tenant_id: str, store, name: bytes) -> bytes:
    """Overwrite ``name`` with a valid envelope (same DEK, binding and size) whose record
    says something else; returns the new plaintext."""
    raw = store.open_read(name).read()
    header = read_header(io.BytesIO(raw))
    binding = ObjectBinding(tenant_id, workspace_of(name), name)
    plaintext = b"".join(decrypt_iter(io.BytesIO(raw), binding=binding, dek_for=platform.keychain.dek_for_header))
    at = plaintext.index(b'"Name"')  # a record's Name field: change its first character
    at = plaintext.index(b'"', at + len(b'"Name"') + 1) + 1
    forged = plaintext[:at] + (b"X" if plaintext[at : at + 1] != b"X" else b"Y") + plaintext[at + 1 :]
    assert forged != plaintext and len(forged) == len(plaintext)
    json.loads(forged)  # still a record
    dek = platform.keychain.dek_by_id(tenant_id, header.dek_id)
    envelope = b"".join(encrypt_iter([forged], dek=dek, dek_id=header.dek_id, binding=binding))
    assert len(envelope) == len(raw)
    store.put_stream(name, [envelope])
    return forged


@pytest.mark.parametrize(("cloud", "mode"), CASES, ids=[c for c, _ in CASES])
def test_a_source_changed_after_the_manifest_stops_the_run_before_cutover(
    flow_platform, archived_tenant, customer_key, workers, cloud, mode
):
    tenant = archived_tenant(cloud, records=12, seed=21)
    key_ref = customer_key(mode, cloud)
    killed = workers.run("enable", tenant.tenant_id, mode, key_ref, "--shards", "2", crash_at="before:copy")
    assert killed.returncode == KILLED, killed.describe()

    (run,) = flow_platform.state.list_runs(tenant.tenant_id)
    plan = MigrationPlan.from_params(run.params)
    assert run.step("manifest").state is StepState.COMPLETED
    src = flow_platform.store_for(plan.source_location)
    replaced = sorted(n for n in tenant.snapshot if n.startswith(RECORD_PREFIX))[3]
    deleted = sorted(n for n in tenant.snapshot if n.startswith(ATTACHMENT_PREFIX))[0]
    manifest = {e.name: e for e in flow_platform.state.iter_manifest(run.run_id)}
    replace_with_other_plaintext(flow_platform, tenant.tenant_id, src, replaced)
    src.delete(deleted)
    now = src.head(replaced)
    assert now.size == manifest[replaced].size and now.etag != manifest[replaced].etag  # same size, other bytes

    for _ in range(2):  # not transient: a second resume stops the same way
        out = workers.run("resume", run.run_id, "--takeover").outcome
        assert out["state"] == RunState.FAILED.value, out
        error = out["error"]
        assert out["message"] == "step copy failed", out
        assert "IntegrityError" in error and "before cutover" in error, error
        assert f"{replaced[:120]!r} changed after the manifest" in error, error
        assert f"{deleted[:120]!r} was deleted after the manifest" in error, error
        assert "still writing" not in error

    run = flow_platform.state.get_run(run.run_id)
    assert run.step("cutover").state is StepState.PENDING
    assert Location.from_dict(flow_platform.state.get_tenant(tenant.tenant_id).location) == plan.source_location
    assert flow_platform.index.current_index(tenant.tenant_id) == plan.old_index
    dst_names = {i.name for i in flow_platform.store_for(plan.destination_location).list()}
    assert replaced not in dst_names and deleted not in dst_names  # never copied
    assert flow_platform.state.get_copy(run.run_id, replaced).status is CopyStatus.FAILED
    assert "source changed" in flow_platform.state.get_copy(run.run_id, replaced).error
    assert "source deleted" in flow_platform.state.get_copy(run.run_id, deleted).error
