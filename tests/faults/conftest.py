"""Fixtures of the fault tier, and its report.

The migration-flow fixtures (``flow_settings``, ``flow_platform``, ``archived_tenant``,
``customer_key``, ...) and helpers (``invariants``, ``run_plan``, ...) come from
``tests/flows/conftest.py``, loaded here under the module name ``flows_support`` so that
test modules here can ``from flows_support import invariants``.

The report: every test of this tier is a *case*. A case counts the faults it injected
(everything the fault proxies of ``fault_proxy`` / ``tcp_proxy`` injected while it ran,
plus what a test adds with ``fault_case.injected(...)``, e.g. kill -9 of a worker) and
the invariants it checked and found holding (``invariants()`` reports them; the storage
tests report theirs). At the end of the session a table is printed (cases, faults per
kind, invariants held, outcome) and written as JSON to ``.stack/fault-report.json`` in
the project (``ARCHIVE_KMS_FAULT_REPORT`` overrides the path).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_FLOWS = _HERE.parent / "flows"
for _p in (str(_HERE), str(_FLOWS), str(_HERE.parent)):  # tests/: state_fixtures
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _load_flows_support():
    name = "flows_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _FLOWS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


flows_support = _load_flows_support()

# The flow fixtures, registered for this directory too.
flow_settings = flows_support.flow_settings
flow_platform = flows_support.flow_platform
_flow_cleanup = flows_support._flow_cleanup
new_tenant_id = flows_support.new_tenant_id
archived_tenant = flows_support.archived_tenant
customer_key = flows_support.customer_key

from fault_proxy import Proxy  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

from archive_kms.config import PROJECT_ROOT  # noqa: E402

# --- worker processes ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def fork_context():
    """A multiprocessing fork server with ``kill_worker`` (and everything it imports)
    loaded: a worker process then starts in milliseconds, not seconds. It must find the
    module on PYTHONPATH: the fork server is a new interpreter and does not take this
    process's sys.path."""
    import multiprocessing
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kill_worker"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_HERE), saved) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


# --- the report -----------------------------------------------------------------------------


@dataclass
class FaultCase:
    nodeid: str
    faults: Counter = field(default_factory=Counter)
    invariants: Counter = field(default_factory=Counter)  # invariant -> times checked and held
    notes: dict[str, Any] = field(default_factory=dict)
    outcome: str = "?"
    seconds: float = 0.0

    def injected(self, kind: str, n: int = 1) -> None:
        """Count ``n`` faults of ``kind`` injected by the test itself (not by a proxy)."""
        self.faults[kind] += n

    def held(self, *names: str) -> None:
        for n in names:
            self.invariants[n] += 1

    def note(self, **values: Any) -> None:
        self.notes.update(values)


_CASES: list[FaultCase] = []
_CURRENT: list[FaultCase] = []


def current_case() -> FaultCase | None:
    return _CURRENT[-1] if _CURRENT else None


def _proxy_counts() -> dict[int, Counter]:
    return {id(p): Counter(p.injected) for p in [*Proxy.instances, *TcpProxy.instances]}


class _Captured(logging.Handler):
    """Every log record of the test (``archive_kms`` from DEBUG, the rest from INFO),
    formatted with its traceback: I7 searches them for key material and record values."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._format = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO and not record.name.startswith("archive_kms"):
            return
        try:
            self.lines.append(self._format.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to fix
            pass


@pytest.fixture(autouse=True)
def captured_logs():
    handler = _Captured()
    root, ours = logging.getLogger(), logging.getLogger("archive_kms")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    ours.setLevel(logging.DEBUG)
    source = lambda: list(handler.lines)  # noqa: E731
    flows_support.TEXT_SOURCES.append(source)
    try:
        yield handler
    finally:
        flows_support.TEXT_SOURCES.remove(source)
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


@pytest.fixture(autouse=True)
def fault_case(request) -> FaultCase:
    """This test's report entry (autouse): ``fault_case.injected(kind)``, ``.held(...)``."""
    case = FaultCase(request.node.nodeid.split("tests/faults/", 1)[-1])
    before = _proxy_counts()
    started = time.monotonic()
    _CURRENT.append(case)
    listener = case.held
    flows_support.INVARIANT_LISTENERS.append(listener)
    try:
        yield case
    finally:
        flows_support.INVARIANT_LISTENERS.remove(listener)
        _CURRENT.remove(case)
        case.seconds = round(time.monotonic() - started, 1)
        for key, counts in _proxy_counts().items():
            delta = counts - before.get(key, Counter())
            for kind, n in delta.items():
                case.faults[kind] += n
        _CASES.append(case)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.failed):
        for case in reversed(_CASES + _CURRENT):
            if case.nodeid == item.nodeid.split("tests/faults/", 1)[-1]:
                case.outcome = report.outcome
                break
        else:
            item.user_properties.append(("fault_outcome", report.outcome))


def _report_path() -> Path:
    return Path(os.environ.get("ARCHIVE_KMS_FAULT_REPORT", PROJECT_ROOT / ".stack" / "fault-report.json"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _CASES:
        return
    tr = terminalreporter
    faults: Counter = Counter()
    held: Counter = Counter()
    for c in _CASES:
        faults.update(c.faults)
        held.update(c.invariants)
    failed = [c for c in _CASES if c.outcome not in ("passed", "skipped")]
    tr.section("fault tier report")
    width = max(len(c.nodeid) for c in _CASES)
    width = min(width, 90)
    for c in _CASES:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(c.faults.items())) or "-"
        inv = ",".join(sorted(c.invariants)) or "-"
        tr.write_line(
            f"{c.outcome:7} {c.nodeid[:width]:<{width}} {c.seconds:6.1f}s faults {sum(c.faults.values()):4d} "
            f"[{kinds[:80]}] invariants {inv}"
        )
    tr.write_line(
        f"cases {len(_CASES)}, failed {len(failed)}; faults injected {sum(faults.values())} "
        f"({len(faults)} kinds); invariant checks held {sum(held.values())} "
        + "("
        + ", ".join(f"{k} x{n}" for k, n in sorted(held.items()))
        + ")"
    )
    data = {
        "cases": [
            {
                "case": c.nodeid,
                "outcome": c.outcome,
                "seconds": c.seconds,
                "faults": dict(c.faults),
                "invariants_held": dict(c.invariants),
                "notes": c.notes,
            }
            for c in _CASES
        ],
        "totals": {
            "cases": len(_CASES),
            "failed": len(failed),
            "faults_injected": sum(faults.values()),
            "faults_by_kind": dict(faults),
            "invariant_checks_held": dict(held),
        },
    }
    path = _report_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        tr.write_line(f"fault report written to {path}")
    except OSError as exc:
        tr.write_line(f"fault report not written to {path}: {exc}")
