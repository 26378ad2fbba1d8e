"""The scheduled audit anchor: publish the audit log's head to the Object Lock bucket and
walk every anchor of the log (``operations.anchoring.anchor_and_verify``).

Thin: the flow builds this process's platform and calls one function. A log that does not
continue its anchors (a restored or replaced database) fails the flow run with the alarm's
message (``AuditForkError``); the alarm is also in the logs and the audit log, and the
console shows it. Deployment ``audit-anchor/audit-anchor`` in ``flows/prefect.yaml``, on an
interval of 3600 seconds (``flows/prefect.yaml``; docs/deployment.md).
"""

from __future__ import annotations

from typing import Any

from archive_kms.flows.migration import process_platform
from prefect import flow, get_run_logger

from archive_kms.operations.anchoring import anchor_and_verify


@flow(name="audit-anchor", flow_run_name="audit-anchor", persist_result=False, retries=0)
def audit_anchor() -> dict[str, Any]:
    """Anchor the audit head (refused on a fork) and verify every anchor of the log."""
    out = anchor_and_verify(process_platform())
    get_run_logger().info(
        "audit head anchored: record %d -> %s (%d anchors verified)",
        out["count"],
        out["where"],
        out["anchors_verified"],
    )
    return out
