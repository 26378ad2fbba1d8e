"""Every CLI command's error paths on the real services: no traceback, ever, for an
expected failure (issue 10, defect 5).

A table of commands x bad inputs, run through typer's CliRunner with stdout and stderr
apart: each must exit 2 with exactly one line on stderr, ``error: ...``, naming what to
fix (the fragment in the table), no ``Traceback`` anywhere, and no exception escaping the
command. The refusals that happen inside Prefect flows (a mistyped key that fails
preflight, enable while a failed run exists, cancel past cutover) run as real
subprocesses, since Prefect prints through its own log handlers there.

State: a SQLite file per module; storage, keys and index: LocalStack, Elasticsearch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_kms import cli

JSONL_CASES: list[tuple[str, bytes, str]] = [
    # (case id, file content, fragment the error must contain)
    ("array-line", b"[1, 2]\n", "a record must be a JSON object, not an array"),
    ("number-line", b"42\n", "a record must be a JSON object, not a number"),
    ("string-line", b'"hello"\n', "a record must be a JSON object, not a string"),
    (
        "attachments-string",
        b'{"object_type":"Case","record_id":"1","attachments":"x.pdf"}\n',
        "attachments must be an array",
    ),
    (
        "attachment-not-object",
        b'{"object_type":"Case","record_id":"1","attachments":[3]}\n',
        "attachment 1 must be a JSON object",
    ),
    (
        "binary",
        b'{"object_type":"Case","record_id":"1"}\n\xff\xfe\x00\x01garbage\n',
        ":2: not UTF-8 text (byte 0xff at column 1)",
    ),
    (
        "latin-1",
        '{"object_type":"Case","record_id":"1","fields":{"Name":"Café"}}\n'.encode("latin-1"),
        ":1: not UTF-8 text (byte 0xe9",
    ),
    ("not-json", b'{"object_type": "Case", \n', ":1: not JSON"),
    ("nan", b'{"object_type":"Case","record_id":"1","fields":{"Amount":NaN}}\n', "not JSON (NaN is not JSON)"),
    ("record-id-null", b'{"object_type":"Case","record_id":null}\n', "record_id must be a string, not null"),
    ("record-id-number", b'{"object_type":"Case","record_id":5003}\n', "record_id must be a string, not a number"),
    ("record-id-empty", b'{"object_type":"Case","record_id":""}\n', "record_id '' must be 1..255 printable characters"),
    ("record-id-slash", b'{"object_type":"Case","record_id":"a/b"}\n', "without '/'"),
    ("object-type-missing", b'{"record_id":"1"}\n', "object_type is missing"),
    ("object-type-bad", b'{"object_type":"Ca se","record_id":"1"}\n', "object_type 'Ca se' must be an API name"),
    ("unknown-key", b'{"object_type":"Case","record_id":"1","recordId":"2"}\n', "unknown key 'recordId'"),
    (
        "fields-array",
        b'{"object_type":"Case","record_id":"1","fields":[1]}\n',
        "fields must be a JSON object, not an array",
    ),
    (
        "field-nested",
        b'{"object_type":"Case","record_id":"1","fields":{"Owner":{"Name":"x"}}}\n',
        "field Owner is an object",
    ),
    (
        "field-name-bad",
        b'{"object_type":"Case","record_id":"1","fields":{"a b":1}}\n',
        "field name 'a b' must be an API name",
    ),
    (
        "workspace-null",
        b'{"object_type":"Case","record_id":"1","workspace_id":null}\n',
        "workspace_id must be a string, not null",
    ),
    (
        "workspace-bad",
        b'{"object_type":"Case","record_id":"1","workspace_id":"../x"}\n',
        "workspace_id '../x' must be 1..96",
    ),
    ("empty-file", b"\n\n", "no records"),
    (
        "conflicting-duplicate",
        b'{"object_type":"Case","record_id":"1","fields":{"S":"a"}}\n{"object_type":"Case","record_id":"2"}\n'
        b'{"object_type":"Case","record_id":"1","fields":{"S":"b"}}\n',
        ":3: record Case/1 (workspace default) is also at",
    ),
    (
        "name-too-long",
        ('{"object_type":"Case","record_id":"' + "\u20ac" * 255 + '"}\n').encode(),
        "do not fit",
    ),
    (
        "record-too-big",
        (
            '{"object_type":"Case","record_id":"1","fields":{'
            + ",".join(f'"F{i}":"{"x" * 120_000}"' for i in range(9))
            + "}}\n"
        ).encode(),
        "bytes of JSON; at most 1048576",
    ),
]

ATTACHMENT_CASES: list[tuple[str, dict, str]] = [
    ("path-parent", {"path": "../../../../etc/passwd"}, "is outside"),
    ("path-absolute", {"path": "/etc/passwd"}, "is outside"),
    ("path-missing", {"path": "nope.pdf"}, "no file at 'nope.pdf'"),
    ("path-directory", {"path": "sub"}, "is not a regular file"),
    ("path-absent", {}, "path must name the attachment's file"),
    ("size-wrong", {"path": "a.pdf", "size": 999}, "declares size 999 but a.pdf has 5 bytes"),
    ("size-string", {"path": "a.pdf", "size": "5"}, "size must be an integer number of bytes, not a string"),
]


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory) -> dict[str, str]:
    for service in ("localstack", "elasticsearch"):
        if not stack.get(service):
            pytest.fail(f"service {service!r} is not healthy: run `archive-kms stack up`", pytrace=False)
    state = tmp_path_factory.mktemp("cli-errors") / "state.db"
    return {"ARCHIVE_KMS_STATE_URL": f"sqlite:///{state}"}


@pytest.fixture(scope="module")
def tenant(env) -> str:
    t = f"cli{uuid.uuid4().hex[:8]}"
    made = CliRunner(env=env).invoke(cli.app, ["tenant", "create", t])
    assert made.exit_code == 0, made.output
    return t


def run(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None):
    return CliRunner(env={**env, **(extra_env or {})}).invoke(cli.app, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    """Exit 2, one line on stderr naming what to fix, no traceback, nothing escaped."""
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, everything)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0], lines[0]
    assert fragment in lines[0], (fragment, lines[0])


def objects_of(env: dict[str, str], tenant: str) -> list[str]:
    from archive_kms.config import Settings
    from archive_kms.operations.platform import Platform

    p = Platform.from_settings(Settings(state_url=env["ARCHIVE_KMS_STATE_URL"]))
    return [o.name.decode() for o in p.open_archive(tenant).store.list()]


@pytest.mark.parametrize(("case", "content", "fragment"), JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_archive_jsonl_bad_input(env, tenant, tmp_path, case, content, fragment):
    f = tmp_path / "records.jsonl"
    f.write_bytes(content)
    assert_one_line_error(run(env, "archive", tenant, "--jsonl", str(f)), fragment)
    assert objects_of(env, tenant) == []  # nothing written


@pytest.mark.parametrize(("case", "entry", "fragment"), ATTACHMENT_CASES, ids=[c[0] for c in ATTACHMENT_CASES])
def test_archive_attachment_bad_input(env, tenant, tmp_path, case, entry, fragment):
    (tmp_path / "a.pdf").write_bytes(b"%PDF-")
    (tmp_path / "sub").mkdir()
    att = {"attachment_id": "00P1", "file_name": "a.pdf", **entry}
    record = {"object_type": "Case", "record_id": "5001", "attachments": [att]}
    f = tmp_path / "records.jsonl"
    f.write_text(json.dumps(record) + "\n")
    assert_one_line_error(run(env, "archive", tenant, "--jsonl", str(f)), fragment)
    assert objects_of(env, tenant) == []


def test_attachment_ids_used_for_two_files_name_both_lines(env, tenant, tmp_path):
    (tmp_path / "a.pdf").write_bytes(b"one")
    (tmp_path / "b.pdf").write_bytes(b"two")
    lines = [
        {
            "object_type": "Case",
            "record_id": "1",
            "attachments": [{"attachment_id": "00P9", "file_name": "a.pdf", "path": "a.pdf"}],
        },
        {
            "object_type": "Case",
            "record_id": "2",
            "attachments": [{"attachment_id": "00P9", "file_name": "b.pdf", "path": "b.pdf"}],
        },
    ]
    f = tmp_path / "records.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run(env, "archive", tenant, "--jsonl", str(f))
    assert_one_line_error(result, f"{f}:2: attachment 00P9 is also at {f}:1")
    assert objects_of(env, tenant) == []


def test_attachments_root_confines_paths(env, tenant, tmp_path):
    """``--attachments-root`` moves the fence: a path outside the JSONL's folder is
    accepted when inside the root, and one outside the root is refused."""
    root, jobs = tmp_path / "files", tmp_path / "jobs"
    root.mkdir()
    jobs.mkdir()
    (root / "c.pdf").write_bytes(b"content")
    record = {
        "object_type": "Case",
        "record_id": "9",
        "attachments": [{"attachment_id": "00PR", "file_name": "c.pdf", "path": str(root / "c.pdf")}],
    }
    f = jobs / "records.jsonl"
    f.write_text(json.dumps(record) + "\n")
    assert_one_line_error(run(env, "archive", tenant, "--jsonl", str(f)), "is outside")
    ok = run(env, "archive", tenant, "--jsonl", str(f), "--attachments-root", str(root), "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["attachments"] == 1
    gone = run(env, "archive", tenant, "--jsonl", str(f), "--attachments-root", str(tmp_path / "nope"))
    assert_one_line_error(gone, "not a directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("archive", "{t}"), "give exactly one of --jsonl FILE or --generate N"),
        (("archive", "{t}", "--generate", "3", "--jsonl", "x.jsonl"), "give exactly one of"),
        (("archive", "{t}", "--generate", "100001"), "--generate 100001: use an integer in 1..10000"),
        (("archive", "{t}", "--generate", "-5"), "--generate -5: use an integer in 1..10000"),
        (("archive", "{t}", "--generate", "3", "--offset", "-1"), "--offset -1: use an integer in 0.."),
        (("archive", "{t}", "--generate", "3", "--job-id", ""), "--job-id must not be empty"),
        (("archive", "{t}", "--generate", "3", "--job-id", "a b"), "--job-id 'a b': use 1..255 printable"),
        (
            ("archive", "{t}", "--jsonl", "/nonexistent/records.jsonl"),
            "--jsonl /nonexistent/records.jsonl: no such file",
        ),
        (("archive", "{t}", "--jsonl", "/tmp"), "--jsonl /tmp is a directory"),
        (("archive", "{t}", "--generate", "3", "--attachments-root", "/tmp"), "--attachments-root goes with --jsonl"),
        (("archive", "nobody", "--generate", "3"), "nobody"),
        (("archive", "Bad/Id", "--generate", "3"), "invalid tenant id 'Bad/Id'"),
        (("tenant", "create", "Bad/Id"), "tenant id"),
        (("tenant", "create", "ok-name", "--cloud", "gcp"), "gcp"),
        (("tenant", "create", "ok-name", "--key-ref", "bogus://k"), "invalid key reference"),
        (("tenant", "create", "{t}"), "{t}"),
        (("search", "nobody", "x"), "nobody"),
        (("search", "{t}", "x", "--field", "NoEquals"), "--field 'NoEquals': use FIELD=VALUE"),
        (("read", "{t}"), "give exactly one of --record TYPE/ID or --attachment ID"),
        (("read", "{t}", "--record", "NoSlash"), "--record must be TYPE/RECORD_ID"),
        (("read", "{t}", "--record", "Case/nope"), "no record Case/nope"),
        (
            ("read", "{t}", "--attachment", "00Pnope", "--out", "/nonexistent/dir/f.bin"),
            "the folder /nonexistent/dir does not exist",
        ),
        (("read", "nobody", "--record", "Case/1"), "nobody"),
        (("enable", "{t}", "--mode", "nope", "--key-ref", "aws-kms://alias/x"), "--mode 'nope'"),
        (("enable", "{t}", "--mode", "byokms", "--key-ref", "aws-kms://1234"), "invalid key reference"),
        (("enable", "{t}", "--mode", "byokms", "--key-ref", "aws-kms://alias/x", "--cloud", "gcp"), "--cloud 'gcp'"),
        (("enable", "{t}", "--mode", "byokms", "--key-ref", "aws-kms://alias/x", "--shards", "0"), "--shards 0"),
        (
            ("enable", "{t}", "--mode", "byokms", "--key-ref", "aws-kms://alias/x", "--task-runner", "x"),
            "--task-runner 'x'",
        ),
        (("enable", "Bad/Id", "--mode", "byokms", "--key-ref", "aws-kms://alias/x"), "tenant id"),
        (("remove", "Bad/Id"), "tenant id"),
        (("remove", "{t}", "--shards", "999"), "--shards 999"),
        (("runs", "show", "nope"), "unknown run 'nope'"),
        (("runs", "resume", "nope"), "unknown run 'nope'"),
        (("runs", "rerun", "nope", "--from", "copy"), "unknown run 'nope'"),
        (("runs", "rerun", "nope", "--from", "bogus"), "--from 'bogus'"),
        (("runs", "cancel", "nope"), "unknown run 'nope'"),
        (("runs", "waive", "nope", "--all", "--reason", "x"), "unknown run 'nope'"),
        (("runs", "waive", "nope", "--object-hex", "zz", "--reason", "x"), "--object-hex 'zz' is not hex"),
        (("jobs", "list", "nobody"), "nobody"),
        (("jobs", "running", "nobody"), "nobody"),
        (("jobs", "park", "{t}", "nope", "--reason", "x"), "has no queued job 'nope'"),
        (("jobs", "park", "{t}", "nope", "--reason", " "), "reason"),
        (("jobs", "abandon", "{t}", "nope", "--reason", "x"), "has no archive job 'nope'"),
        (("jobs", "abandon", "{t}", "nope", "--reason", ""), "reason"),
        (
            ("db", "current", "--url", "sqlite:////nonexistent/dir/state.db"),
            "the folder /nonexistent/dir does not exist",
        ),
        (("db", "upgrade", "--to", "bogus"), "unknown schema revision 'bogus'"),
        (("db", "upgrade", "--url", "nonsense://x"), "unsupported state store database 'nonsense'"),
        (("verify", "nobody"), "unknown tenant 'nobody'"),
        (("audit", "export", "--tenant", "nobody"), "unknown tenant 'nobody'"),
        (("verify", "Bad/Id"), "tenant id"),
        (("byok", "new-key", "nobody", "--out-dir", "/tmp/never-made"), "unknown tenant 'nobody'"),
        (("byok", "new-key", "Bad/Id", "--out-dir", "/tmp/never-made"), "tenant id"),
        (
            ("byok", "new-key", "{t}", "--out-dir", "/tmp/never-made", "--cloud", "gcp"),
            "--cloud 'gcp': use s3 or azure",
        ),
        (("byok", "new-key", "{t}", "--out-dir", "/tmp/never-made", "--cloud", "azure"), "lives on s3"),
        (
            ("byok", "new-key", "{t}", "--out-dir", "/tmp/never-made", "--wrapping-key-spec", "RSA_1024"),
            "--wrapping-key-spec 'RSA_1024'",
        ),
        (
            ("byok", "import-key", "{t}", "--out-dir", "/tmp", "--file", "/nonexistent/w.bin", "--sha256", "0" * 64),
            "--file /nonexistent/w.bin: no such file",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_command_bad_input(env, tenant, args, fragment):
    argv = [a.replace("{t}", tenant) for a in args]
    assert_one_line_error(run(env, *argv), fragment.replace("{t}", tenant))


def test_audit_export_of_a_known_tenant_ends_with_its_chain_head(env, tenant):
    done = run(env, "audit", "export", "--tenant", tenant)
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines and lines[-1]["type"] == "head" and lines[-1]["count"] == len(lines) - 1 >= 1, lines[-1]


@pytest.fixture(scope="module")
def byok_import(env, tenant, tmp_path_factory) -> dict:
    """`byok new-key` for the module's (S3) tenant: the import folder and its key, pending import."""
    folder = tmp_path_factory.mktemp("byok") / "import"
    made = run(env, "byok", "new-key", tenant, "--wrapping-key-spec", "RSA_2048", "--out-dir", str(folder), "--json")
    assert made.exit_code == 0, made.output
    yield {"folder": folder, **json.loads(made.stdout)}
    from archive_kms import clients
    from archive_kms.config import Settings

    clients.kms_client(Settings()).schedule_key_deletion(
        KeyId=json.loads(made.stdout)["key_ref"].removeprefix("aws-kms://"), PendingWindowInDays=7
    )


def _wrapped_upload(byok_import: dict) -> bytes:
    from archive_kms.crypto.secrets import SecretBytes
    from archive_kms.keys.byok import customer_wrap

    return customer_wrap(byok_import["public_key_pem"], SecretBytes.random(32))


def _edited_state(byok_import: dict, tmp_path: Path, **changes) -> Path:
    """A copy of the import folder whose import-state.json has ``changes``."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(byok_import["folder"], copy)
    doc = json.loads((copy / "import-state.json").read_text())
    (copy / "import-state.json").write_text(json.dumps({**doc, **changes}))
    return copy


BYOK_IMPORT_CASES = [
    # (case id, fragment): the inputs are made in the test below
    ("digest-not-hex", "must be 64 hex digits"),
    ("digest-mismatch", "the file was corrupted or swapped in transit"),
    ("garbled-short", "the upload is 100 bytes, but an RSAES_OAEP_SHA_256 wrap"),
    ("garbled-ciphertext", "the key stays pending import"),
    ("other-tenant", "holds the import of tenant"),
    ("unknown-tenant", "holds the import of tenant"),
    ("missing-state", "holds no import-state.json: run `archive-kms byok new-key TENANT"),
    ("corrupt-state", "is not an import state written by `archive-kms byok new-key`"),
    ("state-for-another-key", "which `byok new-key` did not make for tenant"),
    (
        "state-turned-into-azure",
        "(key exchange key https://kv.example/keys/k-kek/1), which `byok new-key` did not make",
    ),
    ("state-token-null", "is not an import state written by `archive-kms byok new-key`"),
    ("expired", "expired at 2020-01-01T00:00:00+00:00; run `archive-kms byok new-key"),
]


@pytest.mark.parametrize(("case", "fragment"), BYOK_IMPORT_CASES, ids=[c[0] for c in BYOK_IMPORT_CASES])
def test_byok_import_key_bad_input(env, tenant, byok_import, tmp_path, case, fragment):
    """Every refusal of `byok import-key`: one line, exit 2, and nothing imported (the key
    stays PendingImport, the import folder unchanged and still usable)."""
    import hashlib

    from archive_kms import clients
    from archive_kms.config import Settings

    wrapped = _wrapped_upload(byok_import)
    upload, digest, folder, who = (
        tmp_path / "wrapped.bin",
        hashlib.sha256(wrapped).hexdigest(),
        byok_import["folder"],
        tenant,
    )
    upload.write_bytes(wrapped)
    if case == "digest-not-hex":
        digest = "xyz"
    elif case == "digest-mismatch":
        digest = "0" * 64
    elif case == "garbled-short":
        upload.write_bytes(os.urandom(100))
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    elif case == "garbled-ciphertext":
        upload.write_bytes(os.urandom(256))
        digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    elif case == "other-tenant":
        who = f"cli{uuid.uuid4().hex[:8]}"
        assert run(env, "tenant", "create", who).exit_code == 0
    elif case == "unknown-tenant":
        who = "nobody"
    elif case == "missing-state":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "corrupt-state":
        folder = _edited_state(byok_import, tmp_path)
        (folder / "import-state.json").write_text("{not json")
    elif case == "state-for-another-key":
        other = byok_import["key_ref"][:-4] + "0000"
        folder = _edited_state(byok_import, tmp_path, key_ref=other)
    elif case == "state-turned-into-azure":
        kek = {"kek_ref": "https://kv.example/keys/k-kek/1", "kek_kid": "https://kv.example/keys/k-kek/1"}
        folder = _edited_state(byok_import, tmp_path, cloud="azure", key_service="azure-kv", **kek)
    elif case == "state-token-null":
        folder = _edited_state(byok_import, tmp_path, import_token=None)
    elif case == "expired":
        folder = _edited_state(byok_import, tmp_path, expires_at="2020-01-01T00:00:00+00:00")
    state_before = (byok_import["folder"] / "import-state.json").read_bytes()
    result = run(env, "byok", "import-key", who, "--out-dir", str(folder), "--file", str(upload), "--sha256", digest)
    assert_one_line_error(result, fragment)
    key_id = byok_import["key_ref"].removeprefix("aws-kms://")
    kms = clients.kms_client(Settings(state_url=env["ARCHIVE_KMS_STATE_URL"]))
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"
    assert (byok_import["folder"] / "import-state.json").read_bytes() == state_before
    assert not Path("/tmp/never-made").exists()  # the new-key refusals in the table made no folder


def test_byok_new_key_refuses_a_file_as_the_import_folder(env, tenant, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert_one_line_error(run(env, "byok", "new-key", tenant, "--out-dir", str(f)), "is a file, not a folder")


def test_a_state_url_into_a_missing_folder_is_an_error(env, tmp_path):
    bad = {"ARCHIVE_KMS_STATE_URL": f"sqlite:///{tmp_path / 'typo' / 'state.db'}"}
    for argv in (["tenant", "list"], ["runs", "list"], ["jobs", "list", "acme"]):
        assert_one_line_error(run(env, *argv, extra_env=bad), "does not exist; fix ARCHIVE_KMS_STATE_URL")
    assert not (tmp_path / "typo").exists()


def test_a_malformed_azure_connection_string_is_an_error(env):
    bad = {"ARCHIVE_KMS_AZURE_BLOB_CONNECTION_STRING": "AccountName=;;;garbage"}
    result = run(env, "tenant", "list", extra_env=bad)
    assert_one_line_error(result, "ARCHIVE_KMS_AZURE_BLOB_CONNECTION_STRING) is malformed")
    assert "garbage" not in result.stderr  # never echoed: it may hold the account key


def test_typer_usage_errors_are_one_line_too(env, tenant):
    for argv, fragment in (
        (["archive", tenant, "--generate", "abc"], "Invalid value for '--generate'"),
        (["runs", "waive", "r1"], "--reason"),
        (["nonsense-command"], "No such command 'nonsense-command'"),
    ):
        assert_one_line_error(run(env, *argv), fragment)


# --- refusals raised inside Prefect flows: real processes ----------------------------------------


def cli_process(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "archive-kms"), *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
    )


def assert_process_error(proc: subprocess.CompletedProcess, fragment: str, code: int = 2) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]


def test_a_mistyped_key_is_refused_at_preflight_and_leaves_no_run(env, localstack, prefect_api):
    """A key reference that parses but names no key: one line, exit 2, no run left over
    (the run is cancelled by itself, ADR 0021), and the corrected key works at once."""
    from archive_kms import clients

    t = f"cli{uuid.uuid4().hex[:8]}"
    assert cli_process(env, "tenant", "create", t).returncode == 0
    assert cli_process(env, "archive", t, "--generate", "4", "--seed", "2").returncode == 0
    kms = clients.aws_client("kms", localstack)
    good = f"aws-kms://{kms.create_key()['KeyMetadata']['Arn']}"
    typo = good[:-12] + uuid.uuid4().hex[:12]

    refused = cli_process(env, "enable", t, "--mode", "byokms", "--key-ref", typo, "--wait")
    assert_process_error(refused, "refused at preflight")
    assert "KeyNotFoundError" in refused.stderr and "no run is left over" in refused.stderr
    runs = json.loads(cli_process(env, "runs", "list", "--tenant", t, "--json").stdout)
    assert [r["state"] for r in runs] == ["cancelled"]

    enabled = cli_process(env, "enable", t, "--mode", "byokms", "--key-ref", good, "--wait", "--json")
    assert enabled.returncode == 0, enabled.stderr[-2000:]
    assert json.loads(enabled.stdout)["outcome"]["state"] == "completed"
