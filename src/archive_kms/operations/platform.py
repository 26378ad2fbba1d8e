"""The platform: the wired set of ports one process works with.

``Platform`` holds the state store, the keychain, the search index and a cache of
object stores per location. ``wiring.build_platform(settings)`` builds it on the real
services; ``Platform.in_memory()`` builds it on the fakes (which are held to the same
contract suites), for fast tests.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archive_kms.errors import KeyNotFoundError, StateError
from archive_kms.operations.archive import TenantArchive
from archive_kms.search import IndexMode, SearchIndex, derive_search_keys
from archive_kms.state.port import KeyMode, StateStore
from archive_kms.storage import Location, ObjectStore


@dataclass
class Platform:
    settings: Any
    state: StateStore
    keychain: Any  # keys.keychain.Keychain
    index: SearchIndex
    resolve_provider: Callable[[str], Any]  # key ref -> KeyProvider
    open_store: Callable[[Location], ObjectStore]
    provisioner: Any = None  # storage.provisioning.LocationProvisioner: buckets/containers themselves
    anchors: Any = None  # state.anchors.AnchorStore where the audit head is published; None = not configured
    _stores: dict[str, ObjectStore] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store_for(self, location: Location) -> ObjectStore:
        with self._lock:
            store = self._stores.get(location.uri)
            if store is None:
                store = self._stores[location.uri] = self.open_store(location)
            return store

    def keychain_exists(self, tenant_id: str) -> bool:
        try:
            self.keychain.status(tenant_id)
        except KeyNotFoundError:
            return False
        return True

    def location_of(self, tenant_id: str) -> Location:
        return Location.from_dict(self._tenant(tenant_id).location)

    def _tenant(self, tenant_id: str):
        t = self.state.get_tenant(tenant_id)
        if t is None:
            raise StateError(
                f"unknown tenant {tenant_id!r}: create it with `archive-kms tenant create`",
                resource=f"tenant:{tenant_id}",
            )
        return t

    @staticmethod
    def index_mode(key_mode: KeyMode | str) -> IndexMode:
        """Managed tenants get a plaintext index; every customer-key tenant a keyed one."""
        return IndexMode.PLAINTEXT if KeyMode(key_mode) is KeyMode.MANAGED else IndexMode.KEYED

    def search_keys(self, tenant_id: str, key_mode: KeyMode | str):
        if self.index_mode(key_mode) is IndexMode.PLAINTEXT:
            return None
        return derive_search_keys(self.keychain.search_key_material(tenant_id), tenant_id)

    def open_archive(self, tenant_id: str) -> TenantArchive:
        """The tenant's archive where it lives now (registry lookup)."""
        from archive_kms.storage.name_limits import tenant_locations

        t = self._tenant(tenant_id)
        location = Location.from_dict(t.location)
        return TenantArchive(
            tenant_id=tenant_id,
            store=self.store_for(location),
            keychain=self.keychain,
            index=self.index,
            index_mode=self.index_mode(t.key_mode),
            search_keys=self.search_keys(tenant_id, t.key_mode),
            relocate=lambda: self.open_archive(tenant_id),
            keyed_search_keys=lambda: derive_search_keys(self.keychain.search_key_material(tenant_id), tenant_id),
            name_locations=tenant_locations(
                location,
                getattr(self.settings, "shared_bucket", None),
                getattr(self.settings, "shared_azure_account", None),
            ),
        )

    @classmethod
    def in_memory(cls, settings: Any = None, *, clock=None) -> Platform:
        """Every port on its in-memory implementation (unit tests, dry runs)."""
        import time

        from archive_kms.config import Settings
        from archive_kms.keys.cache import KeyCache
        from archive_kms.keys.keychain import Keychain
        from archive_kms.keys.keychain_store import InMemoryKeychainStore
        from archive_kms.keys.memory import MemoryKeyProvider, MemoryKms
        from archive_kms.keys.signing import Signer
        from archive_kms.search.memory import MemorySearchIndex
        from archive_kms.state.memory import InMemoryStateStore
        from archive_kms.storage.memory import MemoryObjectStore

        settings = settings or Settings(aws_endpoint_url=None)
        kms = MemoryKms()
        providers: dict[str, Any] = {}

        def resolve(ref: str):
            # every reference resolves to a key of the in-memory KMS, created on first use
            if ref not in providers:
                name = "k" + hashlib.sha256(ref.encode()).hexdigest()[:16]
                provider = MemoryKeyProvider(kms, kms.create_key(name))
                providers[ref] = providers[provider.key_ref] = provider  # the keychain resolves by key_ref
            return providers[ref]

        stores: dict[str, MemoryObjectStore] = {}

        def open_store(location: Location) -> ObjectStore:
            return stores.setdefault(location.uri, MemoryObjectStore())

        clock = clock or time.time
        state = InMemoryStateStore()
        # The keychain records its commits in the state store's audit log and checks its
        # head against it (rollback detection), as in production wiring.
        keychain = Keychain(InMemoryKeychainStore(), resolve, Signer.generate(), clock, KeyCache(), audit=state)
        from archive_kms.state.anchors import MemoryAnchorStore
        from archive_kms.storage.provisioning import MemoryProvisioner

        return cls(
            settings,
            state,
            keychain,
            MemorySearchIndex(),
            resolve,
            open_store,
            MemoryProvisioner(open_store),
            anchors=MemoryAnchorStore(),
        )
