"""The platform: the wired set of ports one process works with, and the one place that
wires them (the composition root).

``Platform`` holds the settings, the state store, the keychain, the search index, the
key-provider resolver, the object stores per location, the location provisioner and the
audit anchor store. Two constructors build it, and they are the only code that knows
every adapter (no adapter imports this module; docs/adr/0008-layers.md):

* ``Platform.from_settings(settings)``: every port on its real backend (SQL state store
  on SQLite or PostgreSQL with the keychain stored beside it, Elasticsearch, S3 / Azure
  Blob, the key-provider registry, S3 Object Lock anchors when configured), with the SDK
  clients built once from ``archive_kms.clients``;
* ``Platform.in_memory()``: every port on its in-memory implementation (held to the same
  contract suites), for fast tests and dry runs.

The adapters are imported inside the two constructors, so importing ``Platform`` as a
type (every operation and step does) does not load SQLAlchemy or an SDK.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from archive_kms import clients
from archive_kms.config import Settings, get_settings, stack_dir
from archive_kms.errors import ConfigurationError, KeyNotFoundError, StateError
from archive_kms.operations.archive import TenantArchive
from archive_kms.operations.search_guard import GuardedSearchIndex
from archive_kms.search import IndexMode, SearchIndex, SearchKeys, derive_search_keys, index_name
from archive_kms.state.port import KeyMode, StateStore, TenantRecord
from archive_kms.storage import Cloud, Location, ObjectStore

if TYPE_CHECKING:
    from archive_kms.crypto.signing import Signer, Verifier
    from archive_kms.keys.keychain import Keychain
    from archive_kms.keys.keychain.access import GracePolicy, L1Verdict
    from archive_kms.keys.limits import RequestLimiter
    from archive_kms.keys.port import KeyProvider
    from archive_kms.state.anchors import AnchorStore
    from archive_kms.storage.provisioning import LocationProvisioner, TenantAccountProvisioner

__all__ = ["Platform", "grace_policy_lookup", "key_state_reporter", "platform_signer", "remote_signer"]


@dataclass
class Platform:
    settings: Settings
    state: StateStore
    keychain: Keychain
    index: SearchIndex
    resolve_provider: Callable[[str], KeyProvider]  # key reference -> its provider (cached)
    open_store: Callable[[Location], ObjectStore]  # use ``store_for``: it keeps one store per location
    provisioner: LocationProvisioner  # the buckets/containers themselves
    anchors: AnchorStore | None = None  # where the audit head is published; None = not configured
    # The L1 references that are the platform's own (managed) key: the in-memory resolver
    # spells them memory://...; a real one managed://... (``is_platform_key``).
    platform_key_refs: set[str] = field(default_factory=set)
    signer: Signer | None = (
        None  # the platform signing key (keychain, audit seals, anchors, search generations, erasure records, rotation confirmations)
    )
    keychain_factory: Callable[[], Keychain] | None = None  # another keychain over the same store (probes)
    _stores: dict[str, ObjectStore] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def verifier(self) -> Verifier | None:
        """The public keys signatures are checked against: the signing key's (and, after a
        rotation, the earlier keys' listed in settings)."""
        return None if self.signer is None else self.signer.verifier()

    def store_for(self, location: Location) -> ObjectStore:
        with self._lock:
            store = self._stores.get(location.uri)
            if store is None:
                store = self._stores[location.uri] = self.open_store(location)
            return store

    def require_signer(self) -> Signer:
        """The platform signing key; ``ConfigurationError`` if this platform was built without it."""
        if self.signer is None:
            from archive_kms.errors import ConfigurationError

            raise ConfigurationError("this platform has no signing key (build it with Platform.from_settings)")
        return self.signer

    def keychain_exists(self, tenant_id: str) -> bool:
        try:
            self.keychain.status(tenant_id)
        except KeyNotFoundError:
            return False
        return True

    def location_of(self, tenant_id: str) -> Location:
        return Location.from_dict(self._tenant(tenant_id).location)

    def _tenant(self, tenant_id: str) -> TenantRecord:
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

    def search_keys(self, tenant_id: str, key_mode: KeyMode | str) -> SearchKeys | None:
        if self.index_mode(key_mode) is IndexMode.PLAINTEXT:
            return None
        return derive_search_keys(self.keychain.search_key_material(tenant_id), tenant_id)

    def is_platform_key(self, l1_ref: str) -> bool:
        """Whether a keychain head's L1 reference is the platform's managed key."""
        return l1_ref.startswith("managed://") or l1_ref in self.platform_key_refs

    def customer_keyed(self, tenant_id: str) -> bool:
        """Whether the tenant's signed keychain head binds it to a customer key: then its
        index must be keyed (``operations/search_guard.py``). Not ``tenants.key_mode``,
        which anyone who can write the database can edit."""
        return not self.is_platform_key(self.keychain.status(tenant_id).l1_ref)

    def next_generation(self, tenant_id: str) -> int:
        """A generation number never used for the tenant: past the registry's and past every
        one recorded (a cancelled run's generation may have been recorded in another mode)."""
        current = self._tenant(tenant_id).index_generation
        if isinstance(self.index, GuardedSearchIndex):
            current = max([current, *(g.generation for g in self.index.recorded(tenant_id))])
        return current + 1

    def open_archive(self, tenant_id: str) -> TenantArchive:
        """The tenant's archive where it lives now (registry lookup). The index generation
        is the registry's; its mode is the one the platform recorded (signed) when it
        created the generation, never the index's own marker nor ``tenants.key_mode``. Its search
        keys are asked of the keychain on every use, never kept (``TenantArchive``)."""
        from archive_kms.storage.name_limits import tenant_locations

        t = self._tenant(tenant_id)
        location = Location.from_dict(t.location)
        target = index_name(tenant_id, t.index_generation) if t.index_generation >= 1 else None
        guard = self.index if isinstance(self.index, GuardedSearchIndex) else None
        check_write = None
        if target is not None and guard is not None:
            mode = guard.mode_of(tenant_id, target)

            def check_write() -> None:
                guard.check_write(tenant_id, target)

        else:  # a hand-built platform without the registry (unit tests of other parts)
            mode = self.index_mode(t.key_mode)

        def keys() -> SearchKeys | None:  # asked of the keychain on every use (revocation)
            if mode is not IndexMode.KEYED:
                return None
            return derive_search_keys(self.keychain.search_key_material(tenant_id), tenant_id)

        return TenantArchive(
            tenant_id=tenant_id,
            store=self.store_for(location),
            keychain=self.keychain,
            index=self.index,
            index_mode=mode,
            search_keys=keys,
            index_name=target,
            relocate=lambda: self.open_archive(tenant_id),
            name_locations=tenant_locations(
                location,
                getattr(self.settings, "shared_bucket", None),
                getattr(self.settings, "shared_azure_account", None),
            ),
            check_write=check_write,
        )

    def _guard(self, index: SearchIndex, signer: Signer) -> GuardedSearchIndex:
        from archive_kms.operations.search_guard import SearchGenerations

        return GuardedSearchIndex(
            index,
            SearchGenerations(self.state, signer),
            keyed_required=self.customer_keyed,
            registry=self.state,
            audit=self.state,
        )

    def grace_policy(self, tenant_id: str) -> GracePolicy:
        """The tenant's grace policy for key-service outages: its own, else the settings'."""
        return grace_policy_lookup(self.state, self.settings)(tenant_id)

    def probe_view(self) -> Platform:
        """This platform with a keychain of its own (an empty key cache, no view of the
        tenant heads yet): what another process sees. Revocation receipts probe with it."""
        if self.keychain_factory is None:
            raise StateError("this platform cannot make a second keychain (no keychain_factory)")
        return replace(self, keychain=self.keychain_factory(), _stores={}, _lock=threading.Lock())

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, request_limiter: RequestLimiter | None = None
    ) -> Platform:
        """Every port on its real backend, from settings: SQL state store (SQLite or
        PostgreSQL), the keychain stored beside it, Elasticsearch, S3/Azure stores, and the
        key-provider registry. ``request_limiter``: every call to a key service passes it
        first, per quota domain (``keys.limits``; the flows pass Prefect's rate limits)."""
        from archive_kms.keys.keychain import Keychain
        from archive_kms.keys.registry import KeyProviderRegistry
        from archive_kms.search.elasticsearch import ElasticsearchSearchIndex
        from archive_kms.state.anchors import LatestAnchorCheck
        from archive_kms.state.audit import SignerHeadSealer
        from archive_kms.state.sql import open_state
        from archive_kms.state.sql.database import PoolLimits
        from archive_kms.state.sql.keychain import SqlKeychainStore
        from archive_kms.storage import open_store
        from archive_kms.storage.provisioning import CloudProvisioner

        s = settings or get_settings()
        signer = platform_signer(s)
        # The audit chain's head is sealed with the platform key: a re-hashed, edited chain
        # does not verify without it.
        state = open_state(
            s.state_url,
            sealer=SignerHeadSealer(signer),
            job_stale_after=timedelta(seconds=s.job_lease_ttl_seconds),
            pool=PoolLimits(s.state_pool_size, s.state_pool_max_overflow, s.state_pool_timeout_seconds),
        )
        # one provider (and its clients) per key reference
        registry = KeyProviderRegistry(s, limiter=request_limiter)
        s3 = _s3_client(s)
        anchors = _anchor_store(s, s3)
        # A whole-database restore to before an anchor is refused by every fresh process
        # before it unwraps anything (state/anchors.py, LatestAnchorCheck).
        anchor_check = (
            None if anchors is None else LatestAnchorCheck(state, anchors, alarms=state, verifier=signer.verifier())
        )

        def new_keychain(*, report: bool = True) -> Keychain:
            # The keychain audits its commits in the same database and refuses a head older than
            # the audit log recorded (a restored old keychain: docs/adr/0007-keychain-rollback.md);
            # it checks each tenant's master key at its provider before using its keys, with the
            # tenant's grace policy for outages (docs/key-lifecycle.md).
            return Keychain.from_settings(
                s,
                SqlKeychainStore(state),
                registry.resolve,
                signer,
                audit=state,
                anchor_check=anchor_check,
                policy_for=grace_policy_lookup(state, s),
                on_key_state_change=key_state_reporter(state) if report else None,
            )

        keychain = new_keychain()
        # Azure clients are built on first use: an S3 tenant's processes never import the
        # Azure SDK (~8 MiB of RSS; docs/benchmarks.md, session 5).
        # A malformed connection string is still refused here, before any work.
        if s.azure_blob_connection_string is not None:
            clients.check_connection_string(s.azure_blob_connection_string.get_secret_value())
        for cs in s.azure_account_pool or ():
            clients.check_connection_string(cs.get_secret_value(), "azure_account_pool")
        provisioner = CloudProvisioner(s, s3_client=s3, accounts_factory=lambda: _tenant_accounts(s, state))

        def open_location(location: Location) -> ObjectStore:
            if location.own_account:  # the tenant's own account: its client comes from its provisioner
                return open_store(location, s, blob_service=provisioner.blob_service(location))
            if location.cloud is Cloud.AZURE:
                return open_store(location, s, blob_service=provisioner.shared_blob_service())
            return open_store(location, s, s3_client=s3)

        platform = cls(
            s,
            state,
            keychain,
            ElasticsearchSearchIndex.from_settings(s),
            registry.resolve,
            open_location,
            provisioner,
            anchors=anchors,
            signer=signer,
            keychain_factory=lambda: new_keychain(report=False),
        )
        # Every generation, write and search checked against the signed registry and head.
        platform.index = platform._guard(platform.index, signer)
        return platform

    @classmethod
    def in_memory(
        cls,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        request_limiter: RequestLimiter | None = None,
        kms: Any = None,
    ) -> Platform:
        """Every port on its in-memory implementation (unit tests, dry runs).
        ``request_limiter``: as for ``from_settings``, per the quota domain each key
        reference would have (references without one, ``memory://``, pass freely).
        ``kms``: the ``MemoryKms`` every key reference resolves into (a test that disables
        keys passes its own)."""
        from archive_kms.crypto.signing import Signer
        from archive_kms.keys.cache import KeyCache
        from archive_kms.keys.keychain import Keychain
        from archive_kms.keys.keychain.access import KeyStateGuard
        from archive_kms.keys.keychain_store import InMemoryKeychainStore
        from archive_kms.keys.limits import limit_provider, quota_domain
        from archive_kms.keys.memory import MemoryKeyProvider, MemoryKms
        from archive_kms.keys.refs import parse_key_ref
        from archive_kms.search.memory import MemorySearchIndex
        from archive_kms.state.anchors import LatestAnchorCheck, MemoryAnchorStore
        from archive_kms.state.memory import InMemoryStateStore
        from archive_kms.storage.memory import MemoryObjectStore
        from archive_kms.storage.provisioning import MemoryProvisioner

        settings = settings or Settings(aws_endpoint_url=None)
        kms = kms if kms is not None else MemoryKms()
        providers: dict[str, KeyProvider] = {}

        managed: set[str] = set()  # the memory:// spellings of managed:// references

        def resolve(ref: str) -> KeyProvider:
            # every reference resolves to a key of the in-memory KMS, created on first use
            if ref not in providers:
                name = "k" + hashlib.sha256(ref.encode()).hexdigest()[:16]
                provider: KeyProvider = MemoryKeyProvider(kms, kms.create_key(name))
                domain = quota_domain(parse_key_ref(ref), settings) if request_limiter is not None else None
                if domain is not None and request_limiter is not None:
                    provider = limit_provider(provider, request_limiter, domain)
                providers[ref] = providers[provider.key_ref] = provider  # the keychain resolves by key_ref
                if ref.startswith("managed://"):
                    managed.add(provider.key_ref)
            return providers[ref]

        stores: dict[str, ObjectStore] = {}

        def open_store(location: Location) -> ObjectStore:
            return stores.setdefault(location.uri, MemoryObjectStore())

        state = InMemoryStateStore()
        keychain_store, signer = InMemoryKeychainStore(), Signer.generate()
        anchors = MemoryAnchorStore()

        def new_keychain(*, report: bool = True) -> Keychain:
            # The keychain records its commits in the state store's audit log and checks its
            # head against it (rollback detection), and checks each tenant's master key before
            # using its keys, as ``from_settings`` does.
            cache = KeyCache.from_settings(settings)
            guard = None
            if settings.key_state_check_seconds > 0:
                guard = KeyStateGuard(
                    resolve,
                    cache,
                    check_seconds=settings.key_state_check_seconds,
                    timeout_seconds=settings.key_state_check_timeout_seconds,
                    policy_for=grace_policy_lookup(state, settings),
                    on_change=key_state_reporter(state) if report else None,
                )
            return Keychain(
                keychain_store,
                resolve,
                signer,
                clock or time.time,
                cache,
                audit=state,
                anchor_check=LatestAnchorCheck(state, anchors, alarms=state, verifier=signer.verifier()),
                revocation_check_seconds=settings.revocation_check_seconds,
                key_state_guard=guard,
            )

        keychain = new_keychain()
        platform = cls(
            settings,
            state,
            keychain,
            MemorySearchIndex(),
            resolve,
            open_store,
            MemoryProvisioner(open_store),
            anchors=anchors,
            platform_key_refs=managed,
            signer=signer,
            keychain_factory=lambda: new_keychain(report=False),
        )
        platform.index = platform._guard(platform.index, signer)
        return platform


def grace_policy_lookup(state: Any, settings: Settings) -> Callable[[str], GracePolicy]:
    """``tenant -> GracePolicy``: the tenant's own (``archive-kms keys policy``), else
    ``settings.key_outage_grace``."""
    from archive_kms.keys.keychain.access import GracePolicy

    default = GracePolicy.parse(settings.key_outage_grace)

    def lookup(tenant_id: str) -> GracePolicy:
        own = state.get_grace_policy(tenant_id)
        return GracePolicy.parse(own.policy) if own is not None else default

    return lookup


def key_state_reporter(state: Any) -> Callable[[L1Verdict, L1Verdict | None], None]:
    """What a process tells everyone when it finds a tenant's master key unusable or its
    key service unreachable (stored warnings), and when the service answers again."""

    def report(verdict: L1Verdict, previous: L1Verdict | None) -> None:
        from archive_kms.keys.keychain.access import Availability
        from archive_kms.operations.key_warnings import clear_warning, raise_warning
        from archive_kms.state.port import WarningKind

        tenant_id, ref = verdict.tenant_id, verdict.l1_ref
        seen = verdict.checked_at.isoformat(timespec="seconds")
        details = {"key_ref": ref, "seen_at": seen, "key_version": verdict.key_version}
        if verdict.availability is Availability.UNREACHABLE:
            raise_warning(
                state,
                tenant_id,
                WarningKind.KEY_UNAVAILABLE,
                f"the key service of tenant {tenant_id} does not answer ({ref}: {verdict.error}); not a "
                "revocation: the tenant's grace policy decides what is served meanwhile",
                actor="key-state-check",
                details={**details, "error": verdict.error},
            )
        elif verdict.availability is Availability.UNUSABLE:
            state_name = verdict.state.value if verdict.state is not None else "unusable"
            raise_warning(
                state,
                tenant_id,
                WarningKind.KEY_DISABLED,
                f"the master key {ref} of tenant {tenant_id} is {state_name} at the provider: reads, writes and "
                "searches are refused; the key-state monitor records the revocation",
                actor="key-state-check",
                details={**details, "key_state": state_name},
            )
        elif previous is not None and previous.availability is Availability.UNREACHABLE:
            clear_warning(
                state, tenant_id, WarningKind.KEY_UNAVAILABLE, actor="key-state-check", reason="the key service answers"
            )

    return report


def platform_signer(settings: Settings | None = None) -> Signer:
    """The platform signing key. Configured by ``keychain_signing_key_path`` (a local
    Ed25519 PEM) or ``keychain_signing_key_ref`` (a KMS or Key Vault key: the signer pins
    its public key now and signs remotely), never both; with
    ``keychain_previous_public_keys_path`` after a rotation. Without either, only a local
    stack (an endpoints file exists) or a development setup that says so
    (``keychain_signing_key_autocreate``) creates a key once in the stack directory
    (owner-only file); anywhere else it is a ``ConfigurationError``: a worker that signs
    with a key of its own making would write records no other process verifies."""
    from archive_kms.config import endpoints_file
    from archive_kms.crypto.signing import Signer

    s = settings or get_settings()
    if s.keychain_signing_key_path and s.keychain_signing_key_ref:
        raise ConfigurationError(
            "both ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH and ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_REF are set: "
            "the platform has one signing key; keep the one that signs and list the other's public key in "
            "ARCHIVE_KMS_KEYCHAIN_PREVIOUS_PUBLIC_KEYS_PATH",
            resource="keychain_signing_key_ref",
        )
    if s.keychain_signing_key_ref:
        return remote_signer(s.keychain_signing_key_ref, s).with_previous_file(s.keychain_previous_public_keys_path)
    if s.keychain_signing_key_path:
        return Signer.from_settings(s)
    if not (s.keychain_signing_key_autocreate or endpoints_file().exists()):
        raise ConfigurationError(
            "no platform signing key: set ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_PATH to the PEM file of the "
            "deployment's Ed25519 key, or ARCHIVE_KMS_KEYCHAIN_SIGNING_KEY_REF to its KMS or Key Vault key "
            "(docs/deployment.md); a worker never creates its own"
        )
    path = stack_dir() / "keychain-signing.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return Signer.create_key_file(path).with_previous_file(s.keychain_previous_public_keys_path)
    return Signer.from_pem_file(path).with_previous_file(s.keychain_previous_public_keys_path)


def remote_signer(ref: str, settings: Settings) -> Signer:
    """A signer over the KMS (``aws-kms://``) or Key Vault (``azure-kv://``) key ``ref``
    (setting ``keychain_signing_key_ref``): its public key is fetched and pinned now, so a
    key that is missing, disabled or not a P-256 signing key fails here, at start."""
    from archive_kms.crypto.signing import Signer
    from archive_kms.errors import ValidationError
    from archive_kms.keys.refs import AwsKmsKeyRef, AzureKeyVaultKeyRef, parse_key_ref
    from archive_kms.keys.signing_key_vault import KeyVaultSigningKey
    from archive_kms.keys.signing_kms import KmsSigningKey

    try:
        parsed = parse_key_ref(ref)
    except ValidationError as exc:
        raise ConfigurationError(
            f"setting keychain_signing_key_ref: {exc}", resource="keychain_signing_key_ref"
        ) from None
    if isinstance(parsed, AwsKmsKeyRef):
        return Signer.remote(KmsSigningKey.from_settings(parsed, settings))
    if isinstance(parsed, AzureKeyVaultKeyRef):
        return Signer.remote(KeyVaultSigningKey.from_settings(parsed, settings))
    raise ConfigurationError(
        f"setting keychain_signing_key_ref is {parsed.uri}: the signing key must be an aws-kms:// or an "
        "azure-kv:// key",
        resource="keychain_signing_key_ref",
    )


def _s3_client(settings: Settings) -> Any:
    return clients.aws_client("s3", settings) if settings.aws_endpoint_url or settings.aws_access_key_id else None


def _tenant_accounts(settings: Settings, state: Any) -> TenantAccountProvisioner | None:
    """The provisioner of tenants' own Azure storage accounts: the local stack's Azurite
    pool when ``azure_account_pool`` is set, Azure Resource Manager when
    ``azure_subscription_id`` is, else None (an own-account location then fails naming the
    settings)."""

    if settings.azure_account_pool:
        from archive_kms.state.account_pool import SqlAccountPool, sqlite_state_path, sqlite_store_holds
        from archive_kms.storage.azurite_pool import AzuritePoolProvisioner, PoolDeployment, host_id

        pool = {}
        for cs in settings.azure_account_pool:
            client = clients.blob_service_client_from_connection_string(cs.get_secret_value(), "azure_account_pool")
            pool[client.account_name] = client
        deployment = PoolDeployment(host_id(), sqlite_state_path(settings.state_url), sqlite_store_holds)
        return AzuritePoolProvisioner(pool, SqlAccountPool(state), deployment=deployment)
    if settings.azure_subscription_id:
        from archive_kms.storage.azure_accounts import ArmAccountProvisioner

        return ArmAccountProvisioner.from_settings(settings)
    return None


def _anchor_store(settings: Settings, s3_client: Any = None) -> AnchorStore | None:
    """Where audit anchors are published (``settings.audit_anchor_bucket``), or None."""
    from archive_kms.state.anchors_s3 import S3AnchorStore

    if not settings.audit_anchor_bucket:
        return None
    return S3AnchorStore(
        s3_client or clients.aws_client("s3", settings),
        settings.audit_anchor_bucket,
        retention_days=settings.audit_anchor_retention_days,
    )
