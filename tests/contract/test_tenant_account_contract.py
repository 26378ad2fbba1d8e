"""The tenant-account provisioner contract (``storage.provisioning.TenantAccountProvisioner``),
held by both implementations:

* ``arm``: ``storage.azure_accounts.ArmAccountProvisioner`` with the real azure-mgmt-storage
  SDK, over HTTPS, against ``arm_fake.ArmFake`` (the Resource Manager endpoints as the
  REST reference documents them; no data plane: the data-plane readiness check is a
  scripted stand-in here);
* ``azurite-pool``: ``storage.azurite_pool.AzuritePoolProvisioner`` on the stack's Azurite
  (its ``AZURITE_ACCOUNTS`` pool) with allocations in a SQLite state store; here the
  created account is also written to and read through the client the provisioner gives.

Then what only one backend can show: the Resource Manager request bodies (TLS 1.2, no
shared key, no public access, customer key, versioning, soft delete, encryption scope),
waiting until usable, error translation; and two deployments sharing one Azurite.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.errors import (
    ConfigurationError,
    KeyUnavailableError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)
from archive_kms.storage import Location, dedicated_azure_location, shared_azure_location
from archive_kms.storage.locations import open_store
from archive_kms.storage.memory import MemoryObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arm_fake import ArmFake

RG = "archive-kms-tenants"
IDENTITY = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/archive-kms/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/archive-kms-worker"
)
SUBNET = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/net/providers/"
    "Microsoft.Network/virtualNetworks/vnet/subnets/workers"
)
KEY_URL = "https://acme-kv.vault.azure.net/keys/archive"


@dataclass
class Backend:
    name: str
    provisioner: Any
    make_foreign: Any  # (location) -> None: the account name is held by another owner
    store_for: Any  # (location) -> ObjectStore for delete's count
    fake: ArmFake | None = None


# --- backends ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arm_fake() -> Iterator[ArmFake]:
    fake = ArmFake(str(uuid.uuid4()), {RG}).start()
    yield fake
    fake.stop()


def arm_settings(fake: ArmFake, **kw: Any) -> Settings:
    return Settings(
        azure_subscription_id=fake.subscription,
        azure_resource_group=RG,
        azure_region="westeurope",
        azure_arm_endpoint=fake.url,
        azure_arm_ca_bundle=fake.ca_file,
        azure_cmk_identity_id=IDENTITY,
        azure_tenant_account_subnet_ids=[SUBNET],
        **kw,
    )


class ScriptedDataPlane:
    """Stands in for the data-plane check (no blob endpoint answers here): not ready for
    the first ``not_ready`` calls."""

    def __init__(self, not_ready: int = 1) -> None:
        self.not_ready = not_ready
        self.calls: list[tuple[Any, str]] = []

    def __call__(self, client: Any, container: str) -> bool:
        self.calls.append((client, container))
        return len(self.calls) > self.not_ready


def arm_provisioner(fake: ArmFake, **kw: Any):
    from archive_kms.storage.azure_accounts import ArmAccountProvisioner

    kw.setdefault("data_plane_ready", ScriptedDataPlane())
    return ArmAccountProvisioner.from_settings(
        arm_settings(fake),
        polling_interval=0,
        blob_client_for_url=lambda url: ("blob-client", url),
        sleep=lambda s: None,
        **kw,
    )


def require_azurite_pool(settings: Settings) -> None:
    """Fail (never skip) when the stack's Azurite runs without the account pool."""
    if not settings.azure_account_pool:
        pytest.fail(
            "azure_account_pool is not set: the stack's endpoints file predates the Azurite account pool; "
            "run `archive-kms stack down --only azurite && archive-kms stack up --only azurite`",
            pytrace=False,
        )
    first = clients.blob_service_client_from_connection_string(settings.azure_account_pool[0].get_secret_value())
    try:
        list(first.list_containers(results_per_page=1))
    except Exception as exc:  # noqa: BLE001 - reported
        pytest.fail(
            f"Azurite does not accept pool account {first.account_name} ({type(exc).__name__}): it was started "
            "without AZURITE_ACCOUNTS; restart it (`archive-kms stack down --only azurite && archive-kms stack up "
            "--only azurite`)",
            pytrace=False,
        )


def pool_provisioner(settings: Settings, state_url: str, accounts: list[str] | None = None):
    """As the composition root builds it (the deployment named by its claims), on the
    whole pool or on ``accounts`` of it."""
    from archive_kms.state.account_pool import SqlAccountPool, sqlite_state_path, sqlite_store_holds
    from archive_kms.state.sql import open_state
    from archive_kms.storage.azurite_pool import AzuritePoolProvisioner, PoolDeployment, host_id

    allocations = SqlAccountPool(open_state(state_url))
    pool = {}
    for cs in settings.azure_account_pool:
        c = clients.blob_service_client_from_connection_string(cs.get_secret_value())
        if accounts is None or c.account_name in accounts:
            pool[c.account_name] = c
    deployment = PoolDeployment(host_id(), sqlite_state_path(state_url), sqlite_store_holds)
    return AzuritePoolProvisioner(pool, allocations, deployment=deployment, sleep=lambda s: None), allocations


def unclaimed_pool_account(settings: Settings) -> tuple[str, Any]:
    """A pool account nobody claims now (from the end of the pool: deployments allocate
    from its start), and its client."""
    from archive_kms.storage.azurite_pool import CLAIM_CONTAINER

    for cs in reversed(settings.azure_account_pool):
        c = clients.blob_service_client_from_connection_string(cs.get_secret_value())
        if not c.get_container_client(CLAIM_CONTAINER).exists():
            return c.account_name, c
    pytest.fail("every Azurite pool account is claimed", pytrace=False)


@pytest.fixture(params=["arm", "azurite-pool"])
def backend(request, tmp_path) -> Backend:
    if request.param == "arm":
        fake = request.getfixturevalue("arm_fake")
        return Backend(
            "arm",
            arm_provisioner(fake),
            lambda loc: fake.add_account(RG, loc.account, tags={"archive-kms-tenant": "someone-else"}),
            lambda loc: MemoryObjectStore(),
            fake,
        )
    settings = request.getfixturevalue("azurite")
    require_azurite_pool(settings)
    prov, allocations = pool_provisioner(settings, f"sqlite:///{tmp_path / 'state.db'}")

    def foreign(loc: Location) -> None:
        allocations.allocate(tenant_id="someone-else", account=loc.account, candidates=list(prov._pool))

    return Backend("azurite-pool", prov, foreign, lambda loc: open_store(loc, blob_service=prov.blob_service(loc)))


def new_location(cmk: str | None = KEY_URL) -> Location:
    return dedicated_azure_location(f"t{uuid.uuid4().hex[:10]}", account_prefix="akms", cmk_key_url=cmk)


# --- the contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cmk", [KEY_URL, None], ids=["customer-key", "platform-key"])
def test_create_exists_idempotent_delete(backend, cmk):
    p, loc = backend.provisioner, new_location(cmk)
    assert p.exists(loc) is False
    try:
        p.create(loc)
        assert p.exists(loc) is True
        p.create(loc)  # again: converges, same account
        assert p.exists(loc) is True
        if backend.name == "azurite-pool":  # the account is usable through the client it gives
            store = backend.store_for(loc)
            store.put_stream(b"r/1", [b"one"])
            store.put_stream(b"r/2", [b"two"])
            assert b"".join(store.open_read(b"r/1")) == b"one"
            assert p.delete(loc, store) == 2
        else:
            assert p.delete(loc, backend.store_for(loc)) == 0
        assert p.exists(loc) is False
        assert p.delete(loc, MemoryObjectStore()) == 0  # idempotent: nothing left to list
        with pytest.raises(StorageError, match="does not exist"):
            p.blob_service(loc)
    finally:
        if p.exists(loc):
            p.delete(loc, backend.store_for(loc))


def test_an_account_held_by_another_owner_is_refused_and_left_alone(backend):
    p, loc = backend.provisioner, new_location()
    backend.make_foreign(loc)
    with pytest.raises(StorageError, match=r"not .*(tenant|this tenant)|belongs to tenant someone-else"):
        p.create(loc)
    assert p.exists(loc) is False
    with pytest.raises(StorageError):
        p.delete(loc, MemoryObjectStore())
    with pytest.raises(StorageError):
        p.create(loc)  # still refused, still there
    if backend.fake is not None:
        assert backend.fake.accounts[loc.account].body["tags"] == {"archive-kms-tenant": "someone-else"}
        assert not backend.fake.sent("PUT", f"/storageAccounts/{loc.account}")  # never overwritten
        assert not backend.fake.sent("DELETE", f"/storageAccounts/{loc.account}")


@pytest.mark.parametrize(
    "location",
    [
        shared_azure_location("acme", "devstoreaccount1"),
        dedicated_azure_location("acme", "devstoreaccount1"),
    ],
    ids=["shared", "platform-account-container"],
)
def test_a_location_that_is_not_a_tenant_account_is_refused(backend, location):
    p = backend.provisioner
    for call in (lambda: p.create(location), lambda: p.exists(location), lambda: p.blob_service(location)):
        with pytest.raises(ValidationError, match="not a tenant's own storage account"):
            call()
    with pytest.raises(ValidationError):
        p.delete(location, MemoryObjectStore())


def test_names_are_validated_before_any_request(backend):
    loc = new_location()
    other = dedicated_azure_location("other-tenant", account_prefix="akms")
    for bad in (
        {**loc.to_dict(), "account": other.account},  # another tenant's account
        {**loc.to_dict(), "account": "devstoreaccount1"},  # the platform's
        {**loc.to_dict(), "account": "Akms" + loc.account[4:]},  # not a-z 0-9
        {**loc.to_dict(), "cmk_key_url": "https://v.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef"},
        {**loc.to_dict(), "prefix": "tenants/x/"},
    ):
        with pytest.raises(ValidationError):
            Location.from_dict(bad)
    assert backend.provisioner.exists(loc) is False


# --- Resource Manager only --------------------------------------------------------------------------


def test_arm_requests_carry_the_documented_configuration(arm_fake):
    p, loc = arm_provisioner(arm_fake), new_location()
    p.create(loc)
    try:
        (put,) = arm_fake.sent("PUT", f"/storageAccounts/{loc.account}")
        body = put.body
        assert (body["location"], body["kind"], body["sku"]) == ("westeurope", "StorageV2", {"name": "Standard_GZRS"})
        assert body["tags"] == {"archive-kms-tenant": loc.tenant.value}
        props = body["properties"]
        assert props["minimumTlsVersion"] == "TLS1_2" and props["supportsHttpsTrafficOnly"] is True
        assert props["allowSharedKeyAccess"] is False and props["defaultToOAuthAuthentication"] is True
        assert props["allowBlobPublicAccess"] is False and props["allowCrossTenantReplication"] is False
        assert props["networkAcls"] == {
            "defaultAction": "Deny",
            "bypass": "AzureServices",
            "virtualNetworkRules": [{"id": SUBNET, "action": "Allow"}],
        }
        enc = props["encryption"]
        assert enc["keySource"] == "Microsoft.Keyvault" and enc["requireInfrastructureEncryption"] is True
        assert enc["keyvaultproperties"] == {"keyvaulturi": "https://acme-kv.vault.azure.net", "keyname": "archive"}
        assert enc["identity"] == {"userAssignedIdentity": IDENTITY}
        assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}}
        (blob,) = arm_fake.sent("PUT", f"/storageAccounts/{loc.account}/blobServices/default")
        assert blob.body["properties"] == {
            "isVersioningEnabled": True,
            "deleteRetentionPolicy": {"enabled": True, "days": 30},
            "containerDeleteRetentionPolicy": {"enabled": True, "days": 30},
        }
        (scope,) = arm_fake.sent("PUT", f"/storageAccounts/{loc.account}/encryptionScopes/byok")
        assert scope.body["properties"]["keyVaultProperties"] == {"keyUri": KEY_URL}
        assert scope.body["properties"]["source"] == "Microsoft.KeyVault"
        (container,) = arm_fake.sent("PUT", f"/containers/{loc.container}")
        assert container.body["properties"] == {
            "publicAccess": "None",
            "defaultEncryptionScope": "byok",
            "denyEncryptionScopeOverride": True,
        }
        assert all(r.query["api-version"] == ["2026-09-01"] for r in arm_fake.requests)
    finally:
        p.delete(loc, MemoryObjectStore())
    assert arm_fake.sent("DELETE", f"/storageAccounts/{loc.account}")


def test_arm_without_a_customer_key_uses_platform_keys_and_no_identity(arm_fake):
    p, loc = arm_provisioner(arm_fake), new_location(cmk=None)
    p.create(loc)
    try:
        (put,) = arm_fake.sent("PUT", f"/storageAccounts/{loc.account}")
        assert put.body["properties"]["encryption"]["keySource"] == "Microsoft.Storage"
        assert "identity" not in put.body
        assert not arm_fake.sent("PUT", f"/storageAccounts/{loc.account}/encryptionScopes/byok")
        (container,) = arm_fake.sent("PUT", f"/containers/{loc.container}")
        assert container.body["properties"] == {"publicAccess": "None"}
    finally:
        p.delete(loc, MemoryObjectStore())


def test_arm_create_waits_until_the_account_and_container_are_usable(arm_fake):
    arm_fake.creating_polls = 3  # "Creating" for three polls of the async operation
    ready = ScriptedDataPlane(not_ready=2)  # then the role assignment takes two more looks
    p, loc = arm_provisioner(arm_fake, data_plane_ready=ready), new_location()
    try:
        start = len(arm_fake.requests)
        p.create(loc)
        after = arm_fake.requests[start:]
        put = next(i for i, r in enumerate(after) if r.method == "PUT" and r.path.endswith(loc.account))
        polls = [r for r in after[put + 1 :] if "/asyncoperations/" in r.path]
        assert len(polls) == 4  # the SDK followed the Location header: 3 x 202 Creating, then 200
        assert len(ready.calls) == 3 and ready.calls[-1] == (
            ("blob-client", f"https://{loc.account}.blob.core.windows.net/"),
            loc.container,
        )
    finally:
        arm_fake.creating_polls = 1
        p.delete(loc, MemoryObjectStore())


def test_arm_create_gives_up_retryably_when_the_account_never_becomes_usable(arm_fake):
    clock = [0.0]

    def sleep(s: float) -> None:
        clock[0] += s

    from archive_kms.storage.azure_accounts import ArmAccountProvisioner

    p = ArmAccountProvisioner.from_settings(
        arm_settings(arm_fake),
        polling_interval=0,
        blob_client_for_url=lambda url: url,
        data_plane_ready=lambda c, n: False,
        usable_timeout=60,
        sleep=sleep,
        clock=lambda: clock[0],
    )
    loc = new_location()
    try:
        with pytest.raises(ServiceUnavailableError, match="not usable after 60 s") as err:
            p.create(loc)
        assert err.value.retryable
        p._ready = lambda c, n: True  # the role applied: a rerun finishes
        p.create(loc)
        assert p.exists(loc)
    finally:
        p.delete(loc, MemoryObjectStore())


@pytest.mark.parametrize(
    "method,suffix,status,code,error,match",
    [
        ("PUT", "", 403, "AuthorizationFailed", StorageError, "grant the workers"),
        ("PUT", "", 400, "KeyVaultAuthenticationFailure", KeyUnavailableError, "Crypto Service Encryption User"),
        ("PUT", "", 409, "StorageAccountAlreadyTaken", StorageError, "azure_tenant_account_prefix"),
        ("PUT", "/encryptionScopes/byok", 400, "KeyVaultKeyNotFound", KeyUnavailableError, "KeyVaultKeyNotFound"),
        ("PUT", "", 409, "StorageAccountOperationInProgress", TransientError, "in progress; retry"),
        ("GET", "", 404, "ResourceGroupNotFound", ConfigurationError, "azure_\\* settings"),
    ],
)
def test_arm_errors_become_ours_naming_what_to_do(arm_fake, method, suffix, status, code, error, match):
    p, loc = arm_provisioner(arm_fake), new_location()
    arm_fake.fail_next(method, f"/storageAccounts/{loc.account}{suffix}", status, code, f"injected {code}")
    try:
        with pytest.raises(error, match=match) as err:
            p.create(loc)
        assert loc.account in str(err.value)
    finally:
        p.delete(loc, MemoryObjectStore())


def test_arm_a_passing_server_error_is_retried_by_the_sdk(arm_fake):
    p, loc = arm_provisioner(arm_fake), new_location()
    arm_fake.fail_next("PUT", f"/storageAccounts/{loc.account}", 503, "ServerBusy", "injected")
    try:
        p.create(loc)
        assert len(arm_fake.sent("PUT", f"/storageAccounts/{loc.account}")) == 2 and p.exists(loc)
    finally:
        p.delete(loc, MemoryObjectStore())


def test_arm_refuses_a_name_taken_outside_the_resource_group(arm_fake):
    p, loc = arm_provisioner(arm_fake), new_location()
    arm_fake.taken_elsewhere.add(loc.account)
    with pytest.raises(StorageError, match="StorageAccountAlreadyTaken.*another owner"):
        p.create(loc)
    assert loc.account not in arm_fake.accounts  # nothing created
    assert not arm_fake.sent("POST", "/checkNameAvailability")  # no subscription-wide call


def test_arm_settings_are_required(arm_fake):
    from archive_kms.storage.azure_accounts import ArmAccountProvisioner

    with pytest.raises(ConfigurationError, match="azure_resource_group, azure_region"):
        ArmAccountProvisioner.from_settings(Settings(azure_subscription_id=arm_fake.subscription))
    with pytest.raises(ConfigurationError, match="azure_tenant_account_subnet_ids"):
        ArmAccountProvisioner.from_settings(
            arm_settings(arm_fake).model_copy(update={"azure_tenant_account_subnet_ids": []})
        )
    p = ArmAccountProvisioner.from_settings(
        arm_settings(arm_fake).model_copy(update={"azure_cmk_identity_id": None}), polling_interval=0
    )
    with pytest.raises(ConfigurationError, match="azure_cmk_identity_id"):
        p.create(new_location())


# --- Azurite pool only --------------------------------------------------------------------------------


def test_two_deployments_sharing_one_azurite_never_share_an_account(azurite, tmp_path):
    require_azurite_pool(azurite)
    first, _ = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'a.db'}")
    second, second_allocations = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'b.db'}")
    a, b = new_location(), new_location()
    first.create(a)
    try:
        taken = first.blob_service(a).account_name
        # the second deployment's state store knows nothing of the first: it would take the
        # same first free account, but the claim in Azurite sends it on to another one
        second_allocations.allocate(tenant_id=b.tenant.value, account=b.account, candidates=[taken])
        second.create(b)
        try:
            assert second.blob_service(b).account_name != taken
            assert second_allocations.allocation(b.account).pool_account != taken
            assert first.exists(a) and second.exists(b)
        finally:
            second.delete(b, open_store(b, blob_service=second.blob_service(b)))
        assert first.exists(a)  # untouched by the other deployment's delete
    finally:
        first.delete(a, open_store(a, blob_service=first.blob_service(a)))


def test_the_pool_records_the_customer_key_it_cannot_apply(azurite, tmp_path):
    from archive_kms.storage.azurite_pool import CLAIM_CONTAINER, host_id

    require_azurite_pool(azurite)
    p, allocations = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'a.db'}")
    loc = new_location()
    p.create(loc)
    try:
        svc = p.blob_service(loc)
        meta = svc.get_container_client(CLAIM_CONTAINER).get_container_properties().metadata
        assert meta == {
            "tenant": loc.tenant.value,
            "account": loc.account,
            "cmkkeyurl": KEY_URL,
            "deploymenthost": host_id(),
            "deploymentstate": str(tmp_path / "a.db"),  # ADR 0047: the deployment that claims
        }
        assert allocations.allocation(loc.account).tenant_id == loc.tenant.value
    finally:
        p.delete(loc, open_store(loc, blob_service=p.blob_service(loc)))
    assert allocations.allocation(loc.account) is None  # released
    assert CLAIM_CONTAINER not in [c.name for c in svc.list_containers()]


def test_a_delete_that_died_after_dropping_the_claim_finishes_without_touching_the_next_owner(azurite, tmp_path):
    from archive_kms.storage.azurite_pool import CLAIM_CONTAINER

    require_azurite_pool(azurite)
    first, first_allocations = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'a.db'}")
    second, _ = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'b.db'}")
    a, b = new_location(), new_location()
    first.create(a)
    svc = first.blob_service(a)
    taken = svc.account_name
    # the first deployment's delete dies after emptying the account and dropping the claim
    svc.delete_container(a.container)
    svc.delete_container(CLAIM_CONTAINER)
    second._allocations.allocate(tenant_id=b.tenant.value, account=b.account, candidates=[taken])
    second.create(b)  # the next owner takes the now free account
    try:
        assert second.blob_service(b).account_name == taken
        assert first.delete(a, MemoryObjectStore()) == 0  # the rerun releases, deletes nothing
        assert first_allocations.allocation(a.account) is None
        assert second.exists(b)
    finally:
        second.delete(b, open_store(b, blob_service=second.blob_service(b)))


def test_a_dead_deployments_claim_is_reclaimed_and_a_live_ones_never(azurite, tmp_path):
    """ADR 0047. Two deployments on one pool account: while the first's state store holds
    its allocation, the second is refused and the first's data stays; while another
    reclaimer holds the lease, the second leaves it; once the first is gone (its state store
    deleted), the second empties the account and takes it."""
    from archive_kms.storage.azurite_pool import CLAIM_CONTAINER

    require_azurite_pool(azurite)
    name, svc = unclaimed_pool_account(azurite)
    first, _ = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'a.db'}", accounts=[name])
    second, second_allocations = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'b.db'}", accounts=[name])
    a, b = new_location(), new_location()
    first.create(a)
    try:
        svc.get_container_client(a.container).upload_blob("obj", b"the first tenant's bytes")
        claim = svc.get_container_client(CLAIM_CONTAINER)
        assert claim.get_container_properties().metadata["deploymentstate"].endswith("/a.db")

        with pytest.raises(StorageError, match="no free account in the Azurite pool"):
            second.create(b)  # the first deployment is alive: never robbed
        assert first.exists(a) and second_allocations.allocation(b.account) is None
        assert [x.name for x in svc.get_container_client(a.container).list_blobs()] == ["obj"]

        for suffix in ("", "-wal", "-shm"):  # the first deployment dies with its state store
            (tmp_path / f"a.db{suffix}").unlink(missing_ok=True)
        lease = claim.acquire_lease(lease_duration=15)  # another reclaimer at work
        with pytest.raises(StorageError, match="no free account"):
            second.create(b)
        assert claim.get_container_properties().metadata["tenant"] == a.tenant.value
        lease.release()

        second.create(b)
        assert second.blob_service(b).account_name == name and second.exists(b)
        assert claim.get_container_properties().metadata["tenant"] == b.tenant.value
        assert sorted(c.name for c in svc.list_containers()) == sorted([CLAIM_CONTAINER, b.container])
    finally:
        for c in list(svc.list_containers()):
            svc.delete_container(c.name)


@pytest.mark.parametrize(
    "record",
    [
        {},  # a claim made before claims named their deployment
        {"deploymenthost": "another-host/0", "deploymentstate": "/nonexistent/state.db"},
        {"deploymentstate": "/nonexistent/state.db"},
        {"deploymenthost": "HERE", "deploymentstate": "relative/state.db"},
    ],
    ids=["no-record", "another-host", "no-host", "relative-path"],
)
def test_a_claim_without_proof_of_death_is_never_reclaimed(azurite, tmp_path, record):
    from archive_kms.storage.azurite_pool import CLAIM_CONTAINER, host_id

    require_azurite_pool(azurite)
    name, svc = unclaimed_pool_account(azurite)
    meta = {"tenant": "someone", "account": "akmssomeone0000000000000"}
    meta.update({k: (host_id() if v == "HERE" else v) for k, v in record.items()})
    svc.create_container(CLAIM_CONTAINER, metadata=meta)
    try:
        prov, allocations = pool_provisioner(azurite, f"sqlite:///{tmp_path / 'b.db'}", accounts=[name])
        b = new_location()
        with pytest.raises(StorageError, match="no free account"):
            prov.create(b)
        assert svc.get_container_client(CLAIM_CONTAINER).get_container_properties().metadata == meta
        assert allocations.allocation(b.account) is None
    finally:
        svc.delete_container(CLAIM_CONTAINER)
