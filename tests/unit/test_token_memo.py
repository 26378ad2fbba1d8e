"""A rebuild's token memo (search/tokens.py TokenMemo): the same documents as without it,
bounded, bound to one SearchKeys, and useless once the keys are wiped."""

from __future__ import annotations

import pytest

from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError
from archive_kms.search import documents as D
from archive_kms.search.port import IndexMode
from archive_kms.search.tokens import TokenMemo, derive_search_keys
from archive_kms.synthetic import generate_records

TENANT = "memo-tenant"


def _keys():
    return derive_search_keys(SecretBytes.random(32), TENANT)


def _searchable(doc):
    return doc.doc_id, {k: v for k, v in doc.source.items() if k != "display"}


def test_documents_built_with_a_memo_are_the_same_and_open_alike() -> None:
    keys = _keys()
    memo = TokenMemo(keys, max_entries=50)  # small: some terms are computed every time
    records = [r for r, _ in generate_records(TENANT, 200, seed=5, workspaces=2)]
    for record in records:
        plain = D.build_document(record, tenant=TENANT, mode=IndexMode.KEYED, keys=keys)
        memoed = D.build_document(record, tenant=TENANT, mode=IndexMode.KEYED, keys=keys, memo=memo)
        assert _searchable(memoed) == _searchable(plain)
        opened = D.open_display(memoed.source["display"], tenant=TENANT, doc_id=memoed.doc_id, keys=keys)
        assert opened.rstrip(b" ") == record.to_json()
    assert len(memo) == 50


def test_a_memo_answers_only_for_its_own_keys() -> None:
    keys, other = _keys(), _keys()
    record = next(iter(generate_records(TENANT, 1, seed=5)))[0]
    with pytest.raises(ValidationError, match="only with the SearchKeys it was made for"):
        D.build_document(record, tenant=TENANT, mode=IndexMode.KEYED, keys=other, memo=TokenMemo(keys))
    with pytest.raises(ValidationError, match="only with the SearchKeys it was made for"):
        D.build_document(record, tenant=TENANT, mode=IndexMode.PLAINTEXT, keys=None, memo=TokenMemo(keys))


def test_wiped_keys_make_their_memo_raise_even_for_known_terms() -> None:
    keys = _keys()
    memo = TokenMemo(keys)
    token = memo.keyed("w:acme")
    assert memo.keyed("w:acme") == token == keys.keyed("w:acme")
    keys.wipe()
    with pytest.raises(ValidationError, match="wiped"):
        memo.keyed("w:acme")


def test_a_memo_never_shows_its_terms() -> None:
    memo = TokenMemo(_keys())
    memo.keyed("w:secretword")
    assert "secretword" not in repr(memo) and "secretword" not in str(memo)
