"""Unit tests for the key providers without services: the in-memory fake's state machine
and test hooks, the registry, preflight failure modes, and the Key Vault / KMIP adapters'
error classification (with fake SDK clients)."""

from __future__ import annotations

import types
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ConfigurationError,
    IntegrityError,
    KeyAccessDeniedError,
    KeyError_,
    KeyNotFoundError,
    KeyThrottledError,
    KeyUnavailableError,
    ServiceUnavailableError,
    ValidationError,
    WrongKeyError,
)
from archive_kms.keys.azure_key_vault import ALGORITHM as KV_ALGORITHM
from archive_kms.keys.azure_key_vault import AzureKeyVaultKeyProvider
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.memory import MemoryKeyProvider, MemoryKms
from archive_kms.keys.port import KeyProvider, KeyState, KeyStatus, WrappedKey
from archive_kms.keys.preflight import check_usable
from archive_kms.keys.refs import parse_key_ref
from archive_kms.keys.registry import KeyProviderRegistry, resolve

CTX = {"tenant": "acme"}


# --- memory fake -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_memory_provider_is_a_key_provider() -> None:
    kms = MemoryKms()
    assert isinstance(kms.provider(kms.create_key("a")), KeyProvider)


def test_memory_state_machine() -> None:
    kms = MemoryKms()
    p = kms.provider(kms.create_key("k"))
    wrapped = p.wrap(SecretBytes.random(32), context=CTX)

    kms.disable("k")
    kms.disable("k")  # idempotent, like KMS
    assert p.status().state is KeyState.DISABLED
    kms.enable("k")
    kms.schedule_deletion("k")
    with pytest.raises(ValidationError, match="pending_deletion"):
        kms.enable("k")  # as KMS: cancel first
    kms.cancel_deletion("k")
    assert p.status().state is KeyState.DISABLED
    kms.enable("k")
    kms.delete_material("k")
    with pytest.raises(KeyUnavailableError) as info:
        p.unwrap(wrapped, context=CTX)
    assert info.value.state == "pending_import"
    kms.restore_material("k")
    p.unwrap(wrapped, context=CTX)
    kms.revoke("k")
    for action in (kms.enable, kms.disable, kms.restore_material, kms.cancel_deletion):
        with pytest.raises(ValidationError):
            action("k")
    assert p.status().state is KeyState.REVOKED
    kms.destroy("k")
    assert p.status().state is KeyState.NOT_FOUND
    with pytest.raises(KeyNotFoundError):
        p.unwrap(wrapped, context=CTX)
    with pytest.raises(ValidationError, match="already exists"):
        kms.create_key("dup"), kms.create_key("dup")


def test_memory_expiry_follows_the_injected_clock() -> None:
    clock = Clock()
    kms = MemoryKms(clock=clock)
    p = kms.provider(kms.create_key("k", valid_to=clock.now + timedelta(hours=1)))
    wrapped = p.wrap(SecretBytes.random(32), context=CTX)
    assert p.status().expires_at == clock.now + timedelta(hours=1)
    clock.now += timedelta(hours=1)
    assert p.status().state is KeyState.MATERIAL_EXPIRED
    with pytest.raises(KeyUnavailableError) as info:
        p.unwrap(wrapped, context=CTX)
    assert info.value.state == "material_expired"
    kms.restore_material("k", valid_to=clock.now + timedelta(days=1))
    p.unwrap(wrapped, context=CTX)


def test_memory_rotation_keeps_old_versions_unwrappable() -> None:
    kms = MemoryKms()
    p = kms.provider(kms.create_key("k"))
    secret = SecretBytes.random(32)
    old = p.wrap(secret, context=CTX)
    assert kms.rotate("k") == 2
    new = p.wrap(secret, context=CTX)
    assert (old.key_ref, new.key_ref) == ("memory://k/1", "memory://k/2")
    assert p.status().key_version == "2"
    assert p.unwrap(old, context=CTX) == secret == p.unwrap(new, context=CTX)
    pinned = kms.provider("memory://k/1")
    assert pinned.wrap(secret, context=CTX).key_ref == "memory://k/1"
    with pytest.raises(WrongKeyError):
        pinned.unwrap(new, context=CTX)
    with pytest.raises(WrongKeyError, match="no version 7"):
        p.unwrap(WrappedKey("memory://k/7", old.algorithm, old.ciphertext), context=CTX)


def test_memory_fault_injection_and_call_counts() -> None:
    kms = MemoryKms()
    p = kms.provider(kms.create_key("k"))
    kms.inject("unwrap", KeyThrottledError("slow down"), times=2)
    wrapped = p.wrap(SecretBytes.random(32), context=CTX)
    for _ in range(2):
        with pytest.raises(KeyThrottledError):
            p.unwrap(wrapped, context=CTX)
    p.unwrap(wrapped, context=CTX)
    assert kms.calls == {"wrap": 1, "unwrap": 3}


def test_memory_refuses_bad_context_before_counting_a_call() -> None:
    kms = MemoryKms()
    p = kms.provider(kms.create_key("k"))
    with pytest.raises(ValidationError):
        p.wrap(SecretBytes.random(32), context={"no": "tenant"})
    assert kms.calls["wrap"] == 0
    assert "memory://k" in repr(p) and repr(kms) == "MemoryKms(1 keys)"


# --- registry ----------------------------------------------------------------------------


def test_registry_has_no_memory_adapter_by_default() -> None:
    with pytest.raises(ConfigurationError, match="scheme 'memory' is not enabled"):
        resolve("memory://k", Settings())


def test_registry_resolves_and_caches_by_canonical_reference() -> None:
    kms = MemoryKms()
    kms.create_key("k")
    registry = KeyProviderRegistry(Settings())
    registry.register("memory", kms.factory)
    first = registry.resolve("memory://k")
    assert isinstance(first, MemoryKeyProvider)
    assert registry.resolve(parse_key_ref("memory://k")) is first
    assert registry.schemes == ("aws-kms", "azure-kv", "kmip", "managed", "memory")
    registry.register("memory", kms.factory)  # re-registering drops cached providers
    assert registry.resolve("memory://k") is not first
    with pytest.raises(ValidationError):
        registry.resolve("memory://K")


def test_registry_builds_real_adapters_lazily_from_settings() -> None:
    settings = Settings(
        aws_endpoint_url="http://127.0.0.1:1",
        aws_region="eu-west-1",
        azure_keyvault_url="https://localhost:8443",
        kmip_host="hsm.example.com",
        kmip_port=5696,
        kmip_client_cert="c",
        kmip_client_key="k",
        kmip_ca_cert="ca",
    )
    registry = KeyProviderRegistry(settings)
    arn = "arn:aws:kms:ap-southeast-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    aws = registry.resolve(f"aws-kms://{arn}")
    assert aws._kms.meta.region_name == "ap-southeast-2"  # the ARN's region, not the default
    assert registry.resolve("managed://platform")._kms.meta.region_name == "eu-west-1"
    assert registry.resolve("azure-kv://localhost:8443/keys/k").key_ref == "azure-kv://localhost:8443/keys/k"
    assert registry.resolve("azure-kv://acme.vault.azure.net/keys/k").key_ref.startswith("azure-kv://acme.")
    assert registry.resolve("kmip://hsm.example.com:5696/1").key_ref == "kmip://hsm.example.com:5696/1"


@pytest.mark.parametrize(
    "ref,problem",
    [
        ("azure-kv://evil.example.com/keys/k", "refusing to send credentials"),
        ("azure-kv://localhost:9999/keys/k", "refusing to send credentials"),
        ("azure-kv://localhost.vault.azure.net.evil.com/keys/k", "refusing to send credentials"),
        ("kmip://other-hsm.example.com:5696/1", "no KMIP mutual-TLS configuration"),
        ("kmip://hsm.example.com:5697/1", "no KMIP mutual-TLS configuration"),
    ],
)
def test_registry_refuses_hosts_we_have_no_trust_for(ref: str, problem: str) -> None:
    settings = Settings(azure_keyvault_url="https://localhost:8443", kmip_host="hsm.example.com", kmip_port=5696)
    with pytest.raises(ConfigurationError, match=problem):
        KeyProviderRegistry(settings).resolve(ref)


# --- preflight ---------------------------------------------------------------------------


def test_preflight_passes_on_the_fake() -> None:
    kms = MemoryKms()
    report = check_usable(kms.provider(kms.create_key("k")), CTX)
    assert report.checks == ("context", "state", "round-trip", "context-binding")
    assert kms.calls == {"status": 1, "wrap": 1, "unwrap": 2}


@pytest.mark.parametrize(
    "action,error,state",
    [
        ("disable", KeyUnavailableError, "disabled"),
        ("revoke", KeyUnavailableError, "revoked"),
        ("destroy", KeyNotFoundError, None),
    ],
)
def test_preflight_refuses_unusable_keys_before_wrapping(action, error, state) -> None:
    kms = MemoryKms()
    p = kms.provider(kms.create_key("k"))
    getattr(kms, action)("k")
    with pytest.raises(error) as info:
        check_usable(p, CTX)
    assert getattr(info.value, "state", None) == state
    assert kms.calls["wrap"] == 0


class _Broken:
    """A provider that wraps with the fake but breaks one rule."""

    def __init__(self, mode: str) -> None:
        self.kms = MemoryKms()
        self.inner = self.kms.provider(self.kms.create_key("k"))
        self.mode = mode
        self.key_ref = self.inner.key_ref

    def status(self) -> KeyStatus:
        return self.inner.status()

    def wrap(self, key, *, context):
        return self.inner.wrap(key, context=CTX if self.mode == "ignores-context" else context)

    def unwrap(self, wrapped, *, context):
        if self.mode == "ignores-context":
            return self.inner.unwrap(wrapped, context=CTX)
        return SecretBytes.random(32)


@pytest.mark.parametrize("mode,error", [("ignores-context", ConfigurationError), ("wrong-bytes", IntegrityError)])
def test_preflight_catches_broken_adapters(mode, error) -> None:
    with pytest.raises(error):
        check_usable(_Broken(mode), {"tenant": "acme", "purpose": "preflight"})


class _TenantPinnedKey:
    """The fake behind a key policy that allows Decrypt only under one tenant's context
    (the customer's BYOKMS key policy: infra/aws/customer-byokms-key.yaml): KMS answers
    AccessDenied, not a wrong-key error, under any other context."""

    def __init__(self, tenant: str) -> None:
        self.kms = MemoryKms()
        self.inner = self.kms.provider(self.kms.create_key("k"))
        self.key_ref = self.inner.key_ref
        self.tenant = tenant

    def status(self) -> KeyStatus:
        return self.inner.status()

    def wrap(self, key, *, context):
        return self.inner.wrap(key, context=context)

    def unwrap(self, wrapped, *, context):
        if context["tenant"] != self.tenant:
            raise KeyAccessDeniedError("AccessDeniedException: not authorized under this encryption context")
        return self.inner.unwrap(wrapped, context=context)


def test_preflight_accepts_a_key_policy_that_pins_the_tenant_context() -> None:
    report = check_usable(_TenantPinnedKey("acme"), {"tenant": "acme"})
    assert report.checks[-1] == "context-binding"


def test_preflight_still_refuses_access_denied_for_the_tenant_itself() -> None:
    with pytest.raises(KeyAccessDeniedError):
        check_usable(_TenantPinnedKey("someone-else"), {"tenant": "acme"})


# --- Key Vault error classification ------------------------------------------------------


KV_REF = "azure-kv://localhost:8443/keys/k"
KV_VERSIONED = KV_REF + "/" + "a" * 32


class FakeResponse:
    def __init__(self, status: int, body: dict, headers: dict | None = None) -> None:
        self.status_code, self._body, self.headers = status, body, headers or {}

    def json(self) -> dict:
        return self._body


class FakeKeyClient:
    def __init__(self, responses: list, enabled: bool = True) -> None:
        self.responses = responses
        self.requests: list = []
        self.props = types.SimpleNamespace(
            version="a" * 32,
            enabled=enabled,
            not_before=None,
            expires_on=None,
            vault_url="https://localhost:8443",
            recovery_level=None,
        )

    def get_key(self, name, version=None):
        return types.SimpleNamespace(
            properties=self.props,
            key=types.SimpleNamespace(n=b"\x01" * 256),
            key_type="RSA",
            key_operations=["wrapKey", "unwrapKey"],
        )

    def send_request(self, request):
        self.requests.append(request)
        return self.responses.pop(0)


def kv_error(status: int, code: str, message: str, headers: dict | None = None) -> FakeResponse:
    return FakeResponse(status, {"error": {"code": code, "message": message}}, headers)


@pytest.mark.parametrize(
    "response,expected,state",
    [
        (
            kv_error(403, "Forbidden", "Operation wrapKey is not allowed on a disabled key."),
            KeyUnavailableError,
            "disabled",
        ),
        (
            kv_error(403, "Forbidden", "Operation wrapKey is not allowed on an expired key."),
            KeyUnavailableError,
            "material_expired",
        ),
        (kv_error(403, "Forbidden", "The key is not yet valid."), KeyUnavailableError, "disabled"),
        (kv_error(403, "Forbidden", "Operation wrapKey is not permitted on this key."), KeyAccessDeniedError, None),
        (
            FakeResponse(
                403,
                {
                    "error": {
                        "code": "Forbidden",
                        "message": "Caller is not authorized",
                        "innererror": {"code": "ForbiddenByRbac"},
                    }
                },
            ),
            KeyAccessDeniedError,
            None,
        ),
        (kv_error(401, "Unauthorized", "no token"), KeyAccessDeniedError, None),
        (kv_error(404, "KeyNotFound", "A key with (name/id) k was not found"), KeyNotFoundError, None),
        (kv_error(400, "BadParameter", "bad alg"), ConfigurationError, None),
        (kv_error(500, "InternalServerError", "oops"), ServiceUnavailableError, None),
        (kv_error(503, "ServiceUnavailable", "busy"), ServiceUnavailableError, None),
        (kv_error(409, "Conflict", "?"), KeyError_, None),
    ],
)
def test_key_vault_wrap_errors(response, expected, state) -> None:
    kc = FakeKeyClient([response])
    p = AzureKeyVaultKeyProvider(KV_REF, kc, lambda key_id: None)
    with pytest.raises(expected) as info:
        p.wrap(SecretBytes.random(32), context=CTX)
    assert type(info.value) is expected
    assert getattr(info.value, "state", None) == state
    assert KV_REF in str(info.value)
    assert kc.requests[0].url.endswith(f"/keys/k/{'a' * 32}/wrapkey")  # pinned to the current version


def test_key_vault_forbidden_without_a_known_message_consults_the_key_state() -> None:
    kc = FakeKeyClient([kv_error(403, "Forbidden", "Access denied.")], enabled=True)
    p = AzureKeyVaultKeyProvider(KV_REF, kc, lambda key_id: None)
    with pytest.raises(KeyAccessDeniedError):
        p.wrap(SecretBytes.random(32), context=CTX)
    kc = FakeKeyClient([], enabled=False)
    with pytest.raises(KeyUnavailableError):  # found disabled before any wrap request
        AzureKeyVaultKeyProvider(KV_REF, kc, lambda key_id: None).wrap(SecretBytes.random(32), context=CTX)
    assert kc.requests == []


def test_key_vault_throttling_carries_retry_after() -> None:
    kc = FakeKeyClient([kv_error(429, "Throttled", "too many", {"Retry-After": "7"})])
    with pytest.raises(KeyThrottledError) as info:
        AzureKeyVaultKeyProvider(KV_REF, kc, lambda key_id: None).wrap(SecretBytes.random(32), context=CTX)
    assert info.value.retryable and info.value.retry_after == 7.0


class FakeCrypto:
    def __init__(self, result: bytes | Exception) -> None:
        self.result = result

    def unwrap_key(self, algorithm, data):
        if isinstance(self.result, Exception):
            raise self.result
        return types.SimpleNamespace(key=self.result)


def test_key_vault_unwrap_checks_the_context_tag_and_translates_sdk_errors() -> None:
    from azure.core.exceptions import ServiceRequestError

    from archive_kms.keys.context import context_tag

    tag = context_tag(CTX, b"archive_kms/azure-kv-wrap/v1")
    wrapped = WrappedKey(KV_VERSIONED, KV_ALGORITHM, b"c" * 256)
    ok = AzureKeyVaultKeyProvider(KV_REF, FakeKeyClient([]), lambda key_id: FakeCrypto(tag + b"k" * 32))
    assert ok.unwrap(wrapped, context=CTX) == SecretBytes(b"k" * 32)
    with pytest.raises(WrongKeyError, match="another context"):
        ok.unwrap(wrapped, context={"tenant": "other"})
    short = AzureKeyVaultKeyProvider(KV_REF, FakeKeyClient([]), lambda key_id: FakeCrypto(tag))
    with pytest.raises(WrongKeyError):
        short.unwrap(wrapped, context=CTX)  # a tag with no key behind it
    down = AzureKeyVaultKeyProvider(
        KV_REF, FakeKeyClient([]), lambda key_id: FakeCrypto(ServiceRequestError("connection refused"))
    )
    with pytest.raises(ServiceUnavailableError) as info:
        down.unwrap(wrapped, context=CTX)
    assert info.value.__context__ is None
    with pytest.raises(WrongKeyError, match="belongs to"):
        ok.unwrap(WrappedKey(KV_VERSIONED.replace("/k/", "/other/"), KV_ALGORITHM, b"c"), context=CTX)
    with pytest.raises(WrongKeyError, match="belongs to"):
        ok.unwrap(WrappedKey(KV_REF, KV_ALGORITHM, b"c"), context=CTX)  # no version recorded


def sdk_error(status: int, code: str, message: str, inner: str = "", headers: dict | None = None):
    """An azure-core ``HttpResponseError`` as the Key Vault SDK raises it."""
    from azure.core.exceptions import HttpResponseError

    exc = HttpResponseError(message=message)
    exc.status_code = status
    exc.error = types.SimpleNamespace(code=code, message=message, innererror={"code": inner} if inner else None)
    exc.response = types.SimpleNamespace(headers=headers or {})
    return exc


@pytest.mark.parametrize(
    "answer,expected,state,phrase",
    [
        (sdk_error(403, "Forbidden", "Operation sign is not allowed on a disabled key.", "KeyDisabled"),
         KeyUnavailableError, "disabled", "is disabled"),
        (sdk_error(403, "Forbidden", "Operation sign is not allowed on an expired key.", "KeyExpired"),
         KeyUnavailableError, "material_expired", "has expired"),
        (sdk_error(403, "Forbidden", "Operation sign is not allowed on a key that is not yet valid.", "KeyNotYetValid"),
         KeyUnavailableError, "disabled", "is not valid yet"),
        (sdk_error(403, "Forbidden", "Operation sign is not permitted on this key.", "KeyOperationForbidden"),
         KeyAccessDeniedError, None, "not permitted"),
        (sdk_error(403, "Forbidden", "Caller is not authorized; access disabled", "ForbiddenByRbac"),
         KeyAccessDeniedError, None, "not permitted"),
        (sdk_error(401, "Unauthorized", "no token"), KeyAccessDeniedError, None, "not authenticated"),
        (sdk_error(404, "KeyNotFound", "no key"), KeyNotFoundError, None, "no such key"),
        (sdk_error(400, "BadParameter", "bad alg"), ConfigurationError, None, "rejected the request"),
        (sdk_error(408, "Timeout", "slow"), ServiceUnavailableError, None, "unavailable"),
        (sdk_error(502, "BadGateway", "down"), ServiceUnavailableError, None, "unavailable"),
        (sdk_error(409, "Conflict", "?"), KeyError_, None, "failed"),
    ],
)  # fmt: skip
def test_one_key_vault_translation_serves_provider_and_signer(answer, expected, state, phrase) -> None:
    """``translate_error`` is pure (asks nothing) and the same for both users; only the
    setting prefix and what the identity needs differ."""
    from archive_kms.keys.azure_key_vault import VaultReply, translate_error
    from archive_kms.keys.refs import AzureKeyVaultKeyRef

    ref = parse_key_ref(KV_VERSIONED)
    assert isinstance(ref, AzureKeyVaultKeyRef)
    plain = translate_error(answer, "sign", ref, needs="NEEDS")
    signer = translate_error(answer, "sign", ref, needs="NEEDS", setting="keychain_signing_key_ref")
    for error in (plain, signer):
        assert type(error) is expected and getattr(error, "state", None) == state
        assert phrase in str(error) and KV_VERSIONED in str(error) and "\n" not in str(error)
    assert str(signer) == "keychain_signing_key_ref: " + str(plain)
    reply = VaultReply.from_exception(answer)
    assert reply is not None and str(translate_error(reply, "sign", ref, needs="NEEDS")) == str(plain)


def test_key_vault_translation_of_no_answer_throttling_and_wrong_key() -> None:
    from azure.core.exceptions import ServiceRequestError

    from archive_kms.keys.azure_key_vault import VaultReply, translate_error

    ref = parse_key_ref(KV_VERSIONED)
    gone = translate_error(ServiceRequestError("connection refused"), "get", ref, needs="")
    assert isinstance(gone, ServiceUnavailableError) and "did not answer" in str(gone)
    assert VaultReply.from_exception(ValueError("x")) is None
    throttled = translate_error(
        sdk_error(429, "Throttled", "slow down", headers={"Retry-After": "3"}), "get", ref, needs=""
    )
    assert isinstance(throttled, KeyThrottledError) and throttled.retry_after == 3.0
    wrong = translate_error(sdk_error(400, "BadParameter", "decrypt failed"), "unwrapKey", ref, needs="")
    assert isinstance(wrong, WrongKeyError)
    raw = VaultReply.from_response(FakeResponse(400, {"error": "not an object"}))
    assert (raw.status, raw.code, raw.inner) == (400, "", "")


def test_key_vault_key_usability_is_one_check() -> None:
    from archive_kms.keys.azure_key_vault import unusable_reason

    now = datetime(2026, 1, 1, tzinfo=UTC)

    def props(enabled=True, expires_on=None, not_before=None):
        return types.SimpleNamespace(enabled=enabled, expires_on=expires_on, not_before=not_before)

    assert unusable_reason(props(), now) is None
    assert unusable_reason(props(enabled=False), now) == (KeyState.DISABLED, "is disabled")
    assert unusable_reason(props(expires_on=now), now) == (KeyState.MATERIAL_EXPIRED, "has expired")
    assert unusable_reason(props(not_before=now + timedelta(seconds=1)), now) == (KeyState.DISABLED, "is not valid yet")
    assert unusable_reason(props(expires_on=now + timedelta(days=1), not_before=now), now) is None


def test_key_vault_signer_translates_through_the_shared_function() -> None:
    """The signing key's sign on a key disabled in the vault: the shared translation, named
    after the setting, one line, not retried (a disabled key is not transient)."""
    from archive_kms import retry
    from archive_kms.keys.signing_key_vault import KeyVaultSigningKey

    calls: list[str] = []

    class RefusingCrypto:
        def sign(self, algorithm, digest):
            calls.append("sign")
            raise sdk_error(403, "Forbidden", "Operation sign is not allowed on a disabled key.", "KeyDisabled")

    signer = KeyVaultSigningKey(
        KV_VERSIONED,
        FakeKeyClient([]),
        lambda key_id: RefusingCrypto(),
        backoff=retry.Backoff(max_attempts=3, base_delay=0.0),
    )
    signer._pinned = parse_key_ref(KV_VERSIONED)  # as public_key() leaves it (the fake key is RSA)
    with pytest.raises(KeyUnavailableError, match="keychain_signing_key_ref.*the key is disabled") as info:
        signer.sign_digest(b"d" * 32)
    assert info.value.state == "disabled" and info.value.__cause__ is None and calls == ["sign"]


# --- KMIP error classification -----------------------------------------------------------


class FakeKmipClient:
    def __init__(self, failures: list, state=None) -> None:
        self.failures = failures
        self.state = state
        self.opened = 0

    def open(self):
        self.opened += 1

    def close(self):
        pass

    kmip_version = None

    @property
    def proxy(self):
        return self

    def send_request_payload(self, operation, payload):
        raise self.failures.pop(0)

    def get_attributes(self, uid, names):

        if self.state is None:
            raise OSError("down")
        value = types.SimpleNamespace(value=self.state)
        return uid, [types.SimpleNamespace(attribute_name=types.SimpleNamespace(value="State"), attribute_value=value)]


def kmip_failure(reason, message="m"):
    from kmip.core import enums
    from kmip.core.exceptions import OperationFailure

    return OperationFailure(enums.ResultStatus.OPERATION_FAILED, reason, message)


@pytest.mark.parametrize(
    "reason_name,state,expected,expected_state",
    [
        ("ITEM_NOT_FOUND", None, KeyNotFoundError, None),
        ("PERMISSION_DENIED", "DEACTIVATED", KeyUnavailableError, "revoked"),
        ("PERMISSION_DENIED", "PRE_ACTIVE", KeyUnavailableError, "disabled"),
        ("PERMISSION_DENIED", "ACTIVE", KeyAccessDeniedError, None),
        ("GENERAL_FAILURE", None, WrongKeyError, None),
        ("INVALID_FIELD", None, ConfigurationError, None),
        ("ILLEGAL_OPERATION", None, KeyError_, None),
    ],
)
def test_kmip_unwrap_failures(reason_name, state, expected, expected_state) -> None:
    from kmip.core import enums

    client = FakeKmipClient(
        [kmip_failure(getattr(enums.ResultReason, reason_name))], state=getattr(enums.State, state) if state else None
    )
    p = KmipKeyProvider("kmip://hsm:5696/1", lambda: client)
    wrapped = WrappedKey("kmip://hsm:5696/1", "kmip:AES-256-GCM", b"n" * 12 + b"c" * 32 + b"t" * 16)
    with pytest.raises(expected) as info:
        p.unwrap(wrapped, context=CTX)
    assert type(info.value) is expected
    assert getattr(info.value, "state", None) == expected_state
    assert "kmip://hsm:5696/1" in str(info.value)


def test_kmip_reconnects_once_then_reports_unavailable() -> None:
    client = FakeKmipClient([ConnectionResetError("reset"), BrokenPipeError("pipe")])
    p = KmipKeyProvider("kmip://hsm:5696/1", lambda: client)
    with pytest.raises(ServiceUnavailableError) as info:
        p.wrap(SecretBytes.random(32), context=CTX)
    assert client.opened == 2 and info.value.retryable
    with pytest.raises(WrongKeyError, match="too short"):
        p.unwrap(WrappedKey("kmip://hsm:5696/1", "kmip:AES-256-GCM", b"x" * 28), context=CTX)


def test_kmip_connection_closed_mid_answer_is_retried_once() -> None:
    """PyKMIP raises EOFError when the connection ends before the answer (a reset HSM, a
    middlebox): a transport failure like a reset, retried once on a new connection, and
    retryable if it persists (issue 17: seen with resets injected mid-request)."""
    from types import SimpleNamespace

    class AnswersSecond(FakeKmipClient):
        def send_request_payload(self, operation, payload):
            if self.failures:
                raise self.failures.pop(0)
            return SimpleNamespace(data=b"k" * 32, auth_tag=b"t" * 16)

    client = AnswersSecond([EOFError("No data read from socket")])
    p = KmipKeyProvider("kmip://hsm:5696/1", lambda: client)
    assert p.wrap(SecretBytes.random(32), context=CTX).ciphertext.endswith(b"t" * 16)
    assert client.opened == 2

    client = FakeKmipClient([EOFError("No data read from socket"), EOFError("No data read from socket")])
    p = KmipKeyProvider("kmip://hsm:5696/1", lambda: client)
    with pytest.raises(ServiceUnavailableError, match="did not answer") as info:
        p.wrap(SecretBytes.random(32), context=CTX)
    assert client.opened == 2 and info.value.retryable
