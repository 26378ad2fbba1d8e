"""Crypto-erasure end to end on the real services (issue #14; issue #11 finding 6):

- S3 + LocalStack KMS + Elasticsearch, through the CLI (``erase --dry-run``, then
  ``erase --before T --yes --wait --out FILE``): the expired buckets' objects are gone from
  storage and their documents from the index, a kept copy of an erased object no longer
  decrypts, everything newer reads and searches as before, and the signed erasure record
  verifies offline with the platform's public key alone (``erasure verify FILE
  --public-key PEM``); a tampered record does not.
- Azure + the Key Vault emulator (BYOKV, keyed index), a whole workspace erased through the
  engine: its keys, objects and keyed documents are gone, the other workspace intact.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import es_documents, run_plan
from erasure_fixtures import BUCKET_SECONDS, doc_ids, listing, record_keys, two_buckets

from archive_kms import cli
from archive_kms.config import Settings
from archive_kms.crypto.envelope import ObjectBinding, decrypt_to_bytes
from archive_kms.crypto.signing import Verifier
from archive_kms.errors import KeyDestroyedError, ObjectNotFoundError
from archive_kms.migration.erase import certificate_json, plan_erase
from archive_kms.operations.archive import workspace_of
from archive_kms.operations.erasure_record import verify_certificate
from archive_kms.search import Query

pytestmark = pytest.mark.slow


@pytest.fixture
def flow_settings(localstack: Settings, azurite: Settings, elasticsearch: Settings, keyvault: Settings, tmp_path):
    """As the suite's, with 2-second DEK buckets (so data expires within the test)."""
    return localstack.model_copy(
        update={
            "state_url": f"sqlite:///{tmp_path / 'state.db'}",
            "lease_ttl_seconds": 5,
            "dek_bucket_seconds": BUCKET_SECONDS,
        }
    )


@pytest.fixture
def cli_env(flow_settings: Settings, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    monkeypatch.setenv("ARCHIVE_KMS_LEASE_TTL_SECONDS", "5")
    monkeypatch.setenv("ARCHIVE_KMS_DEK_BUCKET_SECONDS", str(BUCKET_SECONDS))
    return flow_settings


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


def searched(platform: Any, tenant_id: str) -> set[tuple[str, str, str]]:
    result = platform.open_archive(tenant_id).search(Query(limit=1000))
    assert not result.failures, result.failures
    return {(h.workspace_id, h.object_type, h.record_id) for h in result.hits}


def test_erase_by_time_through_the_cli_on_s3(cli_env, flow_platform, new_tenant_id, tmp_path):
    p = flow_platform
    data = two_buckets(p, new_tenant_id(), cloud="s3")
    tid = data.tenant_id
    index = p.index.current_index(tid)
    assert searched(p, tid) == data.old_records | data.new_records
    store = p.store_for(p.location_of(tid))
    kept_name = sorted(data.old)[0]
    with store.open_read(kept_name) as reader:  # a copy someone kept of an object about to be erased
        kept_copy = reader.read()

    before = data.cutoff.isoformat()
    dry = invoke("erase", tid, "--before", before, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    preview = json.loads(dry.stdout)
    assert (preview["objects"], preview["records"], preview["index_documents"]) == (
        len(data.old),
        len(data.old_records),
        len(data.old_records),
    ), preview
    assert preview["deks"] >= 2 and listing(p, tid) == data.old | data.new  # nothing changed

    refused = invoke("erase", tid, "--before", before)  # no terminal to confirm on, no --yes
    assert refused.exit_code == 2 and "--yes" in refused.output and listing(p, tid) == data.old | data.new

    record_file = tmp_path / "erasure.json"
    done = invoke("erase", tid, "--before", before, "--yes", "--wait", "--out", str(record_file), "--reason", "test")
    assert done.exit_code == 0, done.output

    assert listing(p, tid) == data.new  # storage reclaimed, nothing newer touched
    docs = {d["_id"] for d in es_documents(p, index)}
    assert docs == doc_ids(p, tid, data.new_records)  # the index forgot them too
    assert searched(p, tid) == data.new_records
    archive = p.open_archive(tid)
    for name in data.new:
        b"".join(archive.read_object(name))
    with pytest.raises(ObjectNotFoundError):
        b"".join(archive.read_object(kept_name))
    with pytest.raises(KeyDestroyedError):  # the kept copy no longer opens: its DEK is gone
        decrypt_to_bytes(
            kept_copy, binding=ObjectBinding(tid, workspace_of(kept_name), kept_name), dek_for=p.keychain.dek_for_header
        )

    pem = tmp_path / "platform.pem"
    out = invoke("erasure", "public-key")
    assert out.exit_code == 0 and "BEGIN PUBLIC KEY" in out.output
    pem.write_text(out.output)
    ok = invoke("erasure", "verify", str(record_file), "--public-key", str(pem))
    assert ok.exit_code == 0 and "verified" in ok.output, ok.output
    doc = json.loads(record_file.read_text())
    assert doc["storage"]["objects_deleted"] == len(data.old) and doc["index"]["documents_deleted"] == len(
        data.old_records
    )
    doc["storage"]["objects_deleted"] -= 1  # the operator hides one object
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    bad = invoke("erasure", "verify", str(tampered), "--public-key", str(pem))
    assert bad.exit_code == 1 and "NOT verified" in bad.output, bad.output
    assert p.state.verify_audit(tenant_id=tid).ok


def test_erase_a_workspace_of_a_byokv_tenant_with_a_keyed_index(flow_platform, new_tenant_id, customer_key):
    p = flow_platform
    data = two_buckets(p, new_tenant_id(), cloud="azure", key_ref=customer_key("byokv", "azure"))
    tid = data.tenant_id
    index = p.index.current_index(tid)
    assert p.index.describe_generation(index).mode.value == "keyed"
    ws0 = {n for n in data.old | data.new if n.split(b"/")[1] == b"ws0"}
    assert ws0 and ws0 != data.old | data.new

    outcome = run_plan(p, plan_erase(p, tid, workspace="ws0", reason="device retired"))
    assert outcome.state == "completed", outcome

    rest = (data.old | data.new) - ws0
    assert listing(p, tid) == rest
    assert {d["_id"] for d in es_documents(p, index)} == doc_ids(p, tid, record_keys(rest))
    assert searched(p, tid) == record_keys(rest)
    assert "ws0" in p.keychain.status(tid).erased_workspaces
    run = p.state.get_run(outcome.run_id)
    check = verify_certificate(certificate_json(run), Verifier.from_public_pem(p.require_signer().public_key_pem()))
    assert check.ok and check.certificate.workspaces_destroyed == ("ws0",), check.reason
    assert check.certificate.storage["objects_deleted"] == len(ws0)
