"""The archive commands of the CLI on the in-memory platform: reading safely, errors that
say what to fix, and the audit commands with anchors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch) -> Platform:
    p = Platform.in_memory()
    create_tenant(p, "acme", cloud="s3", provision_storage=False)
    submit_job(
        p.state, JobSpec("j1", "acme", "synthetic", synthetic={"count": 6, "seed": 3, "mix": "default"}), p.open_archive
    )
    monkeypatch.setattr(cli, "_platform", lambda: p)
    return p


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def _an_attachment(p: Platform) -> tuple[str, str, int]:
    """(workspace, attachment id, plaintext size) of the tenant's largest attachment."""
    archive = p.open_archive("acme")
    info = max((i for i in archive.store.list() if i.name.startswith(b"attachments/")), key=lambda i: i.size)
    _, ws, att_id = info.name.decode().split("/", 2)
    return ws, att_id, sum(len(c) for c in archive.read_attachment(ws, att_id))


def test_read_attachment_writes_the_file_only_when_it_authenticates(platform: Platform, tmp_path: Path) -> None:
    ws, att_id, size = _an_attachment(platform)
    out = tmp_path / "att.bin"
    ok = invoke("read", "acme", "--attachment", att_id, "--workspace", ws, "--out", str(out), "--json")
    assert ok.exit_code == 0, ok.output
    assert out.stat().st_size == size == json.loads(ok.stdout)["bytes"]

    store = platform.open_archive("acme").store
    name = next(i.name for i in store.list() if i.name.endswith(att_id.encode()))
    with store.open_read(name) as reader:
        data = reader.read()
    store.delete(name)
    store.put_stream(name, iter([data[: len(data) - 40]]))  # truncated: the last segment is gone
    bad = tmp_path / "bad.bin"
    refused = invoke("read", "acme", "--attachment", att_id, "--workspace", ws, "--out", str(bad))
    assert refused.exit_code == 2 and "error:" in refused.output
    assert not bad.exists() and list(tmp_path.iterdir()) == [out]  # no partial plaintext, no temp file


def test_read_of_a_missing_record_names_it(platform: Platform) -> None:
    result = invoke("read", "acme", "--record", "Account/NOPE")
    assert result.exit_code == 2
    assert "no record Account/NOPE in workspace 'default' of tenant acme" in result.output
    assert "%2F" not in result.output


def test_audit_anchor_then_verify_against_it(platform: Platform) -> None:
    anchored = invoke("audit", "anchor", "--json")
    assert anchored.exit_code == 0, anchored.output
    count = json.loads(anchored.stdout)["count"]
    verified = invoke("audit", "verify", "--json")
    body = json.loads(verified.stdout)
    assert verified.exit_code == 0 and body["ok"] and body["anchor"]["count"] == count
    human = invoke("audit", "verify")
    assert f"against the anchor of record {count}" in human.output


def test_audit_anchor_without_an_anchor_store_says_what_to_set(platform: Platform) -> None:
    platform.anchors = None
    result = invoke("audit", "anchor")
    assert result.exit_code == 2 and "ARCHIVE_KMS_AUDIT_ANCHOR_BUCKET" in result.output


def test_jobs_list_and_park_give_up_one_queued_job(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_state_only", lambda: cli._StateOnly(platform.state))
    platform.state.pause("acme", "run-1")
    secret = "Quokkafjord-7731"
    spec = JobSpec(
        "j-stuck",
        "acme",
        "inline",
        ({"object_type": "Account", "record_id": "0013000000AAA", "workspace_id": "ws0", "fields": {"Name": secret}},),
        {},
    )
    assert submit_job(platform.state, spec, platform.open_archive).decision == "deferred"
    listed = invoke("jobs", "list", "acme", "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert (row["job_id"], row["state"], row["position"], row["parked_reason"]) == ("j-stuck", "deferred", 1, None)
    assert secret not in listed.output and "gate paused, 1 pending" in invoke("jobs", "list", "acme").output

    no_reason = invoke("jobs", "park", "acme", "j-stuck")
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output  # mandatory
    parked = invoke("jobs", "park", "acme", "j-stuck", "--reason", "seal refused", "--actor", "support:alice", "--json")
    assert parked.exit_code == 0, parked.output
    body = json.loads(parked.stdout)
    assert (body["state"], body["parked_reason"], body["parked_by"], body["pending"]) == (
        "parked",
        "seal refused",
        "support:alice",
        0,
    )
    assert platform.state.list_deferred("acme", include_replayed=True)[0].sealed is not None  # kept
    assert any(r.action == "job.parked" for r in platform.state.iter_audit(tenant_id="acme"))

    assert json.loads(invoke("jobs", "list", "acme", "--json").stdout) == []
    everything = invoke("jobs", "list", "acme", "--all")
    assert "parked by support:alice: seal refused" in everything.output and secret not in everything.output
    twice = invoke("jobs", "park", "acme", "j-stuck", "--reason", "again")
    assert twice.exit_code == 2 and twice.output.count("\n") == 1 and "already parked" in twice.output
    unknown = invoke("jobs", "park", "acme", "j-nope", "--reason", "x")
    assert unknown.exit_code == 2 and "error: tenant 'acme' has no queued job 'j-nope'" in unknown.output
