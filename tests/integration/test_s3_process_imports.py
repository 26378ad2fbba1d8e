"""A platform process serving an S3 tenant builds no Azure client and imports no Azure SDK,
even when the deployment also configures Azure (the local stack does): the Azure clients
are built on first use (docs/benchmarks.md, session 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import json, sys, uuid
from archive_kms.config import Settings
from archive_kms.operations.platform import Platform
from archive_kms.storage import shared_s3_location

s = Settings(state_url=f"sqlite:///{sys.argv[1]}")
assert s.azure_blob_connection_string is not None, "the stack configures Azure Blob"
platform = Platform.from_settings(s)
store = platform.store_for(shared_s3_location(f"foot-{uuid.uuid4().hex[:8]}", s.shared_bucket))
names = list(store.list())
azure = sorted(m for m in sys.modules if m == "azure" or m.startswith("azure."))
print(json.dumps({"azure_modules": azure, "listed": len(names)}))
"""


def test_an_s3_tenant_process_never_imports_azure(localstack, azurite) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(Path(tmp) / "state.db")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"azure_modules": [], "listed": 0}
