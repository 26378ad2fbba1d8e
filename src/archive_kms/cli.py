"""archive-kms: the operator and support-engineer command line.

Every command has human output by default and ``--json`` for scripts.
"""

from __future__ import annotations

import subprocess
import sys

import typer

from archive_kms import __version__
from archive_kms.config import PROJECT_ROOT

app = typer.Typer(no_args_is_help=True, help="archive_kms: tenant archives under the tenant's own key.")
stack_app = typer.Typer(no_args_is_help=True, help="The local cloud: LocalStack, Azurite, Elasticsearch, Key Vault, KMIP.")
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


ONLY = typer.Option(None, "--only", help="Comma-separated subset: localstack,azurite,elasticsearch,keyvault,kmip")
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

from archive_kms.errors import ArchiveKmsError  # noqa: E402

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: create and list.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log: verify and export.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(audit_app, name="audit")


def _platform():
    from archive_kms.config import Settings
    from archive_kms.wiring import build_platform

    return build_platform(Settings())  # read now: environment and endpoints file of this invocation


def _emit(as_json: bool, data, human: str) -> None:
    typer.echo(_json.dumps(data, indent=2, default=str) if as_json else human)


def _errors_are_messages(fn):
    """Our errors become one clear line and exit code 2; never a traceback with internals."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ArchiveKmsError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@tenant_app.command("create")
@_errors_are_messages
def tenant_create(tenant: str, cloud: str = typer.Option("s3", help="s3 or azure"),
                  key_ref: str | None = typer.Option(None, help="L1 key reference (default: managed://platform)"),
                  as_json: bool = JSON) -> None:
    """Create a tenant on shared storage with its keychain and search index."""
    from archive_kms.operations.tenants import create_tenant

    made = create_tenant(_platform(), tenant, cloud=cloud, key_ref=key_ref)
    _emit(as_json, made.__dict__, f"tenant {made.tenant_id} created: {made.location}, key {made.key_ref}, "
                                  f"index {made.index}")


@tenant_app.command("list")
@_errors_are_messages
def tenant_list(as_json: bool = JSON) -> None:
    """List tenants with their location, key mode and gate."""
    p = _platform()
    rows = []
    for t in p.state.list_tenants():
        rows.append({"tenant": t.tenant_id, "key_mode": t.key_mode.value, "key_ref": t.key_ref,
                     "location": p.location_of(t.tenant_id).uri, "gate": p.state.gate(t.tenant_id).state.value,
                     "revoked": t.revoked})
    _emit(as_json, rows, "\n".join(f"{r['tenant']:<20} {r['key_mode']:<8} {r['gate']:<9} {r['location']}"
                                   for r in rows) or "no tenants")


@app.command("archive")
@_errors_are_messages
def archive_cmd(tenant: str,
                jsonl: Path | None = typer.Option(None, help="Records, one JSON object per line"),
                generate: int = typer.Option(0, help="Generate this many synthetic records instead"),
                seed: int = typer.Option(0, help="Generator seed"),
                offset: int = typer.Option(0, help="Skip this many generated records (for later batches)"),
                job_id: str | None = typer.Option(None, help="Idempotency id (default: a new one)"),
                as_json: bool = JSON) -> None:
    """Run an archive job for TENANT (deferred while the tenant is paused)."""
    from archive_kms.operations.archive import JobSpec, load_jsonl, submit_job

    if (jsonl is None) == (generate <= 0):
        raise typer.BadParameter("give exactly one of --jsonl FILE or --generate N")
    jid = job_id or f"job-{_uuid.uuid4().hex[:16]}"
    spec = (load_jsonl(jsonl, job_id=jid, tenant_id=tenant) if jsonl else
            JobSpec(jid, tenant, "synthetic", synthetic={"count": generate, "seed": seed, "offset": offset}))
    p = _platform()
    out = submit_job(p.state, spec, p.open_archive)
    _emit(as_json, out.__dict__, f"job {out.job_id}: {out.decision}; {out.records} records, {out.attachments} "
                                 f"attachments, {out.objects_written} objects written, "
                                 f"{out.objects_already_there} already there, {out.indexed} indexed")


@app.command("search")
@_errors_are_messages
def search_cmd(tenant: str, words: list[str] = typer.Argument(None),
               field: list[str] = typer.Option(None, "--field", help="FIELD=VALUE exact filter (repeatable)"),
               object_type: str | None = typer.Option(None, "--type"), limit: int = 20,
               as_json: bool = JSON) -> None:
    """Search TENANT's archive by words and field filters; results are decrypted."""
    from archive_kms.search import Query

    filters = {}
    for f in field or ():
        k, sep, v = f.partition("=")
        if not sep:
            raise typer.BadParameter(f"--field {f!r}: use FIELD=VALUE")
        filters[k] = v
    result = _platform().open_archive(tenant).search(
        Query(text=" ".join(words or ()), filters=filters, object_type=object_type, limit=limit))
    rows = [{"object_type": h.object_type, "record_id": h.record_id, "workspace": h.workspace_id,
             "fields": dict(h.fields)} for h in result]
    human = "\n".join(f"{r['object_type']:<14} {r['record_id']}  {r['fields'].get('Name', '')}" for r in rows)
    _emit(as_json, {"total": result.total, "hits": rows, "failures": [f.__dict__ for f in result.failures]},
          f"{human}\n{result.total} match(es)" if rows else "no matches")


@app.command("read")
@_errors_are_messages
def read_cmd(tenant: str, record: str | None = typer.Option(None, help="TYPE/RECORD_ID"),
             attachment: str | None = typer.Option(None, help="ATTACHMENT_ID"),
             workspace: str = "default", out: Path | None = typer.Option(None, help="Write attachment here"),
             as_json: bool = JSON) -> None:
    """Read one record or attachment, decrypted and authenticated."""
    archive = _platform().open_archive(tenant)
    if (record is None) == (attachment is None):
        raise typer.BadParameter("give exactly one of --record TYPE/ID or --attachment ID")
    if record:
        otype, sep, rid = record.partition("/")
        if not sep:
            raise typer.BadParameter("--record must be TYPE/RECORD_ID")
        rec = archive.read_record(workspace, otype, rid)
        _emit(as_json, _json.loads(rec.to_json()), _json.dumps(_json.loads(rec.to_json()), indent=2))
        return
    import hashlib

    h, n = hashlib.sha256(), 0
    sink = out.open("wb") if out else None
    try:
        for chunk in archive.read_attachment(workspace, attachment):
            h.update(chunk)
            n += len(chunk)
            if sink:
                sink.write(chunk)
    finally:
        if sink:
            sink.close()
    _emit(as_json, {"attachment": attachment, "bytes": n, "sha256": h.hexdigest(), "out": str(out) if out else None},
          f"attachment {attachment}: {n} bytes, sha256 {h.hexdigest()}" + (f" -> {out}" if out else ""))


@audit_app.command("verify")
@_errors_are_messages
def audit_verify(tenant: str | None = None, as_json: bool = JSON) -> None:
    """Verify the audit log's hash chain; exit 1 if any record was edited, deleted or reordered."""
    v = _platform().state.verify_audit(tenant_id=tenant)
    _emit(as_json, v.__dict__, "audit log verifies" if v.ok else f"AUDIT LOG BROKEN at seq {v.first_bad_seq}: {v.reason}")
    if not v.ok:
        raise typer.Exit(1)


@audit_app.command("export")
@_errors_are_messages
def audit_export(tenant: str | None = None) -> None:
    """Export the audit log as JSONL (verifiable by the customer)."""
    for rec in _platform().state.export_audit(tenant):
        typer.echo(_json.dumps(rec, default=str, sort_keys=True))
