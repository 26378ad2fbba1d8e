"""The platform signing key held by AWS KMS (LocalStack) with the production wiring
(``Platform.from_settings``, the state store on SQLite; ADR 0040): a rotation from the PEM
key to a KMS key keeps what the PEM key signed verifiable; a disabled KMS signing key
fails closed (one line, nothing stored unsigned, and a new process refuses to start);
both settings at once, or a key that cannot sign, are configuration errors. The same for a
Key Vault signing key (the emulator): disabled, verify-only, RSA, or on a foreign host."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_kms import cli, clients
from archive_kms.config import Settings
from archive_kms.crypto.signing import Signer
from archive_kms.errors import ConfigurationError, IntegrityError, KeyUnavailableError
from archive_kms.operations.platform import Platform, platform_signer
from archive_kms.operations.tenants import MANAGED_KEY_REF


@pytest.fixture
def kms_signing_key(localstack: Settings) -> Iterator[Callable[..., tuple[str, str]]]:
    """Creates KMS keys (default: ECC_NIST_P256 / SIGN_VERIFY): (reference, KeyId)."""
    kms = clients.kms_client(localstack)
    made: list[str] = []

    def make(**kwargs: str) -> tuple[str, str]:
        spec = {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY", **kwargs}
        md = kms.create_key(Description="archive-kms signing test", **spec)["KeyMetadata"]
        made.append(md["KeyId"])
        return f"aws-kms://{md['Arn']}", md["KeyId"]

    yield make
    for key_id in made:
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def _counts(db: Path, tenant: str) -> tuple[int, int, int]:
    con = sqlite3.connect(db)
    try:
        records = con.execute("select count(*) from keychain_records where tenant_id=?", (tenant,)).fetchone()[0]
        heads = con.execute("select version from keychain_heads where tenant_id=?", (tenant,)).fetchone()[0]
        audit = con.execute("select count(*) from audit_log").fetchone()[0]
    finally:
        con.close()
    return records, heads, audit


def test_a_rotation_from_the_pem_key_to_a_kms_key_keeps_old_records_verifiable(
    localstack: Settings, kms_signing_key, tmp_path: Path
) -> None:
    pem, previous = tmp_path / "old.pem", tmp_path / "previous.pem"
    old = Signer.create_key_file(pem)
    previous.write_bytes(old.public_key_pem())
    ref, _ = kms_signing_key()
    base = localstack.model_copy(update={"state_url": f"sqlite:///{tmp_path / 'state.db'}"})
    tenant = f"rs{uuid.uuid4().hex[:8]}"

    before = Platform.from_settings(base.model_copy(update={"keychain_signing_key_path": str(pem)}))
    before.keychain.create_tenant(tenant, before.resolve_provider(MANAGED_KEY_REF))
    dek = before.keychain.dek_for_encrypt(tenant, "org1").dek_id
    before.state.close()

    alone = Platform.from_settings(base.model_copy(update={"keychain_signing_key_ref": ref}))
    assert alone.signer is not None and alone.signer.key_id.startswith("ecdsa-p256:")
    with pytest.raises(IntegrityError, match="does not verify|unknown key"):
        alone.keychain.dek_by_id(tenant, dek)  # the KMS key alone does not know the PEM key's records
    alone.state.close()

    rotated = Platform.from_settings(
        base.model_copy(update={"keychain_signing_key_ref": ref, "keychain_previous_public_keys_path": str(previous)})
    )
    assert rotated.signer is not None
    assert len(rotated.keychain.dek_by_id(tenant, dek)) == 32  # records the PEM key signed
    rotated.keychain.dek_for_encrypt(tenant, "org2")  # new commits: signed by KMS
    assert rotated.state.verify_audit().ok  # seals by both keys verify
    assert set(rotated.verifier().key_ids) == {old.key_id, rotated.signer.key_id}
    rotated.state.close()

    # Audit heads name the algorithm of the key that sealed them; a label that disagrees
    # with the trusted key the key id selects is refused, never checked another way.
    con = sqlite3.connect(tmp_path / "state.db")
    seals = set(con.execute("select seal_alg, seal_key_id from audit_heads").fetchall())
    assert ("ecdsa-p256", rotated.signer.key_id) in seals
    con.execute("update audit_heads set seal_alg='ed25519' where seal_key_id=?", (rotated.signer.key_id,))
    con.commit()
    con.close()
    relabelled = Platform.from_settings(
        base.model_copy(update={"keychain_signing_key_ref": ref, "keychain_previous_public_keys_path": str(previous)})
    )
    check = relabelled.state.verify_audit()
    assert not check.ok and "expected ecdsa-p256" in str(check), check
    relabelled.state.close()
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute("update audit_heads set seal_alg='ecdsa-p256' where seal_key_id=?", (rotated.signer.key_id,))
    con.commit()
    con.close()

    again = Platform.from_settings(
        base.model_copy(update={"keychain_signing_key_ref": ref, "keychain_previous_public_keys_path": str(previous)})
    )
    assert len(again.keychain.dek_by_id(tenant, dek)) == 32
    assert again.keychain.dek_for_encrypt(tenant, "org2").dek_id  # the KMS-signed head verifies in a new process
    again.state.close()


def test_a_disabled_kms_signing_key_fails_closed(
    localstack: Settings, kms_signing_key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, key_id = kms_signing_key()
    db = tmp_path / "state.db"
    settings = localstack.model_copy(update={"state_url": f"sqlite:///{db}", "keychain_signing_key_ref": ref})
    tenant = f"rd{uuid.uuid4().hex[:8]}"
    platform = Platform.from_settings(settings)
    platform.keychain.create_tenant(tenant, platform.resolve_provider(MANAGED_KEY_REF))
    platform.keychain.dek_for_encrypt(tenant, "org1")
    stored = _counts(db, tenant)

    clients.kms_client(localstack).disable_key(KeyId=key_id)
    with pytest.raises(KeyUnavailableError) as info:
        platform.keychain.dek_for_encrypt(tenant, "org2")  # a new DEK needs a signed record
    message = str(info.value)
    assert "\n" not in message and "keychain_signing_key_ref" in message and "disabled" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no vendor frames kept
    assert _counts(db, tenant) == stored  # no record, no head, no audit entry written unsigned
    platform.state.close()

    with pytest.raises(KeyUnavailableError, match="keychain_signing_key_ref.*Disabled"):
        Platform.from_settings(settings)  # a new process refuses to start
    monkeypatch.setattr(cli, "_platform", lambda: Platform.from_settings(settings))
    out = CliRunner().invoke(cli.app, ["keychain", "status", tenant])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "keychain_signing_key_ref" in out.output and len(out.output.strip().splitlines()) == 1

    clients.kms_client(localstack).enable_key(KeyId=key_id)
    back = Platform.from_settings(settings)
    back.keychain.dek_for_encrypt(tenant, "org2")  # enabled again: signing resumes
    assert back.state.verify_audit().ok
    back.state.close()


def test_both_settings_or_a_key_that_cannot_sign_are_configuration_errors(
    localstack: Settings, kms_signing_key, tmp_path: Path
) -> None:
    pem = tmp_path / "k.pem"
    Signer.create_key_file(pem)
    ref, _ = kms_signing_key()
    both = localstack.model_copy(update={"keychain_signing_key_path": str(pem), "keychain_signing_key_ref": ref})
    with pytest.raises(ConfigurationError, match="both ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH and .*_REF are set"):
        platform_signer(both)

    symmetric, _ = kms_signing_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
    with pytest.raises(ConfigurationError, match="cannot be the keychain signing key.*KeyUsage is ENCRYPT_DECRYPT"):
        platform_signer(localstack.model_copy(update={"keychain_signing_key_ref": symmetric}))
    p384, _ = kms_signing_key(KeySpec="ECC_NIST_P384")
    with pytest.raises(ConfigurationError, match="KeySpec is ECC_NIST_P384"):
        platform_signer(localstack.model_copy(update={"keychain_signing_key_ref": p384}))
    with pytest.raises(ConfigurationError, match="keychain_signing_key_ref.*aws-kms:// or an azure-kv://"):
        platform_signer(localstack.model_copy(update={"keychain_signing_key_ref": "kmip://127.0.0.1:5696/1"}))
    with pytest.raises(ConfigurationError, match="setting keychain_signing_key_ref: invalid key reference"):
        platform_signer(localstack.model_copy(update={"keychain_signing_key_ref": "aws-kms://nope"}))
    missing = "aws-kms://arn:aws:kms:us-east-1:000000000000:key/00000000-0000-0000-0000-000000000000"
    with pytest.raises(Exception, match="keychain_signing_key_ref.*no such key") as info:
        platform_signer(localstack.model_copy(update={"keychain_signing_key_ref": missing}))
    assert "\n" not in str(info.value)


def test_a_key_vault_signing_key_disabled_or_of_the_wrong_kind_fails_closed(keyvault: Settings) -> None:
    keys = clients.keyvault_key_client(keyvault)
    host_port = str(keyvault.azure_keyvault_url).removeprefix("https://")
    made: list[str] = []

    def new(create: Callable[..., object], **kwargs: object) -> tuple[str, object]:
        name = f"signing-{uuid.uuid4().hex[:10]}"
        key = create(name, **kwargs)
        made.append(name)
        return f"azure-kv://{host_port}/keys/{name}", key

    try:
        ref, key = new(keys.create_ec_key, curve="P-256")
        settings = keyvault.model_copy(update={"keychain_signing_key_ref": ref})
        signer = platform_signer(settings)
        assert signer.key_id.startswith("ecdsa-p256:")
        keys.update_key_properties(key.name, key.properties.version, enabled=False)  # type: ignore[attr-defined]
        with pytest.raises(KeyUnavailableError) as info:
            signer.sign(b"head", purpose="keychain-head/v1")  # the running signer: refused by the vault
        assert "keychain_signing_key_ref" in str(info.value) and "\n" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__context__ is None
        with pytest.raises(KeyUnavailableError, match="keychain_signing_key_ref.*is disabled"):
            platform_signer(settings)  # and a new process does not start

        verify_only, _ = new(keys.create_ec_key, curve="P-256", key_operations=["verify"])
        with pytest.raises(ConfigurationError, match="permitted operations lack sign"):
            platform_signer(keyvault.model_copy(update={"keychain_signing_key_ref": verify_only}))
        rsa, _ = new(keys.create_rsa_key, size=2048)
        with pytest.raises(ConfigurationError, match="its type is RSA"):
            platform_signer(keyvault.model_copy(update={"keychain_signing_key_ref": rsa}))
        elsewhere = "azure-kv://attacker.example.com/keys/signing"
        with pytest.raises(ConfigurationError, match="refusing to send credentials"):
            platform_signer(keyvault.model_copy(update={"keychain_signing_key_ref": elsewhere}))
    finally:
        for name in made:
            keys.begin_delete_key(name).wait()
