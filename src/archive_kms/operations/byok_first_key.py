"""The first BYOK key of a tenant, imported before ``enable --mode byok`` (issue #14,
``docs/key-lifecycle.md`` section 13, "Enable in mode byok").

The same exchange as a re-upload (``migration.byok_upload``), without a rotation: the
tenant is still on the managed key, so there is nothing to re-wrap yet. Two steps, each a
CLI command; the second finds what the first made in a folder the operator keeps (the
**import folder**), and the platform's audit log binds the two:

1. :func:`new_key` (``archive-kms byok new-key``) makes the key *shell* in the platform's
   key service of the tenant's cloud and writes what the customer needs into the folder:

   - S3 tenants, AWS KMS: a KMS key with ``Origin=EXTERNAL`` (``ByokImporter.create_key``;
     tags ``archive-kms:purpose=byok``, ``archive_kms_tenant=TENANT``) and its
     ``GetParametersForImport`` answer: ``wrapping-key.pem``, ``import-token.bin``.
   - Azure tenants, Key Vault: a single-use key exchange key in the platform's vault
     (``KeyVaultByokImporter.create_import_parameters``, tag ``archive-kms-tenant``):
     ``wrapping-key.pem``, ``kek-kid.txt``.

   Both: ``import-state.json`` (:class:`PendingImport`, no key material: public key,
   token, references, expiry) and an audit record ``byok.first_key_created`` naming the key.
2. :func:`import_key` (``archive-kms byok import-key``) checks that the folder's import
   belongs to this tenant and was made by this platform (the audit record names its key
   and key exchange key), that the tenant is still on the managed key; then, before any
   key service call, the stated SHA-256 of the upload and that the parameters have not
   expired; then imports through the same importer as a re-upload (``import_material`` /
   ``import_blob``: their own shape checks), records the import in the folder and the
   audit log (``byok.first_key_imported``) and proves the key
   (``keys.preflight.check_usable``: state, then a wrap/unwrap round trip in the tenant's
   context). A refusal from the digest on changes nothing, is audited
   (``byok.first_key_refused``) and leaves the parameters usable until they expire.

The key reference it returns is what ``enable TENANT --mode byok --key-ref REF`` takes.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from archive_kms.errors import ArchiveKmsError, KeyImportError, StateError, ValidationError
from archive_kms.keys.azure_byok import KeyVaultByokImporter, KeyVaultImportParameters
from archive_kms.keys.byok import ByokImporter, ImportParameters, check_upload_digest
from archive_kms.keys.preflight import check_usable
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, KeyMode
from archive_kms.storage import Location

__all__ = ["STATE_FILE", "STATE_FORMAT", "FirstKeyImported", "PendingImport", "import_key", "new_key"]

STATE_FILE = "import-state.json"
STATE_FORMAT = "archive-kms-byok-first-key/1"
#: The tenant's cloud -> the key service its BYOK key lives in (the reference scheme).
KEY_SERVICE_OF_CLOUD = {"s3": "aws-kms", "azure": "azure-kv"}
CREATED, IMPORTED, REFUSED = "byok.first_key_created", "byok.first_key_imported", "byok.first_key_refused"


@dataclass(frozen=True)
class PendingImport:
    """``import-state.json``: one import of a tenant's first BYOK key (no key material)."""

    tenant: str
    cloud: str  # s3 | azure
    key_service: str  # aws-kms | azure-kv
    key_ref: str  # the key the material goes into (AWS: exists, PendingImport; Key Vault: made by the import)
    wrapping_algorithm: str
    wrapping_key_spec: str
    public_key_pem: str
    expires_at: datetime
    import_token: str | None = field(default=None, repr=False)  # AWS KMS, base64
    kek_ref: str | None = None  # Key Vault
    kek_kid: str | None = None  # Key Vault
    imported: dict[str, Any] | None = None  # {"sha256", "key_version", "at"} once imported

    def to_json(self) -> str:
        doc = {"format": STATE_FORMAT, **asdict(self), "expires_at": self.expires_at.isoformat()}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> PendingImport:
        path = folder / STATE_FILE
        if not path.is_file():
            raise ValidationError(
                f"--out-dir {folder} holds no {STATE_FILE}: run `archive-kms byok new-key TENANT --out-dir {folder}` "
                "first (and keep that folder)"
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.pop("format", None) != STATE_FORMAT:
                raise ValueError("format")
            doc["expires_at"] = datetime.fromisoformat(doc["expires_at"])
            state = cls(**doc)
            if state.cloud not in KEY_SERVICE_OF_CLOUD or state.key_service != KEY_SERVICE_OF_CLOUD[state.cloud]:
                raise ValueError("cloud")
            if state.expires_at.tzinfo is None:
                raise ValueError("expires_at")
            needed = ["tenant", "key_ref", "wrapping_algorithm", "wrapping_key_spec", "public_key_pem"]
            needed += ["kek_ref", "kek_kid"] if state.key_service == "azure-kv" else ["import_token"]
            if not all(isinstance(getattr(state, name), str) for name in needed):
                raise ValueError("fields")
            if state.import_token is not None:
                base64.b64decode(state.import_token, validate=True)
            if state.imported is not None and not isinstance(state.imported, dict):
                raise ValueError("imported")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            raise ValidationError(
                f"{path} is not an import state written by `archive-kms byok new-key` ({STATE_FORMAT}); "
                "run new-key again into an empty folder"
            ) from None
        return state

    def write(self, folder: Path) -> None:
        _write_private(folder / STATE_FILE, self.to_json().encode("utf-8"))

    @property
    def expired(self) -> bool:
        return datetime.now(UTC) >= self.expires_at

    def view(self, folder: Path) -> dict[str, Any]:
        """What the commands print (``--json``): the customer's parameters and where they are."""
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "cloud": self.cloud,
            "key_service": self.key_service,
            "key_ref": self.key_ref,
            "wrapping_algorithm": self.wrapping_algorithm,
            "wrapping_key_spec": self.wrapping_key_spec,
            "public_key_pem": self.public_key_pem,
            "expires_at": self.expires_at.isoformat(),
            "out_dir": str(folder),
            "files": {"wrapping_key": str(folder / "wrapping-key.pem"), "state": str(folder / STATE_FILE)},
        }
        if self.key_service == "azure-kv":
            out["kek_kid"] = self.kek_kid
            out["files"]["kek_kid"] = str(folder / "kek-kid.txt")
        else:
            out["import_token"] = self.import_token
            out["files"]["import_token"] = str(folder / "import-token.bin")
        return out


@dataclass(frozen=True)
class FirstKeyImported:
    tenant: str
    cloud: str
    key_service: str
    key_ref: str  # what `enable --mode byok --key-ref` takes
    key_version: str | None  # AWS: the key material id; Key Vault: the key version
    sha256: str  # of the uploaded file
    wrap_ms: float
    unwrap_ms: float
    already: bool  # this upload had been imported by an earlier run of the command

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "enable": f"archive-kms enable {self.tenant} --mode byok --key-ref {self.key_ref}",
        }


def _write_private(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename (a crash leaves the old file or the new one), owner-only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tenant_cloud(platform: Platform, tenant_id: str, cloud: str | None) -> str:
    """The cloud of a tenant that may get a first BYOK key: known, on the managed key."""
    t = platform.state.get_tenant(tenant_id)
    if t is None:
        raise StateError(
            f"unknown tenant {tenant_id!r}: create it first (`archive-kms tenant create {tenant_id}`)",
            resource=f"tenant:{tenant_id}",
        )
    if t.key_mode is KeyMode.BYOK:
        raise ValidationError(
            f"tenant {tenant_id} is enabled in mode byok already (key {t.key_ref}): new key material for it is a "
            f"re-upload: `archive-kms byok import-params {tenant_id}`"
        )
    if t.key_mode is not KeyMode.MANAGED:
        raise ValidationError(
            f"tenant {tenant_id} uses its own key already (mode {t.key_mode.value}): `archive-kms remove {tenant_id}` "
            "first to move it to mode byok"
        )
    lives = Location.from_dict(t.location).cloud.value
    if cloud is not None and cloud != lives:
        raise ValidationError(
            f"--cloud {cloud}: tenant {tenant_id} lives on {lives}; its BYOK key is "
            + ("an AWS KMS key (--cloud s3)" if lives == "s3" else "a Key Vault key (--cloud azure)")
        )
    return lives


def _audit(platform: Platform, actor: str, action: str, tenant_id: str, details: dict[str, Any]) -> None:
    platform.state.append_audit(AuditEvent(actor=actor, action=action, tenant_id=tenant_id, details=details))


def new_key(
    platform: Platform,
    tenant_id: str,
    out_dir: Path,
    *,
    actor: str,
    cloud: str | None = None,
    wrapping_key_spec: str = "RSA_4096",
) -> tuple[PendingImport, bool]:
    """Make the key shell and the customer's parameters in ``out_dir``; ``(state, reused)``.

    An ``out_dir`` holding a valid import for the tenant is returned as it is (``reused``:
    nothing new made); an expired one gets new parameters (AWS KMS: for the same key, still
    pending import; Key Vault: a new key exchange key, the expired one deleted); one of
    another tenant, or one imported already, is refused."""
    if cloud is not None and cloud not in KEY_SERVICE_OF_CLOUD:
        raise ValidationError(f"--cloud {cloud!r}: use s3 or azure")
    if wrapping_key_spec not in ("RSA_2048", "RSA_3072", "RSA_4096"):
        raise ValidationError(f"--wrapping-key-spec {wrapping_key_spec!r}: use RSA_2048, RSA_3072 or RSA_4096")
    lives = _tenant_cloud(platform, tenant_id, cloud)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValidationError(f"--out-dir {out_dir} is a file, not a folder")
    previous: PendingImport | None = None
    if (out_dir / STATE_FILE).exists():
        previous = PendingImport.read(out_dir)
        if previous.tenant != tenant_id:
            raise ValidationError(
                f"--out-dir {out_dir} holds the import of tenant {previous.tenant}'s key; use one folder per tenant"
            )
        if previous.imported is not None:
            raise ValidationError(
                f"--out-dir {out_dir}: the key {previous.key_ref} was imported already; enable it: "
                f"`archive-kms enable {tenant_id} --mode byok --key-ref {previous.key_ref}`"
            )
        if not previous.expired:
            return previous, True
    else:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    if lives == "azure":
        kv = KeyVaultByokImporter.from_settings(platform.settings)
        if previous is not None and previous.kek_ref:
            kv.discard(_kv_params(previous))  # expired; single use anyway
        made = kv.create_import_parameters(
            wrapping_key_spec=wrapping_key_spec, tags={"archive-kms-tenant": tenant_id[:256]}
        )
        state = PendingImport(
            tenant=tenant_id,
            cloud=lives,
            key_service="azure-kv",
            key_ref=made.key_ref,
            wrapping_algorithm=made.wrapping_algorithm,
            wrapping_key_spec=made.wrapping_key_spec,
            public_key_pem=made.public_key_pem,
            expires_at=made.expires_at,
            kek_ref=made.kek_ref,
            kek_kid=made.kek_kid,
        )
        (out_dir / "kek-kid.txt").write_text(made.kek_kid + "\n")
    else:
        importer = ByokImporter.from_settings(platform.settings)
        key_ref = (
            previous.key_ref
            if previous is not None
            else importer.create_key(
                description=f"archive_kms BYOK key for tenant {tenant_id}", tags={"archive_kms_tenant": tenant_id}
            )
        )
        params = importer.import_parameters(key_ref, wrapping_key_spec=wrapping_key_spec)
        state = PendingImport(
            tenant=tenant_id,
            cloud=lives,
            key_service="aws-kms",
            key_ref=params.key_ref,
            wrapping_algorithm=params.wrapping_algorithm,
            wrapping_key_spec=params.wrapping_key_spec,
            public_key_pem=params.public_key_pem,
            expires_at=params.expires_at,
            import_token=base64.b64encode(params.import_token).decode("ascii"),
        )
        _write_private(out_dir / "import-token.bin", params.import_token)
    (out_dir / "wrapping-key.pem").write_text(state.public_key_pem)
    state.write(out_dir)
    _audit(
        platform,
        actor,
        CREATED,
        tenant_id,
        {
            "key_ref": state.key_ref,
            "key_service": state.key_service,
            "kek_ref": state.kek_ref,
            "wrapping_key_spec": state.wrapping_key_spec,
            "expires_at": state.expires_at.isoformat(),
        },
    )
    return state, False


def _kv_params(state: PendingImport) -> KeyVaultImportParameters:
    assert state.kek_ref is not None and state.kek_kid is not None
    return KeyVaultImportParameters(
        key_ref=state.key_ref,
        kek_ref=state.kek_ref,
        kek_kid=state.kek_kid,
        wrapping_key_spec=state.wrapping_key_spec,
        public_key_pem=state.public_key_pem,
        expires_at=state.expires_at,
        wrapping_algorithm=state.wrapping_algorithm,
    )


def _made_here(platform: Platform, state: PendingImport) -> bool:
    """Did ``new-key`` of this platform make this key (and key exchange key) for this tenant
    (its audit record)? A state file edited to name another key is not."""
    return any(
        r.action == CREATED and r.details.get("key_ref") == state.key_ref and r.details.get("kek_ref") == state.kek_ref
        for r in platform.state.iter_audit(tenant_id=state.tenant)
    )


def import_key(
    platform: Platform, tenant_id: str, out_dir: Path, upload: bytes, stated_sha256: str, *, actor: str
) -> FirstKeyImported:
    """Import the customer's upload into the key ``new-key`` made in ``out_dir`` and prove it."""
    state = PendingImport.read(out_dir)
    if state.tenant != tenant_id:
        raise ValidationError(
            f"--out-dir {out_dir} holds the import of tenant {state.tenant}'s key, not {tenant_id}'s; "
            "use the folder `byok new-key` wrote for this tenant"
        )
    if not _made_here(platform, state):
        raise ValidationError(
            f"{out_dir / STATE_FILE} names key {state.key_ref}"
            + (f" (key exchange key {state.kek_ref})" if state.kek_ref else "")
            + f", which `byok new-key` did not make for tenant "
            f"{tenant_id} on this platform; run `archive-kms byok new-key {tenant_id} --out-dir NEW_FOLDER`"
        )
    _tenant_cloud(platform, tenant_id, state.cloud)
    example = "KEY.byok" if state.key_service == "azure-kv" else "wrapped.bin"
    version: str | None
    try:
        # The digest first, before any key service call: a corrupted or swapped upload changes nothing.
        digest = check_upload_digest(upload, stated_sha256, state.key_ref, example=example)
        if state.imported is not None:
            if state.imported.get("sha256") != digest:
                raise KeyImportError(
                    f"{state.key_ref} was imported already, from another file (SHA-256 "
                    f"{state.imported.get('sha256')}); a key's material never changes: for other material run "
                    f"`archive-kms byok new-key {tenant_id} --out-dir NEW_FOLDER`",
                    resource=state.key_ref,
                )
            return _prove(platform, state, state.imported.get("key_version"), digest, already=True)
        if state.expired:
            what = "key exchange key" if state.key_service == "azure-kv" else "import token"
            raise KeyImportError(
                f"the {what} in {out_dir} expired at {state.expires_at.isoformat()}; run `archive-kms byok new-key "
                f"{tenant_id} --out-dir {out_dir}` for new parameters and have the customer wrap the key again",
                resource=state.key_ref,
            )
        if state.key_service == "azure-kv":
            kv = KeyVaultByokImporter.from_settings(platform.settings).import_blob(
                _kv_params(state), upload, stated_sha256, tags={"archive-kms-tenant": tenant_id[:256]}
            )
            key_ref, version = kv.key_ref, kv.key_version
        else:
            assert state.import_token is not None
            params = ImportParameters(
                key_ref=state.key_ref,
                wrapping_algorithm=state.wrapping_algorithm,
                wrapping_key_spec=state.wrapping_key_spec,
                public_key_pem=state.public_key_pem,
                import_token=base64.b64decode(state.import_token),
                expires_at=state.expires_at,
            )
            result = ByokImporter.from_settings(platform.settings).import_material(params, upload, stated_sha256)
            key_ref, version = result.key_ref, (result.key_material_id or None)
    except ArchiveKmsError as exc:
        _audit(platform, actor, REFUSED, tenant_id, {"key_ref": state.key_ref, "reason": f"{exc}"[:500]})
        raise
    imported = {"sha256": digest, "key_version": version, "at": datetime.now(UTC).isoformat()}
    state = PendingImport(**{**asdict(state), "key_ref": key_ref, "imported": imported})
    state.write(out_dir)
    _audit(
        platform,
        actor,
        IMPORTED,
        tenant_id,
        {"key_ref": key_ref, "key_service": state.key_service, "key_version": version, "sha256": digest},
    )
    return _prove(platform, state, version, digest, already=False)


def _prove(
    platform: Platform, state: PendingImport, version: str | None, digest: str, *, already: bool
) -> FirstKeyImported:
    """The imported key works: state usable, a wrap/unwrap round trip in the tenant's context."""
    report = check_usable(platform.resolve_provider(state.key_ref), {"tenant": state.tenant})
    return FirstKeyImported(
        tenant=state.tenant,
        cloud=state.cloud,
        key_service=state.key_service,
        key_ref=state.key_ref,
        key_version=version,
        sha256=digest,
        wrap_ms=round(report.wrap_seconds * 1000, 1),
        unwrap_ms=round(report.unwrap_seconds * 1000, 1),
        already=already,
    )
