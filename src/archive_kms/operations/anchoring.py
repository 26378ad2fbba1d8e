"""Publishing and checking the audit anchors with the platform's key and alarms: what the
CLI (``audit anchor`` / ``audit verify``), a migration's report step and the scheduled
``audit-anchor`` deployment call (``state/anchors.py`` has the rules)."""

from __future__ import annotations

import logging
from typing import Any

from archive_kms.alarms import raise_alarm
from archive_kms.errors import AuditForkError, ConfigurationError
from archive_kms.operations.platform import Platform
from archive_kms.state.anchors import AuditAnchor, log_id, publish_anchor, verify_with_anchor
from archive_kms.state.port import AuditVerification

__all__ = ["anchor_and_verify", "publish", "verify"]

log = logging.getLogger(__name__)


def publish(platform: Platform) -> tuple[AuditAnchor, str]:
    """Publish the audit head, chained to and signed like the anchors before it;
    ``AuditForkError`` (alarmed) if the log does not continue the latest anchor."""
    if platform.anchors is None:
        raise ConfigurationError("no anchor store: set ARCHIVE_KMS_AUDIT_ANCHOR_BUCKET (a bucket with Object Lock)")
    return publish_anchor(
        platform.state, platform.anchors, signer=platform.signer, verifier=platform.verifier(), alarms=platform.state
    )


def verify(platform: Platform, tenant_id: str | None = None) -> tuple[AuditVerification, AuditAnchor | None]:
    """The chain, and every anchor of the log against it (``verify_with_anchor``)."""
    return verify_with_anchor(platform.state, platform.anchors, tenant_id=tenant_id, verifier=platform.verifier())


def anchor_and_verify(platform: Platform) -> dict[str, Any]:
    """The scheduled job: publish the head (refused on a fork), then walk every anchor of
    the log; a log that fails either is an alarm and ``AuditForkError``, so the flow run
    fails where an operator sees it."""
    anchor, where = publish(platform)
    checked, latest = verify(platform)
    points = len(platform.anchors.points(anchor.log_id)) if platform.anchors is not None else 0
    if not checked.ok:
        message = f"the audit log does not verify against its anchors: {checked.reason}"
        raise_alarm(platform.state, "audit_fork", message, details={"log_id": log_id(platform.state)})
        raise AuditForkError(message, resource="audit")
    log.info("audit head anchored: record %d -> %s (%d anchors verified)", anchor.count, where, points)
    return {
        "count": anchor.count,
        "head_hash": anchor.head_hash,
        "where": where,
        "anchors_verified": points,
        "latest": None if latest is None else latest.count,
    }
