"""archive-kms: the operator and support-engineer command line.

Every command has human output by default and ``--json`` for scripts.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import typer

from archive_kms import __version__
from archive_kms.config import PROJECT_ROOT

if TYPE_CHECKING:
    from archive_kms.operations.platform import Platform
    from archive_kms.state.port import MigrationRun, RunRepo, StateStore

app = typer.Typer(no_args_is_help=True, help="archive_kms: tenant archives under the tenant's own key.")
stack_app = typer.Typer(
    no_args_is_help=True, help="The local cloud: LocalStack, Azurite, Elasticsearch, Key Vault, KMIP."
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
import uuid as _uuid  # noqa: E402
from functools import wraps  # noqa: E402
from pathlib import Path  # noqa: E402

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
            if type(e).__module__.startswith(("click", "typer")) or _os.environ.get("ARCHIVE_KMS_DEBUG") == "1":
                raise  # usage errors: typer prints them (exit 2)
            typer.echo(
                f"error: internal error {type(e).__name__}: {_one_line(str(e))[:300]} (a bug; rerun with "
                "ARCHIVE_KMS_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            raise typer.Exit(3) from None

    return wrapper


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
    from archive_kms.operations.archive import SUPERSEDED, JobSpec, load_jsonl, submit_job
    from archive_kms.operations.job_input import check_job_id, check_synthetic

    _tenant_arg(tenant)
    if (jsonl is None) == (generate == 0):
        raise ValidationError("give exactly one of --jsonl FILE or --generate N")
    if attachments_root is not None and jsonl is None:
        raise ValidationError("--attachments-root goes with --jsonl")
    jid = check_job_id(job_id) if job_id is not None else f"job-{_uuid.uuid4().hex[:16]}"
    if jsonl is not None:
        spec = load_jsonl(jsonl, job_id=jid, tenant_id=tenant, attachments_root=attachments_root)
    else:
        check_synthetic(generate, seed, offset)
        spec = JobSpec(jid, tenant, "synthetic", synthetic={"count": generate, "seed": seed, "offset": offset})
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
    rows = [
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
    from archive_kms.state.anchors import verify_with_anchor

    p = _platform()
    v, anchor = verify_with_anchor(p.state, p.anchors, tenant_id=tenant)
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
    """Verify the whole log, then publish its head to the anchor bucket (S3 Object Lock,
    compliance mode), where nobody can delete it before its retention ends."""
    from archive_kms.state.anchors import publish_anchor

    p = _platform()
    if p.anchors is None:
        raise ConfigurationError("no anchor store: set ARCHIVE_KMS_AUDIT_ANCHOR_BUCKET (a bucket with Object Lock)")
    anchor, where = publish_anchor(p.state, p.anchors)
    _emit(
        as_json,
        {"count": anchor.count, "head_hash": anchor.head_hash, "where": where},
        f"audit head anchored: record {anchor.count} -> {where}",
    )


@audit_app.command("export")
@_errors_are_messages
def audit_export(tenant: str | None = None) -> None:
    """Export the audit log as JSONL (verifiable by the customer)."""
    for rec in _platform().state.export_audit(tenant):
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
    from archive_kms.migration import STEPS

    if from_step not in STEPS:
        raise ValidationError(f"--from {from_step!r}: use one of {', '.join(STEPS)}")
    _check_task_runner(task_runner)
    _require_run(_state_only().state, run_id)
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
    as_json: bool = JSON,
) -> None:
    """Upgrade the state database's schema to this code's (one transaction; stamps a database from before Alembic)."""
    from archive_kms.state.sql import migrate

    db = _state_database(url)
    try:
        before, after = migrate.upgrade(db, to)
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
    port: int | None = typer.Option(None, "--port", help="Listen port (default: console_port, 8700)"),
) -> None:
    """Serve the console API and page (http://HOST:PORT/; the OpenAPI document at /api/openapi.json)."""
    import uvicorn

    from archive_kms.api.app import console_from_settings, create_app
    from archive_kms.config import Settings

    s = Settings()
    _prefect_api()
    application = create_app(console_from_settings(s))
    where = f"http://{host or s.console_host}:{port or s.console_port}/"
    typer.echo(f"console at {where} (sign in with a token from `archive-kms console token`)", err=True)
    uvicorn.run(application, host=host or s.console_host, port=port or s.console_port, log_level="warning")


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
