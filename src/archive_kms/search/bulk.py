"""Bulk responses item by item, and the per-item retry loop (faults.md C2, C6).

Both backends produce Elasticsearch-shaped bulk responses (``{"errors": bool, "items":
[{"<op>": {"_id", "status", "error": {"type", "reason"}}}]}``) and share this loop, so the
parsing that decides "written / already there / retry / failed" is one piece of code.

Rules:
* 200/201 ⇒ written; 409 ``version_conflict_engine_exception`` ⇒ the index already holds
  this document at this version or newer (a retried create) ⇒ skipped; a delete that
  found nothing (404, ``not_found``) ⇒ skipped.
* 429, 5xx and the retryable error types below ⇒ retried, only those items, with capped
  exponential backoff and jitter (``archive_kms.retry.rounds``); still failing after
  ``max_attempts`` ⇒ failed with ``retryable=True``.
* Anything else (mapping errors, 403 write block, 400) ⇒ failed at once, per document.
* A response that says ``errors: true`` but shows no failed item, or that lacks items,
  never counts as success: those items are retried and, if it persists, failed.
* Error reasons are sanitised: Elasticsearch quotes field values ("Preview of field's
  value: …"), which must not reach logs or reports.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from archive_kms import retry
from archive_kms.retry import Backoff
from archive_kms.search.port import BulkItemError, BulkResult

T = TypeVar("T")

RETRYABLE_TYPES = frozenset(
    {
        "es_rejected_execution_exception",
        "circuit_breaking_exception",
        "unavailable_shards_exception",
        "no_shard_available_action_exception",
        "node_not_connected_exception",
        "node_disconnected_exception",
        "process_cluster_event_timeout_exception",
    }
)

MAX_REASON_CHARS = 200
_PREVIEW_MARKERS = ("Preview of field's value", "preview of field's value")


def safe_reason(reason: object) -> str:
    """An error reason without quoted document content, bounded in length."""
    text = str(reason or "")
    for marker in _PREVIEW_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut].rstrip(" .") + " (value withheld)"
    return text[:MAX_REASON_CHARS]


def classify_item(item: Mapping[str, Any]) -> tuple[str, BulkItemError | None]:
    """One bulk response item → ``("ok"|"skip"|"retry"|"fail", error or None)``."""
    body = next(iter(item.values()), None) if isinstance(item, Mapping) and len(item) == 1 else None
    if not isinstance(body, Mapping):
        return "retry", BulkItemError("?", 0, "malformed_item", "bulk response item is malformed", True)
    doc_id = str(body.get("_id", "?"))
    status = body.get("status")
    status = status if isinstance(status, int) else 0
    error = body.get("error")
    if isinstance(error, Mapping):
        etype, reason = str(error.get("type", "unknown")), safe_reason(error.get("reason"))
    else:
        etype, reason = ("unknown", "") if error is not None else ("", "")
    if error is None and 200 <= status < 300:
        return "ok", None
    if status == 409 and etype == "version_conflict_engine_exception":
        return "skip", None
    if status == 404 and error is None and body.get("result") == "not_found":
        return "skip", None
    if status == 429 or status >= 500 or etype in RETRYABLE_TYPES or status == 0:
        return "retry", BulkItemError(doc_id, status, etype or "unknown", reason, True)
    return "fail", BulkItemError(doc_id, status, etype or "unknown", reason, False)


def _item_failed(item: Any) -> bool:
    body = next(iter(item.values()), None) if isinstance(item, Mapping) and len(item) == 1 else None
    if not isinstance(body, Mapping):
        return True
    status = body.get("status")
    return "error" in body or not isinstance(status, int) or status >= 300


def parse_bulk_response(response: Mapping[str, Any], doc_ids: Sequence[str]) -> list[tuple[str, BulkItemError | None]]:
    """Outcomes in request order, one per id in ``doc_ids``."""
    items = response.get("items") if isinstance(response, Mapping) else None
    items = items if isinstance(items, list) else []
    out: list[tuple[str, BulkItemError | None]] = []
    for i, doc_id in enumerate(doc_ids):
        if i >= len(items):
            out.append(("retry", BulkItemError(doc_id, 0, "missing_item", "no item in the bulk response", True)))
            continue
        kind, err = classify_item(items[i])
        body: Any = next(iter(items[i].values()), {}) if isinstance(items[i], Mapping) and items[i] else {}
        if isinstance(body, Mapping) and body.get("_id") not in (None, doc_id):
            kind, err = "retry", BulkItemError(doc_id, 0, "mismatched_item", "bulk response items out of order", True)
        if err is not None and err.doc_id != doc_id:
            err = BulkItemError(doc_id, err.status, err.error_type, err.reason, err.retryable)
        out.append((kind, err))
    if response.get("errors") is True and not any(_item_failed(item) for item in items):
        # The flag says something failed but no item shows it: trust nothing.
        out = [
            ("retry", BulkItemError(d, 0, "inconsistent_response", "errors=true without a failed item", True))
            for d in doc_ids
        ]
    return out


def run_bulk(
    index: str,
    items: Sequence[T],
    *,
    doc_id: Callable[[T], str],
    send: Callable[[Sequence[T]], Mapping[str, Any]],
    max_attempts: int = 5,
    backoff: float = 0.2,
    max_backoff: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> BulkResult:
    """Send ``items`` (one bulk request per round), retrying only the retryable items.

    ``send`` raises the translated error for a failure of the whole request; items of
    earlier rounds stay written (deterministic ids make resending everything safe)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    indexed: list[str] = []
    skipped: list[str] = []
    failed: list[BulkItemError] = []
    pending = list(items)
    last_errors: list[BulkItemError] = []

    def one_round() -> bool:
        """Send what is pending; keep the retryable items pending. True: some are."""
        ids = [doc_id(x) for x in pending]
        outcomes = parse_bulk_response(send(pending), ids)
        retry: list[T] = []
        last_errors.clear()
        for item, the_id, (kind, err) in zip(pending, ids, outcomes, strict=True):
            if kind == "ok":
                indexed.append(the_id)
            elif kind == "skip":
                skipped.append(the_id)
            elif kind == "retry":
                retry.append(item)
                last_errors.append(err)  # type: ignore[arg-type]
            else:
                failed.append(err)  # type: ignore[arg-type]
        pending[:] = retry
        return bool(retry)

    attempt = 0
    if pending:
        schedule = Backoff(max_attempts=max_attempts, base_delay=min(backoff, max_backoff), max_delay=max_backoff)
        attempt = retry.rounds(one_round, backoff=schedule, sleep=sleep, rand=jitter)
    if pending:  # the budget ran out
        failed.extend(last_errors)
    return BulkResult(
        index=index, indexed=tuple(indexed), skipped=tuple(skipped), failed=tuple(failed), attempts=attempt
    )
