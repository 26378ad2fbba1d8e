"""Search faults against the real Elasticsearch (faults.md C3, C4, C7, C8, C9, F18).

Each scenario ends with the search invariants checked: the alias points to exactly one
index, the live generation holds each record exactly once (I2, I4), and keyed indices
hold no plaintext (I7, checked in the contract suite)."""

from __future__ import annotations

import uuid

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.records import Record
from archive_kms.errors import AliasConflictError, SearchError, ServiceUnavailableError
from archive_kms.search import IndexMode, Query, build_document, derive_search_keys, rebuild_generation
from archive_kms.search.elasticsearch import ElasticsearchSearchIndex

RECORDS = [
    Record("Lead", f"00Q{i:05d}", {"Company": f"Company {i}", "Rating": "Warm" if i % 2 else "Cold"}) for i in range(40)
]


@pytest.fixture()
def es(elasticsearch):
    client = clients.elasticsearch_client(elasticsearch)
    tenants: list[str] = []

    def tenant() -> str:
        t = f"f{uuid.uuid4().hex[:12]}"
        tenants.append(t)
        return t

    yield client, ElasticsearchSearchIndex(client, backoff=0.01), tenant
    for t in tenants:
        names = list(client.indices.get(index=f"archive-{t}--*", allow_no_indices=True).body)
        if names:
            client.indices.delete(index=names)


def _aliased(client, tenant: str) -> list[str]:
    resp = client.options(ignore_status=404).indices.get_alias(name=f"archive-{tenant}")
    return sorted(k for k in resp.body if k != "error" and k != "status")


def _assert_invariants(client, index, tenant: str, records, keys) -> None:
    assert len(_aliased(client, tenant)) == 1  # exactly one index behind the alias
    live = index.current_index(tenant)
    client.indices.refresh(index=live)
    raw = client.search(index=live, query={"match_all": {}}, size=1000, source=False)["hits"]["hits"]
    ids = [h["_id"] for h in raw]
    assert len(ids) == len(set(ids)) == len(records)  # I2: no duplicates; I4: count == ledger
    mode = IndexMode.KEYED if keys else IndexMode.PLAINTEXT
    expected = {build_document(r, tenant=tenant, mode=mode, keys=keys).doc_id for r in records}
    assert set(ids) == expected


def test_c7_server_rejects_a_swap_based_on_a_stale_read(es, monkeypatch):
    client, index, new_tenant = es
    tenant = new_tenant()
    g1, g2, g3 = (index.create_generation(tenant, g, IndexMode.PLAINTEXT) for g in (1, 2, 3))
    index.swap_alias(tenant, g1, expected_current=None)
    index.swap_alias(tenant, g2, expected_current=g1)  # the racer that won
    # The loser read the alias before the winner swapped: bypass the client-side check
    # so only Elasticsearch's conditional _aliases request stands between it and the alias.
    monkeypatch.setattr(index, "current_index", lambda t: g1)
    with pytest.raises(AliasConflictError):
        index.swap_alias(tenant, g3, expected_current=g1)
    monkeypatch.undo()
    assert _aliased(client, tenant) == [g2] and index.current_index(tenant) == g2

    # "No alias yet" is conditional too: a second first-time swap loses on the server.
    other = new_tenant()
    o1, o2 = (index.create_generation(other, g, IndexMode.PLAINTEXT) for g in (1, 2))
    index.swap_alias(other, o1, expected_current=None)
    monkeypatch.setattr(index, "current_index", lambda t: None)
    with pytest.raises(AliasConflictError):
        index.swap_alias(other, o2, expected_current=None)
    monkeypatch.undo()
    assert _aliased(client, other) == [o1]

    # And a caller that believes in an alias that does not exist (must_exist).
    third = new_tenant()
    t1, t2 = (index.create_generation(third, g, IndexMode.PLAINTEXT) for g in (1, 2))
    monkeypatch.setattr(index, "current_index", lambda t: t1)
    with pytest.raises(AliasConflictError):
        index.swap_alias(third, t2, expected_current=t1)
    monkeypatch.undo()
    assert _aliased(client, third) == []


def test_c3_c4_rotation_with_crashes_converges(es):
    """gen 1 live (managed); rotation to BYOK builds gen 2 keyed. Crash after the rebuild
    (before the swap), then after the swap (before cleanup); reruns converge."""
    client, index, new_tenant = es
    tenant = new_tenant()
    report = rebuild_generation(RECORDS, index, tenant, 1, IndexMode.PLAINTEXT, None, batch_size=16)
    report.require_complete()
    index.swap_alias(tenant, report.index, expected_current=None)

    keys = derive_search_keys(SecretBytes.random(), tenant)
    first = rebuild_generation(RECORDS, index, tenant, 2, IndexMode.KEYED, keys, batch_size=16)
    first.require_complete()
    # crash: the swap never happened. Rerun the step:
    again = rebuild_generation(RECORDS, index, tenant, 2, IndexMode.KEYED, keys, batch_size=16)
    assert again.reused and again.complete
    index.swap_alias(tenant, again.index, expected_current=report.index)
    # crash: cleanup never happened. Rerun swap (no-op) and cleanup:
    index.swap_alias(tenant, again.index, expected_current=report.index)
    index.delete_index(report.index)
    index.delete_index(report.index)

    assert [g.generation for g in index.list_generations(tenant)] == [2]
    assert index.search(tenant, Query("warm"), keys).total == 20
    _assert_invariants(client, index, tenant, RECORDS, keys)


def test_c3_marker_with_wrong_count_is_not_trusted(es):
    client, index, new_tenant = es
    tenant = new_tenant()
    report = rebuild_generation(RECORDS, index, tenant, 1, IndexMode.PLAINTEXT, None)
    assert report.complete
    # Someone deleted documents behind our back after the marker was written.
    victims = [build_document(r, tenant=tenant, mode=IndexMode.PLAINTEXT, keys=None).doc_id for r in RECORDS[:5]]
    for v in victims:
        client.delete(index=report.index, id=v)
    rerun = rebuild_generation(RECORDS, index, tenant, 1, IndexMode.PLAINTEXT, None)
    assert not rerun.reused and rerun.complete and rerun.indexed == 5 and rerun.skipped == 35
    index.swap_alias(tenant, rerun.index, expected_current=None)
    _assert_invariants(client, index, tenant, RECORDS, None)


def test_c9_incompatible_existing_index_stops_before_indexing(es):
    client, index, new_tenant = es
    tenant = new_tenant()
    name = f"archive-{tenant}--1"
    # Drift: an index with this name but dynamic mappings (e.g. an old template, or auto-created).
    client.indices.create(index=name, mappings={"properties": {"tokens": {"type": "text"}}})
    with pytest.raises(SearchError) as err:
        rebuild_generation(RECORDS, index, tenant, 1, IndexMode.PLAINTEXT, None)
    assert name in str(err.value) and "incompatible" in str(err.value)
    client.indices.refresh(index=name)
    assert client.count(index=name)["count"] == 0  # nothing was written


def test_c8_unreachable_elasticsearch_is_retryable_and_named(elasticsearch):
    dead = clients.elasticsearch_client(Settings(elasticsearch_url="http://127.0.0.1:9"))
    index = ElasticsearchSearchIndex(dead)
    for call in (
        lambda: index.create_generation("acme", 1, IndexMode.PLAINTEXT),
        lambda: index.current_index("acme"),
        lambda: index.search("acme", Query("x"), None),
        lambda: index.count("archive-acme--1"),
        lambda: rebuild_generation(RECORDS, index, "acme", 1, IndexMode.PLAINTEXT, None),
    ):
        with pytest.raises(ServiceUnavailableError) as err:
            call()
        assert err.value.retryable and "archive-acme" in str(err.value)


def test_f18_poisoned_records_never_reach_the_index(es):
    client, index, new_tenant = es
    tenant = new_tenant()
    keys = derive_search_keys(SecretBytes.random(), tenant)
    poison = [
        Record("Note", "002BOMB", {f"F{i}": i for i in range(5000)}),
        Record("Note", "002HUGE", {"Body": "A" * 500_000}),
    ]
    report = rebuild_generation(RECORDS + poison, index, tenant, 1, IndexMode.KEYED, keys)
    assert report.rejected_total == 2 and report.count == len(RECORDS) and not report.complete
    mapping = client.indices.get_mapping(index=report.index)[report.index]["mappings"]
    assert set(mapping["properties"]) == {"object_type", "record_id", "tokens", "display"}  # no explosion


def test_e7_search_that_resolved_an_index_deleted_since_resolves_again(es, monkeypatch):
    """A search resolves the alias, then a cutover swaps it to a new generation and deletes
    the old one before the search runs: it resolves again and answers from the new one
    (it searches the concrete index it compiled the query for, never the moving alias)."""
    client, index, new_tenant = es
    tenant = new_tenant()
    records = [Record("Account", f"00{i}", {"Name": f"Acme {i}"}) for i in range(5)]
    keys = derive_search_keys(SecretBytes.random(32), tenant)
    old = rebuild_generation(records, index, tenant, 1, IndexMode.KEYED, keys).index
    index.swap_alias(tenant, old, expected_current=None)
    new = rebuild_generation(records, index, tenant, 2, IndexMode.KEYED, keys).index
    index.swap_alias(tenant, new, expected_current=old)
    index.delete_index(old)

    real = ElasticsearchSearchIndex.current_index
    stale = {"left": 1}

    def resolves_stale_once(self, t):
        if t == tenant and stale["left"]:
            stale["left"] -= 1
            return old  # what the alias said just before the swap
        return real(self, t)

    monkeypatch.setattr(ElasticsearchSearchIndex, "current_index", resolves_stale_once)
    result = index.search(tenant, Query(limit=50), keys)
    assert stale["left"] == 0 and result.failures == []
    assert sorted(h.record_id for h in result.hits) == [r.record_id for r in records]
    assert {h.index for h in result.hits} == {new}
