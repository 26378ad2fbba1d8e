"""The runtime role (PostgreSQL): the role the workers connect as may read and write the
tables but not rewrite the audit log, its heads' history, the search-generation registry
or the schema markers, and, not owning the tables, cannot drop or disable the audit log's
triggers (docs/deployment.md "Database roles", ADR 0028).

Runs only on PostgreSQL and only when a runtime role is named (``archive-kms db upgrade
--runtime-role NAME``, or ``ARCHIVE_KMS_STATE_RUNTIME_ROLE`` for the ``alembic`` command
line); otherwise it changes nothing (SQLite, single-role deployments, tests). The grants
are ``state.sql.migrate.runtime_grants``: every table of the schema, present and future
(default privileges of the migration role), minus the append-only rights.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-14
"""

from __future__ import annotations

import os

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from archive_kms.state.sql.migrate import runtime_grants

    bind = op.get_bind()
    role = op.get_context().config.attributes.get("runtime_role") or os.environ.get("ARCHIVE_KMS_STATE_RUNTIME_ROLE")
    if bind.dialect.name != "postgresql" or not role:
        return
    runtime_grants(bind, role)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
