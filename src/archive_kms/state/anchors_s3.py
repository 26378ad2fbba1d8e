"""Audit anchors in an S3 bucket with Object Lock (compliance mode).

One object per anchor, ``audit-anchors/<log id>/<count, 20 digits>-<head hash>.json``
(format 1 anchors of earlier releases: ``<count, 20 digits>.json``), so a listing of the
log's prefix gives every anchor's count and head hash without reading them, and its
latest is the last key. The bucket is created with Object Lock and a default retention in
COMPLIANCE mode: until it expires nobody (no IAM policy, not the account root) can delete
an anchor's version or shorten its retention. We publish with ``If-None-Match: *`` (the
first anchor of a count stands); anyone else's PUT of the same key only adds a newer
version, and readers take the oldest version of a key, the one the retention protects.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from archive_kms.errors import ConfigurationError, IntegrityError
from archive_kms.s3_errors import translate_error
from archive_kms.state.anchors import AnchorPoint, AuditAnchor

__all__ = ["S3AnchorStore"]

PREFIX = "audit-anchors/"
_HEX = frozenset("0123456789abcdef")


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

    def _key(self, log_id: str, count: int, head_hash: str) -> str:
        return f"{PREFIX}{log_id}/{count:020d}-{head_hash}.json"

    @staticmethod
    def _parse(log_id: str, key: str) -> tuple[int, str | None] | None:
        """(count, head hash) from a key of the log's prefix (hash None: a format 1 key),
        None for a key that is not an anchor's."""
        name = key.removeprefix(f"{PREFIX}{log_id}/").removesuffix(".json")
        count, _, head = name.partition("-")
        if len(count) != 20 or not count.isdigit():
            return None
        if not head:
            return int(count), None
        if len(head) != 64 or not set(head) <= _HEX:
            return None
        return int(count), head

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
        key = self._key(anchor.log_id, anchor.count, anchor.head_hash)
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

    def _keys(self, log_id: str) -> list[str]:
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=f"{PREFIX}{log_id}/"
        ):
            keys.extend(obj["Key"] for obj in page.get("Contents", ()))
        return keys

    def _read(self, key: str) -> AuditAnchor:
        # S3 lists a key's versions newest first: the last one is the first written (the
        # one its retention protects); a later PUT of the same name changes nothing.
        versions = [
            v
            for v in self._s3.list_object_versions(Bucket=self._bucket, Prefix=key).get("Versions", [])
            if v["Key"] == key
        ]
        kwargs = {"VersionId": versions[-1]["VersionId"]} if versions and versions[-1].get("VersionId") else {}
        body = self._s3.get_object(Bucket=self._bucket, Key=key, **kwargs)["Body"].read()
        return AuditAnchor.from_bytes(body, where=f"s3://{self._bucket}/{key}")

    def points(self, log_id: str) -> list[AnchorPoint]:
        self.ensure_bucket()
        out = []
        try:
            for key in self._keys(log_id):
                parsed = self._parse(log_id, key)
                if parsed is None:
                    continue
                count, head = parsed
                if head is None:  # a format 1 key: the hash is only in the body
                    head = self._read(key).head_hash
                out.append(AnchorPoint(count, head, f"s3://{self._bucket}/{key}"))
        except IntegrityError:
            raise
        except Exception as exc:
            raise translate_error(exc, bucket=self._bucket, key=PREFIX, op="read audit anchors") from exc
        return sorted(out, key=lambda p: (p.count, p.head_hash))

    def latest(self, log_id: str) -> AuditAnchor | None:
        points = self.points(log_id)
        return self.read(log_id, points[-1]) if points else None

    def read(self, log_id: str, point: AnchorPoint) -> AuditAnchor:
        top = point
        key = top.where.removeprefix(f"s3://{self._bucket}/")
        try:
            anchor = self._read(key)
        except IntegrityError:
            raise
        except Exception as exc:
            raise translate_error(exc, bucket=self._bucket, key=key, op="read audit anchor") from exc
        if anchor.point != (top.count, top.head_hash) or anchor.log_id != log_id:
            raise IntegrityError(
                f"audit anchor {top.where} holds another anchor than its name says", resource=top.where
            )
        return anchor
