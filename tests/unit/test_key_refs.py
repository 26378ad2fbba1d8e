"""Key references (keys/refs.py): good references parse to a canonical value, bad ones fail
with a ValidationError that says what to fix; the wrap context rules (keys/context.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive_kms.errors import ValidationError
from archive_kms.keys.context import canonical_context, check_context, context_tag
from archive_kms.keys.refs import (
    AwsKmsKeyRef,
    AzureKeyVaultKeyRef,
    KmipKeyRef,
    ManagedKeyRef,
    MemoryKeyRef,
    parse_key_ref,
)

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
MRK = "mrk-1234abcd12ab34cd56ef1234567890ab"
VERSION = "0123456789abcdef0123456789abcdef"

GOOD = [
    (
        f"aws-kms://arn:aws:kms:us-east-1:111122223333:key/{KEY_ID}",
        AwsKmsKeyRef(partition="aws", region="us-east-1", account="111122223333", key_id=KEY_ID),
    ),
    (
        f"aws-kms://arn:aws:kms:eu-central-1:111122223333:key/{MRK}",
        AwsKmsKeyRef(partition="aws", region="eu-central-1", account="111122223333", key_id=MRK),
    ),
    (
        f"aws-kms://arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/{KEY_ID}",
        AwsKmsKeyRef(partition="aws-us-gov", region="us-gov-west-1", account="111122223333", key_id=KEY_ID),
    ),
    (
        "aws-kms://arn:aws-cn:kms:cn-north-1:111122223333:alias/tenant/acme",
        AwsKmsKeyRef(partition="aws-cn", region="cn-north-1", account="111122223333", alias="alias/tenant/acme"),
    ),
    ("aws-kms://alias/archive_kms-Acme-1", AwsKmsKeyRef(alias="alias/archive_kms-Acme-1")),
    (
        "azure-kv://myvault.vault.azure.net/keys/acme-l1",
        AzureKeyVaultKeyRef(host="myvault.vault.azure.net", name="acme-l1"),
    ),
    (
        f"azure-kv://myvault.vault.azure.net/keys/Acme-L1/{VERSION}",
        AzureKeyVaultKeyRef(host="myvault.vault.azure.net", name="Acme-L1", version=VERSION),
    ),
    ("azure-kv://localhost:8443/keys/k", AzureKeyVaultKeyRef(host="localhost", name="k", port=8443)),
    ("azure-kv://127.0.0.1:8443/keys/k", AzureKeyVaultKeyRef(host="127.0.0.1", name="k", port=8443)),
    ("kmip://hsm.example.com:5696/42", KmipKeyRef(host="hsm.example.com", port=5696, uid="42")),
    (
        "kmip://10.0.0.7:5696/3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        KmipKeyRef(host="10.0.0.7", port=5696, uid="3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
    ),
    ("kmip://[::1]:5696/7", KmipKeyRef(host="::1", port=5696, uid="7")),
    ("managed://platform", ManagedKeyRef()),
    ("managed://eu-1", ManagedKeyRef(name="eu-1")),
    ("memory://acme-l1", MemoryKeyRef(name="acme-l1")),
    ("memory://acme-l1/3", MemoryKeyRef(name="acme-l1", version=3)),
]


@pytest.mark.parametrize("text,expected", GOOD, ids=[g[0][:60] for g in GOOD])
def test_good_references_parse_to_canonical_values(text: str, expected) -> None:
    ref = parse_key_ref(text)
    assert ref == expected
    assert ref.uri == text and str(ref) == text
    assert parse_key_ref(ref.uri) == ref
    assert parse_key_ref(ref) is ref


def test_canonical_forms() -> None:
    assert parse_key_ref("azure-kv://v.vault.azure.net:443/keys/k").uri == "azure-kv://v.vault.azure.net/keys/k"
    kv = parse_key_ref(f"azure-kv://localhost:8443/keys/k/{VERSION}")
    assert kv.vault_url == "https://localhost:8443"
    assert kv.key_id == f"https://localhost:8443/keys/k/{VERSION}"
    assert kv.with_version(None).uri == "azure-kv://localhost:8443/keys/k"
    assert kv.same_key(parse_key_ref("azure-kv://localhost:8443/keys/K"))
    assert not kv.same_key(parse_key_ref("azure-kv://localhost:8444/keys/k"))
    aws = parse_key_ref(f"aws-kms://arn:aws:kms:us-east-1:111122223333:key/{KEY_ID}")
    assert aws.api_key_id == f"arn:aws:kms:us-east-1:111122223333:key/{KEY_ID}" and aws.is_key_arn
    assert parse_key_ref("aws-kms://alias/x").api_key_id == "alias/x"
    assert ManagedKeyRef().alias == "alias/archive-kms-managed"
    assert ManagedKeyRef("eu").alias == "alias/archive-kms-managed-eu"
    assert parse_key_ref("kmip://[::1]:5696/7").uri == "kmip://[::1]:5696/7"


BAD = [
    ("", "empty"),
    ("alias/foo", "scheme is missing"),
    (f"arn:aws:kms:us-east-1:111122223333:key/{KEY_ID}", "write aws-kms://"),
    ("s3://bucket/key", "unknown scheme 's3'"),
    ("AWS-KMS://alias/x", "unknown scheme"),
    ("aws-kms:// alias/x", "whitespace"),
    ("aws-kms://alias/x\n", "control"),
    ("aws-kms://alias/caf\u00e9", "non-ASCII"),
    ("aws-kms://alias/x?region=eu-west-1", "query"),
    ("aws-kms://alias/x#frag", "fragment"),
    ("aws-kms://alias/x%2F", "percent"),
    ("kmip://user:pw@hsm:5696/1", "credentials"),
    ("aws-kms://" + "a" * 3000, "limit is 2048"),
    (f"aws-kms://{KEY_ID}", "bare key id"),
    ("aws-kms://key/abc", "key ARN, an alias ARN or alias/NAME"),
    ("aws-kms://alias/", "alias name"),
    ("aws-kms://alias/has space", "whitespace"),
    ("aws-kms://alias/aws/s3", "AWS managed keys"),
    ("aws-kms://alias/" + "a" * 251, "alias name"),
    (f"aws-kms://arn:aws:kms:us-east-1:111122223333:key/{KEY_ID.upper()}", "lowercase"),
    ("aws-kms://arn:aws:kms:us-east-1:111122223333:key/not-a-uuid", "UUID"),
    (f"aws-kms://arn:aws:kms:us-east-1:11112222333:key/{KEY_ID}", "12 digits"),
    (f"aws-kms://arn:aws:kms:useast1:111122223333:key/{KEY_ID}", "region"),
    (f"aws-kms://arn:aws:kms:US-EAST-1:111122223333:key/{KEY_ID}", "region"),
    (f"aws-kms://arn:aws:s3:us-east-1:111122223333:key/{KEY_ID}", "not 'kms'"),
    (f"aws-kms://arn:amazon:kms:us-east-1:111122223333:key/{KEY_ID}", "partition"),
    ("aws-kms://arn:aws:kms:us-east-1:111122223333", "six"),
    ("aws-kms://arn:aws:kms:us-east-1:111122223333:grant/x", "key/KEY-ID or alias/NAME"),
    ("https://myvault.vault.azure.net/keys/k", "azure-kv:// scheme"),
    ("azure-kv://myvault.vault.azure.net", "/keys/NAME is missing"),
    ("azure-kv://myvault.vault.azure.net/secrets/k", "/keys/NAME"),
    ("azure-kv://myvault.vault.azure.net/keys/", "key name"),
    ("azure-kv://myvault.vault.azure.net/keys/bad_name", "key name"),
    ("azure-kv://myvault.vault.azure.net/keys/k/v1", "32 lowercase hex"),
    (f"azure-kv://myvault.vault.azure.net/keys/k/{VERSION.upper()}", "32 lowercase hex"),
    (f"azure-kv://myvault.vault.azure.net/keys/k/{VERSION}/extra", "/keys/NAME/VERSION"),
    ("azure-kv://MyVault.vault.azure.net/keys/k", "lowercase"),
    ("azure-kv://-vault.azure.net/keys/k", "DNS host name"),
    ("azure-kv://vault..azure.net/keys/k", "DNS host name"),
    ("azure-kv://01.2.3.4/keys/k", "IPv4"),
    ("azure-kv://:8443/keys/k", "host is missing"),
    ("azure-kv://localhost:0/keys/k", "1 to 65535"),
    ("azure-kv://localhost:65536/keys/k", "1 to 65535"),
    ("azure-kv://localhost:08443/keys/k", "leading zeros"),
    ("azure-kv://localhost:https/keys/k", "1 to 65535"),
    ("kmip://hsm.example.com/42", "port is missing"),
    ("kmip://hsm.example.com:5696", "UID"),
    ("kmip://hsm.example.com:5696/", "UID"),
    ("kmip://hsm.example.com:5696/a/b", "no '/'"),
    ("kmip://[zz::1]:5696/1", "IPv6"),
    ("kmip://[::1:5696/1", "IPv6"),
    ("managed://", "name"),
    ("managed://Platform", "lowercase"),
    ("managed://eu-", "name"),
    ("managed://1eu", "starting with a letter"),
    ("memory://k/0", "positive integer"),
    ("memory://k/v1", "positive integer"),
]


@pytest.mark.parametrize("text,fix", BAD, ids=[b[0][:50] or "empty" for b in BAD])
def test_bad_references_say_what_to_fix(text: str, fix: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_key_ref(text)
    message = str(info.value)
    assert message.startswith("invalid key reference ")
    assert fix in message, message
    assert "expected" in message
    assert "\n" not in message  # control characters are shown escaped
    assert len(message) < 700


def test_non_strings_are_refused() -> None:
    with pytest.raises(ValidationError, match="must be a str"):
        parse_key_ref(b"aws-kms://alias/x")  # type: ignore[arg-type]


def test_refs_are_frozen_and_hashable() -> None:
    ref = parse_key_ref("kmip://hsm:5696/1")
    with pytest.raises(AttributeError):
        ref.uid = "2"  # type: ignore[misc]
    assert len({ref, parse_key_ref("kmip://hsm:5696/1")}) == 1


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=120) | st.from_regex(r"(aws-kms|azure-kv|kmip|managed|memory)://[ -~]{0,80}"))
def test_parser_never_fails_any_other_way_and_canonical_form_is_stable(text: str) -> None:
    try:
        ref = parse_key_ref(text)
    except ValidationError:
        return
    assert parse_key_ref(ref.uri) == ref
    assert ref.uri.isascii() and ref.uri.isprintable()


# --- wrap context ------------------------------------------------------------------------


def test_canonical_context_is_order_free_and_injective() -> None:
    a = canonical_context({"tenant": "acme", "purpose": "l2"})
    assert a == canonical_context({"purpose": "l2", "tenant": "acme"})
    assert a == b'{"purpose":"l2","tenant":"acme"}'
    assert canonical_context({"tenant": 'a","b":"c'}) != canonical_context({"tenant": "a", "b": "c"})
    assert canonical_context({"tenant": "\u00e9"}) == '{"tenant":"\u00e9"}'.encode()
    assert context_tag({"tenant": "a"}, b"x") != context_tag({"tenant": "a"}, b"y")
    assert len(context_tag({"tenant": "a"}, b"x")) == 16


@pytest.mark.parametrize(
    "context,fix",
    [
        ({}, "must name the tenant"),
        ({"purpose": "l2"}, "must name the tenant"),
        ([("tenant", "a")], "mapping"),
        ({"tenant": 1}, "must be str"),
        ({"tenant": ""}, "1..256"),
        ({"tenant": "a\nb"}, "printable"),
        ({"tenant": "a" * 257}, "1..256"),
        ({"tenant": "a", "": "x"}, "1..64"),
        ({"tenant": "a", "awsRegion": "x"}, "reserved"),
        ({"tenant": "a", **{f"k{i}": "v" for i in range(16)}}, "at most 16"),
    ],
)
def test_bad_contexts_are_refused(context, fix: str) -> None:
    with pytest.raises(ValidationError, match=fix):
        check_context(context)


def test_replacement_ref_names_another_kmip_object_only() -> None:
    from archive_kms.errors import ValidationError
    from archive_kms.keys.refs import replacement_ref

    assert replacement_ref("kmip://hsm.example:5696/41", "57") == "kmip://hsm.example:5696/57"
    assert replacement_ref("kmip://hsm.example:5696/41", "41") is None
    assert replacement_ref("kmip://hsm.example:5696/41", None) is None
    arn = "aws-kms://arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert replacement_ref(arn, "f" * 64) is None  # a KMS version is key material of the same key
    with pytest.raises(ValidationError):
        replacement_ref("kmip://hsm.example:5696/41", "../etc")
