"""Building the Elasticsearch client loads no optional HTTP library the transport would only
offer as a node class (httpx, which imports click, rich and pygments; requests; aiohttp):
~9 MiB of RSS in every process that searches, the migration's included (ADR 0046). Other
importers are not affected. Fast: one subprocess, no service (the client connects lazily)."""

from __future__ import annotations

import json
import subprocess
import sys

from archive_kms.clients import _NoOptionalHttpBackends

_SCRIPT = """
import json, sys
from archive_kms import clients
from archive_kms.config import Settings
es = clients.elasticsearch_client(Settings(elasticsearch_url="http://127.0.0.1:9"))
node = type(es.transport.node_pool.get()).__name__
loaded = sorted({m.split(".")[0] for m in sys.modules})
finders = [type(f).__name__ for f in sys.meta_path]
import httpx, requests  # anyone else still imports them
print(json.dumps({"node": node, "loaded": loaded, "finders": finders, "later": [httpx.__name__, requests.__name__]}))
"""


def test_the_elasticsearch_client_loads_no_optional_http_library() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["node"] == "Urllib3HttpNode"
    assert "elasticsearch" in result["loaded"] and "elastic_transport" in result["loaded"]
    assert not {"httpx", "requests", "aiohttp", "rich", "click", "pygments"} & set(result["loaded"])
    assert "_NoOptionalHttpBackends" not in result["finders"]  # removed once the import is done
    assert result["later"] == ["httpx", "requests"]


def test_the_finder_refuses_only_the_transports_node_modules() -> None:
    finder = _NoOptionalHttpBackends()
    assert finder.find_spec("httpx") is None  # this module is not elastic_transport._node.*
    assert finder.find_spec("urllib3") is None
    scope = {"__name__": "elastic_transport._node._http_httpx", "finder": finder}
    try:
        exec("finder.find_spec('httpx')", scope)  # a frame with the transport's module name
    except ModuleNotFoundError as exc:
        assert exc.name == "httpx"
    else:
        raise AssertionError("the transport's optional import was not refused")
    exec("assert finder.find_spec('urllib3') is None", scope)  # what it uses is never refused
