"""Alembic scripts for the state store's schema (ADR 0011); they ship in the package, so an
installed wheel can upgrade its database (``archive-kms db upgrade``).

``versions/`` holds one revision per schema change, ``0001_baseline`` being the schema of
the last release before Alembic (schema version 1). ``state.sql.migrate`` runs them on a
``SqlDatabase``; ``alembic.ini`` here is only for developers writing a revision
(``docs/state-store.md``, "Schema migrations").
"""
