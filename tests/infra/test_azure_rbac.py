"""The Azure roles in infra/azure grant exactly the operations the code performs: the blob
worker custom role (platform.json) and the built-in role the customer assigns on their
key (customer-byokv-access.json). Derived from the Azure SDK calls of the adapters
(``storage/azure_blob.py``, ``storage/locations.py``, ``storage/provisioning.py``,
``keys/azure_key_vault.py``), read by AST; every public method of the SDK clients the
adapters use must be mapped here, so a new call fails until its permission is decided.
No services needed.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache

import pytest
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient
from source_trees import parse_file

from archive_kms.config import PROJECT_ROOT

SRC = PROJECT_ROOT / "src" / "archive_kms"
AZURE_DIR = PROJECT_ROOT / "infra" / "azure"
ADAPTERS = ["storage/azure_blob.py", "storage/locations.py", "storage/provisioning.py", "keys/azure_key_vault.py"]

BLOB = "Microsoft.Storage/storageAccounts/blobServices/containers"
KV = "Microsoft.KeyVault/vaults/keys"

#: SDK method -> (control-plane actions, data actions) it needs (Azure docs: "Permissions
#: for calling data operations", Blob Storage REST operations; Key Vault RBAC guide).
PERMISSIONS: dict[str, tuple[set[str], set[str]]] = {
    "create_container": ({f"{BLOB}/write"}, set()),
    "delete_container": ({f"{BLOB}/delete"}, set()),
    "exists": ({f"{BLOB}/read"}, set()),  # ContainerClient.exists: Get Container Properties
    "upload_blob": (set(), {f"{BLOB}/blobs/write"}),  # Put Blob
    "stage_block": (set(), {f"{BLOB}/blobs/write"}),  # Put Block
    "commit_block_list": (set(), {f"{BLOB}/blobs/write"}),  # Put Block List
    "delete_blob": (set(), {f"{BLOB}/blobs/delete"}),
    "delete_blobs": (set(), {f"{BLOB}/blobs/delete"}),  # Blob Batch: each Delete Blob sub-request
    "get_blob_properties": (set(), {f"{BLOB}/blobs/read"}),
    "download_blob": (set(), {f"{BLOB}/blobs/read"}),
    "list_blobs": (set(), {f"{BLOB}/blobs/read"}),  # List Blobs (also uncommitted)
    "get_key": (set(), {f"{KV}/read"}),
    "unwrap_key": (set(), {f"{KV}/unwrap/action"}),  # CryptographyClient: always vault-side
    # send_request: the permission follows the REST path it posts to (see _send_request_paths)
}
#: SDK methods that reach no service (client factories, pagers, context management).
NO_REQUEST = {"get_blob_client", "get_container_client", "by_page", "close", "from_connection_string", "send_request"}
#: REST paths sent with KeyClient.send_request -> data action
REST_PATHS = {re.compile(r"/keys/[^/]+/[^/]+/wrapkey$"): f"{KV}/wrap/action"}

#: Built-in "Key Vault Crypto Service Encryption User", as Azure documents it.
KV_CRYPTO_SERVICE_ENCRYPTION_USER = "e147488a-f6f5-4113-8e2d-b22465e65bf6"
KV_CRYPTO_SERVICE_ENCRYPTION_USER_DATA_ACTIONS = {f"{KV}/read", f"{KV}/wrap/action", f"{KV}/unwrap/action"}


def _sdk_methods() -> set[str]:
    names: set[str] = set()
    for cls in (BlobServiceClient, ContainerClient, BlobClient, KeyClient, CryptographyClient):
        names |= {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}
    return names


def _send_request_paths(tree: ast.AST) -> list[str]:
    """The REST paths (f-strings flattened) the adapter sends through ``KeyClient.send_request``
    (its ``_send`` helper, or ``send_request``/``HttpRequest`` directly)."""
    paths = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if func not in ("_send", "send_request", "HttpRequest"):
            continue
        for arg in node.args:
            if isinstance(arg, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "x" for v in arg.values)
            elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
            else:
                continue
            if text.startswith("/keys/"):
                paths.append(text)
    return paths


@cache
def code_permissions() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(actions, data actions) -> where the adapters need them."""
    sdk = _sdk_methods()
    actions: dict[str, list[str]] = {}
    data: dict[str, list[str]] = {}
    for rel in ADAPTERS:
        tree = parse_file(SRC / rel)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            if name not in sdk or name in NO_REQUEST:
                continue
            if name not in PERMISSIONS:
                pytest.fail(
                    f"{rel}:{node.lineno} calls the Azure SDK's {name}: map it to its RBAC permissions in "
                    "tests/infra/test_azure_rbac.py and grant them in infra/azure (or list it as making no request)",
                    pytrace=False,
                )
            acts, dacts = PERMISSIONS[name]
            for a in acts:
                actions.setdefault(a, []).append(f"{rel}:{node.lineno}")
            for a in dacts:
                data.setdefault(a, []).append(f"{rel}:{node.lineno}")
        for path in _send_request_paths(tree):
            matched = [a for rx, a in REST_PATHS.items() if rx.search(path)]
            assert matched, f"{rel} sends {path}: map the REST path to its data action"
            data.setdefault(matched[0], []).append(rel)
    return actions, data


def _load(name: str) -> dict:
    return json.loads((AZURE_DIR / name).read_text())


def _resources(template: dict, type_: str) -> list[dict]:
    return [r for r in template["resources"] if r["type"] == type_]


def test_the_scan_finds_each_adapters_calls() -> None:
    actions, data = code_permissions()
    assert any(w.startswith("storage/locations.py") for w in actions[f"{BLOB}/write"])
    assert any(w.startswith("storage/azure_blob.py") for w in data[f"{BLOB}/blobs/write"])
    assert data[f"{KV}/wrap/action"] == ["keys/azure_key_vault.py"]
    assert any(w.startswith("keys/azure_key_vault.py") for w in data[f"{KV}/unwrap/action"])


def test_the_blob_worker_role_grants_exactly_the_blob_operations_the_code_performs() -> None:
    actions, data = code_permissions()
    (role,) = _resources(_load("platform.json"), "Microsoft.Authorization/roleDefinitions")
    (perm,) = role["properties"]["permissions"]
    assert set(perm["actions"]) == {a for a in actions if a.startswith("Microsoft.Storage/")}
    assert set(perm["dataActions"]) == {a for a in data if a.startswith("Microsoft.Storage/")}
    assert not perm["notActions"] and not perm["notDataActions"]
    assert not [a for a in perm["actions"] + perm["dataActions"] if "*" in a]
    # the role is assigned to the workers' identity, on the storage account only
    (assignment,) = _resources(_load("platform.json"), "Microsoft.Authorization/roleAssignments")
    assert assignment["scope"].startswith("[format('Microsoft.Storage/storageAccounts/")
    assert "userAssignedIdentities" in assignment["properties"]["principalId"]


def test_the_customer_grants_exactly_the_key_operations_the_code_performs_on_one_key() -> None:
    _, data = code_permissions()
    template = _load("customer-byokv-access.json")
    (assignment,) = _resources(template, "Microsoft.Authorization/roleAssignments")
    assert KV_CRYPTO_SERVICE_ENCRYPTION_USER in template["variables"]["roleDefinitionId"]
    assert {a for a in data if a.startswith("Microsoft.KeyVault/")} == KV_CRYPTO_SERVICE_ENCRYPTION_USER_DATA_ACTIONS
    # on the key, not on the vault
    assert (
        assignment["scope"]
        == "[format('Microsoft.KeyVault/vaults/{0}/keys/{1}', parameters('vaultName'), parameters('keyName'))]"
    )


def test_storage_accounts_take_no_shared_keys_and_keep_deleted_data() -> None:
    for name in ("platform.json", "tenant-storage.json"):
        template = _load(name)
        (account,) = _resources(template, "Microsoft.Storage/storageAccounts")
        props = account["properties"]
        assert props["allowSharedKeyAccess"] is False and props["minimumTlsVersion"] == "TLS1_2", name
        assert props["allowBlobPublicAccess"] is False and props["supportsHttpsTrafficOnly"] is True, name
        assert props["networkAcls"]["defaultAction"] == "Deny", name
        (blob,) = _resources(template, "Microsoft.Storage/storageAccounts/blobServices")
        assert blob["properties"]["isVersioningEnabled"] is True, name
        assert blob["properties"]["deleteRetentionPolicy"]["enabled"] is True, name
        assert blob["properties"]["containerDeleteRetentionPolicy"]["enabled"] is True, name


def test_the_tenant_account_is_encrypted_with_the_customer_key_and_names_what_the_code_derives() -> None:
    from archive_kms.domain.tenants import azure_container_name, azure_storage_account_name

    template = _load("tenant-storage.json")
    (account,) = _resources(template, "Microsoft.Storage/storageAccounts")
    assert account["properties"]["encryption"]["keySource"] == "Microsoft.Keyvault"
    (scope,) = _resources(template, "Microsoft.Storage/storageAccounts/encryptionScopes")
    assert scope["properties"]["source"] == "Microsoft.KeyVault"
    assert scope["properties"]["keyVaultProperties"]["keyUri"] == "[parameters('customerKeyUri')]"
    (container,) = _resources(template, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert container["properties"]["denyEncryptionScopeOverride"] is True
    assert container["properties"]["publicAccess"] == "None"
    # the container name is the code's dedicated container: byok-<tenant>
    assert template["variables"]["containerName"] == "[format('byok-{0}', parameters('tenantId'))]"
    assert azure_container_name("acme", prefix="byok") == "byok-acme"
    # the account name the code derives fits the parameter's bounds
    name = azure_storage_account_name("a-long-tenant-name-with-parts-32")
    bounds = template["parameters"]["storageAccountName"]
    assert bounds["minLength"] <= len(name) <= bounds["maxLength"] and name.isalnum() and name.islower()


# --- tenants' own storage accounts (storage/azure_accounts.py, tenant-accounts.json) ---------------

ACCOUNTS_ADAPTER = "storage/azure_accounts.py"
SA = "Microsoft.Storage/storageAccounts"
#: azure-mgmt-storage call (operation group, method) -> the action Resource Manager checks
#: (Azure resource provider operations, Microsoft.Storage).
MGMT_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("storage_accounts", "get_properties"): {f"{SA}/read"},
    # PUT, then the SDK polls .../locations/{region}/asyncoperations/{id}
    ("storage_accounts", "begin_create"): {f"{SA}/write", "Microsoft.Storage/locations/asyncoperations/read"},
    ("storage_accounts", "delete"): {f"{SA}/delete"},
    ("blob_services", "set_service_properties"): {f"{SA}/blobServices/write"},
    ("encryption_scopes", "put"): {f"{SA}/encryptionScopes/write"},
    ("blob_containers", "get"): {f"{BLOB}/read"},
    ("blob_containers", "create"): {f"{BLOB}/write"},
}
#: Attaching a user-assigned identity to a resource (the account's customer-key identity).
ASSIGN_IDENTITY = "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action"


def _mgmt_calls() -> list[tuple[str, str, int]]:
    """(operation group, method, line) of every ``self._mgmt.<group>.<method>`` the
    provisioner calls or passes on to be called."""
    tree = parse_file(SRC / ACCOUNTS_ADAPTER)
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Attribute)
            and node.value.value.attr == "_mgmt"
        ):
            out.append((node.value.attr, node.attr, node.lineno))
    return out


def test_the_tenant_accounts_role_grants_exactly_what_the_account_provisioner_does() -> None:
    calls = _mgmt_calls()
    assert len(calls) >= len(MGMT_PERMISSIONS), calls  # the scan sees the provisioner's calls
    actions: set[str] = set()
    for group, method, line in calls:
        if (group, method) not in MGMT_PERMISSIONS:
            pytest.fail(
                f"{ACCOUNTS_ADAPTER}:{line} calls {group}.{method}: map it to its Resource Manager action in "
                "tests/infra/test_azure_rbac.py and grant it in infra/azure/tenant-accounts.json",
                pytrace=False,
            )
        actions |= MGMT_PERMISSIONS[(group, method)]
    source = (SRC / ACCOUNTS_ADAPTER).read_text()
    assert '"userAssignedIdentities"' in source  # the account body attaches the customer-key identity
    actions.add(ASSIGN_IDENTITY)
    # its data-plane calls (waiting for the container) and the object store's on the account
    code_actions, code_data = code_permissions()
    tree = parse_file(SRC / ACCOUNTS_ADAPTER)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PERMISSIONS:
            actions |= PERMISSIONS[node.func.attr][0]
    data = {a for a, where in code_data.items() if any(w.startswith("storage/azure_blob.py") for w in where)}

    (role,) = _resources(_load("tenant-accounts.json"), "Microsoft.Authorization/roleDefinitions")
    (perm,) = role["properties"]["permissions"]
    assert set(perm["actions"]) == actions
    assert set(perm["dataActions"]) == data
    assert not perm["notActions"] and not perm["notDataActions"]
    assert not [a for a in perm["actions"] + perm["dataActions"] if "*" in a]
    assert role["properties"]["assignableScopes"] == ["[resourceGroup().id]"]  # this resource group only
    (assignment,) = _resources(_load("tenant-accounts.json"), "Microsoft.Authorization/roleAssignments")
    assert assignment["properties"]["principalId"] == "[parameters('workerIdentityPrincipalId')]"
    assert "scope" not in assignment  # the resource group the template is deployed to


def test_tenant_accounts_get_the_configuration_the_tenant_template_gives() -> None:
    """The account body the code sends carries what tenant-storage.json sets."""
    from archive_kms.storage import dedicated_azure_location
    from archive_kms.storage.azure_accounts import account_body, blob_service_body

    loc = dedicated_azure_location("acme", account_prefix="akms", cmk_key_url="https://v.vault.azure.net/keys/k")
    body = account_body(loc, region="westeurope", sku="Standard_GZRS", cmk_identity_id="/x/id", subnet_ids=["/s"])
    (account,) = _resources(_load("tenant-storage.json"), "Microsoft.Storage/storageAccounts")
    want = account["properties"]
    for key in (
        "allowSharedKeyAccess",
        "defaultToOAuthAuthentication",
        "allowBlobPublicAccess",
        "allowCrossTenantReplication",
        "minimumTlsVersion",
        "supportsHttpsTrafficOnly",
        "accessTier",
    ):
        assert body["properties"][key] == want[key], key
    assert body["properties"]["networkAcls"]["defaultAction"] == want["networkAcls"]["defaultAction"] == "Deny"
    enc = body["properties"]["encryption"]
    assert enc["keySource"] == want["encryption"]["keySource"] and enc["requireInfrastructureEncryption"] is True
    assert enc["services"] == want["encryption"]["services"]
    (blob,) = _resources(_load("tenant-storage.json"), "Microsoft.Storage/storageAccounts/blobServices")
    assert set(blob_service_body(30)["properties"]) == set(blob["properties"])
