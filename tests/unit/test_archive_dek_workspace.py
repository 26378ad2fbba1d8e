"""``TenantArchive.read_object`` only opens an object with a DEK of the object's own
workspace (security review PoC 7): an object whose header names workspace A but a DEK of
workspace B would otherwise decrypt, and outlive the crypto-erasure of workspace A."""

from __future__ import annotations

import pytest

from archive_kms.crypto.envelope import ObjectBinding, encrypt_bytes
from archive_kms.errors import IntegrityError, KeyDestroyedError
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant


def _platform_with_object_under_another_workspaces_dek() -> tuple[Platform, bytes]:
    p = Platform.in_memory()
    create_tenant(p, "acme", provision_storage=False)
    archive = p.open_archive("acme")
    dek_b = p.keychain.dek_for_encrypt("acme", "wsB")
    p.keychain.create_workspace("acme", "wsA")
    name = b"records/wsA/Account/001"
    # a writer with key access (a bug or an insider) seals a wsA object under a wsB DEK
    blob = encrypt_bytes(b'{"x":1}', dek=dek_b.key, dek_id=dek_b.dek_id, binding=ObjectBinding("acme", "wsA", name))
    archive.store.put_stream(name, [blob])
    return p, name


def test_read_object_refuses_a_dek_of_another_workspace() -> None:
    p, name = _platform_with_object_under_another_workspaces_dek()
    archive = p.open_archive("acme")
    with pytest.raises(IntegrityError, match="names workspace wsA but DEK l4/wsB/"):
        b"".join(archive.read_object(name))
    p.keychain.erase_workspace("acme", "wsA")
    with pytest.raises(IntegrityError):  # and the erasure of wsA cannot be sidestepped with it
        b"".join(archive.read_object(name))


def test_read_object_still_opens_objects_of_their_own_workspace() -> None:
    p, _ = _platform_with_object_under_another_workspaces_dek()
    archive = p.open_archive("acme")
    name = b"records/wsA/Account/002"
    assert archive.put_object(name, "wsA", [b"hello"]) == (True, 5)
    assert b"".join(archive.read_object(name)) == b"hello"
    p.keychain.erase_workspace("acme", "wsA")
    with pytest.raises(KeyDestroyedError):
        b"".join(archive.read_object(name))
