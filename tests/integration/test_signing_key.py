"""The platform signing key (issue 11 finding 8), with the production wiring
(``Platform.from_settings``: LocalStack KMS for the managed key, the state store on
SQLite): a missing key is a configuration error outside the local stack (no worker signs
with a key of its own making), and a rotated key still verifies what the old one signed
once the old public key is listed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.crypto.signing import Signer
from archive_kms.errors import ConfigurationError, IntegrityError
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import MANAGED_KEY_REF


def test_a_worker_without_a_signing_key_refuses_to_start(localstack, tmp_path: Path, monkeypatch) -> None:
    # A worker host: no endpoints file (not the local stack), no key configured.
    monkeypatch.setenv("ARCHIVE_KMS_STACK_DIR", str(tmp_path / "host"))
    monkeypatch.setenv("ARCHIVE_KMS_ENDPOINTS_FILE", str(tmp_path / "host" / "endpoints.json"))
    settings = localstack.model_copy(
        update={"state_url": f"sqlite:///{tmp_path / 'state.db'}", "keychain_signing_key_path": None}
    )
    with pytest.raises(ConfigurationError, match="no platform signing key: set ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH"):
        Platform.from_settings(settings)
    assert not (tmp_path / "host" / "keychain-signing.pem").exists()  # nothing made up

    monkeypatch.setattr(cli, "_platform", lambda: Platform.from_settings(settings))
    out = CliRunner().invoke(cli.app, ["keychain", "status", "acme"])
    assert out.exit_code == 2 and "no platform signing key" in out.output and "Traceback" not in out.output

    # A development setup may say so explicitly: then a key is made once and kept.
    dev = settings.model_copy(update={"keychain_signing_key_autocreate": True})
    first = Platform.from_settings(dev)
    again = Platform.from_settings(dev)
    assert first.signer is not None and again.signer is not None and first.signer.key_id == again.signer.key_id
    first.state.close()
    again.state.close()


def test_a_rotated_signing_key_still_verifies_what_the_old_one_signed(localstack, tmp_path: Path) -> None:
    old_pem, new_pem, previous = tmp_path / "old.pem", tmp_path / "new.pem", tmp_path / "previous.pem"
    old = Signer.create_key_file(old_pem)
    Signer.create_key_file(new_pem)
    previous.write_bytes(old.public_key_pem())
    base = localstack.model_copy(update={"state_url": f"sqlite:///{tmp_path / 'state.db'}"})
    tenant = f"sk{uuid.uuid4().hex[:8]}"

    before = Platform.from_settings(base.model_copy(update={"keychain_signing_key_path": str(old_pem)}))
    before.keychain.create_tenant(tenant, before.resolve_provider(MANAGED_KEY_REF))
    dek = before.keychain.dek_for_encrypt(tenant, "org1").dek_id
    before.state.close()

    # The new key alone does not know the old records: refused, never accepted.
    alone = Platform.from_settings(base.model_copy(update={"keychain_signing_key_path": str(new_pem)}))
    with pytest.raises(IntegrityError, match="does not verify|unknown key"):
        alone.keychain.dek_by_id(tenant, dek)
    alone.state.close()

    # The rotation: the new key signs, the old public key is listed and verifies by key id.
    rotated = Platform.from_settings(
        base.model_copy(
            update={"keychain_signing_key_path": str(new_pem), "keychain_previous_public_keys_path": str(previous)}
        )
    )
    assert rotated.signer is not None and rotated.signer.key_id != old.key_id
    assert len(rotated.keychain.dek_by_id(tenant, dek)) == 32  # unwrapped through records the old key signed
    rotated.keychain.dek_for_encrypt(tenant, "org2")  # new commits are signed by the new key
    assert rotated.state.verify_audit().ok
    assert set(rotated.verifier().key_ids) == {old.key_id, rotated.signer.key_id}
    rotated.state.close()
