"""BYOK re-upload for S3 tenants (issue #14, the Own seed's "Key Rotation" for BYOK): the
customer replaces the key material we hold for them with new material of their own.

1. ``import_parameters``: a new KMS key with ``Origin=EXTERNAL`` is created for the tenant
   and its ``GetParametersForImport`` answer (RSA public wrapping key, import token, expiry)
   is published; a ``byok`` rotation is opened (state ``detected``) holding them.
2. ``upload``: the customer's material, wrapped under that public key (RSA-OAEP-SHA-256),
   with the SHA-256 digest (hex) of the wrapped bytes: ``ByokImporter.import_material``
   checks digest, length and expiry before any KMS call (a mismatch raises, changes
   nothing and is audited as ``byok.upload_refused``), then imports. The upload is the
   customer's confirmation: the rotation is ``confirmed`` with the new key material id and
   a ``rotate`` run is triggered for it.
3. The rotate run (``migration.rotate``) proves the new key, re-wraps the L2 under it
   (1 unwrap under the old key + 1 wrap under the new), builds a new index generation,
   resumes jobs and, only after the canary (L2 under the new key, only the new generation
   left), points the tenant at the new key and **deletes the old key's imported material**
   (the old key is retired: nothing is wrapped under it any more).

Azure tenants (Key Vault BYOK import) are not supported yet: refused with a clear message.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

from archive_kms.errors import ArchiveKmsError, StateError, ValidationError
from archive_kms.keys.byok import ByokImporter, ImportParameters
from archive_kms.migration.engine import trigger
from archive_kms.migration.rotate import audit_detected, plan_rotation
from archive_kms.operations.platform import Platform
from archive_kms.operations.rotation import current_key_version
from archive_kms.state.port import AuditEvent, KeyMode, KeyRotation, MigrationRun, RotationState

__all__ = ["import_parameters", "upload"]


def _importer(platform: Platform) -> ByokImporter:
    return ByokImporter.from_settings(platform.settings)


def _check_tenant(platform: Platform, tenant_id: str) -> str:
    t = platform.state.get_tenant(tenant_id)
    if t is None:
        raise StateError(f"unknown tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
    l1 = platform.keychain.status(tenant_id).l1_ref
    if t.key_mode is not KeyMode.BYOK or not l1.startswith("aws-kms://"):
        raise ValidationError(
            f"tenant {tenant_id} is {t.key_mode.value} under {l1.split('://')[0]}: a BYOK re-upload needs a BYOK "
            "tenant on AWS KMS (Key Vault BYOK import is not supported yet; BYOKMS/BYOKV customers rotate in their "
            "own key service and confirm)"
        )
    return l1


def _params_view(rotation: KeyRotation) -> dict[str, Any]:
    d = rotation.details
    return {
        "tenant": rotation.tenant_id,
        "rotation_id": rotation.rotation_id,
        "key_ref": rotation.key_ref,
        "wrapping_algorithm": d["wrapping_algorithm"],
        "wrapping_key_spec": d["wrapping_key_spec"],
        "public_key_pem": d["public_key_pem"],
        "import_token": d["import_token"],
        "expires_at": d["expires_at"],
    }


def import_parameters(
    platform: Platform, tenant_id: str, *, actor: str, wrapping_key_spec: str = "RSA_4096"
) -> dict[str, Any]:
    """Publish a wrapping public key and import token for a re-upload of ``tenant_id``'s
    key material (the same ones again while they are valid)."""
    l1 = _check_tenant(platform, tenant_id)
    open_one = platform.state.find_open_rotation(tenant_id)
    if open_one is not None:
        if open_one.kind == "byok" and open_one.state is RotationState.DETECTED:
            if datetime.fromisoformat(open_one.details["expires_at"]) > datetime.now(UTC):
                return _params_view(open_one)
            platform.state.update_rotation(open_one.rotation_id, expect=[RotationState.DETECTED], state="cancelled")
        else:
            raise StateError(
                f"tenant {tenant_id} has rotation {open_one.rotation_id} {open_one.state.value}; finish it first",
                resource=f"rotation:{open_one.rotation_id}",
            )
    importer = _importer(platform)
    new_ref = importer.create_key(
        description=f"archive_kms BYOK re-upload for tenant {tenant_id}", tags={"archive_kms_tenant": tenant_id}
    )
    params = importer.import_parameters(new_ref, wrapping_key_spec=wrapping_key_spec)
    rotation, _ = platform.state.open_rotation(
        KeyRotation(
            rotation_id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            kind="byok",
            key_ref=new_ref,
            previous_key_ref=l1,
            previous_version=current_key_version(platform, l1),
            observed_version=None,
            details={
                "wrapping_algorithm": params.wrapping_algorithm,
                "wrapping_key_spec": params.wrapping_key_spec,
                "public_key_pem": params.public_key_pem,
                "import_token": base64.b64encode(params.import_token).decode("ascii"),
                "expires_at": params.expires_at.isoformat(),
            },
        )
    )
    audit_detected(platform, rotation, actor)
    return _params_view(rotation)


def upload(
    platform: Platform, tenant_id: str, wrapped: bytes, stated_sha256: str, *, actor: str
) -> tuple[KeyRotation, MigrationRun]:
    """Import the customer's wrapped material into the pending new key (digest checked
    first) and trigger the rotate run that moves the tenant onto it."""
    _check_tenant(platform, tenant_id)
    rotation = platform.state.find_open_rotation(tenant_id)
    if rotation is None or rotation.kind != "byok" or rotation.state is not RotationState.DETECTED:
        raise StateError(
            f"tenant {tenant_id} has no BYOK import waiting for material: run `archive-kms byok import-params "
            f"{tenant_id}` first",
            resource=f"tenant:{tenant_id}",
        )
    d = rotation.details
    params = ImportParameters(
        key_ref=rotation.key_ref,
        wrapping_algorithm=d["wrapping_algorithm"],
        wrapping_key_spec=d["wrapping_key_spec"],
        public_key_pem=d["public_key_pem"],
        import_token=base64.b64decode(d["import_token"]),
        expires_at=datetime.fromisoformat(d["expires_at"]),
    )
    try:
        result = _importer(platform).import_material(params, wrapped, stated_sha256)
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
    version = result.key_material_id or current_key_version(platform, rotation.key_ref)
    rotation = platform.state.update_rotation(
        rotation.rotation_id,
        expect=[RotationState.DETECTED],
        state=RotationState.CONFIRMED,
        observed_version=version,
        confirmed_by=actor,
        confirmed_at=datetime.now(UTC),
        details={"wrapped_sha256": result.wrapped_sha256},
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
