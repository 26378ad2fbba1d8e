"""Tenant ids and every resource name derived from them.

One rule decides what a tenant id is (:data:`TENANT_ID_RULE`); nothing else in the
product builds a bucket, container, storage account, prefix or index name from a tenant
id except the functions here, and each of them checks its *output* against the naming
rules of the service it is for (``check_*`` below), so a future change to a prefix or to
the id rule cannot produce a name the service would reject or misread.

The id rule, and why each part of it:

* ASCII lowercase letters, digits and single hyphens only: every service below accepts
  these, and nothing can be a path separator, wildcard, quote or query metacharacter.
* Starts with a letter: never all digits (no confusion with numeric ids, never IP-like
  inside a bucket name), never a leading hyphen (CLI flags, ES ``-index`` exclusion).
* No ``--`` and no trailing hyphen: ``--`` is reserved as the separator between a tenant id
  and an index generation (``archive-acme--3``), so one tenant's names can never be a
  prefix-match of another's (``archive-acme-*`` would also match tenant ``acme-eu``).
* 3..32 characters: fits every derived name with room for the platform prefixes.
* Uppercase is *refused*, not lowercased: ``Acme`` and ``acme`` must not silently become
  one tenant. Unicode look-alikes (Cyrillic ``а``) are refused by the ASCII rule.

Errors are ``ValidationError`` naming the offending input (``ascii()``-escaped, so a
confusable or control character is visible) and the rule it broke.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from archive_kms.config import setting_default
from archive_kms.errors import ValidationError

__all__ = [
    "TENANT_ID_RULE",
    "TenantId",
    "azure_container_name",
    "azure_storage_account_name",
    "check_azure_account_name",
    "check_azure_container_name",
    "check_es_index_name",
    "check_s3_bucket_name",
    "check_s3_key_prefix",
    "check_tenant_account_name",
    "dedicated_s3_bucket_name",
    "es_alias_name",
    "es_index_name",
    "es_index_pattern",
    "shared_s3_prefix",
]

TENANT_ID_MIN_LEN = 3
TENANT_ID_MAX_LEN = 32
_TENANT_ID_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*", re.ASCII)

#: The rule in words, quoted by every error about a bad tenant id.
TENANT_ID_RULE = (
    f"{TENANT_ID_MIN_LEN}..{TENANT_ID_MAX_LEN} characters of ASCII lowercase letters, digits and "
    "single hyphens, starting with a letter and not ending with a hyphen (regex "
    "[a-z][a-z0-9]*(-[a-z0-9]+)*); uppercase is refused, not lowercased"
)

# Default platform prefixes (the lead may move them into Settings).
DEFAULT_S3_SHARED_PREFIX_ROOT = "tenants"
DEFAULT_DEDICATED_BUCKET_PREFIX = "archive-kms-tenant"
DEFAULT_SHARED_CONTAINER_PREFIX = "tenant"
DEFAULT_DEDICATED_CONTAINER_PREFIX = "byok"
DEFAULT_ACCOUNT_PREFIX: str = setting_default("azure_tenant_account_prefix")
DEFAULT_INDEX_PREFIX = "archive"
#: Separator between tenant id and index generation; tenant ids cannot contain it.
GENERATION_SEPARATOR = "--"


def _show(value: object, limit: int = 80) -> str:
    """A safe, bounded rendering of untrusted input for error messages."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(kind: str, value: object, rule: str) -> ValidationError:
    return ValidationError(f"invalid {kind} {_show(value)}: {rule}", resource=kind)


# --- the tenant id -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantId:
    """A validated tenant id. Construct with ``TenantId("acme")``; invalid input raises
    ``ValidationError``. ``str(t)`` is the id itself."""

    value: str

    def __post_init__(self) -> None:
        v = self.value
        if not isinstance(v, str):
            raise _fail("tenant id", v, f"must be a str; {TENANT_ID_RULE}")
        if not TENANT_ID_MIN_LEN <= len(v) <= TENANT_ID_MAX_LEN:
            raise _fail(
                "tenant id", v, f"length {len(v)} is outside {TENANT_ID_MIN_LEN}..{TENANT_ID_MAX_LEN}; {TENANT_ID_RULE}"
            )
        if not v.isascii():
            raise _fail("tenant id", v, f"contains non-ASCII characters (look-alikes are refused); {TENANT_ID_RULE}")
        if v != v.lower():
            raise _fail("tenant id", v, f"contains uppercase letters; {TENANT_ID_RULE}")
        if _TENANT_ID_RE.fullmatch(v) is None:
            raise _fail("tenant id", v, TENANT_ID_RULE)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value: TenantId | str) -> TenantId:
        """Accept an already-validated id or validate a raw one."""
        return value if isinstance(value, TenantId) else cls(value)


# --- service naming rules (validate outputs) ---------------------------------------------

_S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9-]*[a-z0-9]", re.ASCII)
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def check_s3_bucket_name(name: str) -> str:
    """S3 general-purpose bucket naming rules, plus one stricter rule of ours: no dots
    (dotted names break TLS with virtual-hosted addressing and transfer acceleration).

    3..63 chars of lowercase letters, digits, hyphens; starts and ends with a letter or
    digit; not IP-like; not a reserved prefix (``xn--``, ``sthree-``, ``amzn-s3-demo-``) or
    suffix (``-s3alias``, ``--ol-s3``, ``.mrap``, ``--x-s3``, ``--table-s3``).
    """
    rule = "S3 bucket names are 3..63 chars of a-z 0-9 - (no dots here), starting and ending with a letter or digit"
    if not isinstance(name, str) or not 3 <= len(name) <= 63 or _S3_BUCKET_RE.fullmatch(name) is None:
        raise _fail("S3 bucket name", name, rule)
    if _is_ip_like(name):
        raise _fail("S3 bucket name", name, "must not be formatted as an IP address")
    for p in _S3_RESERVED_PREFIXES:
        if name.startswith(p):
            raise _fail("S3 bucket name", name, f"must not start with the reserved prefix {p!r}")
    for s in _S3_RESERVED_SUFFIXES:
        if name.endswith(s):
            raise _fail("S3 bucket name", name, f"must not end with the reserved suffix {s!r}")
    return name


def _is_ip_like(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_S3_PREFIX_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?/)+", re.ASCII)


def check_s3_key_prefix(prefix: str) -> str:
    """A key prefix we scope a tenant to: one or more ``segment/`` where segments are
    lowercase letters, digits and inner hyphens; so never ``.``, ``..``, ``//`` or a
    leading ``/``. At most 256 bytes (S3 keys are at most 1024)."""
    if not isinstance(prefix, str) or len(prefix) > 256 or _S3_PREFIX_RE.fullmatch(prefix) is None:
        raise _fail(
            "S3 key prefix", prefix, "must be one or more 'segment/' of a-z 0-9 and inner hyphens, at most 256 bytes"
        )
    return prefix


_AZ_CONTAINER_RE = re.compile(r"[a-z0-9](?:-?[a-z0-9])*", re.ASCII)


def check_azure_container_name(name: str) -> str:
    """Azure container names: 3..63 chars of lowercase letters, digits and hyphens,
    starting and ending with a letter or digit, no consecutive hyphens."""
    if not isinstance(name, str) or not 3 <= len(name) <= 63 or _AZ_CONTAINER_RE.fullmatch(name) is None:
        raise _fail(
            "Azure container name",
            name,
            "must be 3..63 chars of a-z 0-9 -, start and end with a letter or digit, no '--'",
        )
    return name


_AZ_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}", re.ASCII)


def check_azure_account_name(name: str) -> str:
    """Azure storage account names: 3..24 chars of lowercase letters and digits."""
    if not isinstance(name, str) or _AZ_ACCOUNT_RE.fullmatch(name) is None:
        raise _fail("Azure storage account name", name, "must be 3..24 chars of a-z 0-9")
    return name


_ES_FORBIDDEN = set('\\/*?"<>| ,#:')


def check_es_index_name(name: str) -> str:
    """Elasticsearch index and alias names: lowercase; none of ``\\ / * ? " < > | space
    , # :``; not starting with ``- _ +``; not ``.`` or ``..``; at most 255 bytes. Stricter
    here: ASCII only and no leading ``.`` (hidden/system indices)."""
    if not isinstance(name, str) or not name:
        raise _fail("Elasticsearch index name", name, "must be a non-empty str")
    if not name.isascii() or not name.isprintable():
        raise _fail("Elasticsearch index name", name, "must be printable ASCII")
    if name != name.lower():
        raise _fail("Elasticsearch index name", name, "must be lowercase")
    bad = sorted(_ES_FORBIDDEN.intersection(name))
    if bad:
        raise _fail("Elasticsearch index name", name, f"must not contain {''.join(bad)!r}")
    if name[0] in "-_+.":
        raise _fail("Elasticsearch index name", name, "must not start with '-', '_', '+' or '.'")
    if len(name.encode("utf-8")) > 255:
        raise _fail("Elasticsearch index name", name, "must be at most 255 bytes")
    return name


# --- derived names -------------------------------------------------------------------------


def shared_s3_prefix(tenant: TenantId | str, *, root: str = DEFAULT_S3_SHARED_PREFIX_ROOT) -> str:
    """The tenant's key prefix in the shared bucket: ``tenants/<id>/``."""
    t = TenantId.of(tenant)
    return check_s3_key_prefix(f"{check_s3_key_prefix(root + '/')}{t}/")


def dedicated_s3_bucket_name(tenant: TenantId | str, *, prefix: str = DEFAULT_DEDICATED_BUCKET_PREFIX) -> str:
    """The tenant's dedicated bucket: ``<prefix>-<id>``."""
    t = TenantId.of(tenant)
    return check_s3_bucket_name(f"{prefix}-{t}")


def azure_container_name(tenant: TenantId | str, *, prefix: str = DEFAULT_SHARED_CONTAINER_PREFIX) -> str:
    """A container for the tenant: ``<prefix>-<id>`` (``tenant-`` in the shared account,
    ``byok-`` for a dedicated container)."""
    t = TenantId.of(tenant)
    return check_azure_container_name(f"{prefix}-{t}")


def azure_storage_account_name(tenant: TenantId | str, *, prefix: str = DEFAULT_ACCOUNT_PREFIX) -> str:
    """A dedicated storage account for the tenant: ``<prefix><readable><hash8>``.

    Account names allow no hyphens and only 24 chars, so the id cannot be used as is:
    ``acme-eu`` and ``acmeeu`` would both strip to ``acmeeu``. The name is therefore the
    prefix, as much of the id's letters and digits as fits, and always the last 8 chars are
    a base32 digest of the full id, so two tenants share an account name only if their
    SHA-256 digests collide in 40 bits *and* their readable parts agree.
    """
    t = TenantId.of(tenant)
    check_azure_account_name(prefix + "000")  # the prefix itself must be a-z 0-9
    digest = base64.b32encode(hashlib.sha256(t.value.encode("ascii")).digest()).decode("ascii").lower()[:8]
    room = 24 - len(prefix) - len(digest)
    if room < 1:
        raise _fail("Azure storage account prefix", prefix, "leaves no room for the tenant id (max 15 chars)")
    readable = t.value.replace("-", "")[:room]
    return check_azure_account_name(f"{prefix}{readable}{digest}")


def check_tenant_account_name(tenant: TenantId | str, name: str) -> str:
    """``name`` is a storage account name the rule of :func:`azure_storage_account_name`
    derives for ``tenant`` with *some* prefix (0..15 chars of a-z 0-9); else
    ``ValidationError``. Ties an account named in a stored ``Location`` to its tenant
    without knowing the deployment's prefix: another tenant's account (another digest), or
    the platform's shared account, is refused."""
    t = TenantId.of(tenant)
    check_azure_account_name(name)
    for cut in range(0, 16):
        prefix = name[:cut]
        try:
            if azure_storage_account_name(t, prefix=prefix) == name:
                return name
        except ValidationError:
            break  # no room left for a longer prefix
    raise _fail(
        "tenant storage account name",
        name,
        f"is not tenant {t}'s: a tenant account is <prefix><id without hyphens, truncated><8 chars of "
        "base32(SHA-256(id))>, 3..24 chars of a-z 0-9 (domain.tenants.azure_storage_account_name)",
    )


def es_alias_name(tenant: TenantId | str, *, prefix: str = DEFAULT_INDEX_PREFIX) -> str:
    """The alias searches go through: ``archive-<id>``."""
    t = TenantId.of(tenant)
    return check_es_index_name(f"{prefix}-{t}")


def es_index_name(tenant: TenantId | str, generation: int, *, prefix: str = DEFAULT_INDEX_PREFIX) -> str:
    """One index generation: ``archive-<id>--<generation>`` (``--`` cannot occur in an id,
    so no other tenant's alias or index can have this name)."""
    t = TenantId.of(tenant)
    if isinstance(generation, bool) or not isinstance(generation, int) or not 1 <= generation <= 10**9:
        raise _fail("index generation", generation, "must be an int in 1..1000000000")
    return check_es_index_name(f"{prefix}-{t}{GENERATION_SEPARATOR}{generation}")


def es_index_pattern(tenant: TenantId | str, *, prefix: str = DEFAULT_INDEX_PREFIX) -> str:
    """A wildcard matching exactly this tenant's index generations: ``archive-<id>--*``.
    (Not a valid index *name*: it is for ``GET _cat/indices/<pattern>`` style lookups.)"""
    t = TenantId.of(tenant)
    check_es_index_name(f"{prefix}-{t}{GENERATION_SEPARATOR}1")
    return f"{prefix}-{t}{GENERATION_SEPARATOR}*"
