"""Contract suite for the SearchIndex port: every test runs against the in-memory index
and against the real Elasticsearch (fixture ``elasticsearch``), with the rules written in
``archive_kms/search/port.py``."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.records import AttachmentRef, Record
from archive_kms.errors import (
    AliasConflictError,
    SearchError,
    ServiceUnavailableError,
    ValidationError,
)
from archive_kms.search import (
    IndexDocument,
    IndexMode,
    Query,
    SearchIndex,
    build_document,
    derive_search_keys,
    rebuild_generation,
)
from archive_kms.search.elasticsearch import ElasticsearchSearchIndex
from archive_kms.search.memory import MemorySearchIndex
from archive_kms.search.naming import index_name
from archive_kms.search.tokens import words

RECORDS = [
    Record(
        "Account",
        "001Qz00000AbCdEFGH",
        {
            "Name": "Zanzibar Quokkafarm Holdings",
            "Industry": "Biotechnology",
            "BillingCity": "Wellington",
            "AnnualRevenue": 1250000,
            "Description": "Marmalade distributor & aquaponics",
            "IsActive": True,
        },
        (AttachmentRef("att00001", "Pemberton-Ledger-2024.pdf", 1234, "application/pdf"),),
    ),
    # A record id full of query and path metacharacters: ids are hashed, never used raw.
    Record(
        "Account",
        '001Qz00000XyZ/..#*?"<>|',
        {"Name": "Halloway  Brothers", "Industry": "Shipbuilding", "BillingCity": "Wellington", "Phone": None},
    ),
    Record(
        "Contact",
        "003Qz00000Mülléŕ",
        {"LastName": "Müller", "Email": "greta.mueller@example.org", "Title": "Chief Lighthouse Keeper"},
    ),
    Record(
        "Case",
        "500Qz00000CASE01",
        {"Subject": "Quokkafarm invoice dispute", "Status": "Escalated", "Priority": "High"},
        workspace_id="org-eu",
    ),
]
BY_ID = {r.record_id: r for r in RECORDS}


# --- backends ----------------------------------------------------------------------------


class _Rejector:
    """Per-item fault plan: the first ``times`` writes of each id in ``ids`` are answered
    with 429 ``es_rejected_execution_exception`` and not applied."""

    def __init__(self, ids: set[str], times: int) -> None:
        self.remaining = {i: times for i in ids}
        self.lock = threading.Lock()

    def take(self, doc_id: str) -> bool:
        with self.lock:
            if self.remaining.get(doc_id, 0) > 0:
                self.remaining[doc_id] -= 1
                return True
            return False


REJECTED = {
    "status": 429,
    "error": {"type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation"},
}


class _RejectingClient:
    """Wraps the real Elasticsearch client: rejected items never reach the server, the
    others are forwarded in one real bulk request, and the response is spliced back in
    request order (what a partially overloaded cluster answers)."""

    def __init__(self, client: Any, rejector: _Rejector) -> None:
        self._client, self._rejector = client, rejector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def bulk(self, *, operations: list[Any], **kwargs: Any) -> dict[str, Any]:
        forward: list[Any] = []
        plan: list[dict | None] = []
        i = 0
        while i < len(operations):
            action = operations[i]  # a dict, or an NDJSON line (bytes) as the adapter sends
            op, meta = next(iter((json.loads(action) if isinstance(action, bytes) else action).items()))
            pair = [action] if op == "delete" else [action, operations[i + 1]]
            i += len(pair)
            if self._rejector.take(meta["_id"]):
                plan.append({op: {"_index": meta["_index"], "_id": meta["_id"], **REJECTED}})
            else:
                forward.extend(pair)
                plan.append(None)
        real = self._client.bulk(operations=forward, **kwargs).body if forward else {"errors": False, "items": []}
        it = iter(real["items"])
        items = [p if p is not None else next(it) for p in plan]
        return {"errors": bool(real["errors"]) or any(p is not None for p in plan), "took": 0, "items": items}


@dataclass
class Backend:
    kind: str
    make: Callable[..., SearchIndex]  # make(rejector=None) -> SearchIndex
    raw_documents: Callable[[str], list[dict[str, Any]]]  # {"_id", "_source"} straight from storage
    raw_put: Callable[[str, str, Mapping[str, Any]], None]  # overwrite a stored document behind our back
    raw_set_mode: Callable[[str, IndexMode], None]  # rewrite an index's _meta mode behind our back
    raw_alias_to: Callable[[str, str], None]  # (alias, index): create ``index`` if needed and move the alias there
    tenants: list[str] = field(default_factory=list)

    def tenant(self) -> str:
        t = f"t{uuid.uuid4().hex[:12]}"
        self.tenants.append(t)
        return t


@pytest.fixture(params=["memory", "elasticsearch"])
def backend(request):
    if request.param == "memory":
        # One store for the whole test (like one cluster); make(rejector) arms the fault plan.
        plan: dict[str, _Rejector | None] = {"rejector": None}

        def fault(_index: str, doc_id: str):
            rejector = plan["rejector"]
            return REJECTED if rejector is not None and rejector.take(doc_id) else None

        store = MemorySearchIndex(item_fault=fault)

        def make(rejector: _Rejector | None = None) -> SearchIndex:
            plan["rejector"] = rejector
            return store

        def raw_documents(name: str) -> list[dict[str, Any]]:
            idx = store._indices[name]
            return [{"_id": k, "_source": v[1]} for k, v in idx.live.items()]

        def raw_put(name: str, doc_id: str, source: Mapping[str, Any]) -> None:
            idx = store._indices[name]
            idx.live[doc_id] = (idx.live[doc_id][0] + 1, dict(source))
            idx.dirty.add(doc_id)
            idx.refresh()

        def raw_set_mode(name: str, mode: IndexMode) -> None:
            store._indices[name].mappings["_meta"]["archive_kms"]["mode"] = IndexMode(mode).value

        def raw_alias_to(alias: str, name: str) -> None:
            with store._lock:
                store._aliases[alias] = {name: True}

        yield Backend("memory", make, raw_documents, raw_put, raw_set_mode, raw_alias_to)
        return

    settings = request.getfixturevalue("elasticsearch")
    client = clients.elasticsearch_client(settings)

    def make_es(rejector: _Rejector | None = None) -> SearchIndex:
        return ElasticsearchSearchIndex(_RejectingClient(client, rejector) if rejector else client, backoff=0.01)

    def es_raw_documents(name: str) -> list[dict[str, Any]]:
        client.indices.refresh(index=name)
        resp = client.search(index=name, query={"match_all": {}}, size=1000)
        return [{"_id": h["_id"], "_source": h["_source"]} for h in resp["hits"]["hits"]]

    def es_raw_put(name: str, doc_id: str, source: Mapping[str, Any]) -> None:
        client.index(index=name, id=doc_id, document=dict(source), refresh=True)

    def es_raw_set_mode(name: str, mode: IndexMode) -> None:
        meta = client.indices.get_mapping(index=name)[name]["mappings"]["_meta"]
        meta["archive_kms"]["mode"] = IndexMode(mode).value
        client.indices.put_mapping(index=name, meta=meta)

    def es_raw_alias_to(alias: str, name: str) -> None:
        if not client.indices.exists(index=name):
            client.indices.create(index=name)
        actions: list[dict[str, Any]] = [{"remove": {"index": "*", "alias": alias}}]
        actions.append({"add": {"index": name, "alias": alias}})
        client.indices.update_aliases(actions=actions)

    b = Backend("elasticsearch", make_es, es_raw_documents, es_raw_put, es_raw_set_mode, es_raw_alias_to)
    yield b
    for t in b.tenants:  # delete by exact names (never a wildcard delete on a shared cluster)
        names = list(client.indices.get(index=f"archive-{t}*,forged-{t}*", allow_no_indices=True).body)
        if names:
            client.indices.delete(index=names)


@pytest.fixture(params=[IndexMode.PLAINTEXT, IndexMode.KEYED], ids=["plaintext", "keyed"])
def mode(request) -> IndexMode:
    return request.param


def keys_for(tenant: str, mode: IndexMode):
    return derive_search_keys(SecretBytes.random(32), tenant) if mode is IndexMode.KEYED else None


def docs_for(tenant: str, mode: IndexMode, keys, records=RECORDS, version=None) -> list[IndexDocument]:
    return [build_document(r, tenant=tenant, mode=mode, keys=keys, version=version) for r in records]


def live(index: SearchIndex, tenant: str, gen: int, mode: IndexMode, keys, records=RECORDS) -> str:
    name = index.create_generation(tenant, gen, mode)
    result = index.bulk_index(name, docs_for(tenant, mode, keys, records), refresh=True)
    assert result.ok, result.failed
    if index.current_index(tenant) is None:
        index.swap_alias(tenant, name, expected_current=None)
    return name


def ids(result) -> list[str]:
    return sorted(h.record_id for h in result)


# --- index + search ----------------------------------------------------------------------


def test_search_by_words_filters_and_type(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    assert isinstance(index, SearchIndex)
    keys = keys_for(tenant, mode)
    live(index, tenant, 1, mode, keys)

    def q(*args, **kw):
        res = index.search(tenant, Query(*args, **kw), keys)
        assert res.failures == []
        return res

    assert ids(q("quokkafarm")) == ["001Qz00000AbCdEFGH", "500Qz00000CASE01"]
    assert ids(q("QUOKKAFARM holdings")) == ["001Qz00000AbCdEFGH"]  # all words must match
    assert ids(q("quokkafarm", object_type="Case")) == ["500Qz00000CASE01"]
    assert ids(q("quokkafarm", object_type="case")) == ["500Qz00000CASE01"]
    assert ids(q("pemberton ledger")) == ["001Qz00000AbCdEFGH"]  # attachment file names
    assert ids(q("ＭÜLLER")) == ["003Qz00000Mülléŕ"]  # NFKC + casefold
    assert ids(q("greta.mueller@example.org")) == ["003Qz00000Mülléŕ"]
    assert ids(q("nonexistentword")) == []
    assert ids(q(filters={"BillingCity": "wellington"})) == ["001Qz00000AbCdEFGH", '001Qz00000XyZ/..#*?"<>|']
    assert ids(q(filters={"billingcity": "WELLINGTON", "Industry": "Shipbuilding"})) == ['001Qz00000XyZ/..#*?"<>|']
    assert ids(q(filters={"Name": " halloway brothers "})) == ['001Qz00000XyZ/..#*?"<>|']  # whitespace
    assert ids(q(filters={"Email": "Greta.Mueller@Example.org"})) == ["003Qz00000Mülléŕ"]
    assert ids(q(filters={"AnnualRevenue": 1250000})) == ["001Qz00000AbCdEFGH"]
    assert ids(q(filters={"IsActive": True})) == ["001Qz00000AbCdEFGH"]
    assert ids(q(filters={"Industry": "ship"})) == []  # exact values only
    assert ids(q("wellington", filters={"Industry": "biotechnology"})) == ["001Qz00000AbCdEFGH"]

    everything = q()
    assert everything.total == 4 and ids(everything) == sorted(BY_ID)
    assert len(q(limit=2).hits) == 2 and q(limit=2).total == 4
    # Hits come back decrypted and whole, metacharacter ids included.
    for hit in everything:
        rec = BY_ID[hit.record_id]
        assert (hit.object_type, dict(hit.fields), hit.attachments, hit.workspace_id) == (
            rec.object_type,
            dict(rec.fields),
            rec.attachments,
            rec.workspace_id,
        )


def test_keys_must_fit_the_index_mode(backend):
    index, tenant, other = backend.make(), backend.tenant(), backend.tenant()
    keys = keys_for(tenant, IndexMode.KEYED)
    live(index, tenant, 1, IndexMode.KEYED, keys)
    with pytest.raises(ValidationError):
        index.search(tenant, Query("quokkafarm"), None)  # a keyed index is never queried in clear
    with pytest.raises(ValidationError):
        index.search(tenant, Query("quokkafarm"), keys_for(other, IndexMode.KEYED))  # another tenant's keys
    # The same words under a different key find nothing: tokens are keyed.
    live(index, other, 1, IndexMode.KEYED, keys_for(other, IndexMode.KEYED))
    assert ids(index.search(other, Query("quokkafarm"), derive_search_keys(SecretBytes.random(), other))) == []
    plain = backend.tenant()
    live(index, plain, 1, IndexMode.PLAINTEXT, None)
    with pytest.raises(ValidationError):
        index.search(plain, Query("quokkafarm"), keys_for(plain, IndexMode.KEYED))


def test_search_without_alias_is_an_error(backend):
    index, tenant = backend.make(), backend.tenant()
    index.create_generation(tenant, 1, IndexMode.PLAINTEXT)
    assert index.current_index(tenant) is None
    with pytest.raises(SearchError):
        index.search(tenant, Query("anything"), None)


def test_writes_are_visible_after_refresh(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = index.create_generation(tenant, 1, mode)
    result = index.bulk_index(name, docs_for(tenant, mode, keys))
    assert result.ok and len(result.indexed) == 4
    index.refresh(name)
    assert index.count(name) == 4


# --- the KEY security test ---------------------------------------------------------------


def _clear_strings(records) -> set[str]:
    """Every word, value, id, type and field name of the records that is long enough not
    to occur by chance in random base64 (a 5-letter string appears in ~1 of 10^4 tokens)."""
    out: set[str] = set()
    for r in records:
        candidates = [r.object_type, r.record_id, *r.fields]
        candidates += [str(v) for v in r.fields.values() if v is not None and not isinstance(v, bool)]
        candidates += [a.file_name for a in r.attachments]
        for c in candidates:
            out.add(c)
            out |= set(words(c))
    return {s.lower() for s in out if len(s) >= 6}


def test_keyed_index_holds_no_plaintext(backend):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, IndexMode.KEYED)
    name = live(index, tenant, 1, IndexMode.KEYED, keys)

    raw = backend.raw_documents(name)
    assert len(raw) == len(RECORDS)
    dumped = json.dumps(raw, ensure_ascii=False).lower()
    secrets = _clear_strings(RECORDS)
    assert len(secrets) > 25
    leaked = sorted(s for s in secrets if s in dumped)
    assert leaked == [], f"plaintext in the keyed index: {leaked}"
    for doc in raw:  # and nothing but the four schema fields
        assert set(doc["_source"]) == {"object_type", "record_id", "tokens", "display"}

    # ...while searching by those very words still finds the records.
    for word in ("zanzibar", "biotechnology", "marmalade", "lighthouse", "escalated", "pemberton"):
        assert index.search(tenant, Query(word), keys).total == 1, word

    # The oracle can fail: the same records in a plaintext index are caught.
    plain = backend.tenant()
    pname = live(index, plain, 1, IndexMode.PLAINTEXT, None)
    pdump = json.dumps(backend.raw_documents(pname), ensure_ascii=False).lower()
    assert {"zanzibar", "biotechnology", "wellington"} <= {s for s in secrets if s in pdump}


def test_tampered_display_is_reported_not_returned(backend):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, IndexMode.KEYED)
    name = live(index, tenant, 1, IndexMode.KEYED, keys)
    raw = {d["_id"]: d["_source"] for d in backend.raw_documents(name)}
    case_doc = build_document(BY_ID["500Qz00000CASE01"], tenant=tenant, mode=IndexMode.KEYED, keys=keys)
    acct_doc = build_document(BY_ID["001Qz00000AbCdEFGH"], tenant=tenant, mode=IndexMode.KEYED, keys=keys)
    # Move the account's sealed display onto the case document: both still "look" valid.
    forged = dict(raw[case_doc.doc_id], display=raw[acct_doc.doc_id]["display"])
    backend.raw_put(name, case_doc.doc_id, forged)

    res = index.search(tenant, Query("quokkafarm"), keys)
    assert ids(res) == ["001Qz00000AbCdEFGH"]
    assert [f.doc_id for f in res.failures] == [case_doc.doc_id]
    assert "authentication" in res.failures[0].reason


def test_a_document_given_another_records_terms_is_reported_not_returned(backend, mode):
    """Only ``display`` is sealed; someone who can write to the index (but has no key)
    copies the Account's terms onto the Case. A search for the Account's words must not
    return the Case as a hit: its own record does not carry them."""
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = live(index, tenant, 1, mode, keys)
    acct, case = (
        build_document(BY_ID[r], tenant=tenant, mode=mode, keys=keys)
        for r in ("001Qz00000AbCdEFGH", "500Qz00000CASE01")
    )
    raw_case = {d["_id"]: d["_source"] for d in backend.raw_documents(name)}[case.doc_id]
    backend.raw_put(
        name, case.doc_id, dict(raw_case, tokens=acct.source["tokens"], object_type=acct.source["object_type"])
    )

    res = index.search(tenant, Query("marmalade aquaponics"), keys)
    assert ids(res) == ["001Qz00000AbCdEFGH"]
    assert [f.doc_id for f in res.failures] == [case.doc_id]
    assert "altered" in res.failures[0].reason


def test_scan_returns_every_document_past_the_search_limit(backend, mode):
    """``scan`` pages through a whole generation (more documents than one search may
    return), decoding like search; a forged document comes back as a failure, in place."""
    from archive_kms.search.documents import MAX_LIMIT
    from archive_kms.search.port import HitFailure

    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    many = [Record("Task", f"00T{i:012d}", {"Subject": f"call {i}"}) for i in range(MAX_LIMIT + 37)]
    name = live(index, tenant, 1, mode, keys, records=many)
    assert index.search(tenant, Query(limit=MAX_LIMIT), keys).total == len(many)

    seen = list(index.scan(name, keys, page_size=400))
    assert sorted(h.record_id for h in seen) == sorted(r.record_id for r in many)
    assert {h.fields["Subject"] for h in seen if h.record_id == "00T000000000007"} == {"call 7"}

    victim, donor = (build_document(r, tenant=tenant, mode=mode, keys=keys) for r in many[:2])
    backend.raw_put(name, victim.doc_id, dict(victim.source, display=donor.source["display"]))
    after = list(index.scan(name, keys, page_size=1000))
    failed = [x for x in after if isinstance(x, HitFailure)]
    assert [f.doc_id for f in failed] == [victim.doc_id]
    assert len(after) == len(many)


def test_scan_refuses_keys_that_do_not_fit(backend):
    from archive_kms.errors import IndexModeMismatchError

    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, IndexMode.KEYED)
    name = live(index, tenant, 1, IndexMode.KEYED, keys)
    with pytest.raises(IndexModeMismatchError):
        list(index.scan(name, None))


# --- bulk: idempotence, per-item errors, retries -----------------------------------------


def test_retried_bulk_never_duplicates(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = index.create_generation(tenant, 1, mode)
    docs = docs_for(tenant, mode, keys)
    first = index.bulk_index(name, docs, refresh=True)
    # A retry rebuilds the documents (fresh display ciphertext): same ids regardless.
    again = index.bulk_index(name, docs_for(tenant, mode, keys), refresh=True)
    assert len(first.indexed) == 4 and again.indexed == () and sorted(again.skipped) == sorted(first.indexed)
    assert again.ok and index.count(name) == 4
    # Duplicates inside one request collapse too.
    assert index.bulk_index(name, docs + docs, refresh=True).ok and index.count(name) == 4


def test_versioned_writes_never_let_a_stale_retry_win(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = live(index, tenant, 1, mode, keys, records=[])
    rec = RECORDS[0]
    v2 = Record(rec.object_type, rec.record_id, {**rec.fields, "Industry": "Aerospace"}, rec.attachments)
    assert index.bulk_index(name, docs_for(tenant, mode, keys, [rec], version=1), refresh=True).ok
    assert index.bulk_index(name, docs_for(tenant, mode, keys, [v2], version=2), refresh=True).indexed
    stale = index.bulk_index(name, docs_for(tenant, mode, keys, [rec], version=1), refresh=True)
    assert stale.ok and stale.indexed == () and len(stale.skipped) == 1
    assert ids(index.search(tenant, Query(filters={"Industry": "aerospace"}), keys)) == [rec.record_id]
    assert ids(index.search(tenant, Query(filters={"Industry": "biotechnology"}), keys)) == []
    assert index.count(name) == 1


def test_mapping_violations_are_reported_per_document(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = index.create_generation(tenant, 1, mode)
    good = docs_for(tenant, mode, keys)
    extra_field = IndexDocument("poison-extra", {**good[0].source, "injected": "x"}, mode=mode)
    object_value = IndexDocument("poison-object", {**good[1].source, "tokens": {"nested": "x"}}, mode=mode)
    immense = IndexDocument("poison-immense", {**good[2].source, "tokens": ["x" * 40_000]}, mode=mode)
    result = index.bulk_index(
        name, [good[0], extra_field, good[1], object_value, good[2], immense, good[3]], refresh=True
    )
    assert not result.ok
    assert sorted(e.doc_id for e in result.failed) == ["poison-extra", "poison-immense", "poison-object"]
    assert all(e.status == 400 and not e.retryable for e in result.failed)
    assert {e.error_type for e in result.failed} <= {"strict_dynamic_mapping_exception", "document_parsing_exception"}
    assert all("x" * 50 not in e.reason for e in result.failed)  # no document content in reasons
    assert sorted(result.indexed) == sorted(d.doc_id for d in good)
    assert index.count(name) == 4
    with pytest.raises(SearchError) as err:
        result.raise_for_failures()
    assert not err.value.retryable and "poison-extra" in str(err.value)


def test_rejected_items_are_retried_per_item(backend, mode):
    tenant = backend.tenant()
    keys = keys_for(tenant, mode)
    docs = docs_for(tenant, mode, keys)
    rejector = _Rejector({docs[1].doc_id, docs[3].doc_id}, times=2)
    index = backend.make(rejector)
    name = index.create_generation(tenant, 1, mode)
    result = index.bulk_index(name, docs, refresh=True)
    assert result.ok and result.attempts == 3
    assert sorted(result.indexed) == sorted(d.doc_id for d in docs)
    assert index.count(name) == 4

    # Rejected beyond the retry budget: reported as retryable failures, never "all good".
    more = docs_for(tenant, mode, keys, [Record("Lead", f"00Q{i:05d}", {"Company": f"Company {i}"}) for i in range(3)])
    stubborn = _Rejector({more[0].doc_id}, times=99)
    index2 = backend.make(stubborn)
    result = index2.bulk_index(name, more, refresh=True)
    assert not result.ok and [e.doc_id for e in result.failed] == [more[0].doc_id]
    assert result.failed[0].retryable and result.failed[0].status == 429 and result.attempts == 5
    with pytest.raises(ServiceUnavailableError):
        result.raise_for_failures()
    assert index2.count(name) == 6


def test_bulk_into_a_missing_index_never_creates_it(backend):
    index, tenant = backend.make(), backend.tenant()
    with pytest.raises(SearchError):
        index.bulk_index(index_name(tenant, 7), docs_for(tenant, IndexMode.PLAINTEXT, None))
    assert index.describe_generation(index_name(tenant, 7)) is None
    with pytest.raises(ValidationError):
        index.bulk_index("*", [])  # only generation names are accepted


def test_write_block_fails_items_until_lifted(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = index.create_generation(tenant, 1, mode)
    index.set_write_block(name)
    assert index.describe_generation(name).write_blocked
    blocked = index.bulk_index(name, docs_for(tenant, mode, keys))
    assert len(blocked.failed) == 4 and all(e.status == 403 and not e.retryable for e in blocked.failed)
    index.set_write_block(name, False)
    assert not index.describe_generation(name).write_blocked
    assert index.bulk_index(name, docs_for(tenant, mode, keys), refresh=True).ok and index.count(name) == 4


def test_delete_documents(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = live(index, tenant, 1, mode, keys)
    gone = docs_for(tenant, mode, keys, RECORDS[:2])
    result = index.delete_documents(name, [d.doc_id for d in gone] + ["never-indexed"], refresh=True)
    assert result.ok and len(result.indexed) == 2 and result.skipped == ("never-indexed",)
    assert index.count(name) == 2
    assert ids(index.search(tenant, Query("quokkafarm"), keys)) == ["500Qz00000CASE01"]


# --- generations and aliases -------------------------------------------------------------


def test_create_generation_is_idempotent_and_detects_drift(backend):
    index, tenant = backend.make(), backend.tenant()
    name = index.create_generation(tenant, 1, IndexMode.KEYED)
    assert name == f"archive-{tenant}--1"
    assert index.create_generation(tenant, 1, IndexMode.KEYED) == name
    with pytest.raises(SearchError) as err:
        index.create_generation(tenant, 1, IndexMode.PLAINTEXT)  # same name, other mapping marker
    assert name in str(err.value) and "incompatible" in str(err.value)
    info = index.describe_generation(name)
    assert (info.tenant, info.generation, info.mode, info.completed_records, info.is_current) == (
        tenant,
        1,
        IndexMode.KEYED,
        None,
        False,
    )
    with pytest.raises(ValidationError):
        index.create_generation("Acme/../other", 1, IndexMode.KEYED)
    with pytest.raises(ValidationError):
        index.count("archive-*")


def test_list_generations_is_per_tenant(backend):
    index, tenant = backend.make(), backend.tenant()
    neighbour = f"{tenant}-corp"  # archive-<tenant>-corp--3 must not count as <tenant>'s
    backend.tenants.append(neighbour)
    for gen in (2, 1, 10):
        index.create_generation(tenant, gen, IndexMode.PLAINTEXT)
    index.create_generation(neighbour, 3, IndexMode.PLAINTEXT)
    index.swap_alias(tenant, index_name(tenant, 2), expected_current=None)
    gens = index.list_generations(tenant)
    assert [g.generation for g in gens] == [1, 2, 10]
    assert [g.is_current for g in gens] == [False, True, False]
    assert [g.generation for g in index.list_generations(neighbour)] == [3]


def test_alias_swap_is_conditional_and_atomic(backend):
    index, tenant = backend.make(), backend.tenant()
    g1 = live(index, tenant, 1, IndexMode.PLAINTEXT, None, RECORDS[:1])
    g2 = index.create_generation(tenant, 2, IndexMode.PLAINTEXT)
    assert index.bulk_index(g2, docs_for(tenant, IndexMode.PLAINTEXT, None), refresh=True).ok
    g3 = index.create_generation(tenant, 3, IndexMode.PLAINTEXT)
    assert index.current_index(tenant) == g1

    with pytest.raises(AliasConflictError):  # the alias exists: "expected none" is wrong
        index.swap_alias(tenant, g2, expected_current=None)
    with pytest.raises(AliasConflictError):  # wrong expected current
        index.swap_alias(tenant, g2, expected_current=g3)
    assert index.current_index(tenant) == g1
    assert index.search(tenant, Query(), None).total == 1

    index.swap_alias(tenant, g2, expected_current=g1)
    assert index.current_index(tenant) == g2
    assert index.search(tenant, Query(), None).total == 4
    index.swap_alias(tenant, g2, expected_current=g1)  # rerun after a crash: no-op (C4)
    with pytest.raises(AliasConflictError):
        index.swap_alias(tenant, g3, expected_current=g1)  # stale caller
    assert index.current_index(tenant) == g2

    with pytest.raises(SearchError):
        index.delete_index(g2)  # the live generation is never deleted
    index.delete_index(g1)
    index.delete_index(g1)  # idempotent
    assert index.describe_generation(g1) is None
    with pytest.raises(ValidationError):
        index.swap_alias(tenant, index_name(backend.tenant(), 1), expected_current=g2)  # another tenant's index

    fresh = backend.tenant()  # no alias yet, but the caller believes there is one
    f1, f2 = (index.create_generation(fresh, g, IndexMode.PLAINTEXT) for g in (1, 2))
    with pytest.raises(AliasConflictError):
        index.swap_alias(fresh, f2, expected_current=f1)
    assert index.current_index(fresh) is None


def test_racing_swaps_have_exactly_one_winner(backend):
    index, tenant = backend.make(), backend.tenant()
    g1 = live(index, tenant, 1, IndexMode.PLAINTEXT, None, RECORDS[:1])
    racers = [index.create_generation(tenant, g, IndexMode.PLAINTEXT) for g in (2, 3, 4, 5)]
    barrier = threading.Barrier(len(racers))
    outcomes: dict[str, str] = {}

    def swap(target: str) -> None:
        barrier.wait()
        try:
            index.swap_alias(tenant, target, expected_current=g1)
            outcomes[target] = "won"
        except AliasConflictError:
            outcomes[target] = "lost"

    threads = [threading.Thread(target=swap, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, o in outcomes.items() if o == "won"]
    assert len(winners) == 1 and len(outcomes) == len(racers)
    assert index.current_index(tenant) == winners[0]  # exactly one index behind the alias
    assert [g.index for g in index.list_generations(tenant) if g.is_current] == winners


# --- rebuild (the ETL) -------------------------------------------------------------------


class CountingRecords:
    def __init__(self, records) -> None:
        self.records, self.reads = list(records), 0

    def __iter__(self):
        for r in self.records:
            self.reads += 1
            yield r


def test_rebuild_is_idempotent(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    many = RECORDS + [Record("Lead", f"00Q{i:05d}", {"Company": f"Company {i}", "Rating": "Hot"}) for i in range(30)]

    # A crashed first run left part of the generation behind, without the marker.
    name = index.create_generation(tenant, 1, mode)
    assert index.bulk_index(name, docs_for(tenant, mode, keys, many[:13])).ok

    source = CountingRecords(many)
    report = rebuild_generation(source, index, tenant, 1, mode, keys, batch_size=7)
    assert report.complete and not report.reused
    assert (report.records_seen, report.count, report.indexed, report.skipped) == (34, 34, 21, 13)
    assert index.describe_generation(name).completed_records == 34
    report.require_complete()

    # Crash between rebuild and swap (C3): the rerun finds the finished generation.
    rerun_source = CountingRecords(many)
    rerun = rebuild_generation(rerun_source, index, tenant, 1, mode, keys, batch_size=7)
    assert rerun.reused and rerun.complete and rerun_source.reads == 0 and rerun.count == 34
    index.swap_alias(tenant, name, expected_current=None)
    assert index.search(tenant, Query("hot"), keys).total == 30


def test_rebuild_reports_poisoned_records_and_stays_incomplete(backend, mode):
    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    poisoned = [
        Record("Note", "002POISON1", {f"Field{i}": "x" for i in range(801)}),  # mapping explosion attempt
        Record("Note", "002POISON2", {"Body": "y" * 200_000}),  # huge field
        Record("Note", "002POISON3", {"bad name": "z"}),
    ]
    report = rebuild_generation(RECORDS + poisoned, index, tenant, 2, mode, keys)
    assert not report.complete and report.rejected_total == 3
    assert sorted(r.record_id for r in report.rejected) == ["002POISON1", "002POISON2", "002POISON3"]
    assert report.count == 4 and report.records_seen == 7
    assert index.describe_generation(report.index).completed_records is None  # never marked finished
    with pytest.raises(SearchError):
        report.require_complete()
    assert "y" * 20 not in repr(report)


def test_rebuild_refuses_keys_that_do_not_fit(backend):
    index, tenant = backend.make(), backend.tenant()
    with pytest.raises(ValidationError):
        rebuild_generation(RECORDS, index, tenant, 1, IndexMode.KEYED, None)
    with pytest.raises(ValidationError):
        rebuild_generation(RECORDS, index, tenant, 1, IndexMode.PLAINTEXT, keys_for(tenant, IndexMode.KEYED))
    assert index.list_generations(tenant) == []


# --- the mode and the alias are checked, not believed (docs/threat-model.md) ---------------


def test_documents_built_for_another_mode_or_none_are_refused_before_sending(backend, mode):
    from archive_kms.errors import IndexModeMismatchError

    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, mode)
    name = index.create_generation(tenant, 1, mode)
    other = IndexMode.PLAINTEXT if mode is IndexMode.KEYED else IndexMode.KEYED
    wrong = docs_for(tenant, other, keys_for(tenant, other))
    unmarked = [IndexDocument(d.doc_id, d.source) for d in docs_for(tenant, mode, keys)]
    for batch in (wrong, unmarked, [*docs_for(tenant, mode, keys)[:2], wrong[2]]):
        with pytest.raises(IndexModeMismatchError, match=f"into {mode.value} index {name}"):
            index.bulk_index(name, batch, refresh=True)
    index.refresh(name)
    assert index.count(name) == 0 and backend.raw_documents(name) == []  # nothing of any batch was sent


def test_a_bound_search_uses_the_recorded_mode_and_refuses_a_contradicting_marker(backend):
    from archive_kms.errors import SearchBindingError

    index, tenant = backend.make(), backend.tenant()
    keys = keys_for(tenant, IndexMode.KEYED)
    name = live(index, tenant, 1, IndexMode.KEYED, keys)
    assert ids(index.search(tenant, Query("quokkafarm"), keys, index=name, mode=IndexMode.KEYED)) == sorted(
        ["001Qz00000AbCdEFGH", "500Qz00000CASE01"]
    )
    # someone rewrites the marker to "plaintext": neither a keyed nor a plaintext query is sent
    backend.raw_set_mode(name, IndexMode.PLAINTEXT)
    with pytest.raises(SearchBindingError, match="was created keyed"):
        index.search(tenant, Query("quokkafarm"), keys, index=name, mode=IndexMode.KEYED)
    with pytest.raises(ValidationError):  # the caller's recorded mode decides which keys fit
        index.search(tenant, Query("quokkafarm"), None, index=name, mode=IndexMode.KEYED)
    with pytest.raises(ValidationError, match="both index and mode"):
        index.search(tenant, Query("quokkafarm"), keys, index=name)


def test_an_alias_on_an_index_that_is_not_the_tenants_generation_is_refused(backend):
    from archive_kms.errors import SearchBindingError

    index, tenant = backend.make(), backend.tenant()
    live(index, tenant, 1, IndexMode.KEYED, keys_for(tenant, IndexMode.KEYED))
    backend.raw_alias_to(f"archive-{tenant}", f"forged-{tenant}")
    with pytest.raises(SearchBindingError, match=f"forged-{tenant}"):
        index.current_index(tenant)
    with pytest.raises(SearchBindingError):
        index.search(tenant, Query("quokkafarm"), keys_for(tenant, IndexMode.KEYED))
