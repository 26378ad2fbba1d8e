"""Audit anchors in an S3 bucket with Object Lock (compliance mode).

One object per anchor, ``audit-anchors/<log id>/<count, 20 digits>.json``, so a log's
latest is the last key of a listing of its prefix. The bucket is created with Object Lock and a default retention in
COMPLIANCE mode: until it expires nobody (no IAM policy, not the account root) can delete
an anchor's version or shorten its retention. We publish with ``If-None-Match: *`` (the
first anchor of a count stands); anyone else's PUT of the same key only adds a newer
version, and readers take the oldest version of a key, the one the retention protects.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from archive_kms.errors import ConfigurationError
from archive_kms.s3_errors import translate_error
from archive_kms.state.anchors import AuditAnchor

__all__ = ["S3AnchorStore"]

PREFIX = "audit-anchors/"


class S3AnchorStore:
    def __init__(self, s3_client: Any, bucket: str, *, retention_days: int) -> None:
        if retention_days < 1:
            raise ConfigurationError("audit anchor retention must be at least 1 day")
        self._s3 = s3_client
        self._bucket = bucket
        self._days = retention_days
        self._ready = False

    def __repr__(self) -> str:
        return f"S3AnchorStore(s3://{self._bucket}/{PREFIX}, retention {self._days} days)"

    def _key(self, log_id: str, count: int) -> str:
        return f"{PREFIX}{log_id}/{count:020d}.json"

    def ensure_bucket(self) -> None:
        """Create the bucket with Object Lock, or check an existing one has it in compliance mode."""
        if self._ready:
            return
        s3 = self._s3
        try:
            try:
                s3.head_bucket(Bucket=self._bucket)
            except Exception as exc:
                if getattr(exc, "response", {}).get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                s3.create_bucket(Bucket=self._bucket, ObjectLockEnabledForBucket=True)
                s3.put_object_lock_configuration(
                    Bucket=self._bucket,
                    ObjectLockConfiguration={
                        "ObjectLockEnabled": "Enabled",
                        "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": self._days}},
                    },
                )
            conf = s3.get_object_lock_configuration(Bucket=self._bucket)["ObjectLockConfiguration"]
        except ConfigurationError:
            raise
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "ObjectLockConfigurationNotFoundError":
                raise ConfigurationError(
                    f"audit anchor bucket {self._bucket} has no Object Lock: anchors there "
                    "could be deleted; use a bucket created with Object Lock"
                ) from None
            raise translate_error(exc, bucket=self._bucket, key=None, op="audit anchor bucket") from exc
        mode = conf.get("Rule", {}).get("DefaultRetention", {}).get("Mode")
        if conf.get("ObjectLockEnabled") != "Enabled" or mode != "COMPLIANCE":
            raise ConfigurationError(
                f"audit anchor bucket {self._bucket} must have Object Lock with a default "
                f"COMPLIANCE retention (found {mode or 'none'})"
            )
        self._ready = True

    def publish(self, anchor: AuditAnchor) -> str:
        self.ensure_bucket()
        key = self._key(anchor.log_id, anchor.count)
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=anchor.to_bytes(),
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
                ObjectLockMode="COMPLIANCE",
                IfNoneMatch="*",
                ObjectLockRetainUntilDate=anchor.anchored_at + timedelta(days=self._days),
            )
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise translate_error(exc, bucket=self._bucket, key=key, op="PutObject (audit anchor)") from exc
            # this count is anchored already: the first anchor stands
        return f"s3://{self._bucket}/{key}"

    def latest(self, log_id: str) -> AuditAnchor | None:
        self.ensure_bucket()
        prefix = f"{PREFIX}{log_id}/"
        try:
            last = None
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    if last is None or obj["Key"] > last:
                        last = obj["Key"]
            if last is None:
                return None
            # S3 lists a key's versions newest first: the last one is the first written
            versions = [
                v
                for v in self._s3.list_object_versions(Bucket=self._bucket, Prefix=last).get("Versions", [])
                if v["Key"] == last
            ]
            kwargs = {"VersionId": versions[-1]["VersionId"]} if versions and versions[-1].get("VersionId") else {}
            body = self._s3.get_object(Bucket=self._bucket, Key=last, **kwargs)["Body"].read()
        except Exception as exc:
            raise translate_error(exc, bucket=self._bucket, key=PREFIX, op="read audit anchors") from exc
        return AuditAnchor.from_bytes(body, where=f"s3://{self._bucket}/{last}")
