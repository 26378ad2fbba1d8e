"""Wrap/unwrap latency per key provider against the local services, and each adapter's
overhead as a ratio to the raw SDK call it makes (same service, same run).

    .venv/bin/python bench/bench_key_providers.py [--n 100]

Needs `archive-kms stack up`. Creates one key per backend (unique names) and removes it.
Prints p50/p95 in milliseconds and the ratio adapter-p50 / raw-SDK-p50:

* aws-kms:  AwsKmsKeyProvider.wrap/unwrap vs kms.encrypt/decrypt with the same context
* azure-kv: AzureKeyVaultKeyProvider (GET + server-side wrapKey; unwrapKey) vs
            CryptographyClient.unwrap_key on the same version (wrap: raw wrapkey POST)
* kmip:     KmipKeyProvider (persistent TLS connection) vs a PyKMIP GCM Encrypt/Decrypt on
            an already-open connection
* memory:   the in-process fake (no raw peer)
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.registry import KeyProviderRegistry

CTX = {"tenant": "bench"}


def timed(fn: Callable[[], object], n: int) -> list[float]:
    fn()  # warm-up: connections, first GET
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def report(name: str, op: str, ours: list[float], raw: list[float] | None) -> None:
    ratio = f"{p(ours, 50) / p(raw, 50):5.2f}x" if raw else "   - "
    raw_text = f"{p(raw, 50):7.2f}" if raw else "      -"
    print(
        f"{name:9} {op:7} p50 {p(ours, 50):7.2f} ms  p95 {p(ours, 95):7.2f} ms   raw p50 {raw_text} ms  ratio {ratio}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    n = parser.parse_args().n
    s = Settings()
    registry = KeyProviderRegistry(s)
    secret = SecretBytes.random(32)

    # memory
    kms_mem = MemoryKms()
    mem = kms_mem.provider(kms_mem.create_key("bench"))
    w = mem.wrap(secret, context=CTX)
    report("memory", "wrap", timed(lambda: mem.wrap(secret, context=CTX), n), None)
    report("memory", "unwrap", timed(lambda: mem.unwrap(w, context=CTX), n), None)

    # aws-kms (LocalStack)
    kms = clients.kms_client(s)
    arn = kms.create_key(Description="bench")["KeyMetadata"]["Arn"]
    try:
        aws = registry.resolve(f"aws-kms://{arn}")
        w = aws.wrap(secret, context=CTX)
        raw_w = timed(lambda: kms.encrypt(KeyId=arn, Plaintext=secret.reveal(), EncryptionContext=CTX), n)
        report("aws-kms", "wrap", timed(lambda: aws.wrap(secret, context=CTX), n), raw_w)
        raw_u = timed(lambda: kms.decrypt(KeyId=arn, CiphertextBlob=w.ciphertext, EncryptionContext=CTX), n)
        report("aws-kms", "unwrap", timed(lambda: aws.unwrap(w, context=CTX), n), raw_u)
    finally:
        kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)

    # azure-kv (emulator)
    from azure.core.rest import HttpRequest
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm

    kc = clients.keyvault_key_client(s)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    key = kc.create_rsa_key(name, size=2048, key_operations=["wrapKey", "unwrapKey"])
    try:
        kv = registry.resolve(f"azure-kv://{s.azure_keyvault_url.removeprefix('https://')}/keys/{name}")
        w = kv.wrap(secret, context=CTX)
        body = {"alg": "RSA-OAEP-256", "value": "A" * 64}
        path = f"/keys/{name}/{key.properties.version}/wrapkey"
        raw_w = timed(lambda: kc.send_request(HttpRequest("POST", path, json=body)), n)
        report("azure-kv", "wrap", timed(lambda: kv.wrap(secret, context=CTX), n), raw_w)
        cc = clients.keyvault_crypto_client(key.id, s)
        raw_u = timed(lambda: cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.ciphertext), n)
        report("azure-kv", "unwrap", timed(lambda: kv.unwrap(w, context=CTX), n), raw_u)
    finally:
        kc.begin_delete_key(name).wait()
        kc.purge_deleted_key(name)

    # kmip (PyKMIP server)
    from kmip.core import enums
    from kmip.core.messages import payloads

    from archive_kms.keys.kmip import _gcm_parameters

    admin = clients.kmip_client(s)
    with admin:
        uid = admin.create(enums.CryptographicAlgorithm.AES, 256, name=f"bench-{uuid.uuid4().hex[:6]}")
        admin.activate(uid)
        admin.kmip_version = enums.KMIPVersion.KMIP_1_4
        hsm = registry.resolve(f"kmip://{s.kmip_host}:{s.kmip_port}/{uid}")
        w = hsm.wrap(secret, context=CTX)
        nonce = w.ciphertext[:12]

        def raw_encrypt():
            return admin.proxy.send_request_payload(
                enums.Operation.ENCRYPT,
                payloads.EncryptRequestPayload(
                    unique_identifier=uid,
                    cryptographic_parameters=_gcm_parameters(),
                    data=secret.reveal(),
                    iv_counter_nonce=nonce,
                    auth_additional_data=b"x",
                ),
            )

        enc = raw_encrypt()

        def raw_decrypt():
            return admin.proxy.send_request_payload(
                enums.Operation.DECRYPT,
                payloads.DecryptRequestPayload(
                    unique_identifier=uid,
                    cryptographic_parameters=_gcm_parameters(),
                    data=enc.data,
                    iv_counter_nonce=nonce,
                    auth_additional_data=b"x",
                    auth_tag=enc.auth_tag,
                ),
            )

        report("kmip", "wrap", timed(lambda: hsm.wrap(secret, context=CTX), n), timed(raw_encrypt, n))
        report("kmip", "unwrap", timed(lambda: hsm.unwrap(w, context=CTX), n), timed(raw_decrypt, n))
        hsm.close()
        admin.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        admin.destroy(uid)


if __name__ == "__main__":
    main()
