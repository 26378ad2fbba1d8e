"""Real flows signed by a platform signing key that never leaves KMS or Key Vault (ADR 0040):
a tenant archived, enabled onto a customer KMS key (keychain records, tenant heads, audit
seals, search-generation rows) and a workspace erased (the signed erasure record), with the
platform built by ``Platform.from_settings`` from ``keychain_signing_key_ref``. The
erasure record then verifies offline (``archive-kms erasure verify --public-key``) with the
public PEM ``archive-kms erasure public-key`` exports; a tampered one does not.

Prints how many remote signatures each phase made and the time spent in them, against
the phase's wall time (the cost of a remote signing key; docs/key-hierarchy.md section 7).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_plan

from archive_kms import cli, clients
from archive_kms.config import PROJECT_ROOT, Settings
from archive_kms.crypto.signing import Signer
from archive_kms.migration import plan_enable
from archive_kms.migration.erase import certificate_json, plan_erase
from archive_kms.state.port import RunState

#: "pem" is the peer run: the same flows with the local Ed25519 key, for the comparison.
SIGNING_BACKENDS = ["pem", "aws-kms", "azure-kv"]
PHASE_WALL: dict[str, dict[str, float]] = {}  # backend -> phase -> wall seconds, for the ratios


@pytest.fixture(params=SIGNING_BACKENDS)
def signing_key(request, localstack: Settings, keyvault: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The settings that name the platform signing key of one backend."""
    if request.param == "pem":
        path = tmp_path / "signing.pem"
        Signer.create_key_file(path)
        yield {"keychain_signing_key_path": str(path)}
        return
    if request.param == "aws-kms":
        kms = clients.kms_client(localstack)
        md = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Description="archive-kms flow signing")[
            "KeyMetadata"
        ]
        yield {"keychain_signing_key_ref": f"aws-kms://{md['Arn']}"}
        kms.schedule_key_deletion(KeyId=md["KeyId"], PendingWindowInDays=7)
        return
    keys = clients.keyvault_key_client(keyvault)
    key = keys.create_ec_key(f"flow-signing-{uuid.uuid4().hex[:10]}", curve="P-256", hardware_protected=True)
    host_port = str(keyvault.azure_keyvault_url).removeprefix("https://")
    yield {"keychain_signing_key_ref": f"azure-kv://{host_port}/keys/{key.name}/{key.properties.version}"}
    keys.begin_delete_key(key.name).wait()


@pytest.fixture
def flow_settings(localstack: Settings, azurite: Settings, elasticsearch: Settings, tmp_path, signing_key):
    """The flows' settings, signing with the backend's key."""
    return localstack.model_copy(
        update={"state_url": f"sqlite:///{tmp_path / 'state.db'}", "lease_ttl_seconds": 5, **signing_key}
    )


class SignCounter:
    """Counts the platform's signatures (``Signer.sign``, every backend) and the time spent
    in them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self.seconds = 0, 0.0
        inner = Signer.sign

        def counted(signer: Signer, message: bytes, *, purpose: str) -> bytes:
            start = time.perf_counter()
            try:
                return inner(signer, message, purpose=purpose)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - start

        monkeypatch.setattr(Signer, "sign", counted)

    def since(self, mark: tuple[int, float]) -> tuple[int, float]:
        return self.calls - mark[0], self.seconds - mark[1]

    def mark(self) -> tuple[int, float]:
        return self.calls, self.seconds


def run_documented_ecdsa_check(*, pem: bytes, record: bytes) -> None:
    """Execute the Python block of docs/erasure-record.md "Verifying an ECDSA-signed record
    with another tool" with ``pem`` and ``record`` defined; it raises if the record does not
    verify."""
    text = (PROJECT_ROOT / "docs" / "erasure-record.md").read_text()
    section = text[text.index("**Verifying an ECDSA-signed record with another tool.**") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    exec(compile(code, "docs/erasure-record.md", "exec"), {"pem": pem, "record": record})
    tampered = record.replace(b'"objects_deleted":', b'"objects_deleted":1')
    with pytest.raises(InvalidSignature):
        exec(compile(code, "docs/erasure-record.md", "exec"), {"pem": pem, "record": tampered})


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


def test_enable_and_erase_signed_by_each_backend_verify_offline(
    flow_platform, archived_tenant, customer_key, signing_key, tmp_path: Path, monkeypatch, request
) -> None:
    p = flow_platform
    signer = p.require_signer()
    backend = request.node.callspec.params["signing_key"]
    if backend == "pem":
        assert signer.algorithm == "ed25519" and signer.key_ref is None
    else:
        assert signer.algorithm == "ecdsa-p256" and signer.key_ref == signing_key["keychain_signing_key_ref"]
    counter = SignCounter(monkeypatch)
    phases: dict[str, tuple[int, float, float]] = {}

    mark, start = counter.mark(), time.perf_counter()
    data = archived_tenant("s3", records=8)
    phases["create + archive 8 records"] = (*counter.since(mark), time.perf_counter() - start)
    tid = data.tenant_id

    mark, start = counter.mark(), time.perf_counter()
    outcome = run_plan(p, plan_enable(p, tid, "byokms", customer_key("byokms", "s3"), cloud="s3", shards=2))
    assert outcome.state == RunState.COMPLETED.value, outcome.error
    phases["enable (byokms, 2 shards)"] = (*counter.since(mark), time.perf_counter() - start)

    mark, start = counter.mark(), time.perf_counter()
    erased = run_plan(p, plan_erase(p, tid, workspace="ws0", reason="device retired"))
    assert erased.state == RunState.COMPLETED.value, erased.error
    phases["erase a workspace"] = (*counter.since(mark), time.perf_counter() - start)
    assert all(calls > 0 for calls, _, _ in phases.values()), phases
    assert p.state.verify_audit(tenant_id=tid).ok

    # Offline: the exported public PEM alone verifies the record, which names the key.
    for name, value in signing_key.items():
        monkeypatch.setenv(f"ARCHIVE_KMS_{name.upper()}", value)
    record = tmp_path / "erasure.json"
    record.write_bytes(certificate_json(p.state.get_run(erased.run_id)))
    exported = invoke("erasure", "public-key")
    assert exported.exit_code == 0 and exported.output.encode().strip() == signer.public_key_pem().strip()
    pem = tmp_path / "platform.pem"
    pem.write_text(exported.output)
    for name in signing_key:
        monkeypatch.delenv(f"ARCHIVE_KMS_{name.upper()}")
    ok = invoke("erasure", "verify", str(record), "--public-key", str(pem))
    assert ok.exit_code == 0 and f"signed by {signer.key_id}" in ok.output, ok.output
    # A second implementation: the docs' own snippet (docs/erasure-record.md section 4),
    # run as written, verifies the record with the PEM alone.
    if backend != "pem":
        run_documented_ecdsa_check(pem=pem.read_bytes(), record=record.read_bytes())
    doc = json.loads(record.read_text())
    doc["storage"]["objects_deleted"] -= 1  # the operator hides one object
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    bad = invoke("erasure", "verify", str(tampered), "--public-key", str(pem))
    assert bad.exit_code == 1 and "NOT verified" in bad.output, bad.output

    PHASE_WALL[backend] = {phase: wall for phase, (_, _, wall) in phases.items()}
    peer = PHASE_WALL.get("pem", {})
    for phase, (calls, seconds, wall) in phases.items():
        ratio = f", {wall / peer[phase]:.2f}x the PEM key's wall time" if backend != "pem" and phase in peer else ""
        print(
            f"\n[signing {backend}] {phase}: {calls} signatures, {seconds:.3f} s in them "
            f"({seconds / wall:.0%} of the phase's {wall:.2f} s{ratio})"
        )
