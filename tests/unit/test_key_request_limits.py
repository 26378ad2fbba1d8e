"""Requests to the key services pass a limiter per quota domain (``keys.limits``, issue
#19): which quota a key reference draws on, that every call reaching the service is
charged exactly once before it is made, and that a whole onboarding run makes a number of
L1 requests that does not grow with the number of objects (the key caches), which is what
keeps a fleet under the KMS / Key Vault quotas (docs/capacity.md)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import KeyThrottledError
from archive_kms.keys.limits import LimitedKeyProvider, QuotaDomain, limit_provider, quota_domain, rate_for
from archive_kms.keys.memory import MemoryKeyProvider, MemoryKms
from archive_kms.keys.refs import parse_key_ref
from archive_kms.keys.registry import KeyProviderRegistry
from archive_kms.migration import execute, plan_enable, thread_shard_runner, trigger
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant

ARN = "arn:aws:kms:us-east-1:111122223333:key/0b5e8f3a-1111-2222-3333-444455556666"


class CountingLimiter:
    """Admits everything and counts what it admitted, per domain."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, domain: QuotaDomain, requests: int = 1) -> None:
        with self._lock:
            self.counts[domain.name] += requests


class RefusingLimiter:
    def acquire(self, domain: QuotaDomain, requests: int = 1) -> None:
        raise KeyThrottledError(f"rate limit of {domain} not granted in time", resource=domain.name)


@pytest.mark.parametrize(
    "ref,domain",
    [
        (f"aws-kms://{ARN}", "aws-kms:us-east-1:platform"),
        ("aws-kms://arn:aws:kms:us-west-2:444455556666:alias/customer", "aws-kms:us-west-2:platform"),
        ("aws-kms://alias/ours", "aws-kms:us-east-1:platform"),
        ("managed://platform", "aws-kms:us-east-1:platform"),
        ("azure-kv://contoso.vault.azure.net/keys/k1", "azure-kv:contoso.vault.azure.net"),
        ("azure-kv://127.0.0.1:8443/keys/k1/0123456789abcdef0123456789abcdef", "azure-kv:127.0.0.1:8443"),
        ("kmip://hsm.example.com:5696/uid-1", "kmip:hsm.example.com:5696"),
    ],
)
def test_each_reference_draws_on_the_quota_that_throttles_it(ref, domain):
    """AWS KMS throttles a cross-account request against the caller's account (ours), per
    region; a Key Vault per vault; an HSM per device."""
    got = quota_domain(parse_key_ref(ref), Settings(aws_endpoint_url=None, aws_region="us-east-1"))
    assert got is not None and got.name == domain
    assert not set(got.name) & set("/%&<>")  # a valid Prefect limit name


def test_the_platform_account_names_the_managed_and_alias_domain_when_configured():
    s = Settings(aws_endpoint_url=None, aws_region="eu-central-1", aws_account_id="111122223333")
    managed = quota_domain(parse_key_ref("managed://platform"), s)
    byok = quota_domain(parse_key_ref("aws-kms://arn:aws:kms:eu-central-1:111122223333:key/" + ARN[-36:]), s)
    customer = quota_domain(parse_key_ref("aws-kms://arn:aws:kms:eu-central-1:444455556666:key/" + ARN[-36:]), s)
    assert managed == byok == customer == QuotaDomain("aws-kms", "eu-central-1:111122223333")


def test_in_process_keys_have_no_quota():
    assert quota_domain(parse_key_ref("memory://k1"), Settings(aws_endpoint_url=None)) is None


def test_rates_come_from_settings_per_kind():
    s = Settings(
        aws_endpoint_url=None,
        l1_requests_per_second_aws_kms=11,
        l1_requests_per_second_azure_kv=22,
        l1_requests_per_second_kmip=33,
    )
    assert [rate_for(k, s) for k in ("aws-kms", "azure-kv", "kmip")] == [11, 22, 33]


class SpyProvider(MemoryKeyProvider):
    """A memory key that counts the calls that reach it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: Counter[str] = Counter()

    def wrap(self, key, *, context):
        self.calls["wrap"] += 1
        return super().wrap(key, context=context)

    def unwrap(self, wrapped, *, context):
        self.calls["unwrap"] += 1
        return super().unwrap(wrapped, context=context)

    def status(self):
        self.calls["status"] += 1
        return super().status()

    def describe(self) -> str:
        self.calls["describe"] += 1
        return "described"

    def check_metadata(self) -> dict[str, str]:
        self.calls["check_metadata"] += 1
        return {"spec": "memory"}


def _spy() -> SpyProvider:
    kms = MemoryKms()
    return SpyProvider(kms, kms.create_key("k"))


def test_every_call_that_reaches_the_service_is_charged_once_before_it_is_made():
    inner, limiter = _spy(), CountingLimiter()
    p = limit_provider(inner, limiter, QuotaDomain("aws-kms", "us-east-1:111122223333"))
    ctx = {"tenant": "acme"}
    wrapped = p.wrap(SecretBytes(b"k" * 32), context=ctx)
    assert p.unwrap(wrapped, context=ctx).reveal() == b"k" * 32
    p.status()
    assert p.describe() == "described"  # adapter-specific calls are charged too
    from archive_kms.keys.preflight import SupportsMetadataCheck

    assert isinstance(p, SupportsMetadataCheck) and p.check_metadata() == {"spec": "memory"}
    assert p.key_ref == inner.key_ref  # local attributes are not
    assert limiter.counts == Counter({"aws-kms:us-east-1:111122223333": 5})
    assert inner.calls == Counter({"wrap": 1, "unwrap": 1, "status": 1, "describe": 1, "check_metadata": 1})
    kms = MemoryKms()
    plain = limit_provider(MemoryKeyProvider(kms, kms.create_key("k2")), limiter, QuotaDomain("kmip", "h:1"))
    assert not isinstance(plain, SupportsMetadataCheck)  # offers only what the adapter offers


def test_a_refused_request_never_reaches_the_service():
    inner = _spy()
    p = limit_provider(inner, RefusingLimiter(), QuotaDomain("kmip", "hsm:5696"))
    with pytest.raises(KeyThrottledError, match="kmip:hsm:5696") as err:
        p.wrap(SecretBytes(b"k" * 32), context={"tenant": "acme"})
    assert err.value.retryable
    assert not inner.calls


def test_the_registry_wraps_providers_that_have_a_quota_and_only_those():
    limiter = CountingLimiter()
    registry = KeyProviderRegistry(Settings(aws_endpoint_url=None), defaults=False, limiter=limiter)
    kms = MemoryKms()
    registry.register("aws-kms", lambda ref, s: MemoryKeyProvider(kms, kms.create_key("a")))
    registry.register("memory", lambda ref, s: MemoryKeyProvider(kms, kms.create_key("m")))
    aws = registry.resolve(f"aws-kms://{ARN}")
    mem = registry.resolve("memory://m")
    assert isinstance(aws, LimitedKeyProvider) and aws.domain.name == "aws-kms:us-east-1:platform"
    assert not isinstance(mem, LimitedKeyProvider)
    aws.status()
    mem.status()
    assert limiter.counts == Counter({"aws-kms:us-east-1:platform": 1})
    unlimited = KeyProviderRegistry(Settings(aws_endpoint_url=None), defaults=False)
    unlimited.register("aws-kms", lambda ref, s: MemoryKeyProvider(kms, kms.create_key("b")))
    assert not isinstance(unlimited.resolve(f"aws-kms://{ARN}"), LimitedKeyProvider)


def _onboard(records: int) -> tuple[Counter[str], int]:
    """Archive ``records`` records for a managed tenant, then enable it onto a customer KMS
    key, on the in-memory platform with a counting limiter: the L1 requests of each domain."""
    limiter = CountingLimiter()
    p = Platform.in_memory(request_limiter=limiter)
    create_tenant(p, "acme", cloud="s3", provision_storage=False)
    spec = JobSpec(
        "seed", "acme", "synthetic", synthetic={"count": records, "seed": 3, "mix": "small", "workspaces": 2}
    )
    outcome = submit_job(p.state, spec, p.open_archive)
    assert outcome.decision == "run"
    archived = Counter(limiter.counts)
    plan = replace(
        plan_enable(p, "acme", "byokms", f"aws-kms://{ARN}"),
        shards=4,
        parallel_shards=2,
        threads_per_shard=2,
        cutover_grace_seconds=0.0,
    )
    run, _ = trigger(p, plan, actor="test")
    result = execute(p, run.run_id, actor="test", shard_runner=thread_shard_runner, handle_signals=False)
    assert result.state == "completed", result
    return limiter.counts - archived, outcome.records + outcome.attachments


def test_an_onboarding_run_makes_the_same_few_l1_requests_whatever_the_object_count():
    small, small_objects = _onboard(12)
    large, large_objects = _onboard(96)
    assert large_objects > 4 * small_objects
    assert small == large, (small, large)
    assert set(small) == {"aws-kms:us-east-1:platform"}, small  # customer and managed key: our quota
    requests = small["aws-kms:us-east-1:platform"]
    assert 0 < requests <= 24, small
    print(f"\nL1 requests per enable run: {requests} (customer and platform key; any object count)")
