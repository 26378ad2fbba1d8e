"""BYOK for Azure tenants: the customer's RSA key imported into the platform's Key Vault
through Key Vault's own BYOK import (a key transfer blob, the ``.byok`` file), ADR 0036.

The exchange, in order (``docs/key-lifecycle.md`` section 13 has the customer's side):

1. :meth:`KeyVaultByokImporter.create_import_parameters` creates a **key exchange key**
   (KEK) in our vault: ``RSA-HSM`` (2048, 3072 or 4096 bits; 4096 by default), key_ops
   exactly ``["import"]`` (it can do nothing else), expiring after ``KEK_VALIDITY`` (24 h,
   as KMS import parameters). It returns :class:`KeyVaultImportParameters`: the KEK's
   public key as PEM, its versioned key identifier (``kid``), the expiry and the reference
   the imported key will have (``azure-kv://VAULT/keys/byok-...``, created by the import).
2. The customer makes the ``.byok`` file (:func:`customer_transfer_blob` is that side, for
   tests and the demo): a fresh AES-256 key, RSA-OAEP (SHA-1, MGF1-SHA-1, as Key Vault's
   specification says) under the KEK, followed by the target RSA private key (PKCS#8 DER)
   under AES key wrap with padding (RFC 5649), in the JSON ``{"schema_version": "1.0.0",
   "header": {"kid": KEK kid, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
   "ciphertext": base64url, "generator": ...}``. They send it with its SHA-256.
3. :meth:`KeyVaultByokImporter.import_blob` checks, **before any vault call**: the stated
   digest (64 hex digits, equal to SHA-256 of the uploaded file), that the file is that
   JSON naming *this* KEK with ``dir``/``CKM_RSA_AES_KEY_WRAP``, that the ciphertext has
   room for an RSA block of the KEK's size plus a key wrap, that the KEK has not expired.
   Then ``PUT /keys/{name}`` with ``{"key": {"kty": "RSA-HSM", "key_ops": ["wrapKey",
   "unwrapKey"], "key_hsm": <the file>}, "Hsm": true}``. The vault refusing it (wrong KEK,
   corrupt blob) is a ``KeyImportError``; an imported key below
   ``MIN_TARGET_BITS`` (Key Vault accepts RSA-2048; our preflight does not) is deleted
   again and refused. After a good import the KEK is deleted (single use).
4. :meth:`KeyVaultByokImporter.retire` soft-deletes an imported key that nothing is
   wrapped under any more (ADR 0036: unusable at once, recoverable during the vault's
   soft-delete retention, purged by Key Vault afterwards).

Afterwards the key is an ordinary ``azure-kv://`` key (``azure_key_vault.AzureKeyVaultKeyProvider``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto import rsa_aes_key_wrap
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    KeyAccessDeniedError,
    KeyImportError,
    KeyThrottledError,
    ServiceUnavailableError,
    ValidationError,
)
from archive_kms.keys.azure_key_vault import VaultReply
from archive_kms.keys.byok import check_upload_digest
from archive_kms.keys.refs import AzureKeyVaultKeyRef, parse_key_ref

__all__ = [
    "BYOK_ALG",
    "BYOK_ENC",
    "BYOK_SCHEMA_VERSION",
    "KEK_SPECS",
    "KEK_VALIDITY",
    "MIN_TARGET_BITS",
    "KeyVaultByokImporter",
    "KeyVaultImportParameters",
    "KeyVaultImportResult",
    "customer_transfer_blob",
]

WRAPPING_ALGORITHM = "CKM_RSA_AES_KEY_WRAP"
BYOK_SCHEMA_VERSION = "1.0.0"
BYOK_ALG = "dir"
BYOK_ENC = WRAPPING_ALGORITHM
#: KEK size name (as for KMS wrapping keys) -> bits.
KEK_SPECS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
KEK_VALIDITY = timedelta(hours=24)
#: The imported key wraps the tenant's L2 for years: the BYOKV preflight's rule (key-providers.md).
MIN_TARGET_BITS = 3072
#: A .byok file for an RSA-4096 target under an RSA-4096 KEK is about 4 KiB.
MAX_BLOB_BYTES = 64 * 1024
#: Operations of the imported key: what AzureKeyVaultKeyProvider calls, nothing else.
TARGET_KEY_OPS = ["wrapKey", "unwrapKey"]
_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
#: The imported key's tag naming the .byok file it came from (a repeated upload is recognised).
_SHA256_TAG = "archive-kms-byok-sha256"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class KeyVaultImportParameters:
    """What we publish to the customer for one import (valid until ``expires_at``)."""

    key_ref: str  # the key the import creates (versionless azure-kv:// reference)
    kek_ref: str  # the key exchange key, versioned azure-kv:// reference
    kek_kid: str  # its key identifier, https://VAULT/keys/NAME/VERSION: the blob's header.kid
    wrapping_key_spec: str
    public_key_pem: str
    expires_at: datetime
    wrapping_algorithm: str = WRAPPING_ALGORITHM

    @property
    def kek_bits(self) -> int:
        return KEK_SPECS[self.wrapping_key_spec]


@dataclass(frozen=True)
class KeyVaultImportResult:
    key_ref: str  # versionless
    key_version: str
    key_size: int
    byok_sha256: str


def customer_transfer_blob(
    public_key_pem: str, kek_kid: str, target_private_key_pkcs8_der: bytes, *, generator: str = "archive-kms byok wrap"
) -> bytes:
    """The customer's side of step 2 (tests, the demo, ``archive-kms byok wrap``): the
    ``.byok`` file for ``target_private_key_pkcs8_der`` under the KEK ``public_key_pem``."""
    ciphertext = rsa_aes_key_wrap.wrap(public_key_pem, target_private_key_pkcs8_der)
    doc = {
        "schema_version": BYOK_SCHEMA_VERSION,
        "header": {"kid": kek_kid, "alg": BYOK_ALG, "enc": BYOK_ENC},
        "ciphertext": _b64url(ciphertext),
        "generator": generator,
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


class KeyVaultByokImporter:
    """Creates key exchange keys in the platform's vault and imports ``.byok`` files with them.

    ``key_client`` is a KeyClient for that vault (``clients.keyvault_key_client``);
    ``vault_url`` its URL (the references it makes name it). ``clock`` gives UTC now.
    """

    def __init__(self, key_client: Any, vault_url: str, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._keys = key_client
        vault = parse_key_ref("azure-kv://" + vault_url.removeprefix("https://").rstrip("/") + "/keys/x")
        assert isinstance(vault, AzureKeyVaultKeyRef)
        self._vault = vault
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyVaultByokImporter:
        if not settings.azure_keyvault_url:
            raise ConfigurationError(
                "BYOK for Azure tenants imports into the platform's Key Vault: set ARCHIVE_KMS_AZURE_KEYVAULT_URL"
            )
        return cls(clients.keyvault_key_client(settings), settings.azure_keyvault_url)

    def __repr__(self) -> str:
        return f"KeyVaultByokImporter({self._vault.vault_url!r})"

    def _ref(self, name: str, version: str | None = None) -> AzureKeyVaultKeyRef:
        return AzureKeyVaultKeyRef(host=self._vault.host, port=self._vault.port, name=name, version=version)

    # --- steps -----------------------------------------------------------------------

    def create_import_parameters(
        self, *, wrapping_key_spec: str = "RSA_4096", tags: Mapping[str, str] | None = None
    ) -> KeyVaultImportParameters:
        """A new KEK (RSA-HSM, key_ops ``import`` only, expiring in 24 h) and the name of the
        key the import will create."""
        if wrapping_key_spec not in KEK_SPECS:
            raise ValidationError(f"wrapping key spec {wrapping_key_spec!r} is not one of {', '.join(KEK_SPECS)}")
        token = uuid.uuid4().hex[:16]
        target = self._ref(f"byok-{token}")
        kek_name = f"byok-{token}-kek"
        expires_at = (self._clock() + KEK_VALIDITY).replace(microsecond=0)
        all_tags = {"archive-kms-purpose": "byok-kek", "archive-kms-imports": target.name, **(tags or {})}
        key = self._call(
            "create key exchange key",
            self._ref(kek_name).uri,
            lambda: self._keys.create_rsa_key(
                kek_name,
                size=KEK_SPECS[wrapping_key_spec],
                hardware_protected=True,
                key_operations=["import"],
                expires_on=expires_at,
                tags=all_tags,
            ),
        )
        pem = rsa_aes_key_wrap.rsa_public_key_pem(key.key.n, key.key.e)
        version = str(key.properties.version)
        return KeyVaultImportParameters(
            key_ref=target.uri,
            kek_ref=self._ref(kek_name, version).uri,
            kek_kid=self._ref(kek_name, version).key_id,
            wrapping_key_spec=wrapping_key_spec,
            public_key_pem=pem,
            expires_at=expires_at,
        )

    def import_blob(
        self,
        params: KeyVaultImportParameters,
        blob: bytes,
        stated_sha256: str,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> KeyVaultImportResult:
        """Import the customer's ``.byok`` file; see the module docstring for the checks."""
        target = self._target(params)
        actual = check_upload_digest(blob, stated_sha256, target.uri, example="KEY.byok")
        self._check_blob(params, bytes(blob), target)
        if self._clock() >= params.expires_at:
            raise KeyImportError(
                f"import into {target.uri} refused: the key exchange key expired at {params.expires_at.isoformat()}; "
                "request new import parameters and make the .byok file again",
                resource=target.uri,
            )
        existing = self._existing(target)
        if existing is not None:  # an earlier upload of this file was imported (and its caller crashed)
            imported_from = (existing.properties.tags or {}).get(_SHA256_TAG)
            if imported_from != actual:
                raise KeyImportError(
                    f"import into {target.uri} refused: that key exists already, imported from another file "
                    f"(SHA-256 {imported_from}); request new import parameters for a new key",
                    resource=target.uri,
                )
            return self._finish(params, target, existing, actual)
        from azure.keyvault.keys import JsonWebKey

        jwk = JsonWebKey(kty="RSA-HSM", key_ops=list(TARGET_KEY_OPS), t=bytes(blob))
        all_tags = {"archive-kms-purpose": "byok", _SHA256_TAG: actual, **(tags or {})}
        key = self._call(
            "import",
            target.uri,
            lambda: self._keys.import_key(target.name, jwk, hardware_protected=True, tags=all_tags),
            importing=True,
        )
        return self._finish(params, target, key, actual)

    def _finish(
        self, params: KeyVaultImportParameters, target: AzureKeyVaultKeyRef, key: Any, digest: str
    ) -> KeyVaultImportResult:
        n = key.key.n or b""
        size = len(n.lstrip(b"\0")) * 8
        if size < MIN_TARGET_BITS:
            self._discard(target)
            raise KeyImportError(
                f"import into {target.uri} refused: the key in the .byok file is RSA-{size}; at least "
                f"RSA-{MIN_TARGET_BITS} is required (it wraps a long-lived key); the imported key was deleted again - "
                "make the .byok file for a larger key",
                resource=target.uri,
            )
        self._drop_kek(params)
        return KeyVaultImportResult(
            key_ref=target.uri, key_version=str(key.properties.version), key_size=size, byok_sha256=digest
        )

    def _existing(self, target: AzureKeyVaultKeyRef) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        def get() -> Any:
            try:
                return self._keys.get_key(target.name)
            except ResourceNotFoundError:
                return None

        return self._call("get", target.uri, get)

    def retire(self, key_ref: str) -> None:
        """Soft-delete an imported key nothing is wrapped under any more (idempotent)."""
        from azure.core.exceptions import ResourceNotFoundError

        ref = self._own(key_ref)

        def delete() -> None:
            try:
                self._keys.begin_delete_key(ref.name).wait()
            except ResourceNotFoundError:
                pass  # deleted already (a rerun)

        self._call("delete", ref.uri, delete)

    def discard(self, params: KeyVaultImportParameters) -> None:
        """Delete a KEK whose import will not happen (the rotation was cancelled or expired)."""
        self._drop_kek(params)

    # --- internals -------------------------------------------------------------------

    def _own(self, key_ref: str) -> AzureKeyVaultKeyRef:
        ref = parse_key_ref(key_ref)
        if not isinstance(ref, AzureKeyVaultKeyRef) or (ref.host, ref.port) != (self._vault.host, self._vault.port):
            raise ValidationError(
                f"{ref.uri} is not a key in the platform's vault {self._vault.vault_url}: Key Vault BYOK keys live there"
            )
        return ref

    def _target(self, params: KeyVaultImportParameters) -> AzureKeyVaultKeyRef:
        ref = self._own(params.key_ref)
        if ref.version is not None:
            raise ValidationError(f"the key an import creates is named without a version, got {ref.uri}")
        return ref

    @staticmethod
    def _check_blob(params: KeyVaultImportParameters, blob: bytes, target: AzureKeyVaultKeyRef) -> None:
        """The .byok file's shape, before the vault sees it (the vault checks the crypto)."""

        def refuse(why: str) -> KeyImportError:
            return KeyImportError(
                f"import into {target.uri} refused: {why}; make the .byok file as docs/key-lifecycle.md section 13 says",
                resource=target.uri,
            )

        if len(blob) > MAX_BLOB_BYTES:
            raise refuse(f"the upload is {len(blob)} bytes, more than a .byok file ({MAX_BLOB_BYTES} at most)")
        try:
            doc = json.loads(blob.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise refuse("the upload is not a .byok file (JSON)") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("header"), dict):
            raise refuse("the upload is not a .byok file (no header)")
        if doc.get("schema_version") != BYOK_SCHEMA_VERSION:
            raise refuse(f"schema_version is {doc.get('schema_version')!r}, not {BYOK_SCHEMA_VERSION!r}")
        header = doc["header"]
        if header.get("alg") != BYOK_ALG or header.get("enc") != BYOK_ENC:
            raise refuse(
                f"the header says alg {header.get('alg')!r}, enc {header.get('enc')!r}; "
                f"expected {BYOK_ALG!r}, {BYOK_ENC!r}"
            )
        if header.get("kid") != params.kek_kid:
            raise refuse(
                f"it was made for the key exchange key {str(header.get('kid'))[:200]!r}, not the one published for "
                f"this import ({params.kek_kid})"
            )
        text = doc.get("ciphertext")
        if not isinstance(text, str) or not _B64URL.fullmatch(text):
            raise refuse("its ciphertext is missing or not base64url")
        try:
            raw = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
        except (binascii.Error, ValueError):
            raise refuse("its ciphertext is not base64url") from None
        head = params.kek_bits // 8
        # RFC 5649 output is a multiple of 8 bytes and at least 16; a PKCS#8 RSA key is far longer.
        if len(raw) < head + 16 or (len(raw) - head) % 8:
            raise refuse(
                f"its ciphertext is {len(raw)} bytes: an RSA-OAEP block of {head} bytes (the "
                f"{params.wrapping_key_spec} key exchange key) followed by an AES key wrap was expected"
            )

    def _drop_kek(self, params: KeyVaultImportParameters) -> None:
        # The KEK is single-use; if this fails it expires anyway (exp), so do not fail the import.
        kek = self._own(params.kek_ref)
        try:
            self._keys.begin_delete_key(kek.name).wait()
        except Exception:  # noqa: BLE001 - best effort, see above
            pass

    def _discard(self, target: AzureKeyVaultKeyRef) -> None:
        """Undo an import we refuse afterwards: delete, then purge (where the vault allows)."""
        from azure.core.exceptions import AzureError

        try:
            self._keys.begin_delete_key(target.name).wait()
        except AzureError as exc:
            raise KeyImportError(
                f"import into {target.uri} refused, but deleting the imported key failed "
                f"({type(exc).__name__}); delete it by hand",
                resource=target.uri,
            ) from None
        try:
            self._keys.purge_deleted_key(target.name)
        except AzureError:
            pass  # purge protection: it stays soft-deleted (unusable) until Key Vault purges it

    def _call(self, operation: str, key_ref: str, fn: Callable[[], Any], *, importing: bool = False) -> Any:
        from azure.core.exceptions import AzureError

        error: ArchiveKmsError | None = None
        try:
            return fn()
        except AzureError as exc:
            error = _translate(exc, operation, key_ref, importing=importing)
            error.__cause__ = exc
        raise error


def _translate(exc: Exception, operation: str, key_ref: str, *, importing: bool) -> ArchiveKmsError:
    where = f"Key Vault {operation} for {key_ref}"
    reply = VaultReply.from_exception(exc)  # the Key Vault answer, read as the key provider reads it
    if reply is None:
        return ServiceUnavailableError(f"{where}: the vault did not answer ({type(exc).__name__})", resource=key_ref)
    status, inner_code, said = reply.status, reply.inner, reply.said
    # A 403 about the key (the KEK lacks `import`, is disabled or expired) says so in its inner
    # code; one about our identity (RBAC, access policy) does not, or names the policy.
    about_the_key = status == 403 and importing and inner_code.startswith("Key")
    if status == 429:
        return KeyThrottledError(f"{where}: throttled ({said})", resource=key_ref)
    if status == 401 or (status == 403 and not about_the_key):
        return KeyAccessDeniedError(
            f"{where}: not permitted ({said}); our identity needs keys/create, keys/import, keys/read and "
            "keys/delete on the platform vault",
            resource=key_ref,
        )
    if status >= 500 or status == 408:
        return ServiceUnavailableError(f"{where}: the vault is unavailable ({said})", resource=key_ref)
    if importing:
        return KeyImportError(
            f"import into {key_ref} failed: Key Vault refused the .byok file ({said}); check that it was made "
            "for the published key exchange key, then upload again; nothing was imported",
            resource=key_ref,
        )
    return ConfigurationError(f"{where}: the vault rejected the request ({said})", resource=key_ref)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
