#!/usr/bin/env python3
"""Entrypoint of the archive_kms image (Dockerfile): turns the platform's injected
secrets into the settings the code reads, then runs the command.

    archive-kms-entrypoint worker | prefect-server | deploy | keyvault-emulator | health | CMD...

* ``ARCHIVE_KMS_DB_HOST``/``_PORT``/``_NAME``/``_USER``/``_PASSWORD`` (ECS injects user and
  password from the RDS-managed secret) become ``ARCHIVE_KMS_STATE_URL``
  (``postgresql+psycopg://...?sslmode=require``) unless it is set; the Prefect server gets
  ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` for database ``prefect`` on the same server
  (created on first start).
* ``ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM`` (the signing key from Secrets Manager) is
  written to an owner-only file, ``ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH`` points at it,
  and the variable is removed from the environment the command sees.

Standard library only (plus psycopg, which the image installs, to create the Prefect
database). Exit code 2 with one line naming the setting for incomplete configuration.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import quote

WORK_POOL = "archive-kms"
DB_PARTS = ("ARCHIVE_KMS_DB_HOST", "ARCHIVE_KMS_DB_USER", "ARCHIVE_KMS_DB_PASSWORD")


class EntrypointError(Exception):
    pass


def database_url(env: Mapping[str, str], *, driver: str, database: str | None = None) -> str | None:
    """The SQLAlchemy URL of the configured PostgreSQL server, or None if none is configured."""
    present = [k for k in DB_PARTS if env.get(k)]
    if not present:
        return None
    if len(present) != len(DB_PARTS):
        missing = ", ".join(k for k in DB_PARTS if not env.get(k))
        raise EntrypointError(f"incomplete database settings: set {missing} (or ARCHIVE_KMS_STATE_URL)")
    port = env.get("ARCHIVE_KMS_DB_PORT", "5432")
    if not port.isdigit():
        raise EntrypointError(f"ARCHIVE_KMS_DB_PORT must be a port number, got {port[:20]!r}")
    name = database or env.get("ARCHIVE_KMS_DB_NAME", "archive_kms")
    user = quote(env["ARCHIVE_KMS_DB_USER"], safe="")
    password = quote(env["ARCHIVE_KMS_DB_PASSWORD"], safe="")
    sslmode = env.get("ARCHIVE_KMS_DB_SSLMODE", "require")
    return f"postgresql+{driver}://{user}:{password}@{env['ARCHIVE_KMS_DB_HOST']}:{port}/{name}?sslmode={sslmode}"


def write_signing_key(env: MutableMapping[str, str], directory: Path) -> None:
    """Move the PEM from the environment into an owner-only file (0600) under ``directory``."""
    pem = env.pop("ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM", None)
    if pem is None:
        return
    if "PRIVATE KEY-----" not in pem:
        raise EntrypointError("ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PEM is not a PEM private key (PKCS#8)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix="signing-", suffix=".pem", dir=directory)  # mode 0600
    with os.fdopen(fd, "w") as out:
        out.write(pem if pem.endswith("\n") else pem + "\n")
    env["ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH"] = name


def prepare(env: MutableMapping[str, str], runtime_dir: Path) -> None:
    if not env.get("ARCHIVE_KMS_STATE_URL"):
        url = database_url(env, driver="psycopg")
        if url:
            env["ARCHIVE_KMS_STATE_URL"] = url
    if env.get("ARCHIVE_KMS_STATE_URL"):  # the password is inside the URL now: no second copy around
        env.pop("ARCHIVE_KMS_DB_PASSWORD", None)
    write_signing_key(env, runtime_dir)


def command_for(args: list[str], env: MutableMapping[str, str]) -> list[str]:
    """The process to exec for the image's command line."""
    what, rest = (args[0], args[1:]) if args else ("worker", [])
    if what == "worker":
        return [
            "prefect",
            "worker",
            "start",
            "--pool",
            env.get("ARCHIVE_KMS_WORK_POOL", WORK_POOL),
            "--type",
            "process",
            *rest,
        ]
    if what == "deploy":
        return ["prefect", "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml", "--all", *rest]
    if what == "prefect-server":
        return ["prefect", "server", "start", "--host", "0.0.0.0", "--port", env.get("PREFECT_PORT", "4200"), *rest]
    if what == "keyvault-emulator":
        return [
            sys.executable,
            "/app/localstack/keyvault_emulator.py",
            "--state-dir",
            env.get("KEYVAULT_STATE_DIR", "/var/lib/keyvault"),
            *rest,
        ]
    return [what, *rest]


def prefect_server_database(env: MutableMapping[str, str]) -> None:
    """Point the Prefect server at database ``prefect`` of the configured server, creating it once."""
    if env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return
    admin = database_url(env, driver="psycopg", database=env.get("ARCHIVE_KMS_DB_NAME", "archive_kms"))
    if admin is None:
        return  # Prefect's own SQLite default
    import psycopg

    with psycopg.connect(admin.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'prefect'").fetchone() is None:
            conn.execute("CREATE DATABASE prefect")
    url = database_url(env, driver="asyncpg", database="prefect") or ""
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url.split("?")[0]  # asyncpg takes no sslmode
    if env.get("ARCHIVE_KMS_DB_SSLMODE", "require") != "disable":
        env.setdefault("PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_TLS_ENABLED", "true")


def health(env: Mapping[str, str]) -> int:
    """0 if the Prefect API this container uses (or serves) answers /health."""
    url = env.get("PREFECT_API_URL") or f"http://127.0.0.1:{env.get('PREFECT_PORT', '4200')}/api"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    if args[:1] == ["health"]:
        return health(env)
    try:
        if args[:1] == ["prefect-server"]:
            prefect_server_database(env)
        prepare(env, Path(env.get("ARCHIVE_KMS_RUNTIME_DIR", "/tmp/archive-kms")))
        cmd = command_for(args, env)
    except EntrypointError as e:
        print(f"archive-kms-entrypoint: {e}", file=sys.stderr)
        return 2
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
