"""Records → documents, the sealed display field, queries → term filters."""

from __future__ import annotations

import base64
import json

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.domain.records import AttachmentRef, Record
from archive_kms.errors import IntegrityError, ValidationError
from archive_kms.search import IndexMode, Query, build_document, derive_search_keys
from archive_kms.search.documents import (
    DISPLAY_PAD,
    MAX_FIELDS,
    compile_query,
    decode_hit,
    document_id,
    index_mapping,
    mapping_drift,
    open_display,
    seal_display,
)

KEYS = derive_search_keys(SecretBytes(bytes(range(32))), "acme")
REC = Record(
    "Account",
    "001Qz00000AbCdEFGH",
    {"Name": "Zanzibar Holdings", "City": "Wellington", "Revenue": 12.5},
    (AttachmentRef("a1", "Ledger.pdf", 10),),
)


def test_document_ids_are_deterministic_and_distinct():
    ids = {
        document_id("acme", REC, None),
        document_id("acme", REC, KEYS),
        document_id("globex", REC, None),
        document_id("acme", Record("Contact", REC.record_id, {}), None),
        document_id("acme", Record("Account", REC.record_id + "x", {}), None),
        document_id("acme", Record("Account", REC.record_id, {}, workspace_id="org-2"), None),
    }
    assert len(ids) == 6
    assert document_id("acme", REC, KEYS) == document_id("acme", Record("Account", REC.record_id, {}), KEYS)
    # Length-prefixing: shifting a boundary between parts changes the id.
    assert document_id("acme", Record("Ab", "c", {}), None) != document_id("acme", Record("A", "bc", {}), None)
    odd = Record("Account", '../../*?"#<>|, \\x', {})
    assert set(document_id("acme", odd, None)) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


def test_plaintext_document():
    doc = build_document(REC, tenant="acme", mode=IndexMode.PLAINTEXT, keys=None, version=3)
    assert doc.version == 3 and doc.doc_id == document_id("acme", REC, None)
    assert doc.source["object_type"] == "account" and doc.source["record_id"] == REC.record_id
    assert doc.source["tokens"] == sorted(doc.source["tokens"])
    assert {"w:zanzibar", "w:wellington", "f:city=wellington", "f:revenue=12.5", "w:ledger", "w:pdf"} <= set(
        doc.source["tokens"]
    )
    assert Record.from_json(doc.source["display"]) == REC
    assert "Zanzibar" not in repr(doc)  # documents may hold plaintext: repr shows field names only


def test_keyed_document_holds_only_tokens_and_ciphertext():
    doc = build_document(REC, tenant="acme", mode=IndexMode.KEYED, keys=KEYS)
    src = doc.source
    assert src["object_type"] == KEYS.keyed("t:account") and src["record_id"] == KEYS.keyed("r:" + REC.record_id)
    plain = build_document(REC, tenant="acme", mode=IndexMode.PLAINTEXT, keys=None).source["tokens"]
    assert src["tokens"] == sorted(KEYS.keyed(t) for t in plain)
    text = json.dumps(src).lower()
    for clear in ("zanzibar", "wellington", "ledger", "account", "001qz", "12.5"):
        assert clear not in text
    raw = base64.b64decode(src["display"])
    assert (len(raw) - 1 - 16 - 12 - 16) % DISPLAY_PAD == 0  # padded size class
    hit = decode_hit(
        tenant="acme", mode=IndexMode.KEYED, keys=KEYS, index="archive-acme-1", doc_id=doc.doc_id, source=src
    )
    assert (hit.record_id, dict(hit.fields), hit.attachments) == (REC.record_id, dict(REC.fields), REC.attachments)


def test_sealing_is_randomised():
    a = build_document(REC, tenant="acme", mode=IndexMode.KEYED, keys=KEYS)
    b = build_document(REC, tenant="acme", mode=IndexMode.KEYED, keys=KEYS)
    assert a.doc_id == b.doc_id and a.source["tokens"] == b.source["tokens"]
    assert a.source["display"] != b.source["display"]


def test_every_single_byte_change_of_a_display_field_is_rejected():
    doc_id = document_id("acme", REC, KEYS)
    raw = bytearray(base64.b64decode(seal_display(REC.to_json(), tenant="acme", doc_id=doc_id, keys=KEYS)))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_display(base64.b64encode(tampered).decode(), tenant="acme", doc_id=doc_id, keys=KEYS)
    for cut in (0, 1, 28, len(raw) - 1):
        with pytest.raises(IntegrityError):
            open_display(base64.b64encode(raw[:cut]).decode(), tenant="acme", doc_id=doc_id, keys=KEYS)
    with pytest.raises(IntegrityError):
        open_display("not base64!", tenant="acme", doc_id=doc_id, keys=KEYS)


def test_display_is_bound_to_tenant_document_and_key():
    doc = build_document(REC, tenant="acme", mode=IndexMode.KEYED, keys=KEYS)
    blob = doc.source["display"]
    with pytest.raises(IntegrityError):
        open_display(blob, tenant="acme", doc_id="another-doc", keys=KEYS)
    globex = derive_search_keys(SecretBytes(bytes(range(32))), "globex")
    with pytest.raises(IntegrityError):
        open_display(blob, tenant="globex", doc_id=doc.doc_id, keys=globex)
    rotated = derive_search_keys(SecretBytes(bytes(32)), "acme")
    with pytest.raises(IntegrityError):
        open_display(blob, tenant="acme", doc_id=doc.doc_id, keys=rotated)
    # Plaintext mode: a display field that belongs to another record is refused too.
    other = build_document(
        Record("Account", "002", {"Name": "Other"}), tenant="acme", mode=IndexMode.PLAINTEXT, keys=None
    )
    with pytest.raises(IntegrityError):
        decode_hit(
            tenant="acme",
            mode=IndexMode.PLAINTEXT,
            keys=None,
            index="archive-acme-1",
            doc_id=document_id("acme", REC, None),
            source=other.source,
        )
    for bad in ({}, {"display": 5}, {"display": "[1, 2]"}, {"display": "{"}):
        with pytest.raises(IntegrityError):
            decode_hit(
                tenant="acme", mode=IndexMode.PLAINTEXT, keys=None, index="archive-acme-1", doc_id="x", source=bad
            )


@pytest.mark.parametrize(
    "record",
    [
        Record("Account", "1", {f"F{i}": "x" for i in range(MAX_FIELDS + 1)}),
        Record("Account", "1", {"Body": "x" * 131_073}),
        Record("Account", "1", {"bad name": "x"}),
        Record("Account", "1", {"Nested": {"a": 1}}),  # type: ignore[dict-item]
        Record("Account", "1", {"List": [1, 2]}),  # type: ignore[dict-item]
        Record("Account", "1", {"Amount": float("nan")}),
        Record("Bad Type", "1", {}),
        Record("Account", "", {}),
        Record("Account", "id\nwith-newline", {}),
        Record("Account", "x" * 256, {}),
        Record("Account", "1", {"Body": " ".join(f"w{i}" for i in range(20_001))}),  # too many distinct terms
    ],
)
def test_poisoned_records_are_refused(record):
    for mode, keys in ((IndexMode.PLAINTEXT, None), (IndexMode.KEYED, KEYS)):
        with pytest.raises(ValidationError):
            build_document(record, tenant="acme", mode=mode, keys=keys)


def test_mode_and_keys_must_agree():
    with pytest.raises(ValidationError):
        build_document(REC, tenant="acme", mode=IndexMode.KEYED, keys=None)
    with pytest.raises(ValidationError):
        build_document(REC, tenant="acme", mode=IndexMode.PLAINTEXT, keys=KEYS)
    with pytest.raises(ValidationError):
        build_document(REC, tenant="globex", mode=IndexMode.KEYED, keys=KEYS)
    with pytest.raises(ValidationError):
        build_document(REC, tenant="acme", mode=IndexMode.PLAINTEXT, keys=None, version=-1)


def test_compile_query():
    q = Query("Zanzibar  holdings!", filters={"City": "WELLINGTON"}, object_type="Account", limit=5)
    plain = compile_query("acme", q, mode=IndexMode.PLAINTEXT, keys=None)
    assert plain.limit == 5
    assert plain.terms == (
        ("object_type", "account"),
        ("tokens", "f:city=wellington"),
        ("tokens", "w:holdings"),
        ("tokens", "w:zanzibar"),
    )
    keyed = compile_query("acme", q, mode=IndexMode.KEYED, keys=KEYS)
    assert keyed.terms == tuple((f, KEYS.keyed(v if f == "tokens" else "t:" + v)) for f, v in plain.terms)
    assert compile_query("acme", Query(), mode=IndexMode.PLAINTEXT, keys=None).terms == ()
    assert "Zanzibar" not in repr(q) and "WELLINGTON" not in repr(q)


@pytest.mark.parametrize(
    "query",
    [
        Query("?!"),  # text without words would otherwise match everything
        Query(filters={"Note": "x" * 300}),
        Query(filters={"Note": None}),
        Query(filters={"bad name": "x"}),
        Query(object_type="not a type"),
        Query(limit=0),
        Query(limit=1001),
        Query(" ".join(f"w{i}" for i in range(65))),
    ],
)
def test_bad_queries_are_refused(query):
    with pytest.raises(ValidationError):
        compile_query("acme", query, mode=IndexMode.PLAINTEXT, keys=None)


def test_mapping_is_strict_and_drift_is_detected():
    m = index_mapping("acme", 1, IndexMode.KEYED)
    assert m["dynamic"] == "strict"
    assert m["properties"]["display"] == {"type": "keyword", "index": False, "doc_values": False}
    assert mapping_drift(m, m) == []
    completed = {**m, "_meta": {"archive_kms": {**m["_meta"]["archive_kms"], "completed_records": 5}}}
    assert mapping_drift(completed, m) == []
    assert mapping_drift(index_mapping("acme", 1, IndexMode.PLAINTEXT), m)
    assert mapping_drift({**m, "dynamic": True}, m)
    assert mapping_drift({**m, "properties": {**m["properties"], "extra": {"type": "text"}}}, m)
