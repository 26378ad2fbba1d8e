"""``InMemoryStateStore``: the whole ``StateStore`` in process memory, one repository per
aggregate over shared :class:`MemoryTables`, as ``state.sql`` is over one database."""

from __future__ import annotations

from archive_kms.state.memory.audit_log import MemoryAuditLog
from archive_kms.state.memory.job_leases import MemoryJobLeaseRepo
from archive_kms.state.memory.key_lifecycle import MemoryKeyWatchRepo, MemoryWarningRepo
from archive_kms.state.memory.leases import MemoryLeaseRepo
from archive_kms.state.memory.ledger import MemoryLedgerRepo
from archive_kms.state.memory.lifecycle import MemoryLifecycleRepo
from archive_kms.state.memory.runs import MemoryRunRepo
from archive_kms.state.memory.search_generations import MemorySearchGenerationRepo
from archive_kms.state.memory.tenants import MemoryTenantRepo

__all__ = ["InMemoryStateStore"]


class InMemoryStateStore(
    MemoryTenantRepo,
    MemoryJobLeaseRepo,
    MemoryRunRepo,
    MemoryLedgerRepo,
    MemoryLeaseRepo,
    MemoryAuditLog,
    MemorySearchGenerationRepo,
    MemoryLifecycleRepo,
    MemoryWarningRepo,
    MemoryKeyWatchRepo,
):
    """``StateStore`` in memory (thread-safe). ``clock``, ``sealer`` and ``job_stale_after``
    as for ``SqlStateStore``."""

    def __repr__(self) -> str:
        return f"InMemoryStateStore({len(self._tenants)} tenants)"

    def close(self) -> None:
        return None
