"""Deploying infra/aws templates onto the stack's LocalStack, in accounts of their own.

LocalStack takes a 12-digit access key id as the account id, so each test module deploys
the platform into a fresh random account (and a customer's key into another): the
templates' fixed names (the ``alias/archive-kms-managed`` alias, role names) never meet
those of other tests or of earlier runs on the shared LocalStack.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from archive_kms.config import PROJECT_ROOT, Settings

AWS_DIR = PROJECT_ROOT / "infra" / "aws"
#: what the templates deployed here need from LocalStack besides S3 and KMS
CFN_SERVICES = ("cloudformation", "iam", "sts")


def new_account() -> str:
    return "9" + "".join(secrets.choice("0123456789") for _ in range(11))


def client(settings: Settings, service: str, account: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=settings.aws_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=account,
        aws_secret_access_key="test",
    )


def require_cloudformation(settings: Settings) -> None:
    """Fail (never skip) when the running LocalStack was started without CloudFormation."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{settings.aws_endpoint_url}/_localstack/health", timeout=5) as resp:
        services = json.loads(resp.read()).get("services", {})
    missing = [s for s in CFN_SERVICES if services.get(s) not in ("available", "running")]
    if missing:
        pytest.fail(
            f"LocalStack runs without {', '.join(missing)}: it was started before SERVICES included them; "
            "restart it (`archive-kms stack down --only localstack && archive-kms stack up`)",
            pytrace=False,
        )


def _wait(cf: Any, name: str, done: str, seconds: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        stack = cf.describe_stacks(StackName=name)["Stacks"][0]
        status = stack["StackStatus"]
        if status == done:
            return stack
        if status.endswith(("_FAILED", "ROLLBACK_COMPLETE")) or time.monotonic() > deadline:
            events = cf.describe_stack_events(StackName=name)["StackEvents"]
            reasons = [
                f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}"
                for e in events
                if e.get("ResourceStatusReason") and "FAILED" in e.get("ResourceStatus", "")
            ]
            raise AssertionError(f"stack {name} is {status}, wanted {done}: {reasons[:5]}")
        time.sleep(0.5)


def outputs(stack: dict[str, Any]) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def deploy(cf: Any, name: str, template: Path, parameters: dict[str, str]) -> dict[str, str]:
    """Create the stack and wait for CREATE_COMPLETE; its outputs."""
    cf.create_stack(
        StackName=name,
        TemplateBody=template.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    return outputs(_wait(cf, name, "CREATE_COMPLETE"))


def update(cf: Any, name: str, template: Path, parameters: dict[str, str]) -> dict[str, str]:
    cf.update_stack(
        StackName=name,
        TemplateBody=template.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    return outputs(_wait(cf, name, "UPDATE_COMPLETE"))


def delete(cf: Any, name: str) -> None:
    """Delete the stack and wait until it is gone (DELETE_COMPLETE or no longer listed)."""
    cf.delete_stack(StackName=name)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status = cf.describe_stacks(StackName=name)["Stacks"][0]["StackStatus"]
        except cf.exceptions.ClientError:
            return
        if status == "DELETE_COMPLETE":
            return
        if status == "DELETE_FAILED":
            raise AssertionError(f"stack {name}: DELETE_FAILED")
        time.sleep(0.5)
    raise AssertionError(f"stack {name} not deleted after 180 s")


def empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    """Every version and delete marker, then the bucket (best effort for locked objects)."""
    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        pass
