"""One registry resolves a key reference to the adapter for its scheme.

    provider = resolve("aws-kms://arn:aws:kms:eu-west-1:111122223333:key/...", settings)

``DEFAULT_ADAPTERS`` maps each scheme (``aws-kms``, ``azure-kv``, ``kmip``, ``managed``) to
its adapter class; the class's ``from_settings(ref, settings)`` builds the provider with
its SDK clients from ``archive_kms.clients``. The adapter modules import their SDKs only
when a client is built, so resolving an ``aws-kms`` key does not import the Azure or KMIP
SDKs. The ``memory`` scheme has no default adapter: tests and the demo register one
(``registry.register("memory", kms.factory)``), so a production configuration can never
resolve a tenant to an in-process key.

A long-lived caller (a worker, the console API) keeps one :class:`KeyProviderRegistry`:
it caches one provider per canonical reference, and each provider keeps its clients and
connections. :func:`resolve` is the one-shot form.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from archive_kms.config import Settings
from archive_kms.errors import ConfigurationError
from archive_kms.keys.aws_kms import AwsKmsKeyProvider
from archive_kms.keys.azure_key_vault import AzureKeyVaultKeyProvider
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.limits import RequestLimiter, limit_provider, quota_domain
from archive_kms.keys.managed import ManagedKeyProvider
from archive_kms.keys.port import KeyProvider
from archive_kms.keys.refs import KeyRef, parse_key_ref

__all__ = ["DEFAULT_ADAPTERS", "KeyProviderRegistry", "ProviderFactory", "resolve"]

#: A factory builds a provider for a parsed reference of its scheme from settings.
ProviderFactory = Callable[[Any, Settings], KeyProvider]


class AdapterClass(Protocol):
    """What the registry needs of an adapter class: a constructor from a parsed reference
    of the adapter's scheme and the settings."""

    def from_settings(self, ref: Any, settings: Settings) -> KeyProvider: ...


#: scheme -> adapter class (``AdapterClass.from_settings`` builds the provider).
DEFAULT_ADAPTERS: Mapping[str, AdapterClass] = {
    "aws-kms": AwsKmsKeyProvider,
    "azure-kv": AzureKeyVaultKeyProvider,
    "kmip": KmipKeyProvider,
    "managed": ManagedKeyProvider,
}


class KeyProviderRegistry:
    """Scheme -> adapter factory, plus a cache of resolved providers. With a ``limiter``,
    every provider's calls to its key service pass it first, per quota domain
    (``keys.limits``)."""

    def __init__(self, settings: Settings, *, defaults: bool = True, limiter: RequestLimiter | None = None) -> None:
        self._settings = settings
        self._limiter = limiter
        self._factories: dict[str, ProviderFactory] = {}
        self._providers: dict[str, KeyProvider] = {}
        self._lock = threading.Lock()
        if defaults:
            for scheme, adapter in DEFAULT_ADAPTERS.items():
                self._factories[scheme] = adapter.from_settings

    def __repr__(self) -> str:
        return f"KeyProviderRegistry(schemes={sorted(self._factories)}, cached={len(self._providers)})"

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))

    def register(self, scheme: str, factory: ProviderFactory) -> None:
        """Register (or replace) the adapter for ``scheme``; cached providers of it are dropped."""
        with self._lock:
            self._factories[scheme] = factory
            for uri in [u for u in self._providers if u.startswith(f"{scheme}://")]:
                del self._providers[uri]

    def resolve(self, ref: str | KeyRef) -> KeyProvider:
        """The provider for ``ref`` (validated; ValidationError names what to fix).
        ConfigurationError when no adapter handles the scheme."""
        parsed = parse_key_ref(ref)
        with self._lock:
            cached = self._providers.get(parsed.uri)
            if cached is not None:
                return cached
            factory = self._factories.get(parsed.scheme)
        if factory is None:
            raise ConfigurationError(
                f"no key provider for {parsed.uri}: scheme {parsed.scheme!r} is not enabled here "
                f"(enabled: {', '.join(self.schemes) or 'none'})",
                resource=parsed.uri,
            )
        provider = factory(parsed, self._settings)
        domain = quota_domain(parsed, self._settings) if self._limiter is not None else None
        if domain is not None and self._limiter is not None:
            provider = limit_provider(provider, self._limiter, domain)
        with self._lock:
            return self._providers.setdefault(parsed.uri, provider)

    def clear(self) -> None:
        with self._lock:
            self._providers.clear()


def resolve(ref: str | KeyRef, settings: Settings) -> KeyProvider:
    """One-shot: a fresh provider for ``ref`` from the default adapters."""
    return KeyProviderRegistry(settings).resolve(ref)
