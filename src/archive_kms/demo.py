"""The main job, end to end, on the local cloud (`make demo`).

Today: every service answers through the project's wiring (S3 and KMS on LocalStack,
Blob on Azurite, Elasticsearch, Key Vault, the KMIP HSM), with a report. Later issues
extend this into the full onboarding demo (archive, enable per mode, rotate, revoke,
remove).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from archive_kms import wiring
from archive_kms.config import Settings


def _s3(settings: Settings) -> str:
    s3 = wiring.aws_client("s3", settings)
    bucket = f"demo-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="hello", Body=b"hello")
    ok = s3.get_object(Bucket=bucket, Key="hello")["Body"].read() == b"hello"
    s3.delete_object(Bucket=bucket, Key="hello")
    s3.delete_bucket(Bucket=bucket)
    return "put/get round trip" if ok else "MISMATCH"


def _kms(settings: Settings) -> str:
    kms = wiring.aws_client("kms", settings)
    key = kms.create_key(Description="archive-kms demo")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"tenant": "demo"})["CiphertextBlob"]
    kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "demo"})
    kms.disable_key(KeyId=key)
    try:
        kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "demo"})
        return "DISABLED KEY STILL DECRYPTS"
    except Exception as e:  # noqa: BLE001 - we report the vendor's verdict
        return f"encrypt/decrypt; disabled key refused ({type(e).__name__})"
    finally:
        kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)


def _blob(settings: Settings) -> str:
    svc = wiring.blob_service_client(settings)
    c = svc.create_container(f"demo-{uuid.uuid4().hex[:10]}")
    c.upload_blob("hello", b"hello")
    ok = c.download_blob("hello").readall() == b"hello"
    c.delete_container()
    return "upload/download round trip" if ok else "MISMATCH"


def _es(settings: Settings) -> str:
    es = wiring.elasticsearch_client(settings)
    idx = f"demo-{uuid.uuid4().hex[:10]}"
    es.index(index=idx, id="1", document={"t": "hello archive"}, refresh=True)
    n = es.count(index=idx, query={"match": {"t": "archive"}})["count"]
    es.indices.delete(index=idx)
    return f"index/search ({n} hit)"


def _kv(settings: Settings) -> str:
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

    kc = wiring.keyvault_key_client(settings)
    key = kc.create_rsa_key(f"demo-{uuid.uuid4().hex[:10]}", size=2048,
                            key_operations=["wrapKey", "unwrapKey", "encrypt", "decrypt"])
    cc = CryptographyClient(key.id, wiring.keyvault_credential(settings), **wiring.keyvault_client_kwargs(settings))
    secret = os.urandom(32)
    w = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, secret).encrypted_key
    ok = cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w).key == secret
    kc.begin_delete_key(key.name).wait()
    kc.purge_deleted_key(key.name)
    return "wrapKey/unwrapKey RSA-OAEP-256" if ok else "MISMATCH"


def _kmip(settings: Settings) -> str:
    from kmip import enums

    with wiring.kmip_client(settings) as c:
        uid = c.create(enums.CryptographicAlgorithm.AES, 256)
        c.activate(uid)
        p = {"block_cipher_mode": enums.BlockCipherMode.CBC, "padding_method": enums.PaddingMethod.PKCS5,
             "cryptographic_algorithm": enums.CryptographicAlgorithm.AES}
        iv = os.urandom(16)
        ct, _ = c.encrypt(b"hello", uid=uid, cryptographic_parameters=p, iv_counter_nonce=iv)
        ok = c.decrypt(ct, uid=uid, cryptographic_parameters=p, iv_counter_nonce=iv) == b"hello"
        c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid=uid)
    return "encrypt/decrypt inside the HSM" if ok else "MISMATCH"


CHECKS: list[tuple[str, Callable[[Settings], str]]] = [
    ("S3 (LocalStack)", _s3), ("KMS (LocalStack)", _kms), ("Blob (Azurite)", _blob),
    ("Elasticsearch", _es), ("Key Vault", _kv), ("KMIP HSM (PyKMIP)", _kmip),
]


def _archive_demo(console: Console, settings: Settings) -> int:
    """Tenants on S3 and Azure: archived, searched, read back, paused with jobs deferred
    and replayed once, revoked, and the audit chain verified."""
    from archive_kms.operations.archive import JobSpec, replay_deferred, submit_job
    from archive_kms.operations.tenants import create_tenant
    from archive_kms.search import Query
    from archive_kms.synthetic import generate_records

    platform = wiring.build_platform(settings)
    run = uuid.uuid4().hex[:6]
    table = Table(title="archive_kms: tenants archived and searched")
    for col in ("tenant", "cloud", "location", "records", "objects", "search 'invoice'", "read back", "deferred→replayed"):
        table.add_column(col)
    failed = 0
    for cloud in ("s3", "azure"):
        tenant = f"demo{cloud[:2]}{run}"
        created = create_tenant(platform, tenant, cloud=cloud, actor="demo")
        job = JobSpec(f"{tenant}-j1", tenant, "synthetic", synthetic={"count": 40, "seed": 1})
        out = submit_job(platform.state, job, platform.open_archive)
        archive = platform.open_archive(tenant)
        hits = archive.search(Query(text="invoice"))
        record, _ = next(iter(generate_records(tenant, 1, seed=1)))
        same = archive.read_record(record.workspace_id, record.object_type, record.record_id) == record
        platform.state.pause(tenant, f"demo-{run}")
        deferred = submit_job(platform.state, JobSpec(f"{tenant}-j2", tenant, "synthetic",
                                                      synthetic={"count": 10, "seed": 1, "offset": 40}),
                              platform.open_archive)
        replayed = replay_deferred(platform.state, tenant, f"demo-{run}", platform.open_archive)
        ok = same and deferred.decision == "deferred" and [o.job_id for o in replayed] == [f"{tenant}-j2"]
        failed += not ok
        table.add_row(tenant, cloud, created.location, str(out.records), str(out.objects_written),
                      f"{hits.total} hits", "identical" if same else "MISMATCH",
                      f"{deferred.decision} → {len(replayed)} replayed")
    console.print(table)
    audit = platform.state.verify_audit()
    console.print(f"audit chain: {'verifies' if audit.ok else 'BROKEN: ' + str(audit.reason)}")
    return failed + (not audit.ok)


def main() -> int:
    console = Console(width=max(140, Console().width))
    settings = Settings()
    table = Table(title="archive_kms local cloud")
    for col in ("service", "result", "ms"):
        table.add_column(col)
    failed = 0
    for name, check in CHECKS:
        t0 = time.perf_counter()
        try:
            result = check(settings)
        except Exception as e:  # noqa: BLE001 - the demo reports every failure and goes on
            result, failed = f"FAILED: {type(e).__name__}: {e}", failed + 1
        table.add_row(name, result, f"{(time.perf_counter() - t0) * 1000:.0f}")
    console.print(table)
    failed += _archive_demo(console, settings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
