"""At cutover the registry (key mode) and the alias (index generation) move one after the
other. A search that lands in between meets an index of the other mode than the registry
says; it must answer from that index, never fail (faults E7)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from archive_kms.errors import IndexModeMismatchError
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import IndexMode, Query, derive_search_keys, index_name, rebuild_generation
from archive_kms.state.port import KeyMode


def _tenant() -> tuple[Platform, list]:
    p = Platform.in_memory()
    create_tenant(p, "acme", provision_storage=False)
    spec = JobSpec("j1", "acme", "synthetic", synthetic={"count": 12, "seed": 4})
    submit_job(p.state, spec, p.open_archive)
    return p, [r for r, _ in spec.materialise()]


def _keyed_generation(p: Platform, records: list) -> str:
    keys = derive_search_keys(p.keychain.search_key_material("acme"), "acme")
    rebuild_generation(records, p.index, "acme", 2, IndexMode.KEYED, keys).require_complete()
    return index_name("acme", 2)


def _ids(result) -> set[str]:
    assert result.failures == []
    return {h.record_id for h in result.hits}


def test_registry_moved_first_search_answers_from_the_plaintext_index():
    p, records = _tenant()
    before = _ids(p.open_archive("acme").search(Query(limit=100)))
    _keyed_generation(p, records)
    t = p.state.get_tenant("acme")
    p.state.update_tenant(replace(t, key_mode=KeyMode.BYOKMS, index_generation=2))  # alias not swapped yet
    archive = p.open_archive("acme")
    assert archive.search_keys is not None  # the registry says keyed ...
    assert _ids(archive.search(Query(limit=100))) == before == {r.record_id for r in records}  # ... the index decides


def test_alias_moved_first_search_answers_from_the_keyed_index():
    p, records = _tenant()
    archive = p.open_archive("acme")  # opened while the tenant is managed: no keys
    assert archive.search_keys is None
    p.index.swap_alias("acme", _keyed_generation(p, records), expected_current=index_name("acme", 1))
    assert _ids(archive.search(Query(limit=100))) == {r.record_id for r in records}


def test_without_a_key_source_the_mismatch_is_reported():
    p, records = _tenant()
    p.index.swap_alias("acme", _keyed_generation(p, records), expected_current=index_name("acme", 1))
    with pytest.raises(IndexModeMismatchError, match="needs the tenant's SearchKeys"):
        p.index.search("acme", Query(), None)
