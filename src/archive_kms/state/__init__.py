"""State store: the StateStore port (``state.port``), its SQL backend for SQLite and
PostgreSQL (``state.sql``, opened with ``open_state(url)``), an in-memory backend
(``state.memory``), and the audit hash chain (``state.audit``).

Design, concurrency model and the audit threat model: ``docs/state-store.md``.
"""

from archive_kms.state.port import (
    Admission,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    CopyRecord,
    CopyStatus,
    Decision,
    DeferredJob,
    Fence,
    Flow,
    GateState,
    KeyMode,
    Lease,
    ManifestEntry,
    MigrationRun,
    RunState,
    StateStore,
    StepState,
    TenantRecord,
)
from archive_kms.state.sql import SqlStateStore, open_state

__all__ = [
    "Admission",
    "AuditEvent",
    "AuditRecord",
    "AuditVerification",
    "CopyRecord",
    "CopyStatus",
    "Decision",
    "DeferredJob",
    "Fence",
    "Flow",
    "GateState",
    "KeyMode",
    "Lease",
    "ManifestEntry",
    "MigrationRun",
    "RunState",
    "SqlStateStore",
    "StateStore",
    "StepState",
    "TenantRecord",
    "open_state",
]
