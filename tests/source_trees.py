"""Syntax trees of Python sources, parsed in a child process.

Why not ``ast.parse`` here: CPython 3.11 keeps the AST constructor's recursion depth in
per-interpreter state, so a parse in one thread while another thread of the test process
(Prefect's services, a temporary server) converts a tree can fail with ``SystemError: AST
constructor recursion depth mismatch`` (python/cpython#106905). The child has no other
threads; the trees come back pickled (unpickling builds the nodes in Python, not through
the C constructor that miscounts). One child per test session parses every file asked for
at once and the trees are cached.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

_CHILD = """
import ast, pickle, sys
paths = sys.stdin.read().splitlines()
trees = {p: ast.parse(open(p, encoding="utf-8").read(), filename=p) for p in paths}
sys.stdout.buffer.write(pickle.dumps(trees))
"""

_cache: dict[str, ast.Module] = {}


def parse_files(paths: list[Path]) -> dict[Path, ast.Module]:
    """The tree of each file in ``paths`` (absolute), parsed in one child process."""
    wanted = [str(p.resolve()) for p in paths]
    missing = sorted({p for p in wanted if p not in _cache})
    if missing:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input="\n".join(missing).encode(),
            capture_output=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"parsing {len(missing)} source files failed:\n{done.stderr.decode(errors='replace')}")
        _cache.update(pickle.loads(done.stdout))  # our own child process wrote it
    return {Path(p): _cache[r] for p, r in zip(paths, wanted, strict=True)}


def parse_file(path: Path) -> ast.Module:
    """The tree of one file; parse a folder's files together with ``parse_files`` first
    when a test reads many (one child for all)."""
    return parse_files([path])[path]


def parse_tree(root: Path, pattern: str = "*.py") -> dict[Path, ast.Module]:
    """Every ``pattern`` file under ``root``, sorted by path."""
    return parse_files(sorted(root.rglob(pattern)))
