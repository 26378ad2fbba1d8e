"""BYOK: the customer's own key material, imported into an EXTERNAL-origin KMS key we own.

The exchange, in order:

1. :meth:`ByokImporter.create_key` creates a KMS key with ``Origin=EXTERNAL`` (state
   PendingImport: it has no material yet).
2. :meth:`ByokImporter.import_parameters` asks KMS for a wrapping public key and an import
   token (``GetParametersForImport``, ``RSAES_OAEP_SHA_256`` with RSA_4096 by default) and
   returns them as :class:`ImportParameters`: the public key as PEM, the token, the expiry
   (KMS: 24 hours). That is what the console publishes to the customer.
3. The customer wraps 32 random bytes with that public key (RSA-OAEP, SHA-256, MGF1-SHA-256),
   e.g. ``openssl pkeyutl -encrypt -pubin -inkey wrapping.pem -pkeyopt rsa_padding_mode:oaep
   -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256``, and uploads the wrapped blob
   with its SHA-256 digest (hex) so a corrupted or swapped upload is caught.
4. :meth:`ByokImporter.import_material` checks, before any KMS call: the stated digest is
   64 hex digits and equals SHA-256 of the uploaded *wrapped* blob (we never see the
   plaintext material), the blob has the length an OAEP wrap under that RSA size has, the
   import parameters have not expired, ``valid_to`` is in the future. Then
   ``ImportKeyMaterial`` with ``ExpirationModel``/``ValidTo``. Any refusal is a
   ``KeyImportError`` and the key stays PendingImport.

Afterwards the key is an ordinary ``aws-kms://`` key (``aws_kms.AwsKmsKeyProvider``);
``status()`` reports ``expires_at`` (``ValidTo``) and MATERIAL_EXPIRED after it.
Deleting the material (``delete_material``) makes the key PendingImport; importing the
*same* material again (new parameters, same bytes) restores it. KMS refuses different
material for the same key: a new customer key is a new BYOK key (rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto import rsa_oaep
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    KeyAccessDeniedError,
    KeyImportError,
    KeyThrottledError,
    ServiceUnavailableError,
    ValidationError,
)
from archive_kms.keys.aws_kms import _error_code, _utcnow, translate_client_error
from archive_kms.keys.refs import AwsKmsKeyRef, parse_key_ref

__all__ = [
    "WRAPPING_ALGORITHM",
    "WRAPPING_KEY_SPECS",
    "ByokImporter",
    "ImportParameters",
    "ImportResult",
    "check_upload_digest",
    "customer_wrap",
    "sha256_hex",
]

WRAPPING_ALGORITHM = "RSAES_OAEP_SHA_256"
#: RSA size -> length in bytes of one OAEP ciphertext under it.
WRAPPING_KEY_SPECS = {"RSA_2048": 256, "RSA_3072": 384, "RSA_4096": 512}
#: KMS accepts ValidTo at most 365 days ahead.
MAX_VALIDITY = timedelta(days=365)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_upload_digest(upload: bytes, stated_sha256: str, key_ref: str, *, example: str) -> str:
    """The first check of any BYOK upload (AWS KMS and Key Vault), before any provider call:
    ``stated_sha256`` is 64 hex digits (``ValidationError``) and equals SHA-256 of the
    uploaded bytes (``KeyImportError`` naming both). Returns the digest (lower-case hex)."""
    if not isinstance(upload, (bytes, bytearray)):
        raise ValidationError("the uploaded wrapped key material must be bytes")
    if not isinstance(stated_sha256, str) or not _HEX64.fullmatch(stated_sha256.strip().lower()):
        raise ValidationError(
            f"the stated SHA-256 digest of the upload must be 64 hex digits (e.g. the output of `sha256sum {example}`)",
            resource=key_ref,
        )
    expected = stated_sha256.strip().lower()
    actual = sha256_hex(bytes(upload))
    if not hmac.compare_digest(expected, actual):
        raise KeyImportError(
            f"import into {key_ref} refused: the upload's SHA-256 is {actual}, but the customer stated "
            f"{expected}; the file was corrupted or swapped in transit - upload it again",
            resource=key_ref,
        )
    return actual


@dataclass(frozen=True)
class ImportParameters:
    """What we publish to the customer for one import (valid until ``expires_at``)."""

    key_ref: str
    wrapping_algorithm: str
    wrapping_key_spec: str
    public_key_pem: str
    import_token: bytes = field(repr=False)
    expires_at: datetime

    @property
    def wrapped_length(self) -> int:
        return WRAPPING_KEY_SPECS[self.wrapping_key_spec]


@dataclass(frozen=True)
class ImportResult:
    key_ref: str
    key_material_id: str | None
    expiration_model: str
    valid_to: datetime | None
    wrapped_sha256: str


def customer_wrap(public_key_pem: str, material: SecretBytes) -> bytes:
    """The customer's side of step 3 (for tests, the demo and the docs): RSA-OAEP-SHA-256."""
    return rsa_oaep.wrap(public_key_pem, material)


class ByokImporter:
    """Creates EXTERNAL-origin keys and imports customer material into them.

    ``kms`` is a boto3 KMS client in the region where BYOK keys live (ours);
    ``clients.kms_client(settings, max_attempts=2)`` suits: an import a human retries
    should fail fast rather than be retried eight times. ``clock`` gives UTC now.
    """

    def __init__(self, kms: Any, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._kms = kms
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> ByokImporter:
        return cls(clients.kms_client(settings, max_attempts=2))

    def __repr__(self) -> str:
        return "ByokImporter()"

    # --- steps -----------------------------------------------------------------------

    def create_key(self, *, description: str, tags: Mapping[str, str] | None = None) -> str:
        """A new EXTERNAL-origin symmetric key (PendingImport); returns its ``aws-kms://`` ARN ref."""
        all_tags = {"archive-kms:purpose": "byok", **(tags or {})}
        response = self._call(
            "CreateKey",
            "aws-kms://(new BYOK key)",
            lambda: self._kms.create_key(
                Description=description,
                Origin="EXTERNAL",
                KeySpec="SYMMETRIC_DEFAULT",
                KeyUsage="ENCRYPT_DECRYPT",
                Tags=[{"TagKey": k, "TagValue": v} for k, v in all_tags.items()],
            ),
        )
        return parse_key_ref(f"aws-kms://{response['KeyMetadata']['Arn']}").uri

    def import_parameters(self, key_ref: str, *, wrapping_key_spec: str = "RSA_4096") -> ImportParameters:
        """Fresh wrapping public key + import token for ``key_ref`` (GetParametersForImport)."""
        if wrapping_key_spec not in WRAPPING_KEY_SPECS:
            raise ValidationError(
                f"wrapping key spec {wrapping_key_spec!r} is not one of {', '.join(WRAPPING_KEY_SPECS)}"
            )
        ref = self._key_arn_ref(key_ref)
        response = self._call(
            "GetParametersForImport",
            ref.uri,
            lambda: self._kms.get_parameters_for_import(
                KeyId=ref.api_key_id,
                WrappingAlgorithm=WRAPPING_ALGORITHM,
                WrappingKeySpec=wrapping_key_spec,
            ),
        )
        return ImportParameters(
            key_ref=ref.uri,
            wrapping_algorithm=WRAPPING_ALGORITHM,
            wrapping_key_spec=wrapping_key_spec,
            public_key_pem=rsa_oaep.spki_der_to_pem(response["PublicKey"]),
            import_token=bytes(response["ImportToken"]),
            expires_at=_as_utc(response["ParametersValidTo"]),
        )

    def import_material(
        self,
        params: ImportParameters,
        wrapped_material: bytes,
        stated_sha256: str,
        *,
        valid_to: datetime | None = None,
    ) -> ImportResult:
        """Import the customer's wrapped material; see the module docstring for the checks.

        ``valid_to=None`` imports material that does not expire; otherwise it expires then
        (at most 365 days ahead) and ``status()`` reports MATERIAL_EXPIRED afterwards.
        """
        ref = self._key_arn_ref(params.key_ref)
        actual = check_upload_digest(wrapped_material, stated_sha256, ref.uri, example="wrapped.bin")
        if len(wrapped_material) != params.wrapped_length:
            raise KeyImportError(
                f"import into {ref.uri} refused: the upload is {len(wrapped_material)} bytes, but an "
                f"{params.wrapping_algorithm} wrap under the {params.wrapping_key_spec} public key is "
                f"{params.wrapped_length} bytes; wrap the raw 32-byte key with the published public key",
                resource=ref.uri,
            )
        now = self._clock()
        if now >= params.expires_at:
            raise KeyImportError(
                f"import into {ref.uri} refused: the import parameters expired at "
                f"{params.expires_at.isoformat()}; request new parameters and wrap the key again",
                resource=ref.uri,
            )
        if valid_to is not None:
            valid_to = _as_utc(valid_to)
            if not now < valid_to <= now + MAX_VALIDITY:
                raise ValidationError(
                    f"valid_to must be in the future and at most 365 days ahead, got {valid_to.isoformat()}",
                    resource=ref.uri,
                )
        expiration = "KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE"
        request: dict[str, Any] = {
            "KeyId": ref.api_key_id,
            "ImportToken": params.import_token,
            "EncryptedKeyMaterial": bytes(wrapped_material),
            "ExpirationModel": expiration,
        }
        if valid_to is not None:
            request["ValidTo"] = valid_to
        response = self._call(
            "ImportKeyMaterial", ref.uri, lambda: self._kms.import_key_material(**request), importing=True
        )
        return ImportResult(
            key_ref=ref.uri,
            key_material_id=response.get("KeyMaterialId"),
            expiration_model=expiration,
            valid_to=valid_to,
            wrapped_sha256=actual,
        )

    def delete_material(self, key_ref: str) -> None:
        """DeleteImportedKeyMaterial: the key becomes PendingImport at once (revocation for
        BYOK); the same material can be imported again later."""
        ref = self._key_arn_ref(key_ref)
        self._call(
            "DeleteImportedKeyMaterial", ref.uri, lambda: self._kms.delete_imported_key_material(KeyId=ref.api_key_id)
        )

    # --- internals -------------------------------------------------------------------

    @staticmethod
    def _key_arn_ref(key_ref: str) -> AwsKmsKeyRef:
        ref = parse_key_ref(key_ref)
        if not isinstance(ref, AwsKmsKeyRef) or not ref.is_key_arn:
            raise ValidationError(f"BYOK needs the key ARN reference (aws-kms://arn:...:key/ID), got {ref.uri}")
        return ref

    def _call(self, operation: str, key_ref: str, fn: Callable[[], Any], *, importing: bool = False) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            error = translate_client_error(exc, operation=operation, key_ref=key_ref)
            if importing:
                error = _import_error(exc, error, key_ref)
        raise error


_IMPORT_HINTS = {
    "ExpiredImportTokenException": "the import token expired; request new import parameters and wrap again",
    "InvalidImportTokenException": "the import token does not belong to this key; use the parameters published for it",
    "InvalidCiphertextException": "KMS could not unwrap the upload; wrap the raw 32-byte key with "
    f"{WRAPPING_ALGORITHM} under the published public key",
    "IncorrectKeyMaterialException": "this is not the material previously imported into the key; a key's "
    "material never changes (a new customer key is a new BYOK key)",
    "KMSInvalidStateException": "the key is not in a state that accepts material (pending deletion, or "
    "material already present)",
    "NotFoundException": "KMS found no such key or import token",
}


def _import_error(exc: Exception, translated: ArchiveKmsError, key_ref: str) -> ArchiveKmsError:
    """ImportKeyMaterial failures are KeyImportError (the key stays PendingImport), except
    throttling, unreachable service and missing permission, which keep their own type."""
    if isinstance(translated, (KeyThrottledError, KeyAccessDeniedError)):
        return translated
    code, message, status = _error_code(exc)
    if isinstance(translated, ServiceUnavailableError) and not code:
        return translated  # no answer at all: connection or timeout
    hint = _IMPORT_HINTS.get(code)
    if hint is None and (status >= 500 or code in ("KMSInternalException", "InternalError")):
        # KMS answered with a server error. For an import this is usually the upload (an
        # emulator reports undecryptable material this way), so say both.
        hint = (
            f"KMS failed to import it; check that the upload is a {WRAPPING_ALGORITHM} wrap under the "
            "published public key, then upload again"
        )
    said = f"{code}: {message}" if message else code
    return KeyImportError(
        f"import into {key_ref} failed: {hint or 'KMS refused it'} ({said}); the key stays pending import",
        resource=key_ref,
    )


def _as_utc(value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError("expected a datetime")
    if value.tzinfo is None:
        raise ValidationError("datetimes must be timezone-aware (UTC)")
    return value.astimezone(UTC)
