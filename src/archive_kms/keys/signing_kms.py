"""The platform signing key held by AWS KMS (``keychain_signing_key_ref = aws-kms://...``):
a ``crypto.signing.RemoteSigningKey`` over one asymmetric KMS key (KeySpec
``ECC_NIST_P256``, KeyUsage ``SIGN_VERIFY``). The private key never leaves KMS.

* ``public_key()`` is ``DescribeKey`` (the key must be ``Enabled``: a disabled key fails
  the start) and ``GetPublicKey`` (KeyUsage ``SIGN_VERIFY``, KeySpec ``ECC_NIST_P256``,
  ``ECDSA_SHA_256`` among its signing algorithms); it pins the key ARN, so an alias
  re-pointed later does not move the signer to another key while it runs.
* ``sign_digest()`` is ``Sign`` with ``MessageType=DIGEST`` and ``ECDSA_SHA_256`` over the
  32-byte SHA-256 digest; KMS answers a DER ECDSA-Sig-Value, returned as r || s.

The worker's role needs ``kms:Sign``, ``kms:GetPublicKey`` and ``kms:DescribeKey`` on this key only
(docs/deployment.md). Errors are translated by ``keys.aws_kms.translate_client_error``
(one line naming the operation and the reference); transient ones (throttling, KMS
unavailable) are retried through ``archive_kms.retry``, a disabled or deleted key is not:
the operation that wanted a signature fails and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from archive_kms import clients, retry
from archive_kms.config import Settings
from archive_kms.crypto.signing import ecdsa_raw_from_der, signing_public_key_from_der
from archive_kms.errors import ArchiveKmsError, ConfigurationError, KeyUnavailableError, ValidationError
from archive_kms.keys.aws_kms import map_key_state, translate_client_error
from archive_kms.keys.refs import AwsKmsKeyRef, parse_key_ref

__all__ = ["KEY_SPEC", "SIGNING_ALGORITHM", "KmsSigningKey"]

KEY_SPEC = "ECC_NIST_P256"
SIGNING_ALGORITHM = "ECDSA_SHA_256"
# The boto3 client already retries throttling (adaptive mode); this bounds the extra
# attempts for a KMS that does not answer, so a signing call does not hang a step.
_BACKOFF = retry.Backoff(max_attempts=3, base_delay=0.2, max_delay=2.0)


class KmsSigningKey:
    """One KMS signing key. ``kms`` is a boto3 KMS client for the key's region
    (``clients.kms_client``)."""

    def __init__(self, ref: str | AwsKmsKeyRef, kms: Any, *, backoff: retry.Backoff = _BACKOFF) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, AwsKmsKeyRef):
            raise ValidationError(f"KmsSigningKey needs an aws-kms:// reference, got {parsed.uri}")
        self._ref = parsed
        self._kms = kms
        self._backoff = backoff
        self._key_arn: str | None = None  # pinned by public_key()

    @classmethod
    def from_settings(cls, ref: AwsKmsKeyRef, settings: Settings) -> KmsSigningKey:
        return cls(ref, clients.kms_client(settings, region=ref.region))

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    def __repr__(self) -> str:
        return f"KmsSigningKey({self._ref.uri!r})"

    def public_key(self) -> Any:
        metadata = self._call("DescribeKey", lambda: self._kms.describe_key(KeyId=self._ref.api_key_id))["KeyMetadata"]
        if metadata.get("KeyState") != "Enabled":
            state = map_key_state(metadata, datetime.now(UTC))
            raise KeyUnavailableError(
                f"keychain signing key (keychain_signing_key_ref): KMS key {self.key_ref} is "
                f"{metadata.get('KeyState')}; nothing can be signed",
                resource=self.key_ref,
                state=state.value,
            )
        key_arn = str(metadata["Arn"])
        response = self._call("GetPublicKey", lambda: self._kms.get_public_key(KeyId=key_arn))
        problems = []
        if response.get("KeyUsage") != "SIGN_VERIFY":
            problems.append(f"its KeyUsage is {response.get('KeyUsage')}")
        if response.get("KeySpec") != KEY_SPEC:
            problems.append(f"its KeySpec is {response.get('KeySpec')}")
        if SIGNING_ALGORITHM not in (response.get("SigningAlgorithms") or []):
            problems.append(f"it does not sign with {SIGNING_ALGORITHM}")
        if problems:
            raise ConfigurationError(
                f"KMS key {self.key_ref} cannot be the keychain signing key (keychain_signing_key_ref): "
                + "; ".join(problems)
                + f". Use an asymmetric key with KeySpec {KEY_SPEC} and KeyUsage SIGN_VERIFY.",
                resource=self.key_ref,
            )
        try:
            public_key = signing_public_key_from_der(bytes(response["PublicKey"]))
        except ValidationError as exc:
            raise ConfigurationError(f"KMS key {self.key_ref}: {exc}", resource=self.key_ref) from None
        self._key_arn = str(response["KeyId"])
        return public_key

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValidationError("a SHA-256 digest is 32 bytes")
        key_id = self._key_arn or self._ref.api_key_id
        response = self._call(
            "Sign",
            lambda: self._kms.sign(
                KeyId=key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm=SIGNING_ALGORITHM
            ),
        )
        return ecdsa_raw_from_der(bytes(response["Signature"]))

    def _call(self, operation: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        def translate(exc: BaseException) -> ArchiveKmsError:
            if isinstance(exc, (ClientError, BotoCoreError)):
                return translate_client_error(exc, operation=operation, key_ref=self.key_ref)
            return ArchiveKmsError(f"KMS {operation} for {self.key_ref} failed: {type(exc).__name__}")

        try:
            return retry.call(fn, backoff=self._backoff, translate=translate, what=f"KMS {operation} {self.key_ref}")
        except ArchiveKmsError as exc:
            # one line naming the setting, without the botocore exception chained (its
            # frames hold the request)
            error = exc
        error.args = (f"keychain signing key (keychain_signing_key_ref): {error}",)
        error.__cause__ = None
        error.__context__ = None
        error.__suppress_context__ = True
        raise error
