"""Fixtures for the migration-flow tests on the real services (LocalStack S3+KMS, Azurite,
Elasticsearch, the Key Vault emulator, PyKMIP).

Every test gets its own SQLite state store (a temp file) and its own tenant ids, so tests
do not see each other's runs, leases or gates; buckets, containers and indices live on
the shared services and are removed at teardown (best effort).

Stable names (other test modules import them): ``flow_settings``, ``flow_platform``,
``new_tenant_id``, ``archived_tenant`` (-> ``ArchivedTenant``), ``customer_key``
(customer_keys.py), and the plain function ``invariants``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.domain.records import Record
from archive_kms.migration.copying import read_plaintext_digest
from archive_kms.operations.archive import RECORD_PREFIX, JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search.documents import document_id
from archive_kms.search.naming import index_pattern
from archive_kms.state.port import GateState
from archive_kms.storage import Location

sys.path.insert(0, str(Path(__file__).resolve().parent))  # customer_keys, whatever the import mode
from customer_keys import customer_key  # noqa: F401 - the fixture, registered here

#: The lease of a test run: short, so a crash-resume test can take over after a few seconds.
FLOW_LEASE_TTL_SECONDS = 5


@pytest.fixture
def flow_settings(localstack: Settings, azurite: Settings, elasticsearch: Settings, tmp_path) -> Settings:
    """Settings on the real stack, with the state store in a per-test SQLite file."""
    update: dict[str, Any] = {"state_url": f"sqlite:///{tmp_path / 'state.db'}"}
    if "lease_ttl_seconds" in Settings.model_fields:
        update["lease_ttl_seconds"] = FLOW_LEASE_TTL_SECONDS
    return localstack.model_copy(update=update)


@pytest.fixture
def flow_platform(flow_settings: Settings, _flow_cleanup: list[str]):
    platform = Platform.from_settings(flow_settings)
    yield platform
    _teardown_tenants(platform, _flow_cleanup)


@pytest.fixture
def _flow_cleanup() -> list[str]:
    """Tenant ids created by a test (new_tenant_id appends; flow_platform cleans up)."""
    return []


@pytest.fixture
def new_tenant_id(_flow_cleanup: list[str]) -> Callable[[], str]:
    """Unique lowercase tenant ids (``f`` + 8 hex digits)."""

    def make() -> str:
        tid = f"f{uuid.uuid4().hex[:8]}"
        _flow_cleanup.append(tid)
        return tid

    return make


# --- an archived tenant ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedTenant:
    tenant_id: str
    cloud: str
    records: list[Record]
    snapshot: dict[bytes, str]  # object name -> plaintext SHA-256, as archived
    job_id: str
    spec: JobSpec

    @property
    def record_count(self) -> int:
        return len(self.records)


def storage_snapshot(platform: Any, tenant_id: str, location: Location | None = None) -> dict[bytes, str]:
    """{object name: plaintext SHA-256} of every object at the tenant's location, each
    decrypted end to end (IntegrityError if one does not authenticate)."""
    loc = location or platform.location_of(tenant_id)
    store = platform.store_for(loc)
    names = [info.name for info in store.list()]

    def digest(name: bytes) -> tuple[bytes, str]:
        return name, read_plaintext_digest(store, platform.keychain, tenant_id, name)[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(digest, names))


@pytest.fixture
def archived_tenant(flow_platform, new_tenant_id) -> Callable[..., ArchivedTenant]:
    """Create a managed-key tenant on shared storage (``cloud``) and archive ``records``
    synthetic records with attachments through an archive job."""

    def make(cloud: str, records: int = 25, seed: int = 7) -> ArchivedTenant:
        tid = new_tenant_id()
        create_tenant(flow_platform, tid, cloud=cloud, actor="test")

        def spec_for(s: int) -> JobSpec:
            return JobSpec(
                f"{tid}-seed",
                tid,
                "synthetic",
                synthetic={"count": records, "seed": s, "mix": "small", "workspaces": 2},
            )

        # The generator is seeded with (seed, tenant id) and tenant ids are random: with few
        # records a draw can hold no attachment at all. Take the first seed that has one.
        spec = next(spec_for(s) for s in range(seed, seed + 100) if any(atts for _, atts in spec_for(s).materialise()))
        out = submit_job(flow_platform.state, spec, flow_platform.open_archive)
        assert out.decision == "run" and out.records == records, out
        assert out.attachments > 0, "the synthetic mix produced no attachments"
        recs = [r for r, _ in spec.materialise()]
        snap = storage_snapshot(flow_platform, tid)
        assert len(snap) == out.records + out.attachments
        return ArchivedTenant(tid, cloud, recs, snap, spec.job_id, spec)

    return make


# --- running a flow --------------------------------------------------------------------------------


def run_plan(platform: Any, plan: Any, *, actor: str = "test", hooks: Any = None) -> Any:
    """Trigger ``plan`` and execute it in this process (shards in threads); the Outcome."""
    from archive_kms.migration import execute, thread_shard_runner, trigger

    run, created = trigger(platform, plan, actor=actor)
    assert created, f"a run was already going for {plan.tenant_id}: {run.run_id}"
    return execute(platform, run.run_id, actor=actor, shard_runner=thread_shard_runner, hooks=hooks)


# --- invariants -----------------------------------------------------------------------------------


def es_documents(platform: Any, index: str) -> list[dict[str, Any]]:
    """Every raw document of ``index`` (``_id`` and ``_source``), read past the adapter."""
    es = clients.elasticsearch_client(platform.settings)
    es.indices.refresh(index=index)
    out: list[dict[str, Any]] = []
    after: list[Any] | None = None
    while True:
        kw: dict[str, Any] = {"index": index, "query": {"match_all": {}}, "size": 500, "sort": [{"_doc": "asc"}]}
        if after is not None:
            kw["search_after"] = after
        hits = es.search(**kw)["hits"]["hits"]
        if not hits:
            return out
        out.extend({"_id": h["_id"], "_source": h["_source"]} for h in hits)
        after = hits[-1]["sort"]


def tenant_indices(platform: Any, tenant_id: str) -> list[str]:
    """The tenant's concrete generation indices that exist in Elasticsearch."""
    es = clients.elasticsearch_client(platform.settings)
    return sorted(es.indices.get(index=index_pattern(tenant_id), expand_wildcards="all").keys())


def invariants(platform: Any, tenant: str, snapshot: dict[bytes, str], *, extra_records: int = 0) -> dict[str, Any]:
    """After a flow settles: the tenant's data is intact and single (faults I1-I5).

    - I1/I3: every snapshot object exists exactly once at the tenant's current location,
      with the same plaintext digest; no object that is not in the snapshot.
    - I2/I4: the current index holds exactly one document per record object in storage
      (ids derived from the stored records), and no other generation index remains.
    - I5: no pending (uncommitted) uploads at the location.
    - the tenant's lease is released and its archive gate is open.

    ``extra_records``: records archived after the snapshot (deferred jobs); their objects
    are allowed beyond the snapshot, and counted.
    """
    t = platform.state.get_tenant(tenant)
    loc = Location.from_dict(t.location)
    store = platform.store_for(loc)
    listed: dict[bytes, int] = {}
    for info in store.list():
        listed[info.name] = listed.get(info.name, 0) + 1
    duplicated = {n: c for n, c in listed.items() if c > 1}
    assert not duplicated, f"objects listed more than once at {loc.uri}: {sorted(duplicated)[:5]!r}"
    missing = set(snapshot) - set(listed)
    assert not missing, f"{len(missing)} snapshot object(s) lost at {loc.uri}: {sorted(missing)[:5]!r}"
    now = storage_snapshot(platform, tenant, loc)
    changed = sorted(n for n in snapshot if now[n] != snapshot[n])
    assert not changed, f"{len(changed)} object(s) changed plaintext: {changed[:5]!r}"
    extra = set(listed) - set(snapshot)
    extra_record_objects = sorted(n for n in extra if n.startswith(RECORD_PREFIX))
    if not extra_records:
        assert not extra, f"{len(extra)} object(s) at {loc.uri} not in the snapshot: {sorted(extra)[:5]!r}"
    else:
        assert len(extra_record_objects) == extra_records, (len(extra_record_objects), extra_records)

    # Index: one document per stored record, ids derived from what storage holds.
    keys = platform.search_keys(tenant, t.key_mode)
    archive = platform.open_archive(tenant)
    record_names = sorted(n for n in listed if n.startswith(RECORD_PREFIX))

    def doc_id_of(name: bytes) -> str:
        return document_id(tenant, Record.from_json(b"".join(archive.read_object(name))), keys)

    with ThreadPoolExecutor(max_workers=8) as pool:
        expected_ids = list(pool.map(doc_id_of, record_names))
    current = platform.index.current_index(tenant)
    assert current is not None, f"tenant {tenant} has no index behind its alias"
    docs = es_documents(platform, current)
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids)), "duplicate document ids in the index"
    assert set(ids) == set(expected_ids) and len(ids) == len(expected_ids), (
        f"index {current}: {len(ids)} documents, storage holds {len(expected_ids)} records; "
        f"{len(set(expected_ids) - set(ids))} unindexed, {len(set(ids) - set(expected_ids))} without a record"
    )
    indices = tenant_indices(platform, tenant)
    assert indices == [current], f"tenant {tenant} has indices {indices}, expected only {current}"

    pending = list(store.pending_uploads())
    assert not pending, f"{len(pending)} pending upload(s) at {loc.uri}: {[p.key for p in pending[:3]]}"
    lease = platform.state.get_lease(tenant)
    assert lease is None, f"tenant {tenant}'s lease is still held by run {lease.run_id}"
    gate = platform.state.gate(tenant)
    assert gate.state is GateState.OPEN and gate.pending == 0, gate
    return {
        "location": loc.uri,
        "objects": len(listed),
        "snapshot_objects": len(snapshot),
        "records": len(record_names),
        "extra_objects": len(extra),
        "index": current,
        "documents": len(ids),
        "pending_uploads": 0,
    }


@pytest.fixture
def check_invariants() -> Callable[..., dict[str, Any]]:
    """``invariants`` as a fixture, for modules that prefer not to import from conftest."""
    return invariants


# --- teardown -------------------------------------------------------------------------------------


def _teardown_tenants(platform: Any, tenants: list[str]) -> None:
    """Delete what the tests left on the shared services: every location the tenant used
    or was about to use, and its indices. A failure here must not hide the test's own
    result, so it becomes a warning naming what was left behind."""
    import warnings

    from archive_kms.storage import (
        dedicated_azure_location,
        dedicated_s3_location,
        shared_azure_location,
        shared_s3_location,
    )

    es = clients.elasticsearch_client(platform.settings)
    s = platform.settings
    for tid in tenants:
        candidates = [
            shared_s3_location(tid, s.shared_bucket),
            dedicated_s3_location(tid, sse_kms_key_arn=None),
            shared_azure_location(tid, s.shared_azure_account),
            dedicated_azure_location(tid, account=s.shared_azure_account),
        ]
        for loc in candidates:
            for attempt in range(2):
                try:
                    _delete_location(platform, loc)
                    break
                except Exception as exc:  # noqa: BLE001 - reported below, never raised
                    if attempt:
                        warnings.warn(
                            f"flow test teardown left {loc.uri}: {type(exc).__name__}: {exc}"[:300], stacklevel=1
                        )
        try:
            es.indices.delete(index=index_pattern(tid), expand_wildcards="all", ignore_unavailable=True)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"flow test teardown left indices of {tid}: {type(exc).__name__}", stacklevel=1)


def _delete_location(platform: Any, loc: Location) -> None:
    if not platform.provisioner.exists(loc):
        return
    store = platform.store_for(loc)
    if loc.cloud.value == "s3" and loc.kind.value == "shared":  # a prefix of the shared bucket
        for info in list(store.list()):
            store.delete(info.name)
        store.abort_stale_uploads(timedelta(0))
    else:
        platform.provisioner.delete(loc, store)


__all__ = [
    "FLOW_LEASE_TTL_SECONDS",
    "ArchivedTenant",
    "es_documents",
    "invariants",
    "run_plan",
    "storage_snapshot",
    "tenant_indices",
]
