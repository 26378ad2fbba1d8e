"""Production wiring (``Platform.from_settings``) audits keychain commits and refuses a
rolled-back keychain in a fresh process: the platform's managed key in LocalStack KMS, the
state store on SQLite, the attacker editing the database file with plain sqlite3
(security review PoC 1a, end to end)."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from archive_kms.crypto.signing import Verifier
from archive_kms.errors import KeychainTamperedError, KeyDestroyedError
from archive_kms.keys.keychain import ErasureRecord
from archive_kms.operations.platform import Platform, platform_signer
from archive_kms.operations.tenants import MANAGED_KEY_REF

HOUR = 3600


def test_build_platform_audits_erasure_and_a_fresh_process_refuses_the_old_keychain(localstack, tmp_path: Path):
    db = tmp_path / "state.db"
    settings = localstack.model_copy(update={"state_url": f"sqlite:///{db}"})
    tenant = f"rb{uuid.uuid4().hex[:8]}"
    platform = Platform.from_settings(settings)
    kc = platform.keychain
    kc.create_tenant(tenant, platform.resolve_provider(MANAGED_KEY_REF))  # 1 wrap by LocalStack KMS
    t0 = 1_700_000_000.0
    old_dek = kc.dek_for_encrypt(tenant, "org1", now=t0).dek_id

    con = sqlite3.connect(db)
    heads = con.execute("select * from keychain_heads where tenant_id=?", (tenant,)).fetchall()
    recs = con.execute("select * from keychain_records where tenant_id=?", (tenant,)).fetchall()
    con.close()

    kc.dek_for_encrypt(tenant, "org1", now=t0 + 3 * HOUR)
    erased = kc.erase_buckets(tenant, "org1", t0 + 3 * HOUR)
    assert erased.dek_ids == (old_dek,)
    other = Platform.from_settings(settings)
    with pytest.raises(KeyDestroyedError):
        other.keychain.dek_by_id(tenant, old_dek)
    other.state.close()

    logged = [r for r in platform.state.iter_audit(tenant_id=tenant) if r.action.startswith("keychain.")]
    assert [r.action for r in logged] == ["keychain.create", "keychain.erase"]
    record = ErasureRecord.from_json(logged[1].details["erasure_record"])
    record.verify(Verifier.from_public_pem(platform_signer(settings).public_key_pem()))
    assert record == erased

    con = sqlite3.connect(db)
    con.execute("delete from keychain_heads where tenant_id=?", (tenant,))
    con.execute("delete from keychain_records where tenant_id=?", (tenant,))
    con.executemany(f"insert into keychain_heads values ({','.join('?' * len(heads[0]))})", heads)
    con.executemany(f"insert into keychain_records values ({','.join('?' * len(recs[0]))})", recs)
    con.commit()
    con.close()
    fresh = Platform.from_settings(settings)  # a new CLI call or worker
    with pytest.raises(
        KeychainTamperedError,
        match=f"keychain of tenant {tenant} is at version 2 but the audit "
        f"log recorded version {erased.head_version}: rolled back",
    ):
        fresh.keychain.dek_by_id(tenant, old_dek)
    platform.state.close()
    fresh.state.close()
