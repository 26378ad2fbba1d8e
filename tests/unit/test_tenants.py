"""Tenant ids (one strict rule) and derived resource names (faults F12, F13)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive_kms.domain import tenants as t
from archive_kms.domain.tenants import TenantId
from archive_kms.errors import ValidationError

GOOD = ["acme", "a1b", "acme-eu", "x9-y8-z7", "abc", "a" * 32, "tenant-0042"]

BAD = {
    "empty": "",
    "star": "*",
    "dotdot": "..",
    "traversal": "tenant/../other",
    "slash": "a/b",
    "backslash": "a\\b",
    "uppercase": "Acme",
    "all-upper": "ACME",
    "too-long": "a" * 33,
    "very-long": "a" * 10_000,
    "too-short": "ab",
    "cyrillic-a": "\u0430cme",  # Cyrillic а looks like Latin a
    "fullwidth": "\uff41cme",
    "nfd-accent": "acme\u0301",
    "sql": "acme';drop table t;--",
    "sql-comment": "acme--",
    "es-wildcard": "acme*",
    "es-multi": "acme,other",
    "es-exclude": "-acme",
    "es-hidden": ".acme",
    "es-underscore": "_all",
    "es-question": "ac?me",
    "es-pipe": "ac|me",
    "es-hash": "ac#me",
    "es-colon": "remote:acme",
    "space": "ac me",
    "tab": "ac\tme",
    "newline-suffix": "acme\n",
    "nul": "ac\x00me",
    "leading-hyphen": "-acme",
    "trailing-hyphen": "acme-",
    "double-hyphen": "ac--me",
    "leading-digit": "1acme",
    "all-digits": "12345",
    "ip-like": "10-0-0-1",  # starts with a digit
    "dot": "ac.me",
    "underscore": "ac_me",
    "percent": "ac%2fme",
    "bytes": b"acme",
    "int": 42,
    "none": None,
}


@pytest.mark.parametrize("value", GOOD)
def test_good_ids_are_accepted_unchanged(value):
    tid = TenantId(value)
    assert str(tid) == value and tid.value == value
    assert TenantId.of(tid) is tid and TenantId.of(value) == tid


@pytest.mark.parametrize("label", sorted(BAD))
def test_bad_ids_are_refused_naming_input_and_rule(label):
    value = BAD[label]
    with pytest.raises(ValidationError) as exc:
        TenantId(value)
    msg = str(exc.value)
    assert "invalid tenant id" in msg
    assert ascii(value)[:40] in msg  # the offending input, escaped so confusables show
    assert "ASCII lowercase" in msg or "3..32" in msg  # the rule


@pytest.mark.parametrize("label", sorted(BAD))
def test_every_derivation_refuses_bad_ids(label):
    value = BAD[label]
    for derive in (
        t.shared_s3_prefix,
        t.dedicated_s3_bucket_name,
        t.azure_container_name,
        t.azure_storage_account_name,
        t.es_alias_name,
        t.es_index_pattern,
        lambda v: t.es_index_name(v, 1),
    ):
        with pytest.raises(ValidationError):
            derive(value)


def test_uppercase_is_refused_not_merged():
    assert TenantId("acme") != TenantId.of("acme-eu")
    with pytest.raises(ValidationError, match="uppercase"):
        TenantId("Acme")


def test_confusable_error_shows_the_escape():
    with pytest.raises(ValidationError) as exc:
        TenantId("\u0430cme")
    assert "\\u0430" in str(exc.value) and "non-ASCII" in str(exc.value)


def test_error_message_is_bounded_for_huge_input():
    with pytest.raises(ValidationError) as exc:
        TenantId("a" * 100_000)
    assert len(str(exc.value)) < 400


def test_derived_names():
    tid = TenantId("acme-eu")
    assert t.shared_s3_prefix(tid) == "tenants/acme-eu/"
    assert t.dedicated_s3_bucket_name(tid) == "archive-kms-tenant-acme-eu"
    assert t.azure_container_name(tid) == "tenant-acme-eu"
    assert t.azure_container_name(tid, prefix="byok") == "byok-acme-eu"
    assert t.es_alias_name(tid) == "archive-acme-eu"
    assert t.es_index_name(tid, 3) == "archive-acme-eu--3"
    assert t.es_index_pattern(tid) == "archive-acme-eu--*"
    acct = t.azure_storage_account_name(tid)
    assert acct.startswith("akmsacmeeu") and len(acct) <= 24 and acct.isalnum() and acct.islower()


def test_one_tenant_names_never_match_another_tenants():
    # 'acme' generation 1 vs tenant 'acme-1' alias; 'acme' pattern vs tenant 'acme-eu'.
    assert t.es_index_name("acme", 1) != t.es_alias_name("acme-1")
    import fnmatch

    assert not fnmatch.fnmatch(t.es_index_name("acme-eu", 1), t.es_index_pattern("acme"))
    assert fnmatch.fnmatch(t.es_index_name("acme", 7), t.es_index_pattern("acme"))


def test_storage_account_names_do_not_collide_when_hyphens_are_stripped():
    assert t.azure_storage_account_name("ab-c") != t.azure_storage_account_name("a-bc")
    assert t.azure_storage_account_name("abc") != t.azure_storage_account_name("ab-c")
    long = "a" * 32
    assert len(t.azure_storage_account_name(long)) == 24


def test_storage_account_name_vectors():
    """Byte-exact (docs/storage-layout.md): prefix + id without hyphens, cut to fit +
    first 8 chars of lowercase base32(SHA-256(id))."""
    import base64
    import hashlib

    for tid, prefix in [("acme", "akms"), ("acme-eu", "akms"), ("a" * 32, "akms"), ("acme", ""), ("acme", "x" * 15)]:
        digest = base64.b32encode(hashlib.sha256(tid.encode()).digest()).decode().lower()[:8]
        room = 24 - len(prefix) - 8
        assert t.azure_storage_account_name(tid, prefix=prefix) == prefix + tid.replace("-", "")[:room] + digest
    assert t.azure_storage_account_name("acme-eu") == "akmsacmeeudrnn5pgr"


@given(st.from_regex(r"[a-z][a-z0-9]{0,7}(-[a-z0-9]{1,6}){0,3}", fullmatch=True).filter(lambda s: 3 <= len(s) <= 32))
def test_a_tenant_account_name_belongs_to_its_tenant_whatever_the_prefix(value):
    for prefix in ("", "akms", "prodeu1", "x" * 15):
        name = t.azure_storage_account_name(value, prefix=prefix)
        assert t.check_tenant_account_name(value, name) == name
        other = value + "x" if len(value) < 32 else value[:-1] + "q"
        with pytest.raises(ValidationError, match="is not tenant"):
            t.check_tenant_account_name(other, name)


def test_platform_accounts_are_not_tenant_accounts():
    for name in ("devstoreaccount1", "akmsshared0123456789", "akmsacmeaaaaaaaa"):
        with pytest.raises(ValidationError):
            t.check_tenant_account_name("acme", name)


@given(st.from_regex(r"[a-z][a-z0-9]{0,7}(-[a-z0-9]{1,6}){0,3}", fullmatch=True).filter(lambda s: 3 <= len(s) <= 32))
def test_every_valid_id_derives_valid_names(value):
    tid = TenantId(value)
    t.check_s3_key_prefix(t.shared_s3_prefix(tid))
    t.check_azure_container_name(t.azure_container_name(tid))
    t.check_azure_account_name(t.azure_storage_account_name(tid))
    t.check_es_index_name(t.es_index_name(tid, 1))
    # Bucket names may still hit a reserved suffix; that must be a clear ValidationError.
    try:
        t.check_s3_bucket_name(t.dedicated_s3_bucket_name(tid))
    except ValidationError as exc:
        assert "reserved suffix" in str(exc)


def test_reserved_bucket_suffix_is_a_clear_error():
    with pytest.raises(ValidationError, match="reserved suffix '-s3alias'"):
        t.dedicated_s3_bucket_name("shop-s3alias")


@pytest.mark.parametrize("generation", [0, -1, True, 1.5, "1", 10**10])
def test_bad_generation(generation):
    with pytest.raises(ValidationError, match="index generation"):
        t.es_index_name("acme", generation)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("abc", True),
        ("a" * 63, True),
        ("my-bucket-1", True),
        ("ab", False),
        ("a" * 64, False),
        ("My-bucket", False),
        ("-abc", False),
        ("abc-", False),
        ("a..b", False),
        ("a.b", False),
        ("192.168.1.1", False),
        ("xn--abc", False),
        ("sthree-x", False),
        ("amzn-s3-demo-x", False),
        ("abc-s3alias", False),
        ("abc--ol-s3", False),
        ("abc--x-s3", False),
        ("abc--table-s3", False),
        ("ab_c", False),
        ("ab c", False),
        ("abc\n", False),
    ],
)
def test_s3_bucket_rules(name, ok):
    if ok:
        assert t.check_s3_bucket_name(name) == name
    else:
        with pytest.raises(ValidationError, match="S3 bucket name"):
            t.check_s3_bucket_name(name)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("abc", True),
        ("a-b-c", True),
        ("a" * 63, True),
        ("1abc", True),
        ("ab", False),
        ("a" * 64, False),
        ("a--b", False),
        ("-ab", False),
        ("ab-", False),
        ("Abc", False),
        ("a_b", False),
        ("a.b", False),
        ("$root", False),
    ],
)
def test_azure_container_rules(name, ok):
    if ok:
        assert t.check_azure_container_name(name) == name
    else:
        with pytest.raises(ValidationError, match="Azure container name"):
            t.check_azure_container_name(name)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("abc", True),
        ("a1" * 12, True),
        ("ab", False),
        ("a" * 25, False),
        ("a-bc", False),
        ("Abc", False),
    ],
)
def test_azure_account_rules(name, ok):
    if ok:
        assert t.check_azure_account_name(name) == name
    else:
        with pytest.raises(ValidationError, match="Azure storage account name"):
            t.check_azure_account_name(name)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("archive-acme--1", True),
        ("a", True),
        ("a" * 255, True),
        ("", False),
        ("Archive", False),
        ("a b", False),
        ("a,b", False),
        ("a#b", False),
        ("a*", False),
        ("a?", False),
        ('a"', False),
        ("a<", False),
        ("a>", False),
        ("a|b", False),
        ("a/b", False),
        ("a\\b", False),
        ("a:b", False),
        ("-a", False),
        ("_a", False),
        ("+a", False),
        (".a", False),
        (".", False),
        ("..", False),
        ("a" * 256, False),
        ("\u0430", False),
    ],
)
def test_es_index_rules(name, ok):
    if ok:
        assert t.check_es_index_name(name) == name
    else:
        with pytest.raises(ValidationError, match="Elasticsearch index name"):
            t.check_es_index_name(name)


@pytest.mark.parametrize(
    "prefix, ok",
    [
        ("tenants/acme/", True),
        ("a/", True),
        ("", False),
        ("/", False),
        ("tenants//", False),
        ("../", False),
        ("./", False),
        ("tenants/acme", False),
        ("/tenants/", False),
        ("Tenants/", False),
    ],
)
def test_s3_prefix_rules(prefix, ok):
    if ok:
        assert t.check_s3_key_prefix(prefix) == prefix
    else:
        with pytest.raises(ValidationError, match="S3 key prefix"):
            t.check_s3_key_prefix(prefix)


def test_bad_platform_prefixes_are_caught_by_the_output_check():
    with pytest.raises(ValidationError, match="S3 bucket name"):
        t.dedicated_s3_bucket_name("acme", prefix="Bad_Prefix")
    with pytest.raises(ValidationError, match="S3 bucket name"):
        t.dedicated_s3_bucket_name("a" * 32, prefix="p" * 40)  # 73 chars
    with pytest.raises(ValidationError, match="Elasticsearch index name"):
        t.es_alias_name("acme", prefix="_archive")
    with pytest.raises(ValidationError, match="Azure storage account"):
        t.azure_storage_account_name("acme", prefix="a-b")
