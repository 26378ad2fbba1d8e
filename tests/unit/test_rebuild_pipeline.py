"""How rebuild_generation overlaps its work (search/rebuild.py, ADR 0044): a new generation
is created while the first records are read, batches grow up to batch_size, a failed
creation fails the rebuild, and an existing generation is still checked before a record
is read."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import SearchError, ServiceUnavailableError
from archive_kms.search.memory import MemorySearchIndex
from archive_kms.search.port import IndexMode
from archive_kms.search.rebuild import rebuild_generation
from archive_kms.search.tokens import derive_search_keys
from archive_kms.synthetic import generate_records

TENANT = "pipeline-tenant"


def _records(n: int) -> list[Any]:
    return [r for r, _ in generate_records(TENANT, n, seed=11, workspaces=2)]


class Recording(MemorySearchIndex):
    """The in-memory index (held to the contract suite), noting calls and batch sizes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batches: list[int] = []
        self.calls: list[str] = []
        self.create_hook = lambda: None

    def create_generation(self, tenant: str, generation: int, mode: IndexMode) -> str:
        self.calls.append("create")
        self.create_hook()
        return super().create_generation(tenant, generation, mode)

    def bulk_index(self, index_name: str, docs: Any, *, refresh: bool = False) -> Any:
        docs = list(docs)
        self.batches.append(len(docs))
        return super().bulk_index(index_name, docs, refresh=refresh)


class Counting:
    def __init__(self, records: list[Any], on_first: Any = None) -> None:
        self.records, self.reads, self.on_first = records, 0, on_first

    def __iter__(self) -> Iterator[Any]:
        for r in self.records:
            self.reads += 1
            if self.reads == 1 and self.on_first is not None:
                self.on_first()
            yield r


def test_a_new_generation_is_created_while_the_first_records_are_read() -> None:
    index, first_read = Recording(), threading.Event()
    # The creation finishes only once a record was read: a rebuild that created the
    # generation before reading would fail here instead of waiting forever.
    index.create_hook = lambda: first_read.wait(30) or pytest.fail("no record read while the index was created")
    source = Counting(_records(40), on_first=first_read.set)
    report = rebuild_generation(source, index, TENANT, 1, IndexMode.PLAINTEXT, None, batch_size=8)
    assert report.complete and report.count == 40 and index.calls == ["create"]
    assert index.describe_generation(report.index).completed_records == 40


def test_batches_grow_from_a_quarter_to_batch_size() -> None:
    index = Recording()
    report = rebuild_generation(_records(30), index, TENANT, 1, IndexMode.PLAINTEXT, None, batch_size=8)
    assert report.complete and index.batches == [2, 4, 8, 8, 8]
    index = Recording()
    report = rebuild_generation(_records(3), index, TENANT, 2, IndexMode.PLAINTEXT, None, batch_size=1)
    assert report.complete and index.batches == [1, 1, 1]


def test_a_failed_creation_fails_the_rebuild_and_marks_nothing() -> None:
    index = Recording()

    def refuse() -> None:
        raise ServiceUnavailableError("create index failed: Elasticsearch unreachable", resource="x")

    index.create_hook = refuse
    source = Counting(_records(100))
    with pytest.raises(ServiceUnavailableError):
        rebuild_generation(source, index, TENANT, 1, IndexMode.PLAINTEXT, None, batch_size=8, bulk_concurrency=2)
    assert index.batches == [] and index.list_generations(TENANT) == []
    assert source.reads < 100  # it stopped at the first batch that needed the index
    with pytest.raises(ServiceUnavailableError):  # no record at all: still an error
        rebuild_generation([], index, TENANT, 1, IndexMode.PLAINTEXT, None)


def test_an_existing_generation_is_created_and_checked_before_a_record_is_read() -> None:
    index = Recording()
    first = rebuild_generation(_records(20), index, TENANT, 1, IndexMode.PLAINTEXT, None, batch_size=8)
    assert first.complete
    source = Counting(_records(20))
    again = rebuild_generation(source, index, TENANT, 1, IndexMode.PLAINTEXT, None, batch_size=8)
    assert again.reused and source.reads == 0 and index.calls == ["create", "create"]


def test_a_generation_of_the_other_mode_is_refused_before_a_record_is_read() -> None:
    """An existing plaintext generation never takes a keyed rebuild's documents (nor the
    reverse): the name is taken, so the rebuild creates synchronously and the mapping
    check refuses it; bulk_index's per-call mode check stays behind it (contract suite)."""
    index = Recording()
    name = index.create_generation(TENANT, 1, IndexMode.PLAINTEXT)
    keys = derive_search_keys(SecretBytes.random(32), TENANT)
    source = Counting(_records(10))
    with pytest.raises(SearchError, match="incompatible mapping"):
        rebuild_generation(source, index, TENANT, 1, IndexMode.KEYED, keys, batch_size=4)
    assert index.count(name) == 0 and source.reads == 0 and index.batches == []


def test_keys_wiped_during_a_rebuild_leave_it_incomplete() -> None:
    index = Recording()
    keys = derive_search_keys(SecretBytes.random(32), TENANT)
    records = _records(30)

    def wiping() -> Iterator[Any]:
        for i, r in enumerate(records):
            if i == 10:
                keys.wipe()
            yield r

    report = rebuild_generation(wiping(), index, TENANT, 1, IndexMode.KEYED, keys, batch_size=4)
    assert not report.complete and report.rejected_total == 20
    assert all("wiped" in r.reason for r in report.rejected)
    assert index.describe_generation(report.index).completed_records is None
    with pytest.raises(Exception, match="incomplete"):
        report.require_complete()
