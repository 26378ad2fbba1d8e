"""BYOK re-upload (issue #14, the Own seed's "Key Rotation" for BYOK): the customer
replaces the key we hold for them with new key material of their own. The same two
commands serve both clouds; the tenant's key service decides how the material travels:

- **AWS KMS** (``aws-kms://``, S3 tenants): a new KMS key with ``Origin=EXTERNAL`` and its
  ``GetParametersForImport`` answer (RSA wrapping public key, import token, expiry); the
  customer uploads 32 random bytes wrapped under it (RSA-OAEP-SHA-256). ``keys.byok``.
- **Azure Key Vault** (``azure-kv://``, Azure tenants): a key exchange key in the
  platform's vault (RSA-HSM, ``import`` only, 24 h); the customer uploads a ``.byok`` key
  transfer blob of a new RSA key made for it. ``keys.azure_byok`` (ADR 0036).

1. ``import_parameters``: the parameters above are made and published; a ``byok``
   rotation is opened (state ``detected``) holding them in its ``details``.
2. ``upload``: the upload with the SHA-256 digest (hex) of the uploaded file: the importer
   checks digest and shape before any provider call (a mismatch raises, changes nothing
   and is audited as ``byok.upload_refused``), then imports. The upload is the customer's
   confirmation: the rotation is ``confirmed`` with the new key's version and a ``rotate``
   run is triggered for it.
3. The rotate run (``migration.rotate``) proves the new key, re-wraps the L2 under it
   (1 unwrap under the old key + 1 wrap under the new), builds a new index generation,
   resumes jobs and, only after the canary (L2 under the new key, only the new generation
   left), points the tenant at the new key and **retires the old key**: KMS deletes its
   imported material; Key Vault soft-deletes it (nothing is wrapped under it any more).
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

from archive_kms.errors import ArchiveKmsError, StateError, ValidationError
from archive_kms.keys.azure_byok import KeyVaultByokImporter, KeyVaultImportParameters
from archive_kms.keys.byok import ByokImporter, ImportParameters
from archive_kms.migration.engine import trigger
from archive_kms.migration.rotate import audit_detected, plan_rotation
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import current_key_version
from archive_kms.state.port import AuditEvent, KeyMode, KeyRotation, MigrationRun, RotationState

__all__ = ["import_parameters", "upload"]


#: The key services a BYOK tenant's key can live in, by reference scheme.
AWS_KMS, AZURE_KV = "aws-kms", "azure-kv"


def _importer(platform: Platform) -> ByokImporter:
    return ByokImporter.from_settings(platform.settings)


def _kv_importer(platform: Platform) -> KeyVaultByokImporter:
    return KeyVaultByokImporter.from_settings(platform.settings)


def _check_tenant(platform: Platform, tenant_id: str) -> tuple[str, str]:
    """(the tenant's L1 reference, its key service) for a BYOK tenant."""
    t = platform.state.get_tenant(tenant_id)
    if t is None:
        raise StateError(f"unknown tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
    l1 = platform.keychain.status(tenant_id).l1_ref
    service = l1.split("://", 1)[0]
    if t.key_mode is not KeyMode.BYOK or service not in (AWS_KMS, AZURE_KV):
        raise ValidationError(
            f"tenant {tenant_id} is {t.key_mode.value} under {service}: a BYOK re-upload needs a BYOK tenant on AWS "
            "KMS or Azure Key Vault (BYOKMS/BYOKV customers rotate in their own key service and confirm)"
        )
    return l1, service


def _params_view(rotation: KeyRotation) -> dict[str, Any]:
    d = rotation.details
    view = {
        "tenant": rotation.tenant_id,
        "rotation_id": rotation.rotation_id,
        "key_service": d.get("key_service", AWS_KMS),
        "key_ref": rotation.key_ref,
        "wrapping_algorithm": d["wrapping_algorithm"],
        "wrapping_key_spec": d["wrapping_key_spec"],
        "public_key_pem": d["public_key_pem"],
        "expires_at": d["expires_at"],
    }
    if view["key_service"] == AZURE_KV:
        view["kek_kid"] = d["kek_kid"]
    else:
        view["import_token"] = d["import_token"]
    return view


def _kv_params(rotation: KeyRotation) -> KeyVaultImportParameters:
    d = rotation.details
    return KeyVaultImportParameters(
        key_ref=rotation.key_ref,
        kek_ref=d["kek_ref"],
        kek_kid=d["kek_kid"],
        wrapping_key_spec=d["wrapping_key_spec"],
        public_key_pem=d["public_key_pem"],
        expires_at=datetime.fromisoformat(d["expires_at"]),
        wrapping_algorithm=d["wrapping_algorithm"],
    )


def _new_parameters(
    platform: Platform, tenant_id: str, service: str, wrapping_key_spec: str
) -> tuple[str, dict[str, Any]]:
    """(the new key's reference, the rotation details holding what the customer needs)."""
    if service == AZURE_KV:
        kv = _kv_importer(platform).create_import_parameters(
            wrapping_key_spec=wrapping_key_spec, tags={"archive-kms-tenant": tenant_id[:256]}
        )
        return kv.key_ref, {
            "key_service": AZURE_KV,
            "wrapping_algorithm": kv.wrapping_algorithm,
            "wrapping_key_spec": kv.wrapping_key_spec,
            "public_key_pem": kv.public_key_pem,
            "kek_ref": kv.kek_ref,
            "kek_kid": kv.kek_kid,
            "expires_at": kv.expires_at.isoformat(),
        }
    importer = _importer(platform)
    new_ref = importer.create_key(
        description=f"archive_kms BYOK re-upload for tenant {tenant_id}", tags={"archive_kms_tenant": tenant_id}
    )
    params = importer.import_parameters(new_ref, wrapping_key_spec=wrapping_key_spec)
    return new_ref, {
        "key_service": AWS_KMS,
        "wrapping_algorithm": params.wrapping_algorithm,
        "wrapping_key_spec": params.wrapping_key_spec,
        "public_key_pem": params.public_key_pem,
        "import_token": base64.b64encode(params.import_token).decode("ascii"),
        "expires_at": params.expires_at.isoformat(),
    }


def import_parameters(
    platform: Platform, tenant_id: str, *, actor: str, wrapping_key_spec: str = "RSA_4096"
) -> dict[str, Any]:
    """Publish a wrapping public key and import token for a re-upload of ``tenant_id``'s
    key material (the same ones again while they are valid)."""
    l1, service = _check_tenant(platform, tenant_id)
    open_one = platform.state.find_open_rotation(tenant_id)
    if open_one is not None:
        if open_one.kind == "byok" and open_one.state is RotationState.DETECTED:
            if datetime.fromisoformat(open_one.details["expires_at"]) > datetime.now(UTC):
                return _params_view(open_one)
            platform.state.update_rotation(open_one.rotation_id, expect=[RotationState.DETECTED], state="cancelled")
            if open_one.details.get("key_service") == AZURE_KV:
                _kv_importer(platform).discard(_kv_params(open_one))  # its key exchange key has expired
        else:
            raise StateError(
                f"tenant {tenant_id} has rotation {open_one.rotation_id} {open_one.state.value}; finish it first",
                resource=f"rotation:{open_one.rotation_id}",
            )
    new_ref, details = _new_parameters(platform, tenant_id, service, wrapping_key_spec)
    rotation, _ = platform.state.open_rotation(
        KeyRotation(
            rotation_id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            kind="byok",
            key_ref=new_ref,
            previous_key_ref=l1,
            previous_version=current_key_version(platform, l1),
            observed_version=None,
            details=details,
        )
    )
    audit_detected(platform, rotation, actor)
    return _params_view(rotation)


def upload(
    platform: Platform, tenant_id: str, wrapped: bytes, stated_sha256: str, *, actor: str
) -> tuple[KeyRotation, MigrationRun]:
    """Import the customer's wrapped material into the pending new key (digest checked
    first) and trigger the rotate run that moves the tenant onto it."""
    _, service = _check_tenant(platform, tenant_id)
    rotation = platform.state.find_open_rotation(tenant_id)
    if rotation is None or rotation.kind != "byok" or rotation.state is not RotationState.DETECTED:
        raise StateError(
            f"tenant {tenant_id} has no BYOK import waiting for material: run `archive-kms byok import-params "
            f"{tenant_id}` first",
            resource=f"tenant:{tenant_id}",
        )
    version: str | None
    try:
        if rotation.details.get("key_service", AWS_KMS) != service:
            raise StateError(
                f"rotation {rotation.rotation_id} was opened for {rotation.details.get('key_service')}, the tenant's "
                f"key is in {service}; run `archive-kms byok import-params {tenant_id}` again",
                resource=f"rotation:{rotation.rotation_id}",
            )
        if service == AZURE_KV:
            kv = _kv_importer(platform).import_blob(
                _kv_params(rotation), wrapped, stated_sha256, tags={"archive-kms-tenant": tenant_id[:256]}
            )
            version, digest = kv.key_version, kv.byok_sha256
        else:
            d = rotation.details
            params = ImportParameters(
                key_ref=rotation.key_ref,
                wrapping_algorithm=d["wrapping_algorithm"],
                wrapping_key_spec=d["wrapping_key_spec"],
                public_key_pem=d["public_key_pem"],
                import_token=base64.b64decode(d["import_token"]),
                expires_at=datetime.fromisoformat(d["expires_at"]),
            )
            result = _importer(platform).import_material(params, wrapped, stated_sha256)
            version = result.key_material_id or current_key_version(platform, rotation.key_ref)
            digest = result.wrapped_sha256
    except ArchiveKmsError as exc:
        platform.state.append_audit(
            AuditEvent(
                actor=actor,
                action="byok.upload_refused",
                tenant_id=tenant_id,
                details={"rotation_id": rotation.rotation_id, "reason": f"{type(exc).__name__}: {exc}"[:500]},
            )
        )
        raise
    rotation = platform.state.update_rotation(
        rotation.rotation_id,
        expect=[RotationState.DETECTED],
        state=RotationState.CONFIRMED,
        observed_version=version,
        confirmed_by=actor,
        confirmed_at=datetime.now(UTC),
        details={"wrapped_sha256": digest},
    )
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="byok.uploaded",
            tenant_id=tenant_id,
            details={"rotation_id": rotation.rotation_id, "key_ref": rotation.key_ref, "key_material_id": version},
        )
    )
    run, _ = trigger(platform, plan_rotation(platform, rotation), actor=actor)
    platform.state.update_rotation(rotation.rotation_id, expect=[RotationState.CONFIRMED], run_id=run.run_id)
    return rotation, run
