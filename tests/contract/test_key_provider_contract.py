"""The KeyProvider contract (keys/port.py), one suite over every backend:

* ``memory``    - the in-process fake (keys/memory.py)
* ``aws-kms``   - BYOKMS: a customer KMS key on LocalStack, created here
* ``byok``      - an EXTERNAL-origin LocalStack key with material imported like a customer
                  would (GetParametersForImport, RSA-OAEP-SHA-256 wrap, keys/byok.py)
* ``managed``   - the platform key (keys/managed.py), created on first use
* ``azure-kv``  - an RSA-3072 key in the Key Vault emulator
* ``azure-byok``- an RSA-3072 key imported into the Key Vault emulator from a ``.byok``
                  file made for a key exchange key (keys/azure_byok.py)
* ``kmip``      - an AES-256 key in the PyKMIP server

Key state is changed *on the server*, the way the customer or HSM officer would
(DisableKey, update enabled=False, KMIP Revoke, DeleteImportedKeyMaterial...), never
through the adapter under test.
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import KeyNotFoundError, KeyUnavailableError, WrongKeyError
from archive_kms.keys.azure_byok import KeyVaultByokImporter, customer_transfer_blob
from archive_kms.keys.byok import ByokImporter, customer_wrap, sha256_hex
from archive_kms.keys.managed import ManagedKeyProvider
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.port import KeyProvider, KeyState, WrappedKey
from archive_kms.keys.preflight import check_usable
from archive_kms.keys.refs import parse_key_ref
from archive_kms.keys.registry import KeyProviderRegistry

CTX = {"tenant": "acme", "purpose": "l2"}


@dataclass
class Revocation:
    """A server-side action that makes the key unusable, and how to undo it (None: terminal)."""

    name: str
    state: KeyState
    revoke: Callable[[], None]
    restore: Callable[[], None] | None = None


@dataclass
class Key:
    provider: KeyProvider
    revocations: dict[str, Revocation] = field(default_factory=dict)


class Backend:
    name: str
    schemes: tuple[str, ...]

    def new_key(self) -> Key:
        raise NotImplementedError

    def unknown_provider(self) -> KeyProvider:
        """A provider for a key that does not exist."""
        raise NotImplementedError

    def unknown_wrapped(self, wrapped: WrappedKey, unknown: KeyProvider) -> WrappedKey:
        """``wrapped`` re-pointed at the key of ``unknown`` (which does not exist)."""
        return replace(wrapped, key_ref=unknown.key_ref)

    def cleanup(self) -> None:
        pass


class MemoryBackend(Backend):
    name, schemes = "memory", ("memory",)

    def __init__(self) -> None:
        self.kms = MemoryKms()

    def new_key(self) -> Key:
        ref = self.kms.create_key()
        name = parse_key_ref(ref).name
        kms = self.kms

        def restore_deleted() -> None:
            kms.cancel_deletion(name)
            kms.enable(name)

        return Key(
            self.kms.provider(ref),
            {
                "disable": Revocation(
                    "disable", KeyState.DISABLED, lambda: kms.disable(name), lambda: kms.enable(name)
                ),
                "revoke": Revocation("revoke", KeyState.REVOKED, lambda: kms.revoke(name)),
                "schedule-deletion": Revocation(
                    "schedule-deletion", KeyState.PENDING_DELETION, lambda: kms.schedule_deletion(name), restore_deleted
                ),
                "delete-material": Revocation(
                    "delete-material",
                    KeyState.PENDING_IMPORT,
                    lambda: kms.delete_material(name),
                    lambda: kms.restore_material(name),
                ),
                "expire": Revocation(
                    "expire",
                    KeyState.MATERIAL_EXPIRED,
                    lambda: kms.set_valid_to(name, datetime.now(UTC) - timedelta(seconds=1)),
                    lambda: kms.set_valid_to(name, None),
                ),
            },
        )

    def unknown_provider(self) -> KeyProvider:
        return self.kms.provider("memory://missing-" + os.urandom(4).hex())

    def unknown_wrapped(self, wrapped: WrappedKey, unknown: KeyProvider) -> WrappedKey:
        return replace(wrapped, key_ref=unknown.key_ref + "/1")


class AwsKmsBackend(Backend):
    name, schemes = "aws-kms", ("aws-kms",)

    def __init__(self, settings) -> None:
        self.settings = settings
        self.kms = clients.kms_client(settings)
        self.registry = KeyProviderRegistry(settings)
        self.created: list[str] = []

    def _kms_revocations(self, arn: str) -> dict[str, Revocation]:
        kms = self.kms

        def cancel() -> None:
            kms.cancel_key_deletion(KeyId=arn)
            kms.enable_key(KeyId=arn)

        return {
            "disable": Revocation(
                "disable", KeyState.DISABLED, lambda: kms.disable_key(KeyId=arn), lambda: kms.enable_key(KeyId=arn)
            ),
            "schedule-deletion": Revocation(
                "schedule-deletion",
                KeyState.PENDING_DELETION,
                lambda: kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7),
                cancel,
            ),
        }

    def new_key(self) -> Key:
        arn = self.kms.create_key(Description="contract test (BYOKMS)")["KeyMetadata"]["Arn"]
        self.created.append(arn)
        return Key(self.registry.resolve(f"aws-kms://{arn}"), self._kms_revocations(arn))

    def _unknown_arn(self) -> str:
        return f"arn:aws:kms:{self.settings.aws_region}:000000000000:key/{uuid.uuid4()}"

    def unknown_provider(self) -> KeyProvider:
        return self.registry.resolve(f"aws-kms://{self._unknown_arn()}")

    def cleanup(self) -> None:
        for arn in self.created:
            try:
                self.kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
            except Exception:  # noqa: BLE001 - already pending deletion
                pass


class ByokBackend(AwsKmsBackend):
    name, schemes = "byok", ("aws-kms",)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.importer = ByokImporter(clients.kms_client(settings, max_attempts=2))

    def new_key(self) -> Key:
        ref = self.importer.create_key(description="contract test (BYOK)", tags={"tenant": "acme"})
        self.created.append(parse_key_ref(ref).api_key_id)
        params = self.importer.import_parameters(ref, wrapping_key_spec="RSA_2048")
        material = SecretBytes.random(32)  # the customer's key; we only ever see it wrapped
        upload = customer_wrap(params.public_key_pem, material)
        self.importer.import_material(params, upload, sha256_hex(upload))
        arn = parse_key_ref(ref).api_key_id
        revocations = self._kms_revocations(arn)
        # Restoring after DeleteImportedKeyMaterial (reimport of the same material) is covered,
        # with LocalStack's defect documented, in test_byok_import.py.
        revocations["delete-material"] = Revocation(
            "delete-material", KeyState.PENDING_IMPORT, lambda: self.importer.delete_material(ref)
        )
        return Key(self.registry.resolve(ref), revocations)


class ManagedBackend(AwsKmsBackend):
    name, schemes = "managed", ("managed",)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.aliases: list[str] = []

    def new_key(self) -> Key:
        provider = self.registry.resolve(f"managed://ct-{os.urandom(4).hex()}")
        assert isinstance(provider, ManagedKeyProvider)
        arn = provider.ensure()  # created on first use
        self.created.append(arn)
        self.aliases.append(provider.alias)
        return Key(provider, self._kms_revocations(arn))

    def unknown_provider(self) -> KeyProvider:
        return ManagedKeyProvider(f"managed://missing-{os.urandom(4).hex()}", self.kms, create_if_missing=False)

    def unknown_wrapped(self, wrapped: WrappedKey, unknown: KeyProvider) -> WrappedKey:
        return replace(wrapped, key_ref=f"aws-kms://{self._unknown_arn()}")  # wraps always name a key ARN

    def cleanup(self) -> None:
        for alias in self.aliases:
            try:
                self.kms.delete_alias(AliasName=alias)
            except Exception:  # noqa: BLE001
                pass
        super().cleanup()


class AzureKeyVaultBackend(Backend):
    name, schemes = "azure-kv", ("azure-kv",)

    def __init__(self, settings) -> None:
        self.settings = settings
        self.kc = clients.keyvault_key_client(settings)
        self.registry = KeyProviderRegistry(settings)
        self.host = settings.azure_keyvault_url.removeprefix("https://")
        self.created: list[str] = []

    def new_key(self) -> Key:
        name = f"ct-{uuid.uuid4().hex[:12]}"
        key = self.kc.create_rsa_key(name, size=3072, key_operations=["wrapKey", "unwrapKey"])
        self.created.append(name)
        return self._key(name, key.properties.version)

    def _key(self, name: str, version: str) -> Key:
        kc = self.kc
        past = datetime.now(UTC) - timedelta(hours=1)
        future = datetime.now(UTC) + timedelta(days=365)
        return Key(
            self.registry.resolve(f"azure-kv://{self.host}/keys/{name}"),
            {
                "disable": Revocation(
                    "disable",
                    KeyState.DISABLED,
                    lambda: kc.update_key_properties(name, version, enabled=False),
                    lambda: kc.update_key_properties(name, version, enabled=True),
                ),
                "expire": Revocation(
                    "expire",
                    KeyState.MATERIAL_EXPIRED,
                    lambda: kc.update_key_properties(name, version, expires_on=past),
                    lambda: kc.update_key_properties(name, version, expires_on=future),
                ),
            },
        )

    def unknown_provider(self) -> KeyProvider:
        return self.registry.resolve(f"azure-kv://{self.host}/keys/missing-{uuid.uuid4().hex[:8]}")

    def unknown_wrapped(self, wrapped: WrappedKey, unknown: KeyProvider) -> WrappedKey:
        ref = parse_key_ref(unknown.key_ref)
        return replace(wrapped, key_ref=ref.with_version(uuid.uuid4().hex).uri)  # type: ignore[union-attr]

    def cleanup(self) -> None:
        for name in self.created:
            try:
                self.kc.begin_delete_key(name).wait()
                self.kc.purge_deleted_key(name)
            except Exception:  # noqa: BLE001
                pass


def rsa_private_key_der(bits: int) -> bytes:
    """A new RSA private key as PKCS#8 DER (what the customer's HSM exports under a KEK)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class AzureByokBackend(AzureKeyVaultBackend):
    """An RSA-3072 key imported into the emulator from a .byok file (keys/azure_byok.py)."""

    name, schemes = "azure-byok", ("azure-kv",)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.importer = KeyVaultByokImporter(self.kc, settings.azure_keyvault_url)

    def new_key(self) -> Key:
        params = self.importer.create_import_parameters(wrapping_key_spec="RSA_2048")
        blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, rsa_private_key_der(3072))
        result = self.importer.import_blob(params, blob, sha256_hex(blob))
        name = parse_key_ref(result.key_ref).name  # type: ignore[union-attr]
        self.created.append(name)
        return self._key(name, result.key_version)


class KmipBackend(Backend):
    name, schemes = "kmip", ("kmip",)

    def __init__(self, settings) -> None:
        self.settings = settings
        self.registry = KeyProviderRegistry(settings)
        self.created: list[str] = []

    def _admin(self, action: Callable) -> object:
        client = clients.kmip_client(self.settings)
        with client:
            return action(client)

    def new_key(self) -> Key:
        from kmip.core import enums

        def create(client):
            uid = client.create(
                enums.CryptographicAlgorithm.AES,
                256,
                name=f"ct-{os.urandom(4).hex()}",
                cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
            )
            client.activate(uid)
            return uid

        uid = self._admin(create)
        self.created.append(uid)
        ref = f"kmip://{self.settings.kmip_host}:{self.settings.kmip_port}/{uid}"
        return Key(
            self.registry.resolve(ref),
            {
                "revoke-compromised": Revocation(
                    "revoke-compromised",
                    KeyState.REVOKED,
                    lambda: self._admin(lambda c: c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid)),
                ),
                "revoke-deactivated": Revocation(
                    "revoke-deactivated",
                    KeyState.REVOKED,
                    lambda: self._admin(lambda c: c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)),
                ),
            },
        )

    def unknown_provider(self) -> KeyProvider:
        return self.registry.resolve(
            f"kmip://{self.settings.kmip_host}:{self.settings.kmip_port}/"
            f"{900000 + int.from_bytes(os.urandom(2), 'big')}"
        )

    def cleanup(self) -> None:
        from kmip.core import enums

        for uid in self.created:
            try:
                self._admin(
                    lambda c: (c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid), c.destroy(uid))
                )
            except Exception:  # noqa: BLE001 - already revoked: destroy alone
                try:
                    self._admin(lambda c: c.destroy(uid))
                except Exception:  # noqa: BLE001
                    pass


BACKENDS = ["memory", "aws-kms", "byok", "managed", "azure-kv", "azure-byok", "kmip"]
REVOCATIONS = {
    "memory": ["disable", "revoke", "schedule-deletion", "delete-material", "expire"],
    "aws-kms": ["disable", "schedule-deletion"],
    "byok": ["disable", "schedule-deletion", "delete-material"],
    "managed": ["disable", "schedule-deletion"],
    "azure-kv": ["disable", "expire"],
    "azure-byok": ["disable", "expire"],
    "kmip": ["revoke-compromised", "revoke-deactivated"],
}


@pytest.fixture(scope="module")
def _backends() -> Iterator[dict[str, Backend]]:
    made: dict[str, Backend] = {}
    yield made
    for backend in made.values():
        backend.cleanup()


@pytest.fixture(params=BACKENDS)
def backend(request, _backends) -> Backend:
    return _backend_named(request, _backends, request.param)


def _backend_named(request, made: dict[str, Backend], name: str) -> Backend:
    """One harness per backend per module; the service fixture fails loudly if it is down."""
    if name not in made:
        service = {
            "aws-kms": "localstack",
            "byok": "localstack",
            "managed": "localstack",
            "azure-kv": "keyvault",
            "azure-byok": "keyvault",
            "kmip": "kmip",
        }.get(name)
        settings = request.getfixturevalue(service) if service else None
        made[name] = {
            "memory": lambda: MemoryBackend(),
            "aws-kms": lambda: AwsKmsBackend(settings),
            "byok": lambda: ByokBackend(settings),
            "managed": lambda: ManagedBackend(settings),
            "azure-kv": lambda: AzureKeyVaultBackend(settings),
            "azure-byok": lambda: AzureByokBackend(settings),
            "kmip": lambda: KmipBackend(settings),
        }[name]()
    return made[name]


def _encodings(secret: bytes) -> list[str]:
    """Ways key bytes could show up in text: hex, repr, and base64 / base64url at every
    alignment (the key may sit at any offset inside an encoded request body)."""
    out = [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + secret).decode().rstrip("=")
            out.append(text[4:-4])  # the characters that depend only on the key's bytes
    return out


def _leaks(text: str, secret: bytes) -> list[str]:
    return [enc for enc in _encodings(secret) if enc and enc in text]


# --- the contract ------------------------------------------------------------------------


def test_round_trip(backend: Backend) -> None:
    key = backend.new_key()
    provider = key.provider
    secret = SecretBytes.random(32)

    wrapped = provider.wrap(secret, context=CTX)
    again = provider.wrap(secret, context=CTX)

    assert provider.unwrap(wrapped, context=CTX) == secret
    assert provider.unwrap(again, context=dict(reversed(list(CTX.items())))) == secret  # order-free
    assert wrapped.ciphertext != again.ciphertext, "wraps must be randomised"
    assert secret.reveal() not in wrapped.ciphertext
    assert parse_key_ref(wrapped.key_ref).scheme in ("aws-kms",) + backend.schemes
    assert parse_key_ref(provider.key_ref).uri == provider.key_ref  # canonical
    assert str(len(wrapped.ciphertext)) in repr(wrapped) and wrapped.ciphertext.hex()[:16] not in repr(wrapped)


@pytest.mark.parametrize(
    "other",
    [
        {"tenant": "acme-evil", "purpose": "l2"},
        {"tenant": "acme", "purpose": "l3"},
        {"tenant": "acme"},
        {"tenant": "acme", "purpose": "l2", "extra": "x"},
    ],
    ids=["other-tenant", "other-value", "missing-entry", "extra-entry"],
)
def test_unwrap_with_another_context_is_wrong_key(backend: Backend, other: dict[str, str]) -> None:
    provider = backend.new_key().provider
    secret = SecretBytes.random(32)
    wrapped = provider.wrap(secret, context=CTX)
    with pytest.raises(WrongKeyError) as info:
        provider.unwrap(wrapped, context=other)
    assert not _leaks(str(info.value), secret.reveal())


def _tampered(wrapped: WrappedKey) -> dict[str, WrappedKey]:
    data = wrapped.ciphertext
    cases = {
        "flip-first": bytes([data[0] ^ 0x01]) + data[1:],
        "flip-middle": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x80]) + data[len(data) // 2 + 1 :],
        "flip-last": data[:-1] + bytes([data[-1] ^ 0x01]),
        "truncated": data[:-1],
        "extended": data + b"\x00",
    }
    return {name: replace(wrapped, ciphertext=blob) for name, blob in cases.items()}


def test_tampered_ciphertext_is_wrong_key(backend: Backend) -> None:
    provider = backend.new_key().provider
    secret = SecretBytes.random(32)
    wrapped = provider.wrap(secret, context=CTX)
    for name, bad in _tampered(wrapped).items():
        with pytest.raises(WrongKeyError):
            provider.unwrap(bad, context=CTX)
            pytest.fail(f"tampered ({name}) wrapped key was accepted")
    with pytest.raises(WrongKeyError):
        provider.unwrap(replace(wrapped, algorithm="something-else"), context=CTX)
    assert provider.unwrap(wrapped, context=CTX) == secret  # the original still works


def test_wrapped_key_of_another_key_is_refused(backend: Backend) -> None:
    first, second = backend.new_key().provider, backend.new_key().provider
    secret = SecretBytes.random(32)
    wrapped = first.wrap(secret, context=CTX)
    with pytest.raises(WrongKeyError):
        second.unwrap(wrapped, context=CTX)
    # ...also when the record is edited to name the second key: the ciphertext is still the first key's.
    relabelled = replace(wrapped, key_ref=second.wrap(secret, context=CTX).key_ref)
    with pytest.raises(WrongKeyError):
        second.unwrap(relabelled, context=CTX)


def test_status_enabled(backend: Backend) -> None:
    provider = backend.new_key().provider
    status = provider.status()
    assert status.state is KeyState.ENABLED and status.state.usable
    assert status.key_ref == provider.key_ref
    assert isinstance(status.key_version, str) and status.key_version


def pytest_generate_tests(metafunc) -> None:
    if "revocation_name" in metafunc.fixturenames:
        pairs = [(b, r) for b in BACKENDS for r in REVOCATIONS[b]]
        metafunc.parametrize("backend_name,revocation_name", pairs, ids=[f"{b}-{r}" for b, r in pairs])


def test_server_side_revocation_makes_the_key_unusable(
    request, _backends, backend_name: str, revocation_name: str
) -> None:
    backend = _backend_named(request, _backends, backend_name)
    key = backend.new_key()
    provider, revocation = key.provider, key.revocations[revocation_name]
    secret = SecretBytes.random(32)
    wrapped = provider.wrap(secret, context=CTX)

    revocation.revoke()

    with pytest.raises(KeyUnavailableError) as info:
        provider.unwrap(wrapped, context=CTX)
    assert info.value.state == revocation.state.value, str(info.value)
    assert provider.key_ref in str(info.value) or wrapped.key_ref in str(info.value)
    assert not _leaks(str(info.value) + repr(info.value), secret.reveal())
    with pytest.raises(KeyUnavailableError) as info:
        provider.wrap(SecretBytes.random(32), context=CTX)
    assert info.value.state == revocation.state.value, str(info.value)
    status = provider.status()
    assert status.state is revocation.state and not status.state.usable

    if revocation.restore is None:
        return
    revocation.restore()
    assert provider.status().state is KeyState.ENABLED
    assert provider.unwrap(wrapped, context=CTX) == secret
    assert provider.unwrap(provider.wrap(secret, context=CTX), context=CTX) == secret


def test_unknown_key_is_not_found(backend: Backend) -> None:
    unknown = backend.unknown_provider()
    assert unknown.status().state is KeyState.NOT_FOUND
    with pytest.raises(KeyNotFoundError) as info:
        unknown.wrap(SecretBytes.random(32), context=CTX)
    assert unknown.key_ref in str(info.value)

    real = backend.new_key().provider
    wrapped = real.wrap(SecretBytes.random(32), context=CTX)
    with pytest.raises(KeyNotFoundError):
        unknown.unwrap(backend.unknown_wrapped(wrapped, unknown), context=CTX)


def test_preflight_passes(backend: Backend) -> None:
    report = check_usable(backend.new_key().provider, CTX)
    assert report.checks[-3:] == ("state", "round-trip", "context-binding")
    assert report.status.state is KeyState.ENABLED
    assert report.wrap_seconds >= 0 and report.unwrap_seconds >= 0


def test_no_key_bytes_in_logs_or_errors(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    provider = backend.new_key().provider
    secret = SecretBytes.random(32)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):  # every library at DEBUG: botocore logs bodies there
        for name in ("botocore", "urllib3", "azure", "kmip", "archive_kms"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        try:
            wrapped = provider.wrap(secret, context=CTX)
            assert provider.unwrap(wrapped, context=CTX) == secret
            for bad_ctx in ({"tenant": "other"},):
                try:
                    provider.unwrap(wrapped, context=bad_ctx)
                except WrongKeyError as exc:
                    texts += [str(exc), repr(exc)]
            texts += [repr(wrapped), repr(provider), repr(provider.status())]
        finally:
            for name in ("botocore", "urllib3", "azure", "kmip", "archive_kms"):
                logging.getLogger(name).setLevel(logging.NOTSET)
    texts += [record.getMessage() for record in caplog.records]
    assert caplog.records or backend.name == "memory", "expected DEBUG records from the SDK"
    leaked = {enc for text in texts for enc in _leaks(text, secret.reveal())}
    assert not leaked, f"key bytes appeared in logs or errors: {sorted(leaked)[:3]}"
