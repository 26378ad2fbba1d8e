"""The worker and console roles of infra/aws/platform-core.yaml grant exactly the IAM
actions the code calls: derived from the adapters' boto3 calls (AST, code_calls.py) and
botocore's operation names, mapped to IAM actions by AWS's service authorization
reference. A new boto3 call fails here until it is mapped and granted (or listed, with its
reason, as deliberately not granted). No services needed.

LocalStack does not enforce IAM (its community edition), so the deployed roles cannot
prove least privilege there; this static comparison is the proof.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import botocore.session
import pytest
from botocore import xform_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_calls import KMS_RECEIVERS, S3_RECEIVERS, Call, actions_of, load_cfn, policy_statements, sdk_calls

from archive_kms.config import PROJECT_ROOT

CORE = load_cfn(PROJECT_ROOT / "infra" / "aws" / "platform-core.yaml")
CUSTOMER = load_cfn(PROJECT_ROOT / "infra" / "aws" / "customer-byokms-key.yaml")

#: boto3 method -> IAM actions it needs (docs: "Actions, resources, and condition keys for
#: Amazon S3 / AWS KMS"). Paginators are listed by their operation.
S3_ACTIONS: dict[str, set[str]] = {
    "list_objects_v2": {"s3:ListBucket"},
    "head_bucket": {"s3:ListBucket"},
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    "put_object": {"s3:PutObject"},
    "create_multipart_upload": {"s3:PutObject"},
    "upload_part": {"s3:PutObject"},
    "complete_multipart_upload": {"s3:PutObject"},
    "abort_multipart_upload": {"s3:AbortMultipartUpload"},
    "list_multipart_uploads": {"s3:ListBucketMultipartUploads"},
    "delete_object": {"s3:DeleteObject"},
    "delete_objects": {"s3:DeleteObject"},  # DeleteObjects is authorised per key as s3:DeleteObject
    "create_bucket": {"s3:CreateBucket"},
    "delete_bucket": {"s3:DeleteBucket"},
    "put_public_access_block": {"s3:PutBucketPublicAccessBlock"},
    "get_public_access_block": {"s3:GetBucketPublicAccessBlock"},
    "put_bucket_encryption": {"s3:PutEncryptionConfiguration"},
    "get_bucket_encryption": {"s3:GetEncryptionConfiguration"},
    "list_object_versions": {"s3:ListBucketVersions"},
    "get_object_lock_configuration": {"s3:GetBucketObjectLockConfiguration"},
    "put_object_lock_configuration": {"s3:PutBucketObjectLockConfiguration"},
}
KMS_ACTIONS: dict[str, set[str]] = {
    "encrypt": {"kms:Encrypt"},
    "decrypt": {"kms:Decrypt"},
    "describe_key": {"kms:DescribeKey"},
    "create_key": {"kms:CreateKey"},
    "create_alias": {"kms:CreateAlias"},
    "enable_key_rotation": {"kms:EnableKeyRotation"},
    "schedule_key_deletion": {"kms:ScheduleKeyDeletion"},
    "get_parameters_for_import": {"kms:GetParametersForImport"},
    "import_key_material": {"kms:ImportKeyMaterial"},
    "delete_imported_key_material": {"kms:DeleteImportedKeyMaterial"},
    "sign": {"kms:Sign"},
    "get_public_key": {"kms:GetPublicKey"},
}

#: Calls that are not on AWS at all, with the reason.
NOT_AWS = {("operations/platform.py", "create_key"): "MemoryKms.create_key in Platform.in_memory()"}

#: Actions the code can call that the stack makes unnecessary, so they are not granted.
NOT_GRANTED = {
    "kms:CreateAlias": "keys/managed.py creates alias/archive-kms-managed only when missing; the stack creates it",
    "kms:EnableKeyRotation": "same path: the stack's managed key has rotation enabled",
    "kms:ScheduleKeyDeletion": "same path: only the loser of a managed-key creation race calls it",
    "s3:PutBucketObjectLockConfiguration": "state/anchors_s3.py configures Object Lock only on a bucket it created; the stack creates the anchor bucket",
}


@cache
def _operations(service: str) -> set[str]:
    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(op) for op in model.operation_names} | {"get_paginator"}


def _needed(call: Call, table: dict[str, set[str]]) -> set[str]:
    op = call.first_arg if call.method == "get_paginator" else call.method
    if op not in table:
        pytest.fail(
            f"{call.file}:{call.line} calls {op}: map it to its IAM actions in {Path(__file__).name} "
            "and grant them in infra/aws/platform-core.yaml (or say why not)",
            pytrace=False,
        )
    actions = set(table[op])
    # implied by the arguments (service authorization reference, "dependent actions")
    if op == "put_object" and "ObjectLockMode" in call.keywords:
        actions.add("s3:PutObjectRetention")
    if op == "get_object" and ({"VersionId", "**"} & call.keywords):
        actions.add("s3:GetObjectVersion")
    if op == "create_bucket" and "ObjectOwnership" in call.keywords:
        actions.add("s3:PutBucketOwnershipControls")
    if op == "create_key" and "Tags" in call.keywords:
        actions.add("kms:TagResource")
    return actions


@cache
def _code_actions() -> dict[str, list[str]]:
    """IAM action -> where the code needs it."""
    where: dict[str, list[str]] = {}
    for receivers, service, table in ((S3_RECEIVERS, "s3", S3_ACTIONS), (KMS_RECEIVERS, "kms", KMS_ACTIONS)):
        for call in sdk_calls(receivers, _operations(service)):
            if (call.file, call.method) in NOT_AWS:
                continue
            for action in _needed(call, table):
                where.setdefault(action, []).append(f"{call.file}:{call.line}")
    # S3 calls KMS for SSE-KMS buckets with the caller's permissions: writes need a data
    # key, reads (and multipart uploads) decrypt it (storage/s3.py sends SSE-KMS headers).
    where.setdefault("kms:GenerateDataKey", []).append("SSE-KMS on S3 PutObject/UploadPart")
    where.setdefault("kms:Decrypt", []).append("SSE-KMS on S3 GetObject")
    return where


def code_actions() -> dict[str, list[str]]:
    return {k: list(v) for k, v in _code_actions().items()}


def test_the_scan_finds_the_adapters_calls() -> None:
    where = code_actions()
    # one anchor per adapter, so a broken scanner cannot pass the comparisons below vacuously
    for action, module in [
        ("kms:Encrypt", "keys/aws_kms.py"),
        ("kms:ImportKeyMaterial", "keys/byok.py"),
        ("kms:CreateAlias", "keys/managed.py"),
        ("kms:Sign", "keys/signing_kms.py"),
        ("kms:GetPublicKey", "keys/signing_kms.py"),
        ("s3:PutObject", "storage/s3.py"),
        ("s3:PutBucketPublicAccessBlock", "storage/locations.py"),
        ("s3:ListBucketVersions", "state/anchors_s3.py"),
        ("s3:PutObjectRetention", "state/anchors_s3.py"),
    ]:
        assert any(w.startswith(module) for w in where.get(action, [])), (action, module, where.get(action))


def test_worker_is_granted_every_action_the_code_calls() -> None:
    granted = actions_of(policy_statements(CORE, "WorkerRole"))
    missing = {a: w for a, w in code_actions().items() if a not in granted and a not in NOT_GRANTED}
    assert not missing, f"called by the code but not granted to the worker: {missing}"


def test_worker_is_granted_nothing_the_code_does_not_call() -> None:
    granted = actions_of(policy_statements(CORE, "WorkerRole"))
    extra = granted - set(code_actions())
    assert not extra, f"granted to the worker but never called by the code: {sorted(extra)}"
    assert not set(NOT_GRANTED) & granted, "an action listed as not granted is granted"
    assert not [a for a in granted if "*" in a], "wildcard actions"


def test_console_reads_key_state_and_anchors_only() -> None:
    console = actions_of(policy_statements(CORE, "ConsoleRole"))
    assert console <= set(code_actions())
    assert console == {
        "kms:DescribeKey",
        "kms:Sign",  # rotation confirmations, with the platform signing key only (below)
        "kms:GetPublicKey",
        "kms:Decrypt",  # of the anchor bucket's S3 data key, only through S3 (condition below)
        "s3:ListBucket",
        "s3:ListBucketVersions",
        "s3:GetBucketObjectLockConfiguration",
        "s3:GetObject",
        "s3:GetObjectVersion",
    }
    (decrypt,) = [st for st in policy_statements(CORE, "ConsoleRole") if "kms:Decrypt" in st["Action"]]
    assert decrypt["Condition"]["StringEquals"]["kms:ViaService"] == {"Sub": "s3.${AWS::Region}.amazonaws.com"}


def test_the_signing_key_only_signs_digests_with_ecdsa_sha_256_for_both_roles() -> None:
    key = CORE["Resources"]["SigningKey"]["Properties"]
    assert (key["KeySpec"], key["KeyUsage"]) == ("ECC_NIST_P256", "SIGN_VERIFY")
    for role in ("WorkerRole", "ConsoleRole"):
        statements = policy_statements(CORE, role)
        for action in ("kms:Sign", "kms:GetPublicKey"):
            granted = _with(statements, action)
            assert granted and all(st["Resource"] == {"GetAtt": "SigningKey.Arn"} for st in granted), (role, action)
        (sign,) = _with(statements, "kms:Sign")
        assert sign["Condition"]["StringEquals"] == {
            "kms:SigningAlgorithm": "ECDSA_SHA_256",
            "kms:MessageType": "DIGEST",
        }


def _with(statements: list[dict], action: str) -> list[dict]:
    return [st for st in statements if action in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])]


def test_every_wrap_and_unwrap_requires_the_tenant_encryption_context() -> None:
    worker = policy_statements(CORE, "WorkerRole")
    for st in _with(worker, "kms:Encrypt"):
        assert st["Condition"]["Null"] == {"kms:EncryptionContext:tenant": "false"}, st["Sid"]
    for st in _with(worker, "kms:Decrypt"):
        cond = st["Condition"]
        # either a wrap/unwrap under a tenant context, or S3's data key through S3 only
        assert cond.get("Null") == {"kms:EncryptionContext:tenant": "false"} or "kms:ViaService" in cond.get(
            "StringEquals", {}
        ), st["Sid"]
    for st in _with(worker, "kms:GenerateDataKey"):
        assert "kms:ViaService" in st["Condition"]["StringEquals"], st["Sid"]


def test_object_writes_are_scoped_to_the_archive_prefixes_and_buckets() -> None:
    worker = policy_statements(CORE, "WorkerRole")
    for action in ("s3:PutObject", "s3:DeleteObject", "s3:GetObject"):
        for st in _with(worker, action):
            res = st["Resource"]
            text = str(res)
            assert res != "*" and ("/tenants/*" in text or "-*/*" in text or "/audit-anchors/*" in text), (
                st["Sid"],
                res,
            )
    (anchors,) = [st for st in worker if st["Sid"] == "AnchorObjects"]
    assert "s3:DeleteObject" not in anchors["Action"] and "s3:BypassGovernanceRetention" not in anchors["Action"]


def test_customer_key_policy_pins_the_tenant_context_and_names_only_our_role() -> None:
    statements = CUSTOMER["Resources"]["ArchiveKey"]["Properties"]["KeyPolicy"]["Statement"]
    ours = [st for st in statements if st["Sid"].startswith("ArchiveKms")]
    assert {st["Sid"] for st in ours} == {"ArchiveKmsTenantWrap", "ArchiveKmsDescribe", "ArchiveKmsDedicatedBucket"}
    for st in ours:
        assert st["Principal"] == {"AWS": {"Ref": "PlatformWorkerRoleArn"}}
    wrap = next(st for st in ours if st["Sid"] == "ArchiveKmsTenantWrap")
    assert wrap["Condition"] == {"StringEquals": {"kms:EncryptionContext:tenant": {"Ref": "TenantId"}}}
    granted = actions_of(ours)
    assert granted == {"kms:Encrypt", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"}
    assert granted <= set(code_actions())
