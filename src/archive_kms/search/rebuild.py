"""The ETL: build a new index generation from what is in storage.

``rebuild_generation`` creates the generation, indexes the records in batches, refreshes,
verifies that the index holds exactly as many documents as records were read, and marks
the generation complete in its ``_meta``. It does **not** swap the alias: the caller
checks ``report.complete`` (or calls ``report.require_complete()``) and then calls
``SearchIndex.swap_alias``.

Reruns converge (faults.md C1, C3):
* a generation already marked complete whose count still equals its marker is reused
  without reading a single record (``report.reused``): a crash between the rebuild and
  the alias swap costs no second full reindex;
* otherwise the rebuild runs again into the same index; deterministic ids make every
  document it already holds a ``skipped`` write, never a duplicate.

Records the index would refuse (bad field names, oversized values, too many terms:
faults.md F18) are reported per record in ``report.rejected`` and never indexed; any
rejected or failed record makes the report incomplete, so a cutover cannot silently lose
records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from archive_kms.domain.records import Record
from archive_kms.errors import SearchError, ValidationError
from archive_kms.search.documents import build_document
from archive_kms.search.naming import check_generation, check_tenant_id, index_name
from archive_kms.search.port import BulkItemError, GenerationInfo, IndexDocument, IndexMode, SearchIndex
from archive_kms.search.tokens import SearchKeys, TokenMemo

log = logging.getLogger(__name__)

MAX_REPORTED = 1_000  # per list: a report stays small even if every record is bad


@dataclass(frozen=True)
class RejectedRecord:
    object_type: str
    record_id: str
    reason: str


@dataclass
class RebuildReport:
    tenant: str
    generation: int
    index: str
    mode: IndexMode
    records_seen: int = 0
    indexed: int = 0
    skipped: int = 0  # already in the index from an earlier run
    count: int = 0  # documents in the index after the final refresh
    rejected: list[RejectedRecord] = field(default_factory=list)
    rejected_total: int = 0
    failed: list[BulkItemError] = field(default_factory=list)
    failed_total: int = 0
    reused: bool = False  # a finished generation was found and nothing was reindexed
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every record seen is in the index, exactly once, and nothing failed."""
        return self.rejected_total == 0 and self.failed_total == 0 and self.count == self.records_seen

    def require_complete(self) -> None:
        """Raise ``SearchError`` unless :attr:`complete`: call before swapping the alias."""
        if not self.complete:
            raise SearchError(
                f"rebuild of {self.index} is incomplete: {self.records_seen} records read, {self.count} documents "
                f"indexed, {self.rejected_total} rejected, {self.failed_total} failed; not swapping",
                resource=self.index,
            )


def rebuild_generation(
    records: Iterable[Record],
    index: SearchIndex,
    tenant: str,
    gen: int,
    mode: IndexMode,
    keys: SearchKeys | None,
    batch_size: int = 500,
    *,
    clock: Callable[[], float] = time.monotonic,
    bulk_concurrency: int = 3,
) -> RebuildReport:
    """Build generation ``gen`` of ``tenant``'s index from ``records``; see module doc.

    Raises ``ValidationError`` for bad arguments (including keys that do not fit the
    mode), ``SearchError`` for an existing index with an incompatible mapping, and
    ``ServiceUnavailableError`` when Elasticsearch fails as a whole (rerun to resume)."""
    tenant = check_tenant_id(tenant)
    check_generation(gen)
    mode = IndexMode(mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 10_000:
        raise ValidationError("batch_size must be 1..10000")
    if isinstance(bulk_concurrency, bool) or not isinstance(bulk_concurrency, int) or not 1 <= bulk_concurrency <= 16:
        raise ValidationError("bulk_concurrency must be 1..16")
    if mode is IndexMode.KEYED and (keys is None or keys.tenant != tenant):
        raise ValidationError(f"a keyed rebuild of tenant {tenant!r} needs that tenant's SearchKeys")
    if mode is IndexMode.PLAINTEXT and keys is not None:
        raise ValidationError(
            f"refusing a plaintext rebuild of tenant {tenant!r} with SearchKeys: "
            "a keyed tenant must not be indexed in clear"
        )
    started = clock()
    name = index_name(tenant, gen)
    report = RebuildReport(tenant=tenant, generation=gen, index=name, mode=mode)
    described = True
    try:
        found = index.describe_generation(name)
    except SearchError:
        found, described = None, False  # something else holds the name: create_generation says what
    absent = described and found is None
    pool = ThreadPoolExecutor(max_workers=bulk_concurrency + 1, thread_name_prefix="akms-bulk")
    try:
        if absent:
            # A new generation (the usual case): create it while the first records are read
            # and built (creating an index is a cluster-state update, 0.2-0.5 s); every bulk
            # request waits for it. Nothing can be reused from an index that did not exist.
            created: Future[str] = pool.submit(index.create_generation, tenant, gen, mode)
        else:
            created = Future()
            created.set_result(index.create_generation(tenant, gen, mode))
            # The description read above is the existing generation's; read it again
            # only if that read failed.
            info = found if described else index.describe_generation(name)
            if _reusable(index, name, info, report):
                report.seconds = clock() - started
                return report
        _index_records(records, index, created, report, tenant, mode, keys, batch_size, bulk_concurrency, pool)
    finally:
        pool.shutdown(wait=True)

    index.refresh(name)
    report.count = index.count(name)
    if report.complete:
        index.mark_generation_complete(name, report.records_seen)
    else:
        log.warning(
            "rebuild of %s incomplete: %d seen, %d in index, %d rejected, %d failed",
            name,
            report.records_seen,
            report.count,
            report.rejected_total,
            report.failed_total,
        )
    report.seconds = clock() - started
    return report


def _reusable(index: SearchIndex, name: str, info: GenerationInfo | None, report: RebuildReport) -> bool:
    """True (and ``report`` filled in) if ``name`` is a finished generation whose count
    still equals its completion marker (``info``: its description)."""
    if info is None or info.completed_records is None:
        return False
    index.refresh(name)
    count = index.count(name)
    if count == info.completed_records:
        log.info("rebuild of %s: finished generation found (%d documents), reusing it", name, count)
        report.records_seen = report.count = count
        report.reused = True
        return True
    log.warning(
        "rebuild of %s: marker says %d documents but the index holds %d; rebuilding",
        name,
        info.completed_records,
        count,
    )
    return False


def _index_records(
    records: Iterable[Record],
    index: SearchIndex,
    created: Future[str],
    report: RebuildReport,
    tenant: str,
    mode: IndexMode,
    keys: SearchKeys | None,
    batch_size: int,
    bulk_concurrency: int,
    pool: ThreadPoolExecutor,
) -> None:
    """Build a document of every record and bulk-index them into the generation
    ``created`` names, up to ``bulk_concurrency`` requests in flight."""
    name = report.index
    batch: list[IndexDocument] = []
    lock = threading.Lock()
    in_flight: set[Future[None]] = set()
    # The first batches are smaller, so the first requests go out while records are still
    # being read; batches double up to batch_size.
    limit = max(1, batch_size // 4)

    def send(docs: list[IndexDocument]) -> None:
        created.result()  # the generation exists (or its creation's error is raised here)
        result = index.bulk_index(name, docs)
        with lock:
            report.indexed += len(result.indexed)
            report.skipped += len(result.skipped)
            report.failed_total += len(result.failed)
            report.failed.extend(result.failed[: max(0, MAX_REPORTED - len(report.failed))])

    def flush() -> None:
        # Up to ``bulk_concurrency`` bulk requests in flight while the next batch is built
        # (as ``helpers.parallel_bulk`` does); memory: that many batches.
        nonlocal batch, limit
        if not batch:
            return
        docs, batch = batch, []
        limit = min(batch_size, limit * 2)
        while len(in_flight) >= bulk_concurrency:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for f in finished:
                in_flight.discard(f)
                f.result()
        in_flight.add(pool.submit(send, docs))

    memo = TokenMemo(keys) if keys is not None else None  # this rebuild's only: gone when it returns
    for record in records:
        report.records_seen += 1
        try:
            batch.append(build_document(record, tenant=tenant, mode=mode, keys=keys, memo=memo))
        except ValidationError as e:
            report.rejected_total += 1
            if len(report.rejected) < MAX_REPORTED:
                report.rejected.append(
                    RejectedRecord(
                        str(getattr(record, "object_type", "?"))[:100],
                        str(getattr(record, "record_id", "?"))[:255],
                        str(e),
                    )
                )
            continue
        if len(batch) >= limit:
            flush()
    flush()
    for f in list(in_flight):
        f.result()
    created.result()  # every record rejected (or none): the generation must still exist
