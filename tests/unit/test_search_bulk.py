"""Bulk response parsing and the per-item retry loop (faults.md C2), on canned responses."""

from __future__ import annotations

import pytest

from archive_kms.errors import SearchError, ServiceUnavailableError
from archive_kms.search.bulk import classify_item, parse_bulk_response, run_bulk, safe_reason
from archive_kms.search.port import BulkResult


def item(doc_id, status, etype=None, op="index", **extra):
    body = {"_index": "archive-acme-1", "_id": doc_id, "status": status, **extra}
    if etype:
        body["error"] = {"type": etype, "reason": f"{etype} happened"}
    return {op: body}


@pytest.mark.parametrize(
    "it, kind, retryable",
    [
        (item("a", 201), "ok", None),
        (item("a", 200), "ok", None),
        (item("a", 409, "version_conflict_engine_exception"), "skip", None),
        (item("a", 404, op="delete", result="not_found"), "skip", None),
        (item("a", 429, "es_rejected_execution_exception"), "retry", True),
        (item("a", 429, "circuit_breaking_exception"), "retry", True),
        (item("a", 503, "unavailable_shards_exception"), "retry", True),
        (item("a", 500, "some_internal_exception"), "retry", True),
        (item("a", 400, "strict_dynamic_mapping_exception"), "fail", False),
        (item("a", 400, "document_parsing_exception"), "fail", False),
        (item("a", 403, "cluster_block_exception"), "fail", False),
        (item("a", 404, "index_not_found_exception"), "fail", False),
        (item("a", 409, "some_other_conflict"), "fail", False),
        ({"index": "garbage"}, "retry", True),
        ({}, "retry", True),
    ],
)
def test_classify_item(it, kind, retryable):
    got, err = classify_item(it)
    assert got == kind
    assert (err.retryable if err else None) == retryable


def test_reasons_never_quote_document_values():
    reason = (
        "[1:11] failed to parse field [tokens] of type [keyword] in document with id 'c'. "
        "Preview of field's value: 'CUSTOMER SECRET VALUE'"
    )
    cleaned = safe_reason(reason)
    assert "CUSTOMER SECRET" not in cleaned and "failed to parse field [tokens]" in cleaned
    assert len(safe_reason("x" * 10_000)) <= 200
    _, err = classify_item(
        {"index": {"_id": "c", "status": 400, "error": {"type": "document_parsing_exception", "reason": reason}}}
    )
    assert "CUSTOMER SECRET" not in err.reason


def test_errors_flag_without_a_failed_item_is_never_success():
    resp = {"errors": True, "items": [item("a", 201), item("b", 201)]}
    assert [k for k, _ in parse_bulk_response(resp, ["a", "b"])] == ["retry", "retry"]
    ok = {"errors": False, "items": [item("a", 201), item("b", 409, "version_conflict_engine_exception")]}
    assert [k for k, _ in parse_bulk_response(ok, ["a", "b"])] == ["ok", "skip"]


def test_missing_or_mismatched_items_are_not_success():
    resp = {"errors": False, "items": [item("a", 201)]}
    assert [k for k, _ in parse_bulk_response(resp, ["a", "b"])] == ["ok", "retry"]
    swapped = {"errors": False, "items": [item("b", 201), item("a", 201)]}
    assert [k for k, _ in parse_bulk_response(swapped, ["a", "b"])] == ["retry", "retry"]
    assert [k for k, _ in parse_bulk_response({}, ["a"])] == ["retry"]


class FakeCluster:
    """Answers each round from a script: ``{doc_id: [status/etype per attempt]}``;
    unscripted ids are created once and then conflict."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.stored: set[str] = set()
        self.rounds: list[list[str]] = []

    def send(self, batch):
        self.rounds.append(list(batch))
        items = []
        for doc_id in batch:
            plan = self.script.get(doc_id)
            if plan:
                status, etype = plan.pop(0)
                if etype:
                    items.append(item(doc_id, status, etype))
                    continue
            if doc_id in self.stored:
                items.append(item(doc_id, 409, "version_conflict_engine_exception"))
            else:
                self.stored.add(doc_id)
                items.append(item(doc_id, 201))
        return {"errors": any("error" in next(iter(i.values())) for i in items), "items": items}


def test_only_retryable_items_are_retried_with_backoff():
    cluster = FakeCluster(
        {
            "b": [(429, "es_rejected_execution_exception"), (503, "unavailable_shards_exception")],
            "c": [(400, "strict_dynamic_mapping_exception")],
        }
    )
    sleeps: list[float] = []
    result = run_bulk(
        "archive-acme-1",
        ["a", "b", "c", "d"],
        doc_id=lambda x: x,
        send=cluster.send,
        sleep=sleeps.append,
        jitter=lambda: 1.0,
        backoff=0.5,
    )
    assert cluster.rounds == [["a", "b", "c", "d"], ["b"], ["b"]]
    assert result.indexed == ("a", "d", "b") and result.attempts == 3
    assert [(e.doc_id, e.retryable) for e in result.failed] == [("c", False)]
    assert sleeps == [0.5, 1.0]  # exponential
    with pytest.raises(SearchError) as err:
        result.raise_for_failures()
    assert not isinstance(err.value, ServiceUnavailableError) and "c (400 strict_dynamic_mapping_exception)" in str(
        err.value
    )


def test_retry_budget_exhausted_reports_retryable_failures():
    cluster = FakeCluster({"b": [(429, "es_rejected_execution_exception")] * 10})
    sleeps: list[float] = []
    result = run_bulk(
        "archive-acme-1",
        ["a", "b"],
        doc_id=lambda x: x,
        send=cluster.send,
        max_attempts=4,
        sleep=sleeps.append,
        jitter=lambda: 0.0,
        backoff=1.0,
        max_backoff=3.0,
    )
    assert result.attempts == 4 and result.indexed == ("a",) and not result.ok
    assert [(e.doc_id, e.status, e.retryable) for e in result.failed] == [("b", 429, True)]
    assert sleeps == [0.5, 1.0, 1.5]  # capped at max_backoff, jitter in [0.5, 1]
    with pytest.raises(ServiceUnavailableError):
        result.raise_for_failures()


def test_a_retried_bulk_reports_skipped_not_duplicated():
    cluster = FakeCluster({})
    first = run_bulk("archive-acme-1", ["a", "b"], doc_id=lambda x: x, send=cluster.send)
    again = run_bulk("archive-acme-1", ["a", "b"], doc_id=lambda x: x, send=cluster.send)
    assert first.indexed == ("a", "b") and again.indexed == () and again.skipped == ("a", "b") and again.ok


def test_whole_request_failure_propagates():
    def down(_batch):
        raise ServiceUnavailableError("bulk write on archive-acme-1 failed", resource="archive-acme-1")

    with pytest.raises(ServiceUnavailableError):
        run_bulk("archive-acme-1", ["a"], doc_id=lambda x: x, send=down)


def test_empty_bulk_is_ok():
    assert run_bulk("archive-acme-1", [], doc_id=lambda x: x, send=lambda b: {}) == BulkResult("archive-acme-1")
