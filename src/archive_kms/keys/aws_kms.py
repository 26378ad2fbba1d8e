"""AWS KMS adapter: BYOKMS (a customer's KMS key, by ARN or alias), BYOK-imported keys
(``keys.byok``) and, through ``keys.managed``, the platform key.

Wrap is ``kms:Encrypt`` of the L2 key with ``EncryptionContext = context`` (KMS binds and
authenticates the context; a key policy or grant can require ``kms:EncryptionContext:tenant``).
Unwrap is ``kms:Decrypt`` with ``KeyId`` pinned to the key ARN recorded at wrap time and the
same context, so a ciphertext made under any other key is refused (``IncorrectKeyException``)
instead of being decrypted by whichever key made it. ``WrappedKey.key_ref`` is always the
key ARN (``aws-kms://arn:...:key/ID``), also when the provider was resolved from an alias,
so re-pointing an alias never strands existing wraps.

Status comes from ``DescribeKey``; ``CurrentKeyMaterialId`` is the ``key_version`` (it
changes when KMS rotates the material), ``ValidTo`` is the expiry of imported material.

Vendor errors are translated here, at the edge (see :func:`translate_client_error`).
botocore logs request and response bodies at DEBUG level, which for Encrypt and Decrypt
carry the plaintext key in base64; this module installs a logging filter that replaces
any such record (see :class:`_RedactKmsPlaintext`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
from archive_kms.keys.context import check_context
from archive_kms.keys.port import KeyState, KeyStatus, WrappedKey
from archive_kms.keys.refs import AwsKmsKeyRef, parse_key_ref, wrapped_key_ref

__all__ = [
    "ALGORITHM",
    "AwsKmsKeyProvider",
    "KmsKeyDescription",
    "map_key_state",
    "translate_client_error",
]

ALGORITHM = "aws-kms:SYMMETRIC_DEFAULT"

# KMS KeyState -> our vocabulary. Unavailable (custom key store disconnected), Creating and
# Updating are "not usable now, a human must act" and read as DISABLED (raw state in details).
_STATES = {
    "Enabled": KeyState.ENABLED,
    "Disabled": KeyState.DISABLED,
    "PendingDeletion": KeyState.PENDING_DELETION,
    "PendingReplicaDeletion": KeyState.PENDING_DELETION,
    "PendingImport": KeyState.PENDING_IMPORT,
    "Unavailable": KeyState.DISABLED,
    "Creating": KeyState.DISABLED,
    "Updating": KeyState.DISABLED,
}

_THROTTLED = {"ThrottlingException", "LimitExceededException", "TooManyRequestsException", "RequestLimitExceeded"}
_UNAVAILABLE = {
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "InternalError",
    "ServiceUnavailable",
    "InternalFailure",
}
_WRONG_KEY = {"InvalidCiphertextException", "IncorrectKeyException"}
_DENIED = {
    "AccessDeniedException",
    "InvalidGrantTokenException",
    "InvalidGrantIdException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
}
_MISCONFIGURED = {
    "InvalidKeyUsageException",
    "UnsupportedOperationException",
    "KMSInvalidMacException",
    "ValidationException",
    "InvalidArnException",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --- logging hygiene ---------------------------------------------------------------------


class _RedactKmsPlaintext(logging.Filter):
    """Replaces botocore DEBUG records that carry a KMS ``Plaintext`` field.

    botocore.endpoint logs each request dict and botocore.parsers each response body at
    DEBUG; for Encrypt/Decrypt/GenerateDataKey those contain the key in base64. Filters run
    only for records that pass the level check, so this costs nothing when DEBUG is off.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to fix
            return True
        if "Plaintext" in text:
            record.msg = "[archive_kms redacted a botocore record carrying a KMS Plaintext field]"
            record.args = ()
        return True


def _install_log_redaction() -> None:
    for name in ("botocore.endpoint", "botocore.parsers", "botocore.hooks", "botocore.retryhandler"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactKmsPlaintext) for f in logger.filters):
            logger.addFilter(_RedactKmsPlaintext())


_install_log_redaction()


# --- error translation -------------------------------------------------------------------


def _error_code(exc: Exception) -> tuple[str, str, int]:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), str(error.get("Message", ""))[:300], int(status or 0)


def translate_client_error(
    exc: Exception,
    *,
    operation: str,
    key_ref: str,
    state_of: Callable[[], KeyState | None] | None = None,
) -> ArchiveKmsError:
    """The archive_kms error for a botocore exception raised by a KMS call.

    ``state_of`` is asked for the key's state when KMS says ``KMSInvalidStateException``
    (the exception does not say which state). Messages name the operation and the key
    reference and quote KMS's code and message (KMS never echoes plaintext).
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return ServiceUnavailableError(
            f"KMS {operation} for {key_ref}: KMS did not answer ({type(exc).__name__})", resource=key_ref
        )
    if isinstance(exc, NoCredentialsError):
        return ConfigurationError(f"KMS {operation} for {key_ref}: no AWS credentials configured", resource=key_ref)
    if not isinstance(exc, ClientError):
        return ServiceUnavailableError(f"KMS {operation} for {key_ref} failed: {type(exc).__name__}", resource=key_ref)
    code, message, status = _error_code(exc)
    said = f"{code}: {message}" if message else code
    where = f"KMS {operation} for {key_ref}"
    if code == "DisabledException":
        return KeyUnavailableError(
            f"{where}: the key is disabled ({said})", resource=key_ref, state=KeyState.DISABLED.value
        )
    if code == "KMSInvalidStateException":
        state = state_of() if state_of else None
        if state is None or state is KeyState.ENABLED:
            state_text = "not usable"
        else:
            state_text = state.value
        return KeyUnavailableError(
            f"{where}: the key is {state_text} ({said})",
            resource=key_ref,
            state=state.value if state is not None else None,
        )
    if code == "NotFoundException":
        return KeyNotFoundError(f"{where}: no such key ({said}); check the ARN, region and account", resource=key_ref)
    if code in _DENIED:
        return KeyAccessDeniedError(
            f"{where}: access denied ({said}); the key policy or grant must allow "
            f"kms:{operation} for the platform role",
            resource=key_ref,
        )
    if code in _WRONG_KEY:
        return WrongKeyError(
            f"{where}: the ciphertext does not belong to this key and context ({code})", resource=key_ref
        )
    if code in _THROTTLED or status == 429:
        return KeyThrottledError(f"{where}: throttled by KMS ({said})", resource=key_ref)
    if code in _UNAVAILABLE or status >= 500:
        return ServiceUnavailableError(f"{where}: KMS is unavailable ({said})", resource=key_ref)
    if code in _MISCONFIGURED:
        return ConfigurationError(f"{where}: the key cannot be used this way ({said})", resource=key_ref)
    return KeyError_(f"{where} failed ({said})", resource=key_ref)


def map_key_state(metadata: Mapping[str, Any], now: datetime) -> KeyState:
    """Our state for a ``KeyMetadata``: imported material past ``ValidTo`` is MATERIAL_EXPIRED."""
    valid_to = metadata.get("ValidTo")
    if metadata.get("ExpirationModel") == "KEY_MATERIAL_EXPIRES" and isinstance(valid_to, datetime) and valid_to <= now:
        return KeyState.MATERIAL_EXPIRED
    return _STATES.get(str(metadata.get("KeyState")), KeyState.DISABLED)


@dataclass(frozen=True)
class KmsKeyDescription:
    """The parts of ``DescribeKey`` preflight and status use."""

    arn: str
    region: str
    account: str
    key_state: str
    key_spec: str
    key_usage: str
    origin: str
    key_manager: str
    multi_region_type: str | None
    expiration_model: str | None
    valid_to: datetime | None
    key_material_id: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> KmsKeyDescription:
        arn = str(md["Arn"])
        parts = arn.split(":")
        mrc = md.get("MultiRegionConfiguration") or {}
        return cls(
            arn=arn,
            region=parts[3] if len(parts) > 3 else "",
            account=parts[4] if len(parts) > 4 else str(md.get("AWSAccountId", "")),
            key_state=str(md.get("KeyState", "")),
            key_spec=str(md.get("KeySpec") or md.get("CustomerMasterKeySpec") or ""),
            key_usage=str(md.get("KeyUsage", "")),
            origin=str(md.get("Origin", "")),
            key_manager=str(md.get("KeyManager", "")),
            multi_region_type=mrc.get("MultiRegionKeyType") if md.get("MultiRegion") else None,
            expiration_model=md.get("ExpirationModel"),
            valid_to=md.get("ValidTo"),
            key_material_id=md.get("CurrentKeyMaterialId"),
            raw=dict(md),
        )

    def details(self) -> dict[str, str]:
        out = {
            "arn": self.arn,
            "region": self.region,
            "account": self.account,
            "aws_key_state": self.key_state,
            "key_spec": self.key_spec,
            "key_usage": self.key_usage,
            "origin": self.origin,
            "key_manager": self.key_manager,
        }
        if self.multi_region_type:
            out["multi_region_type"] = self.multi_region_type
        if self.expiration_model:
            out["expiration_model"] = self.expiration_model
        return out


class AwsKmsKeyProvider:
    """KeyProvider over one KMS key (customer's or ours).

    ``kms`` is a ready boto3 KMS client for the key's region (``clients.kms_client``);
    ``clock`` returns the current UTC time (material expiry).
    """

    algorithm = ALGORITHM

    def __init__(self, ref: str | AwsKmsKeyRef, kms: Any, *, clock: Callable[[], datetime] = _utcnow) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, AwsKmsKeyRef):
            raise ValidationError(f"AwsKmsKeyProvider needs an aws-kms:// reference, got {parsed.uri}")
        self._ref = parsed
        self._kms = kms
        self._clock = clock
        self._alias_target: str | None = None  # key ARN behind an alias reference

    @classmethod
    def from_settings(cls, ref: AwsKmsKeyRef, settings: Settings) -> AwsKmsKeyProvider:
        return cls(ref, clients.kms_client(settings, region=ref.region))

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    @property
    def ref(self) -> AwsKmsKeyRef:
        return self._ref

    def __repr__(self) -> str:
        return f"AwsKmsKeyProvider({self._ref.uri!r})"

    # --- KeyProvider ---------------------------------------------------------------------

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        ctx = check_context(context)
        response = self._call(
            "Encrypt",
            self._ref.uri,
            self._ref.api_key_id,
            lambda: self._kms.encrypt(
                KeyId=self._ref.api_key_id,
                Plaintext=key.reveal(),
                EncryptionContext=ctx,
                EncryptionAlgorithm="SYMMETRIC_DEFAULT",
            ),
        )
        used = parse_key_ref(f"aws-kms://{response['KeyId']}")
        return WrappedKey(key_ref=used.uri, algorithm=ALGORITHM, ciphertext=bytes(response["CiphertextBlob"]))

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        ctx = check_context(context)
        key_arn = self._owned_key_arn(wrapped)
        response = self._call(
            "Decrypt",
            wrapped.key_ref,
            key_arn,
            lambda: self._kms.decrypt(
                KeyId=key_arn,
                CiphertextBlob=wrapped.ciphertext,
                EncryptionContext=ctx,
                EncryptionAlgorithm="SYMMETRIC_DEFAULT",
            ),
        )
        if response.get("KeyId") != key_arn:  # defence in depth: KMS honoured the pinned KeyId
            raise WrongKeyError(f"KMS Decrypt for {wrapped.key_ref} answered for another key", resource=self.key_ref)
        return SecretBytes(response["Plaintext"])

    def status(self) -> KeyStatus:
        try:
            description = self.describe()
        except KeyNotFoundError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.NOT_FOUND)
        except KeyAccessDeniedError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.ACCESS_DENIED)
        return KeyStatus(
            key_ref=self.key_ref,
            state=map_key_state(description.raw, self._clock()),
            key_version=description.key_material_id,
            expires_at=description.valid_to,
            details=description.details(),
        )

    # --- metadata ------------------------------------------------------------------------

    def describe(self) -> KmsKeyDescription:
        """``DescribeKey`` of this key; raises KeyNotFoundError / KeyAccessDeniedError / ..."""
        response = self._call(
            "DescribeKey",
            self.key_ref,
            self._ref.api_key_id,
            lambda: self._kms.describe_key(KeyId=self._ref.api_key_id),
            describe_state=False,
        )
        return KmsKeyDescription.from_metadata(response["KeyMetadata"])

    def check_metadata(self) -> dict[str, str]:
        """Preflight: the key must be a symmetric ENCRYPT_DECRYPT customer managed key in the
        region the reference (and our client) names, and not a multi-Region replica.
        Raises ConfigurationError saying what to change; returns the key's details."""
        d = self.describe()
        problems = []
        if d.key_spec != "SYMMETRIC_DEFAULT":
            problems.append(f"its KeySpec is {d.key_spec} (asymmetric or HMAC keys cannot wrap keys)")
        if d.key_usage != "ENCRYPT_DECRYPT":
            problems.append(f"its KeyUsage is {d.key_usage}")
        if d.key_manager == "AWS":
            problems.append("it is an AWS managed key, which cannot be shared")
        client_region = getattr(getattr(self._kms, "meta", None), "region_name", None)
        if self._ref.region and d.region != self._ref.region:
            problems.append(f"it lives in {d.region}, but the reference names {self._ref.region}")
        if client_region and d.region != client_region:
            problems.append(f"it lives in {d.region}, but our KMS client is for {client_region}")
        if self._ref.account and d.account != self._ref.account:
            problems.append(f"it belongs to account {d.account}, but the reference names {self._ref.account}")
        if d.multi_region_type == "REPLICA":
            problems.append("it is a multi-Region replica: reference the primary key's ARN")
        if problems:
            raise ConfigurationError(
                f"key {self.key_ref} cannot be used as a tenant master key: "
                + "; ".join(problems)
                + ". Use a symmetric encryption key (KeySpec SYMMETRIC_DEFAULT, KeyUsage ENCRYPT_DECRYPT).",
                resource=self.key_ref,
            )
        return d.details()

    # --- internals -----------------------------------------------------------------------

    def _owned_key_arn(self, wrapped: WrappedKey) -> str:
        ref = wrapped_key_ref(wrapped, algorithm=ALGORITHM, owner=self.key_ref)
        if not isinstance(ref, AwsKmsKeyRef) or not ref.is_key_arn:
            raise WrongKeyError(f"wrapped key names {ref.uri}, not a KMS key ARN", resource=self.key_ref)
        if self._ref.is_key_arn:
            if ref != self._ref:
                raise WrongKeyError(f"wrapped key belongs to {ref.uri}, not {self.key_ref}", resource=self.key_ref)
            return ref.api_key_id
        # An alias: only the key it points to. Looked up once, and again before refusing, in
        # case the alias was re-pointed since. Wraps under the alias's previous key are then
        # refused here; rotation unwraps them through a provider for their own key ARN.
        if self._alias_target is None or self._alias_target != ref.api_key_id:
            self._alias_target = self.describe().arn
        if ref.api_key_id != self._alias_target:
            raise WrongKeyError(
                f"wrapped key belongs to {ref.uri}, but {self.key_ref} points to aws-kms://{self._alias_target}",
                resource=self.key_ref,
            )
        return ref.api_key_id

    def _state_now(self, key_id: str) -> KeyState | None:
        try:
            response = self._kms.describe_key(KeyId=key_id)
        except Exception:  # noqa: BLE001 - only used to enrich another error
            return None
        return map_key_state(response["KeyMetadata"], self._clock())

    def _call(
        self, operation: str, key_ref: str, key_id: str, fn: Callable[[], Any], *, describe_state: bool = True
    ) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            state_of = (lambda: self._state_now(key_id)) if describe_state else None
            error = translate_client_error(exc, operation=operation, key_ref=key_ref, state_of=state_of)
        # Raised outside the handler so the botocore exception (whose traceback frames hold
        # the request parameters, plaintext included) is not chained to ours.
        raise error
