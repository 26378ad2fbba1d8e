"""The migration commands of the CLI without services: argument validation and errors
(exit 2, one line naming what to fix), `runs list/show` on a temporary SQLite state
store, and `verify` on the in-memory platform. Also: the flows/ folder is packaged as
archive_kms.flows with every package under src/."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.config import PROJECT_ROOT
from archive_kms.migration import STEPS
from archive_kms.search import Query
from archive_kms.state.port import Flow, KeyMode, TenantRecord
from archive_kms.state.sql import open_state

KEY = "aws-kms://arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def state_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Settings of a machine with no stack: a temporary SQLite state store, no endpoints
    file, no Prefect API; nothing from the caller's ARCHIVE_KMS_* environment."""
    for name in list(os.environ):
        if name.startswith("ARCHIVE_KMS_"):
            monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", url)
    monkeypatch.setenv("ARCHIVE_KMS_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("ARCHIVE_KMS_ENDPOINTS_FILE", str(tmp_path / "no-endpoints.json"))
    return url


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def assert_refused(result, *words: str) -> None:
    """Exit 2 with a message on stderr naming what to fix, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = result.output.lower()
    for word in words:
        assert word.lower() in text, (word, result.output)
    assert "traceback" not in text


# --- enable / remove: refused before any service is touched ------------------------------------


def test_enable_refuses_an_unknown_mode_naming_the_modes(state_url: str) -> None:
    result = invoke("enable", "acme", "--mode", "byoxx", "--key-ref", KEY)
    assert_refused(result, "--mode", "byoxx", "byokms", "byok", "byokv", "kmip")


def test_enable_refuses_a_malformed_key_reference(state_url: str) -> None:
    result = invoke("enable", "acme", "--mode", "byokms", "--key-ref", "arn:aws:kms:us-east-1:1:key/x")
    assert_refused(result, "key reference", "aws-kms://")


def test_enable_refuses_a_bad_tenant_id_quoting_the_rule(state_url: str) -> None:
    assert_refused(invoke("enable", "Acme", "--mode", "byokms", "--key-ref", KEY), "lowercase")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task-runner", "spark"], ["--task-runner", "threads", "dask"]),
        (["--shards", "0"], ["--shards", "1..256"]),
        (["--cloud", "gcs"], ["--cloud", "s3", "azure"]),
    ],
)
def test_enable_refuses_bad_options(state_url: str, args: list[str], words: list[str]) -> None:
    assert_refused(invoke("enable", "acme", "--mode", "byokms", "--key-ref", KEY, *args), *words)


def test_enable_without_a_prefect_api_says_to_start_the_stack(state_url: str) -> None:
    result = invoke("enable", "acme", "--mode", "byokms", "--key-ref", KEY)
    assert_refused(result, "prefect_api_url", "archive-kms stack up")


def test_enable_with_a_prefect_api_that_does_not_answer_says_so(
    state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHIVE_KMS_PREFECT_API_URL", "http://127.0.0.1:9/api")  # discard port: refused
    result = invoke("remove", "acme")
    assert_refused(result, "http://127.0.0.1:9/api", "does not answer", "archive-kms stack up")


def test_remove_refuses_a_bad_task_runner(state_url: str) -> None:
    assert_refused(invoke("remove", "acme", "--task-runner", "processes"), "threads", "dask")


# --- runs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["runs", "show", "nope"], ["runs", "resume", "nope"], ["runs", "rerun", "nope", "--from", "copy"]]
)
def test_an_unknown_run_is_refused_naming_runs_list(state_url: str, args: list[str]) -> None:
    assert_refused(invoke(*args), "unknown run 'nope'", "archive-kms runs list")


def test_rerun_refuses_an_unknown_step_naming_the_steps(state_url: str) -> None:
    assert_refused(invoke("runs", "rerun", "nope", "--from", "copie"), "--from", "copie", *STEPS)


def _started_run(state_url: str, tenant: str = "acme") -> str:
    state = open_state(state_url)
    try:
        state.create_tenant(TenantRecord(tenant, KeyMode.MANAGED, {"cloud": "s3", "kind": "shared"}))
        run, created = state.start_run(tenant, Flow.ENABLE, mode="byokms", steps=STEPS, params={"key_ref": KEY})
        assert created
        return run.run_id
    finally:
        state.close()


def test_runs_list_and_show_read_the_state_store(state_url: str) -> None:
    assert invoke("runs", "list").output.strip() == "no runs"
    run_id = _started_run(state_url)

    listed = invoke("runs", "list", "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert (row["run_id"], row["tenant"], row["state"], row["steps_done"], row["steps"], row["current_step"]) == (
        run_id,
        "acme",
        "running",
        0,
        len(STEPS),
        "preflight",
    )
    assert json.loads(invoke("runs", "list", "--tenant", "other", "--json").stdout) == []

    shown = invoke("runs", "show", run_id, "--json")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["run_id"] == run_id and report["key_ref"] == KEY and report["verification"] == "pending"
    assert [s["step"] for s in report["steps"]] == list(STEPS)

    human = invoke("runs", "show", run_id)
    assert human.exit_code == 0, human.output
    for word in ("steps", "copied", "verified", f"0/{len(STEPS)}", run_id, "preflight", "attempts"):
        assert word in human.output, (word, human.output)


# --- verify on the in-memory platform -------------------------------------------------------------


@pytest.fixture
def memory_platform(monkeypatch: pytest.MonkeyPatch):
    from archive_kms.operations.archive import JobSpec, submit_job
    from archive_kms.operations.platform import Platform
    from archive_kms.operations.tenants import create_tenant

    platform = Platform.in_memory()
    create_tenant(platform, "acme", cloud="s3", provision_storage=False)
    spec = JobSpec("j1", "acme", "synthetic", synthetic={"count": 12, "seed": 5, "mix": "small", "workspaces": 2})
    submit_job(platform.state, spec, platform.open_archive)
    monkeypatch.setattr(cli, "_platform", lambda: platform)
    return platform


def _verify(*args: str) -> tuple[int, dict]:
    result = invoke("verify", "acme", "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def test_verify_reads_every_object_and_matches_the_index(memory_platform) -> None:
    code, v = _verify()
    assert code == 0 and v["ok"], v
    stored = list(memory_platform.open_archive("acme").store.list())
    assert v["objects"] == len(stored) > v["records"] == v["index_documents"] == 12
    assert v["bytes_plaintext"] > 0 and v["unreadable"] == v["missing_in_index"] == v["extra_in_index"] == 0


def test_verify_finds_a_document_missing_from_the_index(memory_platform) -> None:
    p = memory_platform
    index = p.index.current_index("acme")
    doc = p.open_archive("acme").search(Query(limit=1)).hits[0]
    p.index.delete_documents(index, [doc.doc_id], refresh=True)
    code, v = _verify()
    assert code == 1 and not v["ok"]
    assert (v["missing_in_index"], v["extra_in_index"], v["index_documents"], v["records"]) == (1, 0, 11, 12)
    assert v["examples"]["missing_in_index"] == [f"{doc.workspace_id}/{doc.object_type}/{doc.record_id}"]


def test_verify_finds_an_object_that_does_not_authenticate(memory_platform) -> None:
    from archive_kms.operations.archive import RECORD_PREFIX

    store = memory_platform.open_archive("acme").store
    name = next(info.name for info in store.list(RECORD_PREFIX))
    with store.open_read(name) as reader:
        data = bytearray(reader.read())
    data[-1] ^= 1  # flip one bit of the last tag
    store.delete(name)
    store.put_stream(name, iter([bytes(data)]))
    code, v = _verify()
    assert code == 1 and not v["ok"]
    assert v["unreadable"] == 1 and v["records"] == 11 and v["extra_in_index"] == 1
    assert v["examples"]["unreadable"][0].startswith(repr(name[:120]))


def test_verify_compares_ids_past_the_search_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """More records of one type than a search returns: a document swapped for a record
    that does not exist is found by id although the counts agree."""
    from archive_kms.domain.records import Record
    from archive_kms.operations.archive import write_records
    from archive_kms.operations.platform import Platform
    from archive_kms.operations.tenants import create_tenant
    from archive_kms.search import build_document
    from archive_kms.search.documents import MAX_LIMIT

    platform = Platform.in_memory()
    create_tenant(platform, "bulk", cloud="s3", provision_storage=False)
    archive = platform.open_archive("bulk")
    records = [Record("Task", f"00T{i:012d}", {"Subject": f"call {i}"}) for i in range(MAX_LIMIT + 50)]
    write_records(archive, ((r, []) for r in records))
    monkeypatch.setattr(cli, "_platform", lambda: platform)
    result = invoke("verify", "bulk", "--json")
    v = json.loads(result.stdout)
    assert result.exit_code == 0 and v["ok"] and v["records"] == v["index_documents"] == MAX_LIMIT + 50, v

    index = platform.index.current_index("bulk")
    gone = records[MAX_LIMIT + 10]  # past the first page of any search
    ghost = Record("Task", "00Tghost", {"Subject": "never archived"})
    platform.index.delete_documents(
        index,
        [build_document(gone, tenant="bulk", mode=archive.index_mode, keys=archive.search_keys).doc_id],
        refresh=True,
    )
    platform.index.bulk_index(
        index, [build_document(ghost, tenant="bulk", mode=archive.index_mode, keys=archive.search_keys)], refresh=True
    )
    result = invoke("verify", "bulk", "--json")
    v = json.loads(result.stdout)
    assert result.exit_code == 1 and not v["ok"]
    assert (v["missing_in_index"], v["extra_in_index"], v["index_documents"]) == (1, 1, MAX_LIMIT + 50)
    assert v["examples"]["missing_in_index"] == [f"{gone.workspace_id}/Task/{gone.record_id}"]
    assert v["examples"]["extra_in_index"] == [f"{ghost.workspace_id}/Task/00Tghost"]


def test_verify_refuses_an_unknown_tenant(memory_platform) -> None:
    assert_refused(invoke("verify", "nobody"), "unknown tenant 'nobody'")


# --- packaging ---------------------------------------------------------------------------------------


def test_flows_folder_is_the_package_archive_kms_flows_and_every_package_is_listed() -> None:
    """setuptools cannot combine packages.find with the mapped flows/ folder, so the
    packages are listed in pyproject.toml: a package added under src/ must be listed too,
    or a non-editable install would silently leave it out."""
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"": "src", "archive_kms.flows": "flows"}
    src = PROJECT_ROOT / "src"
    on_disk = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert set(config["packages"]) == on_disk | {"archive_kms.flows"}
    import archive_kms.flows.migration as flows

    assert Path(flows.__file__).resolve() == (PROJECT_ROOT / "flows" / "migration.py").resolve()


def test_run_flow_without_any_prefect_api_refuses_instead_of_starting_a_server(state_url: str) -> None:
    from archive_kms.flows.migration import run_flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from archive_kms.errors import ConfigurationError

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigurationError) as refused:
        run_flow("enable", tenant="acme", mode="byokms", key_ref=KEY)
    assert "prefect_api_url" in str(refused.value) and "archive-kms stack up" in str(refused.value)


def test_run_flow_refuses_an_unknown_flow_or_task_runner(state_url: str) -> None:
    from archive_kms.flows.migration import run_flow

    from archive_kms.errors import ValidationError

    # (not a real flow's name: importing flows.lifecycle adds erase and rotate to FLOWS)
    with pytest.raises(ValidationError, match="unknown flow 'reshuffle'"):
        run_flow("reshuffle", tenant="acme")
    with pytest.raises(ValidationError, match="threads, dask"):
        run_flow("remove", tenant="acme", task_runner="spark")


# --- runs waive, the quarantine in runs show, and how a stopped or blocked run is told ---------------


def _quarantined_run(state_url: str) -> tuple[str, list[bytes]]:
    """A failed run of ``acme`` whose ledger holds two quarantined objects (one name not UTF-8)."""
    from archive_kms.errors import IntegrityError
    from archive_kms.migration.quarantine import PoisonSourceError, quarantine_record
    from archive_kms.state.port import CopyRecord, CopyStatus, ManifestEntry, RunState

    run_id = _started_run(state_url)
    names = [b"records/ws0/Case/500A", b"attachments/ws0/\xff\xfeodd"]
    state = open_state(state_url)
    try:
        state.create_manifest(run_id, {"cloud": "s3", "kind": "shared"})
        state.add_manifest_entries(run_id, [ManifestEntry(n, 100, 0) for n in names + [b"records/ws0/Case/500B"]])
        rows = [
            quarantine_record(
                n, PoisonSourceError(f"segment 0 failed authentication: {IntegrityError.__name__}", attempts=3)
            )
            for n in names
        ]
        state.record_copies(run_id, rows + [CopyRecord(b"records/ws0/Case/500B", CopyStatus.VERIFIED)])
        state.set_run_state(run_id, RunState.FAILED)
    finally:
        state.close()
    return run_id, names


def test_runs_waive_records_an_audited_waiver_per_object(state_url: str) -> None:
    from archive_kms.migration.quarantine import Quarantine

    run_id, names = _quarantined_run(state_url)
    shown = invoke("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    for word in (
        "quarantined: 2 (0 waived)",
        "  records/ws0/Case/500A  [corrupt, 3 reads; not waived]",
        "attachments/ws0/\\xff\\xfeodd",
        "segment 0 failed authentication",
    ):
        assert word in shown.output, (word, shown.output)

    out = invoke(
        "runs",
        "waive",
        run_id,
        "--object",
        "records/ws0/Case/500A",
        "--reason",
        "restored by hand",
        "--actor",
        "support:alice",
        "--json",
    )
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["waived"] == ["records/ws0/Case/500A"] and answer["remaining"] == 1
    hexed = invoke(
        "runs", "waive", run_id, "--object-hex", names[1].hex(), "--reason", "junk object", "--actor", "support:bob"
    )
    assert hexed.exit_code == 0 and f"archive-kms runs resume {run_id}" in hexed.output, hexed.output

    state = open_state(state_url)
    try:
        waived = {n: Quarantine.from_error(state.get_copy(run_id, n).error).waiver for n in names}
        audit = [r for r in state.iter_audit(tenant_id="acme") if r.action == "object.waive"]
        assert state.verify_audit(tenant_id="acme").ok
    finally:
        state.close()
    assert {n: (w.actor, w.reason) for n, w in waived.items()} == {
        names[0]: ("support:alice", "restored by hand"),
        names[1]: ("support:bob", "junk object"),
    }
    assert [(r.actor, r.details["object_hex"], r.details["reason"], r.run_id) for r in audit] == [
        ("support:alice", names[0].hex(), "restored by hand", run_id),
        ("support:bob", names[1].hex(), "junk object", run_id),
    ]
    report = json.loads(invoke("runs", "show", run_id, "--json").stdout)
    assert (report["quarantined"], report["waived"]) == (2, 2)
    assert {q["waived_by"] for q in report["quarantine"]} == {"support:alice", "support:bob"}


@pytest.mark.parametrize(
    "args, words",
    [
        (["--object", "records/ws0/Case/500A", "--reason", "  "], ["reason"]),
        (["--object", "records/ws0/Case/500B", "--reason", "r"], ["not quarantined", "500B", "nothing waived"]),
        (["--reason", "r"], ["--object", "--all"]),
        (["--object-hex", "zz", "--reason", "r"], ["--object-hex", "not hex"]),
    ],
)
def test_runs_waive_refusals_waive_nothing(state_url: str, args: list[str], words: list[str]) -> None:
    run_id, _ = _quarantined_run(state_url)
    assert_refused(invoke("runs", "waive", run_id, *args), *words)
    state = open_state(state_url)
    try:
        assert not [r for r in state.iter_audit(tenant_id="acme") if r.action == "object.waive"]
    finally:
        state.close()


def test_runs_waive_needs_a_reason_option(state_url: str) -> None:
    run_id, _ = _quarantined_run(state_url)
    result = invoke("runs", "waive", run_id, "--all")
    assert result.exit_code != 0 and "--reason" in result.output


def _answer(error: str, message: str) -> dict:
    return {
        "outcome": {
            "run_id": "r1",
            "tenant": "acme",
            "flow": "enable",
            "state": "failed",
            "created": True,
            "executed": [],
            "message": message,
            "error": error,
        },
        "report": {"steps": [{"step": "copy", "state": "failed"}]},
    }


def test_a_run_stopped_by_a_signal_is_reported_as_resumable(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    with pytest.raises(typer.Exit) as e:
        cli._finish_run(
            _answer(
                "StopRequestedError: interrupted: stopped by signal (SIGTERM) during step copy",
                "stopped by signal (SIGTERM)",
            ),
            as_json=True,
        )
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert "stopped by signal (SIGTERM) at step copy" in err and "archive-kms runs resume r1" in err


def test_a_run_blocked_by_quarantine_prints_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    error = (
        "ObjectsQuarantinedError: 2 object(s) quarantined: ... Run `archive-kms runs waive r1 --object NAME "
        "--reason ...` (or --all) and then `archive-kms runs resume r1`, or fix the source and "
        "`archive-kms runs rerun r1 --from copy`"
    )
    with pytest.raises(typer.Exit) as e:
        cli._finish_run(_answer(error, "step verify failed"), as_json=True)
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert "stopped before cutover" in err and "runs waive r1" in err and "after fixing the cause" not in err
