"""The audit chain, pure: canonical encoding, the streaming verifier, head seals, and the
offline export verifier. (The stores' use of it is in the state store contract suite.)"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import ValidationError
from archive_kms.state import audit as chain
from archive_kms.state.port import AuditRecord

T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

# Pinned: if this changes, every stored log stops verifying. Computed once and checked
# with `printf '%s' '<canonical>' | sha256sum`.
VECTOR_CANONICAL = (
    '{"action":"tenant.pause","actor":"support:alice","details":{"a":"caf\\u00e9","b":[1,2]},'
    '"prev_hash":"' + "0" * 64 + '","run_id":"run-1","seq":1,"tenant":"acme",'
    '"tenant_prev_hash":"' + "0" * 64 + '","tenant_seq":1,"ts":"2030-01-02T03:04:05.678901Z","v":1}'
)
VECTOR_HASH = "dd9f972da694c2c8efc4fdd65186729894da437ab1a546b9608ce5432dde1072"


def test_canonical_encoding_known_answer() -> None:
    fields = dict(
        seq=1,
        ts=T0,
        actor="support:alice",
        action="tenant.pause",
        tenant_id="acme",
        run_id="run-1",
        details={"b": [1, 2], "a": "caf\u00e9"},
        prev_hash=chain.GENESIS,
        tenant_seq=1,
        tenant_prev_hash=chain.GENESIS,
    )
    assert chain.canonical_record(**fields).decode() == VECTOR_CANONICAL
    assert chain.record_hash(**fields) == VECTOR_HASH == hashlib.sha256(VECTOR_CANONICAL.encode()).hexdigest()


@pytest.mark.parametrize(
    "bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}, {"x": b"bytes"}, {1: "a", "b": 2}]
)
def test_canonical_json_refuses_what_json_cannot_hold_exactly(bad: dict[Any, Any]) -> None:
    with pytest.raises(ValidationError):
        chain.canonical_json(bad)


def test_secrets_in_details_are_refused_without_showing_them() -> None:
    with pytest.raises(ValidationError) as info:
        chain.canonical_json({"key": SecretBytes(b"\x01" * 32)})
    assert "\\x01" not in str(info.value) and "SecretBytes(<32" not in str(info.value)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError):
        chain.format_ts(datetime(2030, 1, 1))
    assert chain.parse_ts(chain.format_ts(T0)) == T0


def build(tenants: list[str | None]) -> list[AuditRecord]:
    """A valid log, built with the same rules the stores use."""
    out: list[AuditRecord] = []
    prev = chain.GENESIS
    tips: dict[str, tuple[int, str]] = {}
    for i, t in enumerate(tenants, start=1):
        tseq, tprev = (
            (None, None) if t is None else (tips.get(t, (0, chain.GENESIS))[0] + 1, tips.get(t, (0, chain.GENESIS))[1])
        )
        fields = dict(
            seq=i,
            ts=T0 + timedelta(seconds=i),
            actor="a",
            action=f"act.{i}",
            tenant_id=t,
            run_id=None,
            details={"i": i},
            prev_hash=prev,
            tenant_seq=tseq,
            tenant_prev_hash=tprev,
        )
        rec = AuditRecord(**fields, hash=chain.record_hash(**fields))  # type: ignore[arg-type]
        out.append(rec)
        prev = rec.hash
        if t is not None:
            tips[t] = (tseq, rec.hash)  # type: ignore[assignment]
    return out


def heads_of(records: list[AuditRecord], sealer: Any = None) -> dict[str, chain.ChainHead]:
    heads = {chain.GLOBAL_CHAIN: chain.seal_head(sealer, chain.GLOBAL_CHAIN, 0, chain.GENESIS)}
    for r in records:
        heads[chain.GLOBAL_CHAIN] = chain.seal_head(sealer, chain.GLOBAL_CHAIN, r.seq, r.hash)
        if r.tenant_id is not None:
            name = chain.tenant_chain(r.tenant_id)
            heads[name] = chain.seal_head(sealer, name, r.tenant_seq, r.hash)  # type: ignore[arg-type]
    return heads


def verify(
    records: list[AuditRecord], heads: dict[str, chain.ChainHead], verifier: Any = None, tenant_id: str | None = None
) -> Any:
    v = chain.ChainVerifier(tenant_id=tenant_id)
    for r in records:
        if v.feed(r) is not None:
            break
    return v.finish(
        heads if tenant_id is None else {k: h for k, h in heads.items() if k == chain.tenant_chain(tenant_id)}, verifier
    )


LOG = ["acme", "beta", None, "acme", "beta", "acme"]


def test_a_valid_log_verifies_globally_and_per_tenant() -> None:
    recs = build(LOG)
    assert verify(recs, heads_of(recs)).ok
    assert verify([r for r in recs if r.tenant_id == "acme"], heads_of(recs), tenant_id="acme").ok
    assert verify([], heads_of([])).ok


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        (lambda rs: [replace(rs[2], details={"i": "x"}) if r is rs[2] else r for r in rs], 3),  # edit
        (lambda rs: [replace(rs[2], actor="mallory") if r is rs[2] else r for r in rs], 3),  # edit another field
        (lambda rs: rs[:2] + rs[3:], 3),  # delete from the middle
        (lambda rs: rs[1:], 1),  # delete the first
        (lambda rs: rs[:2] + [replace(rs[3], seq=3), replace(rs[2], seq=4)] + rs[4:], 3),  # swap seq
        (lambda rs: rs[:3] + [rs[2]] + rs[3:], 3),  # duplicate a record
        (lambda rs: rs[:3] + [replace(rs[3], tenant_id="beta")] + rs[4:], 4),  # move to another tenant
    ],
)
def test_tampering_is_found_at_the_first_bad_record(tamper: Any, first_bad: int) -> None:
    recs = build(LOG)
    result = verify(tamper(recs), heads_of(recs))
    assert (result.ok, result.first_bad_seq) == (False, first_bad), result


def test_truncated_tail_is_found_through_the_head() -> None:
    recs = build(LOG)
    result = verify(recs[:-2], heads_of(recs))
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "truncated" in result.reason


def test_a_deleted_tenant_chain_is_found_through_its_head() -> None:
    recs = build(["acme", "beta"])
    heads = heads_of(recs)
    heads["tenant:gamma"] = chain.ChainHead("tenant:gamma", 3, "ab" * 32)
    assert not verify(recs, heads).ok
    del heads["tenant:gamma"]
    del heads["tenant:beta"]
    assert "no head" in verify(recs, heads).reason


def test_a_tenant_check_fails_when_the_whole_tenant_chain_is_gone() -> None:
    """Records and head of one tenant deleted together: the tenant-scoped check (which
    sees only that tenant's chain) must not call an empty chain verified."""
    recs = build(LOG)
    heads = heads_of(recs)
    assert verify([r for r in recs if r.tenant_id == "beta"], heads, tenant_id="beta").ok
    del heads["tenant:beta"]
    result = verify([], heads, tenant_id="beta")
    assert not result.ok and "no audit records" in result.reason


def test_a_forged_record_relinked_into_the_chain_is_found() -> None:
    recs = build(LOG)
    forged = replace(recs[3], details={"i": "forged"})
    forged = replace(forged, hash=chain.recompute_hash(forged))  # hash fixed, but the next link breaks
    result = verify(recs[:3] + [forged] + recs[4:], heads_of(recs))
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_hmac_seals() -> None:
    sealer = chain.HmacHeadSealer(SecretBytes.random(32), "k1")
    recs = build(LOG)
    heads = heads_of(recs, sealer)
    ok = verify(recs, heads, sealer)
    assert ok.ok and ok.sealed
    assert repr(sealer) == "HmacHeadSealer(key_id='k1')"
    rewritten = dict(heads)
    rewritten[chain.GLOBAL_CHAIN] = replace(heads[chain.GLOBAL_CHAIN], count=5, head_hash=recs[4].hash)
    assert "does not verify" in verify(recs[:5], rewritten, sealer).reason
    assert "not sealed" in verify(recs, heads_of(recs), sealer).reason
    other = chain.HmacHeadSealer(SecretBytes.random(32), "k1")
    assert not verify(recs, heads, other).ok
    with pytest.raises(ValidationError):
        chain.HmacHeadSealer(SecretBytes.random(16), "short")


def test_signature_seals_verify_with_the_public_key_across_rotation() -> None:
    old, new = Signer.generate(), Signer.generate()
    recs = build(LOG)
    heads = heads_of(recs, chain.SignerHeadSealer(old))
    both = chain.SignatureHeadVerifier(Verifier.from_public_pem(old.public_key_pem(), new.public_key_pem()))
    assert verify(recs, heads, both).ok  # an old head still verifies after rotating the signer
    assert not verify(recs, heads, chain.SignatureHeadVerifier(new.verifier())).ok  # unknown key id
    assert not verify(recs, heads, chain.HmacHeadSealer(SecretBytes.random(32), old.key_id)).ok  # wrong algorithm


def export_of(records: list[AuditRecord], tenant: str | None, sealer: Any = None) -> list[dict[str, Any]]:
    heads = heads_of(records, sealer)
    if tenant is None:
        return [chain.record_to_json(r) for r in records] + [h.to_json() for h in heads.values()]
    mine = [r for r in records if r.tenant_id == tenant]
    return [chain.record_to_json(r) for r in mine] + [heads[chain.tenant_chain(tenant)].to_json()]


def test_export_round_trip_and_offline_verification() -> None:
    recs = build(LOG)
    for tenant in ("acme", "beta", None):
        lines = export_of(recs, tenant)
        assert chain.verify_export(lines).ok, tenant
        assert [chain.record_from_json(d) for d in lines if d["type"] == "record"] == [
            r for r in recs if tenant is None or r.tenant_id == tenant
        ]


def test_export_verification_failures() -> None:
    recs = build(LOG)
    lines = export_of(recs, "acme")
    assert not chain.verify_export(lines[1:]).ok  # first record dropped
    assert not chain.verify_export([lines[1], lines[0], *lines[2:]]).ok  # reordered
    assert not chain.verify_export(lines[:-1]).ok  # no head
    assert not chain.verify_export(lines + [export_of(recs, "beta")[-1]]).ok  # two tenant heads
    assert not chain.verify_export([{"type": "comment"}, *lines]).ok
    assert not chain.verify_export([{**lines[0], "seq": "x"}, *lines[1:]]).ok
    mixed = [lines[0], chain.record_to_json(recs[1]), *lines[1:]]  # another tenant's record slipped in
    assert "another tenant" in chain.verify_export(mixed).reason


def test_anchor_detects_rollback_and_rewrite() -> None:
    recs = build(LOG)
    lines = export_of(recs, "acme")
    anchor = (2, lines[1]["hash"])
    assert chain.verify_export(lines, anchor=anchor).ok
    shorter = export_of(recs[:1], "acme")  # the log rolled back to before the anchor
    assert chain.verify_export(shorter).ok and not chain.verify_export(shorter, anchor=anchor).ok
    assert not chain.verify_export(lines, anchor=(2, "00" * 32)).ok
