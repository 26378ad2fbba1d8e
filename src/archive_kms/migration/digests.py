"""Keyed plaintext digests for the copy ledger (issue #11 finding 5; ADR 0018).

The copy ledger must remember, between the copy and the verify step (and across a crash),
which plaintext each object holds, without handing a state-database reader a way to test
guesses: an unkeyed SHA-256 of a small record is a dictionary attack away from its fields.
So a ledger row holds

    "hk1:" + base64url(HMAC-SHA256(K_run, message))            (47 characters, no padding)

    K_run   = HKDF-SHA256(ikm = the tenant's search key material (derived from L2),
                          salt = none, length = 32,
                          info = "archive_kms/v1/ledger-digest/" || tenant id || "/" || run id)
    message = "archive_kms/v1/ledger-digest" || lp(name) || lp(source ETag) || u64(source size)
              || u64(plaintext size) || SHA-256(plaintext)        (lp = u32 length || bytes)

* **Keyed**: without L2 (which only L1, the customer's key, unwraps) nobody recomputes or
  confirms it, so the ledger leaks nothing about record contents; revoking the tenant
  makes the key underivable too.
* **Bound** to tenant and run (through the key) and to the object name and the source
  version the copy read (through the message): a row moved to another object, another
  version or another run does not match.
* **As strong as the SHA-256 it replaces** for verification: two plaintexts with equal
  keyed digests have equal SHA-256 (up to an HMAC collision, 2^-128); verify recomputes it
  from what it decrypts, with the manifest's ETag and size, and compares.
* **Purged** when no longer needed: the report step clears every digest of its run
  (``purge_run_digests``), and so does a cancelled run.

The digest is computed from SHA-256 values the envelope code computes anyway, so it adds
no pass over the data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from archive_kms.crypto.kdf import hkdf_sha256
from archive_kms.state.port import CopyRecord, Fence

PREFIX = "hk1:"
_INFO = b"archive_kms/v1/ledger-digest/"
_LABEL = b"archive_kms/v1/ledger-digest"
PURGE_BATCH = 1000


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


class LedgerDigests:
    """The keyed digest of one run's objects. Holds the derived key (never shown)."""

    def __init__(self, keychain: Any, tenant_id: str, run_id: str) -> None:
        material = keychain.search_key_material(tenant_id)
        info = _INFO + tenant_id.encode() + b"/" + run_id.encode()
        self._key = hkdf_sha256(material.reveal(), info=info)

    def __repr__(self) -> str:
        return "LedgerDigests(<key hidden>)"

    def of(
        self, name: bytes, source_etag: str | None, source_size: int, plaintext_size: int, plaintext_sha256: str
    ) -> str:
        """The ledger digest of ``name`` whose source version (``source_etag``, quotes
        ignored, and ``source_size``) decrypts to a plaintext of ``plaintext_size`` bytes
        with SHA-256 ``plaintext_sha256`` (hex)."""
        message = b"".join(
            (
                _LABEL,
                _lp(name),
                _lp((source_etag or "").strip('"').encode()),
                source_size.to_bytes(8, "big"),
                plaintext_size.to_bytes(8, "big"),
                bytes.fromhex(plaintext_sha256),
            )
        )
        mac = hmac.new(self._key, message, hashlib.sha256).digest()
        return PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def matches(self, recorded: str | None, *args: Any) -> bool:
        """Whether ``recorded`` (a ledger row's digest) is ``of(*args)``; constant time."""
        return recorded is not None and hmac.compare_digest(recorded.encode(), self.of(*args).encode())


def is_keyed(recorded: str | None) -> bool:
    """Whether a ledger digest is a keyed one (rows from older code hold a bare SHA-256)."""
    return recorded is not None and recorded.startswith(PREFIX)


def purge_run_digests(state: Any, run_id: str, *, fence: Fence | None = None) -> int:
    """Clear the digest of every ledger row of ``run_id`` (status, destination ETag and size,
    and errors stay): after the report nothing compares them again. Idempotent; returns how
    many rows still held one."""
    purged = 0
    batch: list[CopyRecord] = []

    def flush(rows: Iterable[CopyRecord]) -> None:
        state.record_copies(run_id, list(rows), fence=fence)

    for rec in state.iter_copies(run_id):
        if rec.plaintext_sha256 is None:
            continue
        batch.append(CopyRecord(rec.name, rec.status, rec.dest_etag, rec.dest_size, None, rec.error))
        purged += 1
        if len(batch) >= PURGE_BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return purged


__all__ = ["PREFIX", "LedgerDigests", "is_keyed", "purge_run_digests"]
