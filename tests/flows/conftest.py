"""Fixtures for the migration-flow tests on the real services (LocalStack S3+KMS, Azurite,
Elasticsearch, the Key Vault emulator, PyKMIP).

Every test gets its own SQLite state store (a temp file) and its own tenant ids, so tests
do not see each other's runs, leases or gates; buckets, containers and indices live on
the shared services and are removed at teardown (best effort).

Stable names (other test modules import them): ``flow_settings``, ``flow_platform``,
``new_tenant_id``, ``archived_tenant`` (-> ``ArchivedTenant``), ``customer_key`` and
``cli_env`` (customer_keys.py), and the plain functions ``invariants`` (I1-I7), ``audit_holds`` (I6)
and ``secrets_absent`` (I7). The fault tier (``tests/faults``) loads this module too.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from collections.abc import Callable, Iterable
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
from archive_kms.state.port import GateState, RunState, StepState
from archive_kms.storage import Location

sys.path.insert(0, str(Path(__file__).resolve().parent))  # customer_keys, whatever the import mode
from customer_keys import cli_env, customer_key  # noqa: F401 - the fixtures, registered here

#: The lease of a test run: short, so a crash-resume test can take over after a few seconds.
FLOW_LEASE_TTL_SECONDS = 5

#: Called with the names of the invariants ``invariants()`` found holding (the fault
#: tier's report listens here).
INVARIANT_LISTENERS: list[Callable[..., None]] = []
#: More texts for I7 to search, collected when ``invariants()`` runs (the fault tier
#: registers the log records captured during the test).
TEXT_SOURCES: list[Callable[[], Iterable[str]]] = []


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


def invariants(
    platform: Any,
    tenant: str,
    snapshot: dict[bytes, str],
    *,
    extra_records: int = 0,
    resumes: int | None = None,
    reruns: int | None = None,
    texts: Iterable[str] = (),
    killed_worker: bool = False,
) -> dict[str, Any]:
    """After a flow settles: the tenant's data is intact and single, and its story is
    told by the audit log and nowhere else (faults I1-I7).

    - I1/I3: every snapshot object exists exactly once at the tenant's current location,
      with the same plaintext digest; no object that is not in the snapshot.
    - I2/I4: the current index holds exactly one document per record object in storage
      (ids derived from the stored records), and no other generation index remains.
    - I5: no pending (uncommitted) uploads / block lists at the tenant's location nor at
      any location a run of the tenant wrote to; no staging index; the tenant's lease is
      released (``killed_worker``: or held by a run that ended, which the next run takes
      over at once) and its archive gate is open.
    - I6 (``audit_holds``): the audit chain verifies, every run and every key operation
      has its records; ``resumes`` / ``reruns``: how many support resumes and reruns the
      test made (each must have exactly one record).
    - I7 (``secrets_absent``): no key material of the tenant (its DEKs, its search key
      material) in the state store's run records, audit details, the index or ``texts``
      (logs, outputs, Prefect results the test collected); a keyed index holds no record
      value in clear.

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
    for other in _run_locations(platform, tenant):
        if other.uri != loc.uri and platform.provisioner.exists(other):
            left = list(platform.store_for(other).pending_uploads())
            assert not left, f"{len(left)} pending upload(s) left at {other.uri}: {[p.key for p in left[:3]]}"
    lease = platform.state.get_lease(tenant)
    if lease is not None:
        holder = platform.state.get_run(lease.run_id)
        # A worker killed after its run ended and before it released the lease leaves it
        # behind; it protects nothing and the next run takes it at once (engine._acquire).
        ended = holder is not None and holder.state is not RunState.RUNNING
        assert killed_worker and ended, f"tenant {tenant}'s lease is still held by run {lease.run_id}"
    gate = platform.state.gate(tenant)
    assert gate.state is GateState.OPEN and gate.pending == 0, gate
    audit = audit_holds(platform, tenant, resumes=resumes, reruns=reruns)
    values = _record_values(archive, record_names)
    texts = [*texts, *(t for source in TEXT_SOURCES for t in source())]
    secrets = secrets_absent(platform, tenant, texts=texts, plaintext=values)
    report_held("I1", "I2", "I3", "I4", "I5", "I6", "I7")
    return {
        "location": loc.uri,
        "objects": len(listed),
        "snapshot_objects": len(snapshot),
        "records": len(record_names),
        "extra_objects": len(extra),
        "index": current,
        "documents": len(ids),
        "pending_uploads": 0,
        "audit_records": audit["records"],
        "secrets_checked": secrets["secrets"],
    }


def report_held(*names: str) -> None:
    """Tell the listeners (the fault tier's report) which invariants a check found holding."""
    for listener in INVARIANT_LISTENERS:
        listener(*names)


def _run_locations(platform: Any, tenant: str) -> list[Location]:
    out: list[Location] = []
    for run in platform.state.list_runs(tenant):
        for key in ("source", "destination"):
            raw = (run.params or {}).get(key)
            if raw:
                out.append(Location.from_dict(raw))
    return out


def _record_values(archive: Any, names: list[bytes]) -> list[str]:
    """Distinctive field values of the stored records (strings of 10+ characters)."""
    values: set[str] = set()
    for name in names:
        record = Record.from_json(b"".join(archive.read_object(name)))
        for value in record.fields.values():
            if isinstance(value, str) and len(value) >= 10:
                values.add(value)
    return sorted(values)


def audit_holds(platform: Any, tenant: str, *, resumes: int | None = None, reruns: int | None = None) -> dict[str, Any]:
    """I6: the audit chain verifies, and what happened to the tenant is in it.

    - every migration run of the tenant has one ``run.start``; a completed run a ``run.complete``,
      a cancelled one a ``run.cancel``; a run past ``bind_key`` has its ``key.dek_floor``,
      past ``cutover`` its ``tenant.cutover``, past ``cleanup_source`` its ``storage.delete``
      (a rotate run: past ``confirm`` its ``rotation.confirmed``, past ``cutover`` its
      ``tenant.index_cutover``);
    - a revoke run has one ``revoke.request`` and, completed, a ``revoke.receipt``; a restore
      run ``restore.request`` and ``restore.complete``;
    - ``resumes`` / ``reruns`` (when given): that many ``run.resume*`` / ``run.rerun*``
      records in all (no support action without a record, no record without the action);
    - the keychain's last audited change is in the log (no record: the op did not run),
      and the log's latest keychain record names the L1 key the keychain uses now.
    """
    from archive_kms.state.sql.keychain import SqlKeychainStore

    verified = platform.state.verify_audit()
    assert verified.ok, f"audit chain does not verify: {verified}"
    records = list(platform.state.iter_audit(tenant_id=tenant))
    actions = [r.action for r in records]
    lifecycle = {"revoke": ("revoke.request", "revoke.receipt"), "restore": ("restore.request", "restore.complete")}
    for run in platform.state.list_runs(tenant):
        mine = [r.action for r in records if r.run_id == run.run_id]
        if run.flow.value in lifecycle:  # key-lifecycle runs (docs/key-lifecycle.md): their own records
            begun, done = lifecycle[run.flow.value]
            assert mine.count(begun) == 1, f"{run.flow.value} run {run.run_id}: {mine.count(begun)} {begun} records"
            if run.state is RunState.COMPLETED:
                assert done in mine, f"{run.flow.value} run {run.run_id} completed without a {done} record"
            continue
        assert mine.count("run.start") == 1, f"run {run.run_id}: {mine.count('run.start')} run.start records"
        if run.state is RunState.COMPLETED:
            # At least one: the record is written before the state, so a worker killed
            # between the two leaves one that its resume writes again.
            assert "run.complete" in mine, f"run {run.run_id} completed without a run.complete record"
        if run.state is RunState.CANCELLED:
            # refused at preflight (ADR 0021): ended cancelled by itself, audited run.refused
            assert "run.cancel" in mine or "run.refused" in mine, (
                f"run {run.run_id} cancelled without a run.cancel or run.refused record"
            )
        step_records = (
            (("confirm", "rotation.confirmed"), ("cutover", "tenant.index_cutover"))
            if run.flow.value == "rotate"
            else (("bind_key", "key.dek_floor"), ("cutover", "tenant.cutover"), ("cleanup_source", "storage.delete"))
        )
        for step, action in step_records:
            if step not in {s.name for s in run.steps}:  # another flow's step
                continue
            if run.step(step).state is StepState.COMPLETED:
                assert action in mine, f"run {run.run_id}: step {step} completed without its {action} record"
    if resumes is not None:
        got = sum(a.startswith("run.resume") for a in actions)
        assert got == resumes, f"{got} run.resume record(s) for {resumes} resume(s)"
    if reruns is not None:
        got = sum(a.startswith("run.rerun") for a in actions)
        assert got == reruns, f"{got} run.rerun record(s) for {reruns} rerun(s)"
    head = SqlKeychainStore(platform.state).get_head(tenant) if hasattr(platform.state, "engine") else None
    keychain_recs = [r for r in records if r.action.startswith("keychain.")]
    if head is not None and head.audited_change is not None:
        audited = max((r.details.get("head_version", 0) for r in keychain_recs), default=0)
        assert audited >= head.audited_change.version, (
            f"keychain of {tenant} is at audited change v{head.audited_change.version} "
            f"({head.audited_change.action}) but the log's latest keychain record is v{audited}"
        )
        latest = max(keychain_recs, key=lambda r: r.details.get("head_version", 0))
        assert latest.details.get("l1_ref") == head.l1_ref, (
            f"keychain of {tenant} uses {head.l1_ref}; its latest audit record says {latest.details.get('l1_ref')}"
        )
    return {"records": len(records)}


def key_material(platform: Any, tenant: str) -> list[bytes]:
    """The tenant's live secrets: every DEK not erased, and its search key material."""
    from archive_kms.errors import KeyDestroyedError
    from archive_kms.keys.keychain_store import KeyRecordState

    kc = platform.keychain
    out = []
    for dek in kc.list_deks(tenant):
        if dek.state is KeyRecordState.DESTROYED:
            continue
        try:
            out.append(kc.dek_by_id(tenant, dek.dek_id).reveal())
        except KeyDestroyedError:
            continue
    out.append(kc.search_key_material(tenant).reveal())
    return out


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    ]


def secrets_absent(
    platform: Any, tenant: str, *, texts: Iterable[str] = (), plaintext: Iterable[str] = ()
) -> dict[str, Any]:
    """I7: none of the tenant's key material (hex or base64) appears in the state store's
    run records (params, step results and errors), the tenant's audit details, any of its
    index generations, or ``texts``; none of ``plaintext`` (record values) appears there
    either, except in a plaintext (managed-key) index, which holds values by design."""
    forms = [f for s in key_material(platform, tenant) for f in _forms(s)]
    values = list(plaintext)
    haystacks: list[tuple[str, str]] = [("text", t) for t in texts]
    for run in platform.state.list_runs(tenant):
        haystacks.append((f"run {run.run_id} params", json.dumps(run.params, default=str)))
        for step in run.steps:
            haystacks.append((f"run {run.run_id} step {step.name}", json.dumps([step.result, step.error], default=str)))
    for rec in platform.state.iter_audit(tenant_id=tenant):
        haystacks.append((f"audit {rec.seq} {rec.action}", json.dumps(rec.details, default=str)))
    index_docs: list[tuple[str, str]] = []
    for index in tenant_indices(platform, tenant):
        index_docs.append((f"index {index}", json.dumps(es_documents(platform, index))))
    for where, hay in haystacks + index_docs:
        for form in forms:
            assert form not in hay, f"key material of {tenant} found in {where} (I7)"
    keyed = [(w, h) for w, h in index_docs if _index_is_keyed(platform, w.split()[-1])]
    for where, hay in haystacks + keyed:
        for value in values:
            assert value not in hay, f"a record value of {tenant} found in clear in {where} (I7)"
    return {"secrets": len(forms) // 4, "places": len(haystacks) + len(index_docs)}


def prefect_texts(tenant: str) -> list[str]:
    """What the Prefect API holds about the tenant's flow runs (for I7): the artifacts
    (progress, report), each run's parameters, final state message and logs. Needs the
    Prefect API (the ``prefect_api`` fixture)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs still batched in this process
    out: list[str] = []
    with get_client(sync_client=True) as client:
        for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=tenant))):
            out += [json.dumps(artifact.data, default=str), artifact.description or ""]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=tenant)))
        for run in runs:
            out += [json.dumps(run.parameters, default=str), str(run.state.message if run.state else "")]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            out += [entry.message for entry in logs]
    assert runs, f"the Prefect API knows no flow run of {tenant}"
    return out


def _index_is_keyed(platform: Any, index: str) -> bool:
    info = platform.index.describe_generation(index)
    return info is not None and info.mode.value != "plaintext"


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
        if s.azure_account_pool:  # the tenant's own account (an Azurite pool account standing in)
            candidates.append(dedicated_azure_location(tid, account_prefix=s.azure_tenant_account_prefix))
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
    "INVARIANT_LISTENERS",
    "TEXT_SOURCES",
    "ArchivedTenant",
    "audit_holds",
    "es_documents",
    "invariants",
    "key_material",
    "prefect_texts",
    "report_held",
    "run_plan",
    "secrets_absent",
    "storage_snapshot",
    "tenant_indices",
]
