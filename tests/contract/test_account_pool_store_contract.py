"""Pool allocations (``state.account_pool.SqlAccountPool``) on SQLite and PostgreSQL: one
pool account per tenant account and one tenant account per pool account, idempotent
allocation, refusal of another tenant, exhaustion, release, and concurrent allocators."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from archive_kms.errors import StateError
from archive_kms.state.account_pool import SqlAccountPool

pytestmark = pytest.mark.parametrize("state_backend", ["sqlite", "postgresql"], indirect=True)

POOL = ["akmspool001", "akmspool002", "akmspool003"]


@pytest.fixture
def pool(state_store):
    return SqlAccountPool(state_store)


def test_allocation_is_first_free_and_idempotent(pool):
    a = pool.allocate(tenant_id="acme", account="akmsacmeaaaa1111", candidates=POOL)
    assert (a.pool_account, a.account, a.tenant_id) == ("akmspool001", "akmsacmeaaaa1111", "acme")
    again = pool.allocate(tenant_id="acme", account="akmsacmeaaaa1111", candidates=list(reversed(POOL)))
    assert again.pool_account == "akmspool001"
    b = pool.allocate(tenant_id="beta", account="akmsbetabbbb2222", candidates=POOL)
    assert b.pool_account == "akmspool002"
    assert pool.allocation("akmsacmeaaaa1111") == a
    assert [x.account for x in pool.allocations()] == ["akmsacmeaaaa1111", "akmsbetabbbb2222"]


def test_another_tenants_account_is_refused(pool):
    pool.allocate(tenant_id="acme", account="akmsacmeaaaa1111", candidates=POOL)
    with pytest.raises(StateError, match="allocated to tenant acme"):
        pool.allocate(tenant_id="evil", account="akmsacmeaaaa1111", candidates=POOL)


def test_exhaustion_and_release(pool):
    for i, _ in enumerate(POOL):
        assert pool.allocate(tenant_id=f"t{i}aa", account=f"akmst{i}aa{i:08d}", candidates=POOL) is not None
    assert pool.allocate(tenant_id="late", account="akmslate00000000", candidates=POOL) is None
    assert pool.release("akmst1aa00000001", "akmspool001") is False  # not that pair
    assert pool.release("akmst1aa00000001", "akmspool002") is True
    assert pool.release("akmst1aa00000001", "akmspool002") is False  # idempotent
    assert pool.allocate(tenant_id="late", account="akmslate00000000", candidates=POOL).pool_account == "akmspool002"


def test_concurrent_allocators_never_share_a_pool_account(pool):
    def take(i: int):
        return pool.allocate(tenant_id=f"c{i}aa", account=f"akmsc{i}aa{i:08d}", candidates=POOL)

    with ThreadPoolExecutor(max_workers=6) as ex:
        got = [a for a in ex.map(take, range(6)) if a is not None]
    assert sorted(a.pool_account for a in got) == POOL  # three won, one account each
