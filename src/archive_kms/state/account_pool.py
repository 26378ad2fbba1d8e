"""Which Azurite account stands in for which tenant storage account: the local stack's
pool (``storage.azurite_pool``; ``docs/storage-layout.md`` "A tenant's own storage
account"). SQL on the state store's own database, in the table ``tenant_account_pool``
(Alembic revision 0004); nothing else reads it.

Contract (``tests/contract/test_account_pool_store_contract.py`` holds it):

- ``allocate`` gives the tenant account one pool account, atomically: the first of
  ``candidates`` not allocated to any account. Asked again for the same account it
  returns the allocation it made (idempotent), whatever the candidates. Two accounts never
  get one pool account (primary key), one account never gets two (unique).
- The tenant an allocation was made for is part of it: ``allocate`` for an account held by
  another tenant raises ``StateError`` (a 40-bit digest collision, or a forged location).
- ``release`` deletes the allocation if it is still (account, pool account); idempotent.
- Each method is one transaction; database errors are translated like the state store's.

``sqlite_store_holds`` answers, for another deployment's claim in Azurite, whether the
SQLite state store it names still holds that allocation (ADR 0047): the evidence the pool
needs before it reclaims the account of a deployment that is gone.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from sqlalchemy import delete, insert, select

from archive_kms.errors import StateError
from archive_kms.state.schema import tenant_account_pool
from archive_kms.state.sql import SqlStateStore
from archive_kms.state.sql.database import Conflict

__all__ = ["PoolAllocation", "SqlAccountPool", "sqlite_state_path", "sqlite_store_holds"]


@dataclass(frozen=True)
class PoolAllocation:
    pool_account: str  # the Azurite account
    account: str  # the tenant account it stands in for
    tenant_id: str
    allocated_at: datetime


class SqlAccountPool:
    """Pool allocations on a ``SqlStateStore``'s database."""

    def __init__(self, state: SqlStateStore) -> None:
        self._state = state
        self._db = state.database

    def __repr__(self) -> str:
        return f"SqlAccountPool({self._state!r})"

    def allocation(self, account: str) -> PoolAllocation | None:
        with self._db.tx("read pool allocation", write=False) as conn:
            return self._get(conn, account)

    def allocations(self) -> list[PoolAllocation]:
        c = tenant_account_pool.c
        with self._db.tx("list pool allocations", write=False) as conn:
            rows = conn.execute(select(tenant_account_pool).order_by(c.pool_account)).all()
        return [self._row(r) for r in rows]

    def allocate(
        self, *, tenant_id: str, account: str, candidates: Sequence[str], now: datetime | None = None
    ) -> PoolAllocation | None:
        """The allocation of ``account`` (made now from ``candidates`` if there is none);
        None if every candidate is taken."""
        at = now or datetime.now(UTC)
        for _ in range(len(candidates) + 1):
            try:
                with self._db.tx("allocate pool account") as conn:
                    found = self._get(conn, account)
                    if found is not None:
                        if found.tenant_id != tenant_id:
                            raise StateError(
                                f"storage account {account} is allocated to tenant {found.tenant_id}, not {tenant_id}",
                                resource=f"account:{account}",
                            )
                        return found
                    taken = set(conn.execute(select(tenant_account_pool.c.pool_account)).scalars())
                    free = [p for p in candidates if p not in taken]
                    if not free:
                        return None
                    conn.execute(
                        insert(tenant_account_pool).values(
                            pool_account=free[0], account=account, tenant_id=tenant_id, allocated_at=at
                        )
                    )
                    return PoolAllocation(free[0], account, tenant_id, at)
            except Conflict:  # another process took that pool account (or this account) meanwhile
                continue
        raise StateError(f"could not allocate a pool account for {account}: too many concurrent allocations")

    def release(self, account: str, pool_account: str) -> bool:
        """Forget the allocation (account -> pool_account); False if it was not there."""
        c = tenant_account_pool.c
        with self._db.tx("release pool account") as conn:
            gone = conn.execute(
                delete(tenant_account_pool).where(c.account == account, c.pool_account == pool_account)
            ).rowcount
        return gone == 1

    def _get(self, conn: object, account: str) -> PoolAllocation | None:
        row = conn.execute(  # type: ignore[attr-defined]
            select(tenant_account_pool).where(tenant_account_pool.c.account == account)
        ).one_or_none()
        return None if row is None else self._row(row)

    @staticmethod
    def _row(row: object) -> PoolAllocation:
        m = row._mapping  # type: ignore[attr-defined]
        return PoolAllocation(m["pool_account"], m["account"], m["tenant_id"], m["allocated_at"])


def sqlite_state_path(state_url: str) -> str | None:
    """The absolute path of a SQLite state store's file (``sqlite:///PATH``); None for any
    other database (an in-memory SQLite, PostgreSQL): its claims can never be proven gone."""
    from sqlalchemy.engine import make_url

    url = make_url(state_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    if str(url.database).startswith("file:") or url.query.get("mode") == "memory":
        return None
    return os.path.abspath(os.path.expanduser(str(url.database)))


def sqlite_store_holds(path: str, *, pool_account: str, account: str, tenant_id: str) -> bool:
    """Whether the SQLite state store at ``path`` (another deployment's) still holds the
    allocation ``account`` -> ``pool_account`` for ``tenant_id``. False only on proof: the
    file is gone, or it was read and has no such row. Anything else (unreadable, locked,
    no such table, anything but a regular file) counts as holding it: a live deployment is never robbed."""
    if not os.path.isabs(path):
        return True
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not stat.S_ISREG(mode):
        return True  # a directory, a link, a device or a FIFO (which would block an open): not proof
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return True
    try:
        row = conn.execute(
            "SELECT 1 FROM tenant_account_pool WHERE pool_account = ? AND account = ? AND tenant_id = ?",
            (pool_account, account, tenant_id),
        ).fetchone()
    except sqlite3.Error:
        return True
    finally:
        conn.close()
    return row is not None
