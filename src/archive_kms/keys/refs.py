"""Key references: the one value that names an L1 key, parsed strictly.

A tenant's key is configured as a URI-like string; :func:`parse_key_ref` turns it into a
frozen value whose ``uri`` is the canonical spelling (so two spellings of one key cannot
become two keys). The registry (``keys.registry``) picks the adapter from ``scheme``.

==============  ==================================================================
scheme          syntax
==============  ==================================================================
``aws-kms``     ``aws-kms://arn:PARTITION:kms:REGION:ACCOUNT:key/KEY-ID``
                ``aws-kms://arn:PARTITION:kms:REGION:ACCOUNT:alias/NAME``
                ``aws-kms://alias/NAME`` (our account and configured region)
``azure-kv``    ``azure-kv://HOST[:PORT]/keys/NAME[/VERSION]`` (HTTPS implied)
``kmip``        ``kmip://HOST:PORT/UID``
``managed``     ``managed://platform`` or ``managed://NAME`` (platform KMS key)
``memory``      ``memory://NAME[/VERSION]`` (in-process fake; tests and demo only)
==============  ==================================================================

Rules common to every scheme: ASCII only, no whitespace or control characters, at most
2,048 characters, no ``?``, ``#``, ``%`` or ``@`` (no query, fragment, percent-escapes or
credentials: a reference names a key, it never carries options or secrets). Every error is
a ``ValidationError`` that shows the offending reference (``ascii()``-escaped, truncated)
and says what to fix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from archive_kms.errors import ValidationError, WrongKeyError

if TYPE_CHECKING:
    from archive_kms.keys.port import WrappedKey

__all__ = [
    "SCHEMES",
    "AwsKmsKeyRef",
    "AzureKeyVaultKeyRef",
    "KeyRef",
    "KmipKeyRef",
    "ManagedKeyRef",
    "MemoryKeyRef",
    "parse_key_ref",
    "replacement_ref",
]

MAX_REF_LEN = 2048

_PARTITIONS = ("aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b", "aws-iso-e", "aws-iso-f", "aws-eusc")
_REGION_RE = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d{1,2}$")
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_KEY_ID_RE = re.compile(r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$")
_ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")

_DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_KV_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_KV_VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
_KMIP_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_NAME_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_MEMORY_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")


def _fail(ref: str, problem: str, syntax: str) -> ValidationError:
    shown = ascii(ref if len(ref) <= 160 else ref[:160] + "...")
    return ValidationError(f"invalid key reference {shown}: {problem}; expected {syntax}", resource=ref[:160])


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsKmsKeyRef:
    """A KMS key by key ARN, alias ARN or alias name (BYOKMS, BYOK-imported, managed)."""

    scheme: ClassVar[str] = "aws-kms"
    syntax: ClassVar[str] = (
        "aws-kms://arn:aws:kms:REGION:ACCOUNT:key/KEY-ID, aws-kms://arn:aws:kms:REGION:ACCOUNT:alias/NAME "
        "or aws-kms://alias/NAME"
    )

    partition: str | None = None
    region: str | None = None
    account: str | None = None
    key_id: str | None = None  # UUID or "mrk-..." (multi-Region)
    alias: str | None = None  # "alias/NAME"

    @property
    def is_key_arn(self) -> bool:
        return self.key_id is not None

    @property
    def api_key_id(self) -> str:
        """What KMS takes as ``KeyId``: the ARN, or the alias name for a bare alias."""
        if self.region is None:
            return self.alias  # type: ignore[return-value]
        resource = f"key/{self.key_id}" if self.key_id else self.alias
        return f"arn:{self.partition}:kms:{self.region}:{self.account}:{resource}"

    @property
    def uri(self) -> str:
        return f"aws-kms://{self.api_key_id}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class AzureKeyVaultKeyRef:
    """An Azure Key Vault key, optionally pinned to one version (BYOKV)."""

    scheme: ClassVar[str] = "azure-kv"
    syntax: ClassVar[str] = "azure-kv://HOST[:PORT]/keys/NAME[/VERSION] (VERSION: 32 lowercase hex digits)"

    host: str
    name: str
    port: int | None = None
    version: str | None = None

    @property
    def vault_url(self) -> str:
        return f"https://{self.host}" + (f":{self.port}" if self.port is not None else "")

    @property
    def key_id(self) -> str:
        """The Key Vault key identifier (``https://HOST/keys/NAME[/VERSION]``)."""
        return f"{self.vault_url}/keys/{self.name}" + (f"/{self.version}" if self.version else "")

    @property
    def uri(self) -> str:
        return "azure-kv://" + self.key_id[len("https://") :]

    def with_version(self, version: str | None) -> AzureKeyVaultKeyRef:
        if version is not None and not _KV_VERSION_RE.fullmatch(version):
            raise _fail(self.uri + f"/{version}", "the key version must be 32 lowercase hex digits", self.syntax)
        return AzureKeyVaultKeyRef(host=self.host, name=self.name, port=self.port, version=version)

    def same_key(self, other: AzureKeyVaultKeyRef) -> bool:
        # Key Vault key names are case-insensitive.
        return (self.host, self.port, self.name.lower()) == (other.host, other.port, other.name.lower())

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class KmipKeyRef:
    """A symmetric key inside a KMIP server (HSM), by unique identifier."""

    scheme: ClassVar[str] = "kmip"
    syntax: ClassVar[str] = "kmip://HOST:PORT/UID"

    host: str
    port: int
    uid: str

    @property
    def uri(self) -> str:
        return f"kmip://{_format_host(self.host)}:{self.port}/{self.uid}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class ManagedKeyRef:
    """The platform's own KMS key (tenants without BYOK). ``name`` selects one of several
    platform keys; ``platform`` is the default one."""

    scheme: ClassVar[str] = "managed"
    syntax: ClassVar[str] = "managed://platform or managed://NAME (NAME: lowercase letters, digits, hyphens)"

    name: str = "platform"

    @property
    def alias(self) -> str:
        """The KMS alias of this platform key."""
        return "alias/archive-kms-managed" + ("" if self.name == "platform" else f"-{self.name}")

    @property
    def uri(self) -> str:
        return f"managed://{self.name}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class MemoryKeyRef:
    """A key of the in-process fake (``keys.memory``). Never resolvable in production: the
    default registry has no ``memory`` adapter."""

    scheme: ClassVar[str] = "memory"
    syntax: ClassVar[str] = "memory://NAME[/VERSION]"

    name: str
    version: int | None = None

    @property
    def uri(self) -> str:
        return f"memory://{self.name}" + (f"/{self.version}" if self.version is not None else "")

    def with_version(self, version: int | None) -> MemoryKeyRef:
        return MemoryKeyRef(name=self.name, version=version)

    def __str__(self) -> str:
        return self.uri


KeyRef = AwsKmsKeyRef | AzureKeyVaultKeyRef | KmipKeyRef | ManagedKeyRef | MemoryKeyRef
_BY_SCHEME: dict[str, type[KeyRef]] = {
    cls.scheme: cls for cls in (AwsKmsKeyRef, AzureKeyVaultKeyRef, KmipKeyRef, ManagedKeyRef, MemoryKeyRef)
}
SCHEMES = tuple(_BY_SCHEME)


# --- parsing -----------------------------------------------------------------------------


def parse_key_ref(ref: str | KeyRef) -> KeyRef:
    """Parse and validate ``ref``; a parsed value is returned unchanged."""
    if isinstance(ref, tuple(_BY_SCHEME.values())):
        return ref  # type: ignore[return-value]
    if not isinstance(ref, str):
        raise ValidationError(f"a key reference must be a str, got {type(ref).__name__}")
    any_syntax = "one of " + ", ".join(f"{s}://..." for s in SCHEMES)
    if not ref:
        raise _fail(ref, "it is empty", any_syntax)
    if len(ref) > MAX_REF_LEN:
        raise _fail(ref, f"it is {len(ref)} characters long, the limit is {MAX_REF_LEN}", any_syntax)
    if not ref.isascii() or not ref.isprintable() or any(c.isspace() for c in ref):
        raise _fail(ref, "it contains non-ASCII, whitespace or control characters", any_syntax)
    scheme, sep, rest = ref.partition("://")
    if not sep:
        if ref.startswith("arn:aws"):
            raise _fail(ref, "the scheme is missing (write aws-kms://" + ref[:40] + "...)", AwsKmsKeyRef.syntax)
        raise _fail(ref, "the scheme is missing", any_syntax)
    if scheme == "https" and ".vault." in rest:
        raise _fail(
            ref, "a Key Vault key is written with the azure-kv:// scheme, not https://", AzureKeyVaultKeyRef.syntax
        )
    cls = _BY_SCHEME.get(scheme)
    if cls is None:
        raise _fail(ref, f"unknown scheme {scheme!r}", any_syntax)
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-escapes"), ("@", "credentials")):
        if ch in rest:
            raise _fail(ref, f"{what} ({ch!r}) is not allowed in a key reference", cls.syntax)
    parsers: dict[str, Callable[[str, str], KeyRef]] = {
        "aws-kms": _parse_aws,
        "azure-kv": _parse_azure,
        "kmip": _parse_kmip,
        "managed": _parse_managed,
        "memory": _parse_memory,
    }
    return parsers[scheme](ref, rest)


def _parse_aws(ref: str, rest: str) -> AwsKmsKeyRef:
    syntax = AwsKmsKeyRef.syntax
    if rest.startswith("alias/"):
        return AwsKmsKeyRef(alias=_check_alias(ref, rest))
    if not rest.startswith("arn:"):
        if _KEY_ID_RE.fullmatch(rest.lower()):
            raise _fail(ref, "a bare key id does not say its region or account: use the key ARN", syntax)
        raise _fail(ref, "write a key ARN, an alias ARN or alias/NAME after aws-kms://", syntax)
    parts = rest.split(":", 5)
    if len(parts) != 6:
        raise _fail(ref, "an ARN has six ':'-separated fields (arn:PARTITION:kms:REGION:ACCOUNT:RESOURCE)", syntax)
    _, partition, service, region, account, resource = parts
    if partition not in _PARTITIONS:
        raise _fail(ref, f"unknown AWS partition {partition!r} (known: {', '.join(_PARTITIONS)})", syntax)
    if service != "kms":
        raise _fail(ref, f"the ARN is for service {service!r}, not 'kms'", syntax)
    if not _REGION_RE.fullmatch(region):
        raise _fail(ref, f"{region!r} is not an AWS region name such as us-east-1", syntax)
    if not _ACCOUNT_RE.fullmatch(account):
        raise _fail(ref, "the account must be 12 digits", syntax)
    if resource.startswith("key/"):
        key_id = resource[len("key/") :]
        if not _KEY_ID_RE.fullmatch(key_id):
            problem = (
                "key ids are lowercase"
                if _KEY_ID_RE.fullmatch(key_id.lower())
                else "the key id must be a UUID (or mrk- and 32 hex digits for a multi-Region key)"
            )
            raise _fail(ref, problem, syntax)
        return AwsKmsKeyRef(partition=partition, region=region, account=account, key_id=key_id)
    if resource.startswith("alias/"):
        return AwsKmsKeyRef(partition=partition, region=region, account=account, alias=_check_alias(ref, resource))
    raise _fail(ref, "the ARN resource must be key/KEY-ID or alias/NAME", syntax)


def _check_alias(ref: str, alias: str) -> str:
    if not _ALIAS_RE.fullmatch(alias):
        raise _fail(ref, "an alias name is alias/ and 1-250 characters from A-Z a-z 0-9 / _ -", AwsKmsKeyRef.syntax)
    if alias.startswith("alias/aws/"):
        raise _fail(
            ref,
            "alias/aws/* names AWS managed keys, which cannot be shared with us: use a customer managed key",
            AwsKmsKeyRef.syntax,
        )
    return alias


def _split_host_port(ref: str, authority: str, syntax: str, *, port_required: bool) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _fail(ref, "an IPv6 host must be written as [ADDRESS]", syntax)
        host, tail = authority[1:end], authority[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _fail(ref, f"{host!r} is not an IPv6 address", syntax) from None
    else:
        host, colon, port_text = authority.partition(":")
        tail = colon + port_text
        if not host:
            raise _fail(ref, "the host is missing", syntax)
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if host != host.lower():
                raise _fail(ref, "write the host in lowercase", syntax) from None
            labels = host.split(".")
            if all(label.isdigit() for label in labels):
                raise _fail(ref, f"{host!r} is not a valid IPv4 address", syntax) from None
            if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
                raise _fail(ref, f"{host!r} is not a valid DNS host name", syntax) from None
    if not tail:
        if port_required:
            raise _fail(ref, "the port is missing", syntax)
        return host, None
    if not tail.startswith(":"):
        raise _fail(ref, "unexpected characters after the host", syntax)
    port_text = tail[1:]
    if not port_text.isdigit() or port_text.startswith("0") or not 1 <= int(port_text) <= 65535:
        raise _fail(ref, "the port must be a number from 1 to 65535 without leading zeros", syntax)
    return host, int(port_text)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_azure(ref: str, rest: str) -> AzureKeyVaultKeyRef:
    syntax = AzureKeyVaultKeyRef.syntax
    authority, slash, path = rest.partition("/")
    if not slash:
        raise _fail(ref, "the key path /keys/NAME is missing", syntax)
    host, port = _split_host_port(ref, authority, syntax, port_required=False)
    if port == 443:
        port = None  # canonical: the default HTTPS port is not written
    parts = path.split("/")
    if parts[0] != "keys" or len(parts) not in (2, 3):
        raise _fail(ref, "the path must be /keys/NAME or /keys/NAME/VERSION", syntax)
    name = parts[1]
    if not _KV_NAME_RE.fullmatch(name):
        raise _fail(ref, "a key name is 1-127 characters from 0-9 a-z A-Z and '-'", syntax)
    version = parts[2] if len(parts) == 3 else None
    if version is not None and not _KV_VERSION_RE.fullmatch(version):
        raise _fail(ref, "the key version must be 32 lowercase hex digits", syntax)
    return AzureKeyVaultKeyRef(host=host, name=name, port=port, version=version)


def _parse_kmip(ref: str, rest: str) -> KmipKeyRef:
    syntax = KmipKeyRef.syntax
    authority, slash, uid = rest.partition("/")
    if not slash or not uid:
        raise _fail(ref, "the key's unique identifier (/UID) is missing", syntax)
    host, port = _split_host_port(ref, authority, syntax, port_required=True)
    if not _KMIP_UID_RE.fullmatch(uid):
        raise _fail(ref, "a UID is 1-128 characters from A-Z a-z 0-9 . _ : - (no '/')", syntax)
    assert port is not None
    return KmipKeyRef(host=host, port=port, uid=uid)


def _parse_managed(ref: str, rest: str) -> ManagedKeyRef:
    if not _NAME_RE.fullmatch(rest):
        raise _fail(
            ref,
            "the name is 1-63 lowercase letters, digits and inner hyphens, starting with a letter",
            ManagedKeyRef.syntax,
        )
    return ManagedKeyRef(name=rest)


def _parse_memory(ref: str, rest: str) -> MemoryKeyRef:
    name, slash, version = rest.partition("/")
    if not _NAME_RE.fullmatch(name):
        raise _fail(
            ref,
            "the name is 1-63 lowercase letters, digits and inner hyphens, starting with a letter",
            MemoryKeyRef.syntax,
        )
    if slash and not _MEMORY_VERSION_RE.fullmatch(version):
        raise _fail(ref, "the version is a positive integer", MemoryKeyRef.syntax)
    return MemoryKeyRef(name=name, version=int(version) if slash else None)


def wrapped_key_ref(wrapped: WrappedKey, *, algorithm: str, owner: str) -> KeyRef:
    """The reference a wrapped key names, once its algorithm is ``algorithm``: the first
    check every provider makes before an unwrap. ``owner`` (the provider's own reference)
    names the resource in the ``WrongKeyError`` raised otherwise. Each provider then checks
    that the reference is its own key."""
    if wrapped.algorithm != algorithm:
        raise WrongKeyError(f"wrapped key algorithm {wrapped.algorithm!r} is not {algorithm!r}", resource=owner)
    try:
        return parse_key_ref(wrapped.key_ref)
    except ValidationError:
        raise WrongKeyError(f"wrapped key names an invalid key reference; expected {owner}", resource=owner) from None


def replacement_ref(key_ref: str, version: str | None) -> str | None:
    """The key a provider's reported *version* of ``key_ref`` names, when that version is
    another key object rather than a version of the same key: KMIP reports the UID of the
    newest Active object bearing the key's Name (a customer's HSM rotation is a new
    object; ADR 0038), so the rotation moves the tenant to ``kmip://HOST:PORT/<that UID>``.
    None when ``version`` is a version of ``key_ref`` itself (AWS KMS key material, Key
    Vault key versions: the reference stays) or names ``key_ref``'s own object."""
    parsed = parse_key_ref(key_ref)
    if not isinstance(parsed, KmipKeyRef) or not version or version == parsed.uid:
        return None
    if not _KMIP_UID_RE.fullmatch(version):
        raise ValidationError(f"KMIP key {parsed.uri}: the server named a replacement with an unusable UID")
    return KmipKeyRef(parsed.host, parsed.port, version).uri
