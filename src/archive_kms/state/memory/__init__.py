"""The StateStore in process memory: a real implementation of the same contract as
``state.sql`` (the contract suite runs on both), for fast tests of the layers above.
One lock makes every method atomic; nothing survives the process.

Laid out like ``state.sql``: ``tables`` (the rows, the lock, shared checks) and one
repository per aggregate (``tenants``, ``gate``, ``runs``, ``ledger``, ``leases``,
``audit_log``), composed in ``store``. ``_audit`` and ``_heads`` are the raw audit rows;
tests edit them to play an attacker.
"""

from archive_kms.state.memory.store import InMemoryStateStore

__all__ = ["InMemoryStateStore"]
