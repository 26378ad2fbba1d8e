"""Archive-job leases and write journals (ADR 0020).

Two new tables beside the archive-job ledger; no existing table changes, so releases
before this one still open the database (the ``schema_version`` marker stays 1).

* ``archive_job_leases``: until when a job's running attempt holds it (``expires_at``,
  renewed by the writer's heartbeat). A running job without a row (admitted before this
  revision) counts from its ``started_at``.
* ``archive_job_writes``: the object names an attempt may create, for the rollback of a
  failed, fenced or abandoned attempt.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JOB_ID = 255
_UTC = sa.DateTime(timezone=True)  # state.schema.UtcDateTime's column type


def upgrade() -> None:
    op.create_table(
        "archive_job_leases",
        sa.Column("job_id", sa.String(JOB_ID), sa.ForeignKey("archive_jobs.job_id"), primary_key=True),
        sa.Column("expires_at", _UTC, nullable=False),
        sa.Column("renewed_at", _UTC, nullable=False),
    )
    op.create_table(
        "archive_job_writes",
        sa.Column("job_id", sa.String(JOB_ID), sa.ForeignKey("archive_jobs.job_id"), nullable=False),
        sa.Column("name", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "name"),
    )


def downgrade() -> None:
    # Not supported: restore the database from a backup taken before the upgrade.
    raise NotImplementedError("archive_kms state migrations are forward-only")
