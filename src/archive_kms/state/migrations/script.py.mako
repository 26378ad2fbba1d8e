"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    # Spell out types and CHECK lists here (do not import them from state.schema, which
    # moves on): a revision must create the same thing whenever it runs. SQLite alters
    # tables through op.batch_alter_table. Then change state/schema.py to match: the
    # test test_state_schema_upgrade.py fails while the two disagree.
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    # Not supported: restore the database from a backup taken before the upgrade.
    raise NotImplementedError("archive_kms state migrations are forward-only")
