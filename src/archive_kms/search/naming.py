"""Index and alias names for a tenant's search generations.

The tenant-id rule and the name derivation belong to ``archive_kms.domain.tenants`` (one
rule for every resource name); this module adapts them to the search code and adds the
reverse direction, :func:`parse_index_name`, which every port method uses so that only
generation index names reach Elasticsearch (no wildcards, ``_all``, comma lists or other
products' indices).

* alias: ``archive-<tenant>``; generation: ``archive-<tenant>--<gen>``, ``gen`` in
  1..10^9 without leading zeros. Tenant ids cannot contain ``--``, so no alias or index of
  one tenant can equal or prefix-match another tenant's names.
"""

from __future__ import annotations

from archive_kms.domain.tenants import (
    DEFAULT_INDEX_PREFIX,
    GENERATION_SEPARATOR,
    TenantId,
    es_alias_name,
    es_index_name,
    es_index_pattern,
)
from archive_kms.errors import ValidationError

PREFIX = DEFAULT_INDEX_PREFIX


def check_tenant_id(tenant: object) -> str:
    """Return ``tenant`` if it is a valid tenant id (``domain.tenants.TenantId``), else
    raise ``ValidationError``."""
    if isinstance(tenant, TenantId):
        return tenant.value
    return TenantId(tenant).value  # type: ignore[arg-type]


MAX_GENERATION = 10**9  # domain.tenants.es_index_name's range


def check_generation(generation: object) -> int:
    if isinstance(generation, bool) or not isinstance(generation, int) or not 1 <= generation <= MAX_GENERATION:
        raise ValidationError(f"index generation must be an int in 1..{MAX_GENERATION}, got {generation!r}")
    return generation


def alias_name(tenant: str) -> str:
    """The alias every search goes through: ``archive-<tenant>``."""
    return es_alias_name(check_tenant_id(tenant))


def index_name(tenant: str, generation: int) -> str:
    """The concrete index of one generation: ``archive-<tenant>--<gen>``."""
    return es_index_name(check_tenant_id(tenant), generation)


def index_pattern(tenant: str) -> str:
    """A wildcard matching exactly ``tenant``'s generations (for listing only)."""
    return es_index_pattern(check_tenant_id(tenant))


def parse_index_name(name: object) -> tuple[str, int]:
    """``(tenant, generation)`` of a generation index name; ``ValidationError`` for any
    other string. The name must be exactly what :func:`index_name` derives."""
    if not isinstance(name, str):
        raise ValidationError("index name must be a str")
    shown = ascii(name[:120])
    head = f"{PREFIX}-"
    rest = name[len(head) :] if name.startswith(head) else ""
    tenant, sep, gen = rest.rpartition(GENERATION_SEPARATOR)
    if not sep or not gen.isascii() or not gen.isdigit():
        raise ValidationError(f"{shown} is not a search generation index name (archive-<tenant>--<gen>)")
    try:
        generation = int(gen)
        derived = index_name(tenant, generation)
    except ValidationError:
        raise ValidationError(f"{shown} is not a search generation index name (archive-<tenant>--<gen>)") from None
    if derived != name:  # leading zeros and the like: one generation has exactly one name
        raise ValidationError(f"{shown} is not a canonical generation index name (expected {derived!r})")
    return tenant, generation


def check_index_of(tenant: str, name: str) -> int:
    """The generation of ``name``, which must be one of ``tenant``'s indices."""
    owner, generation = parse_index_name(name)
    if owner != check_tenant_id(tenant):
        raise ValidationError(f"index {name!r} does not belong to tenant {tenant!r}", resource=name)
    return generation
