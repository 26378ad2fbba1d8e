"""archive-kms: the operator and support-engineer command line.

Every command has human output by default and ``--json`` for scripts.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import typer
from typer.core import TyperGroup

from archive_kms import __version__
from archive_kms.config import PROJECT_ROOT

if TYPE_CHECKING:
    from archive_kms.operations.platform import Platform
    from archive_kms.state.port import MigrationRun, RunRepo, StateStore


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown option, a missing argument, a value of the wrong type) are one
    line naming what to fix, exit code 2, like every other error of this command line
    (README), instead of typer's boxed usage block. A command line with no command still
    shows the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[no-untyped-def, override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except typer.TyperException as e:
            if not hasattr(e, "format_message"):
                raise
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # a group named without a command: its help
                if e.format_message().strip():  # (with rich, typer has printed it already)
                    typer.echo(e.format_message(), err=True)
                sys.exit(getattr(e, "exit_code", 2))
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors, no_args_is_help=True, help="archive_kms: tenant archives under the tenant's own key."
)
stack_app = typer.Typer(
    no_args_is_help=True,
    help="The local cloud: LocalStack, Azurite, Elasticsearch, Key Vault, KMIP, PostgreSQL, the Prefect server and worker.",
)
app.add_typer(stack_app, name="stack")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _stack(action: str, only: str | None, as_json: bool) -> None:
    script = PROJECT_ROOT / "localstack" / "stack.py"
    if not script.is_file():
        raise typer.BadParameter(f"{script} not found: run from a source checkout of archive_kms")
    cmd = [sys.executable, str(script), action] + (["--only", only] if only else []) + (["--json"] if as_json else [])
    raise typer.Exit(subprocess.call(cmd))


ONLY = typer.Option(
    None,
    "--only",
    help="Comma-separated subset: localstack,azurite,elasticsearch,keyvault,kmip,postgres,prefect,worker",
)
JSON = typer.Option(False, "--json", help="Machine-readable output")


@stack_app.command("up")
def stack_up(only: str | None = ONLY, as_json: bool = JSON) -> None:
    """Install (cached) and start the services; reuse the ones already healthy."""
    _stack("up", only, as_json)


@stack_app.command("status")
def stack_status(only: str | None = ONLY, as_json: bool = JSON) -> None:
    """Show each service's health, pid, memory and version; exit 1 if any is down."""
    _stack("status", only, as_json)


@stack_app.command("down")
def stack_down(only: str | None = ONLY, as_json: bool = JSON) -> None:
    """Stop the services this checkout started."""
    _stack("down", only, as_json)


# --- tenants, archive jobs, search, reads, audit (the library's operations) ----------------

import json as _json  # noqa: E402
import re as _re  # noqa: E402
from functools import wraps  # noqa: E402
from pathlib import Path  # noqa: E402

from pydantic import ValidationError as PydanticValidationError  # noqa: E402
from pydantic_settings import SettingsError  # noqa: E402

from archive_kms.config import endpoints_file  # noqa: E402
from archive_kms.errors import ArchiveKmsError, ObjectNotFoundError  # noqa: E402

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: create and list.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log: verify and export.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(audit_app, name="audit")


def _platform() -> Platform:
    from archive_kms.config import Settings
    from archive_kms.operations.platform import Platform

    return Platform.from_settings(Settings())  # read now: environment and endpoints file of this invocation


def _emit(as_json: bool, data, human: str) -> None:
    typer.echo(_json.dumps(data, indent=2, default=str) if as_json else human)


def _errors_are_messages(fn):
    """Our errors become one clear line and exit code 2; never a traceback with internals.

    Anything else that escapes is a bug: one line too (exit code 3), naming its type, and
    the traceback only with ``ARCHIVE_KMS_DEBUG=1``. (Tests hold every expected failure to
    exit code 2 and a message that says what to fix: this net is not how they pass.)"""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ArchiveKmsError as e:
            typer.echo(f"error: {_one_line(str(e))}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            bad_setting = _settings_error(e) if isinstance(e, (PydanticValidationError, SettingsError)) else None
            if bad_setting:
                typer.echo(f"error: {bad_setting}", err=True)
                raise typer.Exit(2) from None
            if type(e).__module__.startswith(("click", "typer")) or _os.environ.get("ARCHIVE_KMS_DEBUG") == "1":
                raise  # usage errors: typer prints them (exit 2)
            typer.echo(
                f"error: internal error {type(e).__name__}: {_one_line(str(e))[:300]} (a bug; rerun with "
                "ARCHIVE_KMS_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            raise typer.Exit(3) from None

    return wrapper


def _settings_error(e: PydanticValidationError | SettingsError) -> str | None:
    """A setting out of its range or not parsable: the variable and what it should be, never
    its value (some settings are secrets). None if ``e`` is not about the settings."""
    if isinstance(e, SettingsError):
        field = _re.search(r'for field "(\w+)"', str(e))
        if field is None:
            return None
        parts = [f"ARCHIVE_KMS_{field.group(1).upper()}: not parsable (a list or object is JSON)"]
    elif e.title == "Settings":
        parts = [
            f"ARCHIVE_KMS_{str(err['loc'][0]).upper() if err['loc'] else '?'}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False, include_context=False)
        ]
    else:
        return None
    return f"invalid setting {'; '.join(parts)} (from the environment or {endpoints_file()})"


def _tenant_arg(tenant: str) -> str:
    """The TENANT argument, checked against the tenant id rule before anything is opened."""
    from archive_kms.domain.tenants import TenantId

    return TenantId(tenant).value


def _one_line(text: str) -> str:
    return " ".join(text.split())


@tenant_app.command("create")
@_errors_are_messages
def tenant_create(
    tenant: str,
    cloud: str = typer.Option("s3", help="s3 or azure"),
    key_ref: str | None = typer.Option(None, help="L1 key reference (default: managed://platform)"),
    as_json: bool = JSON,
) -> None:
    """Create a tenant on shared storage with its keychain and search index."""
    from archive_kms.operations.tenants import create_tenant

    made = create_tenant(_platform(), tenant, cloud=cloud, key_ref=key_ref)
    _emit(
        as_json,
        made.__dict__,
        f"tenant {made.tenant_id} created: {made.location}, key {made.key_ref}, index {made.index}",
    )


@tenant_app.command("list")
@_errors_are_messages
def tenant_list(as_json: bool = JSON) -> None:
    """List tenants with their location, key mode and gate."""
    p = _platform()
    rows = []
    for t in p.state.list_tenants():
        rows.append(
            {
                "tenant": t.tenant_id,
                "key_mode": t.key_mode.value,
                "key_ref": t.key_ref,
                "location": p.location_of(t.tenant_id).uri,
                "gate": p.state.gate(t.tenant_id).state.value,
                "revoked": t.revoked,
            }
        )
    _emit(
        as_json,
        rows,
        "\n".join(f"{r['tenant']:<20} {r['key_mode']:<8} {r['gate']:<9} {r['location']}" for r in rows) or "no tenants",
    )


@app.command("archive")
@_errors_are_messages
def archive_cmd(
    tenant: str,
    jsonl: Path | None = typer.Option(
        None, help="Records, one JSON object per line (format: docs/archive-jobs.md, 'Job input')"
    ),
    attachments_root: Path | None = typer.Option(
        None,
        "--attachments-root",
        help="Folder the attachment paths of --jsonl must stay in (default: the JSONL file's folder)",
    ),
    generate: int = typer.Option(0, help="Generate this many synthetic records instead (1..10000 per job)"),
    seed: int = typer.Option(
        0,
        help="Generator seed (the data also depends on the tenant id, "
        "so the same seed gives different records per tenant)",
    ),
    offset: int = typer.Option(0, help="Skip this many generated records (for later batches)"),
    job_id: str | None = typer.Option(None, help="Idempotency id (default: a new one)"),
    as_json: bool = JSON,
) -> None:
    """Run an archive job for TENANT (deferred while the tenant is paused); all checked before any write.

    A job that fails part-way is rolled back; the same --job-id again archives it once."""
    from archive_kms.operations.archive import SUPERSEDED, job_from_options, submit_job

    _tenant_arg(tenant)
    spec = job_from_options(
        tenant,
        job_id=job_id,
        jsonl=jsonl,
        attachments_root=attachments_root,
        generate=generate,
        seed=seed,
        offset=offset,
    )
    p = _platform()
    out = submit_job(p.state, spec, p.open_archive)
    _emit(
        as_json,
        out.__dict__,
        f"job {out.job_id}: {out.decision}; {out.records} records, {out.attachments} "
        f"attachments, {out.objects_written} objects written, "
        f"{out.objects_already_there} already there, {out.indexed} indexed",
    )
    if out.decision == SUPERSEDED:
        typer.echo(
            f"error: job {out.job_id} lost its lease and stopped writing ({out.message}); what it wrote is rolled "
            f"back by whoever fenced it; send the job again (same --job-id) to archive it",
            err=True,
        )
        raise typer.Exit(1)


@app.command("search")
@_errors_are_messages
def search_cmd(
    tenant: str,
    words: list[str] = typer.Argument(None),
    field: list[str] = typer.Option(
        None,
        "--field",
        help="FIELD=VALUE filter on the whole value (case-insensitive, Unicode NFKC, spaces collapsed; repeatable)",
    ),
    object_type: str | None = typer.Option(None, "--type"),
    limit: int = 20,
    as_json: bool = JSON,
) -> None:
    """Search TENANT's archive by words and field filters; results are decrypted."""
    from archive_kms.search import Query

    _tenant_arg(tenant)
    filters = {}
    for f in field or ():
        k, sep, v = f.partition("=")
        if not sep:
            raise ValidationError(f"--field {f!r}: use FIELD=VALUE")
        filters[k] = v
    result = (
        _platform()
        .open_archive(tenant)
        .search(Query(text=" ".join(words or ()), filters=filters, object_type=object_type, limit=limit))
    )
    rows: list[dict[str, _Any]] = [
        {"object_type": h.object_type, "record_id": h.record_id, "workspace": h.workspace_id, "fields": dict(h.fields)}
        for h in result
    ]
    human = "\n".join(f"{r['object_type']:<14} {r['record_id']}  {_title(r['fields'])}" for r in rows)
    _emit(
        as_json,
        {"total": result.total, "hits": rows, "failures": [f.__dict__ for f in result.failures]},
        f"{human}\n{result.total} match(es)" if rows else "no matches",
    )


def _title(fields: dict) -> str:
    """What a person recognises a record by: its Name, else Subject/Title, else the first text field."""
    for key in ("Name", "Subject", "Title", "LastName", "CaseNumber"):
        if fields.get(key):
            return str(fields[key])
    return next((str(v) for v in fields.values() if isinstance(v, str) and v), "")


@app.command("read")
@_errors_are_messages
def read_cmd(
    tenant: str,
    record: str | None = typer.Option(None, help="TYPE/RECORD_ID"),
    attachment: str | None = typer.Option(None, help="ATTACHMENT_ID"),
    workspace: str = "default",
    out: Path | None = typer.Option(None, help="Write attachment here"),
    as_json: bool = JSON,
) -> None:
    """Read one record or attachment, decrypted and authenticated."""
    _tenant_arg(tenant)
    if out is not None and not out.parent.is_dir():
        raise ValidationError(f"--out {out}: the folder {out.parent} does not exist")
    if out is not None and out.is_dir():
        raise ValidationError(f"--out {out} is a directory; give a file name")
    archive = _platform().open_archive(tenant)
    if (record is None) == (attachment is None):
        raise ValidationError("give exactly one of --record TYPE/ID or --attachment ID")
    if record:
        otype, sep, rid = record.partition("/")
        if not sep:
            raise ValidationError("--record must be TYPE/RECORD_ID")
        try:
            rec = archive.read_record(workspace, otype, rid)
        except ObjectNotFoundError:
            raise StateError(
                f"no record {otype}/{rid} in workspace {workspace!r} of tenant {tenant}"
                " (the workspace is --workspace; `archive-kms search` finds ids)"
            ) from None
        _emit(as_json, _json.loads(rec.to_json()), _json.dumps(_json.loads(rec.to_json()), indent=2))
        return
    import hashlib
    import tempfile

    assert attachment is not None  # exactly one of record and attachment was given
    h, n = hashlib.sha256(), 0
    # Plaintext goes to a temporary file beside OUT, renamed only once the whole object
    # authenticated: a truncated or tampered object leaves no partial plaintext behind.
    tmp = tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) if out else None  # noqa: SIM115
    try:
        for chunk in archive.read_attachment(workspace, attachment):
            h.update(chunk)
            n += len(chunk)
            if tmp:
                tmp.write(chunk)
        if tmp and out:
            tmp.close()
            _os.replace(tmp.name, out)
    except BaseException:
        if tmp:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
        raise
    _emit(
        as_json,
        {"attachment": attachment, "bytes": n, "sha256": h.hexdigest(), "out": str(out) if out else None},
        f"attachment {attachment}: {n} bytes, sha256 {h.hexdigest()}" + (f" -> {out}" if out else ""),
    )


@audit_app.command("verify")
@_errors_are_messages
def audit_verify(tenant: str | None = None, as_json: bool = JSON) -> None:
    """Verify the audit log's hash chain and, when anchors are published, that the log
    still holds the latest anchor (no rollback); exit 1 if anything was edited, deleted,
    reordered or rolled back."""
    from archive_kms.operations.anchoring import verify

    p = _platform()
    v, anchor = verify(p, tenant_id=tenant)
    out = {
        **v.__dict__,
        "anchor": None if anchor is None else {"count": anchor.count, "anchored_at": anchor.anchored_at.isoformat()},
    }
    where = (
        ""
        if p.anchors is None
        else f"; against the anchor of record {anchor.count} ({anchor.anchored_at:%Y-%m-%d %H:%M} UTC)"
        if anchor is not None
        else "; NO ANCHOR published for this log"
    )
    _emit(
        as_json, out, f"audit log verifies{where}" if v.ok else f"AUDIT LOG BROKEN at seq {v.first_bad_seq}: {v.reason}"
    )
    if not v.ok:
        raise typer.Exit(1)


@audit_app.command("anchor")
@_errors_are_messages
def audit_anchor(as_json: bool = JSON) -> None:
    """Verify the whole log, check it continues the latest anchor, then publish its head
    (signed, chained to that anchor) to the anchor bucket (S3 Object Lock, compliance
    mode), where nobody can delete it before its retention ends. A log that does not
    continue the latest anchor (a restored or replaced database) is refused with an alarm
    (exit 2). The `audit-anchor` deployment does this on a schedule."""
    from archive_kms.operations.anchoring import publish

    p = _platform()
    anchor, where = publish(p)
    _emit(
        as_json,
        {"count": anchor.count, "head_hash": anchor.head_hash, "where": where},
        f"audit head anchored: record {anchor.count} -> {where}",
    )


@audit_app.command("export")
@_errors_are_messages
def audit_export(tenant: str | None = None) -> None:
    """Export the audit log as JSONL (verifiable by the customer). A removed tenant's
    records stay exportable; a tenant the log never named is an error, not an empty file."""
    state = _platform().state
    named = tenant is None or state.get_tenant(tenant) is not None
    if not named and next(iter(state.iter_audit(tenant_id=tenant, page_size=1)), None) is None:
        raise ObjectNotFoundError(
            f"unknown tenant {tenant!r}: not registered, and no audit record names it (see `archive-kms tenant list`)"
        )
    for rec in state.export_audit(tenant):
        typer.echo(_json.dumps(rec, default=str, sort_keys=True))


# --- migrations: enable, remove, runs, verify (issue #6) ---------------------------------------
#
# enable / remove / runs resume / runs rerun run a Prefect flow (archive_kms.flows.migration)
# in this process, reporting to the stack's Prefect server; runs list / show and verify
# read the state store and the storage directly and need no Prefect.

import os as _os  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402
from typing import Any as _Any  # noqa: E402

from archive_kms.errors import ConfigurationError, StateError, ValidationError  # noqa: E402

runs_app = typer.Typer(
    no_args_is_help=True, help="Migration runs: list, show, resume, rerun a step, waive quarantined objects, cancel."
)
app.add_typer(runs_app, name="runs")

TASK_RUNNER = typer.Option(
    "threads",
    "--task-runner",
    help="Where copy/verify shard tasks run: threads (Prefect's thread pool) or dask "
    "(prefect-dask: settings.dask_address, else 2 local worker processes)",
)
SHARDS = typer.Option(None, "--shards", help="Copy/verify shards (1..256, default 8)")
TAKEOVER = typer.Option(False, "--takeover", help="Take the tenant's lease from a worker known to be dead")
WAIT = typer.Option(
    False,
    "--wait",
    help="Run the flow in this process and block until it ends (exit 1 if it failed), instead of submitting "
    "it to the deployment for a worker",
)


def _launcher():
    from archive_kms.config import Settings
    from archive_kms.flows.launcher import PrefectLauncher

    _prefect_api()
    return PrefectLauncher.from_settings(Settings())


def _submitted(started: _Any, as_json: bool) -> None:
    """Print what a submission did: the run id and how to follow it."""
    if as_json:
        typer.echo(_json.dumps(started.to_dict(), indent=2))
        return
    if not started.created:
        typer.echo(f"run {started.run_id} ({started.flow}, tenant {started.tenant_id}): {started.message}")
    else:
        typer.echo(
            f"run {started.run_id} submitted: {started.action} of tenant {started.tenant_id} on deployment "
            f"{started.deployment} (flow run {started.flow_run_id})"
        )
    typer.echo(f"follow it: archive-kms runs show {started.run_id} --follow")


@_dataclass(frozen=True)
class _StateOnly:
    """What the run report and a waiver read (``platform.state``) without the clouds, keys
    or index (``migration.report.HasRunLedger``, ``migration.engine.HasRunStore``)."""

    state: StateStore


def _state_only() -> _StateOnly:
    from archive_kms.config import Settings
    from archive_kms.state.sql import open_state

    return _StateOnly(open_state(Settings().state_url))


def _require_run(state: RunRepo, run_id: str) -> MigrationRun:
    run = state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    return run


def _check_task_runner(name: str) -> None:
    if name not in ("threads", "dask"):
        raise ValidationError(f"--task-runner {name!r}: use threads or dask")


def _check_shards(shards: int | None) -> None:
    if shards is not None and not 1 <= shards <= 256:
        raise ValidationError(f"--shards {shards}: use an integer in 1..256")


def _prefect_api() -> str:
    """Point Prefect at the stack's server before it is imported, so a flow never starts a
    temporary server of its own; refuse clearly when there is none."""
    import requests

    from archive_kms.config import Settings

    url = Settings().prefect_api_url
    if not url:
        raise ConfigurationError(
            "prefect_api_url is not set: run `archive-kms stack up` (it starts the Prefect "
            "server and writes .stack/endpoints.json) or export ARCHIVE_KMS_PREFECT_API_URL"
        )
    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        raise ConfigurationError(
            f"the Prefect API at {url} does not answer ({type(e).__name__}): run `archive-kms stack up`"
        ) from None
    _os.environ["PREFECT_API_URL"] = url
    _os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    return url


def _run_flow(name: str, **params: _Any) -> dict[str, _Any]:
    url = _prefect_api()
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from archive_kms.flows.migration import run_flow

    # the environment covers Prefect imported from here on (and Dask workers); the settings
    # context covers a process that imported Prefect earlier
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
        return run_flow(name, **params)


def _fmt(value: _Any) -> str:
    return "-" if value is None else str(value)


def _report_tables(report: dict[str, _Any]):
    """Progress bars (steps, objects copied, verified), the totals and the steps, for rich."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    p = report["progress"]
    bars = Table.grid(padding=(0, 1))
    for label, done, total in (
        ("steps", p["steps_done"], p["steps"]),
        ("copied", p["copied"], p["objects"]),
        ("verified", p["verified"], p["objects"]),
    ):
        bars.add_row(
            label, ProgressBar(total=max(total, 1), completed=done if total else 0, width=40), f"{done}/{total}"
        )
    totals = Table(title=f"{report['flow']} {report['tenant']}: run {report['run_id']}", show_header=False)
    for key in (
        "state",
        "mode",
        "key_ref",
        "source",
        "destination",
        "objects",
        "bytes",
        "bytes_plaintext_copied",
        "copy_seconds",
        "throughput_mb_s",
        "verification",
        "lost",
        "duplicated",
        "reconciliation",
        "quarantined",
        "waived",
        "index",
        "index_documents",
        "deferred_replayed",
        "keys_rekeyed",
        "old_deks_erased",
        "total_seconds",
    ):
        totals.add_row(key, _fmt(report.get(key)))
    steps = Table("step", "state", "attempts", "seconds", "error", title="steps")
    for s in report["steps"]:
        steps.add_row(s["step"], s["state"], str(s["attempts"]), _fmt(s["seconds"]), s["error"] or "")
    return Group(bars, totals, steps)


def _quarantine_lines(report: dict[str, _Any]) -> list[str]:
    """Quarantined objects one per line, unwrapped, so a name can be copied into
    `runs waive --object`."""
    if not report.get("quarantined"):
        return []
    shown = len(report["quarantine"])
    lines = [
        f"quarantined: {report['quarantined']} ({report['waived']} waived); their source objects are kept at "
        f"{report['quarantine_kept_at']}" + (f"; the first {shown}:" if shown < report["quarantined"] else ":")
    ]
    for q in report["quarantine"]:
        waiver = (
            f"waived by {q['waived_by']} at {q['waived_at']}: {q['waiver_reason']}" if q["waived"] else "not waived"
        )
        lines.append(f"  {q['object']}  [{q['kind']}, {q['attempts']} reads; {waiver}] {q['reason']}")
    return lines


def _print_report(report: dict[str, _Any]) -> None:
    from rich.console import Console

    Console(soft_wrap=False).print(_report_tables(report))
    for line in _quarantine_lines(report):
        typer.echo(line)


def _finish_run(answer: dict[str, _Any], as_json: bool) -> None:
    """Print a flow's answer; exit 1 when the run ended failed, naming the step and error."""
    outcome, report = answer["outcome"], answer["report"]
    if as_json:
        typer.echo(_json.dumps(answer, indent=2, default=str))
    elif not outcome["created"] and outcome["state"] == "running":
        typer.echo(
            f"tenant {outcome['tenant']} already has {outcome['flow']} run {outcome['run_id']} going: "
            f"see `archive-kms runs show {outcome['run_id']}`"
        )
    else:
        _print_report(report)
        typer.echo(f"run {outcome['run_id']}: {outcome['state']} ({outcome['message']})")
    if outcome["state"] == "refused":
        typer.echo(
            f"error: {outcome['flow']} of tenant {outcome['tenant']} refused at preflight: {outcome['error']}; "
            f"nothing was changed and no run is left over (run {outcome['run_id']} is cancelled): fix the cause "
            f"and run `archive-kms {outcome['flow']}` again",
            err=True,
        )
        raise typer.Exit(2)
    if outcome["state"] == "failed":
        failed = next((s for s in report["steps"] if s["state"] == "failed"), None)
        step = failed["step"] if failed else "?"
        if (outcome["error"] or "").startswith("StopRequestedError"):
            typer.echo(
                f"error: run {outcome['run_id']} {outcome['message']} at step {step}; it is resumable at "
                f"once: `archive-kms runs resume {outcome['run_id']}`",
                err=True,
            )
        elif "runs waive" in (outcome["error"] or ""):  # quarantined objects: the message says what to do
            typer.echo(
                f"error: run {outcome['run_id']} stopped before cutover at step {step}: {outcome['error']}", err=True
            )
        else:
            typer.echo(
                f"error: run {outcome['run_id']} failed at step {step}: {outcome['error']}; after fixing the "
                f"cause: `archive-kms runs resume {outcome['run_id']}`",
                err=True,
            )
        raise typer.Exit(1)
    if outcome["state"] == "superseded":
        typer.echo(
            f"error: this worker lost run {outcome['run_id']} to another one (its lease was taken over) and "
            f"stopped without writing; see `archive-kms runs show {outcome['run_id']}`",
            err=True,
        )
        raise typer.Exit(1)


@app.command("enable")
@_errors_are_messages
def enable_cmd(
    tenant: str,
    mode: str = typer.Option(..., "--mode", help="byokms | byok | byokv | kmip"),
    key_ref: str = typer.Option(..., "--key-ref", help="The customer's key: aws-kms://, azure-kv://, kmip://"),
    cloud: str | None = typer.Option(None, "--cloud", help="s3 or azure (default: where the tenant lives)"),
    shards: int | None = SHARDS,
    task_runner: str = TASK_RUNNER,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Move TENANT onto its own key: new dedicated storage and index, every object re-encrypted and verified.

    Submits the run to the enable deployment and prints its id (follow it with `runs show RUN --follow`);
    --wait runs it here instead."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.keys.refs import parse_key_ref
    from archive_kms.migration import EnableMode, plan_enable

    TenantId(tenant)
    if mode not in {m.value for m in EnableMode}:
        raise ValidationError(f"--mode {mode!r}: use one of {', '.join(m.value for m in EnableMode)}")
    parse_key_ref(key_ref)
    if cloud is not None and cloud not in ("s3", "azure"):
        raise ValidationError(f"--cloud {cloud!r}: use s3 or azure")
    _check_shards(shards)
    _check_task_runner(task_runner)
    _prefect_api()
    if not wait:
        from archive_kms.migration.launch import start_enable

        started = start_enable(
            _platform(),
            _launcher(),
            tenant,
            mode,
            key_ref,
            actor=_operator(),
            cloud=cloud,
            shards=shards,
            task_runner=task_runner,
        )
        _submitted(started, as_json)
        return
    plan_enable(_platform(), tenant, mode, key_ref, cloud=cloud, shards=shards)  # refusals before a flow run
    _finish_run(
        _run_flow(
            "enable", tenant=tenant, mode=mode, key_ref=key_ref, cloud=cloud, shards=shards, task_runner=task_runner
        ),
        as_json,
    )


@app.command("remove")
@_errors_are_messages
def remove_cmd(
    tenant: str,
    shards: int | None = SHARDS,
    task_runner: str = TASK_RUNNER,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only show what removal would touch (objects, bytes, index, jobs, runs)"
    ),
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Move TENANT back to shared storage under the managed key; its dedicated storage and index are deleted.

    Submits the run to the remove deployment (the console asks a second approver first; the CLI
    is the operator's tool and is audited); --dry-run only previews; --wait runs it here."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.migration import plan_remove

    TenantId(tenant)
    _check_shards(shards)
    _check_task_runner(task_runner)
    if dry_run:
        from archive_kms.operations.blast_radius import blast_radius

        preview = blast_radius(_platform(), tenant, "remove")
        _emit(as_json, preview.to_dict(), _blast_radius_text(preview))
        return
    _prefect_api()
    if not wait:
        from archive_kms.migration.launch import start_remove

        started = start_remove(
            _platform(), _launcher(), tenant, actor=_operator(), shards=shards, task_runner=task_runner
        )
        _submitted(started, as_json)
        return
    plan_remove(_platform(), tenant, shards=shards)  # refusals before a flow run
    _finish_run(_run_flow("remove", tenant=tenant, shards=shards, task_runner=task_runner), as_json)


def _blast_radius_text(b: _Any) -> str:
    docs = "?" if b.index_documents is None else b.index_documents
    lines = [
        f"{b.action} {b.tenant} (dry run: nothing changed)",
        f"  storage:  {b.objects} objects, {b.bytes} bytes at {b.location}",
        f"  index:    {b.index or '-'} with {docs} documents",
        f"  jobs:     {b.queued_jobs} queued, {b.running_jobs} running",
        f"  runs:     {', '.join(b.running_runs) or 'none running'}",
        f"  key:      {b.key_mode} {b.key_ref or ''}".rstrip(),
        "  it would:",
    ]
    lines += [f"    {i}. {w}" for i, w in enumerate(b.would, 1)]
    return "\n".join(lines)


@runs_app.command("list")
@_errors_are_messages
def runs_list(tenant: str | None = typer.Option(None, "--tenant"), as_json: bool = JSON) -> None:
    """List migration runs, newest first."""
    from archive_kms.migration import progress

    view = _state_only()
    rows = []
    for run in view.state.list_runs(tenant):
        p = progress(view, run)
        current = next((s.name for s in run.steps if s.state.value not in ("completed", "skipped")), None)
        rows.append(
            {
                "run_id": run.run_id,
                "tenant": run.tenant_id,
                "flow": run.flow.value,
                "mode": run.mode,
                "state": run.state.value,
                "created_at": run.created_at.isoformat(timespec="seconds"),
                "steps_done": p["steps_done"],
                "steps": p["steps"],
                "current_step": current,
            }
        )
    _emit(
        as_json,
        rows,
        "\n".join(
            f"{r['run_id']}  {r['tenant']:<20} {r['flow']:<7} {r['mode']:<7} {r['state']:<9} "
            f"{r['steps_done']:>2}/{r['steps']} {r['current_step'] or ''}  {r['created_at']}"
            for r in rows
        )
        or "no runs",
    )


@runs_app.command("show")
@_errors_are_messages
def runs_show(
    run_id: str = typer.Argument(..., metavar="RUN"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Show live progress until the run ends; exit 0 if it completed, else 1"
    ),
    interval: float = typer.Option(1.0, "--interval", min=0.2, max=60, help="Seconds between looks (--follow)"),
    as_json: bool = JSON,
) -> None:
    """Show a run: progress bars, the report and every step (state, attempts, seconds, error)."""
    from archive_kms.migration import build_report

    view = _state_only()
    _require_run(view.state, run_id)
    if follow:
        _follow(view, run_id, interval, as_json)
        return
    report = build_report(view, run_id)
    if as_json:
        typer.echo(_json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)


def _follow(view: _Any, run_id: str, interval: float, as_json: bool) -> None:
    """Live progress of a run (a rich progress bar per steps / copied / verified) until it
    settles; exit code from its outcome."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from archive_kms.migration.launch import follow

    launcher = None
    try:
        launcher = _launcher()
    except ConfigurationError as e:
        typer.echo(f"note: following from the state store only ({e})", err=True)
    last = None
    if as_json:
        for snap in follow(view, run_id, launcher, interval=interval):
            last = snap
            typer.echo(_json.dumps(_snapshot_dict(snap), default=str))
    else:
        columns = (
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
        )
        with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=False), transient=False) as bars:
            steps = bars.add_task("steps", total=None, note="")
            copied = bars.add_task("copied", total=None, note="")
            verified = bars.add_task("verified", total=None, note="")
            for snap in follow(view, run_id, launcher, interval=interval):
                last = snap
                p = snap.progress
                note = f"{snap.state}: {snap.current_step or '-'}" + (f" ({snap.message})" if snap.message else "")
                bars.update(steps, total=p["steps"], completed=p["steps_done"], note=note)
                bars.update(copied, total=max(p["objects"], 1), completed=p["copied"], note="")
                bars.update(verified, total=max(p["objects"], 1), completed=p["verified"], note="")
    assert last is not None
    outcome = last.outcome or last.state
    if not as_json:
        typer.echo(f"run {run_id}: {outcome}" + (f" ({last.message})" if last.message else ""))
    if outcome != "completed":
        if not as_json and outcome in ("failed", "crashed"):
            typer.echo(
                f"error: run {run_id} {outcome}; after fixing the cause: archive-kms runs resume {run_id}", err=True
            )
        raise typer.Exit(1)


def _snapshot_dict(snap: _Any) -> dict[str, _Any]:
    return {
        "run_id": snap.run_id,
        "tenant": snap.tenant_id,
        "flow": snap.flow,
        "state": snap.state,
        "progress": dict(snap.progress),
        "current_step": snap.current_step,
        "flow_run": None if snap.launch is None else snap.launch.__dict__,
        "done": snap.done,
        "outcome": snap.outcome,
        "message": snap.message,
    }


def _submit_support(
    run_id: str, action: str, *, takeover: bool, task_runner: str, as_json: bool, from_step: str | None = None
) -> None:
    from archive_kms.migration.launch import start_support

    _prefect_api()
    started = start_support(
        _platform(),
        _launcher(),
        run_id,
        action,
        actor=_actor(None),
        from_step=from_step,
        takeover=takeover,
        task_runner=task_runner,
    )
    _submitted(started, as_json)


@runs_app.command("resume")
@_errors_are_messages
def runs_resume(
    run_id: str = typer.Argument(..., metavar="RUN"),
    takeover: bool = TAKEOVER,
    task_runner: str = TASK_RUNNER,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Continue a failed or crashed run from its first step not completed (submitted to the
    support deployment; --wait runs it here)."""
    _check_task_runner(task_runner)
    _require_run(_state_only().state, run_id)
    if not wait:
        _submit_support(run_id, "resume", takeover=takeover, task_runner=task_runner, as_json=as_json)
        return
    _finish_run(
        _run_flow("support", run_id=run_id, action="resume", takeover=takeover, task_runner=task_runner), as_json
    )


@runs_app.command("rerun")
@_errors_are_messages
def runs_rerun(
    run_id: str = typer.Argument(..., metavar="RUN"),
    from_step: str = typer.Option(..., "--from", help="The step to run again (and every later one)"),
    takeover: bool = TAKEOVER,
    task_runner: str = TASK_RUNNER,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Run a run again from a named step; on a completed run this changes nothing and says so
    (submitted to the support deployment; --wait runs it here)."""
    from archive_kms.migration.flowdef import ALL_STEPS, definition

    if from_step not in ALL_STEPS:
        raise ValidationError(f"--from {from_step!r}: use one of {', '.join(ALL_STEPS)}")
    _check_task_runner(task_runner)
    steps = definition(_require_run(_state_only().state, run_id).flow).steps
    if from_step not in steps:
        raise ValidationError(f"--from {from_step!r}: a run of this flow has the steps {', '.join(steps)}")
    if not wait:
        _submit_support(
            run_id, "rerun", takeover=takeover, task_runner=task_runner, as_json=as_json, from_step=from_step
        )
        return
    _finish_run(
        _run_flow(
            "support", run_id=run_id, action="rerun", from_step=from_step, takeover=takeover, task_runner=task_runner
        ),
        as_json,
    )


def _operator() -> str:
    """Who starts a run from this command line, as the audit log names them."""
    return "operator:" + _actor(None).partition(":")[2] if ":" in _actor(None) else "operator"


def _actor(given: str | None) -> str:
    if given and given.strip():
        return given.strip()
    import getpass

    try:
        return f"support:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "support"


@runs_app.command("waive")
@_errors_are_messages
def runs_waive(
    run_id: str = typer.Argument(..., metavar="RUN"),
    objects: list[str] = typer.Option(
        None, "--object", help="A quarantined object's name, as `runs show` prints it (repeatable)"
    ),
    objects_hex: list[str] = typer.Option(
        None, "--object-hex", help="The same, hex-encoded (names that are not UTF-8)"
    ),
    all_objects: bool = typer.Option(False, "--all", help="Every quarantined object of the run"),
    reason: str = typer.Option(..., "--reason", help="Why the object may be left behind (audited)"),
    actor: str | None = typer.Option(None, "--actor", help="Who waives (default: support:<login>)"),
    takeover: bool = TAKEOVER,
    as_json: bool = JSON,
) -> None:
    """Accept that quarantined objects are left behind, so the run can cut over without them; every waiver is audited.

    The source objects of waived objects are kept where they are (ADR 0006). Continue with `runs resume`."""
    from archive_kms.migration import waive

    names = [o.encode("utf-8") for o in objects or ()]
    for h in objects_hex or ():
        try:
            names.append(bytes.fromhex(h))
        except ValueError:
            raise ValidationError(f"--object-hex {h[:40]!r} is not hex") from None
    view = _state_only()
    _require_run(view.state, run_id)
    out = waive(
        view, run_id, reason=reason, actor=_actor(actor), objects=names, all_objects=all_objects, takeover=takeover
    )
    _emit(as_json, out.to_dict(), out.message + "".join(f"\n  waived {n}" for n in out.waived))


@runs_app.command("cancel")
@_errors_are_messages
def runs_cancel(
    run_id: str = typer.Argument(..., metavar="RUN"), takeover: bool = TAKEOVER, wait: bool = WAIT, as_json: bool = JSON
) -> None:
    """Give up a run that has not cut over: key re-bound, destination and new index deleted, jobs replayed
    (submitted to the support deployment; --wait runs it here)."""
    _require_run(_state_only().state, run_id)
    if not wait:
        _submit_support(run_id, "cancel", takeover=takeover, task_runner="threads", as_json=as_json)
        return
    _finish_run(_run_flow("support", run_id=run_id, action="cancel", takeover=takeover), as_json)


@runs_app.command("reclaim")
@_errors_are_messages
def runs_reclaim(
    every: float = typer.Option(
        0.0, "--every", min=0.0, help="Repeat every SECONDS until interrupted (0: one pass, then exit)"
    ),
    unstarted_after: float = typer.Option(
        0.0,
        "--unstarted-after",
        min=0.0,
        help="SECONDS a flow run may stay pending/running without its run taking the lease before it counts "
        "as lost (0: twice lease_ttl_seconds, at least 120)",
    ),
    as_json: bool = JSON,
) -> None:
    """Resume the runs whose executor is gone (a worker killed mid-run: lease expired, flow run
    ended or stuck without the lease), on the support deployment for a live worker; their lost
    flow runs are marked crashed. Safe to run from several places at once."""
    import datetime as _dt
    import time as _time

    from archive_kms.migration.reclaim import reclaim

    platform, launcher = _platform(), _launcher()
    while True:
        grace = _dt.timedelta(seconds=unstarted_after) if unstarted_after > 0 else None
        done = reclaim(platform, launcher, actor=_actor(None), unstarted_after=grace)
        for r in done:
            line = f"run {r.run_id} ({r.tenant_id}): {r.reason}; " + (
                f"resume submitted as flow run {r.submitted}" if r.submitted else f"not resubmitted: {r.skipped}"
            )
            typer.echo(_json.dumps(r.to_dict()) if as_json else line)
        if every <= 0:
            if not done and not as_json:
                typer.echo("no run has lost its executor")
            return
        _time.sleep(every)


limits_app = typer.Typer(
    no_args_is_help=True,
    help="The fleet's limits on the Prefect server: concurrent runs and key-service request rates.",
)
app.add_typer(limits_app, name="limits")


@limits_app.command("apply")
@_errors_are_messages
def limits_apply(as_json: bool = JSON) -> None:
    """Set archive-kms-runs (max_concurrent_runs) and every archive-kms-l1:* rate limit
    (l1_requests_per_second_*) on the Prefect server to the values of the settings."""
    from archive_kms.config import Settings
    from archive_kms.flows.limits import apply_limits

    _prefect_api()
    rows = apply_limits(Settings())
    _emit(
        as_json,
        rows,
        "\n".join(
            f"{r['name']}: {r['limit']} slots"
            + (f", {r['slot_decay_per_second']:g}/s" if r["slot_decay_per_second"] else "")
            for r in rows
        ),
    )


jobs_app = typer.Typer(
    no_args_is_help=True,
    help="Archive jobs: the queue (list, park one that cannot be replayed) and running jobs (running, abandon).",
)
app.add_typer(jobs_app, name="jobs")


def _queued_row(job: _Any) -> dict[str, _Any]:
    """What support sees of a queued job: ids, state, times, the parking; never its content."""
    parked = job.parked
    return {
        "job_id": job.job_id,
        "tenant": job.tenant_id,
        "state": "parked" if parked else job.state.value,
        "position": job.position,
        "received_at": job.received_at,
        "replayed_at": job.replayed_at,
        "parked_reason": parked.get("reason") if parked else None,
        "parked_by": parked.get("actor") if parked else None,
    }


def _queued_line(r: dict[str, _Any]) -> str:
    received = r["received_at"].isoformat(timespec="seconds") if r["received_at"] else "-"
    why = f"  parked by {r['parked_by']}: {r['parked_reason']}" if r["parked_reason"] is not None else ""
    return f"{r['position']:>5}  {r['job_id']:<36} {r['state']:<9} {received}{why}"


@jobs_app.command("list")
@_errors_are_messages
def jobs_list(
    tenant: str,
    include_replayed: bool = typer.Option(False, "--all", help="Replayed and parked jobs too"),
    as_json: bool = JSON,
) -> None:
    """List TENANT's queued archive jobs in replay order (ids, state, received, parking; never content)."""
    _tenant_arg(tenant)
    state = _state_only().state
    gate = state.gate(tenant)
    rows = [_queued_row(j) for j in state.list_deferred(tenant, include_replayed=include_replayed)]
    _emit(
        as_json, rows, "\n".join([f"gate {gate.state.value}, {gate.pending} pending"] + [_queued_line(r) for r in rows])
    )


@jobs_app.command("park")
@_errors_are_messages
def jobs_park(
    tenant: str,
    job_id: str = typer.Argument(..., metavar="JOB"),
    reason: str = typer.Option(..., "--reason", help="Why the job is given up (audited)"),
    actor: str | None = typer.Option(None, "--actor", help="Who parks it (default: support:<login>)"),
    as_json: bool = JSON,
) -> None:
    """Give up one queued job whose content cannot be opened, so the gate drains past it; audited.

    The job is marked replayed without running; its sealed content is kept for forensics and
    nothing of it is archived (send it again under a new job id). Continue with `runs resume`."""
    _tenant_arg(tenant)
    from archive_kms.operations.archive import park_deferred_job

    state = _state_only().state
    parked = park_deferred_job(state, tenant, job_id, reason=reason, actor=_actor(actor))
    gate = state.gate(tenant)
    row = _queued_row(parked) | {"gate": gate.state.value, "pending": gate.pending}
    _emit(
        as_json,
        row,
        f"job {job_id} of tenant {tenant} parked by {row['parked_by']}: {row['parked_reason']}; "
        f"gate {gate.state.value}, {gate.pending} pending",
    )


@jobs_app.command("running")
@_errors_are_messages
def jobs_running(tenant: str, as_json: bool = JSON) -> None:
    """List TENANT's running archive jobs with their lease (a job whose lease expired has a writer that died or hangs)."""
    _tenant_arg(tenant)
    from datetime import UTC, datetime

    state = _state_only().state
    state.gate(tenant)  # names an unknown tenant
    now = datetime.now(UTC)
    rows = [
        {
            "job_id": j.job_id,
            "attempt": j.attempt,
            "started_at": j.started_at,
            "lease_expires_at": j.lease_expires_at,
            "lease_expired": j.lease_expires_at is not None and j.lease_expires_at <= now,
        }
        for j in state.running_jobs(tenant)
    ]
    _emit(
        as_json,
        rows,
        "\n".join(
            f"{r['job_id']:<36} attempt {r['attempt']}  started {r['started_at']:%Y-%m-%d %H:%M:%S}  lease "
            f"{'EXPIRED' if r['lease_expired'] else 'until'} {r['lease_expires_at']:%H:%M:%S}"
            for r in rows
        )
        or "no running jobs",
    )


@jobs_app.command("abandon")
@_errors_are_messages
def jobs_abandon(
    tenant: str,
    job_id: str = typer.Argument(..., metavar="JOB"),
    reason: str = typer.Option(..., "--reason", help="Why the job is given up (audited)"),
    actor: str | None = typer.Option(None, "--actor", help="Who abandons it (default: support:<login>)"),
    as_json: bool = JSON,
) -> None:
    """Give up a running archive job (its writer hangs or is gone); audited.

    The job is failed at once, so its writer can no longer write; once the lease it held
    runs out (at most the job lease TTL) what it wrote is rolled back. The writer may send
    the job again, under the same id. A migration waiting in `pause` then proceeds."""
    _tenant_arg(tenant)
    from archive_kms.operations.archive import abandon_running_job

    p = _platform()
    out = abandon_running_job(p.state, p.open_archive, tenant, job_id, reason=reason, actor=_actor(actor))
    _emit(
        as_json,
        out.to_dict(),
        f"job {job_id} of tenant {tenant} abandoned; {out.rollback.objects_deleted} object(s) and "
        f"{out.rollback.documents_deleted} index document(s) it wrote were rolled back"
        + (f" (after waiting {out.waited_seconds:.0f} s for its lease to run out)" if out.waited_seconds > 1 else ""),
    )


@app.command("verify")
@_errors_are_messages
def verify_cmd(tenant: str, as_json: bool = JSON) -> None:
    """Read every object of TENANT end to end and reconcile its records with its index; exit 1 if anything is off."""
    from archive_kms.operations.verification import verify_tenant

    v = verify_tenant(_platform(), tenant)
    human = (
        f"tenant {v['tenant']} at {v['location']}: {v['objects']} objects ({v['bytes_plaintext']} plaintext "
        f"bytes), {v['unreadable']} unreadable; {v['records']} records, index {v['index']} holds "
        f"{v['index_documents']} documents ({v['missing_in_index']} missing, {v['extra_in_index']} extra, "
        f"{v['index_mismatched']} different, {v['index_unreadable']} unreadable): {'OK' if v['ok'] else 'NOT OK'}"
    )
    if v["problems"]:
        counts = ", ".join(f"{n} {reason}" for reason, n in v["problem_counts"].items())
        human += f"\n{len(v['problems'])} problem(s): {counts}"
        for p in v["problems"]:  # every one: verify never stops at the first
            human += f"\n  {p['reason']:<22} {p['object']}: {p['detail']}"
    _emit(as_json, v, human)
    if not v["ok"]:
        raise typer.Exit(1)


# --- the key lifecycle: revoke, restore, the key-state monitor, warnings (docs/key-lifecycle.md) ---

keys_app = typer.Typer(
    no_args_is_help=True, help="Tenants' master keys: check them at their providers, status, grace policy."
)
app.add_typer(keys_app, name="keys")
warnings_app = typer.Typer(
    invoke_without_command=True,
    help="Stored warnings (key unavailable, key disabled, rotation detected, run failed): list, acknowledge, clear.",
)
app.add_typer(warnings_app, name="warnings")

YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation")
WORKSPACE = typer.Option(None, "--workspace", help="Only this workspace (granular revocation)")
BEFORE = typer.Option(
    None,
    "--before",
    help="Only the data keys of hours that end at or before this time (ISO 8601, e.g. 2026-01-31T00:00Z)",
)
REASON = typer.Option("", "--reason", help="Why (kept in the audit log and the receipt)")


def _before(value: str | None):
    if not value:
        return None
    from datetime import datetime

    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"--before {value!r}: use an ISO 8601 time, e.g. 2026-01-31T00:00:00Z") from None
    if when.tzinfo is None:
        raise ValidationError(f"--before {value!r}: give a time zone (e.g. Z for UTC)")
    return when


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise ValidationError(f"{question}: pass --yes to confirm (no terminal to ask on)")
    if not typer.confirm(question, default=False):
        typer.echo("nothing changed", err=True)
        raise typer.Exit(1)


def _receipt_lines(receipt: dict[str, _Any]) -> list[str]:
    from rich.console import Console
    from rich.table import Table

    table = Table("component", "refusing", "since", "after commit", "served after commit", title="revocation receipt")
    for c in receipt.get("components", []):
        refusing = {True: "yes", False: "NO", None: "-"}[c.get("refusing")]
        after = c.get("after_commit_ms")
        table.add_row(
            c["component"],
            refusing,
            c.get("refusing_since") or "-",
            "-" if after is None else f"{after:g} ms",
            str(c.get("served_after_commit", 0)),
        )
    Console(soft_wrap=False).print(table)
    lines = [
        f"tenant {receipt.get('tenant')}, scope {receipt.get('scope', {}).get('kind')}, run {receipt.get('run_id')}",
        f"  requested at {receipt.get('requested_at')} by {receipt.get('actor')}"
        + (f" ({receipt.get('reason')})" if receipt.get("reason") else ""),
        f"  committed at {receipt.get('committed_at')}; every process refusing by "
        f"{receipt.get('refusing_everywhere_by')} (bound {receipt.get('bound_seconds')} s)",
    ]
    for r in receipt.get("runs_stopped") or []:
        lines.append(
            f"  run {r['run_id']} ({r['flow']}) stopped: {r['state']} at step {r['step']}; {r.get('resume') or ''}"
        )
    for c in receipt.get("components", []):
        if c.get("note"):
            lines.append(f"  {c['component']}: {c['note']}")
    lines.append(
        "receipt: OK" if receipt.get("ok") else f"receipt: NOT OK (late: {receipt.get('not_refusing_in_time')})"
    )
    return lines


def _preview(tenant: str, action: str, workspace: str | None, before: str | None, as_json: bool) -> None:
    from archive_kms.operations.revocation import RevocationScope, revocation_preview

    preview = revocation_preview(_platform(), tenant, RevocationScope(workspace, _before(before)), action)
    _emit(as_json, preview.to_dict(), _blast_radius_text(preview))


def _wait_for_receipt(view: _Any, run_id: str, timeout: float = 120.0) -> dict[str, _Any] | None:
    """The receipt of revocation run ``run_id`` once a worker wrote it (None on timeout)."""
    import time as _time

    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        run = view.state.get_run(run_id)
        if run is not None and run.state.value != "running":
            if run.state.value != "completed":
                failed = next((st for st in run.steps if st.state.value == "failed"), None)
                raise StateError(
                    f"revocation run {run_id} {run.state.value}"
                    + (f" at step {failed.name}: {failed.error}" if failed else "")
                    + "; the revocation itself stays in force"
                )
            return dict(run.step("receipt").result or {})
        _time.sleep(0.5)
    return None


@app.command("revoke")
@_errors_are_messages
def revoke_cmd(
    tenant: str,
    workspace: str | None = WORKSPACE,
    before: str | None = BEFORE,
    reason: str = REASON,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only show what would be refused (objects, index documents, queued jobs, runs)"
    ),
    yes: bool = YES,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Revoke TENANT's key access now, in every process: reads, searches and archive writes refused
    (jobs deferred), caches purged, running migration runs stopped; prints the revocation receipt.

    The revocation is made by this command (it returns once every process refuses); its run
    (probes and receipt) goes to the revoke deployment and is followed here, or with --wait
    runs here. --workspace / --before revoke one workspace or a time range only."""
    from archive_kms.domain.tenants import TenantId

    TenantId(tenant)
    when = _before(before)
    if dry_run:
        _preview(tenant, "revoke", workspace, before, as_json)
        return
    from archive_kms.operations.revocation import RevocationScope, check_revoke

    scope = RevocationScope(workspace, when)
    p = _platform()
    check_revoke(p, tenant, scope)
    _confirm(yes, f"revoke {scope.describe()} of tenant {tenant}? Reads and searches are refused until restore")
    actor = _operator()
    if wait:
        from archive_kms.flows.key_lifecycle import run_key_flow
        from archive_kms.operations.revocation import begin_revocation

        _prefect_api()
        start = begin_revocation(p, tenant, actor=actor, reason=reason, scope=scope)
        if not as_json:
            typer.echo(
                f"revoked at {start.to_params()['committed_at']}; every process refuses by "
                f"{start.to_params()['refusing_everywhere_by']}; probing for the receipt ..."
            )
        receipt = run_key_flow("revoke", tenant=tenant, actor=actor, start=start.to_params())
    else:
        from archive_kms.migration.launch import start_revoke

        _prefect_api()
        started = start_revoke(p, _launcher(), tenant, actor=actor, reason=reason, workspace=workspace, before=when)
        if not as_json:
            typer.echo(f"{started.message}; run {started.run_id} on {started.deployment}: waiting for the receipt ...")
        receipt = _wait_for_receipt(_state_only(), started.run_id)
        if receipt is None:
            typer.echo(
                f"error: the revocation is in force, but no worker has written run {started.run_id}'s receipt yet: "
                f"`archive-kms runs show {started.run_id}` later",
                err=True,
            )
            raise typer.Exit(1)
    if as_json:
        typer.echo(_json.dumps(receipt, indent=2, default=str))
    else:
        for line in _receipt_lines(receipt):
            typer.echo(line)
    if not receipt.get("ok"):
        raise typer.Exit(1)


@app.command("restore")
@_errors_are_messages
def restore_cmd(
    tenant: str,
    workspace: str | None = WORKSPACE,
    before: str | None = BEFORE,
    reason: str = REASON,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would become readable again"),
    yes: bool = YES,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Restore TENANT's key access after a verified unwrap at its key's provider; replay the jobs deferred meanwhile.

    The same --workspace / --before lift a granular revocation. Submitted to the restore
    deployment and followed here; --wait runs it here."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.operations.revocation import RevocationScope, check_restore

    TenantId(tenant)
    when = _before(before)
    if dry_run:
        _preview(tenant, "restore", workspace, before, as_json)
        return
    p = _platform()
    scope = RevocationScope(workspace, when)
    what = check_restore(p, tenant, scope)
    _confirm(yes, f"restore {what}?")
    actor = _operator()
    _prefect_api()
    if wait:
        from archive_kms.flows.key_lifecycle import run_key_flow

        report = run_key_flow(
            "restore",
            tenant=tenant,
            actor=actor,
            reason=reason,
            workspace=workspace,
            before=None if when is None else when.isoformat(),
        )
    else:
        from archive_kms.migration.launch import start_restore

        started = start_restore(p, _launcher(), tenant, actor=actor, reason=reason, workspace=workspace, before=when)
        if not started.created:
            raise StateError(f"tenant {tenant}: {started.message} {started.run_id}")
        if not as_json:
            typer.echo(f"run {started.run_id} submitted to {started.deployment}; following ...")
        view = _state_only()
        import time as _time

        deadline = _time.monotonic() + 120
        while True:
            run = view.state.get_run(started.run_id)
            if run is not None and run.state.value != "running":
                break
            if _time.monotonic() >= deadline:
                typer.echo(
                    f"error: run {started.run_id} is still running: `archive-kms runs show {started.run_id}`", err=True
                )
                raise typer.Exit(1)
            _time.sleep(0.5)
        if run.state.value != "completed":
            failed = next((st for st in run.steps if st.state.value == "failed"), None)
            raise StateError(
                f"restore run {started.run_id} {run.state.value}"
                + (f" at step {failed.name}: {failed.error}" if failed else "")
                + f"; tenant {tenant} stays revoked"
            )
        report = {"run_id": started.run_id, "tenant": tenant, **{st.name: st.result for st in run.steps}}
    if as_json:
        typer.echo(_json.dumps(report, indent=2, default=str))
        return
    probe = report.get("components") or (report.get("probe") or {}).get("components") or []
    replayed = report.get("replayed_jobs", (report.get("replay_jobs") or {}).get("replayed"))
    typer.echo(
        f"tenant {tenant}: restored (run {report['run_id']}); {replayed} deferred job(s) replayed; "
        + ", ".join(
            f"{c['component']} {'serving' if c.get('serving', c.get('served_after_commit')) else 'NOT serving'}"
            for c in probe
        )
    )


def _monitor_line(o: dict[str, _Any]) -> str:
    return (
        f"{o['tenant']:<20} {o['classification']:<11} {o['state']:<16} {str(o.get('key_version') or '-')[:36]:<36} "
        f"{o['action']}"
    )


@keys_app.command("check")
@_errors_are_messages
def keys_check(
    tenant: str | None = typer.Argument(None, help="One tenant (default: every tenant on its own key)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Say what would be done (and the blast radius), change nothing"
    ),
    no_revoke: bool = typer.Option(
        False, "--no-revoke", help="Record and warn, but do not revoke a tenant whose key the customer disabled"
    ),
    as_json: bool = JSON,
) -> None:
    """Ask each customer key's provider for its state and version: tell a customer rotation, a disabled /
    deleted / expired key (the tenant is revoked, actor monitor) and an unreachable provider (never a
    revocation) apart. What the scheduled key-monitor deployment runs."""
    from archive_kms.operations.key_monitor import check_keys

    report = check_keys(_platform(), tenant, dry_run=dry_run, revoke=not no_revoke)
    data = report.to_dict()
    human = "\n".join(_monitor_line(o) for o in data["observations"]) or "no tenant on its own key"
    counts = ", ".join(f"{k} {v}" for k, v in data["counts"].items())
    _emit(as_json, data, f"{human}\n{counts}" + (" (dry run: nothing changed)" if dry_run else ""))


@keys_app.command("status")
@_errors_are_messages
def keys_status(tenant: str, as_json: bool = JSON) -> None:
    """TENANT's key: the keychain (revoked? scoped revocations), the provider's answer now, the monitor's
    last observation, the grace policy and the active warnings."""
    from archive_kms.operations.key_monitor import key_status

    st = key_status(_platform(), tenant)
    now = st["provider_now"]
    lines = [
        f"tenant {st['tenant']} ({st['key_mode']}): key {st['key_ref']}",
        f"  revoked: {st['revoked']}" + (f" since {st['revoked_at']}" if st["revoked"] else ""),
        f"  provider now: {now.get('state', now.get('error'))} version {now.get('key_version') or '-'}"
        + (f" ({now.get('classification')})" if now.get("classification") else ""),
        f"  grace policy: {st['grace_policy']} ({st['grace_policy_source']})",
    ]
    for s in st["scoped_revocations"]:
        lines.append(
            f"  scoped revocation: workspace {s['workspace'] or '*'} before {s['before'] or '-'} since {s['revoked_at']}"
        )
    last = st["last_observation"]
    if last:
        lines.append(
            f"  last check: {last['observed_at']} {last['state']} ({last['outcome']}), accepted version "
            f"{last['accepted_version'] or '-'}"
        )
    for w in st["warnings"]:
        lines.append(f"  warning [{w['severity']}] {w['id']}: {w['message']}")
    _emit(as_json, st, "\n".join(lines))


@keys_app.command("policy")
@_errors_are_messages
def keys_policy(
    tenant: str,
    policy: str | None = typer.Argument(
        None, help="deny-immediately | serve-from-cache-for:SECONDS | alert-only (omit to show)"
    ),
    default: bool = typer.Option(
        False, "--default", help="Drop the tenant's own policy: the settings' default applies"
    ),
    yes: bool = YES,
    as_json: bool = JSON,
) -> None:
    """Show or set TENANT's grace policy: what an outage of its key service does to reads and searches."""
    from archive_kms.keys.keychain.access import GracePolicy
    from archive_kms.operations.key_monitor import set_grace_policy

    p = _platform()
    if policy is None and not default:
        own = p.state.get_grace_policy(tenant)
        if p.state.get_tenant(tenant) is None:
            raise StateError(f"unknown tenant {tenant!r}: see `archive-kms tenant list`")
        data = {"tenant": tenant, "policy": str(p.grace_policy(tenant)), "own": own is not None}
        _emit(as_json, data, f"{tenant}: {data['policy']} ({'its own' if own else 'the settings default'})")
        return
    if policy is not None and default:
        raise ValidationError("give a POLICY or --default, not both")
    if policy is not None:
        GracePolicy.parse(policy)  # a bad policy is refused before asking
    _confirm(yes, f"set the grace policy of {tenant} to {policy or 'the default'}?")
    now = set_grace_policy(p, tenant, policy, actor=_operator())
    _emit(as_json, {"tenant": tenant, "policy": now, "own": policy is not None}, f"{tenant}: grace policy {now}")


def _warning_line(w: dict[str, _Any]) -> str:
    ack = f" (acknowledged by {w['acknowledged_by']})" if w.get("acknowledged_by") else ""
    state = "" if w["active"] else f" [cleared {w['cleared_at']}]"
    return f"{w['severity']:<8} {w['id']:<48} x{w['count']:<3} {w['updated_at']}{state}{ack}\n         {w['message']}"


@warnings_app.callback()
@_errors_are_messages
def warnings_list(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", help="One tenant's warnings"),
    all_: bool = typer.Option(False, "--all", help="Cleared warnings too"),
    as_json: bool = JSON,
) -> None:
    """List the active warnings (of one tenant with --tenant)."""
    if ctx.invoked_subcommand is not None:
        return
    from archive_kms.operations.key_warnings import list_warnings

    rows = [w.to_dict() for w in list_warnings(_state_only().state, tenant, include_cleared=all_)]
    _emit(as_json, rows, "\n".join(_warning_line(w) for w in rows) or "no warnings")


@warnings_app.command("ack")
@_errors_are_messages
def warnings_ack(warning: str = typer.Argument(..., metavar="ID"), as_json: bool = JSON) -> None:
    """Acknowledge a warning (it stays until its condition clears); audited."""
    from archive_kms.operations.key_warnings import acknowledge_warning

    w = acknowledge_warning(_state_only().state, warning, actor=_operator())
    _emit(as_json, w.to_dict(), f"{w.warning_id}: acknowledged by {w.acknowledged_by}")


@warnings_app.command("clear")
@_errors_are_messages
def warnings_clear(
    warning: str = typer.Argument(..., metavar="ID"),
    reason: str = typer.Option(..., "--reason", help="Why it no longer applies (audited)"),
    yes: bool = YES,
    as_json: bool = JSON,
) -> None:
    """Clear a warning by hand (the library clears its own when the condition ends); audited."""
    from archive_kms.operations.key_warnings import clear_warning

    state = _state_only().state
    found = state.get_warning(warning)
    if found is None or not found.active:
        raise StateError(f"no active warning {warning!r}: see `archive-kms warnings`")
    _confirm(yes, f"clear {warning}?")
    subject = warning.split(":", 2)[2] if warning.count(":") >= 2 else None
    cleared = clear_warning(state, found.tenant_id, found.kind, actor=_operator(), subject=subject, reason=reason)
    _emit(as_json, cleared.to_dict() if cleared else {}, f"{warning}: cleared")


# --- the state database's schema (Alembic revisions, docs/state-store.md) ------------------

keychain_app = typer.Typer(
    no_args_is_help=True, help="Tenant keychains: why one is refused, and the audited override for a false lock."
)
app.add_typer(keychain_app, name="keychain")


@keychain_app.command("status")
@_errors_are_messages
def keychain_status(tenant: str, as_json: bool = JSON) -> None:
    """Whether the tenant's keychain is refused (locked), and why: the head's version
    against the version its verified audit chain vouches for, and the chain's problem.
    Exit 1 if locked."""
    status = _platform().keychain.lock_status(tenant)
    human = (
        f"keychain of {tenant}: LOCKED: "
        + (status["chain_problem"] or f"head v{status['head_version']} below audited v{status['audited_version']}")
        if status["locked"]
        else f"keychain of {tenant}: not locked (head v{status['head_version']}, audit log v{status['audited_version']})"
    )
    _emit(as_json, status, human)
    if status["locked"]:
        raise typer.Exit(1)


@keychain_app.command("unlock")
@_errors_are_messages
def keychain_unlock(
    tenant: str,
    reason: str = typer.Option(..., "--reason", help="Why the lock is false (audited)"),
    actor: str | None = typer.Option(None, "--actor", help="Who overrides it (default: support:<login>)"),
    as_json: bool = JSON,
) -> None:
    """Override a false lock: accept the keychain head as it is now, audited
    (`keychain.unlock`, with actor and reason). Accepting a head below the audited
    version brings back what the audited commits in between did (they are listed): after
    a whole-database restore, restore a newer backup instead. Exit 2 if not locked."""
    out = _platform().keychain.unlock(tenant, reason=reason, actor=_actor(actor))
    undone = ", ".join(f"{u['action']} (v{u['head_version']})" for u in out["undone"]) or "nothing"
    _emit(
        as_json,
        out,
        f"keychain of {tenant} unlocked by {out['unlocked_by']} at head v{out['head_version']}; undone: {undone}",
    )


db_app = typer.Typer(no_args_is_help=True, help="The state database's schema: current revision and upgrades.")
app.add_typer(db_app, name="db")
DB_URL = typer.Option(None, "--url", help="State database URL (default: the settings' state_url)")


def _state_database(url: str | None):
    from archive_kms.config import Settings
    from archive_kms.state.sql import SqlDatabase, make_engine

    return SqlDatabase(make_engine(url or Settings().state_url))


@db_app.command("current")
@_errors_are_messages
def db_current(url: str | None = DB_URL, as_json: bool = JSON) -> None:
    """Show the schema revision of the state database and this code's head; exit 1 if they differ."""
    from archive_kms.state.sql import migrate

    db = _state_database(url)
    try:
        found = migrate.status(db)
    finally:
        db.engine.dispose()
    _emit(as_json, found.to_dict() | {"database": db.display}, f"{db.display}: {found.describe()}")
    if not found.at_head:
        raise typer.Exit(1)


@db_app.command("upgrade")
@_errors_are_messages
def db_upgrade(
    url: str | None = DB_URL,
    to: str = typer.Option("head", "--to", help="Target revision (default: head)"),
    runtime_role: str | None = typer.Option(
        None,
        "--runtime-role",
        help="PostgreSQL: the role the workers connect as; granted what they need, not the rights to rewrite the "
        "audit log (run the upgrade as the migration role that owns the schema: docs/deployment.md)",
    ),
    as_json: bool = JSON,
) -> None:
    """Upgrade the state database's schema to this code's (one transaction; stamps a database from before Alembic)."""
    from archive_kms.state.sql import migrate

    db = _state_database(url)
    try:
        before, after = migrate.upgrade(db, to, runtime_role=runtime_role)
    finally:
        db.engine.dispose()
    _emit(
        as_json,
        {"database": db.display, "before": before.to_dict(), "after": after.to_dict()},
        f"{db.display}: {before.describe()} -> {after.describe()}",
    )


# --- the Archive Console (issue #15) -------------------------------------------------------------

console_app = typer.Typer(no_args_is_help=True, help="The Archive Console: serve the API and page, issue local tokens.")
app.add_typer(console_app, name="console")


@console_app.command("serve")
@_errors_are_messages
def console_serve(
    host: str | None = typer.Option(None, "--host", help="Listen address (default: console_host, 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="Listen port (default: console_port, 8700)"),
) -> None:
    """Serve the console API and page (http://HOST:PORT/; the OpenAPI document at /api/openapi.json)."""
    import uvicorn

    from archive_kms.api.app import console_from_settings, create_app
    from archive_kms.config import Settings

    s = Settings()
    host = host if host is not None else s.console_host
    port = port if port is not None else s.console_port
    _check_listen(host, port)
    _prefect_api()
    application = create_app(console_from_settings(s))
    where = f"http://{host}:{port}/"
    typer.echo(f"console at {where} (sign in with a token from `archive-kms console token`)", err=True)
    _console_logging()
    # log_config=None: uvicorn's dictConfig would clear, flush and close every handler of
    # this process under the logging lock, Prefect's API log handler among them; a thread
    # holding Prefect's service lock and waiting for the logging lock (a key-state probe
    # emitting an event) then deadlocks it. Our own handler for uvicorn's records instead.
    try:
        uvicorn.run(application, host=host, port=port, log_level="warning", log_config=None)
    except SystemExit as e:
        if e.code != 3:  # uvicorn's STARTUP_FAILURE: it logged why on the line above
            raise
        typer.echo(f"error: the console could not start on {where} (the line above says why)", err=True)
        raise typer.Exit(2) from None


def _check_listen(host: str, port: int) -> None:
    """Refuse at once, in one line, an address the console cannot listen on (an unknown
    host, a port in use or not ours to take), before anything starts."""
    import socket

    from archive_kms.errors import ConfigurationError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigurationError(
            f"--host {host!r}: not an address to listen on ({e}); set --host or ARCHIVE_KMS_CONSOLE_HOST"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigurationError(
                f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host / --port "
                "(ARCHIVE_KMS_CONSOLE_HOST / _PORT) or stop what holds it"
            ) from None


def _console_logging() -> None:
    """uvicorn's records (warnings and errors: a port in use, a failed request) to stderr,
    one line each, on the ``uvicorn`` logger alone; every other logger and handler of the
    process is left as it is."""
    import logging

    logger = logging.getLogger("uvicorn")
    if not any(getattr(h, "archive_kms_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.archive_kms_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


@console_app.command("token")
@_errors_are_messages
def console_token(
    role: str = typer.Option(..., "--role", help="tenant_admin | security_officer | support_engineer | platform_admin"),
    sub: str = typer.Option(..., "--sub", help="Who the token is for (e.g. alice@acme)"),
    tenant: str | None = typer.Option(
        None, "--tenant", help="The tenant (required for tenant_admin and security_officer)"
    ),
    ttl: int = typer.Option(8 * 3600, "--ttl", help="Lifetime in seconds (at most 12 hours)"),
) -> None:
    """Issue a signed console token (the local issuer, for the demo and tests)."""
    from datetime import timedelta

    from archive_kms.api.auth import issue_token, token_keys
    from archive_kms.config import Settings

    typer.echo(
        issue_token(token_keys(Settings()), subject=sub, role=role, tenant_id=tenant, ttl=timedelta(seconds=ttl))
    )


# --- key lifecycle: crypto-erasure and retention (issue #14) ----------------------------------

erasure_app = typer.Typer(
    no_args_is_help=True, help="Signed erasure records: verify one offline, show a run's, print the public key."
)
retention_app = typer.Typer(
    no_args_is_help=True, help="Retention policies: how long a tenant's data is kept before it is crypto-erased."
)
app.add_typer(erasure_app, name="erasure")
app.add_typer(retention_app, name="retention")

YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (scripts)")


def _parse_time(value: str | None, option: str) -> _Any:
    if value is None:
        return None
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationError(
            f"{option} {value!r} is not a time: use ISO 8601 with a zone, e.g. 2026-01-31T00:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise ValidationError(f"{option} {value!r} has no zone: add Z (UTC) or an offset")
    return parsed


def _erasure_text(b: _Any) -> str:
    lines = [
        f"erase {b.tenant} (dry run: nothing changed): {b.description}",
        f"  keys:     {b.deks} DEK(s) in workspaces {', '.join(b.workspaces) or '-'}",
        f"  storage:  {b.objects} objects ({b.records} records, {b.attachments} attachments), {b.bytes} bytes at "
        f"{b.location}",
        f"  index:    {b.index_documents} documents in {b.index or '-'} (and any other generation)",
        f"  jobs:     {b.queued_jobs} queued; runs: {', '.join(b.running_runs) or 'none running'}",
        "  it would:",
    ]
    lines += [f"    {i}. {w}" for i, w in enumerate(b.would, 1)]
    return "\n".join(lines)


def _write_certificate(run_id: str, out: str | None, *, quiet: bool = False) -> bytes | None:
    from archive_kms.migration.erase import certificate_of

    run = _require_run(_state_only().state, run_id)
    text = certificate_of(run)
    if text is None:
        return None
    data = text.encode("ascii")
    if out:
        Path(out).write_bytes(data + b"\n")
        if not quiet:
            typer.echo(f"erasure record written to {out} (verify it: archive-kms erasure verify {out})")
    return data


@app.command("erase")
@_errors_are_messages
def erase_cmd(
    tenant: str,
    before: str | None = typer.Option(
        None,
        "--before",
        help="Erase the time buckets that started before this time's bucket (ISO 8601 with a zone; its own bucket is kept)",
    ),
    workspace: str | None = typer.Option(None, "--workspace", help="Erase this whole workspace (its key and DEKs)"),
    reason: str | None = typer.Option(None, "--reason", help="Why (audited, and in the erasure record)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only show what would be erased (keys, objects, bytes, index)"
    ),
    yes: bool = YES,
    wait: bool = WAIT,
    out: str | None = typer.Option(None, "--out", help="With --wait: write the signed erasure record to this file"),
    as_json: bool = JSON,
) -> None:
    """Crypto-erase TENANT's expired time buckets (--before) or a whole workspace: the DEKs are destroyed, the
    objects they encrypted deleted, their index documents deleted, and a signed erasure record written.

    Asks for confirmation unless --yes. Submits the run to the erase deployment; --wait runs it here."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.migration.erase import plan_erase

    TenantId(tenant)
    cutoff = _parse_time(before, "--before")
    if dry_run:
        from archive_kms.operations.erasure import erasure_blast_radius

        preview = erasure_blast_radius(_platform(), tenant, before=cutoff, workspace=workspace)
        _emit(as_json, preview.to_dict(), _erasure_text(preview))
        return
    platform = _platform()
    plan = plan_erase(platform, tenant, before=cutoff, workspace=workspace, reason=reason)  # refusals first
    _confirm(yes, f"crypto-erase {plan.erasure_scope.describe()} of tenant {tenant}? This cannot be undone")
    _prefect_api()
    if not wait:
        from archive_kms.migration.launch import start_erase

        started = start_erase(
            platform, _launcher(), tenant, actor=_operator(), before=cutoff, workspace=workspace, reason=reason
        )
        _submitted(started, as_json)
        return
    import archive_kms.flows.lifecycle  # noqa: F401 - registers the lifecycle flows with run_flow

    answer = _run_flow("erase", tenant=tenant, before=cutoff, workspace=workspace, reason=reason, actor=_operator())
    _finish_lifecycle(answer, as_json)
    if answer["outcome"]["state"] == "completed":
        _write_certificate(answer["outcome"]["run_id"], out, quiet=as_json)


def _finish_lifecycle(answer: dict[str, _Any], as_json: bool, *, waiting_ok: bool = False) -> None:
    """Print a rotate/erase flow's answer (its report as lines); exit 1 if it failed."""
    outcome, report = answer["outcome"], answer["report"]
    if as_json:
        typer.echo(_json.dumps(answer, indent=2, default=str))
    else:
        skip = {"steps", "progress", "run_id", "tenant", "flow"}
        typer.echo(f"{report['flow']} {report['tenant']}: run {report['run_id']}")
        for key, value in report.items():
            if key not in skip and value is not None:
                typer.echo(f"  {key}: {value}")
        for s in report["steps"]:
            typer.echo(f"  step {s['step']}: {s['state']}" + (f" ({s['error']})" if s["error"] else ""))
        typer.echo(f"run {outcome['run_id']}: {outcome['state']} ({outcome['message']})")
    if outcome["state"] == "failed":
        typer.echo(
            f"error: run {outcome['run_id']} failed: {outcome['error']}; after fixing the cause: "
            f"`archive-kms runs resume {outcome['run_id']}`",
            err=True,
        )
        raise typer.Exit(1)
    if outcome["state"] == "waiting" and not waiting_ok:
        raise typer.Exit(4)  # waits for something outside the run (a confirmation)


@erasure_app.command("verify")
@_errors_are_messages
def erasure_verify(
    file: str = typer.Argument(..., metavar="FILE", help="The erasure record (JSON) to check"),
    public_key: str | None = typer.Option(
        None,
        "--public-key",
        help="The platform's public key (PEM, from `archive-kms erasure public-key`); default: this platform's own",
    ),
    as_json: bool = JSON,
) -> None:
    """Verify an erasure record offline: the platform's signature over it, every keychain record it embeds, and
    that they agree. Exit 0 if it verifies, 1 if it does not (the reason is printed)."""
    from archive_kms.crypto.signing import Verifier
    from archive_kms.operations.erasure_record import verify_certificate

    path = Path(file)
    if not path.is_file():
        raise ValidationError(f"{file}: no such file (the erasure record written by `archive-kms erase --out`)")
    if public_key is not None:
        pem_path = Path(public_key)
        if not pem_path.is_file():
            raise ValidationError(f"--public-key {public_key}: no such file")
        verifier = Verifier.from_public_pem(pem_path.read_bytes())
    else:
        from archive_kms.config import Settings
        from archive_kms.operations.platform import platform_signer

        verifier = platform_signer(Settings()).verifier()
    check = verify_certificate(path.read_bytes(), verifier)
    summary = check.summary()
    if as_json:
        typer.echo(_json.dumps(summary, indent=2, default=str))
    elif check.ok:
        typer.echo(
            f"verified: erasure record of tenant {summary['tenant']} (run {summary['run_id']}, {summary['scope']}), "
            f"signed by {summary['signer_key_id']}: {summary['dek_ids_destroyed']} DEK(s) destroyed "
            f"({summary['key_records']} keychain record(s) verified), {summary['objects_deleted']} object(s) / "
            f"{summary['bytes_deleted']} bytes deleted, {summary['documents_deleted']} index document(s) deleted, "
            f"at {summary['erased_at']}"
        )
    else:
        typer.echo(f"NOT verified: {check.reason}", err=True)
    if not check.ok:
        raise typer.Exit(1)


@erasure_app.command("public-key")
@_errors_are_messages
def erasure_public_key() -> None:
    """Print the platform's public verification key (PEM): what a customer verifies erasure records with."""
    from archive_kms.config import Settings
    from archive_kms.operations.platform import platform_signer

    typer.echo(platform_signer(Settings()).public_key_pem().decode("ascii").rstrip())


@erasure_app.command("show")
@_errors_are_messages
def erasure_show(
    run_id: str = typer.Argument(..., metavar="RUN"),
    out: str | None = typer.Option(None, "--out", help="Write the record to this file"),
) -> None:
    """Print (or write) the signed erasure record of a completed erase run."""
    data = _write_certificate(run_id, out)
    if data is None:
        raise StateError(f"run {run_id} has no signed erasure record (not an erase run, or not finished)")
    if not out:
        typer.echo(data.decode("ascii"))


def _retention_seconds(days: float | None, hours: float | None, seconds: int | None) -> int:
    given = [v for v in (days, hours, seconds) if v is not None]
    if len(given) != 1:
        raise ValidationError("give the retention once: --days N, --hours N or --seconds N")
    total = days * 86_400 if days is not None else hours * 3600 if hours is not None else seconds
    if total is None or total != int(total) or total < 1:
        flag = "--days" if days is not None else "--hours" if hours is not None else "--seconds"
        raise ValidationError(
            f"{flag} {given[0]:g}: the retention must be a whole, positive number of seconds (1 second to 100 years)"
        )
    return int(total)


@retention_app.command("set")
@_errors_are_messages
def retention_set(
    tenant: str,
    days: float | None = typer.Option(None, "--days"),
    hours: float | None = typer.Option(None, "--hours"),
    seconds: int | None = typer.Option(None, "--seconds"),
    as_json: bool = JSON,
) -> None:
    """Keep TENANT's data this long: the scheduled erase destroys every time bucket that ended longer ago."""
    from archive_kms.domain.tenants import TenantId

    tid = TenantId(tenant).value
    value = _retention_seconds(days, hours, seconds)
    view = _state_only()
    policy = view.state.set_retention(tid, value, actor=_operator())
    from archive_kms.state.port import AuditEvent

    view.state.append_audit(
        AuditEvent(actor=_operator(), action="retention.set", tenant_id=tid, details={"retention_seconds": value})
    )
    _emit(
        as_json,
        {"tenant": tid, "retention_seconds": policy.retention_seconds, "updated_by": policy.updated_by},
        f"tenant {tid}: data kept {policy.retention_seconds} s ({policy.retention_seconds / 86_400:g} days); "
        "the scheduled erase (deployment key-erase-retention/retention) destroys what is older",
    )


@retention_app.command("show")
@_errors_are_messages
def retention_show(tenant: str | None = typer.Argument(None), as_json: bool = JSON) -> None:
    """Show the retention policy of TENANT, or of every tenant that has one."""
    view = _state_only()
    policies = [p for p in view.state.list_retention() if tenant is None or p.tenant_id == tenant]
    rows = [
        {
            "tenant": p.tenant_id,
            "retention_seconds": p.retention_seconds,
            "updated_by": p.updated_by,
            "updated_at": p.updated_at.isoformat(timespec="seconds") if p.updated_at else None,
        }
        for p in policies
    ]
    _emit(
        as_json,
        rows,
        "\n".join(
            f"{r['tenant']:<24} {r['retention_seconds']:>12} s  (by {r['updated_by']}, {r['updated_at']})" for r in rows
        )
        or "no retention policy",
    )


@retention_app.command("clear")
@_errors_are_messages
def retention_clear(tenant: str, as_json: bool = JSON) -> None:
    """Remove TENANT's retention policy (its data is kept until erased by hand)."""
    from archive_kms.state.port import AuditEvent

    view = _state_only()
    removed = view.state.clear_retention(tenant)
    if removed:
        view.state.append_audit(AuditEvent(actor=_operator(), action="retention.clear", tenant_id=tenant, details={}))
    _emit(
        as_json,
        {"tenant": tenant, "removed": removed},
        f"tenant {tenant}: " + ("policy removed" if removed else "had no policy"),
    )


@retention_app.command("run")
@_errors_are_messages
def retention_run(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what each tenant's policy would erase now"),
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Run the scheduled erasure now (every tenant with a policy); --dry-run says what it would do."""
    if dry_run:
        from archive_kms.migration.erase import plan_retention_erasures

        decisions = [d.to_dict() for d in plan_retention_erasures(_platform())]
        _emit(
            as_json,
            decisions,
            "\n".join(
                f"{d['tenant']:<24} {'erase' if d['erase'] else 'skip':<6} before {d['cutoff']} ({d['why']})"
                for d in decisions
            )
            or "no retention policy",
        )
        return
    _prefect_api()
    if not wait:
        from archive_kms.migration.launch import DEPLOYMENTS

        launch = _launcher().submit(DEPLOYMENTS["erase-retention"], {"actor": _operator()}, tags=["archive-kms"])
        _emit(as_json, {"flow_run_id": launch.flow_run_id}, f"submitted: flow run {launch.flow_run_id}")
        return
    import archive_kms.flows.lifecycle  # noqa: F401 - registers the lifecycle flows with run_flow
    from archive_kms.flows.migration import run_flow

    typer.echo(_json.dumps(run_flow("erase-retention", actor=_operator()), indent=2, default=str))


# --- key lifecycle: customer key rotation with confirmation (issue #14) ----------------------

rotation_app = typer.Typer(
    no_args_is_help=True, help="Customer key rotations: check for one, show them, issue a confirmation."
)
app.add_typer(rotation_app, name="rotation")


def _rotation_rows(platform: _Any, tenant: str) -> list[dict[str, _Any]]:
    from archive_kms.migration.rotate import canary

    rows = []
    for r in platform.state.list_rotations(tenant, limit=20):
        row = {
            "rotation_id": r.rotation_id,
            "state": r.state.value,
            "kind": r.kind,
            "key_ref": r.key_ref,
            "previous_version": r.previous_version,
            "observed_version": r.observed_version,
            "run_id": r.run_id,
            "awaiting_since": r.awaiting_since.isoformat(timespec="seconds") if r.awaiting_since else None,
            "confirmed_by": r.confirmed_by,
            "reminder": bool(r.details.get("reminded_at")),
        }
        if r.state.value == "completed":
            row.update(canary(platform, tenant, r))
        rows.append(row)
    return rows


@rotation_app.command("check")
@_errors_are_messages
def rotation_check(tenant: str, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Compare TENANT's master key version at the provider with the last known one; on a rotation, start the
    rotate run (it pauses the tenant and waits for the customer's confirmation). The first check records the
    version. --wait runs the flow here (it ends waiting for the confirmation)."""
    from archive_kms.domain.tenants import TenantId

    tid = TenantId(tenant).value
    platform = _platform()
    if not wait:
        from archive_kms.migration.launch import start_rotation_check

        _prefect_api()
        started = start_rotation_check(platform, _launcher(), tid, actor=_operator())
        if not started.run_id:
            _emit(as_json, started.to_dict(), f"tenant {tid}: {started.message}")
            return
        _submitted(started, as_json)
        return
    from archive_kms.migration.rotation_monitor import check_rotation

    _, rotation, run = check_rotation(platform, tid, actor=_operator())
    if run is None or rotation is None:
        _emit(as_json, {"tenant": tid, "rotation": None}, f"tenant {tid}: no rotation of its key since the last check")
        return
    import archive_kms.flows.lifecycle  # noqa: F401 - registers the lifecycle flows with run_flow

    answer = _run_flow("rotate", tenant=tid, run_id=run.run_id, actor=_operator())
    _finish_lifecycle(answer, as_json, waiting_ok=True)
    if not as_json and answer["outcome"]["state"] == "waiting":
        typer.echo(
            f"rotation {rotation.rotation_id}: {rotation.previous_version} -> {rotation.observed_version}; "
            f"confirm it: archive-kms confirm-rotation {tid} --rotation {rotation.rotation_id}"
        )


@rotation_app.command("show")
@_errors_are_messages
def rotation_show(tenant: str, as_json: bool = JSON) -> None:
    """TENANT's rotations (newest first), and for a completed one whether the old key version may be disabled."""
    from archive_kms.domain.tenants import TenantId

    rows = _rotation_rows(_platform(), TenantId(tenant).value)
    _emit(
        as_json,
        rows,
        "\n".join(
            f"{r['rotation_id']}  {r['state']:<9} {r['previous_version']} -> {r['observed_version']}  run {r['run_id']}"
            + (f"  safe to disable the old version: {r['safe_to_disable_old_version']}" if "checks" in r else "")
            + ("  (reminder raised)" if r["reminder"] else "")
            for r in rows
        )
        or "no rotation",
    )


@rotation_app.command("confirmation")
@_errors_are_messages
def rotation_confirmation(
    tenant: str,
    rotation: str = typer.Option(..., "--rotation", help="The rotation id (archive-kms rotation show TENANT)"),
    by: str | None = typer.Option(None, "--by", help="Who confirms (default: this operator)"),
    ttl: int = typer.Option(900, "--ttl", help="Seconds the confirmation stays valid (1..86400)"),
    out: str | None = typer.Option(None, "--out", help="Write it to this file"),
) -> None:
    """Issue a signed confirmation of a rotation awaiting one (to submit later with confirm-rotation
    --confirmation FILE). Confirms nothing by itself."""
    from datetime import timedelta

    from archive_kms.operations.rotation import issue_confirmation

    conf = issue_confirmation(_platform(), tenant, rotation, confirmed_by=by or _operator(), ttl=timedelta(seconds=ttl))
    data = conf.to_json()
    if out:
        Path(out).write_bytes(data + b"\n")
        typer.echo(f"confirmation written to {out} (valid until {conf.expires_at.isoformat(timespec='seconds')})")
    else:
        typer.echo(data.decode("ascii"))


@app.command("confirm-rotation")
@_errors_are_messages
def confirm_rotation_cmd(
    tenant: str,
    rotation: str | None = typer.Option(None, "--rotation", help="The rotation id to confirm (issues a confirmation)"),
    confirmation: str | None = typer.Option(
        None, "--confirmation", help="A confirmation issued earlier (archive-kms rotation confirmation --out FILE)"
    ),
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Confirm TENANT's pending key rotation: the confirmation (signed, single use, bound to the tenant, the
    rotation and its key version, expiring) is checked, the provider is read to verify the new version, and the
    waiting rotate run resumes (re-wrap under the new version, new index generation, jobs resumed). A refused
    confirmation changes nothing and is audited."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.operations.rotation import confirm_rotation, issue_confirmation

    tid = TenantId(tenant).value
    if (rotation is None) == (confirmation is None):
        raise ValidationError("give --rotation ID (confirm now) or --confirmation FILE (one issued earlier)")
    platform = _platform()
    if confirmation is not None:
        path = Path(confirmation)
        if not path.is_file():
            raise ValidationError(f"--confirmation {confirmation}: no such file")
        data = path.read_bytes().strip()
    else:
        assert rotation is not None
        data = issue_confirmation(platform, tid, rotation, confirmed_by=_operator()).to_json()
    if not wait:
        from archive_kms.migration.launch import confirm_and_resume

        _prefect_api()
        _submitted(confirm_and_resume(platform, _launcher(), tid, data, actor=_operator()), as_json)
        return
    done = confirm_rotation(platform, data, tenant_id=tid, actor=_operator())
    import archive_kms.flows.lifecycle  # noqa: F401 - registers the lifecycle flows with run_flow

    answer = _run_flow("rotate", tenant=tid, run_id=done.run_id, actor=_operator())
    _finish_lifecycle(answer, as_json)


# --- key lifecycle: BYOK re-upload (issue #14) -------------------------------------------------

byok_app = typer.Typer(
    no_args_is_help=True,
    help="BYOK: a tenant's first key before `enable --mode byok` (new-key, import-key), and re-uploads of new key "
    "material (import-params, upload); wrap is the customer's side for Key Vault.",
)
app.add_typer(byok_app, name="byok")


@byok_app.command("new-key")
@_errors_are_messages
def byok_new_key(
    tenant: str,
    out_dir: str = typer.Option(
        ...,
        "--out-dir",
        help="The import folder (made if missing; keep it for import-key): wrapping-key.pem, import-token.bin (AWS "
        "KMS) or kek-kid.txt (Key Vault), import-state.json",
    ),
    cloud: str | None = typer.Option(None, "--cloud", help="s3 or azure (default: where the tenant lives)"),
    spec: str = typer.Option(
        "RSA_4096", "--wrapping-key-spec", help="RSA_2048 | RSA_3072 | RSA_4096 (the wrapping / key exchange key)"
    ),
    as_json: bool = JSON,
) -> None:
    """The first BYOK key of TENANT (on the managed key, before `enable --mode byok`): make the key in the platform's
    key service of the tenant's cloud and publish what the customer needs, valid 24 hours. S3 tenants: an AWS KMS key
    with Origin EXTERNAL and its import parameters; the customer wraps 32 random bytes (RSA-OAEP-SHA-256) under
    wrapping-key.pem. Azure tenants: a key exchange key in the platform's vault; the customer makes a .byok file of a
    new RSA key (3072 bits or more). Run again on the same folder: the same parameters while valid, new ones after."""
    from archive_kms.operations.byok_first_key import new_key

    tid = _tenant_arg(tenant)
    folder = Path(out_dir)
    state, reused = new_key(_platform(), tid, folder, actor=_operator(), cloud=cloud, wrapping_key_spec=spec)
    view = state.view(folder) | {"reused": reused}
    azure = state.key_service == "azure-kv"
    what = (
        f"make a .byok file of a new RSA key (3072 bits or more) for key exchange key {state.kek_kid}"
        if azure
        else f"wrap 32 random bytes with {state.wrapping_algorithm}"
    )
    upload = "KEY.byok" if azure else "WRAPPED"
    _emit(
        as_json,
        view,
        f"tenant {tid}: {'the same ' if reused else ''}key {state.key_ref} awaits material; {what} under "
        f"{folder}/wrapping-key.pem before {state.expires_at.isoformat()}; then: archive-kms byok import-key {tid} "
        f"--out-dir {folder} --file {upload} --sha256 HEX",
    )


@byok_app.command("import-key")
@_errors_are_messages
def byok_import_key(
    tenant: str,
    file: str = typer.Option(..., "--file", help="The wrapped key material (AWS KMS) or the .byok file (Key Vault)"),
    sha256: str = typer.Option(..., "--sha256", help="The SHA-256 (hex) of that file, as the customer computed it"),
    out_dir: str = typer.Option(..., "--out-dir", help="The import folder `byok new-key` wrote for TENANT"),
    as_json: bool = JSON,
) -> None:
    """Import the customer's upload into the key `byok new-key` made for TENANT (the SHA-256 checked first: a mismatch
    changes nothing), prove the key (wrap/unwrap round trip) and print the key reference for
    `archive-kms enable TENANT --mode byok --key-ref REF`. A refusal changes nothing; upload again until the
    parameters expire."""
    from archive_kms.operations.byok_first_key import import_key

    tid = _tenant_arg(tenant)
    path = Path(file)
    if not path.is_file():
        raise ValidationError(f"--file {file}: no such file")
    done = import_key(_platform(), tid, Path(out_dir), path.read_bytes(), sha256, actor=_operator())
    view = done.to_dict()
    _emit(
        as_json,
        view,
        f"tenant {tid}: key {done.key_ref} {'was imported already' if done.already else 'imported'} "
        f"(sha256 {done.sha256}) and proven (wrap/unwrap); next: {view['enable']}",
    )


@byok_app.command("import-params")
@_errors_are_messages
def byok_import_params(
    tenant: str,
    spec: str = typer.Option(
        "RSA_4096", "--wrapping-key-spec", help="RSA_2048 | RSA_3072 | RSA_4096 (the wrapping / key exchange key)"
    ),
    out_dir: str | None = typer.Option(
        None,
        "--out-dir",
        help="Write what the customer needs here: wrapping-key.pem, and import-token.bin (AWS KMS) or kek-kid.txt "
        "(Key Vault)",
    ),
    as_json: bool = JSON,
) -> None:
    """Publish the wrapping public key for a re-upload of TENANT's key material (BYOK tenants; the tenant's key
    service decides). AWS KMS: an import token too; the customer wraps 32 random bytes (RSA-OAEP-SHA-256). Key Vault:
    a key exchange key (kid); the customer makes a .byok file of a new RSA key (CKM_RSA_AES_KEY_WRAP). Either way
    they send the file and its SHA-256."""
    import base64

    from archive_kms.domain.tenants import TenantId
    from archive_kms.migration.byok_upload import AZURE_KV, import_parameters

    view = import_parameters(_platform(), TenantId(tenant).value, actor=_operator(), wrapping_key_spec=spec)
    azure = view["key_service"] == AZURE_KV
    if out_dir:
        folder = Path(out_dir)
        if not folder.is_dir():
            raise ValidationError(f"--out-dir {out_dir}: no such folder")
        (folder / "wrapping-key.pem").write_text(view["public_key_pem"])
        if azure:
            (folder / "kek-kid.txt").write_text(view["kek_kid"] + "\n")
        else:
            (folder / "import-token.bin").write_bytes(base64.b64decode(view["import_token"]))
    what = (
        f"make a .byok file of a new RSA key (3072 bits or more) for key exchange key {view['kek_kid']}"
        if azure
        else f"wrap 32 random bytes with {view['wrapping_algorithm']}"
    )
    upload = "KEY.byok" if azure else "WRAPPED"
    _emit(
        as_json,
        view,
        f"tenant {view['tenant']}: new key {view['key_ref']} awaits material (rotation {view['rotation_id']}); "
        f"{what} under the public key"
        + (f" in {out_dir}/wrapping-key.pem" if out_dir else "")
        + f", before {view['expires_at']}; then: archive-kms byok upload {view['tenant']} --file {upload} --sha256 HEX",
    )


@byok_app.command("wrap")
@_errors_are_messages
def byok_wrap(
    key: str = typer.Option(..., "--key", help="The new RSA private key to send (PEM or DER, PKCS#8 or PKCS#1)"),
    kek: str = typer.Option(
        ..., "--kek", help="wrapping-key.pem from `byok new-key` or `byok import-params` (the key exchange key)"
    ),
    kek_kid: str = typer.Option(..., "--kek-kid", help="The key exchange key's kid (kek-kid.txt)"),
    out: str = typer.Option(..., "--out", help="Where to write the .byok file"),
    as_json: bool = JSON,
) -> None:
    """THE CUSTOMER'S SIDE (Key Vault BYOK; for tests and demos - a customer normally uses their HSM vendor's tool):
    make the .byok key transfer blob of KEY for the key exchange key, and print its SHA-256 to send with it."""
    from archive_kms.keys.azure_byok import customer_transfer_blob
    from archive_kms.keys.byok import sha256_hex

    key_path, kek_path, out_path = Path(key), Path(kek), Path(out)
    for option, path in (("--key", key_path), ("--kek", kek_path)):
        if not path.is_file():
            raise ValidationError(f"{option} {path}: no such file")
    if out_path.exists():
        raise ValidationError(f"--out {out}: the file exists; pick a new name")
    blob = customer_transfer_blob(kek_path.read_text(), _kek_id_text(kek_kid), _pkcs8_der(key_path.read_bytes()))
    out_path.write_bytes(blob)
    digest = sha256_hex(blob)
    _emit(as_json, {"file": str(out_path), "sha256": digest}, f"{out_path}: sha256 {digest}")


def _kek_id_text(value: str) -> str:
    kid = value.strip()
    if not kid.startswith("https://") or "/keys/" not in kid:
        raise ValidationError(f"--kek-kid {value[:80]!r}: expected https://VAULT/keys/NAME/VERSION (kek-kid.txt)")
    return kid


def _pkcs8_der(data: bytes) -> bytes:
    from archive_kms.crypto.rsa_aes_key_wrap import rsa_private_key_pkcs8_der

    try:
        return rsa_private_key_pkcs8_der(data)
    except ValidationError as exc:
        raise ValidationError(f"--key: {exc}") from None


@byok_app.command("upload")
@_errors_are_messages
def byok_upload_cmd(
    tenant: str,
    file: str = typer.Option(..., "--file", help="The wrapped key material (AWS KMS) or the .byok file (Key Vault)"),
    sha256: str = typer.Option(..., "--sha256", help="The SHA-256 (hex) of that file, as the customer computed it"),
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Import the customer's new wrapped key material (its SHA-256 checked first: a mismatch changes nothing) and
    move TENANT onto it: L2 re-wrapped, new index generation, the old key retired after the canary (AWS KMS: its
    material deleted; Key Vault: the key soft-deleted)."""
    from archive_kms.domain.tenants import TenantId
    from archive_kms.migration.byok_upload import upload

    tid = TenantId(tenant).value
    path = Path(file)
    if not path.is_file():
        raise ValidationError(f"--file {file}: no such file")
    platform = _platform()
    _, run = upload(platform, tid, path.read_bytes(), sha256, actor=_operator())
    if not wait:
        from archive_kms.migration.launch import submit_run

        _prefect_api()
        _submitted(
            submit_run(platform, _launcher(), run, {"tenant": tid, "actor": _operator()}, actor=_operator()), as_json
        )
        return
    import archive_kms.flows.lifecycle  # noqa: F401 - registers the lifecycle flows with run_flow

    _finish_lifecycle(_run_flow("rotate", tenant=tid, run_id=run.run_id, actor=_operator()), as_json)
