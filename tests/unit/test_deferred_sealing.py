"""Deferred archive jobs are sealed under the tenant's keychain while the gate holds them,
and open after the migration that paused the gate changed the tenant's key binding
(faults I7, E1): a job deferred before ``bind_key`` is sealed under a DEK whose chain
ends at the old L1 key; it is replayed in ``resume`` with the old key disabled and the
key cache emptied, so it can only open through the re-wrapped L2 (``rotate_l1``).

Runs the real engine on the in-memory platform, with the state store in memory and on
SQLite (where the database file itself is searched for the records' words).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from archive_kms.domain.records import Record
from archive_kms.migration import build_report, execute, plan_enable, plan_remove, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.migration.plan import MigrationPlan
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import MANAGED_KEY_REF, create_tenant
from archive_kms.state.port import DeferredState, RunState
from archive_kms.state.sql import SqlStateStore, open_state

TENANT = "acme"
CUSTOMER_KEY = "memory://customer-1"
# Field values and file names: record content, which the state store must never hold in clear.
CONTENT_WORDS = (
    "Pemberton-Ashgrove",
    "Quokkafjord",
    "zanzibar-merger-7731",
    "Ms. Ottoline Varga",
    "merger_term_sheet.pdf",
)
# Record ids: absent from the deferred rows too; but object names carry them by design
# (records/<workspace>/<type>/<id>), so a later run's manifest in the same database has them.
ID_WORDS = ("0013000000XyzQk", "5003000000PlmNo")


def secret_job(job_id: str, files: Path) -> JobSpec:
    """Two records in two workspaces and an attachment file; ids differ per job."""
    files.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(job_id.encode()).hexdigest()[:3].upper()
    sheet = files / "merger_term_sheet.pdf"
    sheet.write_bytes(b"%PDF-1.7 Quokkafjord term sheet " + job_id.encode())
    records = (
        {
            "object_type": "Account",
            "record_id": f"0013000000XyzQk{tag}",
            "workspace_id": "ws0",
            "fields": {"Name": "Pemberton-Ashgrove Holdings", "Description": "Quokkafjord, code zanzibar-merger-7731"},
            "attachments": [
                {"attachment_id": f"att-{tag}", "file_name": "merger_term_sheet.pdf", "size": sheet.stat().st_size}
            ],
        },
        {
            "object_type": "Case",
            "record_id": f"5003000000PlmNo{tag}",
            "workspace_id": "ws1",
            "fields": {"Subject": "Call back Ms. Ottoline Varga"},
        },
    )
    return JobSpec(job_id, TENANT, "inline", records, {f"att-{tag}": str(sheet)})


def raw_deferred(p: Platform) -> str:
    """Every deferred row as stored, as someone with database access reads it."""
    if isinstance(p.state, SqlStateStore):
        from sqlalchemy import text

        with p.state.engine.connect() as conn:
            rows = conn.execute(text("SELECT job_id, CAST(payload AS TEXT), state FROM deferred_jobs")).all()
        return "\n".join(" | ".join(str(v) for v in r) for r in rows)
    return "\n".join(
        json.dumps(dict(j.payload)) + (j.sealed or b"").decode("latin-1") for j in p.state._deferred.values()
    )  # type: ignore[attr-defined]


def on_disk(p: Platform) -> bytes:
    """The SQLite database and its WAL, byte for byte (empty for the memory store)."""
    if not isinstance(p.state, SqlStateStore):
        return b""
    db = Path(p.state.engine.url.database or "")
    return b"".join(f.read_bytes() for f in (db, db.with_name(db.name + "-wal")) if f.exists())


def assert_no_words(raw: str | bytes, what: str, words: tuple[str, ...] = CONTENT_WORDS + ID_WORDS) -> None:
    text_ = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    found = [w for w in words if w.lower() in text_.lower()]
    assert not found, f"{what} holds record content: {found}"


@pytest.fixture(params=["memory", "sqlite"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    p = Platform.in_memory()
    if request.param == "sqlite":
        p = replace(p, state=open_state(f"sqlite:///{tmp_path / 'state.db'}"))
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    base = JobSpec("j-base", TENANT, "synthetic", synthetic={"count": 12, "seed": 7, "mix": "small", "workspaces": 2})
    assert submit_job(p.state, base, p.open_archive).decision == "run"
    yield p
    p.state.close()


def l1_name(p: Platform, ref: str) -> tuple[Any, str]:
    """(the in-memory KMS, key name) behind a key reference."""
    provider = p.resolve_provider(ref)
    return provider._kms, provider.key_ref.removeprefix("memory://")


def fast(plan: MigrationPlan) -> MigrationPlan:
    return replace(plan, shards=2, parallel_shards=2, threads_per_shard=2, cutover_grace_seconds=0.0)


def run_with_deferrals(
    p: Platform, plan: MigrationPlan, monkeypatch: pytest.MonkeyPatch, files: Path, old_key_ref: str, prefix: str
) -> tuple[str, dict[str, JobSpec], dict[str, str]]:
    """Run ``plan`` to the end, submitting one secret job before bind_key, one after it and
    one after cutover. At resume the key the first job was sealed under is disabled and
    the key cache emptied; the replay must open every seal through the new binding.
    Returns (run id, specs, L1 reference in force when each job was sealed)."""
    real = dict(steps_module.STEP_FUNCTIONS)
    specs: dict[str, JobSpec] = {}
    sealed_under: dict[str, str] = {}

    def submit_after(step: str, job_id: str) -> None:
        def wrapped(ctx: Any) -> dict[str, Any]:
            result = real[step](ctx)
            spec = secret_job(job_id, files / job_id)
            sealed_under[job_id] = p.keychain.status(TENANT).l1_ref
            assert submit_job(p.state, spec, p.open_archive).decision == "deferred"
            specs[job_id] = spec
            return result

        monkeypatch.setitem(steps_module.STEP_FUNCTIONS, step, wrapped)

    submit_after("create_destination", f"{prefix}-before-bind")  # gate paused, old binding
    submit_after("copy", f"{prefix}-after-bind")
    submit_after("cleanup_source", f"{prefix}-after-cutover")
    seen_at_resume: dict[str, Any] = {}

    def resume_without_the_old_key(ctx: Any) -> dict[str, Any]:
        seen_at_resume["raw"], seen_at_resume["disk"] = raw_deferred(p), on_disk(p)
        seen_at_resume["sealed"] = [j.sealed is not None for j in p.state.list_deferred(TENANT)]
        kms, name = l1_name(p, old_key_ref)
        kms.disable(name)
        p.keychain.cache.purge(TENANT)
        try:
            return real["resume"](ctx)
        finally:
            kms.enable(name)

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "resume", resume_without_the_old_key)
    run, created = trigger(p, plan, actor="test")
    assert created
    out = execute(p, run.run_id, actor="test")
    assert out.state == "completed", out
    for step, fn in real.items():  # the next run starts from the real steps
        monkeypatch.setitem(steps_module.STEP_FUNCTIONS, step, fn)

    assert seen_at_resume["sealed"] == [True, True, True]
    assert_no_words(seen_at_resume["raw"], "the queued rows")
    assert_no_words(seen_at_resume["disk"], "the state database file", CONTENT_WORDS)
    return run.run_id, specs, sealed_under


def assert_replayed_and_purged(p: Platform, run_id: str, specs: dict[str, JobSpec]) -> None:
    resumed = p.state.get_run(run_id).step("resume").result  # type: ignore[union-attr]
    assert (resumed["replayed"], resumed["duplicates"], resumed["records"]) == (3, 0, 6)
    archive = p.open_archive(TENANT)  # wherever the tenant lives now
    for spec in specs.values():
        for raw in spec.records:
            want = Record.from_json(raw)
            assert archive.read_record(want.workspace_id, want.object_type, want.record_id) == want
        [(attachment_id, path)] = spec.attachment_files.items()
        assert b"".join(archive.read_attachment("ws0", attachment_id)) == Path(path).read_bytes()
    rows = {j.job_id: j for j in p.state.list_deferred(TENANT, include_replayed=True)}
    for job_id in specs:
        assert (rows[job_id].state, rows[job_id].sealed) == (DeferredState.REPLAYED, None)  # purged
        assert rows[job_id].payload["digest"].startswith("hmac-sha256:")  # the row stays: exactly once
    assert p.state.list_deferred(TENANT) == []
    assert_no_words(raw_deferred(p), "the replayed rows")
    # I7 beyond the gate: step results, the report and the audit log name no record content.
    steps = p.state.get_run(run_id).steps  # type: ignore[union-attr]
    assert_no_words(json.dumps([s.result for s in steps], default=str), "the step results", CONTENT_WORDS)
    assert_no_words(json.dumps(build_report(p, run_id), default=str), "the report", CONTENT_WORDS)
    assert_no_words(
        json.dumps([r.details for r in p.state.iter_audit(tenant_id=TENANT)]), "the audit log", CONTENT_WORDS
    )


def test_jobs_deferred_around_a_key_rebinding_open_after_it(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    p = platform
    managed = p.resolve_provider(MANAGED_KEY_REF).key_ref
    customer = p.resolve_provider(CUSTOMER_KEY).key_ref

    # enable: L1 goes from the managed key to the customer's
    enable = fast(plan_enable(p, TENANT, "byokms", CUSTOMER_KEY))
    run1, specs1, sealed1 = run_with_deferrals(p, enable, monkeypatch, tmp_path / "enable", MANAGED_KEY_REF, "e")
    assert sealed1 == {"e-before-bind": managed, "e-after-bind": customer, "e-after-cutover": customer}
    assert p.keychain.status(TENANT).l1_ref == customer
    assert p.state.get_run(run1).state is RunState.COMPLETED  # type: ignore[union-attr]
    assert_replayed_and_purged(p, run1, specs1)

    # remove: back to the managed key; the customer key is the one disabled at resume
    remove = fast(plan_remove(p, TENANT))
    run2, specs2, sealed2 = run_with_deferrals(p, remove, monkeypatch, tmp_path / "remove", CUSTOMER_KEY, "r")
    assert sealed2 == {"r-before-bind": customer, "r-after-bind": managed, "r-after-cutover": managed}
    assert p.keychain.status(TENANT).l1_ref == managed
    assert_replayed_and_purged(p, run2, specs2)
    for spec in (*specs1.values(), *specs2.values()):  # resent after the fact: still exactly once
        assert submit_job(p.state, spec, p.open_archive).decision == "duplicate"


def test_a_seal_does_not_open_while_the_key_it_depends_on_is_unusable(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The control for the test above: with the L1 key now in force disabled too, the
    replay really goes to a provider, fails on the key (not on the seal), and the job
    stays queued with its seal for a later replay."""
    from archive_kms.errors import KeyUnavailableError
    from archive_kms.operations.archive import replay_deferred

    p = platform
    p.state.pause(TENANT, "run-x")
    spec = secret_job("j-1", tmp_path / "j-1")
    assert submit_job(p.state, spec, p.open_archive).decision == "deferred"
    kms, name = l1_name(p, MANAGED_KEY_REF)
    kms.disable(name)
    p.keychain.cache.purge(TENANT)
    with pytest.raises(KeyUnavailableError):
        replay_deferred(p.state, TENANT, "run-x", p.open_archive)
    [kept] = p.state.list_deferred(TENANT)
    assert kept.job_id == "j-1" and kept.sealed is not None
    kms.enable(name)
    [outcome] = replay_deferred(p.state, TENANT, "run-x", p.open_archive, reclaim_after=timedelta(0))
    assert outcome.decision == "run"
    assert p.state.list_deferred(TENANT, include_replayed=True)[0].sealed is None
