"""The signed erasure record of an erase run: one document that covers what the keychain
destroyed, what storage deleted and what the search index dropped, verifiable offline with
the record and the platform's public key alone (``archive-kms erasure verify FILE``).

Byte-for-byte format: ``docs/erasure-record.md``. In short: canonical JSON (sorted keys,
no whitespace, ASCII), signed by the platform signing key (Ed25519 or ECDSA P-256) over
``b"archive_kms/erasure-certificate/v1\\n" + canonical JSON without "signature"``. It
embeds, verbatim as JSON objects, the keychain's own signed erasure records
(``keys.keychain.erasure.ErasureRecord``, purpose ``erasure-record/v1``), one per workspace
the run erased keys in; the verifier checks each of those signatures too and that they
agree with the document (tenant, DEK count, workspaces).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.keychain import SignedJson, b64_in, canonical_json, time_in, time_out
from archive_kms.errors import IntegrityError
from archive_kms.keys.keychain import ErasureRecord

__all__ = [
    "CERTIFICATE_FORMAT",
    "CERTIFICATE_PURPOSE",
    "CertificateCheck",
    "ErasureCertificate",
    "digest_of_names",
    "verify_certificate",
]

CERTIFICATE_FORMAT = "archive_kms.erasure-certificate/1"
CERTIFICATE_PURPOSE = "erasure-certificate/v1"
#: The largest document ``verify_certificate`` parses (a run's keychain records are small).
MAX_CERTIFICATE_BYTES = 16 * 1024 * 1024


def digest_of_names(names: Iterable[bytes | str]) -> str:
    """SHA-256 (hex) over the names sorted bytewise, each as a 4-byte big-endian length
    followed by its bytes: one value a customer can recompute from their own list."""
    h = hashlib.sha256()
    for name in sorted(n.encode("utf-8") if isinstance(n, str) else bytes(n) for n in names):
        h.update(len(name).to_bytes(4, "big"))
        h.update(name)
    return h.hexdigest()


@dataclass(frozen=True)
class ErasureCertificate(SignedJson):
    """What one erase run destroyed, deleted and unindexed, signed by the platform."""

    tenant_id: str
    run_id: str
    scope: str  # "buckets" | "workspace"
    workspace_id: str | None  # scope workspace
    older_than: datetime | None  # scope buckets: every bucket that started before this one's
    reason: str
    trigger: str  # "operator" | "retention"
    erased_at: datetime
    key_records: tuple[Mapping[str, Any], ...]  # the keychain's signed ErasureRecords, as JSON objects
    dek_ids_destroyed: int
    workspaces_destroyed: tuple[str, ...]  # workspaces whose L3 key was destroyed
    storage: Mapping[str, Any]  # location, objects_deleted, bytes_deleted, names_sha256, remaining
    index: Mapping[str, Any]  # indices, documents_deleted, doc_ids_sha256, remaining
    signer_key_id: str = ""
    signature: bytes = field(default=b"", repr=False)

    def _fields(self) -> dict[str, Any]:
        return {
            "format": CERTIFICATE_FORMAT,
            "tenant_id": self.tenant_id,
            "run_id": self.run_id,
            "scope": self.scope,
            "workspace_id": self.workspace_id,
            "older_than": time_out(self.older_than),
            "reason": self.reason,
            "trigger": self.trigger,
            "erased_at": time_out(self.erased_at),
            "keys": {
                "records": [dict(r) for r in self.key_records],
                "dek_ids_destroyed": self.dek_ids_destroyed,
                "workspaces_destroyed": list(self.workspaces_destroyed),
            },
            "storage": dict(self.storage),
            "index": dict(self.index),
            "signer_key_id": self.signer_key_id,
        }

    def signed(self, signer: Signer) -> ErasureCertificate:
        unsigned = replace(self, signer_key_id=signer.key_id, signature=b"")
        return replace(unsigned, signature=signer.sign(unsigned.signing_payload(), purpose=CERTIFICATE_PURPOSE))

    @classmethod
    def from_json(cls, data: bytes | str) -> ErasureCertificate:
        """Parse (never verify: ``verify_certificate`` does). ``IntegrityError`` if malformed."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if len(data) > MAX_CERTIFICATE_BYTES:
            raise IntegrityError(f"erasure record is larger than {MAX_CERTIFICATE_BYTES} bytes")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != CERTIFICATE_FORMAT:
                raise ValueError("not an erasure certificate")
            keys = obj["keys"]
            return cls(
                tenant_id=_str(obj["tenant_id"]),
                run_id=_str(obj["run_id"]),
                scope=_str(obj["scope"]),
                workspace_id=obj["workspace_id"],
                older_than=time_in(obj["older_than"]),
                reason=_str(obj["reason"]),
                trigger=_str(obj["trigger"]),
                erased_at=time_in(obj["erased_at"]),  # type: ignore[arg-type]
                key_records=tuple(_obj(r) for r in keys["records"]),
                dek_ids_destroyed=_int(keys["dek_ids_destroyed"]),
                workspaces_destroyed=tuple(_str(w) for w in keys["workspaces_destroyed"]),
                storage=_obj(obj["storage"]),
                index=_obj(obj["index"]),
                signer_key_id=_str(obj["signer_key_id"]),
                signature=b64_in(obj["signature"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            raise IntegrityError(f"not a well-formed {CERTIFICATE_FORMAT} document") from None


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError("expected a non-negative integer")
    return v


def _obj(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError("expected an object")
    return v


@dataclass(frozen=True)
class CertificateCheck:
    """The outcome of ``verify_certificate``: ``ok`` with what it covers, or why not."""

    ok: bool
    reason: str
    certificate: ErasureCertificate | None = None
    key_records: int = 0

    def summary(self) -> dict[str, Any]:
        c = self.certificate
        out: dict[str, Any] = {"ok": self.ok, "reason": self.reason}
        if c is not None and self.ok:
            out.update(
                tenant=c.tenant_id,
                run_id=c.run_id,
                scope=c.scope,
                workspace=c.workspace_id,
                older_than=time_out(c.older_than),
                erased_at=time_out(c.erased_at),
                signer_key_id=c.signer_key_id,
                dek_ids_destroyed=c.dek_ids_destroyed,
                key_records=self.key_records,
                objects_deleted=c.storage.get("objects_deleted"),
                bytes_deleted=c.storage.get("bytes_deleted"),
                documents_deleted=c.index.get("documents_deleted"),
            )
        return out


def verify_certificate(data: bytes | str, verifier: Verifier) -> CertificateCheck:
    """Check an erasure record offline: the platform's signature over the document, the
    signature of every keychain erasure record it embeds (same verifier), and that they
    agree: same tenant, the DEK count is the sum of theirs, a destroyed workspace has a
    record of scope ``workspace``, nothing left behind in storage or index. Never raises
    for a bad document: ``ok=False`` with the reason."""
    try:
        cert = ErasureCertificate.from_json(data)
        verifier.verify(cert.signing_payload(), cert.signature, key_id=cert.signer_key_id, purpose=CERTIFICATE_PURPOSE)
        records = [ErasureRecord.from_json(canonical_json(r)) for r in cert.key_records]
        for rec in records:
            rec.verify(verifier)
        _agree(cert, records)
    except IntegrityError as exc:
        return CertificateCheck(False, str(exc))
    return CertificateCheck(True, "signature and contents verify", cert, len(records))


def _agree(cert: ErasureCertificate, records: Sequence[ErasureRecord]) -> None:
    others = {r.tenant_id for r in records} - {cert.tenant_id}
    if others:
        raise IntegrityError(f"embedded keychain records name another tenant ({sorted(others)[0]})")
    total = sum(len(r.dek_ids) for r in records)
    if total != cert.dek_ids_destroyed:
        raise IntegrityError(
            f"the record says {cert.dek_ids_destroyed} DEKs were destroyed, its keychain records list {total}"
        )
    whole = {r.workspace_id for r in records if r.scope == "workspace" and r.l3_destroyed}
    if set(cert.workspaces_destroyed) != whole:
        raise IntegrityError("the destroyed workspaces disagree with the keychain records")
    if cert.scope == "workspace" and cert.workspace_id not in {r.workspace_id for r in records}:
        raise IntegrityError(f"no keychain record for workspace {cert.workspace_id}")
    for part, what in ((cert.storage, "storage"), (cert.index, "index")):
        if part.get("remaining") != 0:
            raise IntegrityError(f"{what} still held erased data when the record was made")
