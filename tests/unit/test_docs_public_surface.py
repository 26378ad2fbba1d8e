"""Every promise the docs make about the command line and the settings holds in the code.

Acceptance tests are written from the public surface alone (README, ``docs/``, the CLI's
help, the documented settings), so a command line, flag or setting name that the docs give
and the code does not have is a failing acceptance test. Here, mechanically:

- every ``archive-kms ...`` command line in README.md, ``docs/`` and ``infra/README.md``
  (code blocks and inline code) names an existing command, only options that command has,
  and, where it gives arguments, parses (placeholders such as ``RUN`` or ``<id>`` stand in
  for values; ``[...]`` parts are parsed as given);
- every command of the CLI is documented somewhere;
- every ``ARCHIVE_KMS_*`` variable the docs name is a ``Settings`` field or is read by the
  code that the doc points at (entrypoint, stack, tests), and every default the docs give
  for a setting is the field's default;
- ``docs/deployment.md`` "Settings reference" has one row per field with its default, its
  bounds and its allowed values;
- a bad setting is one line naming the variable, exit 2 (README: errors are one line);
- every command takes ``--json`` but the ones the README lists.

The console API's routes are held to ``docs/console-api.md`` in ``test_console_api.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from archive_kms.cli import app
from archive_kms.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# `archive-kms`, `.venv/bin/archive-kms` or the README's `$A`, then a command word. Not inside
# a quoted string (`"archive-kms local Azurite pool account"` is a key-derivation label).
_PREFIX = re.compile(r"""(?:\.venv/bin/archive-kms|\$A|(?<![\w/."'-])archive-kms)\s+(?=[a-z])""")
# Where a shell command line ends: a comment, a pipe, a redirection, a second command.
_END = re.compile(r"\s#\s|\s#$|&&|\|\||\s\|\s|;|\s>\s|\s2>|\s<\s")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|X")


def _command_lines() -> Iterator[tuple[str, str, bool]]:
    """(file:line, the text after ``archive-kms``, in a code block?) for every mention."""
    for path in DOC_FILES:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            # A code block quoting an error message holds its commands in backticks, as prose.
            spans = [line] if in_block and "`" not in line else re.findall(r"`([^`]+)`", line)
            for span in spans:
                for m in _PREFIX.finditer(span):
                    yield f"{path.relative_to(ROOT)}:{number}", _END.split(span[m.end() :])[0].strip(), in_block


def _argv(text: str) -> list[str]:
    """A documented synopsis as arguments: ``<...>`` is a value, ``[...]`` is parsed as given,
    ``a|b`` is its first alternative."""
    text = re.sub(r"<[^<>]*>", "X", text).replace("[", " ").replace("]", " ")
    return [t.split("|")[0] if "|" in t and not t.startswith("|") else t for t in shlex.split(text)]


ROOT_COMMAND = typer.main.get_command(app)


def _walk(argv: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command ``argv`` names, the arguments left for it, and its path."""
    command: Any = ROOT_COMMAND
    path: list[str] = []
    rest = list(argv)
    while hasattr(command, "resolve_command"):
        if not rest or rest[0].startswith("-") or rest[0] in ("X", "...", "…"):
            break
        sub = command.get_command(None, rest[0])
        if sub is None:
            raise LookupError(f"no command `archive-kms {' '.join([*path, rest[0]])}`")
        path.append(rest.pop(0))
        command = sub
    return command, rest, path


def _option_names(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


def _parse(argv: list[str]) -> None:
    """Parse as the CLI would, down to the leaf command, without running it."""
    ctx = ROOT_COMMAND.make_context("archive-kms", list(argv))
    command: Any = ROOT_COMMAND
    while hasattr(command, "resolve_command"):
        args = [*ctx._protected_args, *ctx.args]
        if not args:
            return
        name, command, rest = command.resolve_command(ctx, args)
        ctx = command.make_context(name, rest, parent=ctx)


def _all_commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    if hasattr(command, "resolve_command"):
        if getattr(command, "invoke_without_command", False):
            yield " ".join(path)
        for name in command.list_commands(None):
            yield from _all_commands(command.get_command(None, name), (*path, name))
    else:
        yield " ".join(path)


def test_the_docs_mention_commands():
    """The extraction itself finds the README's commands (a broken regex would pass everything)."""
    found = {text.split()[0] for _, text, _ in _command_lines() if text}
    assert {"enable", "runs", "revoke", "erase", "console", "stack", "db", "keys"} <= found
    assert sum(1 for _ in _command_lines()) > 150


def test_every_documented_command_line_names_real_commands_and_options_and_parses():
    problems = []
    for where, text, in_block in _command_lines():
        try:
            argv = _argv(text)
            command, rest, path = _walk(argv)
        except (ValueError, LookupError) as e:
            problems.append(f"{where}: {e}: {text}")
            continue
        known = _option_names(command)
        for token in rest:
            if token.startswith("--") and token.split("=")[0] not in known:
                problems.append(f"{where}: `archive-kms {' '.join(path)}` has no option {token}: {text}")
        if not rest:
            continue  # the command named in prose, no synopsis
        try:
            _parse(argv)
        except typer.TyperException as e:  # the CLI's usage errors; those a synopsis may cause are below
            kind = type(e).__name__
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            if kind == "BadParameter" and any(_PLACEHOLDER.fullmatch(t) for t in argv):
                continue  # a placeholder for a typed value (`--generate N`)
            if kind == "BadOptionUsage" and not in_block and argv[-1].startswith("--"):
                continue  # prose naming an option: "`archive-kms erase --out` writes ..."
            problems.append(f"{where}: {kind}: {message}: archive-kms {text}")
    assert not problems, "\n".join(problems)


def test_every_command_is_documented():
    mentioned = set()
    for _, text, _ in _command_lines():
        try:
            mentioned.add(" ".join(_walk(_argv(text))[2]))
        except (ValueError, LookupError):
            pass
    missing = sorted(set(_all_commands(ROOT_COMMAND)) - mentioned - {""})
    assert not missing, f"commands no doc shows (README.md or docs/): {missing}"


# --- settings ---------------------------------------------------------------------------------------

# Variables the docs name that are not Settings fields, and the file that reads each.
NOT_SETTINGS = {
    "ARCHIVE_KMS_STACK_DIR": "src/archive_kms/config.py",
    "ARCHIVE_KMS_ENDPOINTS_FILE": "src/archive_kms/config.py",
    "ARCHIVE_KMS_PORT_<SERVICE>": "localstack/stack.py",
    "ARCHIVE_KMS_PORT_PREFECT": "localstack/stack.py",
    "ARCHIVE_KMS_AZURITE_POOL_SIZE": "localstack/stack.py",
    "ARCHIVE_KMS_LOWKEY_VAULT_JAR": "localstack/stack.py",
    "ARCHIVE_KMS_CRASH_AT": "src/archive_kms/crashpoints.py",
    "ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM": "infra/docker/entrypoint.py",
    "ARCHIVE_KMS_DB_HOST": "infra/docker/entrypoint.py",
    "ARCHIVE_KMS_STATE_RUNTIME_ROLE": "src/archive_kms/state/migrations/versions/0007_runtime_role.py",
    "ARCHIVE_KMS_SOAK_SEED": "tests/faults/test_random_kills.py",
    "ARCHIVE_KMS_SOAK_TRIALS": "tests/faults/test_random_kills.py",
    "ARCHIVE_KMS_FAULT_REPORT": "tests/faults/conftest.py",
    "ARCHIVE_KMS_TEST_COMPOSE": "tests/infra/compose_stack.py",
    "ARCHIVE_KMS_TEST_POSTGRES_URL": "tests/state_fixtures.py",
}


def _documented_variables() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"ARCHIVE_KMS_[A-Z0-9_]*(?:[A-Z0-9]|_<[A-Z]+>)", line):
                found.setdefault(m.group(0), []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_every_documented_variable_is_a_setting_or_read_where_the_docs_say():
    fields = set(Settings.model_fields)
    problems = []
    for name, where in sorted(_documented_variables().items()):
        if name.removeprefix("ARCHIVE_KMS_").lower() in fields:
            continue
        reader = NOT_SETTINGS.get(name)
        prefix = "ARCHIVE_KMS_PORT_" if name.startswith("ARCHIVE_KMS_PORT_") else name
        if reader is None or prefix not in (ROOT / reader).read_text():
            problems.append(f"{name} ({', '.join(where[:3])}): no such setting, and nothing reads it")
    assert not problems, "\n".join(problems)


def test_every_documented_setting_default_is_the_code_default():
    """``ARCHIVE_KMS_X` (60)``, ``x` (default 10)``, ``x` (default 30 s)``: the documented
    number is the field's default."""
    fields = Settings.model_fields
    claim = re.compile(
        r"`(?:ARCHIVE_KMS_)?([A-Za-z0-9_]+)`\s*\((?:default\s+)?(\d[\d_,.]*)(?:\s*s)?\)"  # `x` (60), `x` (default 30 s)
        r"|^\| `(?:ARCHIVE_KMS_)?([A-Za-z0-9_]+)` \| (\d[\d_,.]*)(?: s)? \|",  # a table row: | `x` | 5 | ...
        re.M,
    )
    checked, problems = 0, []
    for path in DOC_FILES:
        text = path.read_text()
        for m in claim.finditer(text):
            name, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            field = fields.get(name.lower())
            if field is None:
                continue
            checked += 1
            documented = float(value.replace(",", "").replace("_", ""))
            if field.default != documented:
                line = text[: m.start()].count("\n") + 1
                problems.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)} but the default is {field.default!r}")
    assert checked >= 10, checked
    assert not problems, "\n".join(problems)


def _reference_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text[text.index("## Settings reference") :]
    return {
        m.group(1): [c.strip() for c in m.group(2).split(" | ")]
        for m in re.finditer(r"^\| `ARCHIVE_KMS_(\w+)` \| (.*) \|$", section, re.M)
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def test_the_settings_reference_lists_every_setting_with_its_default_and_range():
    """docs/deployment.md "Settings reference": one row per field, its default, its bounds."""
    rows = _reference_rows()
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default, values, what = rows[name.upper()]
        if name == "state_url":
            assert default == "`sqlite:///<stack dir>/state.db`" and "state.db" in str(Settings().state_url)
        elif field.default_factory is not None:
            assert default == "`[]`" and field.default_factory() == [], name
        elif field.default is None:
            assert default == "unset", name
        elif isinstance(field.default, bool):
            assert default == f"`{str(field.default).lower()}`", name
        elif isinstance(field.default, int | float):
            assert default == _number(field.default), name
        else:
            assert default == f"`{field.default}`", name
        for bound in field.metadata:
            for attr in ("ge", "gt", "le", "pattern"):
                if getattr(bound, attr, None) is not None:
                    shown = getattr(bound, attr)
                    assert (shown if attr == "pattern" else _number(shown)) in values, (name, values)
        if typing.get_origin(field.annotation) is typing.Literal:
            assert all(f"`{option}`" in values for option in typing.get_args(field.annotation)), (name, values)
        assert what, name


# README "Every command takes `--json`, except ...": the exceptions it lists, no others.
WITHOUT_JSON = {
    "version",
    "audit export",
    "erasure public-key",
    "erasure show",
    "rotation confirmation",
    "console token",
    "console serve",
}


def test_every_command_takes_json_but_the_ones_the_readme_lists():
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("Every command takes `--json`") :].split("\n\n")[0]
    assert all(f"`{name}`" in listed for name in WITHOUT_JSON), listed
    without = {p for p in _all_commands(ROOT_COMMAND) if p and "--json" not in _option_names(_walk(p.split())[0])}
    assert without == WITHOUT_JSON


def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(monkeypatch):
    """README: errors are one line naming what to fix (exit code 2). A setting out of its
    range is such an error, not an internal one; its value is never echoed (some are secrets)."""
    from typer.testing import CliRunner

    for variable, value, words in [
        ("ARCHIVE_KMS_MIGRATION_COPY_BUFFER_MIB", "1", "greater than or equal to 4"),
        ("ARCHIVE_KMS_AZURE_ACCOUNT_POOL", '[{"key": "s3cr3t-value"}]', "string"),  # secrets, of the wrong type
        ("ARCHIVE_KMS_AZURE_ACCOUNT_POOL", "not-json-s3cr3t-value", "JSON"),
    ]:
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            out = CliRunner().invoke(app, ["tenant", "list"])
        assert out.exit_code == 2, out.output
        assert out.output.startswith(f"error: invalid setting {variable}: ") and out.output.count("\n") == 1
        assert words in out.output and "s3cr3t" not in out.output, out.output
        assert "internal error" not in out.output and "Traceback" not in out.output


# --- deployments ------------------------------------------------------------------------------------


def _deployments() -> dict[str, dict[str, Any]]:
    """``<flow name>/<deployment name>`` -> the deployment, from flows/prefect.yaml and the
    ``@flow(name=...)`` of each entrypoint."""
    import yaml

    spec = yaml.safe_load((ROOT / "flows" / "prefect.yaml").read_text())
    found = {}
    for d in spec["deployments"]:
        path, function = d["entrypoint"].split(":")
        source = (ROOT / path).read_text()
        flow = re.search(
            rf'@flow\((?:[^()]|\([^()]*\))*?name="([^"]+)"(?:[^()]|\([^()]*\))*\)\s*def {function}\(', source
        )
        assert flow, d["entrypoint"]
        found[f"{flow.group(1)}/{d['name']}"] = d
    return found


def test_every_documented_deployment_exists_with_its_documented_schedule():
    deployments = _deployments()
    text = "\n".join(p.read_text() for p in DOC_FILES)
    flows = {name.split("/")[0] for name in deployments}
    named = set(re.findall(r"`([a-z]+(?:-[a-z]+)+/[a-z]+(?:-[a-z]+)*)`", text))
    named = {n for n in named if n.split("/")[0] in flows or n.split("/")[0].startswith(("migration-", "key-"))}
    assert named, "no deployment named in the docs"
    assert named <= set(deployments), sorted(named - set(deployments))
    for flow in flows:
        assert f"`{flow}`" in text or f"`{flow}/" in text or f"{flow} deployment" in text, f"flow {flow} undocumented"
    schedules = {name: [s.get("interval") for s in d.get("schedules") or []] for name, d in deployments.items()}
    # docs/key-lifecycle.md section 6 (every 60 s), "Retention policy" (every hour);
    # docs/deployment.md "The audit-anchor schedule" (3600 seconds); nothing else is scheduled.
    assert {n: s for n, s in schedules.items() if s} == {
        "key-monitor/monitor": [60],
        "key-erase-retention/retention": [3600],
        "audit-anchor/audit-anchor": [3600],
    }
    assert "scheduled `monitor` deployment\n(every 60 s)" in (ROOT / "docs" / "key-lifecycle.md").read_text()


def _stack_script(monkeypatch) -> Any:
    """localstack/stack.py, loaded with the documented default ports."""
    import importlib.util
    import sys

    for name in [v for v in os.environ if v.startswith("ARCHIVE_KMS_PORT_")]:
        monkeypatch.delenv(name)
    loader = importlib.util.spec_from_file_location("akms_stack_ports", ROOT / "localstack" / "stack.py")
    assert loader is not None and loader.loader is not None
    stack = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "akms_stack_ports", stack)  # its dataclasses look their module up
    loader.loader.exec_module(stack)
    return stack


def test_the_readme_gives_every_stack_service_and_its_port(monkeypatch):
    """README "The local cloud": one row per service of localstack/stack.py, at its port; the
    services `--only` accepts are those."""
    stack = _stack_script(monkeypatch)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| service | stands in for | port |") :].split("\n\n")[0]
    documented = sorted(int(p) for p in re.findall(r"\| (\d+)(?: \(HTTPS\)| \(health\))? \|$", table, re.M))
    assert documented == sorted(s.port for s in stack.SERVICES), table
    only = next(p for p in _walk(["stack", "up"])[0].params if "--only" in p.opts)
    assert only.help.split(": ")[1].split(",") == [s.name for s in stack.SERVICES]


def test_a_usage_error_is_one_line_naming_what_to_fix_and_exit_2():
    """README: errors are one line naming what to fix, exit code 2, never a traceback; that
    holds for what the parser refuses too (it printed a boxed usage block)."""
    from typer.testing import CliRunner

    for argv, words in [
        (["enable", "acme", "--bogus"], "No such option: --bogus (see `archive-kms enable --help`)"),
        (["runs", "show"], "Missing argument 'RUN'."),
        (["nosuch"], "No such command 'nosuch'."),
        (["archive", "acme", "--generate", "many"], "Invalid value for '--generate'"),
        (["enable", "acme", "--key-ref", "aws-kms://x"], "Missing option '--mode'."),
    ]:
        out = CliRunner().invoke(app, argv, prog_name="archive-kms")
        assert out.exit_code == 2, (argv, out.output)
        assert out.output.startswith("error: ") and out.output.count("\n") == 1, (argv, out.output)
        assert words in out.output and "Traceback" not in out.output, (argv, out.output)
    bare = CliRunner().invoke(app, ["runs"], prog_name="archive-kms")  # a group without a command: its help
    assert bare.exit_code == 2 and "resume" in bare.output and not bare.output.startswith("error")
    assert CliRunner().invoke(app, ["--help"], prog_name="archive-kms").exit_code == 0


def test_every_table_of_the_state_schema_is_documented():
    """A second implementation reads our database from the docs: every table is named in
    docs/ (docs/state-store.md "Schema" and the docs of the parts that own one)."""
    from sqlalchemy import MetaData

    from archive_kms.state import schema

    tables = {t for m in vars(schema).values() if isinstance(m, MetaData) for t in m.tables}
    assert len(tables) > 20
    text = "\n".join(p.read_text() for p in DOC_FILES)
    assert not sorted(t for t in tables if f"`{t}`" not in text)


def test_an_unknown_stack_service_is_one_line_and_exit_2(monkeypatch, capsys):
    """`stack status --only nope` was exit 1 ("stack: unknown service"), which `stack status`
    also answers when a service is down; bad input is exit 2 with one line."""
    stack = _stack_script(monkeypatch)
    assert stack.main(["status", "--only", "localstack,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only: unknown service(s): nope; known: localstack") and err.count("\n") == 1
