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
