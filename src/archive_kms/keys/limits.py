"""Request quotas of the L1 key services, shared by every process of a fleet.

AWS KMS counts requests per account and region, Azure Key Vault per vault, an HSM per
device; every process of every worker draws on the same quota. A :class:`QuotaDomain` names
one such quota, derived from the key reference alone (:func:`quota_domain`):

==============  =================================================  ==============================
scheme          domain                                             whose quota
==============  =================================================  ==============================
``aws-kms``     ``aws-kms:REGION:platform`` (key or alias ARN)     our account, the key's region
                ``aws-kms:REGION:platform`` (``alias/NAME``)       our account, configured region
``managed``     ``aws-kms:REGION:platform``                        our account, configured region
``azure-kv``    ``azure-kv:HOST[:PORT]``                           the vault
``kmip``        ``kmip:HOST:PORT``                                 the HSM
``memory``      none (in-process)                                  —
==============  =================================================  ==============================

``platform`` is ``settings.aws_account_id`` when set. AWS KMS throttles a cross-account
request against the quota of the account that **makes** it, not of the key's owner
(https://docs.aws.amazon.com/kms/latest/developerguide/requests-per-second.html,
"Cross-account requests"): every key of every tenant in one region, the managed key
included, draws on our account's quota there, so they share one domain.

A :class:`RequestLimiter` decides when a request may go; :class:`LimitedKeyProvider`
(made by :func:`limit_provider`) asks it before every call that reaches the service (``wrap``, ``unwrap``, ``status``,
``check_metadata``, ``describe``, ``ensure``: one request each; a request the SDK retries
after throttling counts once, so a share is set below the quota). The limiter the flows use
is a Prefect global concurrency limit with slot decay per domain (``flows/limits.py``), so
the bound holds across processes and machines; this module does not import Prefect. The
key caches (L2 cached per process for ``key_cache_ttl_seconds``) keep the count small: no
request per object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.keys.port import KeyProvider, KeyStatus, WrappedKey
from archive_kms.keys.refs import AwsKmsKeyRef, AzureKeyVaultKeyRef, KeyRef, KmipKeyRef, ManagedKeyRef

__all__ = [
    "CHARGED_CALLS",
    "KINDS",
    "LimitedKeyProvider",
    "QuotaDomain",
    "RequestLimiter",
    "limit_provider",
    "quota_domain",
    "rate_for",
]

#: Kinds of key service, each with its own rate setting (``l1_requests_per_second_<kind>``).
KINDS = ("aws-kms", "azure-kv", "kmip")

#: Provider methods that send a request to the key service (one each).
CHARGED_CALLS = frozenset({"wrap", "unwrap", "status", "check_metadata", "describe", "ensure"})


@dataclass(frozen=True)
class QuotaDomain:
    """One quota of a key service: ``kind`` (aws-kms | azure-kv | kmip) and ``scope``
    (``REGION:ACCOUNT``, the vault's host, the HSM's host:port)."""

    kind: str
    scope: str

    @property
    def name(self) -> str:
        """``KIND:SCOPE``: no ``/``, ``%``, ``&``, ``<`` or ``>`` (Prefect's name rule)."""
        return f"{self.kind}:{self.scope}"

    def __str__(self) -> str:
        return self.name


def quota_domain(ref: KeyRef, settings: Settings) -> QuotaDomain | None:
    """The quota ``ref``'s requests count against; None for in-process keys."""
    platform = getattr(settings, "aws_account_id", None) or "platform"
    if isinstance(ref, ManagedKeyRef):
        return QuotaDomain("aws-kms", f"{settings.aws_region}:{platform}")
    if isinstance(ref, AwsKmsKeyRef):
        if ref.region is None:  # alias/NAME: our account, the configured region
            return QuotaDomain("aws-kms", f"{settings.aws_region}:{platform}")
        return QuotaDomain("aws-kms", f"{ref.region}:{platform}")  # the caller's quota: ours
    if isinstance(ref, AzureKeyVaultKeyRef):
        return QuotaDomain("azure-kv", ref.host + (f":{ref.port}" if ref.port is not None else ""))
    if isinstance(ref, KmipKeyRef):
        return QuotaDomain("kmip", f"{ref.host}:{ref.port}")
    return None


def rate_for(kind: str, settings: Settings) -> float:
    """Requests per second this fleet may send to one domain of ``kind`` (settings
    ``l1_requests_per_second_aws_kms`` / ``_azure_kv`` / ``_kmip``)."""
    return float(getattr(settings, "l1_requests_per_second_" + kind.replace("-", "_")))


class RequestLimiter(Protocol):
    """Admits requests to the key services at the rate each quota domain allows."""

    def acquire(self, domain: QuotaDomain, requests: int = 1) -> None:
        """Return once ``requests`` more requests to ``domain`` fit its rate (blocking as
        long as needed, up to the limiter's timeout). Raises ``KeyThrottledError``
        (retryable) if the timeout passes first, and ``ServiceUnavailableError`` if the
        limiter's own service does not answer."""
        ...


class LimitedKeyProvider:
    """A ``KeyProvider`` whose calls to the key service first pass ``limiter`` for
    ``domain``. Everything else (``key_ref``, adapter-specific attributes) is the wrapped
    provider's own."""

    def __init__(self, inner: KeyProvider, limiter: RequestLimiter, domain: QuotaDomain) -> None:
        self._inner = inner
        self._limiter = limiter
        self.domain = domain

    def __repr__(self) -> str:
        return f"LimitedKeyProvider({self._inner!r}, domain={self.domain.name!r})"

    @property
    def inner(self) -> KeyProvider:
        return self._inner

    @property
    def key_ref(self) -> str:
        return self._inner.key_ref

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        self._limiter.acquire(self.domain)
        return self._inner.wrap(key, context=context)

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        self._limiter.acquire(self.domain)
        return self._inner.unwrap(wrapped, context=context)

    def status(self) -> KeyStatus:
        self._limiter.acquire(self.domain)
        return self._inner.status()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in CHARGED_CALLS or not callable(attr):
            return attr

        def charged(*args: Any, **kwargs: Any) -> Any:
            self._limiter.acquire(self.domain)
            return attr(*args, **kwargs)

        return charged


class _LimitedMetadataKeyProvider(LimitedKeyProvider):
    """For adapters with ``check_metadata``: defined on the class, so the preflight's
    ``isinstance(provider, SupportsMetadataCheck)`` sees it (a runtime protocol check does
    not look through ``__getattr__`` on every Python)."""

    def check_metadata(self) -> dict[str, str]:
        self._limiter.acquire(self.domain)
        return self._inner.check_metadata()  # type: ignore[attr-defined, no-any-return]


def limit_provider(inner: KeyProvider, limiter: RequestLimiter, domain: QuotaDomain) -> LimitedKeyProvider:
    """``inner`` behind ``limiter`` for ``domain``, offering what ``inner`` offers."""
    cls = _LimitedMetadataKeyProvider if callable(getattr(inner, "check_metadata", None)) else LimitedKeyProvider
    return cls(inner, limiter, domain)
