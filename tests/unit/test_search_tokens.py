"""Tokenizer, keyed tokens and search-key derivation; search keys never shown."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import logging
import pickle
import unicodedata

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.records import Record
from archive_kms.errors import IntegrityError, ValidationError
from archive_kms.search import IndexMode, Query, build_document
from archive_kms.search.documents import compile_query, decode_hit, open_display
from archive_kms.search.memory import MemorySearchIndex
from archive_kms.search.tokens import (
    MAX_WORD_CHARS,
    SearchKeys,
    derive_search_keys,
    field_term,
    normalize,
    value_terms,
    value_text,
    word_terms,
    words,
)

TENANT_KEY = bytes(range(32))


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Acme Corp.", ["acme", "corp"]),
        ("greta.mueller@example.org", ["greta", "mueller", "example", "org"]),
        ("O'Brien-Smith", ["o", "brien", "smith"]),
        ("snake_case_name", ["snake", "case", "name"]),  # the underscore separates words
        ("ＡＣＭＥ　ｃｏｒｐ", ["acme", "corp"]),  # full-width letters and space (NFKC)
        ("Straße", ["strasse"]),  # casefold, not lower()
        ("Müller", ["müller"]),  # no accent folding: "muller" is another word
        ("ﬁnance", ["finance"]),  # ligature
        ("Invoice #2024-001", ["invoice", "2024", "001"]),
        ("日本語 テキスト", ["日本語", "テキスト"]),
        ("!!! ... ---", []),
        ("", []),
    ],
)
def test_words(text, expected):
    assert words(text) == expected


def test_long_words_are_cut_identically_in_documents_and_queries():
    long = "x" * 200
    assert words(long) == ["x" * MAX_WORD_CHARS]
    assert word_terms(long + "yyy") == word_terms(long)  # prefix-equal long words collide, by design


@pytest.mark.parametrize(
    "value, text",
    [
        (None, None),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (-7, "-7"),
        (1.0, "1"),
        (2.5, "2.5"),
        ("x", "x"),
    ],
)
def test_value_text(value, text):
    assert value_text(value) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [1], {"a": 1}, b"bytes", object()])
def test_value_text_rejects_non_scalars(bad):
    with pytest.raises(ValidationError):
        value_text(bad)


def test_field_terms_normalise_name_value_and_whitespace():
    assert field_term("BillingCity", "  New\tYORK  ") == "f:billingcity=new york"
    assert field_term("billingcity", "new york") == field_term("BillingCity", "NEW YORK")
    assert field_term("Amount", 10) == field_term("Amount", 10.0) == "f:amount=10"
    assert field_term("Note", None) is None
    assert field_term("Note", "   ") is None
    assert field_term("Note", "a" * 257) is None  # long values: words only
    assert field_term("Note", "a" * 256) == "f:note=" + "a" * 256
    for bad in ("bad name", "1st", "a=b", "", "x" * 81, "über"):
        with pytest.raises(ValidationError):
            field_term(bad, "v")


@given(st.text(max_size=200))
def test_normalize_is_idempotent_and_words_are_stable(text):
    assert normalize(normalize(text)) == normalize(text)
    assert words(normalize(text)) == words(text)
    assert all(w and len(w) <= MAX_WORD_CHARS and "_" not in w for w in words(text))


def _full_normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def test_the_ascii_shortcut_normalizes_every_ascii_character_as_the_unicode_path_does():
    every_ascii = "".join(chr(c) for c in range(128))
    assert normalize(every_ascii) == _full_normalize(every_ascii)
    for c in range(128):
        assert normalize(chr(c)) == _full_normalize(chr(c)), c


@given(st.one_of(st.text(max_size=200), st.text(alphabet=st.characters(max_codepoint=127), max_size=200)))
def test_normalize_equals_nfkc_casefold_nfkc(text):
    assert normalize(text) == _full_normalize(text)


@given(
    st.sampled_from(["Name", "Email__c", "a"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
)
def test_value_terms_are_the_word_and_exact_terms_of_the_value(field, value):
    text = value_text(value)
    expected = (set(), None) if text is None else (word_terms(text), field_term(field, value))
    assert value_terms(field, value) == expected


# --- keys and keyed tokens ---------------------------------------------------------------


def _hkdf(label: bytes, tenant: str) -> bytes:
    info = label + len(tenant).to_bytes(4, "big") + tenant.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(TENANT_KEY)


def test_derivation_and_keyed_token_match_an_independent_computation():
    keys = derive_search_keys(SecretBytes(TENANT_KEY), "acme")
    token_key = _hkdf(b"archive_kms/v1/search/token", "acme")
    display_key = _hkdf(b"archive_kms/v1/search/display", "acme")
    assert token_key != display_key
    expected = base64.urlsafe_b64encode(hmac.new(token_key, b"w:invoice", hashlib.sha256).digest()[:16])
    assert keys.keyed("w:invoice") == expected.rstrip(b"=").decode()
    assert len(keys.keyed("w:invoice")) == 22
    assert keys.display_key_material() == SecretBytes(display_key)


def test_keyed_tokens_are_deterministic_and_bound_to_key_and_tenant():
    a1 = derive_search_keys(SecretBytes(TENANT_KEY), "acme")
    a2 = derive_search_keys(SecretBytes(TENANT_KEY), "acme")
    other_tenant = derive_search_keys(SecretBytes(TENANT_KEY), "globex")
    rotated = derive_search_keys(SecretBytes(bytes(32)), "acme")
    t = "w:invoice"
    assert a1.keyed(t) == a2.keyed(t)
    assert len({a1.keyed(t), other_tenant.keyed(t), rotated.keyed(t)}) == 3
    assert a1.keyed("w:invoice") != a1.keyed("w:invoices")
    assert a1.keyed_all(["w:b", "w:a", "w:b"]) == sorted({a1.keyed("w:a"), a1.keyed("w:b")})


def test_derivation_validates_inputs():
    with pytest.raises(TypeError):
        derive_search_keys(TENANT_KEY, "acme")  # raw bytes are refused: keys travel as SecretBytes
    with pytest.raises(ValidationError):
        derive_search_keys(SecretBytes(b"short"), "acme")
    with pytest.raises(ValidationError):
        derive_search_keys(SecretBytes(TENANT_KEY), "ACME")
    with pytest.raises(ValidationError):
        SearchKeys("acme", SecretBytes(TENANT_KEY), SecretBytes(TENANT_KEY))  # same key twice


# --- secrecy -----------------------------------------------------------------------------


def _key_spellings(keys_bytes: list[bytes]) -> list[str]:
    out = []
    for k in keys_bytes:
        out += [k.hex(), base64.b64encode(k).decode(), base64.urlsafe_b64encode(k).decode().rstrip("="), repr(k)]
    return out


def test_search_keys_never_appear_in_repr_errors_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    keys = derive_search_keys(SecretBytes(TENANT_KEY), "acme")
    spellings = _key_spellings(
        [TENANT_KEY, _hkdf(b"archive_kms/v1/search/token", "acme"), _hkdf(b"archive_kms/v1/search/display", "acme")]
    )
    texts = [repr(keys), str(keys), f"{keys}", repr(keys.display_key_material())]

    with pytest.raises(TypeError) as e1:
        pickle.dumps(keys)
    with pytest.raises(TypeError) as e2:
        copy.deepcopy(keys)
    texts += [str(e1.value), str(e2.value)]

    # Error paths that handle the keys: wrong tenant, tampered display, wrong mode.
    rec = Record("Account", "001", {"Name": "Acme"})
    doc = build_document(rec, tenant="acme", mode=IndexMode.KEYED, keys=keys)
    for call in (
        lambda: build_document(rec, tenant="globex", mode=IndexMode.KEYED, keys=keys),
        lambda: open_display(doc.source["display"][:-4] + "AAAA", tenant="acme", doc_id=doc.doc_id, keys=keys),
        lambda: compile_query("acme", Query("x"), mode=IndexMode.PLAINTEXT, keys=keys),
        lambda: decode_hit(
            tenant="acme", mode=IndexMode.KEYED, keys=keys, index="archive-acme-1", doc_id="other", source=doc.source
        ),
    ):
        with pytest.raises((ValidationError, IntegrityError)) as err:
            call()
        texts += [str(err.value), repr(err.value)]

    # A search that meets a tampered document logs and reports, still without keys.
    idx = MemorySearchIndex()
    name = idx.create_generation("acme", 1, IndexMode.KEYED)
    idx.bulk_index(name, [doc], refresh=True)
    idx.swap_alias("acme", name, expected_current=None)
    entry = idx._indices[name].live[doc.doc_id]
    sealed = bytearray(base64.b64decode(entry[1]["display"]))
    sealed[-1] ^= 0x01  # flip one tag bit: always a real change, unlike re-spelling base64 characters
    tampered = base64.b64encode(bytes(sealed)).decode()
    idx._indices[name].live[doc.doc_id] = (entry[0], {**entry[1], "display": tampered})
    idx._indices[name].dirty.add(doc.doc_id)
    idx.refresh(name)
    res = idx.search("acme", Query("acme"), keys)
    assert res.hits == [] and len(res.failures) == 1
    texts += [repr(res), caplog.text]

    blob = "\n".join(texts)
    assert "acme" in blob  # the texts are real
    for s in spellings:
        assert s not in blob


def test_wiped_keys_refuse_use():
    keys = derive_search_keys(SecretBytes(TENANT_KEY), "acme")
    keys.wipe()
    with pytest.raises(ValidationError):
        keys.keyed("w:x")
    with pytest.raises(ValidationError):
        keys.display_key_material()
