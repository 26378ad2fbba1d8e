"""The wrap context: what a wrapped key is bound to (at least its tenant).

Every adapter binds ``context`` to the wrapped key so that a wrapped key copied to another
tenant's keychain does not unwrap there:

* AWS KMS passes it as the KMS ``EncryptionContext`` (KMS authenticates it, and key
  policies and grants can require it: ``kms:EncryptionContext:tenant``);
* the KMIP adapter passes :func:`canonical_context` as AES-GCM additional data inside the HSM;
* the in-memory fake uses it as AES-GCM additional data;
* Azure Key Vault's RSA-OAEP has no additional data, so that adapter puts
  :func:`context_tag` in front of the key inside the OAEP plaintext and compares it on unwrap.

The rules are checked *before* any call, so a bad context fails the same way everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from archive_kms.errors import ValidationError

__all__ = ["MAX_ENTRIES", "canonical_context", "check_context", "context_tag"]

MAX_ENTRIES = 16
MAX_KEY_LEN = 64
MAX_VALUE_LEN = 256
TAG_SIZE = 16


def check_context(context: Mapping[str, str]) -> dict[str, str]:
    """Validate ``context`` and return it as a plain dict.

    Rules: a mapping of 1..16 entries with a ``tenant`` entry; keys are 1..64 printable
    characters not starting with ``aws`` (reserved by KMS); values are 1..256 printable
    characters.
    """
    if not isinstance(context, Mapping):
        raise ValidationError("the wrap context must be a mapping of str to str")
    if "tenant" not in context:
        raise ValidationError("the wrap context must name the tenant: {'tenant': TENANT_ID, ...}")
    if len(context) > MAX_ENTRIES:
        raise ValidationError(f"the wrap context has {len(context)} entries; at most {MAX_ENTRIES} are allowed")
    out: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError("wrap context keys and values must be str")
        if not 1 <= len(key) <= MAX_KEY_LEN or not key.isprintable():
            raise ValidationError(f"wrap context key {key[:80]!a} must be 1..{MAX_KEY_LEN} printable characters")
        if key.lower().startswith("aws"):
            raise ValidationError(f"wrap context key {key[:80]!a}: keys starting with 'aws' are reserved by KMS")
        if not 1 <= len(value) <= MAX_VALUE_LEN or not value.isprintable():
            raise ValidationError(
                f"wrap context value for {key[:80]!a} must be 1..{MAX_VALUE_LEN} printable characters"
            )
        out[key] = value
    return out


def canonical_context(context: Mapping[str, str]) -> bytes:
    """One byte string per context: JSON, keys sorted, no whitespace, UTF-8.

    JSON string escaping makes the encoding injective (no two contexts share bytes), and
    sorting makes it independent of insertion order.
    """
    checked = check_context(context)
    return json.dumps(checked, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def context_tag(context: Mapping[str, str], label: bytes) -> bytes:
    """``SHA-256(label || 0x00 || canonical_context)[:16]``: a context fingerprint for
    adapters whose wrap has no additional data. ``label`` separates uses."""
    return hashlib.sha256(label + b"\x00" + canonical_context(context)).digest()[:TAG_SIZE]
