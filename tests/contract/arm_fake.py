"""A small local stand-in for the Azure Resource Manager endpoints of Microsoft.Storage
that the tenant-account provisioner calls (``storage.azure_accounts``), for the real
azure-mgmt-storage SDK to talk to over HTTPS.

It answers as the Storage Resource Provider REST reference documents, and no more:

* ``PUT .../storageAccounts/{name}``: a new account answers **202 with an empty body**,
  a ``Location`` header (``.../locations/{region}/asyncoperations/{id}?monitor=true``) and
  ``Retry-After``; polling it answers 202 while the account is ``Creating`` and then 200
  with the account. An account that already exists (or is being created) answers **200
  with its configuration**, updated from the body. A name held by another resource group
  or outside the subscription: **409 ``StorageAccountAlreadyTaken``** ("The storage
  account named X is already taken."); an invalid name: 400 ``AccountNameInvalid``.
* ``GET`` an account: 200, or **404 ``ResourceNotFound``**; a missing resource group: 404
  ``ResourceGroupNotFound``. ``DELETE``: 200, or 204 when there was nothing.
* ``POST .../providers/Microsoft.Storage/checkNameAvailability``: ``nameAvailable``, and
  ``reason`` ``AlreadyExists`` / ``AccountNameInvalid`` with a message.
* ``PUT .../blobServices/default`` (200), ``PUT .../encryptionScopes/{scope}`` (201 new,
  200 existing), ``GET/PUT/DELETE .../blobServices/default/containers/{c}`` (404
  ``ContainerNotFound``; 201/200; 200/204). Sub-resources of an account still ``Creating``:
  409 ``StorageAccountIsNotProvisioned``.
* Every request needs ``api-version`` (400 ``MissingApiVersionParameter``) and a bearer
  token (401 ``AuthenticationFailed``); error bodies are ``{"error": {"code", "message"}}``.

Not emulated: authorisation (every token is accepted), Key Vault access checks for
customer-managed keys (the body is recorded and checked for shape only), network rules,
the data plane (no blob endpoint answers), real timings. ``fail_next`` injects a documented
error into the next matching request. Every request is recorded (``requests``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ACCOUNT_NAME_RE = re.compile(r"[a-z0-9]{3,24}")
CONTAINER_NAME_RE = re.compile(r"[a-z0-9](?:-?[a-z0-9]){2,62}")
_PREFIX = r"/subscriptions/(?P<sub>[^/]+)"
_ACCOUNT = _PREFIX + r"/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Storage/storageAccounts/(?P<name>[^/]+)"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class _Account:
    rg: str
    name: str
    body: dict[str, Any]
    state: str = "Creating"
    polls_left: int = 1
    blob_service: dict[str, Any] | None = None
    scopes: dict[str, dict[str, Any]] = field(default_factory=dict)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)


class ArmFake:
    """Start with ``start()``; ``url`` is the endpoint, ``ca_file`` the PEM to trust."""

    def __init__(self, subscription: str, resource_groups: set[str], *, creating_polls: int = 1) -> None:
        self.subscription = subscription
        self.resource_groups = set(resource_groups)
        self.creating_polls = creating_polls
        self.accounts: dict[str, _Account] = {}  # by name (names are global)
        self.taken_elsewhere: set[str] = set()  # names held outside this subscription
        self.operations: dict[str, str] = {}  # async operation id -> account name
        self.requests: list[Recorded] = []
        self._failures: list[tuple[str, str, int, str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="arm-fake-"))
        self.ca_file = str(self._dir / "cert.pem")

    # --- control -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ArmFake:
        cert, key = _self_signed(self._dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        fake = self

        class Handler(_Handler):
            arm = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail_next(self, method: str, path_suffix: str, status: int, code: str, message: str) -> None:
        """The next ``method`` request whose path ends with ``path_suffix`` answers this error."""
        with self._lock:
            self._failures.append((method, path_suffix, status, code, message))

    def add_account(self, rg: str, name: str, *, tags: dict[str, str] | None = None) -> None:
        """An account made by someone else (already Succeeded)."""
        body = {"location": "westeurope", "kind": "StorageV2", "sku": {"name": "Standard_LRS"}, "tags": tags or {}}
        with self._lock:
            self.accounts[name] = _Account(rg, name, body, state="Succeeded", polls_left=0)

    def sent(self, method: str, path_suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    # --- resources -----------------------------------------------------------------------------

    def account_json(self, a: _Account) -> dict[str, Any]:
        props = dict(a.body.get("properties") or {})
        props["provisioningState"] = a.state
        props["creationTime"] = "2026-12-01T10:00:00.0000000Z"
        if a.state == "Succeeded":
            props["primaryEndpoints"] = {
                "blob": f"https://{a.name}.blob.core.windows.net/",
                "dfs": f"https://{a.name}.dfs.core.windows.net/",
            }
            props["primaryLocation"] = a.body.get("location")
            props["statusOfPrimary"] = "available"
        out = {
            "id": f"/subscriptions/{self.subscription}/resourceGroups/{a.rg}/providers/Microsoft.Storage/storageAccounts/{a.name}",
            "name": a.name,
            "type": "Microsoft.Storage/storageAccounts",
            "location": a.body.get("location"),
            "kind": a.body.get("kind"),
            "sku": {**(a.body.get("sku") or {}), "tier": "Standard"},
            "tags": a.body.get("tags") or {},
            "properties": props,
        }
        if "identity" in a.body:
            out["identity"] = a.body["identity"]
        return out


class _Handler(BaseHTTPRequestHandler):
    arm: ArmFake
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    # --- plumbing ---------------------------------------------------------------------------

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        arm = self.arm
        with arm._lock:
            arm.requests.append(Recorded(self.command, parts.path, query, body))
            failure = next(
                (f for f in arm._failures if f[0] == self.command and parts.path.endswith(f[1])),
                None,
            )
            if failure is not None:
                arm._failures.remove(failure)
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            return self._error(
                401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."
            )
        if "api-version" not in query:
            return self._error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if failure is not None:
            return self._error(failure[2], failure[3], failure[4])
        with arm._lock:
            self._route(parts.path, body)

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # --- routes ------------------------------------------------------------------------------

    def _route(self, path: str, body: Any) -> None:
        arm = self.arm
        m = re.fullmatch(_PREFIX + r"/providers/Microsoft\.Storage/checkNameAvailability", path)
        if m and self.command == "POST":
            return self._check_name(body or {})
        m = re.fullmatch(_PREFIX + r"/providers/Microsoft\.Storage/locations/[^/]+/asyncoperations/(?P<op>[^/]+)", path)
        if m and self.command == "GET":
            return self._poll(m["op"])
        m = re.fullmatch(_ACCOUNT + r"(?P<rest>/.*)?", path)
        if not m:
            return self._error(404, "InvalidResourceType", f"The resource type could not be found: {path}")
        if m["sub"] != arm.subscription:
            return self._error(404, "SubscriptionNotFound", f"The subscription '{m['sub']}' could not be found.")
        if m["rg"] not in arm.resource_groups:
            return self._error(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
        rest = m["rest"] or ""
        if not rest:
            return self._account(m["rg"], m["name"], body)
        a = arm.accounts.get(m["name"])
        if a is None or a.rg != m["rg"]:
            return self._error(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Storage/storageAccounts/{m['name']}' under resource group '{m['rg']}' was not found.",
            )
        if a.state != "Succeeded":
            return self._error(
                409,
                "StorageAccountIsNotProvisioned",
                "The storage account provisioning state must be 'Succeeded' before executing the operation.",
            )
        base = arm.account_json(a)["id"]
        if rest == "/blobServices/default" and self.command == "PUT":
            a.blob_service = (body or {}).get("properties") or {}
            return self._send(
                200,
                {
                    "id": f"{base}/blobServices/default",
                    "name": "default",
                    "type": "Microsoft.Storage/storageAccounts/blobServices",
                    "properties": a.blob_service,
                },
            )
        sm = re.fullmatch(r"/encryptionScopes/(?P<scope>[^/]+)", rest)
        if sm and self.command == "PUT":
            props = dict((body or {}).get("properties") or {})
            if props.get("source") == "Microsoft.KeyVault" and not (props.get("keyVaultProperties") or {}).get(
                "keyUri"
            ):
                return self._error(
                    400, "InvalidValuesForRequestParameters", "Values for request parameters are invalid: keyUri."
                )
            existed = sm["scope"] in a.scopes
            a.scopes[sm["scope"]] = props
            return self._send(
                200 if existed else 201,
                {
                    "id": f"{base}/encryptionScopes/{sm['scope']}",
                    "name": sm["scope"],
                    "type": "Microsoft.Storage/storageAccounts/encryptionScopes",
                    "properties": {**props, "creationTime": _now(), "lastModifiedTime": _now()},
                },
            )
        cm = re.fullmatch(r"/blobServices/default/containers/(?P<c>[^/]+)", rest)
        if cm:
            return self._container(a, base, cm["c"], body)
        return self._error(404, "InvalidResourceType", f"The resource type could not be found: {rest}")

    def _check_name(self, body: dict[str, Any]) -> None:
        name = str(body.get("name", ""))
        if ACCOUNT_NAME_RE.fullmatch(name) is None:
            return self._send(
                200,
                {
                    "nameAvailable": False,
                    "reason": "AccountNameInvalid",
                    "message": f"{name} is not a valid storage account name. Storage account name must be between 3 and 24 characters in length and use numbers and lower-case letters only.",
                },
            )
        if name in self.arm.accounts or name in self.arm.taken_elsewhere:
            return self._send(
                200,
                {
                    "nameAvailable": False,
                    "reason": "AlreadyExists",
                    "message": f"The storage account named {name} is already taken.",
                },
            )
        return self._send(200, {"nameAvailable": True})

    def _account(self, rg: str, name: str, body: Any) -> None:
        arm = self.arm
        a = arm.accounts.get(name)
        if self.command == "GET":
            if a is None or a.rg != rg:
                return self._error(
                    404,
                    "ResourceNotFound",
                    f"The Resource 'Microsoft.Storage/storageAccounts/{name}' under resource group '{rg}' was not found.",
                )
            return self._send(200, arm.account_json(a))
        if self.command == "DELETE":
            if a is None or a.rg != rg:
                return self._send(204)
            del arm.accounts[name]
            return self._send(200)
        if self.command != "PUT":
            return self._error(405, "InvalidHttpVerb", "The HTTP verb specified was not recognized by the server.")
        if ACCOUNT_NAME_RE.fullmatch(name) is None:
            return self._error(
                400,
                "AccountNameInvalid",
                f"{name} is not a valid storage account name. Storage account name must be between 3 and 24 characters in length and use numbers and lower-case letters only.",
            )
        if (a is not None and a.rg != rg) or name in arm.taken_elsewhere:
            return self._error(409, "StorageAccountAlreadyTaken", f"The storage account named {name} is already taken.")
        problem = _check_account_body(body or {})
        if problem:
            return self._error(400, *problem)
        if a is not None:  # exists or being provisioned: 200 with its (updated) configuration
            a.body = {
                **a.body,
                **body,
                "properties": {**(a.body.get("properties") or {}), **body.get("properties", {})},
            }
            return self._send(200, arm.account_json(a))
        a = arm.accounts[name] = _Account(rg, name, body, polls_left=arm.creating_polls)
        op = uuid.uuid4().hex
        arm.operations[op] = name
        location = f"{arm.url}/subscriptions/{arm.subscription}/providers/Microsoft.Storage/locations/{body['location']}/asyncoperations/{op}?monitor=true&api-version={self._api_version()}"
        return self._send(202, None, {"Location": location, "Retry-After": "0"})

    def _poll(self, op: str) -> None:
        arm = self.arm
        name = arm.operations.get(op)
        a = arm.accounts.get(name or "")
        if a is None:
            return self._error(404, "ResourceNotFound", f"The async operation {op} was not found.")
        if a.state == "Creating":
            if a.polls_left > 0:
                a.polls_left -= 1
                return self._send(202, None, {"Location": arm.url + self.path, "Retry-After": "0"})
            a.state = "Succeeded"
        return self._send(200, arm.account_json(a))

    def _container(self, a: _Account, base: str, c: str, body: Any) -> None:
        if CONTAINER_NAME_RE.fullmatch(c) is None or "--" in c:
            return self._error(
                400, "ContainerOperationFailure", f"The specified resource name contains invalid characters: {c}"
            )
        found = a.containers.get(c)
        if self.command == "GET":
            if found is None:
                return self._error(404, "ContainerNotFound", "The specified container does not exist.")
            return self._send(200, _container_json(base, c, found))
        if self.command == "DELETE":
            if found is None:
                return self._send(204)
            del a.containers[c]
            return self._send(200)
        props = dict((body or {}).get("properties") or {})
        scope = props.get("defaultEncryptionScope")
        if scope is not None and scope not in a.scopes:
            return self._error(
                400, "ContainerOperationFailure", f"The specified encryption scope {scope} does not exist."
            )
        a.containers[c] = props
        return self._send(200 if found is not None else 201, _container_json(base, c, props))

    def _api_version(self) -> str:
        return parse_qs(urlsplit(self.path).query)["api-version"][0]


def _container_json(base: str, c: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{base}/blobServices/default/containers/{c}",
        "name": c,
        "type": "Microsoft.Storage/storageAccounts/blobServices/containers",
        "properties": {**props, "lastModifiedTime": _now(), "leaseStatus": "Unlocked", "leaseState": "Available"},
    }


def _check_account_body(body: dict[str, Any]) -> tuple[str, str] | None:
    """The documented required fields, and a customer-managed key's identity wiring."""
    if not body.get("location"):
        return ("LocationRequired", "The location property is required for this definition.")
    if not (body.get("sku") or {}).get("name") or not body.get("kind"):
        return ("InvalidRequestContent", "The request content was invalid: sku.name and kind are required.")
    enc = (body.get("properties") or {}).get("encryption") or {}
    if enc.get("keySource") == "Microsoft.Keyvault":
        kv = enc.get("keyvaultproperties") or {}
        if not kv.get("keyvaulturi") or not kv.get("keyname"):
            return (
                "InvalidValuesForRequestParameters",
                "Values for request parameters are invalid: keyvaultproperties.",
            )
        uai = (enc.get("identity") or {}).get("userAssignedIdentity")
        if not uai or uai not in ((body.get("identity") or {}).get("userAssignedIdentities") or {}):
            return (
                "InvalidValuesForRequestParameters",
                "Values for request parameters are invalid: the encryption identity must be assigned to the account.",
            )
    return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def _self_signed(where: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)
