"""Customer key rotation with the customer's confirmation, end to end on the real services
(issue #14): LocalStack KMS (``RotateKeyOnDemand``: a new ``CurrentKeyMaterialId``) with S3,
and the Key Vault emulator (a new key version) with Azure Blob; Elasticsearch; through the
CLI.

For each: the first check records the version; the customer rotates; ``rotation check
--wait`` detects it, pauses the tenant (a job is deferred) and ends waiting for the
confirmation, with a ``rotation_detected`` warning offering ``confirm_rotation``; a forged
confirmation is refused and changes nothing; the real one resumes everything (L2 re-wrapped
with 1 unwrap + 1 wrap, a new index generation, the old one gone, the deferred job
replayed, data readable and searchable, the old version safe to disable); its replay is
refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_plan, tenant_indices
from customer_keys import delete_vault_keys, new_kmip_object_under_the_same_name, vault_key_name
from customer_keys import invoke_cli as invoke

from archive_kms.api.rotation_actions import RotationWarnings
from archive_kms.config import Settings
from archive_kms.migration.rotate import rotate_report
from archive_kms.operations.archive import RECORD_PREFIX, JobSpec, submit_job
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query
from archive_kms.state.port import RotationState

pytestmark = pytest.mark.slow


def job(tenant: str, name: str, count: int, offset: int) -> JobSpec:
    return JobSpec(f"{tenant}-{name}", tenant, "synthetic", synthetic={"count": count, "seed": 3, "offset": offset})


def searchable(p: Any, tenant: str) -> int:
    result = p.open_archive(tenant).search(Query(limit=1000))
    assert not result.failures, result.failures
    return len(result.hits)


def rotate_at_provider(settings: Settings, key_ref: str) -> str | None:
    """Rotate as the customer does; for KMIP, the new object's UID."""
    from archive_kms import clients

    if key_ref.startswith("aws-kms://"):
        clients.kms_client(settings).rotate_key_on_demand(KeyId=key_ref.removeprefix("aws-kms://"))
    elif key_ref.startswith("kmip://"):
        return new_kmip_object_under_the_same_name(settings, key_ref)
    else:
        clients.keyvault_key_client(settings).rotate_key(vault_key_name(key_ref))


def revoke_kmip_object(settings: Settings, key_ref: str) -> None:
    from kmip.core import enums

    from archive_kms import clients

    with clients.kmip_client(settings) as client:
        client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, key_ref.rsplit("/", 1)[1])


@pytest.mark.parametrize(("mode", "cloud"), [("byokms", "s3"), ("byokv", "azure"), ("kmip", "s3")])
def test_customer_rotation_is_confirmed_then_applied(
    cli_env, flow_platform, new_tenant_id, customer_key, tmp_path, mode, cloud
):
    p = flow_platform
    tid = new_tenant_id()
    key_ref = customer_key(mode, cloud)
    create_tenant(p, tid, cloud=cloud, key_ref=key_ref, actor="test")
    assert submit_job(p.state, job(tid, "a", 12, 0), p.open_archive).decision == "run"
    old_index = p.index.current_index(tid)
    assert json.loads(invoke("rotation", "check", tid, "--wait", "--json").stdout)["rotation"] is None  # baseline
    before = p.state.get_key_version(tid).version

    new_object = rotate_at_provider(cli_env, key_ref)
    out = invoke("rotation", "check", tid, "--wait")
    assert out.exit_code == 0, out.output
    rotation = p.state.find_open_rotation(tid)
    assert rotation.state is RotationState.AWAITING
    assert rotation.previous_version == before and rotation.observed_version not in (None, before)
    if new_object is not None:  # KMIP: the rotation moves the tenant to the new object
        assert rotation.kind == "customer" and rotation.observed_version == new_object
        assert rotation.key_ref == f"{key_ref.rsplit('/', 1)[0]}/{new_object}" and rotation.previous_key_ref == key_ref
    assert p.state.gate(tid).state.value != "open"
    assert submit_job(p.state, job(tid, "b", 3, 100), p.open_archive).decision == "deferred"
    (warning,) = [w for w in RotationWarnings().warnings(p, [p.state.get_tenant(tid)])]
    assert warning.kind == "rotation_detected" and warning.actions == ("confirm_rotation",)
    assert warning.details["observed_version"] == rotation.observed_version

    good = tmp_path / "confirmation.json"
    assert (
        invoke(
            "rotation", "confirmation", tid, "--rotation", rotation.rotation_id, "--by", "alice", "--out", str(good)
        ).exit_code
        == 0
    )
    forged = tmp_path / "forged.json"
    obj = json.loads(good.read_text())
    obj["confirmed_by"] = "mallory"
    forged.write_text(json.dumps(obj))
    refused = invoke("confirm-rotation", tid, "--confirmation", str(forged), "--wait")
    assert refused.exit_code == 2 and "does not verify" in refused.output
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.AWAITING
    assert p.keychain.status(tid).l1_generation == 1

    done = invoke("confirm-rotation", tid, "--confirmation", str(good), "--wait")
    assert done.exit_code == 0, done.output
    report = rotate_report(p, p.state.get_run(rotation.run_id))
    assert report["state"] == "completed" and report["confirmed_by"] == "alice"
    assert (report["provider_wraps"], report["provider_unwraps"]) == (1, 1)
    assert report["safe_to_disable_old_version"] is True
    assert p.keychain.status(tid).l1_generation == 2
    new_index = p.index.current_index(tid)
    assert new_index != old_index and tenant_indices(p, tid) == [new_index]
    assert searchable(p, tid) == 15  # 12 + the 3 deferred and replayed
    assert p.state.gate(tid).state.value == "open"
    assert p.state.get_key_version(tid).version == rotation.observed_version
    names = [i.name for i in p.store_for(p.location_of(tid)).list(RECORD_PREFIX)]
    p.keychain.cache.purge(tid)  # read through the provider: the re-wrapped L2 unwraps under the new version
    assert b"".join(p.open_archive(tid).read_object(names[0]))
    assert searchable(p, tid) == 15

    if new_object is not None:
        assert p.state.get_tenant(tid).key_ref == rotation.key_ref == p.keychain.status(tid).l1_ref
        revoke_kmip_object(cli_env, key_ref)  # the customer deactivates the old object: nothing needs it
        p.keychain.cache.purge(tid)
        assert b"".join(p.open_archive(tid).read_object(names[-1]))
        assert searchable(p, tid) == 15

    replay = invoke("confirm-rotation", tid, "--confirmation", str(good), "--wait")
    assert replay.exit_code == 2 and "not awaiting" in replay.output
    shown = json.loads(invoke("rotation", "show", tid, "--json").stdout)
    assert shown[0]["state"] == "completed" and shown[0]["safe_to_disable_old_version"] is True


def test_byok_reupload_on_s3_moves_the_tenant_onto_the_new_material(
    cli_env, flow_platform, new_tenant_id, customer_key, tmp_path
):
    """BYOK re-upload on S3 (LocalStack KMS import): a digest mismatch changes nothing; the
    right upload re-wraps the L2 under the new imported key, rebuilds the index, and only
    then deletes the old key's material."""
    from dataclasses import replace

    from archive_kms import clients
    from archive_kms.crypto.secrets import SecretBytes
    from archive_kms.keys.byok import customer_wrap, sha256_hex
    from archive_kms.state.port import KeyMode

    p = flow_platform
    tid = new_tenant_id()
    old_ref = customer_key("byok", "s3")
    create_tenant(p, tid, cloud="s3", key_ref=old_ref, actor="test")
    p.state.update_tenant(replace(p.state.get_tenant(tid), key_mode=KeyMode.BYOK))  # as `enable --mode byok` leaves it
    assert submit_job(p.state, job(tid, "a", 10, 0), p.open_archive).decision == "run"
    old_index = p.index.current_index(tid)

    out = invoke("byok", "import-params", tid, "--wrapping-key-spec", "RSA_2048", "--out-dir", str(tmp_path), "--json")
    assert out.exit_code == 0, out.output
    params = json.loads(out.stdout)
    wrapped = customer_wrap((tmp_path / "wrapping-key.pem").read_text(), SecretBytes.random(32))  # the customer
    upload_file = tmp_path / "wrapped.bin"
    upload_file.write_bytes(wrapped)

    bad = invoke("byok", "upload", tid, "--file", str(upload_file), "--sha256", "0" * 64, "--wait")
    assert bad.exit_code == 2 and "SHA-256" in bad.output
    assert p.state.find_open_rotation(tid).state is RotationState.DETECTED
    assert p.keychain.status(tid).l1_ref == old_ref
    assert any(r.action == "byok.upload_refused" for r in p.state.iter_audit(tenant_id=tid))

    good = invoke("byok", "upload", tid, "--file", str(upload_file), "--sha256", sha256_hex(wrapped), "--wait")
    assert good.exit_code == 0, good.output
    rotation = p.state.get_rotation(params["rotation_id"])
    assert rotation.state is RotationState.COMPLETED
    report = rotate_report(p, p.state.get_run(rotation.run_id))
    assert (report["provider_wraps"], report["provider_unwraps"]) == (1, 1)
    assert p.keychain.status(tid).l1_ref == params["key_ref"] == p.state.get_tenant(tid).key_ref
    assert p.index.current_index(tid) != old_index and tenant_indices(p, tid) == [p.index.current_index(tid)]
    kms = clients.kms_client(cli_env)
    assert kms.describe_key(KeyId=old_ref.removeprefix("aws-kms://"))["KeyMetadata"]["KeyState"] == "PendingImport"
    p.keychain.cache.purge(tid)
    assert searchable(p, tid) == 10


def test_byok_on_azure_enable_then_reupload_moves_the_tenant_onto_the_new_key(
    cli_env, flow_platform, archived_tenant, customer_key, tmp_path
):
    """BYOK on Azure (Key Vault BYOK import): an Azure tenant is enabled in mode byok on a
    key imported from a .byok file; then the customer re-uploads. A digest mismatch changes
    nothing (tenant readable, rotation still waiting, nothing imported); the right .byok
    file imports a new key, the L2 is re-wrapped under it (1 unwrap + 1 wrap), the index
    rebuilt, and only then the old key is soft-deleted."""
    from azure.core.exceptions import ResourceNotFoundError
    from customer_keys import customer_byok_file

    from archive_kms import clients
    from archive_kms.migration import plan_enable
    from archive_kms.state.port import KeyMode

    p = flow_platform
    archived = archived_tenant("azure", records=10, seed=5)
    tid = archived.tenant_id
    old_ref = customer_key("byok", "azure")
    enabled = run_plan(p, plan_enable(p, tid, "byok", old_ref, cloud="azure", shards=2))
    assert enabled.state == "completed", enabled.error
    assert p.state.get_tenant(tid).key_mode is KeyMode.BYOK and p.keychain.status(tid).l1_ref == old_ref
    old_index = p.index.current_index(tid)
    vault = clients.keyvault_key_client(cli_env)
    name_of = vault_key_name

    out = invoke("byok", "import-params", tid, "--wrapping-key-spec", "RSA_2048", "--out-dir", str(tmp_path), "--json")
    assert out.exit_code == 0, out.output
    params = json.loads(out.output)
    assert (params["key_service"], params["wrapping_algorithm"]) == ("azure-kv", "CKM_RSA_AES_KEY_WRAP")
    assert "import_token" not in params and (tmp_path / "kek-kid.txt").read_text().strip() == params["kek_kid"]
    try:
        # the customer: a new RSA-3072 key, its .byok file made with the customer-side command
        _, _, byok_file, digest = customer_byok_file(tmp_path, tmp_path / "wrapping-key.pem", params["kek_kid"])

        bad = invoke("byok", "upload", tid, "--file", str(byok_file), "--sha256", "0" * 64, "--wait")
        assert bad.exit_code == 2 and "SHA-256" in bad.output
        assert p.state.find_open_rotation(tid).state is RotationState.DETECTED
        assert p.keychain.status(tid).l1_ref == old_ref == p.state.get_tenant(tid).key_ref
        assert any(r.action == "byok.upload_refused" for r in p.state.iter_audit(tenant_id=tid))
        with pytest.raises(ResourceNotFoundError):
            vault.get_key(name_of(params["key_ref"]))  # nothing imported
        p.keychain.cache.purge(tid)
        assert searchable(p, tid) == 10  # still readable under the old key

        good = invoke("byok", "upload", tid, "--file", str(byok_file), "--sha256", digest, "--wait")
        assert good.exit_code == 0, good.output
        rotation = p.state.get_rotation(params["rotation_id"])
        assert rotation.state is RotationState.COMPLETED
        report = rotate_report(p, p.state.get_run(rotation.run_id))
        assert (report["provider_wraps"], report["provider_unwraps"]) == (1, 1)
        assert p.keychain.status(tid).l1_ref == params["key_ref"] == p.state.get_tenant(tid).key_ref
        assert rotation.observed_version == vault.get_key(name_of(params["key_ref"])).properties.version
        assert p.index.current_index(tid) != old_index and tenant_indices(p, tid) == [p.index.current_index(tid)]
        # the old key is retired (soft-deleted, recoverable for the vault's retention), the KEK is gone
        with pytest.raises(ResourceNotFoundError):
            vault.get_key(name_of(old_ref))
        assert vault.get_deleted_key(name_of(old_ref)).name == name_of(old_ref)
        with pytest.raises(ResourceNotFoundError):
            vault.get_key(name_of(params["kek_kid"]))
        assert any(r.action == "byok.old_key_retired" for r in p.state.iter_audit(tenant_id=tid))
        p.keychain.cache.purge(tid)
        assert searchable(p, tid) == 10
        first = archived.records[0]
        assert p.open_archive(tid).read_record(first.workspace_id, first.object_type, first.record_id) == first
    finally:
        delete_vault_keys(vault, [params["key_ref"], old_ref])
