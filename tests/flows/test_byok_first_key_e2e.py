"""A tenant's first BYOK key from the CLI, then `enable --mode byok` with the key reference
it printed, on the real services (issue #14): LocalStack KMS with S3, and the Key Vault
emulator with Azure Blob; Elasticsearch; the state store in SQLite.

For each cloud: `byok new-key` makes the key shell and the customer's parameters in an
import folder; the customer wraps (S3: 32 random bytes, RSA-OAEP-SHA-256; Azure: `byok
wrap`, a .byok file of a new RSA-3072 key); `byok import-key` with a wrong digest is
refused and imports nothing; with the right digest it imports, proves the key and prints
the reference; `enable TENANT --mode byok --key-ref <that> --wait` moves the archived
tenant onto it, and every record reads back. No key material in any output.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import secrets_absent, tenant_indices
from customer_keys import customer_byok_file, delete_vault_keys, vault_key_name
from customer_keys import invoke_cli as invoke

from archive_kms import clients
from archive_kms.search import Query
from archive_kms.state.port import KeyMode

pytestmark = pytest.mark.slow


def forms(secret: bytes) -> list[str]:
    """How a secret could show up in text: hex (both cases), base64, base64url."""
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    ]


def assert_no_secret(secret: bytes, texts: list[str]) -> None:
    for text in texts:
        for form in forms(secret):
            assert form not in text, "customer key material in an output"


def reads_back(p, archived) -> None:
    p.keychain.cache.purge(archived.tenant_id)
    archive = p.open_archive(archived.tenant_id)
    for r in archived.records:
        assert archive.read_record(r.workspace_id, r.object_type, r.record_id) == r
    first = archived.records[0]
    word = first.fields["Description"].split()[-1]
    assert first.record_id in {h.record_id for h in archive.search(Query(text=word, limit=100))}


def enable_with(p, tid: str, key_ref: str) -> dict[str, Any]:
    enabled = invoke("enable", tid, "--mode", "byok", "--key-ref", key_ref, "--wait", "--json")
    assert enabled.exit_code == 0, enabled.output
    tenant = p.state.get_tenant(tid)
    assert tenant.key_mode is KeyMode.BYOK and p.keychain.status(tid).l1_ref == key_ref == tenant.key_ref
    assert len(tenant_indices(p, tid)) == 1
    return json.loads(enabled.stdout)


def test_first_byok_key_on_s3_from_the_cli_then_enable(cli_env, flow_platform, archived_tenant, tmp_path):
    p = flow_platform
    archived = archived_tenant("s3", records=10, seed=11)
    tid = archived.tenant_id
    folder = tmp_path / "import"
    kms = clients.kms_client(cli_env)

    made = invoke(
        "byok", "new-key", tid, "--cloud", "s3", "--wrapping-key-spec", "RSA_2048", "--out-dir", folder, "--json"
    )
    assert made.exit_code == 0, made.output
    params = json.loads(made.stdout)
    key_ref = params["key_ref"]
    key_id = key_ref.removeprefix("aws-kms://")
    try:
        check_s3_import(p, kms, archived, folder, tmp_path, params, made)
    finally:
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def check_s3_import(p, kms, archived, folder: Path, tmp_path: Path, params: dict[str, Any], made: Any) -> None:
    from archive_kms.crypto.secrets import SecretBytes
    from archive_kms.keys.byok import customer_wrap, sha256_hex

    tid, key_ref = archived.tenant_id, params["key_ref"]
    key_id = key_ref.removeprefix("aws-kms://")
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert (meta["Origin"], meta["KeyState"]) == ("EXTERNAL", "PendingImport")
    tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]}
    assert tags["archive_kms_tenant"] == tid and tags["archive-kms:purpose"] == "byok"
    assert (folder / "import-token.bin").read_bytes() == base64.b64decode(params["import_token"])
    assert (folder / "wrapping-key.pem").read_text() == params["public_key_pem"]
    assert params["reused"] is False
    again = invoke("byok", "new-key", tid, "--out-dir", folder, "--json")  # same parameters while valid
    assert again.exit_code == 0 and json.loads(again.stdout)["key_ref"] == key_ref
    assert json.loads(again.stdout)["reused"] is True

    # the customer wraps 32 random bytes under the published public key
    material = SecretBytes.random(32)
    raw = material.reveal()  # for the leak check below
    wrapped = customer_wrap((folder / "wrapping-key.pem").read_text(), material)
    upload = tmp_path / "wrapped.bin"
    upload.write_bytes(wrapped)

    bad = invoke("byok", "import-key", tid, "--out-dir", folder, "--file", upload, "--sha256", "0" * 64)
    assert bad.exit_code == 2 and "SHA-256" in bad.output and "Traceback" not in bad.output
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"  # nothing imported
    assert any(r.action == "byok.first_key_refused" for r in p.state.iter_audit(tenant_id=tid))

    good = invoke("byok", "import-key", tid, "--out-dir", folder, "--file", upload, "--sha256", sha256_hex(wrapped))
    assert good.exit_code == 0, good.output
    done = json.loads(
        invoke(
            "byok", "import-key", tid, "--out-dir", folder, "--file", upload, "--sha256", sha256_hex(wrapped), "--json"
        ).stdout
    )  # a retry of the same upload: the same key, proven again, nothing imported twice
    assert done["key_ref"] == key_ref and done["already"] is True and done["sha256"] == sha256_hex(wrapped)
    assert f"--key-ref {key_ref}" in good.stdout
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    assert p.state.get_tenant(tid).key_mode is KeyMode.MANAGED  # importing does not enable

    out = enable_with(p, tid, done["key_ref"])
    reads_back(p, archived)

    # enabled now: a new key is a re-upload
    after = invoke("byok", "new-key", tid, "--out-dir", tmp_path / "other")
    assert after.exit_code == 2 and f"byok import-params {tid}" in after.output
    assert not (tmp_path / "other").exists()

    texts = [made.stdout, again.stdout, bad.output, good.stdout, json.dumps(done), json.dumps(out)]
    texts += [f.read_text(errors="replace") for f in folder.iterdir()]
    assert_no_secret(raw, texts + [json.dumps(r.details) for r in p.state.iter_audit(tenant_id=tid)])
    secrets_absent(p, tid, texts=texts)


def test_first_byok_key_on_azure_from_the_cli_then_enable(cli_env, flow_platform, archived_tenant, tmp_path):
    from azure.core.exceptions import ResourceNotFoundError

    p = flow_platform
    archived = archived_tenant("azure", records=10, seed=13)
    tid = archived.tenant_id
    folder = tmp_path / "import"
    vault = clients.keyvault_key_client(cli_env)
    name_of = vault_key_name

    made = invoke("byok", "new-key", tid, "--wrapping-key-spec", "RSA_2048", "--out-dir", folder, "--json")
    assert made.exit_code == 0, made.output
    params = json.loads(made.stdout)
    key_ref = params["key_ref"]
    assert (params["cloud"], params["key_service"]) == ("azure", "azure-kv")
    assert (folder / "kek-kid.txt").read_text().strip() == params["kek_kid"] and "import_token" not in params
    kek = vault.get_key(name_of(params["kek_kid"]))
    assert kek.key_operations == ["import"] and kek.properties.tags["archive-kms-tenant"] == tid
    try:
        # the customer: a new RSA-3072 key, its .byok file made with the customer-side command
        kek_kid = (folder / "kek-kid.txt").read_text().strip()
        private_der, wrapped, byok_file, digest = customer_byok_file(tmp_path, folder / "wrapping-key.pem", kek_kid)

        bad = invoke("byok", "import-key", tid, "--out-dir", folder, "--file", byok_file, "--sha256", "f" * 64)
        assert bad.exit_code == 2 and "SHA-256" in bad.output and "Traceback" not in bad.output
        with pytest.raises(ResourceNotFoundError):
            vault.get_key(name_of(key_ref))  # nothing imported
        assert vault.get_key(name_of(params["kek_kid"])).key_operations == ["import"]  # the KEK is still there

        good = invoke("byok", "import-key", tid, "--out-dir", folder, "--file", byok_file, "--sha256", digest, "--json")
        assert good.exit_code == 0, good.output
        done = json.loads(good.stdout)
        assert done["key_ref"] == key_ref and done["already"] is False
        assert done["key_version"] == vault.get_key(name_of(key_ref)).properties.version
        with pytest.raises(ResourceNotFoundError):
            vault.get_key(name_of(params["kek_kid"]))  # the KEK was single use

        out = enable_with(p, tid, done["key_ref"])
        reads_back(p, archived)

        texts = [made.stdout, wrapped.stdout, bad.output, good.stdout, json.dumps(out)]
        texts += [f.read_text(errors="replace") for f in folder.iterdir()]
        assert_no_secret(private_der, texts + [json.dumps(r.details) for r in p.state.iter_audit(tenant_id=tid)])
        secrets_absent(p, tid, texts=texts)
    finally:
        delete_vault_keys(vault, [key_ref, params["kek_kid"]])


@pytest.mark.parametrize("cloud", ["s3", "azure"])
def test_expired_parameters_are_refused_and_new_key_renews_them(cli_env, flow_platform, new_tenant_id, tmp_path, cloud):
    """Parameters past their expiry: import-key refuses (nothing imported, says to run
    new-key); new-key on the same folder makes new ones (AWS: for the same key, still
    pending import; Key Vault: a new key exchange key, the expired one deleted), and the
    customer's new upload for them imports."""
    from azure.core.exceptions import ResourceNotFoundError
    from customer_keys import rsa_private_key_der

    from archive_kms.crypto.secrets import SecretBytes
    from archive_kms.keys.azure_byok import customer_transfer_blob
    from archive_kms.keys.byok import customer_wrap, sha256_hex
    from archive_kms.operations.tenants import create_tenant

    p = flow_platform
    tid = new_tenant_id()
    create_tenant(p, tid, cloud=cloud, actor="test")
    folder = tmp_path / "import"
    first = json.loads(
        invoke("byok", "new-key", tid, "--wrapping-key-spec", "RSA_2048", "--out-dir", folder, "--json").stdout
    )
    made = [first["key_ref"]] + ([first["kek_kid"]] if cloud == "azure" else [])
    vault = clients.keyvault_key_client(cli_env) if cloud == "azure" else None
    kms = clients.kms_client(cli_env)
    name_of = vault_key_name

    def upload_for(params: dict[str, Any]) -> Path:
        if cloud == "azure":
            data = customer_transfer_blob(params["public_key_pem"], params["kek_kid"], rsa_private_key_der(3072))
        else:
            data = customer_wrap(params["public_key_pem"], SecretBytes.random(32))
        path = tmp_path / f"upload-{sha256_hex(data)[:8]}"
        path.write_bytes(data)
        return path

    try:
        state = json.loads((folder / "import-state.json").read_text())
        (folder / "import-state.json").write_text(json.dumps({**state, "expires_at": "2020-01-01T00:00:00+00:00"}))
        stale = upload_for(first)
        refused = invoke(
            "byok", "import-key", tid, "--out-dir", folder, "--file", stale, "--sha256", sha256_hex(stale.read_bytes())
        )
        assert refused.exit_code == 2 and "expired at 2020-01-01" in refused.output
        assert f"archive-kms byok new-key {tid} --out-dir {folder}" in refused.output
        if cloud == "s3":
            key_id = first["key_ref"].removeprefix("aws-kms://")
            assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"
        else:
            with pytest.raises(ResourceNotFoundError):
                vault.get_key(name_of(first["key_ref"]))

        renewed = json.loads(invoke("byok", "new-key", tid, "--out-dir", folder, "--json").stdout)
        assert renewed["reused"] is False and renewed["expires_at"] > "2026"
        if cloud == "s3":
            assert renewed["key_ref"] == first["key_ref"]  # the same key shell, new import parameters
        else:
            made += [renewed["key_ref"], renewed["kek_kid"]]
            assert renewed["key_ref"] != first["key_ref"] and renewed["kek_kid"] != first["kek_kid"]
            with pytest.raises(ResourceNotFoundError):
                vault.get_key(name_of(first["kek_kid"]))  # the expired key exchange key is deleted
        fresh = upload_for(renewed)
        good = invoke(
            "byok", "import-key", tid, "--out-dir", folder, "--file", fresh, "--sha256", sha256_hex(fresh.read_bytes()),
            "--json",
        )  # fmt: skip
        assert good.exit_code == 0, good.output
        assert json.loads(good.stdout)["key_ref"] == renewed["key_ref"]
    finally:
        if cloud == "s3":
            for ref in made:
                kms.schedule_key_deletion(KeyId=ref.removeprefix("aws-kms://"), PendingWindowInDays=7)
        else:
            delete_vault_keys(vault, made)
