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


# --- faults during an enable run's build_index and cutover (C1, C2, alias swap timeout) -----------
#
# The run's platform reaches Elasticsearch through ``fault_proxy.Proxy``; the oracle reads
# Elasticsearch directly. A node restart is simulated at the proxy (``Outage``: open
# connections reset, the port refusing connections for a while): ``build_index`` is a
# client-side ETL (storage -> bulk with deterministic ids) that keeps no server-side
# context (no ``_reindex`` task, no scroll or point in time), so what a restart changes for
# it is exactly that; Elasticsearch keeps acknowledged writes across a restart (translog
# fsync per request), and an unacknowledged one may or may not have landed, which the
# ``DropResponse`` cases cover. A real restart of a private node would cost ~25 s and
# 800 MB on a 2-core machine for no difference the client can see (ADR 0016).

import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from fault_proxy import (  # noqa: E402
    Always,
    DropResponse,
    Nth,
    Outage,
    Proxy,
    Reset,
    Response,
    Splice,
    Stall,
    Times,
    es_op,
    ops,
)
from flows_support import invariants, run_plan  # noqa: E402
from harness import at_step, proxied_platform, upstream_of  # noqa: E402

from archive_kms.migration import MigrationPlan, plan_enable, resume  # noqa: E402
from archive_kms.state.port import RunState  # noqa: E402

ES_SEED = 0x5EED_C2


@pytest.fixture()
def es_proxy(elasticsearch):
    proxy = Proxy(upstream_of(elasticsearch.elasticsearch_url), classify=es_op)
    yield proxy
    proxy.close()


def _bulk_lines(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if line.strip()]


class BulkItemFaults:
    """A Splice for ``_bulk``: each document (action + source line pair) fails with
    ``status`` / ``error_type`` with probability ``rate`` (seeded): it is taken out of the
    request, so Elasticsearch never sees it, and put back into the answer as a failed item
    at its place (``errors: true``), as Elasticsearch reports a rejected item."""

    def __init__(self, rate: float, seed: int, status: int = 429, error_type: str = "es_rejected_execution_exception"):
        self.rate, self.status, self.error_type = rate, status, error_type
        self.rng = random.Random(seed)
        self.failed_ids: list[str] = []

    def request(self, req):
        lines = _bulk_lines(req.body)
        pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
        keep, plan = [], []
        for action, source in pairs:
            op, meta = next(iter(json.loads(action).items()))
            if self.rng.random() < self.rate:
                plan.append((op, meta["_id"], meta.get("_index")))
                self.failed_ids.append(meta["_id"])
            else:
                keep.append((action, source))
                plan.append(None)
        body = b"".join(a + b"\n" + s + b"\n" for a, s in keep)
        if not keep:  # nothing left to send: ask for something harmless instead
            body = b""
        return body, plan

    def response(self, req, resp: Response, plan) -> Response:
        real = json.loads(resp.body) if resp.body and resp.status == 200 else {"items": [], "errors": False}
        items = iter(real.get("items", []))
        out = []
        for p in plan:
            if p is None:
                out.append(next(items))
            else:
                op, doc_id, index = p
                out.append(
                    {
                        op: {
                            "_index": index,
                            "_id": doc_id,
                            "status": self.status,
                            "error": {"type": self.error_type, "reason": "injected"},
                        }
                    }
                )
        body = {"took": real.get("took", 1), "errors": True, "items": out}
        return Response(200, "OK", [("Content-Type", "application/json")], json.dumps(body).encode())


def _only_when_items(fault: BulkItemFaults):
    """Forward a bulk request whose items all failed as a no-op (an empty bulk is a 400)."""

    def request(req):
        body, plan = fault.request(req)
        if not body:
            return b'{"index":{"_index":"archive-none--0"}}\n{}\n', [p for p in plan]
        return body, plan

    return request


#: The client retries a failed request 4 times, 3.75-7.5 s of backoff in all (clients.elasticsearch_client):
#: a restart shorter than that is ridden out, a longer one fails the request.
SHORT_RESTART, LONG_RESTART = 2.0, 10.0


class Searches:
    """Searches the tenant from another thread while a fault is on: through the run's
    (proxied) platform and straight to Elasticsearch."""

    def __init__(self, proxied, direct, tenant: str) -> None:
        self.proxied, self.direct, self.tenant = proxied, direct, tenant
        self.seen: dict[str, object] = {}
        self.thread: threading.Thread | None = None

    def start(self, delay: float = 0.3) -> None:
        def go() -> None:
            time.sleep(delay)
            self.seen["direct"] = self._ids(self.direct)
            try:
                self.seen["proxied"] = self._ids(self.proxied)
            except ServiceUnavailableError as exc:
                self.seen["proxied"] = exc

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def _ids(self, platform) -> set[str]:
        return {h.record_id for h in platform.open_archive(self.tenant).search(Query(limit=100)).hits}

    def check(self, before: set[str]) -> None:
        """Searches during the fault failed clearly or answered from the previous generation."""
        assert self.thread is not None
        self.thread.join(timeout=60)
        assert self.seen["direct"] == before, "a search during the fault did not answer from the previous generation"
        seen = self.seen["proxied"]
        if isinstance(seen, ServiceUnavailableError):
            assert seen.retryable and f"archive-{self.tenant}" in str(seen), seen
        else:
            assert seen == before, "a search during the fault answered from an incomplete generation"


def test_c1_c2_bulk_item_failures_short_restart_and_lost_swap_answer(
    es_proxy, flow_settings, flow_platform, archived_tenant, customer_key, fault_case, monkeypatch
):
    """One enable run, Elasticsearch faulty all along ``build_index`` and ``cutover``:

    * C2: the first bulk request answers 429 for a seeded third of its items, and a later
      one 500 (``unavailable_shards_exception``) for another third; those items never
      reached Elasticsearch and only they are sent again;
    * C1: between the two, Elasticsearch goes away for 2 s (connections reset, refused):
      the client's backoff rides it out;
    * the cutover's ``_aliases`` request is applied, then its answer lost: the client's
      retry finds the alias moved and the adapter recognises its own swap.

    The run completes with no step failing; searches during the restart fail clearly or
    answer from the previous generation; I1-I7."""
    archived = archived_tenant("s3", records=12, seed=41)
    t = archived.tenant_id
    p = proxied_platform(flow_settings, elasticsearch_url=es_proxy.url)
    before = {h.record_id for h in flow_platform.open_archive(t).search(Query(limit=100)).hits}
    rejected = BulkItemFaults(0.34, ES_SEED)
    errored = BulkItemFaults(0.34, ES_SEED + 1, status=500, error_type="unavailable_shards_exception")
    es_proxy.set_rules(
        Nth(ops("bulk"), Splice(_only_when_items(rejected), rejected.response), n=1),
        Nth(ops("bulk"), Outage(SHORT_RESTART), n=2),
        Nth(ops("bulk"), Splice(_only_when_items(errored), errored.response), n=3),
        Times(ops("aliases"), DropResponse()),
    )
    searches = Searches(p, flow_platform, t)
    at_step(monkeypatch, "build_index", searches.start)
    outcome = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=2))
    assert outcome.state == RunState.COMPLETED.value, outcome.error
    run = p.state.get_run(outcome.run_id)
    assert all(s.attempt == 1 for s in run.steps), [(s.name, s.attempt) for s in run.steps]
    assert rejected.failed_ids and errored.failed_ids, "the seeded faults hit no item"
    assert len(es_proxy.faults("bulk")) == 3 and len(es_proxy.faults("aliases")) == 1, es_proxy.injected
    assert flow_platform.index.current_index(t) == MigrationPlan.from_params(run.params).new_index
    searches.check(before)
    invariants(flow_platform, t, archived.snapshot)


def test_c1_c2_long_restart_and_persistent_mapping_error_fail_resumably(
    es_proxy, flow_settings, flow_platform, archived_tenant, customer_key, fault_case, monkeypatch
):
    """An enable run, then two resumes, each against another Elasticsearch fault:

    1. C1: Elasticsearch goes away for 10 s at the first bulk request of ``build_index``
       (longer than the client's retries): the step fails retryably, the alias stays on
       the previous generation, searches fail clearly or answer from it;
    2. C2: a mapping error on a fifth of the documents, every time they are sent: the
       rebuild is incomplete, never "all good", the step fails naming the counts and the
       alias does not move to the incomplete index;
    3. the cutover's ``_aliases`` request times out before it reaches Elasticsearch (the
       client retries it): the run completes, rebuilt into the same generation (no
       duplicate document: deterministic ids); I1-I7."""
    archived = archived_tenant("s3", records=12, seed=47)
    t = archived.tenant_id
    p = proxied_platform(flow_settings, elasticsearch_url=es_proxy.url)
    before = {h.record_id for h in flow_platform.open_archive(t).search(Query(limit=100)).hits}
    es_proxy.set_rules(Nth(ops("bulk"), Outage(LONG_RESTART), n=1))
    searches = Searches(p, flow_platform, t)
    at_step(monkeypatch, "build_index", searches.start)
    outcome = run_plan(p, plan_enable(p, t, "byokms", customer_key("byokms", "s3"), shards=2))
    assert outcome.state == RunState.FAILED.value, outcome
    assert outcome.error.startswith("ServiceUnavailableError") and "build_index" in outcome.message, outcome
    old = p.state.get_run(outcome.run_id).params["old_index"]
    assert flow_platform.index.current_index(t) == old, "the alias moved during a failed build"
    searches.check(before)
    es_proxy.wait_until_up()  # the node is back (the step may fail sooner than the outage lasts)

    poison = BulkItemFaults(0.2, ES_SEED + 2, status=400, error_type="mapper_parsing_exception")
    es_proxy.set_rules(Always(ops("bulk"), Splice(_only_when_items(poison), poison.response)))
    again = resume(p, outcome.run_id, actor="test")
    assert again.state == RunState.FAILED.value and "build_index" in again.message, again
    assert again.error.startswith("SearchError") and "incomplete" in again.error, again.error
    assert poison.failed_ids
    assert flow_platform.index.current_index(t) == old, "the alias moved to an incomplete index"

    es_proxy.set_rules(Times(ops("aliases"), Stall(1.0, Reset())))
    done = resume(p, outcome.run_id, actor="test")
    assert done.state == RunState.COMPLETED.value, done.error
    assert len(es_proxy.faults("aliases")) == 1
    built = p.state.get_run(outcome.run_id).step("build_index").result
    assert built["documents"] == archived.record_count and not built["reused"], built
    invariants(flow_platform, t, archived.snapshot, resumes=2)
