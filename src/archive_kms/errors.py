"""One error hierarchy for the whole product.

Adapters catch vendor exceptions (botocore ClientError, azure-core HttpResponseError,
KMIP result codes, elasticsearch ApiError) at the edge and re-raise one of these, naming
the resource (key id, bucket, index) in the message. The type says whether a retry can
help: ``retryable`` is a class attribute, and it is what ``archive_kms.retry`` (the one
retry loop every adapter uses) reads to decide whether to try again. ``retry_after`` is
the wait a throttled service asked for, in seconds, when it said so.

Messages never contain key material or object plaintext.
"""

from __future__ import annotations


class ArchiveKmsError(Exception):
    """Root of every error the product raises on purpose."""

    retryable: bool = False
    retry_after: float | None = None  # seconds the service asked us to wait (Retry-After), if it did

    def __init__(self, message: str, *, resource: str | None = None) -> None:
        super().__init__(message)
        self.resource = resource


class TransientError(ArchiveKmsError):
    """A retry with backoff can help (throttling, 5xx, timeouts, resets)."""

    retryable = True


class ConfigurationError(ArchiveKmsError):
    """Settings, endpoints or inputs are wrong; a human must fix them."""


class ValidationError(ArchiveKmsError):
    """An input (tenant id, key reference, object name, header field) is malformed."""


class IndexModeMismatchError(ValidationError):
    """Search keys given for a plaintext index, or missing for a keyed one (the index's
    generation decides its mode; a caller holding the other mode's keys may retry)."""


class ServiceUnavailableError(TransientError):
    """A backing service (S3, Blob, KMS, Key Vault, KMIP, Elasticsearch, DB) does not answer."""


class KeyServiceUnavailableError(ServiceUnavailableError):
    """A tenant's key service (the provider of its master key) does not answer, and the
    tenant's grace policy does not (or no longer) let cached keys serve meanwhile. Not a
    revocation: access comes back by itself when the service answers again."""


# --- keys ---------------------------------------------------------------------------------


class KeyError_(ArchiveKmsError):  # noqa: N801 - avoid shadowing the builtin KeyError
    """Base of key-provider errors."""


class KeyUnavailableError(KeyError_):
    """The key exists but cannot be used now: disabled, revoked, pending deletion,
    material expired or deleted. Terminal: retrying does not help until a human acts."""

    def __init__(self, message: str, *, resource: str | None = None, state: str | None = None) -> None:
        super().__init__(message, resource=resource)
        self.state = state


class KeyNotFoundError(KeyError_):
    """No key under this reference (wrong id, wrong region or account, deleted)."""


class KeyAccessDeniedError(KeyError_):
    """We are not permitted to use the key (missing grant, policy, role assignment)."""


class KeyThrottledError(TransientError):
    """The key service throttled us; back off and retry."""


class WrongKeyError(KeyError_):
    """Material or ciphertext does not belong to this key / tenant / context.
    Never retried with a relaxed context."""


class KeyImportError(KeyError_):
    """BYOK import failed: bad digest, wrong wrapping, expired import token."""


# --- cryptography -----------------------------------------------------------------------


class IntegrityError(ArchiveKmsError):
    """Authentication failed: tampered, truncated, reordered, or bound to another
    tenant/object. No unauthenticated plaintext was released."""


class FormatError(IntegrityError):
    """A header or length field is malformed or out of bounds."""


class KeychainTamperedError(IntegrityError):
    """A keychain record's signature does not verify."""


class TenantRevokedError(KeyUnavailableError):
    """The tenant's key access is revoked; reads, writes and searches are refused."""


# --- storage, search, state ------------------------------------------------------------


class ObjectNotFoundError(ArchiveKmsError):
    """No such object in the store."""


class ObjectExistsError(ArchiveKmsError):
    """A conditional create found the object already there."""


class ObjectChangedError(ArchiveKmsError):
    """A conditional read (``if_match``) found another version of the object than the one
    asked for: it was replaced since its ETag was seen. Terminal for that version; the
    caller decides whether the new one is acceptable."""


class CopyFailedError(ArchiveKmsError):
    """Objects failed to copy for a reason a retry of the same input cannot fix (access
    denied, a key refused, a name or size the target cannot hold): fix the cause named,
    then rerun the step. Failures that a retry may fix are a ``TransientError``."""


class StorageError(ArchiveKmsError):
    """A non-retryable storage failure (permission, bad bucket, quota)."""


class SearchError(ArchiveKmsError):
    """A non-retryable search-index failure (mapping, bad query)."""


class StateError(ArchiveKmsError):
    """State store inconsistency or a conflicting write."""


class LeaseHeldError(StateError):
    """Another run holds the tenant's lease."""


class FencedError(StateError):
    """A write carried a stale fencing token; the writer lost its lease."""


class AuditChainBrokenError(IntegrityError):
    """The audit log's hash chain does not verify."""


class KeyDestroyedError(KeyUnavailableError):
    """The key was crypto-erased (destroyed on purpose: retention or workspace erasure).
    Data under it is gone for good; terminal, no human action brings it back."""


class VersionConflictError(StateError):
    """A compare-and-set write found that someone else wrote first. Re-read, re-check
    and retry: the conflict is transient by nature."""

    retryable = True


class SearchBindingError(IntegrityError):
    """The search index disagrees with what the platform recorded: an alias on an index we
    never created, a generation whose stored mode is not the one we recorded, or a mode
    the signed keychain head forbids. Terminal and alarmed: nothing is sent or indexed
    until a human looks (docs/threat-model.md, "Search cluster operator")."""


class AuditForkError(IntegrityError):
    """The audit log is not a continuation of what was anchored outside the database (a
    restored or replaced log, or a forged anchor): nothing is anchored over it. Terminal
    and alarmed (docs/state-store.md "Anchors")."""


class AliasConflictError(SearchError):
    """A conditional alias swap found the alias elsewhere than expected (a racing swap or
    a stale caller). Terminal: the loser must re-read the alias, not retry blindly."""
