"""The StateStore on SQL: SQLite (default, ``sqlite:///path``) or PostgreSQL
(``postgresql+psycopg://…``), one schema (``state.schema``), SQLAlchemy Core.

One repository per aggregate, each a class over the shared :class:`SqlDatabase`
(``database``: engine, transactions, error translation, fencing):

============== ======================== ==========================================
module         class                    port (``state.port``)
============== ======================== ==========================================
``tenants``    ``SqlTenantRepo``        ``TenantRepo``
``gate``       ``SqlGateRepo``          ``GateRepo`` (gate, deferred jobs, job ledger)
``job_leases`` ``SqlJobLeaseRepo``      ``JobLeaseRepo`` (job leases, fencing, write journals)
``runs``       ``SqlRunRepo``           ``RunRepo`` (runs, steps, checkpoints)
``ledger``     ``SqlLedgerRepo``        ``LedgerRepo`` (manifest, copy ledger)
``leases``     ``SqlLeaseRepo``         ``LeaseRepo``
``audit_log``  ``SqlAuditLog``          ``AuditLog``
``key_life…``  ``SqlWarningRepo``,      ``WarningRepo``, ``KeyWatchRepo`` (module ``key_lifecycle``:
               ``SqlKeyWatchRepo``       warnings, key observations, grace policies)
``keychain``   ``SqlKeychainStore``     ``keys.keychain_store.KeychainStore``
``store``      ``SqlStateStore``        ``StateStore`` (all of the above but the keychain's)
============== ======================== ==========================================

Concurrency model (details and reasoning in ``docs/state-store.md``):

* Every public method is one short transaction. On SQLite, write transactions start with
  ``BEGIN IMMEDIATE`` (one writer at a time, waiting up to the busy timeout, never the
  deadlock-prone read→write upgrade); reads use a deferred ``BEGIN`` and see a WAL
  snapshot. On PostgreSQL (READ COMMITTED) the few read-modify-write paths lock the row
  that serialises them: the tenant's gate row (``FOR UPDATE``), the tenant's lease row
  (``FOR SHARE`` under a fenced write), the global audit head (``FOR UPDATE``). Locks are
  always taken in the order lease → gate → anything else, so these paths cannot deadlock.
* Exactly-one-winner races are settled by constraints, not by reads: the lease row's
  primary key plus a conditional ``UPDATE … RETURNING``; the partial unique index "one
  running run per tenant"; the archive-job ledger's primary key.
* Vendor errors are translated in ``database``: lock/busy timeouts and serialization
  failures → ``TransientError``; the database not answering → ``ServiceUnavailableError``;
  both retryable and naming the database with its password hidden.
"""

from archive_kms.state.sql.database import SqlDatabase, make_engine
from archive_kms.state.sql.store import SqlStateStore, open_state

__all__ = ["SqlDatabase", "SqlStateStore", "make_engine", "open_state"]
