"""The keychain over each L1 backend: the in-memory KMS and the real LocalStack KMS
(keys/aws_kms.py, resolved through keys/registry.py exactly as production resolves it).

The same tests run against both, so the fake earns its place in the unit tests: rotating
the L1 costs one unwrap and one wrap; a disabled L1 makes ``dek_by_id`` fail once the cache
no longer holds the key; ``restore`` refuses while the L1 is disabled; and the L1 wrap
context refuses another tenant's L2 even when the record carries a valid signature.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from archive_kms import clients
from archive_kms.crypto.envelope import ObjectBinding, decrypt_to_bytes, encrypt_bytes
from archive_kms.crypto.signing import Signer
from archive_kms.errors import KeyUnavailableError, WrongKeyError
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import Keychain
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.keys.keychain_store import InMemoryKeychainStore
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.registry import KeyProviderRegistry


class MemoryL1:
    name = "memory"

    def __init__(self, settings) -> None:
        self.kms = MemoryKms()
        self.registry = KeyProviderRegistry(settings, defaults=False)
        self.registry.register("memory", self.kms.factory)

    def new_key(self) -> str:
        return self.kms.create_key(f"l1-{uuid.uuid4().hex[:12]}")

    def disable(self, ref: str) -> None:
        self.kms.disable(ref.removeprefix("memory://"))

    def enable(self, ref: str) -> None:
        self.kms.enable(ref.removeprefix("memory://"))

    def cleanup(self) -> None:
        pass


class LocalStackKmsL1:
    name = "aws-kms"

    def __init__(self, settings) -> None:
        self.client = clients.kms_client(settings)
        self.registry = KeyProviderRegistry(settings)
        self.arns: list[str] = []

    def new_key(self) -> str:
        md = self.client.create_key(Description=f"archive_kms keychain contract {uuid.uuid4()}")["KeyMetadata"]
        self.arns.append(md["Arn"])
        return f"aws-kms://{md['Arn']}"

    def disable(self, ref: str) -> None:
        self.client.disable_key(KeyId=ref.removeprefix("aws-kms://"))

    def enable(self, ref: str) -> None:
        self.client.enable_key(KeyId=ref.removeprefix("aws-kms://"))

    def cleanup(self) -> None:
        for arn in self.arns:
            self.client.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)


@pytest.fixture(params=["memory", "aws-kms"])
def l1(request, settings):
    if request.param == "aws-kms":
        backend = LocalStackKmsL1(request.getfixturevalue("localstack"))
    else:
        backend = MemoryL1(settings)
    yield backend
    backend.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def world(l1):
    store, signer, clock = InMemoryKeychainStore(), Signer.generate(), FakeClock()

    def keychain() -> Keychain:
        return Keychain(store, l1.registry.resolve, signer, clock, KeyCache(ttl_seconds=60, clock=clock))

    return store, signer, clock, keychain


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_round_trip_and_rotate_l1_costs_one_unwrap_one_wrap(l1, world) -> None:
    store, _, clock, keychain = world
    kc, tenant = keychain(), _tenant()
    old_ref = l1.new_key()
    kc.create_tenant(tenant, l1.registry.resolve(old_ref))
    blobs = []
    for hour in range(5):
        dek = kc.dek_for_encrypt(tenant, "org-1", now=clock.t + hour * 3600)
        binding = ObjectBinding(tenant, "org-1", f"obj/{hour}".encode())
        blobs.append((binding, encrypt_bytes(b"data %d" % hour, dek=dek.key, dek_id=dek.dek_id, binding=binding)))

    new_ref = l1.new_key()
    before = kc.provider_calls
    kc.rotate_l1(tenant, l1.registry.resolve(new_ref))
    delta = kc.provider_calls - before
    assert (delta.unwrap, delta.wrap) == (1, 1)
    assert store.get_record(tenant, "l2/1").parent_id == new_ref

    l1.disable(old_ref)  # nothing depends on the old L1 any more
    fresh = keychain()
    for hour, (binding, blob) in enumerate(blobs):
        assert decrypt_to_bytes(blob, binding=binding, dek_for=fresh.dek_for_header) == b"data %d" % hour


def test_disabled_l1_makes_dek_by_id_fail_after_cache_purge(l1, world) -> None:
    _, _, clock, keychain = world
    kc, tenant = keychain(), _tenant()
    ref = l1.new_key()
    kc.create_tenant(tenant, l1.registry.resolve(ref))
    dek = kc.dek_for_encrypt(tenant, "org-1")

    l1.disable(ref)
    assert kc.dek_by_id(tenant, dek.dek_id) == dek.key  # cached, for at most the TTL
    kc.cache.purge(tenant)
    with pytest.raises(KeyUnavailableError) as info:
        kc.dek_by_id(tenant, dek.dek_id)
    assert info.value.state == "disabled" and not info.value.retryable

    # same after TTL expiry in another process that had the key cached
    l1.enable(ref)
    other = keychain()
    other.dek_by_id(tenant, dek.dek_id)
    l1.disable(ref)
    clock.t += 61
    with pytest.raises(KeyUnavailableError):
        other.dek_by_id(tenant, dek.dek_id)

    # restore is refused while the L1 is disabled, and works once it is back
    kc.revoke(tenant)
    with pytest.raises(KeyUnavailableError):
        kc.restore(tenant)
    l1.enable(ref)
    kc.restore(tenant)
    assert keychain().dek_by_id(tenant, dek.dek_id) == dek.key


def test_l1_context_refuses_another_tenants_l2_even_if_validly_signed(l1, world) -> None:
    # An insider holding the signing key re-signs tenant B's wrapped L2 into tenant A's
    # record: the L1 wrap context {"tenant": A} still refuses it.
    store, signer, _, keychain = world
    kc, a, b = keychain(), _tenant(), _tenant()
    ref = l1.new_key()
    kc.create_tenant(a, l1.registry.resolve(ref))
    kc.create_tenant(b, l1.registry.resolve(ref))
    dek = kc.dek_for_encrypt(a, "org-1")

    rec_a, rec_b = store.get_record(a, "l2/1"), store.get_record(b, "l2/1")
    forged = RecordChecks(store, signer, signer.verifier()).sign_record(
        replace(rec_a, wrapped=rec_b.wrapped, wrap_ref=rec_b.wrap_ref)
    )
    store.records[(a, "l2/1")] = forged.to_json()
    with pytest.raises(WrongKeyError):
        keychain().dek_by_id(a, dek.dek_id)
