"""The scheduled ``audit-anchor`` flow (flows/audit.py, deployment audit-anchor/audit-anchor)
in this process against the stack's Prefect server: it anchors and verifies, runs again
with nothing new, and fails, alarmed, once the database was restored to before its anchor.
Anchors go to the stack's Object Lock bucket on LocalStack."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from archive_kms.flows.audit import audit_anchor

from archive_kms.config import Settings
from archive_kms.errors import AuditForkError
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent


def test_the_scheduled_anchor_flow_anchors_then_fails_on_a_restored_database(
    flow_settings: Settings, prefect_api: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    db = Path(flow_settings.state_url.removeprefix("sqlite:///"))
    p = Platform.from_settings(flow_settings)
    for i in range(3):
        p.state.append_audit(AuditEvent("test", f"test.{i}", details={"i": i}))
    p.state.close()
    _copy_database(db, tmp_path / "backup.db")

    first = audit_anchor()
    assert first["count"] >= 3 and first["anchors_verified"] == 1 and first["where"].startswith("s3://")
    p = Platform.from_settings(flow_settings)
    p.state.append_audit(AuditEvent("test", "test.late"))
    p.state.close()
    second = audit_anchor()
    assert second["count"] == first["count"] + 1 and second["anchors_verified"] == 2
    assert audit_anchor()["count"] == second["count"]  # nothing new: the same anchor

    _copy_database(
        tmp_path / "backup.db", db
    )  # restored to before both anchors (online: the flow's process holds it open)
    with pytest.raises(AuditForkError, match="does not continue the latest anchor"):
        audit_anchor()


def _copy_database(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as source, sqlite3.connect(dst) as target:
        source.backup(target)
