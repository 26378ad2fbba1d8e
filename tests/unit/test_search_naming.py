"""Tenant ids and index/alias names (faults.md F12, F13)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive_kms.errors import ValidationError
from archive_kms.search.naming import (
    alias_name,
    check_index_of,
    check_tenant_id,
    index_name,
    index_pattern,
    parse_index_name,
)

GOOD = ["acme", "acme-corp", "acme-1", "t0a", "org-eu-west", "a" + "b" * 31]
BAD = [
    "",
    "*",
    "..",
    "tenant/../other",
    "Acme",
    "ACME",
    "acme_corp",
    "acme corp",
    "acme,b",
    "acme#1",
    "acme|x",
    "acme\\x",
    'acme"',
    "acme<",
    "acme?",
    "acme:1",
    "-acme",
    "acme-",
    "a--b",
    "_acme",
    "+acme",
    "a" * 33,
    "ａcme",
    "аcme",  # full-width a, Cyrillic а (confusables)
    "acme\n",
    "acme\x00",
    "ab",
    "12345",
    "1acme",
    "acme.b",
    "*acme*",
    "_all",
    None,
    5,
]


@pytest.mark.parametrize("tenant", GOOD)
def test_good_tenant_ids(tenant):
    assert check_tenant_id(tenant) == tenant
    assert parse_index_name(index_name(tenant, 7)) == (tenant, 7)


@pytest.mark.parametrize("tenant", BAD)
def test_bad_tenant_ids_are_refused_before_any_name_is_built(tenant):
    with pytest.raises(ValidationError):
        check_tenant_id(tenant)
    with pytest.raises(ValidationError):
        alias_name(tenant)
    with pytest.raises(ValidationError):
        index_name(tenant, 1)


@pytest.mark.parametrize("gen", [0, -1, 1_000_000_001, True, 1.0, "1"])
def test_bad_generations(gen):
    with pytest.raises(ValidationError):
        index_name("acme", gen)


@pytest.mark.parametrize(
    "name",
    [
        "archive-acme",
        "archive-acme--0",
        "archive-acme--01",
        "archive-acme--x",
        "archive-*--1",
        "*",
        "_all",
        "archive-acme--1,archive-other--1",
        "archive-Acme--1",
        "other-acme--1",
        "archive---1",
        "archive-acme-1",
        "archive-acme--1--2",
        "archive-acme--１",
        "archive-ab--1",
        5,
        None,
    ],
)
def test_only_generation_names_parse(name):
    with pytest.raises(ValidationError):
        parse_index_name(name)


def test_index_must_belong_to_the_tenant():
    assert check_index_of("acme-corp", "archive-acme-corp--3") == 3
    with pytest.raises(ValidationError):
        check_index_of("acme", "archive-acme-corp--3")
    assert index_pattern("acme") == "archive-acme--*"  # never matches acme-corp's indices


# ES index name rules (F13): lowercase, no \ / * ? " < > | space , # :, no leading - _ +, <= 255 bytes.
_ES_NAME = re.compile(r'[^-_+][^A-Z\\/*?"<>| ,#:]*')

_segment = st.text("abcxyz0189", min_size=1, max_size=6)
tenants = (
    st.lists(_segment, min_size=1, max_size=4)
    .map(lambda segs: "t" + "-".join(segs))
    .filter(lambda t: 3 <= len(t) <= 32)
)


@given(tenants, tenants, st.integers(1, 10**9))
def test_an_alias_never_equals_another_index_and_names_are_valid(a, b, gen):
    assert alias_name(a) != index_name(b, gen)
    for name in (alias_name(a), index_name(b, gen)):
        assert _ES_NAME.fullmatch(name) and len(name.encode()) <= 255
    assert parse_index_name(index_name(b, gen)) == (b, gen)
    assert not index_name(b, gen).startswith(alias_name(a) + "--") or a == b  # no cross-tenant prefix match
