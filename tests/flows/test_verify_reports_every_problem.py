"""`archive-kms verify` never stops at the first bad object (issue 10, defect 2).

On the real services (LocalStack S3 + KMS, Elasticsearch): a tenant is moved onto its own
key (the source-era DEKs are crypto-erased at the end of the run), then its dedicated
bucket and index are damaged in four ways at once, with the raw clients and adapters:

* an older copy of a record, taken from the source before the migration (its DEK is now
  erased), written back over the current object: a stale / replayed object;
* one bit flipped in another object: authentication fails;
* a record object deleted: the index answers for a record storage does not hold;
* a record's index document deleted: a stored record the index does not know.

``verify`` (library and CLI, human and ``--json``) must complete and report all four,
each with its reason; the erased-DEK one must say what is likely (stale or replayed).
Before the fix it exited 2 with one line about the erased DEK and reported nothing else.
"""

from __future__ import annotations

import json

from conftest import run_plan
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.migration import plan_enable
from archive_kms.operations.verification import verify_tenant
from archive_kms.search import build_document
from archive_kms.state.port import RunState


def test_verify_completes_and_names_every_bad_object(flow_platform, flow_settings, archived_tenant, customer_key):
    p = flow_platform
    archived = archived_tenant("s3", records=12)
    t = archived.tenant_id
    source = p.store_for(p.location_of(t))
    records = sorted(n for n in archived.snapshot if n.startswith(b"records/"))
    stale_name, flipped, deleted, unindexed = records[:4]
    with source.open_read(stale_name) as reader:
        old_bytes = reader.read()  # the pre-migration ciphertext, under a source-era DEK

    out = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms"), shards=2))
    assert out.state == RunState.COMPLETED.value, out.error
    erased = p.state.get_run(out.run_id).step("resume").result["old_deks_erased"]
    assert erased > 0  # the DEK of old_bytes is gone

    dest = p.store_for(p.location_of(t))
    dest.delete(stale_name)
    dest.put_stream(stale_name, iter([old_bytes]))  # written back: stale / replayed
    with dest.open_read(flipped) as reader:
        data = bytearray(reader.read())
    data[len(data) // 2] ^= 0x01
    dest.delete(flipped)
    dest.put_stream(flipped, iter([bytes(data)]))
    dest.delete(deleted)
    archive = p.open_archive(t)
    gone = next(
        r for r in archived.records if f"records/{r.workspace_id}/{r.object_type}/{r.record_id}".encode() == unindexed
    )
    doc = build_document(gone, tenant=t, mode=archive.index_mode, keys=archive.search_keys)
    p.index.delete_documents(p.index.current_index(t), [doc.doc_id], refresh=True)

    v = verify_tenant(p, t)
    assert not v["ok"]
    by_reason = {}
    for problem in v["problems"]:
        by_reason.setdefault(problem["reason"], []).append(problem)
    assert set(by_reason) == {"dek_erased", "authentication_failed", "index_only", "not_indexed"}, v["problems"]
    [stale] = by_reason["dek_erased"]
    assert stale_name.decode() in stale["object"] and "stale or replayed" in stale["detail"]
    assert flipped.decode() in by_reason["authentication_failed"][0]["object"]
    assert deleted.decode() in by_reason["index_only"][0]["object"]
    assert unindexed.decode() in by_reason["not_indexed"][0]["object"]
    # the other objects were all read: nothing was skipped after the first bad one
    assert v["objects"] == len(archived.snapshot) - 1 and v["unreadable"] == 2
    assert v["records"] == len(records) - 3

    runner = CliRunner(env={"ARCHIVE_KMS_STATE_URL": flow_settings.state_url})
    as_json = runner.invoke(cli.app, ["verify", t, "--json"])
    assert as_json.exit_code == 1 and "Traceback" not in as_json.stdout + as_json.stderr, as_json.stderr
    assert json.loads(as_json.stdout)["problem_counts"] == {
        "authentication_failed": 1,
        "dek_erased": 1,
        "index_only": 1,
        "not_indexed": 1,
    }
    human = runner.invoke(cli.app, ["verify", t])
    assert human.exit_code == 1 and "NOT OK" in human.stdout
    assert "4 problem(s)" in human.stdout and "stale or replayed" in human.stdout
    for name in (stale_name, flipped, deleted, unindexed):
        assert name.decode() in human.stdout
