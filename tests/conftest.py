"""Shared fixtures. The service fixtures (`localstack`, `azurite`, `elasticsearch`,
`keyvault`, `kmip`) give Settings for a real server on loopback; any tier may use them.

The services are started by `archive-kms stack up` (`make test` does it first). A test
never skips for a missing service: if one is down, the session fails naming it and the
command that starts it. Set ARCHIVE_KMS_TEST_AUTOSTART=1 to have the suite start the
stack itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from archive_kms.config import PROJECT_ROOT, Settings



def _stack_status() -> dict[str, bool]:
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "localstack" / "stack.py"), "status", "--json"],
                         capture_output=True, text=True, check=False)
    return {row["service"]: row["healthy"] for row in json.loads(out.stdout)}


@pytest.fixture(scope="session")
def stack() -> dict[str, bool]:
    status = _stack_status()
    if not all(status.values()) and os.environ.get("ARCHIVE_KMS_TEST_AUTOSTART") == "1":
        subprocess.run([sys.executable, str(PROJECT_ROOT / "localstack" / "stack.py"), "up"], check=False)
        status = _stack_status()
    return status


def _need(stack: dict[str, bool], name: str) -> None:
    if not stack.get(name):
        pytest.fail(f"service {name!r} is not healthy: run `archive-kms stack up` "
                    f"(see `archive-kms stack status`; log in .stack/logs/{name}.log)", pytrace=False)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


def _service(name: str):
    """A fixture giving Settings for the real service ``name``, failing loudly if it is down."""

    @pytest.fixture(name=name)
    def fixture(stack, settings) -> Settings:
        _need(stack, name)
        return settings

    return fixture


localstack = _service("localstack")
azurite = _service("azurite")
elasticsearch = _service("elasticsearch")
keyvault = _service("keyvault")
kmip = _service("kmip")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(f"tests/{tier}/" in str(item.fspath) for tier in ("integration", "contract", "flows", "faults")):
            item.add_marker(pytest.mark.integration)
