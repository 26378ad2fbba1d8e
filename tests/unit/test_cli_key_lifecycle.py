"""The key-lifecycle commands (`revoke`, `restore`, `keys check|status|policy`, `warnings`)
and console actions on the in-memory platform. A launcher that executes what is submitted
plays the worker of the revoke / restore deployments."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.config import Settings
from archive_kms.keys.memory import MemoryKms
from archive_kms.keys.refs import parse_key_ref
from archive_kms.migration.launch import Launch, LaunchState
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.revocation import RevocationStart, finish_revocation, restore_tenant
from archive_kms.operations.tenants import create_tenant


class ExecutingLauncher:
    """Runs the submitted revoke / restore run at once, as a worker would."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.submitted: list[tuple[str, dict[str, Any]]] = []

    def submit(self, deployment: str, parameters: Mapping[str, Any], *, tags: Sequence[str]) -> Launch:
        self.submitted.append((deployment, dict(parameters)))
        p = dict(parameters)
        if deployment == "key-revoke/revoke":
            finish_revocation(self.platform, RevocationStart.from_params(p["start"]))
        elif deployment == "key-restore/restore":
            restore_tenant(self.platform, p["tenant"], actor=p["actor"], reason=p["reason"], run_id=p["run_id"])
        return Launch(f"fr-{len(self.submitted)}", deployment)

    def launches(self, run_id: str) -> list[LaunchState]:
        return []


@dataclass
class _View:
    state: Any


@pytest.fixture
def kms() -> MemoryKms:
    return MemoryKms()


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch, kms: MemoryKms) -> Platform:
    p = Platform.in_memory(Settings(aws_endpoint_url=None), kms=kms)
    create_tenant(p, "acme", provision_storage=False, key_ref="memory://acme-cmk")
    submit_job(p.state, JobSpec("j1", "acme", "synthetic", synthetic={"count": 6, "seed": 3}), p.open_archive)
    launcher = ExecutingLauncher(p)
    monkeypatch.setattr(cli, "_platform", lambda: p)
    monkeypatch.setattr(cli, "_state_only", lambda: _View(p.state))
    monkeypatch.setattr(cli, "_prefect_api", lambda: "http://prefect.invalid/api")
    monkeypatch.setattr(cli, "_launcher", lambda: launcher)
    p.launcher = launcher  # type: ignore[attr-defined]
    return p


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_revoke_prints_the_receipt_and_restore_brings_access_back(platform: Platform) -> None:
    out = invoke("revoke", "acme", "--reason", "incident 7", "--yes")
    assert out.exit_code == 0, out.output
    assert "revocation receipt" in out.output and "receipt: OK" in out.output
    assert "reads (fresh" in out.output and "provider unwrap" in out.output
    assert platform.launcher.submitted[0][0] == "key-revoke/revoke"
    runs = json.loads(invoke("runs", "list", "--tenant", "acme", "--json").stdout)
    assert [(r["flow"], r["state"]) for r in runs] == [("revoke", "completed")]
    status = json.loads(invoke("keys", "status", "acme", "--json").stdout)
    assert status["revoked"] is True
    assert [w["kind"] for w in json.loads(invoke("warnings", "--tenant", "acme", "--json").stdout)] == [
        "tenant_revoked"
    ]
    again = invoke("restore", "acme", "--yes", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["restore_keys"]["restored_at"]
    assert json.loads(invoke("keys", "status", "acme", "--json").stdout)["revoked"] is False
    assert invoke("read", "acme", "--record", "x/y").exit_code == 2  # readable again (only the record is unknown)


def test_destructive_commands_ask_and_refuse_without_a_terminal(platform: Platform) -> None:
    out = invoke("revoke", "acme")
    assert out.exit_code == 2 and "pass --yes" in out.output
    assert not platform.keychain.status("acme").revoked and platform.launcher.submitted == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("revoke", "acme", "--before", "yesterday", "--yes"), "ISO 8601"),
        (("revoke", "acme", "--before", "2020-01-01T00:00:00", "--yes"), "time zone"),
        (("revoke", "acme", "--before", "2999-01-01T00:00:00Z", "--yes"), "in the future"),
        (("revoke", "acme", "--workspace", "nope", "--yes"), "no live workspace"),
        (("revoke", "Bad/Tenant", "--yes"), "tenant"),
        (("revoke", "ghost", "--yes"), "unknown tenant"),
        (("restore", "acme", "--yes"), "not revoked"),
        (("keys", "policy", "acme", "forever", "--yes"), "deny-immediately, alert-only or serve-from-cache-for"),
        (("keys", "check", "ghost"), "unknown tenant"),
        (("warnings", "ack", "nope:acme"), "no warning"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(platform: Platform, args, says) -> None:
    before = len(list(platform.state.iter_audit()))
    out = invoke(*args)
    assert out.exit_code == 2, out.output
    assert says in out.output and "Traceback" not in out.output
    assert len(list(platform.state.iter_audit())) == before
    assert not platform.keychain.status("acme").revoked


def test_dry_runs_print_the_blast_radius_and_change_nothing(platform: Platform) -> None:
    out = invoke("revoke", "acme", "--dry-run", "--json")
    assert out.exit_code == 0, out.output
    preview = json.loads(out.stdout)
    assert preview["action"] == "revoke" and preview["index_documents"] == 6 and preview["objects"] >= 6
    scoped = json.loads(invoke("revoke", "acme", "--workspace", "default", "--dry-run", "--json").stdout)
    assert scoped["objects"] == preview["objects"]  # one workspace: all of it here
    human = invoke("keys", "check", "--dry-run")
    assert human.exit_code == 0 and "acme" in human.output and "dry run" in human.output
    assert not platform.keychain.status("acme").revoked and platform.state.list_runs("acme") == []


def test_keys_check_revokes_a_tenant_whose_key_the_customer_disabled(platform: Platform, kms: MemoryKms) -> None:
    assert json.loads(invoke("keys", "check", "--json").stdout)["counts"]["ok"] == 1
    kms.disable(parse_key_ref(platform.resolve_provider("memory://acme-cmk").key_ref).name)
    out = json.loads(invoke("keys", "check", "acme", "--json").stdout)
    assert out["observations"][0]["classification"] == "revoked"
    assert out["observations"][0]["action"].startswith("revoked by run")
    assert platform.keychain.status("acme").revoked


def test_grace_policy_is_shown_set_and_reset_and_audited(platform: Platform) -> None:
    assert "serve-from-cache-for:60 (the settings default)" in invoke("keys", "policy", "acme").output
    set_ = invoke("keys", "policy", "acme", "deny-immediately", "--yes")
    assert set_.exit_code == 0 and "deny-immediately" in set_.output
    assert str(platform.grace_policy("acme")) == "deny-immediately"
    assert invoke("keys", "policy", "acme", "--default", "--yes").exit_code == 0
    assert str(platform.grace_policy("acme")) == "serve-from-cache-for:60"
    actions = [r.action for r in platform.state.iter_audit(tenant_id="acme")]
    assert actions.count("key.grace_policy") == 2


def test_warnings_can_be_acknowledged_and_cleared_by_hand(platform: Platform) -> None:
    from archive_kms.operations.key_warnings import raise_warning

    raise_warning(platform.state, "acme", "key_unavailable", "no answer", actor="test")
    ack = invoke("warnings", "ack", "key_unavailable:acme", "--json")
    assert ack.exit_code == 0 and json.loads(ack.stdout)["acknowledged_by"].startswith("operator")
    cleared = invoke("warnings", "clear", "key_unavailable:acme", "--reason", "fixed", "--yes")
    assert cleared.exit_code == 0, cleared.output
    assert invoke("warnings").output.strip() == "no warnings"
    assert "key_unavailable:acme" in invoke("warnings", "--all").output


# --- the console ----------------------------------------------------------------------------------


def test_console_registers_revoke_and_dual_control_restore_with_previews() -> None:
    from archive_kms.api import revocation_actions  # noqa: F401 - registers on import
    from archive_kms.api.actions import registered_actions
    from archive_kms.api.warnings import warning_sources

    actions = registered_actions()
    assert actions["revoke"].dual_control is False and actions["revoke"].dry_run == "revoke"
    assert actions["restore"].dual_control is True and actions["restore"].dry_run == "restore"
    assert any(type(s).__name__ == "StoredWarnings" for s in warning_sources())


def test_deployments_the_launcher_submits_are_in_prefect_yaml_and_the_worker_check() -> None:
    import importlib.util

    import yaml

    from archive_kms.config import PROJECT_ROOT
    from archive_kms.migration.launch import DEPLOYMENTS

    spec = yaml.safe_load((PROJECT_ROOT / "flows" / "prefect.yaml").read_text())
    deployed = {f"{_flow_name(d['entrypoint'])}/{d['name']}" for d in spec["deployments"]}
    assert set(DEPLOYMENTS.values()) <= deployed
    import sys

    loader = importlib.util.spec_from_file_location("akms_stack_script", PROJECT_ROOT / "localstack" / "stack.py")
    stack = importlib.util.module_from_spec(loader)
    sys.modules["akms_stack_script"] = stack  # its dataclasses look their module up
    try:
        loader.loader.exec_module(stack)  # type: ignore[union-attr]
    finally:
        sys.modules.pop("akms_stack_script", None)
    assert set(stack.DEPLOYMENTS) == deployed
    monitor = next(d for d in spec["deployments"] if d["name"] == "monitor")
    assert monitor["schedules"][0]["interval"] == 60


def _flow_name(entrypoint: str) -> str:
    path, _, fn = entrypoint.partition(":")
    return {
        "flows/migration.py": {
            "enable": "migration-enable",
            "remove": "migration-remove",
            "support": "migration-support",
        },
        "flows/key_lifecycle.py": {"revoke": "key-revoke", "restore": "key-restore", "monitor": "key-monitor"},
        "flows/lifecycle.py": {"erase": "key-erase", "erase_retention": "key-erase-retention", "rotate": "key-rotate"},
        "flows/audit.py": {"audit_anchor": "audit-anchor"},
        "flows/archive_jobs.py": {"archive": "archive-job"},
    }[path][fn]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--days", "-1"), ("--days -1", "positive")),
        (("--hours", "0.0001"), ("--hours 0.0001", "whole")),
        (("--seconds", "0"), ("--seconds 0", "positive")),
        (("--days", "3", "--hours", "2"), ("once",)),
        (("--days", "40000"), ("36600 days",)),
    ],
)
def test_a_bad_retention_is_one_line_naming_the_flag_and_changes_nothing(platform: Platform, args, words) -> None:
    out = invoke("retention", "set", "acme", *args)
    assert out.exit_code == 2, out.output
    assert out.output.startswith("error: ") and out.output.count("\n") == 1, out.output
    assert all(w in out.output for w in words), out.output
    assert "Traceback" not in out.output
    assert json.loads(invoke("retention", "show", "acme", "--json").stdout) == []


@pytest.mark.parametrize(("kind", "subject"), [("run_failed\n", None), ("run_failed", "rot-1\n")])
def test_a_warning_kind_or_subject_with_a_trailing_newline_is_refused(kind: str, subject: str | None) -> None:
    """A warning id is `<kind>:<tenant>[:<subject>]` of the documented characters only; a
    trailing newline would make a second id for the same condition."""
    from archive_kms.errors import ValidationError
    from archive_kms.state._common import check_warning

    with pytest.raises(ValidationError):
        check_warning(kind, "warning", "m", subject, {})
    assert check_warning(kind.strip(), "warning", "m", subject.strip() if subject else None, {}) == {}
