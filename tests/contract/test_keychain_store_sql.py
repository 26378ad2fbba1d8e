"""The keychain's own test suites (tests/unit/test_keychain.py, test_keychain_rekey.py,
test_keychain_rollback.py), rerun with its store swapped for ``SqlKeychainStore`` on SQLite
and on PostgreSQL, plus a kill at every statement inside the store's commit transaction.
The rollback suite also gets the SQL state store's audit log, in the same database, as
production wiring has it.

Those tests play an attacker by editing the in-memory store's raw ``records`` / ``heads``
dicts; here the same names are live views onto the SQL rows (writing one writes the row
as an attacker with database access would), so every tampering test runs against the
real tables.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the keychain's test module

import test_keychain as keychain_suite
import test_keychain_rekey as rekey_suite
import test_keychain_rollback as rollback_suite
from test_keychain import *  # noqa: F403 - every keychain test, collected here again
from test_keychain_rekey import *  # noqa: F403 - and every re-keying test
from test_keychain_rollback import *  # noqa: F403 - and every rollback / audit test

from archive_kms.keys.keychain_store import KeychainStore, KeyRecord
from archive_kms.state.schema import keychain_heads, keychain_records
from archive_kms.state.sql import SqlStateStore, open_state
from archive_kms.state.sql.keychain import SqlKeychainStore


class _RawRows(MutableMapping[Any, bytes]):
    """Raw ``body`` bytes of keychain rows, keyed like the in-memory store's dicts."""

    def __init__(self, state: SqlStateStore, table: Any, key_cols: tuple[str, ...]) -> None:
        self._engine = state.engine
        self._state = state
        self._table = table
        self._cols = key_cols

    def _key(self, key: Any) -> tuple[Any, ...]:
        return key if isinstance(key, tuple) else (key,)

    def _where(self, key: Any) -> Any:
        return [self._table.c[c] == v for c, v in zip(self._cols, self._key(key), strict=True)]

    def __getitem__(self, key: Any) -> bytes:
        with self._engine.connect() as conn:
            body = conn.execute(select(self._table.c.body).where(*self._where(key))).scalar()
        if body is None:
            raise KeyError(key)
        return bytes(body)

    def __setitem__(self, key: Any, body: bytes) -> None:
        values: dict[str, Any] = {"body": body}
        if self._table is keychain_records:
            try:  # an attacker keeps the index columns consistent with what he writes
                rec = KeyRecord.from_json(body)
                values |= {"level": rec.level.value, "workspace_id": rec.workspace_id}
            except Exception:  # noqa: BLE001 - garbage bodies keep the old columns
                pass
        with self._engine.begin() as conn:
            res = conn.execute(self._table.update().where(*self._where(key)).values(**values))
            if res.rowcount == 0:
                raise KeyError(f"tests only overwrite existing rows: {key!r}")

    def __delitem__(self, key: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(self._table).where(*self._where(key)))

    def _keys(self) -> list[Any]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(*[self._table.c[c] for c in self._cols])).all()
        return [tuple(r) if len(self._cols) > 1 else r[0] for r in rows]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class _InspectableSqlKeychainStore(SqlKeychainStore):
    def __init__(self, state: SqlStateStore) -> None:
        super().__init__(state)
        self.records = _RawRows(state, keychain_records, ("tenant_id", "record_id"))
        self.heads = _RawRows(state, keychain_heads, ("tenant_id",))


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    state = open_state(url)
    store = _InspectableSqlKeychainStore(state)
    assert isinstance(store, KeychainStore)
    monkeypatch.setattr(keychain_suite, "InMemoryKeychainStore", lambda: store)
    try:
        yield keychain_suite.Env()
    finally:
        state.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The rollback suite's world on SQL: keychain rows and audit log in one database."""
    url = f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    state = open_state(url)
    try:
        yield rollback_suite.World(_InspectableSqlKeychainStore(state), state)
    finally:
        state.close()


def test_sql_rollback_by_restoring_rows_in_the_database_file_is_refused(tmp_path: Path) -> None:
    """PoC 1a verbatim: the attacker edits the SQLite file with plain sqlite3 (no platform
    code), deleting the keychain rows and inserting the old ones back."""
    import sqlite3

    db = tmp_path / "state.db"
    state = open_state(f"sqlite:///{db}")
    try:
        world = rollback_suite.World(SqlKeychainStore(state), state)
        kc = world.process()
        kc.create_tenant("acme", world.kms.provider(world.kms.create_key("acme-l1")))
        old_dek = kc.dek_for_encrypt("acme", "org1").dek_id
        con = sqlite3.connect(db)
        heads = con.execute("select * from keychain_heads where tenant_id='acme'").fetchall()
        recs = con.execute("select * from keychain_records where tenant_id='acme'").fetchall()
        con.close()
        world.clock.t += 3 * rollback_suite.HOUR
        kc.dek_for_encrypt("acme", "org1")
        assert kc.erase_buckets("acme", "org1", world.clock.t).dek_ids == (old_dek,)
        con = sqlite3.connect(db)
        con.execute("delete from keychain_heads where tenant_id='acme'")
        con.execute("delete from keychain_records where tenant_id='acme'")
        con.executemany(f"insert into keychain_heads values ({','.join('?' * len(heads[0]))})", heads)
        con.executemany(f"insert into keychain_records values ({','.join('?' * len(recs[0]))})", recs)
        con.commit()
        con.close()
        with pytest.raises(rollback_suite.KeychainTamperedError, match="rolled back"):
            world.process().dek_by_id("acme", old_dek)
    finally:
        state.close()


_ERASED_HOUR = "org-1/1"  # erase_buckets below T0 + 2h destroys org-1's DEK of hour 1 (hour 0 already is)


@pytest.mark.parametrize("operation", ["rotate_l3", "erase_buckets"])
def test_workspace_key_replacement_killed_at_any_statement_of_its_commit_changes_nothing(
    env: Any, operation: str
) -> None:
    """The process dies after k statements of the commit transaction, for every k: the
    rows are exactly as before (the transaction rolled back), every DEK opens, and the
    next attempt commits. ``erase_buckets`` replaces the workspace key in the same commit
    as it destroys, so it is held to the same."""
    blobs = rekey_suite._tenant_with_data(env)
    engine = env.store._state.engine
    budget = {"armed": False, "left": 0}

    def kill(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if budget["armed"]:
            if budget["left"] == 0:
                raise rekey_suite.Crash()
            budget["left"] -= 1

    real_commit = env.store.commit

    def commit(tenant_id: str, **kw: Any) -> None:
        budget["armed"] = True  # count only the statements of the commit transaction
        try:
            real_commit(tenant_id, **kw)
        finally:
            budget["armed"] = False

    def run() -> None:
        kc = env.keychain()
        if operation == "rotate_l3":
            kc.rotate_l3("acme", "org-1")
        else:
            assert len(kc.erase_buckets("acme", "org-1", keychain_suite.T0 + 2 * keychain_suite.HOUR).dek_ids) == 1

    env.store.commit = commit
    event.listen(engine, "before_cursor_execute", kill)
    killed = 0
    try:
        while True:
            before = rekey_suite._rows(env)
            budget["left"] = killed
            try:
                run()
            except rekey_suite.Crash:
                assert rekey_suite._rows(env) == before
                rekey_suite._all_open(env.keychain(), blobs)
                killed += 1
                continue
            break
    finally:
        event.remove(engine, "before_cursor_execute", kill)
    # head read FOR UPDATE, new L3, old L3, two DEKs (re-wrapped or destroyed), head: at least six kill points
    assert killed >= 6
    # _tenant_with_data's erasure already replaced org-1's key once (l3/org-1/2)
    assert env.store.get_head("acme").workspace("org-1").l3.record_id == "l3/org-1/3"
    if operation == "erase_buckets":
        with pytest.raises(keychain_suite.KeyDestroyedError):
            rekey_suite._all_open(env.keychain(), {_ERASED_HOUR: blobs.pop(_ERASED_HOUR)})
    rekey_suite._all_open(env.keychain(), blobs)
