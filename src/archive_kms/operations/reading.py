"""Reading an archived object back: decrypted and authenticated end to end, with the DEK
its header names taken from the tenant's keychain, and only if that DEK belongs to the
object's workspace.

Used where an object's content is proven rather than served: tenant verification
(``operations.verification``), and the migration's copy and verify shards and index
rebuild (``migration/``), which build on these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from archive_kms.crypto.envelope import DecryptResult, EnvelopeHeader, ObjectBinding, decrypt_iter
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import IntegrityError
from archive_kms.keys.keychain import parse_dek_id
from archive_kms.operations.archive import workspace_of
from archive_kms.storage.port import ObjectStore

__all__ = ["DekSource", "dek_lookup", "read_back", "read_plaintext_digest"]


class DekSource(Protocol):
    """The slice of the keychain that opens objects."""

    def dek_by_id(self, tenant_id: str, dek_id: str) -> SecretBytes:
        """The DEK ``dek_id`` of ``tenant_id``; ``KeyNotFoundError`` naming
        ``keychain:<tenant>/<dek id>`` if the tenant never had it (or it was erased)."""
        ...


def dek_lookup(keychain: DekSource, tenant_id: str) -> Callable[[EnvelopeHeader], SecretBytes]:
    """The DEK a header names, from ``tenant_id``'s keychain, only if it belongs to the
    header's workspace (an object must not open with another workspace's DEK: erasing a
    workspace has to make all of its objects unreadable)."""

    def lookup(header: EnvelopeHeader) -> SecretBytes:
        if parse_dek_id(header.dek_id)[0] != header.workspace_id:
            raise IntegrityError(
                f"object header names workspace {header.workspace_id} but DEK {header.dek_id}",
                resource=f"keychain:{tenant_id}/{header.dek_id}",
            )
        return keychain.dek_by_id(tenant_id, header.dek_id)

    return lookup


def read_back(
    store: ObjectStore,
    keychain: DekSource,
    tenant_id: str,
    name: bytes,
    after_segment: Callable[[], None] | None = None,
) -> DecryptResult:
    """Decrypt ``name`` from ``store`` end to end (one GET); the envelope's
    ``DecryptResult`` (plaintext size and SHA-256, ciphertext size, header). Raises
    IntegrityError for anything that does not authenticate, ObjectNotFoundError if absent.
    ``after_segment`` runs after each authenticated segment (it may raise to stop the read)."""
    binding = ObjectBinding(tenant_id, workspace_of(name), name)
    with store.open_read(name) as reader:
        it = decrypt_iter(reader, binding=binding, dek_for=dek_lookup(keychain, tenant_id))
        for _ in it:
            if after_segment is not None:
                after_segment()
        return it.result


def read_plaintext_digest(store: ObjectStore, keychain: DekSource, tenant_id: str, name: bytes) -> tuple[int, str, str]:
    """``read_back`` as (plaintext size, SHA-256 hex, DEK id)."""
    res = read_back(store, keychain, tenant_id, name)
    return res.plaintext_size, res.plaintext_sha256, res.header.dek_id
