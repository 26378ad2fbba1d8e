"""The state schema's version and its upgrades (Alembic, ADR 0011).

A database is in one of these states (:func:`status`):

* **empty** - no tables: ``open_state`` creates the schema by running every revision.
* **before Alembic** - made by a release before Alembic: the tables and a
  ``schema_version`` row of 1, no ``alembic_version``. That is exactly revision ``0001``
  (the baseline), so it is *stamped* 0001 (no DDL) and then treated like any other.
* **at revision R** - ``alembic_version`` says R: at head (open it), behind head
  (``archive-kms db upgrade``, or ``open_state(..., upgrade=True)``), or unknown to this
  code (written by a newer release: upgrade the code).

The ``schema_version`` table stays as the marker older releases read: a revision that
those releases must not open also raises it (``state.schema.SCHEMA_VERSION``), and a
marker above this code's is refused.

Upgrades run in one transaction on one connection, under the lock every writer takes
first (``BEGIN IMMEDIATE`` on SQLite, an advisory transaction lock on PostgreSQL), so
concurrent openers and upgraders take turns and the loser finds the work done. PostgreSQL
and SQLite both run DDL transactionally: a failed upgrade leaves the database as it was.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, inspect, select, text

from archive_kms.errors import ConfigurationError
from archive_kms.state.schema import SCHEMA_VERSION, schema_version
from archive_kms.state.sql.database import SqlDatabase

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

__all__ = ["BASELINE", "SchemaStatus", "grant_runtime", "head", "prepare", "runtime_grants", "status", "upgrade"]

BASELINE = "0001"  # the schema of the releases before Alembic (schema_version 1)
SCRIPTS = "archive_kms.state:migrations"  # inside the package: an installed wheel can upgrade
_LOCK_KEY = 0x41_4B_4D_53  # "AKMS": the PostgreSQL advisory lock schema changes take


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands. ``revision``: its Alembic revision (None: empty,
    or from before Alembic); ``legacy_version``: its ``schema_version`` marker."""

    revision: str | None
    head: str
    legacy_version: int | None
    empty: bool

    @property
    def at_head(self) -> bool:
        return self.revision == self.head

    @property
    def known(self) -> bool:
        """Whether this code knows the revision (a newer release's is unknown)."""
        return self.revision is None or self.revision in _revisions()

    def describe(self) -> str:
        if self.empty:
            return "empty (no tables)"
        if self.revision is None and self.legacy_version != 1:  # what `upgrade` refuses (_refuse_unknown)
            what = "no schema_version row" if self.legacy_version is None else f"schema version {self.legacy_version}"
            return f"not an archive_kms state database, or a damaged one (tables, but {what} and no Alembic revision)"
        if self.revision is None:
            return f"from before Alembic (schema version {self.legacy_version}; baseline {BASELINE})"
        if self.at_head:
            return f"revision {self.revision} (head)"
        if not self.known:
            return f"revision {self.revision} (unknown to this code: newer than {self.head})"
        return f"revision {self.revision} (head is {self.head})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "head": self.head,
            "at_head": self.at_head,
            "schema_version": self.legacy_version,
            "empty": self.empty,
            "state": self.describe(),
        }


def _config(connection: Connection | None = None, runtime_role: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPTS)
    if connection is not None:
        cfg.attributes["connection"] = connection
    if runtime_role:
        cfg.attributes["runtime_role"] = runtime_role  # revision 0007 grants it what it needs
    return cfg


# --- the runtime role (PostgreSQL; docs/deployment.md "Database roles") -----------------------
# The migration role owns the schema and runs the revisions; the workers connect as the
# runtime role, which may read and write the tables but not change their definitions, drop
# the audit log's triggers (only an owner can), or rewrite what is append-only.

_APPEND_ONLY = {  # table -> what the runtime role may not do on it
    "audit_log": "UPDATE, DELETE, TRUNCATE",
    "audit_heads": "DELETE, TRUNCATE",
    "search_generations": "UPDATE, DELETE, TRUNCATE",
    "alembic_version": "INSERT, UPDATE, DELETE, TRUNCATE",
    "schema_version": "INSERT, UPDATE, DELETE, TRUNCATE",
}


def runtime_grants(conn: Connection, role: str) -> list[str]:
    """Grant ``role`` what the workers need on the current schema's tables (and on the
    tables later revisions create), minus the rights that would let it rewrite history;
    returns the statements run. ``ConfigurationError`` if the role does not exist or this
    is not PostgreSQL."""
    if conn.dialect.name != "postgresql":
        raise ConfigurationError("a runtime role is a PostgreSQL deployment's (SQLite has no roles)")
    if not conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar():
        raise ConfigurationError(f"runtime role {role!r} does not exist: create it first (docs/deployment.md)")
    schema = conn.execute(select(func.current_schema())).scalar_one()
    quote = conn.dialect.identifier_preparer.quote
    r, sch = quote(role), quote(schema)
    present = set(inspect(conn).get_table_names())
    statements = [
        f"GRANT USAGE ON SCHEMA {sch} TO {r}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {sch} TO {r}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {sch} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
        *(f"REVOKE {rights} ON {sch}.{quote(t)} FROM {r}" for t, rights in _APPEND_ONLY.items() if t in present),
    ]
    for stmt in statements:
        conn.execute(text(stmt))
    return statements


def grant_runtime(db: SqlDatabase, role: str) -> list[str]:
    """``runtime_grants`` in one transaction under the schema lock (``archive-kms db grant``)."""
    with db.tx("grant runtime role") as conn:
        _lock(db, conn)
        return runtime_grants(conn, role)


# Alembic is imported only to change a schema (or to read an unusual one): a process that
# opens a database already at head never loads it (~11 MiB of RSS and ~0.13 s per process;
# docs/benchmarks.md, session 5).
_VERSIONS = Path(__file__).resolve().parent.parent / "migrations" / "versions"


@functools.cache
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())  # the scripts ship with the code: read once


def _constant(node: ast.stmt, name: str) -> tuple[bool, object]:
    """``(True, value)`` when ``node`` assigns a constant to ``name`` at module level."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target, value = node.targets[0], node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target, value = node.target, node.value
    else:
        return False, None
    if isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Constant):
        return True, value.value
    return False, None


@functools.cache
def _linear_chain() -> tuple[frozenset[str], str] | None:
    """The revisions and the head, read from each script's ``revision`` and
    ``down_revision`` constants without importing Alembic; ``None`` unless the scripts form
    one linear chain of plain constants (branches, merges, computed ids: Alembic decides).
    A unit test holds this to Alembic's own reading."""
    down: dict[str, str | None] = {}
    try:
        paths = sorted(p for p in _VERSIONS.glob("*.py") if p.name != "__init__.py")
        for path in paths:
            found: dict[str, object] = {}
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                for name in ("revision", "down_revision"):
                    ok, value = _constant(node, name)
                    if ok:
                        found[name] = value
            rev, parent = found.get("revision"), found.get("down_revision", ...)
            if not isinstance(rev, str) or not (parent is None or isinstance(parent, str)) or rev in down:
                return None
            down[rev] = parent
    # SystemError: CPython 3.11's AST constructor can miscount its recursion depth when another
    # thread parses at the same time (python/cpython#106905); Alembic then reads the chain.
    except (OSError, SyntaxError, UnicodeDecodeError, SystemError):
        return None
    parents = [p for p in down.values() if p is not None]
    heads = set(down) - set(parents)
    roots = [r for r, p in down.items() if p is None]
    if len(heads) != 1 or len(roots) != 1 or len(set(parents)) != len(parents) or not set(parents) <= set(down):
        return None
    return frozenset(down), heads.pop()


@functools.cache
def _revisions() -> frozenset[str]:
    chain = _linear_chain()
    if chain is not None:
        return chain[0]
    return frozenset(s.revision for s in _scripts().walk_revisions())


def head() -> str:
    """The newest revision this code knows."""
    chain = _linear_chain()
    if chain is not None:
        return chain[1]
    found = _scripts().get_current_head()
    assert found is not None, "no Alembic revisions shipped"
    return found


def _current_revision(conn: Connection) -> str | None:
    """``alembic_version``'s one row (what Alembic's ``get_current_revision`` reads); more
    than one row (branches) goes to Alembic, which refuses it as before."""
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) <= 1:
        return str(rows[0]) if rows else None
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _read(conn: Connection) -> SchemaStatus:
    tables = set(inspect(conn).get_table_names())
    revision = _current_revision(conn) if "alembic_version" in tables else None
    legacy = conn.execute(select(func.max(schema_version.c.version))).scalar() if "schema_version" in tables else None
    return SchemaStatus(revision, head(), legacy, empty=not (tables - {"alembic_version"}))


def status(db: SqlDatabase) -> SchemaStatus:
    """The database's schema state (reads only)."""
    with db.tx("read schema version", write=False) as conn:
        return _read(conn)


def _lock(db: SqlDatabase, conn: Connection) -> None:
    if db.pg:  # SQLite: the write transaction's BEGIN IMMEDIATE already serialises
        conn.execute(select(func.pg_advisory_xact_lock(_LOCK_KEY)))


def _refuse_unknown(db: SqlDatabase, found: SchemaStatus) -> None:
    if found.revision is not None and not found.known:
        raise ConfigurationError(
            f"state store {db.display} is at schema revision {found.revision}, which this code does not know "
            f"(its newest is {found.head}): upgrade the code",
            resource=db.display,
        )
    if found.legacy_version is not None and found.legacy_version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"state store {db.display} has schema version {found.legacy_version}, this code needs "
            f"{SCHEMA_VERSION}: upgrade the code",
            resource=db.display,
        )
    if not found.empty and found.revision is None and found.legacy_version != 1:
        what = "no schema_version row" if found.legacy_version is None else f"schema version {found.legacy_version}"
        raise ConfigurationError(
            f"state store {db.display} has tables but {what} and no Alembic revision: not an archive_kms "
            "state database, or a damaged one; point state_url elsewhere or restore it",
            resource=db.display,
        )


def _upgrade_in(db: SqlDatabase, conn: Connection, target: str, runtime_role: str | None = None) -> None:
    from alembic import command

    cfg = _config(conn, runtime_role)
    found = _read(conn)  # again, under the lock: another process may have done it
    _refuse_unknown(db, found)
    if found.revision is None and not found.empty:
        command.stamp(cfg, BASELINE)  # a pre-Alembic database is the baseline, as it stands
    command.upgrade(cfg, target)


def upgrade(
    db: SqlDatabase, target: str = "head", *, runtime_role: str | None = None
) -> tuple[SchemaStatus, SchemaStatus]:
    """Bring the schema to ``target`` (default: head) in one transaction; returns the
    status before and after. Stamps a pre-Alembic database at the baseline first.
    ``runtime_role`` (PostgreSQL): the role the workers connect as, granted what they need
    by revision 0007 and after every upgrade (``runtime_grants``). ``ConfigurationError``
    for a database this code cannot upgrade (a newer release's, or not a state database);
    the database is then unchanged."""
    before = status(db)
    _refuse_unknown(db, before)
    if target not in ("head", *_revisions()):
        raise ConfigurationError(f"unknown schema revision {target!r}: use head or one of {sorted(_revisions())}")
    with db.tx("upgrade schema") as conn:
        _lock(db, conn)
        _upgrade_in(db, conn, target, runtime_role)
        if runtime_role:  # tables of revisions applied before the role was known get it too
            runtime_grants(conn, runtime_role)
    return before, status(db)


def prepare(db: SqlDatabase, *, upgrade: bool = False) -> SchemaStatus:
    """What ``open_state`` does: create the schema of an empty database, stamp a
    pre-Alembic one, upgrade one behind head only if ``upgrade`` (else
    ``ConfigurationError`` naming ``archive-kms db upgrade``), refuse a newer release's.
    Cheap when the database is at head: one read transaction."""
    found = status(db)
    if found.at_head and found.legacy_version == SCHEMA_VERSION:
        return found
    _refuse_unknown(db, found)
    # A pre-Alembic database is at the baseline: behind as soon as a revision follows it.
    behind = not found.empty and (found.revision or BASELINE) != found.head
    if behind and not upgrade:
        raise ConfigurationError(
            f"state store {db.display} is at schema {found.describe()}: run `archive-kms db upgrade` "
            "(back the database up first)",
            resource=db.display,
        )
    with db.tx("create or upgrade schema") as conn:
        _lock(db, conn)
        _upgrade_in(db, conn, "head")
    return status(db)
