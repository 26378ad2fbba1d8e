"""What proves another deployment gone before the Azurite pool reclaims its account (ADR
0047): its SQLite state store no longer exists or no longer holds the allocation; any
doubt counts as alive."""

from __future__ import annotations

import os

from archive_kms.state.account_pool import SqlAccountPool, sqlite_state_path, sqlite_store_holds
from archive_kms.state.sql import open_state
from archive_kms.storage.azurite_pool import PoolDeployment

ALLOC = {"pool_account": "akmspool007", "account": "akmsacme0000000000000000", "tenant_id": "acme"}


def test_a_state_store_holds_its_allocation_until_released_or_deleted(tmp_path) -> None:
    path = tmp_path / "state.db"
    pool = SqlAccountPool(open_state(f"sqlite:///{path}"))
    assert sqlite_store_holds(str(path), **ALLOC) is False  # no such row yet
    pool.allocate(tenant_id="acme", account=ALLOC["account"], candidates=[ALLOC["pool_account"]])
    assert sqlite_store_holds(str(path), **ALLOC) is True  # read while the store is open (WAL)
    assert sqlite_store_holds(str(path), **{**ALLOC, "tenant_id": "other"}) is False
    pool.release(ALLOC["account"], ALLOC["pool_account"])
    assert sqlite_store_holds(str(path), **ALLOC) is False
    path.unlink()
    assert sqlite_store_holds(str(path), **ALLOC) is False  # the deployment is gone


def test_any_doubt_counts_as_alive(tmp_path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert sqlite_store_holds(str(garbage), **ALLOC) is True
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert sqlite_store_holds(str(empty), **ALLOC) is True  # no table: not proof
    assert sqlite_store_holds(str(tmp_path), **ALLOC) is True  # a directory
    assert sqlite_store_holds("relative/state.db", **ALLOC) is True
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    assert sqlite_store_holds(str(fifo), **ALLOC) is True  # never opened (it would block)
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "missing.db")
    assert sqlite_store_holds(str(link), **ALLOC) is True


def test_only_a_sqlite_file_names_a_deployment() -> None:
    assert sqlite_state_path("sqlite:////var/lib/akms/state.db") == "/var/lib/akms/state.db"
    assert sqlite_state_path("sqlite:///rel.db").endswith("/rel.db")
    assert sqlite_state_path("sqlite://") is None
    assert sqlite_state_path("sqlite:///:memory:") is None
    assert sqlite_state_path("postgresql+psycopg://u@db/akms") is None


def test_a_claim_is_judged_gone_only_on_this_host_for_another_store() -> None:
    asked: list[str] = []

    def holds(path: str, **_: str) -> bool:
        asked.append(path)
        return False

    me = PoolDeployment("host-a/1", "/s/mine.db", holds)
    meta = me.claim_metadata()
    assert meta == {"deploymenthost": "host-a/1", "deploymentstate": "/s/mine.db"}
    claim = {"tenant": "t", "account": "a", "deploymenthost": "host-a/1", "deploymentstate": "/s/other.db"}
    assert me.claimant_gone(claim, "akmspool001") is True and asked == ["/s/other.db"]
    assert me.claimant_gone({**claim, "deploymenthost": "host-b/1"}, "akmspool001") is False
    assert me.claimant_gone({**claim, "deploymentstate": "/s/mine.db"}, "akmspool001") is False
    assert me.claimant_gone({"tenant": "t", "account": "a"}, "akmspool001") is False
    assert PoolDeployment("host-a/1", None, holds).claim_metadata() == {}
