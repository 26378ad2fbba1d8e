"""One smoke test per service: the real server answers through the official client,
and the key services enforce key state (a disabled/revoked key refuses to decrypt)."""

from __future__ import annotations

import os
import uuid

import pytest
from botocore.exceptions import ClientError

from archive_kms import clients


def test_localstack_s3_put_get(localstack):
    s3 = clients.aws_client("s3", localstack)
    bucket = f"smoke-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(4096)
    s3.put_object(Bucket=bucket, Key="a/b.bin", Body=body)
    assert s3.get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == body
    s3.delete_object(Bucket=bucket, Key="a/b.bin")
    s3.delete_bucket(Bucket=bucket)


def test_localstack_kms_encrypt_decrypt_and_disable_refuses(localstack):
    kms = clients.aws_client("kms", localstack)
    key_id = kms.create_key(Description="smoke")["KeyMetadata"]["KeyId"]
    ctx = {"tenant": "smoke"}
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"smoke", EncryptionContext=ctx)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"] == b"smoke"
    kms.disable_key(KeyId=key_id)
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    assert exc.value.response["Error"]["Code"] == "DisabledException"
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def test_azurite_blob_upload_download(azurite):
    svc = clients.blob_service_client(azurite)
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    container = svc.create_container(name)
    body = os.urandom(8192)
    container.upload_blob("x/y.bin", body)
    assert container.download_blob("x/y.bin").readall() == body
    container.delete_container()


def test_elasticsearch_index_search(elasticsearch):
    es = clients.elasticsearch_client(elasticsearch)
    index = f"smoke-{uuid.uuid4().hex[:12]}"
    es.index(index=index, id="1", document={"body": "quarterly invoice archive"}, refresh=True)
    hits = es.search(index=index, query={"match": {"body": "invoice"}})["hits"]
    assert hits["total"]["value"] == 1 and hits["hits"][0]["_id"] == "1"
    es.indices.delete(index=index)


def test_keyvault_wrap_unwrap_and_disable_refuses(keyvault):
    from azure.core.exceptions import HttpResponseError
    from azure.keyvault.keys import KeyOperation
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

    kc = clients.keyvault_key_client(keyvault)
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    ops = [KeyOperation.wrap_key, KeyOperation.unwrap_key, KeyOperation.encrypt, KeyOperation.decrypt]
    key = kc.create_rsa_key(name, size=2048, key_operations=ops)
    crypto = CryptographyClient(
        key.id, clients.keyvault_credential(keyvault), **clients.keyvault_client_kwargs(keyvault)
    )
    secret = os.urandom(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, secret).encrypted_key
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == secret
    kc.update_key_properties(name, key.properties.version, enabled=False)
    with pytest.raises(HttpResponseError) as exc:
        crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert exc.value.status_code == 403
    kc.begin_delete_key(name).wait()
    kc.purge_deleted_key(name)


def test_kmip_encrypt_decrypt_inside_server_and_revoke_refuses(kmip):
    from kmip import enums
    from kmip.core.factories import attributes  # noqa: F401 - ensures the client package is complete
    from kmip.pie.exceptions import KmipOperationFailure

    client = clients.kmip_client(kmip)
    with client:
        uid = client.create(enums.CryptographicAlgorithm.AES, 256, name=f"smoke-{uuid.uuid4().hex[:8]}")
        client.activate(uid)
        params = {
            "block_cipher_mode": enums.BlockCipherMode.CBC,
            "padding_method": enums.PaddingMethod.PKCS5,
            "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
        }
        iv = os.urandom(16)
        ct, _ = client.encrypt(b"smoke-plaintext", uid=uid, cryptographic_parameters=params, iv_counter_nonce=iv)
        assert ct != b"smoke-plaintext"
        pt = client.decrypt(ct, uid=uid, cryptographic_parameters=params, iv_counter_nonce=iv)
        assert pt == b"smoke-plaintext"
        client.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid=uid, revocation_message="smoke")
        with pytest.raises(KmipOperationFailure) as exc:
            client.decrypt(ct, uid=uid, cryptographic_parameters=params, iv_counter_nonce=iv)
        assert exc.value.status == enums.ResultStatus.OPERATION_FAILED
        assert exc.value.reason == enums.ResultReason.PERMISSION_DENIED
