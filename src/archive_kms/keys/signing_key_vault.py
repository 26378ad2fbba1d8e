"""The platform signing key held by Azure Key Vault (``keychain_signing_key_ref =
azure-kv://HOST/keys/NAME[/VERSION]``): a ``crypto.signing.RemoteSigningKey`` over one EC
key on curve P-256 (``kty`` ``EC`` or ``EC-HSM``). The private key never leaves the vault.

* ``public_key()`` is ``get`` of the key: it checks the version is enabled, within its
  validity dates, an EC P-256 key whose ``key_ops`` include ``sign``, and pins that
  version (the current one when the reference names none). A new version created in the
  vault later is a new signing key (a new key id): this signer keeps signing with the
  pinned version until it is rebuilt, and the old version's public key must then be
  listed in ``keychain_previous_public_keys_path`` (docs/key-hierarchy.md).
* ``sign_digest()`` is ``sign`` with ``ES256`` over the 32-byte SHA-256 digest
  (``CryptographyClient.sign``, always done by the vault); Key Vault answers the raw
  64-byte r || s.

The worker's identity needs the ``keys/get`` and ``keys/sign`` data actions on this key
(Key Vault Crypto User, or an access policy with get and sign). Errors are translated into
``archive_kms.errors`` by the Key Vault key provider's ``translate_error`` (one line naming
the setting and the reference), and the key version's enabled flag and validity dates are
checked by its ``unusable_reason``; transient errors are retried through
``archive_kms.retry``; a disabled or expired key is not.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from archive_kms import clients, retry
from archive_kms.config import Settings
from archive_kms.crypto.signing import ecdsa_p256_public_key_from_xy
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    IntegrityError,
    KeyUnavailableError,
    ValidationError,
)
from archive_kms.keys.azure_key_vault import check_vault_host, translate_error, unusable_reason
from archive_kms.keys.port import KeyState
from archive_kms.keys.refs import AzureKeyVaultKeyRef, parse_key_ref

__all__ = ["KeyVaultSigningKey"]

_SETTING = "keychain signing key (keychain_signing_key_ref)"
_NEEDS = "our identity needs get and sign on this key"
_BACKOFF = retry.Backoff(max_attempts=3, base_delay=0.2, max_delay=2.0)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class KeyVaultSigningKey:
    """One Key Vault signing key. ``key_client`` is a KeyClient for the key's vault
    (``clients.keyvault_key_client_for``); ``crypto_client_for(key_id)`` builds a
    CryptographyClient for a versioned key id (``clients.keyvault_crypto_client``)."""

    def __init__(
        self,
        ref: str | AzureKeyVaultKeyRef,
        key_client: Any,
        crypto_client_for: Callable[[str], Any],
        *,
        clock: Callable[[], datetime] = _utcnow,
        backoff: retry.Backoff = _BACKOFF,
    ) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, AzureKeyVaultKeyRef):
            raise ValidationError(f"KeyVaultSigningKey needs an azure-kv:// reference, got {parsed.uri}")
        self._ref = parsed
        self._keys = key_client
        self._crypto_for = crypto_client_for
        self._clock = clock
        self._backoff = backoff
        self._pinned: AzureKeyVaultKeyRef | None = None  # the version public_key() pinned
        self._crypto: Any = None

    @classmethod
    def from_settings(cls, ref: AzureKeyVaultKeyRef, settings: Settings) -> KeyVaultSigningKey:
        check_vault_host(ref, settings)
        return cls(
            ref,
            clients.keyvault_key_client_for(ref.vault_url, settings),
            lambda key_id: clients.keyvault_crypto_client(key_id, settings),
        )

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    def __repr__(self) -> str:
        return f"KeyVaultSigningKey({self._ref.uri!r})"

    def public_key(self) -> Any:
        key = self._call("get", self._ref, lambda: self._keys.get_key(self._ref.name, self._ref.version))
        props = key.properties
        version = self._ref.with_version(str(props.version))
        unusable = unusable_reason(props, self._clock())
        if unusable is not None:
            raise self._unavailable(version, unusable[1], unusable[0])
        jwk = key.key
        kty = str(getattr(key.key_type, "value", key.key_type))
        crv = str(getattr(jwk.crv, "value", jwk.crv)) if getattr(jwk, "crv", None) else ""
        ops = {str(getattr(op, "value", op)) for op in (key.key_operations or [])}
        problems = []
        if kty not in ("EC", "EC-HSM"):
            problems.append(f"its type is {kty}")
        elif crv != "P-256":
            problems.append(f"its curve is {crv or 'unknown'}")
        if "sign" not in ops:
            problems.append("its permitted operations lack sign")
        if problems:
            raise ConfigurationError(
                f"Key Vault key {version.uri} cannot be the {_SETTING}: "
                + "; ".join(problems)
                + ". Use an EC key on curve P-256 (kty EC or EC-HSM) that may sign.",
                resource=self.key_ref,
            )
        try:
            public_key = ecdsa_p256_public_key_from_xy(bytes(jwk.x), bytes(jwk.y))
        except ValidationError as exc:
            raise ConfigurationError(f"Key Vault key {version.uri}: {exc}", resource=self.key_ref) from None
        self._pinned = version
        self._crypto = None
        return public_key

    def sign_digest(self, digest: bytes) -> bytes:
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        if len(digest) != 32:
            raise ValidationError("a SHA-256 digest is 32 bytes")
        if self._pinned is None:
            self.public_key()
        pinned = self._pinned
        assert pinned is not None
        if self._crypto is None:
            self._crypto = self._crypto_for(pinned.key_id)
        crypto = self._crypto
        result = self._call("sign", pinned, lambda: crypto.sign(SignatureAlgorithm.es256, digest))
        answered = str(getattr(result, "key_id", "") or "")
        # key names are case-insensitive in Key Vault; the version is exact
        if not answered.rstrip("/").lower().endswith(f"/keys/{pinned.name}/{pinned.version}".lower()):
            raise IntegrityError(
                f"{_SETTING}: Key Vault sign for {pinned.uri} answered for another key ({answered})",
                resource=self.key_ref,
            )
        return bytes(result.signature)

    # --- internals -----------------------------------------------------------------------

    def _unavailable(self, ref: AzureKeyVaultKeyRef, what: str, state: KeyState) -> KeyUnavailableError:
        return KeyUnavailableError(
            f"{_SETTING}: Key Vault key {ref.uri} {what}; nothing can be signed",
            resource=self.key_ref,
            state=state.value,
        )

    def _call(self, operation: str, ref: AzureKeyVaultKeyRef, fn: Callable[[], Any]) -> Any:
        from azure.core.exceptions import AzureError

        def translate(exc: BaseException) -> ArchiveKmsError:
            if isinstance(exc, AzureError):
                return translate_error(exc, operation, ref, needs=_NEEDS, setting=_SETTING)
            return ArchiveKmsError(f"{_SETTING}: Key Vault {operation} for {ref.uri} failed: {type(exc).__name__}")

        try:
            return retry.call(fn, backoff=self._backoff, translate=translate, what=f"Key Vault {operation} {ref.uri}")
        except ArchiveKmsError as exc:
            error = exc
        error.__cause__ = None  # one line; the SDK exception holds the request
        error.__context__ = None
        error.__suppress_context__ = True
        raise error
