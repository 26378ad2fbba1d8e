"""The Prefect flows of archive_kms (installed as the package ``archive_kms.flows``).

Thin: each flow composes plain functions of ``archive_kms.migration``; see
``flows/migration.py`` and ``flows/prefect.yaml`` (deployments).
"""
