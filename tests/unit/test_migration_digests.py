"""The copy ledger's plaintext digests are keyed and purged (issue #11 finding 5); the
copy checks its new ciphertext in memory before the upload may commit; both verify modes
prove every object (ADR 0018). In-memory platform; ~10 s."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import replace

import pytest
from test_migration_engine import (
    TENANT,
    archived_platform,
    assert_settled,
    count_puts,
    digests,
    enable_plan,
    execute,
    run_to_end,
    start,
    wrap_step,
)

from archive_kms.migration import cancel
from archive_kms.migration import copying as copying_module
from archive_kms.migration.digests import PREFIX, LedgerDigests, is_keyed
from archive_kms.state.port import CopyStatus, StepState


def _stop_before(monkeypatch, step: str) -> None:
    def stop(real, ctx):
        raise RuntimeError(f"test stops the run before {step}")

    wrap_step(monkeypatch, step, stop)


def _ledger_after_verify(monkeypatch, mode: str = "attested"):
    p = archived_platform()
    before = digests(p)
    plan = replace(enable_plan(p), verify=mode)
    _stop_before(monkeypatch, "build_index")
    run_id = start(p, plan)
    with pytest.raises(RuntimeError):
        execute(p, run_id, actor="test")
    rows = {c.name: c for c in p.state.iter_copies(run_id)}
    assert set(rows) == set(before) and {c.status for c in rows.values()} == {CopyStatus.VERIFIED}
    return p, plan, run_id, before, rows


def test_the_ledger_holds_no_unkeyed_digest_and_it_cannot_be_recomputed_without_the_key(monkeypatch):
    p, plan, run_id, before, rows = _ledger_after_verify(monkeypatch)
    manifest = {e.name: e for e in p.state.iter_manifest(run_id)}
    candidates_without_key = []
    for name, row in rows.items():
        digest = row.plaintext_sha256
        assert is_keyed(digest) and len(digest) == len(PREFIX) + 43
        plain_sha = before[name]  # what a database reader who guessed the plaintext could compute
        for guess in (
            plain_sha,
            hashlib.sha256(name + bytes.fromhex(plain_sha)).hexdigest(),
            hmac.new(b"", bytes.fromhex(plain_sha), hashlib.sha256).hexdigest(),
        ):
            assert guess not in digest
            candidates_without_key.append(guess)
        # It is the HMAC under the run key derived from the tenant's L2 ...
        keyed = LedgerDigests(p.keychain, TENANT, run_id)
        entry = manifest[name]
        assert keyed.matches(digest, name, entry.etag, entry.size, _plaintext_size(p, name), plain_sha)
        # ... bound to the run and to the source version: another run key, another ETag -> no match.
        assert not LedgerDigests(p.keychain, TENANT, "another-run").matches(
            digest, name, entry.etag, entry.size, _plaintext_size(p, name), plain_sha
        )
        assert not keyed.matches(digest, name, '"0000"', entry.size, _plaintext_size(p, name), plain_sha)
    # No row's digest is a bare SHA-256 of any plaintext, keyed or not by a known constant.
    raw = {base64.urlsafe_b64decode(r.plaintext_sha256[len(PREFIX) :] + "=").hex() for r in rows.values()}
    assert not raw & set(candidates_without_key) and not raw & set(before.values())


def _plaintext_size(p, name: bytes) -> int:
    from archive_kms.migration.copying import read_back

    store = p.store_for(p.location_of(TENANT))
    return read_back(store, p.keychain, TENANT, name).plaintext_size


def test_another_tenant_key_gives_other_digests():
    """The run key comes from the tenant's L2: the same names and plaintexts under another
    tenant's keychain digest differently (a reader with a second tenant's keys learns nothing)."""
    p = archived_platform()
    from archive_kms.operations.tenants import create_tenant

    create_tenant(p, "globex", cloud="s3", provision_storage=False)
    a, b = LedgerDigests(p.keychain, TENANT, "r1"), LedgerDigests(p.keychain, "globex", "r1")
    args = (b"records/ws0/Case/1", '"e1"', 100, 80, "ab" * 32)
    assert a.of(*args) != b.of(*args) and a.of(*args) == LedgerDigests(p.keychain, TENANT, "r1").of(*args)
    assert "key hidden" in repr(a)


def test_digests_are_purged_when_the_run_is_reported():
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    run_id = run_to_end(p, plan)
    assert_settled(p, plan, run_id, before)
    rows = list(p.state.iter_copies(run_id))
    assert rows and all(r.plaintext_sha256 is None for r in rows)
    assert all(r.dest_etag and r.dest_size for r in rows)  # the rest of the row stays
    assert p.state.get_run(run_id).step("report").result["ledger_digests_purged"] == len(before)


def test_a_cancelled_run_purges_its_digests(monkeypatch):
    p = archived_platform()
    plan = enable_plan(p)
    _stop_before(monkeypatch, "build_index")
    run_id = start(p, plan)
    with pytest.raises(RuntimeError):
        execute(p, run_id, actor="test")
    assert any(r.plaintext_sha256 for r in p.state.iter_copies(run_id))
    monkeypatch.undo()
    assert cancel(p, run_id, actor="support").state == "cancelled"
    assert all(r.plaintext_sha256 is None for r in p.state.iter_copies(run_id))


@pytest.mark.parametrize("mode", ["attested", "read-back"])
def test_both_verify_modes_prove_every_object(mode):
    p = archived_platform()
    before = digests(p)
    plan = replace(enable_plan(p), verify=mode)
    dst = p.store_for(plan.destination_location)
    reads = {"n": 0}
    real = dst.open_read

    def counting(name, **kw):
        reads["n"] += 1
        return real(name, **kw)

    dst.open_read = counting
    run_id = run_to_end(p, plan)
    verify = p.state.get_run(run_id).step("verify").result
    assert verify["mode"] == mode and verify["verified"] == len(before) and verify["result"] == "ok"
    # read-back reads every object back once in verify (and build_index reads the records);
    # attested reads none in verify.
    records = sum(1 for n in before if n.startswith(b"records/"))
    assert reads["n"] == (len(before) + records if mode == "read-back" else records)
    assert_settled(p, plan, run_id, before)


def test_a_bad_ciphertext_is_caught_in_memory_and_never_committed(monkeypatch):
    """The encryptor's output is decrypted again before the upload may commit: a ciphertext
    that does not authenticate (here: one bit flipped in a segment of one object) fails that
    object, nothing is committed under its name, and a rerun writes a good copy."""
    p = archived_platform()
    before = digests(p)
    plan = enable_plan(p)
    victim = sorted(before)[3]
    real_encrypt = copying_module.encrypt_iter

    def flipping(chunks, *, binding, **kw):
        pieces = real_encrypt(chunks, binding=binding, **kw)
        for i, piece in enumerate(pieces):
            if binding.object_name == victim and i == 1:
                piece = bytes([piece[0] ^ 1]) + piece[1:]
            yield piece

    monkeypatch.setattr(copying_module, "encrypt_iter", flipping)
    dst = p.store_for(plan.destination_location)
    written = count_puts(dst)
    run_id = start(p, plan)
    out = execute(p, run_id, actor="test")
    assert out.state == "failed" and out.message == "step copy failed"
    assert "failed authentication" in out.error or "does not authenticate" in out.error or "segment" in out.error
    assert victim not in written and dst.head(victim) is None
    assert p.state.get_copy(run_id, victim).status is CopyStatus.FAILED
    assert p.state.get_run(run_id).step("cutover").state is StepState.PENDING
    monkeypatch.setattr(copying_module, "encrypt_iter", real_encrypt)
    from archive_kms.migration import resume

    assert resume(p, run_id, actor="support").state == "completed"
    assert_settled(p, plan, run_id, before)
