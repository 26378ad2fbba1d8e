"""Fixtures of the infra tier. ``local_cloud``: Settings for S3+KMS, Blob and search, from
docker-compose.yml through testcontainers when a Docker engine answers, else from the
no-Docker stack the suite runs on (the default here; see compose_stack.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive_kms.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_stack import compose_settings, use_compose


@pytest.fixture(scope="session")
def local_cloud(stack: dict[str, bool], settings: Settings) -> Iterator[tuple[str, Settings]]:
    """("compose" | "stack", Settings)."""
    if use_compose():
        with compose_settings(settings) as s:
            yield "compose", s
        return
    for name in ("localstack", "azurite", "elasticsearch"):
        if not stack.get(name):
            pytest.fail(f"service {name!r} is not healthy: run `archive-kms stack up`", pytrace=False)
    yield "stack", settings
