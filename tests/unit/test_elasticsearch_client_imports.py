"""Building the Elasticsearch client loads no optional HTTP library the transport would only
offer as a node class (httpx, which imports click, rich and pygments; requests; aiohttp):
~9 MiB of RSS in every process that searches, the migration's included (ADR 0046). Other
importers are not affected. Fast: one subprocess, no service (the client connects lazily)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from source_trees import parse_tree

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


def _imports_at_import_time(tree: ast.Module) -> set[str]:
    """Top-level names of the modules ``tree`` imports when it is imported (not inside a
    function: an import there runs only when the function is called)."""
    found: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_the_transport_imports_the_optional_libraries_only_where_the_finder_looks() -> None:
    # The finder tells the transport's imports from anyone else's by the importing module's
    # name. It holds for the layout of elastic_transport 8.x-9.x: ``_node/__init__`` imports
    # every ``_node._http_*`` module, and each of those tries ``import httpx`` (requests,
    # aiohttp) at import time. A release that moves these imports elsewhere, or makes them
    # lazy, fails here by name instead of quietly loading httpx, click, rich and pygments
    # into every process that searches (or keeping a finder nobody needs).
    import elastic_transport

    root = Path(elastic_transport.__file__).parent
    version = elastic_transport.__version__
    importers: dict[str, set[str]] = {name: set() for name in _NoOptionalHttpBackends.NAMES}
    for path, tree in parse_tree(root).items():
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(("elastic_transport", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        for name in _imports_at_import_time(tree) & _NoOptionalHttpBackends.NAMES:
            importers[name].add(module)
    elsewhere = {
        name: sorted(m for m in modules if not m.startswith("elastic_transport._node."))
        for name, modules in importers.items()
    }
    assert not any(elsewhere.values()), (
        f"elastic_transport {version} imports an optional HTTP library outside elastic_transport._node.* "
        f"({ {n: m for n, m in elsewhere.items() if m} }): clients._NoOptionalHttpBackends only refuses "
        "imports made by modules named elastic_transport._node.*; extend it to these modules"
    )
    assert importers["httpx"] and importers["requests"], (
        f"elastic_transport {version} no longer imports httpx / requests when it is imported "
        f"(importers: {importers}): the layout clients._NoOptionalHttpBackends was written for is gone; "
        "if the node classes are imported lazily now, drop the finder (ADR 0046)"
    )
