"""Static checks of infra/: cfn-lint and checkov (their own virtualenv, infra/checks.py),
the suppressed rules against the list in infra/README.md, docker-compose.yml and the
Dockerfile against the stack and the settings, and the image's entrypoint. No services."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from archive_kms.config import PROJECT_ROOT, Settings

sys.path.insert(0, str(PROJECT_ROOT / "infra"))
sys.path.insert(0, str(PROJECT_ROOT / "localstack"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checks
import stack
from code_calls import load_cfn

INFRA = PROJECT_ROOT / "infra"
COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()


def _entrypoint():
    spec = importlib.util.spec_from_file_location("entrypoint", INFRA / "docker" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = _entrypoint()

#: ARCHIVE_KMS_* variables the image's entrypoint reads (not Settings fields)
ENTRYPOINT_VARS = {
    "ARCHIVE_KMS_DB_HOST",
    "ARCHIVE_KMS_DB_PORT",
    "ARCHIVE_KMS_DB_NAME",
    "ARCHIVE_KMS_DB_USER",
    "ARCHIVE_KMS_DB_PASSWORD",
    "ARCHIVE_KMS_DB_SSLMODE",
    "ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM",
    "ARCHIVE_KMS_RUNTIME_DIR",
    "ARCHIVE_KMS_WORK_POOL",
    "ARCHIVE_KMS_STACK_DIR",  # read by config.stack_dir()
}


# --- cfn-lint and checkov ---------------------------------------------------------------------


def test_cfn_lint_finds_nothing_in_the_aws_templates() -> None:
    code, text = checks.run_cfn_lint()
    assert code == 0, text
    assert len(checks.AWS_TEMPLATES) == 3


@cache
def _checkov() -> list[checks.CheckovResult]:
    return checks.checkov_all()


def test_checkov_finds_nothing_in_templates_and_dockerfile() -> None:
    results = {r.file: r for r in _checkov()}
    expected = {p.relative_to(PROJECT_ROOT).as_posix() for p in [*checks.AWS_TEMPLATES, *checks.AZURE_TEMPLATES]}
    assert expected | {"Dockerfile"} == set(results)
    assert all(r.parsing_errors == 0 for r in results.values())
    failed = {f: r.failed for f, r in results.items() if r.failed}
    assert not failed, failed
    # checkov has rules for every file but the customer's role assignment (parsed, no rule applies)
    assert [f for f, r in results.items() if r.passed == 0] == ["infra/azure/customer-byokv-access.json"]


def _readme_skips() -> set[tuple[str, str]]:
    text = (INFRA / "README.md").read_text()
    return {
        (m.group(1), m.group(2)) for m in re.finditer(r"^\| (CKV2?_[A-Z]+_\d+) \| `([^`]+)` \|", text, re.MULTILINE)
    }


def test_every_skipped_rule_has_a_reason_in_the_file_and_in_infra_readme() -> None:
    skipped = {(cid, r.file) for r in _checkov() for cid, _, why in r.skipped if why.strip()}
    unexplained = [(cid, r.file) for r in _checkov() for cid, _, why in r.skipped if not why.strip()]
    assert not unexplained, unexplained
    assert skipped == _readme_skips()


# --- docker-compose.yml and Dockerfile ------------------------------------------------------


def test_compose_references_resolve() -> None:
    services = COMPOSE["services"]
    volumes = set(COMPOSE["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source in volumes, (name, source)
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, (name, mode)
        assert "build" in svc or re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]), (name, svc.get("image"))
        assert not svc.get("image", "").endswith(":latest"), name


def test_compose_runs_the_stacks_versions_and_services() -> None:
    services = COMPOSE["services"]
    assert services["localstack"]["image"] == f"localstack/localstack:{stack.LOCALSTACK_VERSION_PY313}"
    assert services["localstack"]["environment"]["SERVICES"] == stack.LOCALSTACK_SERVICES
    assert services["elasticsearch"]["image"].endswith(f":{stack.ELASTICSEARCH_VERSION}")
    assert {"localstack", "azurite", "elasticsearch", "keyvault", "postgres", "prefect-server", "worker"} <= set(
        services
    )
    assert (
        "AccountKey=" + stack.AZURITE_KEY
        in services["worker"]["environment"]["ARCHIVE_KMS_AZURE_BLOB_CONNECTION_STRING"]
    )


def test_compose_commands_are_entrypoint_commands() -> None:
    known = {"worker", "prefect-server", "deploy", "keyvault-emulator", "health"}
    for name, svc in COMPOSE["services"].items():
        if "command" in svc and svc.get("image", "").startswith("archive-kms:"):
            assert svc["command"][0] in known, (name, svc["command"])


def _archive_kms_vars_in_compose() -> set[str]:
    names: set[str] = set()
    for svc in COMPOSE["services"].values():
        names |= {k for k in svc.get("environment", {}) if k.startswith("ARCHIVE_KMS_")}
    return names


def _archive_kms_vars_in_services_template() -> set[str]:
    template = load_cfn(INFRA / "aws" / "platform-services.yaml")
    names: set[str] = set()
    for res in template["Resources"].values():
        for container in res.get("Properties", {}).get("ContainerDefinitions", []):
            for item in container.get("Environment", []) + container.get("Secrets", []):
                # a conditional entry (!If [cond, {Name, ...}, !Ref AWS::NoValue]): both branches
                for entry in item["If"][1:] if "If" in item else [item]:
                    if isinstance(entry, dict) and str(entry.get("Name", "")).startswith("ARCHIVE_KMS_"):
                        names.add(entry["Name"])
    return names


@pytest.mark.parametrize("where", ["docker-compose.yml", "platform-services.yaml"])
def test_every_archive_kms_variable_is_a_setting_or_read_by_the_entrypoint(where) -> None:
    names = (
        _archive_kms_vars_in_compose() if where == "docker-compose.yml" else _archive_kms_vars_in_services_template()
    )
    settings = {f"ARCHIVE_KMS_{f.upper()}" for f in Settings.model_fields}
    unknown = names - settings - ENTRYPOINT_VARS
    assert names and not unknown, f"{where} sets variables nothing reads: {sorted(unknown)}"


def test_dockerfile_runs_unprivileged_on_a_pinned_base() -> None:
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE)
    assert len(bases) == 2 and len(set(bases)) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0])
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in DOCKERFILE and 'ENTRYPOINT ["archive-kms-entrypoint"]' in DOCKERFILE


# --- the entrypoint -------------------------------------------------------------------------


DB = {
    "ARCHIVE_KMS_DB_HOST": "db.internal",
    "ARCHIVE_KMS_DB_USER": "archive_kms",
    "ARCHIVE_KMS_DB_PASSWORD": "p@ss:/w?rd#",
}


def test_entrypoint_builds_the_state_url_with_the_password_quoted_and_drops_the_copy(tmp_path) -> None:
    env = dict(DB)
    entrypoint.prepare(env, tmp_path)
    assert env["ARCHIVE_KMS_STATE_URL"] == (
        "postgresql+psycopg://archive_kms:p%40ss%3A%2Fw%3Frd%23@db.internal:5432/archive_kms?sslmode=require"
    )
    assert "ARCHIVE_KMS_DB_PASSWORD" not in env
    from sqlalchemy.engine import make_url

    assert make_url(env["ARCHIVE_KMS_STATE_URL"]).password == DB["ARCHIVE_KMS_DB_PASSWORD"]


def test_entrypoint_keeps_an_explicit_state_url_and_refuses_half_a_database(tmp_path) -> None:
    env = {**DB, "ARCHIVE_KMS_STATE_URL": "sqlite:////data/state.db"}
    entrypoint.prepare(env, tmp_path)
    assert env["ARCHIVE_KMS_STATE_URL"] == "sqlite:////data/state.db"
    with pytest.raises(entrypoint.EntrypointError, match="ARCHIVE_KMS_DB_PASSWORD"):
        entrypoint.prepare({"ARCHIVE_KMS_DB_HOST": "db", "ARCHIVE_KMS_DB_USER": "u"}, tmp_path)


def test_entrypoint_reports_bad_configuration_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ARCHIVE_KMS_DB_HOST", "db")
    monkeypatch.delenv("ARCHIVE_KMS_STATE_URL", raising=False)
    monkeypatch.setenv("ARCHIVE_KMS_RUNTIME_DIR", str(tmp_path))
    assert entrypoint.main(["worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ARCHIVE_KMS_DB_USER" in err


def test_entrypoint_moves_the_signing_key_into_an_owner_only_file(tmp_path) -> None:
    from archive_kms.crypto.signing import Signer

    Signer.create_key_file(tmp_path / "k.pem")
    pem = (tmp_path / "k.pem").read_text()
    env = {"ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM": pem}
    entrypoint.prepare(env, tmp_path / "run")
    path = Path(env["ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH"])
    assert "ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM" not in env
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Signer.from_pem_file(path).key_id == Signer.from_pem_file(tmp_path / "k.pem").key_id
    with pytest.raises(entrypoint.EntrypointError, match="not a PEM private key"):
        entrypoint.prepare({"ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM": "hello"}, tmp_path / "run")


def test_entrypoint_commands() -> None:
    assert entrypoint.command_for([], {})[:5] == ["prefect", "worker", "start", "--pool", "archive-kms"]
    assert entrypoint.command_for(["deploy"], {})[-3:] == ["--prefect-file", "flows/prefect.yaml", "--all"]
    assert entrypoint.command_for(["archive-kms", "tenant", "list"], {}) == ["archive-kms", "tenant", "list"]
    assert (PROJECT_ROOT / "flows" / "prefect.yaml").exists()
    pools = {
        d["work_pool"]["name"]
        for d in yaml.safe_load((PROJECT_ROOT / "flows" / "prefect.yaml").read_text())["deployments"]
    }
    assert pools == {entrypoint.WORK_POOL}


def test_arm_templates_are_deployment_templates() -> None:
    for path in checks.AZURE_TEMPLATES:
        template = json.loads(path.read_text())
        assert template["$schema"].endswith("/deploymentTemplate.json#"), path.name
        assert template["resources"], path.name


def test_compose_file_validates_with_docker_compose(tmp_path) -> None:
    """Debian's docker-compose (1.29, installed by localstack/system-deps.sh) validates the
    file against the Compose schema without an engine. It predates the top-level ``name``,
    so that one line is dropped for it."""
    import shutil
    import subprocess

    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: run `make system-deps` (apt-get install docker-compose)"
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    assert text.count("\nname: archive-kms\n") == 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(text.replace("\nname: archive-kms\n", "\n"))
    out = subprocess.run(
        [exe, "-f", str(path), "--project-directory", str(PROJECT_ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    # and it can fail: a service depending on one that does not exist
    path.write_text(
        text.replace("\nname: archive-kms\n", "\n").replace(
            "postgres:\n        condition", "nosuch:\n        condition", 1
        )
    )
    bad = subprocess.run([exe, "-f", str(path), "config", "-q"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0
