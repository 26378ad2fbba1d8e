"""The search tokenizer and the keyed (HMAC) tokens of BYOK tenants' indices.

One tokenizer serves both index modes, so a query finds the same records whether the
tenant is managed (tokens stored in clear) or BYOK (tokens stored as HMACs), and the
in-memory index behaves exactly like Elasticsearch.

Plaintext tokens (the *term* before keying), with a kind prefix for domain separation:

* ``w:<word>`` – a word: NFKC + casefold, split on anything that is not a Unicode letter
  or digit, each word cut to :data:`MAX_WORD_CHARS` characters;
* ``f:<field>=<value>`` – an exact field value: field API name lowercased (names are
  ``[A-Za-z][A-Za-z0-9_]*``, so they never contain ``=``), value NFKC + casefold with
  whitespace runs collapsed; only for values up to :data:`MAX_EXACT_VALUE_CHARS`;
* ``t:<object type>`` and ``r:<record id>`` – stored in the ``object_type`` and
  ``record_id`` fields rather than in ``tokens``.

Keyed token = ``base64url(HMAC-SHA256(token_key, utf8(term))[:16])`` (22 characters).
The token key and the display key are derived from the tenant key (L2) by
:func:`derive_search_keys` with HKDF-SHA256 and distinct info labels bound to the tenant,
so a tenant-key rotation means new tokens, i.e. a new index generation.

This module holds key material only inside :class:`SearchKeys`, whose ``repr`` hides it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import struct
import unicodedata
from collections.abc import Iterable
from typing import NoReturn

from archive_kms.crypto.kdf import hkdf_sha256
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ValidationError
from archive_kms.search.naming import check_tenant_id

__all__ = [
    "MAX_EXACT_VALUE_CHARS",
    "MAX_WORD_CHARS",
    "TOKEN_BYTES",
    "SearchKeys",
    "derive_search_keys",
    "field_term",
    "normalize",
    "record_term",
    "type_term",
    "value_terms",
    "value_text",
    "word_terms",
    "words",
]

TOKEN_BYTES = 16  # 128-bit tokens: collisions are negligible within one tenant's vocabulary
MAX_WORD_CHARS = 64
MAX_EXACT_VALUE_CHARS = 256
KEY_SIZE = 32

_LABEL_TOKEN = b"archive_kms/v1/search/token"
_LABEL_DISPLAY = b"archive_kms/v1/search/display"
_U32 = struct.Struct(">I")

# A word is a run of Unicode letters and digits ("\w" minus the underscore).
_WORD_RE = re.compile(r"[^\W_]+")
_SPACE_RE = re.compile(r"\s+")
FIELD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")


def lp(data: bytes) -> bytes:
    """Length-prefixed bytes, for unambiguous concatenation in KDF info and AAD."""
    return _U32.pack(len(data)) + data


# --- tokenizer ---------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFKC, casefold, NFKC again (casefolding can denormalise), so "ＡＣＭＥ", "Acme"
    and "ACME" are one word."""
    if text.isascii():
        # The same result, cheaper: ASCII is NFKC-stable and its casefold is lower().
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def words(text: str) -> list[str]:
    """The words of ``text`` in order (duplicates kept), each cut to MAX_WORD_CHARS."""
    return _words_of_normalized(normalize(text))


def _words_of_normalized(norm: str) -> list[str]:
    return [w[:MAX_WORD_CHARS] for w in _WORD_RE.findall(norm)]


def word_terms(text: str) -> set[str]:
    return {f"w:{w}" for w in words(text)}


def value_text(value: object) -> str | None:
    """A field value as the text that is tokenized; ``None`` for an empty value.

    bool before int (``True`` is an int); integral floats print as ints so ``1.0`` and
    ``1`` filter alike."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("field values must be finite numbers")
        return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)
    if isinstance(value, str):
        return value
    raise ValidationError(f"field values must be str, int, float, bool or None, not {type(value).__name__}")


def check_field_name(name: object) -> str:
    if not isinstance(name, str) or not FIELD_NAME_RE.fullmatch(name):
        shown = name[:100] if isinstance(name, str) else type(name).__name__
        raise ValidationError(f"field name {shown!r} is not an API name ([A-Za-z][A-Za-z0-9_]*, at most 80)")
    return name


def field_term(field: str, value: object) -> str | None:
    """The exact-value term ``f:<field>=<value>``; ``None`` when the value is empty or
    longer than MAX_EXACT_VALUE_CHARS after normalisation (such values are found by
    their words only)."""
    check_field_name(field)
    text = value_text(value)
    if text is None:
        return None
    return _exact_term(field, normalize(text))


def _exact_term(field: str, normalized: str) -> str | None:
    norm = _SPACE_RE.sub(" ", normalized).strip()
    if not norm or len(norm) > MAX_EXACT_VALUE_CHARS:
        return None
    return f"f:{field.lower()}={norm}"


def value_terms(field: str, value: object) -> tuple[set[str], str | None]:
    """``(word_terms(text), field_term(field, value))`` of one field value, normalising
    its text once (a rebuild tokenizes every value of every record)."""
    text = value_text(value)
    if text is None:
        return set(), None
    check_field_name(field)
    norm = normalize(text)
    return {f"w:{w}" for w in _words_of_normalized(norm)}, _exact_term(field, norm)


def type_term(object_type: str) -> str:
    return f"t:{normalize(object_type)}"


def record_term(record_id: str) -> str:
    # Record ids are case-sensitive (Salesforce 15-character ids), so no normalisation.
    return f"r:{record_id}"


# --- keys --------------------------------------------------------------------------------


class SearchKeys:
    """A tenant's search keys: the token (HMAC) key and the display (AEAD) key.

    Bound to one tenant; ``repr`` shows the tenant only. The token key lives only inside
    a keyed HMAC object (never returned); the display key is reachable through the
    explicitly named :meth:`display_key_material` for the display-field cipher.
    """

    __slots__ = ("_display", "_mac", "_tenant", "_wiped")

    def __init__(self, tenant: str, token_key: SecretBytes, display_key: SecretBytes) -> None:
        if not isinstance(token_key, SecretBytes) or not isinstance(display_key, SecretBytes):
            raise TypeError("search keys must be SecretBytes")
        if len(token_key) != KEY_SIZE or len(display_key) != KEY_SIZE:
            raise ValidationError(f"search keys must be {KEY_SIZE} bytes")
        if token_key == display_key:
            raise ValidationError("token and display keys must differ")
        self._tenant = check_tenant_id(tenant)
        self._mac: hmac.HMAC | None = hmac.new(token_key.reveal(), digestmod=hashlib.sha256)
        self._display = display_key
        self._wiped = False

    @property
    def tenant(self) -> str:
        return self._tenant

    def keyed(self, term: str) -> str:
        """The keyed token of a plaintext term (22 base64url characters)."""
        mac = self._live_mac().copy()
        mac.update(term.encode("utf-8"))
        return base64.urlsafe_b64encode(mac.digest()[:TOKEN_BYTES]).rstrip(b"=").decode("ascii")

    def keyed_all(self, terms: Iterable[str]) -> list[str]:
        return sorted({self.keyed(t) for t in terms})

    def mac(self, data: bytes) -> bytes:
        """Full 32-byte HMAC-SHA256 under the token key (deterministic document ids)."""
        mac = self._live_mac().copy()
        mac.update(data)
        return mac.digest()

    def display_key_material(self) -> SecretBytes:
        """The display-field AEAD key (for :mod:`archive_kms.search.documents` only)."""
        self._check()
        return self._display

    def wipe(self) -> None:
        """Forget the keys: further use raises ``ValidationError``."""
        self._display.wipe()
        self._mac = None  # the hmac object holds the only copy of the token key
        self._wiped = True

    def _check(self) -> None:
        if self._wiped:
            raise ValidationError(f"search keys of tenant {self._tenant!r} were wiped")

    def _live_mac(self) -> hmac.HMAC:
        self._check()
        assert self._mac is not None  # set until wiped
        return self._mac

    def __repr__(self) -> str:
        return f"SearchKeys(tenant={self._tenant!r}, <hidden>)"

    __str__ = __repr__

    # Keys never leave the process: no pickling, no copies.
    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("SearchKeys cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SearchKeys cannot be pickled or copied")


class TokenMemo:
    """Tokens already computed during one batch job (a rebuild), by plaintext term.

    Most terms recur across records (84 % of them in the benchmark's archive), and each
    token is an HMAC: a rebuild computes each distinct term's token once. The memo holds
    only what the index itself stores next to terms the process already holds in clear
    (no key material); it lives as long as the job that made it, is bounded
    (``max_entries``; terms beyond it are computed every time) and is tied to one
    ``SearchKeys`` object, so it never answers for other keys, and keys wiped since make
    it raise as they do."""

    __slots__ = ("_keys", "_max", "_tokens")

    def __init__(self, keys: SearchKeys, max_entries: int = 16_384) -> None:
        if not isinstance(keys, SearchKeys):
            raise TypeError("a token memo needs SearchKeys")
        self._keys, self._max = keys, max_entries
        self._tokens: dict[str, str] = {}

    def keys_are(self, keys: SearchKeys | None) -> bool:
        return keys is self._keys

    def keyed(self, term: str) -> str:
        self._keys._check()
        token = self._tokens.get(term)
        if token is None:
            token = self._keys.keyed(term)
            if len(self._tokens) < self._max:
                self._tokens[term] = token
        return token

    def keyed_all(self, terms: Iterable[str]) -> list[str]:
        # One record's terms: the keys are checked once for all of them (a term not
        # memoized yet is computed by SearchKeys.keyed, which checks them again).
        self._keys._check()
        get = self._tokens.get
        return sorted({get(t) or self.keyed(t) for t in terms})

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"TokenMemo(tenant={self._keys.tenant!r}, {len(self._tokens)} tokens)"

    __str__ = __repr__


def derive_search_keys(tenant_key_material: SecretBytes, tenant_id: str) -> SearchKeys:
    """Derive a tenant's search keys from its tenant key (L2) with HKDF-SHA256.

    ``token_key   = HKDF(IKM=tenant key, salt=none, info="archive_kms/v1/search/token"   || u32 len || tenant)``
    ``display_key = HKDF(IKM=tenant key, salt=none, info="archive_kms/v1/search/display" || u32 len || tenant)``

    No salt: the tenant key is uniformly random, and the keys must be reproducible from
    the tenant key alone. Distinct labels make the two keys independent.
    """
    if not isinstance(tenant_key_material, SecretBytes):
        raise TypeError("tenant key material must be SecretBytes")
    if len(tenant_key_material) < 16:
        raise ValidationError("tenant key material is too short to derive search keys from")
    tenant = check_tenant_id(tenant_id)
    ikm = tenant_key_material.reveal()
    info_tail = lp(tenant.encode("utf-8"))
    token = hkdf_sha256(ikm, info=_LABEL_TOKEN + info_tail, length=KEY_SIZE)
    display = hkdf_sha256(ikm, info=_LABEL_DISPLAY + info_tail, length=KEY_SIZE)
    return SearchKeys(tenant, SecretBytes(token), SecretBytes(display))
