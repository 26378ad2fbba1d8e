"""Alembic environment for the state store. ``state.sql.migrate`` passes an open
connection, already inside the transaction (and lock) it upgrades under; the ``alembic``
command line (developers, ``alembic.ini`` here) connects to ``sqlalchemy.url`` or
``ARCHIVE_KMS_STATE_URL`` instead."""

from __future__ import annotations

import os

from alembic import context

from archive_kms.state.schema import metadata

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite alters tables by copying them; Alembic's batch mode does that
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: run `archive-kms db upgrade` against the database")
else:
    from archive_kms.state.sql.database import make_engine

    url = config.get_main_option("sqlalchemy.url") or os.environ.get("ARCHIVE_KMS_STATE_URL")
    if not url:
        raise SystemExit("set sqlalchemy.url in alembic.ini or ARCHIVE_KMS_STATE_URL to the state database")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
