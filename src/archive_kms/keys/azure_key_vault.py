"""Azure Key Vault adapter (BYOKV): the customer's RSA key wraps our L2 key.

Wrap and unwrap are done *by the vault* with RSA-OAEP-256, against one key version: the
version wraps use is pinned in ``WrappedKey.key_ref``
(``azure-kv://HOST/keys/NAME/VERSION``) and unwrap addresses exactly that version, so a
rotation in the customer's vault (a new current version) never strands existing wraps and
is visible in ``status().key_version``.

Context binding. RSA-OAEP has no additional data, so the adapter binds the context itself:
the OAEP plaintext is ``context_tag(context) || key`` with
``context_tag = SHA-256("archive_kms/azure-kv-wrap/v1" || 0x00 || canonical_context)[:16]``;
unwrap compares the first 16 bytes in constant time and raises ``WrongKeyError`` on a
mismatch. OAEP is non-malleable, so a modified ciphertext fails to decrypt at the vault
(400, ``WrongKeyError``) rather than yielding a related plaintext. What this binding does
*not* give: origin authentication. Anyone holding the public key can wrap a key of their
choosing for any context; that a wrapped key record is ours is established by the signed
keychain (``crypto.signing``), not by this wrap.

Why wrap goes through ``KeyClient.send_request`` rather than ``CryptographyClient.wrap_key``:
the SDK wraps *locally* with the public key whenever it can read the key, which succeeds
on a disabled or expired key and leaves no trace in the customer's vault logs. We want the
vault to refuse a disabled key and to log every wrap, so wrap is a ``POST .../wrapkey`` to
the vault (a documented public SDK call). Unwrap uses ``CryptographyClient.unwrap_key``,
which always goes to the vault (the private key never leaves it).

Errors are translated by one module-level function, ``translate_error`` (also used by the
Key Vault signing key, ``keys.signing_key_vault``), over the answer ``VaultReply`` reads
from an SDK exception or a raw response: a 403 whose inner code is ``KeyDisabled`` /
``KeyExpired`` / ``KeyNotYetValid`` (or, without an inner code, whose message says so) ->
``KeyUnavailableError`` with the state; any other 403, and 401 -> ``KeyAccessDeniedError``;
404 -> ``KeyNotFoundError``; 400 on unwrap -> ``WrongKeyError``, on anything else ->
``ConfigurationError``; 429 -> ``KeyThrottledError`` (``retry_after`` seconds when the
vault sent ``Retry-After``, read by ``archive_kms.retry.retry_after_seconds``; azure-core
has already retried honouring it); 5xx, 408, no answer and transport errors ->
``ServiceUnavailableError``. The function is pure; the provider alone, for a 403 that
names no reason, then reads the key's state (``get``) and reports a disabled or expired key
as ``KeyUnavailableError`` rather than a denial. ``unusable_reason`` is the one check of a
key version's enabled flag and validity dates.
"""

from __future__ import annotations

import base64
import hmac
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    KeyAccessDeniedError,
    KeyError_,
    KeyNotFoundError,
    KeyThrottledError,
    KeyUnavailableError,
    ServiceUnavailableError,
    ValidationError,
    WrongKeyError,
)
from archive_kms.keys.context import TAG_SIZE, context_tag
from archive_kms.keys.port import KeyState, KeyStatus, WrappedKey
from archive_kms.keys.refs import AzureKeyVaultKeyRef, parse_key_ref, wrapped_key_ref
from archive_kms.retry import retry_after_seconds

__all__ = [
    "ALGORITHM",
    "AZURE_VAULT_SUFFIXES",
    "AzureKeyVaultKeyProvider",
    "VaultReply",
    "check_vault_host",
    "translate_error",
    "unusable_reason",
]

ALGORITHM = "azure-kv:RSA-OAEP-256+ctx16"
_LABEL = b"archive_kms/azure-kv-wrap/v1"
_WIRE_ALG = "RSA-OAEP-256"
#: Vault host suffixes of the Azure clouds; any other host must be the configured vault.
AZURE_VAULT_SUFFIXES = (
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
    ".managedhsm.azure.net",
)
# The L2 this key wraps protects archives kept for years: NIST SP 800-57 Part 1 rates
# RSA-2048 at 112-bit strength, acceptable only through 2030; RSA-3072 is 128-bit, the
# strength of everything else on the path (HKDF-SHA-256 keys, search tokens).
_MIN_RSA_BITS = 3072


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AzureKeyVaultKeyProvider:
    """KeyProvider over one Key Vault key (optionally pinned to one version).

    ``key_client`` is a KeyClient for the key's vault (``clients.keyvault_key_client_for``);
    ``crypto_client_for(key_id)`` builds a CryptographyClient for a versioned key id
    (``clients.keyvault_crypto_client``). ``clock`` gives UTC now (expiry in ``status``).
    """

    algorithm = ALGORITHM

    def __init__(
        self,
        ref: str | AzureKeyVaultKeyRef,
        key_client: Any,
        crypto_client_for: Callable[[str], Any],
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, AzureKeyVaultKeyRef):
            raise ValidationError(f"AzureKeyVaultKeyProvider needs an azure-kv:// reference, got {parsed.uri}")
        self._ref = parsed
        self._keys = key_client
        self._crypto_for = crypto_client_for
        self._clock = clock
        self._lock = threading.Lock()
        self._crypto: dict[str, Any] = {}  # versioned key id -> CryptographyClient (each GETs its key once)

    @classmethod
    def from_settings(cls, ref: AzureKeyVaultKeyRef, settings: Settings) -> AzureKeyVaultKeyProvider:
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
        return f"AzureKeyVaultKeyProvider({self._ref.uri!r})"

    # --- KeyProvider ---------------------------------------------------------------------

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        tag = context_tag(context, _LABEL)
        version = self._ref.version or self._current_version()
        target = self._ref.with_version(version)
        body = {"alg": _WIRE_ALG, "value": _b64url(tag + key.reveal())}
        response = self._send("wrapKey", target, "POST", f"/keys/{target.name}/{version}/wrapkey", body)
        kid = str(response.get("kid", ""))
        if not kid.rstrip("/").endswith(f"/keys/{target.name}/{version}"):
            raise ServiceUnavailableError(
                f"Key Vault wrapKey for {target.uri} answered for another key version", resource=target.uri
            )
        return WrappedKey(key_ref=target.uri, algorithm=ALGORITHM, ciphertext=_unb64url(str(response["value"])))

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        from azure.core.exceptions import AzureError
        from azure.keyvault.keys.crypto import KeyWrapAlgorithm

        tag = context_tag(context, _LABEL)
        target = self._owned(wrapped)
        error: ArchiveKmsError | None = None
        try:
            plain = self._crypto_client(target).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.ciphertext).key
        except AzureError as exc:
            error = self._translate(exc, "unwrapKey", target)
        if error is not None:
            raise error
        if len(plain) <= TAG_SIZE or not hmac.compare_digest(plain[:TAG_SIZE], tag):
            raise WrongKeyError(
                f"wrapped key under {target.uri} was made for another context (wrong tenant or context)",
                resource=target.uri,
            )
        return SecretBytes(plain[TAG_SIZE:])

    def status(self) -> KeyStatus:
        try:
            key = self._get_key(self._ref)
        except KeyNotFoundError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.NOT_FOUND)
        except KeyAccessDeniedError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.ACCESS_DENIED)
        props = key.properties
        return KeyStatus(
            key_ref=self.key_ref,
            state=self._state_of(props),
            key_version=props.version,
            expires_at=props.expires_on,
            details=self._details(key),
        )

    def check_metadata(self) -> dict[str, str]:
        """Preflight: an RSA key of at least 3072 bits whose key_ops allow wrapKey and unwrapKey."""
        key = self._get_key(self._ref)
        details = self._details(key)
        problems = []
        if details["kty"] not in ("RSA", "RSA-HSM"):
            problems.append(f"its type is {details['kty']} (an RSA key is needed for RSA-OAEP-256 wraps)")
        elif int(details["key_size"]) < _MIN_RSA_BITS:
            problems.append(
                f"it is RSA-{details['key_size']}; at least RSA-{_MIN_RSA_BITS} is required (it wraps a long-lived "
                "key: RSA-2048 is rated only to 2030, docs/key-providers.md)"
            )
        ops = set(details["key_ops"].split(",")) if details["key_ops"] else set()
        missing = {"wrapKey", "unwrapKey"} - ops
        if missing:
            problems.append(f"its permitted operations lack {', '.join(sorted(missing))}")
        if problems:
            raise ConfigurationError(
                f"key {self.key_ref} cannot be used as a tenant master key: " + "; ".join(problems),
                resource=self.key_ref,
            )
        return details

    # --- internals -----------------------------------------------------------------------

    def _state_of(self, props: Any) -> KeyState:
        unusable = unusable_reason(props, self._clock())
        return unusable[0] if unusable else KeyState.ENABLED

    @staticmethod
    def _details(key: Any) -> dict[str, str]:
        props = key.properties
        n = getattr(key.key, "n", None)
        out = {
            "kty": str(getattr(key.key_type, "value", key.key_type)),
            "key_size": str(len(n) * 8 if n else 0),
            "key_ops": ",".join(str(getattr(op, "value", op)) for op in (key.key_operations or [])),
            "version": str(props.version),
            "enabled": str(bool(props.enabled)).lower(),
            "vault": props.vault_url or "",
        }
        if props.not_before is not None:
            out["not_before"] = props.not_before.isoformat()
        if props.recovery_level:
            out["recovery_level"] = str(getattr(props.recovery_level, "value", props.recovery_level))
        return out

    def _current_version(self) -> str:
        key = self._get_key(self._ref)
        state = self._state_of(key.properties)
        if not state.usable:
            raise KeyUnavailableError(
                f"Key Vault key {self.key_ref} is {state.value} (current version {key.properties.version})",
                resource=self.key_ref,
                state=state.value,
            )
        return str(key.properties.version)

    def _get_key(self, ref: AzureKeyVaultKeyRef) -> Any:
        from azure.core.exceptions import AzureError

        error: ArchiveKmsError | None = None
        try:
            return self._keys.get_key(ref.name, ref.version)
        except AzureError as exc:
            error = translate_error(exc, "get", ref, needs=_NEEDS)
        raise error

    def _crypto_client(self, ref: AzureKeyVaultKeyRef) -> Any:
        with self._lock:
            client = self._crypto.get(ref.key_id)
            if client is None:
                client = self._crypto[ref.key_id] = self._crypto_for(ref.key_id)
            return client

    def _owned(self, wrapped: WrappedKey) -> AzureKeyVaultKeyRef:
        ref = wrapped_key_ref(wrapped, algorithm=ALGORITHM, owner=self.key_ref)
        if (
            not isinstance(ref, AzureKeyVaultKeyRef)
            or ref.version is None
            or not ref.same_key(self._ref)
            or (self._ref.version is not None and ref.version != self._ref.version)
        ):
            raise WrongKeyError(f"wrapped key belongs to {ref.uri}, not {self.key_ref}", resource=self.key_ref)
        return ref

    def _send(
        self, operation: str, ref: AzureKeyVaultKeyRef, method: str, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        from azure.core.exceptions import AzureError
        from azure.core.rest import HttpRequest

        error: ArchiveKmsError | None = None
        try:
            response = self._keys.send_request(HttpRequest(method, path, json=body))
        except AzureError as exc:
            error = self._translate(exc, operation, ref)
        if error is not None:
            raise error
        if response.status_code >= 400:
            raise self._translate(VaultReply.from_response(response), operation, ref)
        return cast("dict[str, Any]", response.json())

    def _translate(self, answer: Exception | VaultReply, operation: str, ref: AzureKeyVaultKeyRef) -> ArchiveKmsError:
        """``translate_error``, then, for a 403 that names no reason, the key's state: a
        key found disabled or expired is reported as such, not as a denial."""
        error = translate_error(answer, operation, ref, needs=_NEEDS)
        reply = answer if isinstance(answer, VaultReply) else VaultReply.from_exception(answer)
        if (
            isinstance(error, KeyAccessDeniedError)
            and reply is not None
            and reply.status == 403
            and "not permitted" not in reply.message.lower()
        ):
            state = self._state_quietly(ref)
            if state is not None and not state.usable:
                return KeyUnavailableError(
                    f"Key Vault {operation} for {ref.uri}: the key is {state.value} ({reply.said})",
                    resource=ref.uri,
                    state=state.value,
                )
        return error

    def _state_quietly(self, ref: AzureKeyVaultKeyRef) -> KeyState | None:
        try:
            return self._state_of(self._keys.get_key(ref.name, ref.version).properties)
        except Exception:  # noqa: BLE001 - only used to enrich another error
            return None


#: What the provider's identity needs, named in its access-denied errors.
_NEEDS = "the key's permitted operations and our role assignment must allow wrapKey, unwrapKey and get"
#: Inner error codes of a 403 about the key version's state (not about our identity).
_STATE_CODES = {
    "KeyDisabled": (KeyState.DISABLED, "is disabled"),
    "KeyExpired": (KeyState.MATERIAL_EXPIRED, "has expired"),
    "KeyNotYetValid": (KeyState.DISABLED, "is not valid yet"),
}


def unusable_reason(props: Any, now: datetime) -> tuple[KeyState, str] | None:
    """Why a key version (its ``KeyProperties``) cannot be used at ``now``: its state and
    a phrase (``is disabled``, ``has expired``, ``is not valid yet``); None if usable."""
    if not props.enabled:
        return _STATE_CODES["KeyDisabled"]
    if props.expires_on is not None and props.expires_on <= now:
        return _STATE_CODES["KeyExpired"]
    if props.not_before is not None and props.not_before > now:
        return _STATE_CODES["KeyNotYetValid"]
    return None


@dataclass(frozen=True)
class VaultReply:
    """What a Key Vault error answer said: HTTP status, error code and message (first 300
    characters), inner error code, and ``Retry-After`` in seconds."""

    status: int
    code: str = ""
    message: str = ""
    inner: str = ""
    retry_after: float | None = None

    @property
    def said(self) -> str:
        return f"{self.status} {self.code}: {self.message}".strip()

    @classmethod
    def from_exception(cls, exc: BaseException) -> VaultReply | None:
        """The answer carried by an SDK ``HttpResponseError``; None when the vault did not
        answer (a transport error, or any other exception)."""
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        if isinstance(exc, (ServiceRequestError, ServiceResponseError)) or not isinstance(exc, HttpResponseError):
            return None
        err = getattr(exc, "error", None)
        innererror = getattr(err, "innererror", None)
        return cls(
            status=int(exc.status_code or 0),
            code=str(getattr(err, "code", "") or ""),
            message=str(getattr(err, "message", "") or "")[:300],
            inner=str(innererror.get("code", "")) if isinstance(innererror, Mapping) else "",
            retry_after=retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None)),
        )

    @classmethod
    def from_response(cls, response: Any) -> VaultReply:
        """The answer of a raw ``send_request`` response with status >= 400."""
        try:
            payload = response.json().get("error", {})
        except ValueError:
            payload = {}
        if not isinstance(payload, Mapping):
            payload = {}
        inner = payload.get("innererror")
        return cls(
            status=int(response.status_code),
            code=str(payload.get("code", "") or ""),
            message=str(payload.get("message", "") or "")[:300],
            inner=str(inner.get("code", "")) if isinstance(inner, Mapping) else "",
            retry_after=retry_after_seconds(response.headers),
        )


def translate_error(
    answer: BaseException | VaultReply,
    operation: str,
    ref: AzureKeyVaultKeyRef,
    *,
    needs: str,
    setting: str = "",
) -> ArchiveKmsError:
    """The ``archive_kms.errors`` error for a failed Key Vault ``operation`` on ``ref``: an
    SDK exception (``AzureError``) or a ``VaultReply``. Pure: it asks the vault nothing.
    ``needs`` says what our identity needs (in access-denied errors); ``setting`` prefixes
    every message (the signing key names its setting)."""
    where = f"{setting + ': ' if setting else ''}Key Vault {operation} for {ref.uri}"
    reply = answer if isinstance(answer, VaultReply) else VaultReply.from_exception(answer)
    if reply is None:
        return ServiceUnavailableError(f"{where}: the vault did not answer ({type(answer).__name__})", resource=ref.uri)
    status, said = reply.status, reply.said
    if status == 403:
        state = _STATE_CODES.get(reply.inner)
        if state is None and not reply.inner and reply.code == "Forbidden":
            lowered = reply.message.lower()
            for marker, inner in (
                ("disabled", "KeyDisabled"),
                ("expired", "KeyExpired"),
                ("not yet valid", "KeyNotYetValid"),
            ):
                if marker in lowered:
                    state = _STATE_CODES[inner]
                    break
        if state is not None:
            return KeyUnavailableError(f"{where}: the key {state[1]} ({said})", resource=ref.uri, state=state[0].value)
        return KeyAccessDeniedError(f"{where}: not permitted ({said}); {needs}", resource=ref.uri)
    if status == 401:
        return KeyAccessDeniedError(f"{where}: not authenticated ({said}); {needs}", resource=ref.uri)
    if status == 404:
        return KeyNotFoundError(f"{where}: no such key or version ({said})", resource=ref.uri)
    if status == 400 and operation == "unwrapKey":
        return WrongKeyError(
            f"{where}: the wrapped key does not decrypt under this key version ({reply.code})", resource=ref.uri
        )
    if status == 429:
        error = KeyThrottledError(f"{where}: throttled ({said})", resource=ref.uri)
        error.retry_after = reply.retry_after
        return error
    if status >= 500 or status == 408:
        return ServiceUnavailableError(f"{where}: the vault is unavailable ({said})", resource=ref.uri)
    if status == 400:
        return ConfigurationError(f"{where}: the vault rejected the request ({said})", resource=ref.uri)
    return KeyError_(f"{where} failed ({said})", resource=ref.uri)


def check_vault_host(ref: AzureKeyVaultKeyRef, settings: Any) -> None:
    """Refuse vault hosts that are neither an Azure vault nor the configured vault: our Azure
    credential would otherwise send a Key Vault token to whatever host a reference names."""
    configured = getattr(settings, "azure_keyvault_url", None)
    if configured:
        parts = urlsplit(configured)
        port = parts.port if parts.port not in (None, 443) else None
        if (parts.hostname, port) == (ref.host, ref.port):
            return
    if ref.port is None and ref.host.endswith(AZURE_VAULT_SUFFIXES):
        return
    raise ConfigurationError(
        f"key {ref.uri}: {ref.host} is not an Azure Key Vault host ({', '.join(AZURE_VAULT_SUFFIXES)}) nor the "
        f"configured vault (ARCHIVE_KMS_AZURE_KEYVAULT_URL); refusing to send credentials to it",
        resource=ref.uri,
    )
