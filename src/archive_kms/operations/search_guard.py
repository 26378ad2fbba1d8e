"""What the platform, not the search cluster, decides about a tenant's index.

Whoever operates Elasticsearch can create indices, move aliases and edit an index's
``_meta`` (which says "keyed" or "plaintext"); whoever can write the state database can
edit ``tenants.key_mode``. Neither may decide whether a BYOK tenant's queries and records
go out in clear (docs/threat-model.md). So:

* **Generations we recorded.** Every generation the platform creates is recorded first,
  signed by the platform signing key (``SearchGenerations``; ``domain/search_generations``,
  table ``search_generations``): tenant, generation, index name, mode. A generation is
  recorded once; creating it again in the other mode is refused.
* **The mode comes from that record**, never from the index's ``_meta``: searches send
  the query compiled for the recorded mode to that one index (``SearchIndex.search(...,
  index=, mode=)``), and the adapter refuses before sending anything if the index's own
  marker disagrees (it was replaced).
* **"Must be keyed" comes from the signed keychain head**: a tenant whose head names a
  customer key (anything but the platform's managed key) never gets a plaintext
  generation created or written, and its queries go to a plaintext generation only in
  the window of an enable run before cutover (the registry still says ``managed``: the
  old generation holds what was archived in clear before the run).
* **The alias must point at a generation we recorded.** An alias on anything else is
  refused.

A refusal for any of these is an alarm (``archive_kms.alarms``: CRITICAL log, an
``alarm.*`` audit record, a console warning) and ``SearchBindingError``: fail closed.

``GuardedSearchIndex`` wraps the real ``SearchIndex`` at the composition root, so every
caller (tenant creation, archive jobs, the migration steps, the rotation flows) goes
through these checks. Tenants created before the registry existed get their current
generation recorded on first use, with the mode the registry implies and only if the
index's marker agrees (``search.generation_adopted`` audit record).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from archive_kms.alarms import AlarmLog, raise_alarm
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.domain.audit import AuditEvent
from archive_kms.domain.search_generations import GENERATION_PURPOSE, SearchGeneration
from archive_kms.errors import (
    IndexModeMismatchError,
    IntegrityError,
    KeyNotFoundError,
    SearchBindingError,
    SearchError,
    ValidationError,
)
from archive_kms.search import IndexMode, SearchIndex
from archive_kms.search.naming import check_tenant_id, index_name, parse_index_name
from archive_kms.search.port import BulkResult, GenerationInfo, Hit, HitFailure, IndexDocument, Query, SearchResult
from archive_kms.search.tokens import SearchKeys
from archive_kms.state.port import KeyMode, SearchGenerationRepo, TenantRecord

__all__ = ["GuardedSearchIndex", "SearchGenerations"]

log = logging.getLogger(__name__)


class _Registry(Protocol):
    def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...


class _GuardLog(AlarmLog, Protocol):
    pass


class SearchGenerations:
    """The signed registry of generations (record, look up, verify), over the state
    store's ``SearchGenerationRepo``. Verified records are cached: they never change."""

    def __init__(
        self,
        repo: SearchGenerationRepo,
        signer: Signer,
        verifier: Verifier | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repo = repo
        self._signer = signer
        self._verifier = verifier or signer.verifier()
        self._clock = clock
        self._lock = threading.Lock()
        self._verified: dict[tuple[str, str], SearchGeneration] = {}  # (tenant, index) -> record

    def _check(self, tenant: str, rec: SearchGeneration) -> SearchGeneration:
        try:
            self._verifier.verify(
                rec.signing_payload(),
                rec.signature,
                key_id=rec.signer_key_id,
                purpose=GENERATION_PURPOSE,
            )
        except IntegrityError as exc:
            raise SearchBindingError(
                f"the recorded search generation {rec.generation} of tenant {tenant} does not verify ({exc}): "
                "the state database was edited",
                resource=f"search-generation:{tenant}/{rec.generation}",
            ) from None
        if rec.tenant_id != tenant or rec.index != index_name(tenant, rec.generation):
            raise SearchBindingError(
                f"the recorded search generation {rec.generation} of tenant {tenant} names tenant "
                f"{rec.tenant_id} / index {rec.index} (a record moved between tenants)",
                resource=f"search-generation:{tenant}/{rec.generation}",
            )
        return rec

    def record(self, tenant: str, generation: int, mode: IndexMode) -> SearchGeneration:
        """Record (signed) that ``generation`` of ``tenant`` holds ``mode``; returns the
        stored record, which is an earlier one if the generation was recorded before."""
        tenant = check_tenant_id(tenant)
        unsigned = SearchGeneration(
            tenant,
            generation,
            index_name(tenant, generation),
            IndexMode(mode).value,
            self._clock(),
            signer_key_id=self._signer.key_id,
        )
        signed = replace(unsigned, signature=self._signer.sign(unsigned.signing_payload(), purpose=GENERATION_PURPOSE))
        stored = self._check(tenant, self._repo.record_search_generation(signed))
        with self._lock:
            self._verified[(tenant, stored.index)] = stored
        return stored

    def find(self, tenant: str, index: str) -> SearchGeneration | None:
        """The verified record of ``index`` of ``tenant``, or None if it was never recorded.
        ``SearchBindingError`` if a stored record does not verify."""
        with self._lock:
            hit = self._verified.get((tenant, index))
        if hit is not None:
            return hit
        found = None
        for rec in self._repo.search_generations(tenant):
            if rec.index == index:
                found = self._check(tenant, rec)
        if found is not None:
            with self._lock:
                self._verified[(tenant, index)] = found
        return found

    def all(self, tenant: str) -> list[SearchGeneration]:
        return [self._check(tenant, rec) for rec in self._repo.search_generations(tenant)]


class GuardedSearchIndex:
    """A ``SearchIndex`` that checks every generation, write and search against the signed
    registry and the signed keychain head (module docstring). ``keyed_required(tenant)``
    says whether the tenant's keychain head names a customer key; ``registry`` is the
    tenant registry (adoption of pre-registry generations and the enable window);
    ``audit`` is where alarms and adoptions are recorded."""

    def __init__(
        self,
        inner: SearchIndex,
        generations: SearchGenerations,
        *,
        keyed_required: Callable[[str], bool],
        registry: _Registry,
        audit: _GuardLog | None,
    ) -> None:
        self._inner = inner
        self._generations = generations
        self._keyed_required = keyed_required
        self._registry = registry
        self._audit = audit

    def __repr__(self) -> str:
        return f"GuardedSearchIndex({self._inner!r})"

    @property
    def inner(self) -> SearchIndex:
        return self._inner

    # --- the checks ---------------------------------------------------------------------

    def _alarm(self, kind: str, tenant: str, exc: Exception, **details: object) -> None:
        raise_alarm(self._audit, kind, str(exc), tenant_id=tenant, details=details)

    def must_be_keyed(self, tenant: str) -> bool:
        """Whether the tenant's signed keychain head names a customer key (no keychain:
        nothing can be decrypted anyway; answer yes, the safe side)."""
        try:
            return self._keyed_required(tenant)
        except KeyNotFoundError:
            return True

    def generation(self, tenant: str, index: str) -> SearchGeneration:
        """The verified record of ``index``: recorded by us, or (a tenant from before the
        registry) adopted now if it is the registry's current generation. Anything else
        is an alarm and ``SearchBindingError``."""
        tenant = check_tenant_id(tenant)
        try:
            rec = self._generations.find(tenant, index)
            if rec is None:
                rec = self._adopt(tenant, index)
        except SearchBindingError as exc:
            self._alarm("search_binding", tenant, exc, index=index)
            raise
        if rec is None:
            refused = SearchBindingError(
                f"index {index} is not a generation the platform recorded for tenant {tenant}: "
                "someone else created it or pointed the tenant's alias at it; refusing to search or write it",
                resource=index,
            )
            self._alarm("search_binding", tenant, refused, index=index)
            raise refused
        return rec

    def recorded(self, tenant: str) -> list[SearchGeneration]:
        """Every generation recorded for ``tenant``, verified, oldest first."""
        try:
            return self._generations.all(check_tenant_id(tenant))
        except SearchBindingError as exc:
            self._alarm("search_binding", tenant, exc)
            raise

    def mode_of(self, tenant: str, index: str) -> IndexMode:
        """The mode ``index`` was recorded with (``generation``'s checks included)."""
        return IndexMode(self.generation(tenant, index).mode)

    def _adopt(self, tenant: str, index: str) -> SearchGeneration | None:
        t = self._registry.get_tenant(tenant)
        if t is None or t.index_generation < 1 or index != index_name(tenant, t.index_generation):
            return None
        mode = IndexMode.PLAINTEXT if KeyMode(t.key_mode) is KeyMode.MANAGED else IndexMode.KEYED
        info = self._inner.describe_generation(index)
        if info is None or info.mode is not mode:
            raise SearchBindingError(
                f"index {index} of tenant {tenant} (recorded before the generation registry) says "
                f"{info.mode.value if info else 'nothing'} but the tenant's registry entry implies {mode.value}: "
                "not adopting it",
                resource=index,
            )
        rec = self._generations.record(tenant, t.index_generation, mode)
        if self._audit is not None:
            self._audit.append_audit(
                AuditEvent(
                    actor="search-guard",
                    action="search.generation_adopted",
                    tenant_id=tenant,
                    details={"index": index, "generation": rec.generation, "mode": rec.mode},
                )
            )
        log.warning("search generation %s of tenant %s recorded on first use (%s)", index, tenant, rec.mode)
        return rec

    def _plaintext_allowed(self, tenant: str, rec: SearchGeneration, *, writing: bool) -> None:
        """A plaintext generation of a tenant whose head names a customer key: writes are
        refused; searches only in an enable run's window before cutover."""
        if rec.mode != IndexMode.PLAINTEXT.value or not self.must_be_keyed(tenant):
            return
        t = self._registry.get_tenant(tenant)
        if not writing and t is not None and KeyMode(t.key_mode) is KeyMode.MANAGED:
            return  # an enable run between bind_key and cutover: this generation was built in clear
        if not writing and t is not None and t.index_generation > rec.generation:
            # A cutover moved the registry on since the caller looked (the alias follows
            # it a moment later): nothing is sent; the caller re-reads the registry.
            raise IndexModeMismatchError(
                f"{rec.index} is no longer tenant {tenant}'s generation (the registry is at generation "
                f"{t.index_generation}): re-read the registry",
                resource=rec.index,
            )
        exc = SearchBindingError(
            f"tenant {tenant}'s keychain is bound to a customer key, but {rec.index} is a plaintext generation: "
            f"refusing to {'write records into' if writing else 'send queries to'} it in clear",
            resource=rec.index,
        )
        self._alarm("search_mode", tenant, exc, index=rec.index, writing=writing)
        raise exc

    def check_write(self, tenant: str, index: str) -> IndexMode:
        """Before an archive job writes anything: ``index`` is a generation we recorded and
        may take records now (a customer-keyed tenant's plaintext generation may not).
        Returns its recorded mode; alarm and ``SearchBindingError`` otherwise."""
        rec = self.generation(tenant, index)
        self._plaintext_allowed(tenant, rec, writing=True)
        return IndexMode(rec.mode)

    def _current(self, tenant: str) -> str | None:
        try:
            current = self._inner.current_index(tenant)
        except SearchBindingError as exc:
            self._alarm("search_binding", tenant, exc)
            raise
        if current is not None:
            self.generation(tenant, current)
        return current

    # --- the port -----------------------------------------------------------------------

    def create_generation(self, tenant: str, generation: int, mode: IndexMode) -> str:
        tenant = check_tenant_id(tenant)
        mode = IndexMode(mode)
        if mode is IndexMode.PLAINTEXT and self.must_be_keyed(tenant):
            exc = SearchBindingError(
                f"tenant {tenant}'s keychain is bound to a customer key: refusing to create a plaintext "
                f"generation {generation}",
                resource=index_name(tenant, generation),
            )
            self._alarm("search_mode", tenant, exc, generation=generation)
            raise exc
        rec = self._generations.record(tenant, generation, mode)
        if rec.mode != mode.value:
            raise SearchError(
                f"generation {generation} of tenant {tenant} was recorded as {rec.mode} on "
                f"{rec.recorded_at:%Y-%m-%d}; a generation number is never reused for the other mode: use "
                "a new generation",
                resource=rec.index,
            )
        return self._inner.create_generation(tenant, generation, mode)

    def describe_generation(self, index_name: str) -> GenerationInfo | None:
        return self._inner.describe_generation(index_name)

    def list_generations(self, tenant: str) -> list[GenerationInfo]:
        return self._inner.list_generations(tenant)

    def mark_generation_complete(self, index_name: str, records: int) -> None:
        self._inner.mark_generation_complete(index_name, records)

    def bulk_index(self, index_name: str, docs: Sequence[IndexDocument], *, refresh: bool = False) -> BulkResult:
        from archive_kms.search.documents import check_document_modes

        docs = list(docs)
        tenant, _ = parse_index_name(index_name)
        rec = self.generation(tenant, index_name)
        check_document_modes(index_name, IndexMode(rec.mode), docs)
        self._plaintext_allowed(tenant, rec, writing=True)
        return self._inner.bulk_index(index_name, docs, refresh=refresh)

    def delete_documents(self, index_name: str, doc_ids: Sequence[str], *, refresh: bool = False) -> BulkResult:
        return self._inner.delete_documents(index_name, doc_ids, refresh=refresh)

    def refresh(self, index_name: str) -> None:
        self._inner.refresh(index_name)

    def count(self, index_name: str) -> int:
        return self._inner.count(index_name)

    def search(
        self,
        tenant: str,
        query: Query,
        keys: SearchKeys | None,
        *,
        index: str | None = None,
        mode: IndexMode | None = None,
    ) -> SearchResult:
        tenant = check_tenant_id(tenant)
        if (index is None) != (mode is None):
            raise ValidationError("search: give both index and mode, or neither")
        current = self._current(tenant)  # an alias on anything we did not record: alarm, refused
        target = index if index is not None else current
        if target is None:
            raise SearchError(f"tenant {tenant} has no search index", resource=f"tenant:{tenant}")
        rec = self.generation(tenant, target)
        recorded = IndexMode(rec.mode)
        if mode is not None and IndexMode(mode) is not recorded:
            raise IndexModeMismatchError(
                f"{target} was recorded {recorded.value}, not {IndexMode(mode).value}: re-read the registry",
                resource=target,
            )
        self._plaintext_allowed(tenant, rec, writing=False)
        if current != target:
            log.info("alias of %s points at %s, the registry at %s: a cutover in flight", tenant, current, target)
        try:
            return self._inner.search(tenant, query, keys, index=target, mode=recorded)
        except SearchBindingError as exc:  # the index's own marker contradicts our record
            self._alarm("search_binding", tenant, exc, index=target)
            raise

    def scan(self, index_name: str, keys: SearchKeys | None, *, page_size: int = 1_000) -> Iterator[Hit | HitFailure]:
        tenant, _ = parse_index_name(index_name)
        rec = self.generation(tenant, index_name)
        if (keys is None) != (rec.mode == IndexMode.PLAINTEXT.value):
            raise IndexModeMismatchError(f"{index_name} was recorded {rec.mode}: keys do not fit", resource=index_name)
        return self._inner.scan(index_name, keys, page_size=page_size)

    def current_index(self, tenant: str) -> str | None:
        return self._current(check_tenant_id(tenant))

    def swap_alias(self, tenant: str, new_index: str, *, expected_current: str | None) -> None:
        self.generation(tenant, new_index)  # never point the alias at something we did not record
        self._inner.swap_alias(tenant, new_index, expected_current=expected_current)

    def set_write_block(self, index_name: str, blocked: bool = True) -> None:
        self._inner.set_write_block(index_name, blocked)

    def delete_index(self, index_name: str) -> None:
        self._inner.delete_index(index_name)
