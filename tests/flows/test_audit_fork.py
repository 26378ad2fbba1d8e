"""A whole-database restore to before a crypto-erasure is caught by the audit anchors
(issue 11 finding 2): the next migration's report step refuses to anchor the restored log,
`audit verify` fails, and a fresh process refuses the keychain instead of decrypting what
was erased.

On the real services: an enable run (LocalStack S3 + KMS, Elasticsearch) whose report step
is preceded, in the test, by what happens in production between two runs: a workspace is
crypto-erased, the scheduled ``audit-anchor`` job anchors the log, and then the database is
restored from a backup taken before the erasure (SQLite's online backup, into the live
file). Anchors go to the stack's Object Lock bucket on LocalStack. Before this fix the
report step anchored the restored log at a higher count and `audit verify` passed again.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import run_plan
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.errors import AuditForkError, KeyDestroyedError
from archive_kms.migration import plan_enable
from archive_kms.migration.steps import STEP_FUNCTIONS
from archive_kms.operations.anchoring import anchor_and_verify
from archive_kms.operations.platform import Platform
from archive_kms.state.port import RunState


def _copy_database(src: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy of a live database, page by page."""
    with sqlite3.connect(src) as source, sqlite3.connect(dst) as target:
        source.backup(target)


def test_a_restored_database_is_refused_by_the_report_step_verify_and_every_fresh_process(
    flow_platform, flow_settings, archived_tenant, customer_key, tmp_path, monkeypatch
):
    p = flow_platform
    assert p.anchors is not None, "the stack's settings name an anchor bucket"
    archived = archived_tenant("s3", records=6, seed=3)
    t = archived.tenant_id
    victim = archived.records[0]
    db = Path(flow_settings.state_url.removeprefix("sqlite:///"))
    backup = tmp_path / "before-erasure.db"
    seen: dict[str, object] = {}

    def between_runs_then_report(ctx):
        # what production does between the copy's end and the next report: a backup is
        # taken, a workspace is erased (signed record), the scheduled job anchors the log
        _copy_database(db, backup)
        p.keychain.erase_workspace(t, victim.workspace_id, reason="customer deleted the org")
        seen["anchored"] = anchor_and_verify(p)["count"]
        other = Platform.from_settings(flow_settings)
        with pytest.raises(KeyDestroyedError):
            other.open_archive(t).read_record(victim.workspace_id, victim.object_type, victim.record_id)
        other.state.close()
        _copy_database(backup, db)  # ... and then someone restores the whole database
        return real_report(ctx)

    real_report = STEP_FUNCTIONS["report"]
    monkeypatch.setitem(STEP_FUNCTIONS, "report", between_runs_then_report)
    outcome = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=2))

    # 1. The report step refuses to anchor the restored log: the run fails there, alarmed.
    assert outcome.state == RunState.FAILED.value, outcome
    report = p.state.get_run(outcome.run_id).step("report")
    assert report.state.value == "failed" and "does not continue the latest anchor" in (report.error or "")
    assert p.anchors.latest(_log_id(p)).count == seen["anchored"]  # nothing anchored over it
    assert any(r.action == "alarm.audit_fork" for r in p.state.iter_audit())

    # 2. `audit verify` fails against the anchors (exit 1).
    fresh = Platform.from_settings(flow_settings)
    monkeypatch.setattr(cli, "_platform", lambda: fresh)
    verified = CliRunner().invoke(cli.app, ["audit", "verify", "--json"])
    assert verified.exit_code == 1, verified.output
    assert json.loads(verified.stdout)["ok"] is False
    anchored = CliRunner().invoke(cli.app, ["audit", "anchor"])
    assert anchored.exit_code == 2 and "does not continue the latest anchor" in anchored.output

    # 3. A fresh process does not decrypt the "erased" record from the restored keychain.
    with pytest.raises(AuditForkError, match="does not hold its latest anchor"):
        fresh.open_archive(t).read_record(victim.workspace_id, victim.object_type, victim.record_id)
    fresh.state.close()


def _log_id(p: Platform) -> str:
    from archive_kms.state.anchors import log_id

    found = log_id(p.state)
    assert found is not None
    return found
