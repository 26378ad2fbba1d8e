"""The audit chain, pure: canonical encoding, record hashes, chain-head seals, and a
streaming verifier shared by every backend and by the offline export verifier.

Chains
------
Every record is on the **global** chain (``seq`` 1, 2, 3 …, ``prev_hash`` = hash of
record ``seq - 1``, ``GENESIS`` for the first). A record that names a tenant is also on
that **tenant's** chain (``tenant_seq`` 1, 2, 3 …, ``tenant_prev_hash``). One hash per
record covers both links, so a customer can verify their own export without seeing other
tenants' records, and the platform can verify everything including records without a
tenant.

``hash = SHA-256(canonical_record(record))`` where the canonical form is JSON with sorted
keys, no whitespace, ASCII only, no NaN, over ``v, seq, ts, actor, action, tenant,
run_id, details, prev_hash, tenant_seq, tenant_prev_hash`` (``ts`` as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``).

Heads
-----
Each chain has a head (``count``, ``head_hash``) updated in the append's transaction. A
head may be **sealed** (HMAC-SHA256, or the platform signing key: Ed25519 or ECDSA P-256,
over ``canonical_head``) with a key kept out of the database: then an attacker who can
write the database but lacks the key can neither truncate the tail nor rewrite records
and re-hash, without the seal failing. He
can still roll the log back to a state whose sealed head he saved earlier; anchoring
(``verify_export(anchor=...)``, or publishing heads elsewhere) detects that.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.audit import (
    FORMAT_VERSION,
    GENESIS,
    canonical_json,
    canonical_record,
    format_ts,
    parse_ts,
    recompute_hash,
    record_hash,
)
from archive_kms.errors import IntegrityError, ValidationError
from archive_kms.state.port import AuditRecord, AuditVerification

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "GLOBAL_CHAIN",
    "ChainHead",
    "ChainVerifier",
    "canonical_head",
    "canonical_json",
    "canonical_record",
    "format_ts",
    "parse_ts",
    "recompute_hash",
    "record_hash",
    "seal_head",
    "tenant_chain",
    "verify_export",
]

GLOBAL_CHAIN = "global"
AUDIT_HEAD_PURPOSE = "audit-head"


def tenant_chain(tenant_id: str) -> str:
    return f"tenant:{tenant_id}"


def record_to_json(rec: AuditRecord) -> dict[str, Any]:
    return {
        "type": "record",
        "seq": rec.seq,
        "ts": format_ts(rec.ts),
        "actor": rec.actor,
        "action": rec.action,
        "tenant": rec.tenant_id,
        "run_id": rec.run_id,
        "details": dict(rec.details),
        "prev_hash": rec.prev_hash,
        "tenant_seq": rec.tenant_seq,
        "tenant_prev_hash": rec.tenant_prev_hash,
        "hash": rec.hash,
    }


def record_from_json(doc: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        seq=int(doc["seq"]),
        ts=parse_ts(doc["ts"]),
        actor=doc["actor"],
        action=doc["action"],
        tenant_id=doc.get("tenant"),
        run_id=doc.get("run_id"),
        details=doc.get("details") or {},
        prev_hash=doc["prev_hash"],
        tenant_seq=doc.get("tenant_seq"),
        tenant_prev_hash=doc.get("tenant_prev_hash"),
        hash=doc["hash"],
    )


# --- chain heads and seals --------------------------------------------------------------


@dataclass(frozen=True)
class ChainHead:
    chain: str
    count: int
    head_hash: str
    seal: str | None = None  # base64
    seal_alg: str | None = None
    seal_key_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "head",
            "chain": self.chain,
            "count": self.count,
            "head_hash": self.head_hash,
            "seal": self.seal,
            "seal_alg": self.seal_alg,
            "seal_key_id": self.seal_key_id,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ChainHead:
        return cls(
            chain=doc["chain"],
            count=int(doc["count"]),
            head_hash=doc["head_hash"],
            seal=doc.get("seal"),
            seal_alg=doc.get("seal_alg"),
            seal_key_id=doc.get("seal_key_id"),
        )


def canonical_head(chain: str, count: int, head_hash: str) -> bytes:
    return canonical_json({"v": FORMAT_VERSION, "chain": chain, "count": count, "head_hash": head_hash}).encode("ascii")


class HeadVerifier(Protocol):
    """Checks a head seal made by the key named ``key_id``."""

    algorithm: str

    def algorithm_for(self, key_id: str) -> str | None:
        """The seal algorithm of the trusted key ``key_id`` (None: no such key): a head's
        ``seal_alg`` must equal it."""
        ...

    def verify(self, message: bytes, seal: bytes, *, key_id: str) -> bool: ...


class HeadSealer(HeadVerifier, Protocol):
    key_id: str

    def seal(self, message: bytes) -> bytes: ...


class HmacHeadSealer:
    """HMAC-SHA256 with a platform secret: cheap, but only the platform can verify."""

    algorithm = "hmac-sha256"

    def __init__(self, key: SecretBytes, key_id: str) -> None:
        if len(key) < 32:
            raise ValidationError("audit head HMAC key must be at least 32 bytes")
        self._key = key
        self.key_id = key_id

    def seal(self, message: bytes) -> bytes:
        return hmac.new(self._key.reveal(), message, hashlib.sha256).digest()

    def algorithm_for(self, key_id: str) -> str | None:
        return self.algorithm if key_id == self.key_id else None

    def verify(self, message: bytes, seal: bytes, *, key_id: str) -> bool:
        return key_id == self.key_id and hmac.compare_digest(self.seal(message), seal)

    def __repr__(self) -> str:
        return f"HmacHeadSealer(key_id={self.key_id!r})"


class SignerHeadSealer:
    """A signature by the platform signing key (``crypto.signing.Signer``, purpose
    ``audit-head``; ``seal_alg`` ``ed25519`` or ``ecdsa-p256``, the signer's algorithm):
    customers verify an export with the public key alone (``SignatureHeadVerifier``), and
    old heads stay verifiable across key rotation, also to a key of the other algorithm."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self.key_id = signer.key_id
        self.algorithm = signer.algorithm
        self._verifier = SignatureHeadVerifier(signer.verifier())

    def seal(self, message: bytes) -> bytes:
        return self._signer.sign(message, purpose=AUDIT_HEAD_PURPOSE)

    def algorithm_for(self, key_id: str) -> str | None:
        return self._verifier.algorithm_for(key_id)

    def verify(self, message: bytes, seal: bytes, *, key_id: str) -> bool:
        return self._verifier.verify(message, seal, key_id=key_id)

    def __repr__(self) -> str:
        return f"SignerHeadSealer(key_id={self.key_id!r})"


class SignatureHeadVerifier:
    """Verifies head seals by the platform signing key with public keys only (what a
    customer holds); each key id selects its key and so its algorithm."""

    algorithm = "signature"  # seal_alg is checked per key (algorithm_for), never against this

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def algorithm_for(self, key_id: str) -> str | None:
        return self._verifier.algorithm_of(key_id)

    def verify(self, message: bytes, seal: bytes, *, key_id: str) -> bool:
        try:
            self._verifier.verify(message, seal, key_id=key_id, purpose=AUDIT_HEAD_PURPOSE)
        except IntegrityError:
            return False
        return True


def seal_head(sealer: HeadSealer | None, chain: str, count: int, head_hash: str) -> ChainHead:
    if sealer is None:
        return ChainHead(chain, count, head_hash)
    tag = sealer.seal(canonical_head(chain, count, head_hash))
    return ChainHead(chain, count, head_hash, base64.b64encode(tag).decode("ascii"), sealer.algorithm, sealer.key_id)


def check_head_seal(head: ChainHead, verifier: HeadVerifier | None) -> str | None:
    """None if the seal is acceptable, else the reason. Without a verifier seals are not
    checked (and ``AuditVerification.sealed`` stays False)."""
    if verifier is None:
        return None
    if head.seal is None:
        return f"chain {head.chain!r}: head is not sealed"
    key_id = head.seal_key_id
    expected = verifier.algorithm_for(key_id) if key_id else None
    if not key_id or expected is None:
        return f"chain {head.chain!r}: head sealed with {head.seal_alg}/{head.seal_key_id}, a key we do not trust"
    if head.seal_alg != expected:
        return f"chain {head.chain!r}: head sealed with {head.seal_alg}/{head.seal_key_id}, expected {expected}"
    try:
        tag = base64.b64decode(head.seal, validate=True)
    except ValueError:
        return f"chain {head.chain!r}: head seal is not base64"
    if not verifier.verify(canonical_head(head.chain, head.count, head.head_hash), tag, key_id=key_id):
        return f"chain {head.chain!r}: head seal does not verify (head rewritten)"
    return None


# --- streaming verification -------------------------------------------------------------


@dataclass
class _Tip:
    count: int = 0
    hash: str = GENESIS
    first_seq: int | None = None


class ChainVerifier:
    """Feed records in ``seq`` order, then ``finish`` with the stored heads.

    ``tenant_id=None`` checks the global chain and every tenant chain in one pass;
    ``tenant_id="t"`` checks only that tenant's chain (all a customer's export allows).
    """

    def __init__(self, *, tenant_id: str | None = None) -> None:
        self._only = tenant_id
        self._global = _Tip()
        self._last_seq = 0
        self._tenants: dict[str, _Tip] = {}
        self._failure: AuditVerification | None = None
        self.records = 0

    def fail(self, seq: int | None, reason: str) -> AuditVerification:
        """Record a failure found outside the chain rules (e.g. an unreadable row)."""
        if self._failure is None:
            self._failure = AuditVerification(False, seq, reason, self.records)
        return self._failure

    @property
    def failure(self) -> AuditVerification | None:
        return self._failure

    def feed(self, rec: AuditRecord) -> AuditVerification | None:
        """Check one record; returns the (first) failure or None. Stop feeding after one."""
        if self._failure is not None:
            return self._failure
        self.records += 1
        if self._only is None:
            expected = self._global.count + 1
            if rec.seq != expected:
                if rec.seq > expected:
                    return self.fail(expected, f"record {expected} is missing (deleted): next is {rec.seq}")
                return self.fail(rec.seq, f"record {rec.seq} out of order after {self._global.count}")
        elif rec.seq <= self._last_seq:
            return self.fail(rec.seq, f"record {rec.seq} out of order after {self._last_seq}")
        if self._only is not None and rec.tenant_id != self._only:
            return self.fail(rec.seq, f"record {rec.seq} belongs to another tenant")
        try:
            recomputed = recompute_hash(rec)
        except ValidationError as exc:
            return self.fail(rec.seq, f"record {rec.seq} cannot be encoded: {exc}")
        if not hmac.compare_digest(recomputed, rec.hash):
            return self.fail(rec.seq, f"record {rec.seq}: stored hash does not match its contents (edited or moved)")
        if self._only is None:
            if rec.prev_hash != self._global.hash:
                return self.fail(
                    rec.seq,
                    f"record {rec.seq}: prev_hash does not link to record "
                    f"{rec.seq - 1} (deleted, inserted or reordered)",
                )
            self._global.count, self._global.hash = rec.seq, rec.hash
        self._last_seq = rec.seq
        if rec.tenant_id is not None:
            tip = self._tenants.setdefault(rec.tenant_id, _Tip())
            if rec.tenant_seq != tip.count + 1:
                return self.fail(
                    rec.seq,
                    f"record {rec.seq}: tenant {rec.tenant_id!r} record "
                    f"{tip.count + 1} is missing or out of order "
                    f"(found tenant_seq {rec.tenant_seq})",
                )
            if rec.tenant_prev_hash != tip.hash:
                return self.fail(
                    rec.seq, f"record {rec.seq}: tenant_prev_hash does not link to the tenant's previous record"
                )
            tip.count, tip.hash = rec.tenant_seq, rec.hash
            if tip.first_seq is None:
                tip.first_seq = rec.seq
        elif rec.tenant_seq is not None or rec.tenant_prev_hash is not None:
            return self.fail(rec.seq, f"record {rec.seq}: tenant chain fields without a tenant")
        return None

    def finish(self, heads: Mapping[str, ChainHead], verifier: HeadVerifier | None = None) -> AuditVerification:
        """Compare the tips with the stored heads (and check their seals)."""
        if self._failure is not None:
            return self._failure
        expected: dict[str, _Tip] = {}
        if self._only is None:
            expected[GLOBAL_CHAIN] = self._global
            for tid, tip in self._tenants.items():
                expected[tenant_chain(tid)] = tip
            unexpected = sorted(set(heads) - set(expected))
            for chain in unexpected:
                if heads[chain].count > 0:
                    return self.fail(
                        None, f"chain {chain!r} has {heads[chain].count} records by its head, none in the log (deleted)"
                    )
        else:
            expected[tenant_chain(self._only)] = self._tenants.get(self._only, _Tip())
        for chain, tip in expected.items():
            head = heads.get(chain)
            if head is None:
                if tip.count == 0 and self._only is not None:
                    # Every tenant's chain starts with its creation record: an empty one
                    # is a tenant we never had, or a chain deleted with its head.
                    return self.fail(
                        None,
                        f"tenant {self._only!r} has no audit records: an unknown tenant, "
                        "or its records and head were deleted",
                    )
                if tip.count == 0:
                    continue
                return self.fail(None, f"chain {chain!r}: no head for {tip.count} records (head deleted)")
            if head.count != tip.count or head.head_hash != tip.hash:
                bad = (self._global.count + 1) if chain == GLOBAL_CHAIN else None
                if head.count > tip.count:
                    return self.fail(
                        bad, f"chain {chain!r}: head says {head.count} records, log has {tip.count} (tail truncated)"
                    )
                return self.fail(
                    bad,
                    f"chain {chain!r}: head (count {head.count}) does not match the last record (count {tip.count})",
                )
            reason = check_head_seal(head, verifier)
            if reason is not None:
                return self.fail(None, reason)
        return AuditVerification(True, None, None, self.records, sealed=verifier is not None)


def verify_export(
    lines: Iterable[Mapping[str, Any]], *, verifier: HeadVerifier | None = None, anchor: tuple[int, str] | None = None
) -> AuditVerification:
    """Verify an export (the dicts of ``export_audit``, e.g. parsed JSONL lines) offline.

    A tenant export (its records and that tenant's head) is checked as that tenant's
    chain; a full export (every record, every head including ``global``) as all chains. ``anchor=(count, head_hash)``
    from an earlier export proves the log was not rolled back or rewritten below it.
    """
    records: list[Mapping[str, Any]] = []
    heads: dict[str, ChainHead] = {}
    for doc in lines:
        if doc.get("type") == "head":
            head = ChainHead.from_json(doc)
            heads[head.chain] = head
        elif doc.get("type") == "record":
            records.append(doc)
        else:
            return AuditVerification(False, None, f"unknown export line type {doc.get('type')!r}")
    if GLOBAL_CHAIN in heads:
        tenant = None  # a full export: every chain, every head
    elif len(heads) == 1:
        tenant = next(iter(heads)).removeprefix("tenant:")
    else:
        return AuditVerification(False, None, f"a tenant export ends with exactly one head, found {len(heads)}")
    checker = ChainVerifier(tenant_id=tenant)
    anchor_seen = anchor is None
    for doc in records:
        try:
            rec = record_from_json(doc)
        except (KeyError, ValueError, TypeError) as exc:
            return AuditVerification(False, doc.get("seq"), f"malformed record: {exc}", checker.records)
        if checker.feed(rec) is not None:
            break
        if anchor is not None:
            position = rec.seq if tenant is None else rec.tenant_seq
            if position == anchor[0]:
                if rec.hash != anchor[1]:
                    return AuditVerification(
                        False,
                        rec.seq,
                        "record at the anchor has another hash (log rewritten since the anchor)",
                        checker.records,
                    )
                anchor_seen = True
    result = checker.finish(heads, verifier)
    if result.ok and not anchor_seen:
        return AuditVerification(
            False,
            None,
            f"export has fewer than {anchor[0]} records: "  # type: ignore[index]
            "log rolled back since the anchor",
            result.records,
        )
    return result
