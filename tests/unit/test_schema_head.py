"""The schema head read without Alembic (state/sql/migrate.py) is Alembic's own, and a
process that opens a database already at head never imports Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archive_kms.state.sql import migrate


def test_the_chain_read_from_the_scripts_is_alembics() -> None:
    chain = migrate._linear_chain()
    assert chain is not None, "the shipped revisions are one linear chain"
    revisions, head = chain
    scripts = migrate._scripts()
    assert head == scripts.get_current_head()
    assert revisions == frozenset(s.revision for s in scripts.walk_revisions())


def _write(d: Path, name: str, revision: str, down: str | None, annotated: bool = False) -> None:
    ann = ": str | None" if annotated else ""
    (d / name).write_text(f'"""rev"""\nrevision{ann} = {revision!r}\ndown_revision{ann} = {down!r}\n')


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ([("a.py", "1", None), ("b.py", "2", "1"), ("c.py", "3", "2")], (frozenset({"1", "2", "3"}), "3")),
        ([("a.py", "1", None), ("b.py", "2", "1"), ("c.py", "3", "1")], None),  # a branch: two heads
        ([("a.py", "1", None), ("b.py", "2", "9")], None),  # a parent that does not exist
        ([("a.py", "1", None), ("b.py", "1", None)], None),  # the same revision twice
        ([("a.py", "1", None), ("b.py", "2", None)], None),  # two roots
    ],
)
def test_anything_but_one_linear_chain_is_left_to_alembic(tmp_path, monkeypatch, files, expected) -> None:
    for i, (name, rev, down) in enumerate(files):
        _write(tmp_path, name, rev, down, annotated=bool(i % 2))
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(migrate, "_VERSIONS", tmp_path)
    migrate._linear_chain.cache_clear()
    try:
        assert migrate._linear_chain() == expected
    finally:
        migrate._linear_chain.cache_clear()


def test_a_computed_revision_id_is_left_to_alembic(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.py").write_text('revision = "1"\ndown_revision = None\n')
    (tmp_path / "b.py").write_text('revision = "2"\ndown_revision = str(1)\n')
    monkeypatch.setattr(migrate, "_VERSIONS", tmp_path)
    migrate._linear_chain.cache_clear()
    try:
        assert migrate._linear_chain() is None
    finally:
        migrate._linear_chain.cache_clear()


OPEN_TWICE = """
import sys
from archive_kms.state.sql import open_state
url = f"sqlite:///{sys.argv[1]}"
open_state(url)  # creates the schema: runs every revision through Alembic
print("after create:", "alembic" in sys.modules)
"""
OPEN_AT_HEAD = """
import sys
from archive_kms.state.sql import open_state
open_state(f"sqlite:///{sys.argv[1]}").get_tenant("nobody")
print("at head:", "alembic" in sys.modules)
"""


def test_opening_a_database_at_head_does_not_import_alembic(tmp_path) -> None:
    db = tmp_path / "state.db"
    first = subprocess.run([sys.executable, "-c", OPEN_TWICE, str(db)], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "after create: True" in first.stdout
    again = subprocess.run([sys.executable, "-c", OPEN_AT_HEAD, str(db)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at head: False" in again.stdout


@pytest.mark.parametrize(
    ("legacy", "words"),
    [
        (None, "not an archive_kms state database"),
        (2, "not an archive_kms state database"),
        (1, "from before Alembic (schema version 1; baseline 0001)"),
    ],
)
def test_db_current_says_what_db_upgrade_would_do_with_a_database_without_a_revision(legacy, words) -> None:
    """`db current` on a foreign database said "from before Alembic" while `db upgrade`
    refused it as foreign: both now say the same (docs/state-store.md)."""
    found = migrate.SchemaStatus(revision=None, head=migrate.head(), legacy_version=legacy, empty=False)
    assert words in found.describe() and not found.at_head
