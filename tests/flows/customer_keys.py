"""Fresh customer keys on the real key servers, one per enable mode, and server-side
disable/enable of them (what a customer does to revoke access).

- byokms: a KMS key in LocalStack (``aws-kms://<arn>``)
- byok:   on S3, a KMS key with Origin EXTERNAL whose material is imported through our
          ``ByokImporter`` (the customer wraps 32 random bytes under the published RSA key);
          on Azure, an RSA-3072 key imported into the Key Vault emulator from a ``.byok``
          file through our ``KeyVaultByokImporter`` (made for its key exchange key)
- byokv:  an RSA-3072 key in the Key Vault emulator (``azure-kv://host:port/keys/NAME``)
- kmip:   an AES-256 key on the PyKMIP server (``kmip://host:port/UID``)

KMIP has no "disable": ``disable`` revokes the key, which KMIP makes permanent, so
``can_reenable`` is False for it and ``enable`` raises.

Also the setup the customer-key end-to-end tests share: ``cli_env`` (the CLI in this
process on the test's state store, Key Vault emulator and Prefect up), ``invoke_cli``,
``customer_byok_file`` (the customer's side of Key Vault BYOK) and ``delete_vault_keys``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.keys.azure_byok import KeyVaultByokImporter, customer_transfer_blob
from archive_kms.keys.byok import ByokImporter, customer_wrap, sha256_hex
from archive_kms.keys.refs import parse_key_ref

MODES = ("byokms", "byok", "byokv", "kmip")
#: The stack service each mode's key server is.
SERVICE_OF_MODE = {"byokms": "localstack", "byok": "localstack", "byokv": "keyvault", "kmip": "kmip"}


@dataclass
class CustomerKeyFactory:
    """``factory(mode, cloud) -> key reference``; remembers what it made for cleanup."""

    settings: Any
    need_service: Callable[[str], None] = lambda name: None
    made: list[tuple[str, str]] = field(default_factory=list)  # (mode, ref)

    def __call__(self, mode: str, cloud: str | None = None) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
        if mode == "byok" and cloud == "azure":
            self.need_service("keyvault")
            ref = self._new_byok_azure()
            self.made.append((mode, ref))
            return ref
        self.need_service(SERVICE_OF_MODE[mode])
        ref = getattr(self, f"_new_{mode}")()
        self.made.append((mode, ref))
        return ref

    # --- creation ---------------------------------------------------------------------------

    def _kms(self):
        return clients.kms_client(self.settings, max_attempts=2)

    def _new_byokms(self) -> str:
        arn = self._kms().create_key(Description="flow test (BYOKMS)")["KeyMetadata"]["Arn"]
        return f"aws-kms://{arn}"

    def _new_byok(self) -> str:
        importer = ByokImporter(self._kms())
        ref = importer.create_key(description="flow test (BYOK)", tags={"purpose": "flow-test"})
        params = importer.import_parameters(ref, wrapping_key_spec="RSA_2048")
        upload = customer_wrap(params.public_key_pem, SecretBytes.random(32))  # we only ever see it wrapped
        importer.import_material(params, upload, sha256_hex(upload))
        return ref

    def _new_byok_azure(self) -> str:
        importer = KeyVaultByokImporter.from_settings(self.settings)
        params = importer.create_import_parameters(wrapping_key_spec="RSA_2048", tags={"purpose": "flow-test"})
        blob = customer_transfer_blob(params.public_key_pem, params.kek_kid, rsa_private_key_der(3072))
        return importer.import_blob(params, blob, sha256_hex(blob)).key_ref

    def _keyvault_host(self) -> str:
        return self.settings.azure_keyvault_url.removeprefix("https://").rstrip("/")

    def _new_byokv(self) -> str:
        name = f"flow-{uuid.uuid4().hex[:12]}"
        clients.keyvault_key_client(self.settings).create_rsa_key(
            name, size=3072, key_operations=["wrapKey", "unwrapKey"]
        )
        return f"azure-kv://{self._keyvault_host()}/keys/{name}"

    def _kmip_admin(self, action: Callable[[Any], Any]) -> Any:
        client = clients.kmip_client(self.settings)
        with client:
            return action(client)

    def _new_kmip(self) -> str:
        from kmip.core import enums

        def create(client) -> str:
            uid = client.create(
                enums.CryptographicAlgorithm.AES,
                256,
                name=f"flow-{os.urandom(4).hex()}",
                cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
            )
            client.activate(uid)
            return uid

        uid = self._kmip_admin(create)
        return f"kmip://{self.settings.kmip_host}:{self.settings.kmip_port}/{uid}"

    # --- server-side disable / enable -------------------------------------------------------------

    @staticmethod
    def can_reenable(ref: str) -> bool:
        return parse_key_ref(ref).scheme != "kmip"

    def disable(self, ref: str) -> None:
        """Disable the key on its server (the customer revokes our access)."""
        scheme = parse_key_ref(ref).scheme
        if scheme == "aws-kms":
            self._kms().disable_key(KeyId=parse_key_ref(ref).api_key_id)
        elif scheme == "azure-kv":
            clients.keyvault_key_client(self.settings).update_key_properties(vault_key_name(ref), enabled=False)
        elif scheme == "kmip":
            from kmip.core import enums

            self._kmip_admin(lambda c: c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, _kmip_uid(ref)))
        else:
            raise ValueError(f"cannot disable {ref}")

    def enable(self, ref: str) -> None:
        scheme = parse_key_ref(ref).scheme
        if scheme == "aws-kms":
            self._kms().enable_key(KeyId=parse_key_ref(ref).api_key_id)
        elif scheme == "azure-kv":
            clients.keyvault_key_client(self.settings).update_key_properties(vault_key_name(ref), enabled=True)
        else:
            raise ValueError(f"{ref}: a revoked KMIP key cannot be re-enabled (KMIP revocation is permanent)")

    # --- cleanup ------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Schedule deletion / delete / destroy every key made (best effort)."""
        for mode, ref in self.made:
            try:
                self._destroy(ref)
            except Exception:  # noqa: BLE001 - already gone or pending deletion
                pass

    def _destroy(self, ref: str) -> None:
        scheme = parse_key_ref(ref).scheme
        if scheme == "aws-kms":
            self._kms().schedule_key_deletion(KeyId=parse_key_ref(ref).api_key_id, PendingWindowInDays=7)
        elif scheme == "azure-kv":
            kc = clients.keyvault_key_client(self.settings)
            kc.begin_delete_key(vault_key_name(ref)).wait()
            kc.purge_deleted_key(vault_key_name(ref))
        elif scheme == "kmip":
            from kmip.core import enums

            uid = _kmip_uid(ref)
            try:
                self._kmip_admin(lambda c: c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid))
            except Exception:  # noqa: BLE001 - revoked already by a test
                pass
            self._kmip_admin(lambda c: c.destroy(uid))


def rsa_private_key_der(bits: int) -> bytes:
    """A new RSA private key as PKCS#8 DER: what a BYOK customer's HSM exports under a KEK."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def vault_key_name(ref: str) -> str:
    """NAME of ``azure-kv://host:port/keys/NAME[/VERSION]`` (or of a key id ``https://.../keys/NAME/V``)."""
    return ref.split("/keys/", 1)[1].split("/", 1)[0]


def delete_vault_keys(vault: Any, refs: Iterable[str]) -> None:
    """Delete and purge the Key Vault keys ``refs`` name (references or key ids); keys
    already gone are skipped."""
    from azure.core.exceptions import ResourceNotFoundError

    for name in {vault_key_name(ref) for ref in refs}:
        for action in (lambda n: vault.begin_delete_key(n).wait(), vault.purge_deleted_key):
            try:
                action(name)
            except ResourceNotFoundError:
                pass


def invoke_cli(*args: object) -> Any:
    """``archive-kms ARGS`` in this process (arguments as strings; exceptions propagate)."""
    from typer.testing import CliRunner

    from archive_kms import cli

    return CliRunner().invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


def customer_byok_file(folder: Path, kek_pem: Path, kek_kid: str) -> tuple[bytes, Any, Path, str]:
    """The customer's side of Key Vault BYOK, from the CLI: a new RSA-3072 key (PKCS#8 DER
    in ``folder/new-key.der``), its .byok file made by ``byok wrap`` for the key exchange
    key. Returns (the private key, the command's result, the file, its SHA-256)."""
    private_der = rsa_private_key_der(3072)
    (folder / "new-key.der").write_bytes(private_der)
    byok_file = folder / "KEY.byok"
    made = invoke_cli(
        "byok", "wrap", "--key", folder / "new-key.der", "--kek", kek_pem, "--kek-kid", kek_kid,
        "--out", byok_file, "--json",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    digest = json.loads(made.stdout)["sha256"]
    assert digest == sha256_hex(byok_file.read_bytes())
    return private_der, made, byok_file, digest


@pytest.fixture
def cli_env(flow_settings: Any, keyvault: Any, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The flows' settings (per-test SQLite state, short leases), exported to the CLI run in
    this process; the Key Vault emulator and Prefect are up."""
    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", flow_settings.state_url)
    monkeypatch.setenv("ARCHIVE_KMS_LEASE_TTL_SECONDS", str(flow_settings.lease_ttl_seconds))
    return flow_settings


def _kmip_uid(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[1]


@pytest.fixture
def customer_key(request, localstack) -> Iterator[CustomerKeyFactory]:
    """``customer_key(mode, cloud) -> key reference`` of a fresh customer key on the real
    server; ``customer_key.disable(ref)`` / ``.enable(ref)`` / ``.can_reenable(ref)``.
    The key server's service fixture is required on first use (fails loudly if down)."""

    def need(service: str) -> None:
        request.getfixturevalue(service)

    factory = CustomerKeyFactory(localstack, need)
    yield factory
    factory.cleanup()


__all__ = [
    "MODES",
    "SERVICE_OF_MODE",
    "CustomerKeyFactory",
    "cli_env",
    "customer_byok_file",
    "customer_key",
    "delete_vault_keys",
    "invoke_cli",
    "rsa_private_key_der",
    "vault_key_name",
]


def new_kmip_object_under_the_same_name(settings: Any, key_ref: str) -> str:
    """An HSM rotation: a new AES-256 object under the old one's Name, activated (the old
    one stays Active until the customer deactivates it)."""
    from kmip.core import enums

    uid = key_ref.rsplit("/", 1)[1]
    with clients.kmip_client(settings) as client:
        _, rows = client.get_attributes(uid, ["Name", "Initial Date"])
        found = {a.attribute_name.value: a.attribute_value for a in rows}
        name, created = found["Name"].name_value.value, found["Initial Date"].value
        while int(time.time()) <= created:  # Initial Date has 1 s resolution: be the newer one
            time.sleep(0.05)
        new = client.create(
            enums.CryptographicAlgorithm.AES,
            256,
            name=name,
            cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
        )
        client.activate(new)
    return str(new)
