#!/usr/bin/env python3
"""Static checks of the templates in infra/: cfn-lint and checkov, in their own virtualenv.

    python infra/checks.py [cfn-lint|checkov|all] | --install

Standard library only. checkov pins many packages that would clash with the project's
own, so both tools live in ``<cache dir>/infra-checks-venv`` (the cache directory of
``localstack/stack.py``: ``ARCHIVE_KMS_CACHE_DIR``, else ``/var/cache/archive-kms`` as
root, else ``~/.cache/archive-kms``), installed once and reused.

Every suppressed rule is written next to the resource it concerns, with its reason
(checkov: ``Metadata: checkov: skip`` in CloudFormation, ``"metadata": {"checkov":
["CKV_...: reason"]}`` in ARM, ``# checkov:skip=CKV_...: reason`` in the Dockerfile);
``infra/README.md`` lists them all and tests/infra checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INFRA = Path(__file__).resolve().parent
ROOT = INFRA.parent
sys.path.insert(0, str(ROOT / "localstack"))
from stack import cache_dir, find_python  # noqa: E402 - the one definition of the cache dir

CFN_LINT_VERSION = "1.58.0"
CHECKOV_VERSION = "3.3.30"

AWS_TEMPLATES = sorted((INFRA / "aws").glob("*.yaml"))
AZURE_TEMPLATES = sorted((INFRA / "azure").glob("*.json"))


class ChecksError(RuntimeError):
    pass


def venv_dir() -> Path:
    return cache_dir() / "infra-checks-venv"


def ensure_tools() -> Path:
    """The virtualenv with cfn-lint and checkov at the pinned versions; installed once."""
    venv = venv_dir()
    pins = [f"cfn-lint=={CFN_LINT_VERSION}", f"checkov=={CHECKOV_VERSION}"]
    marker = venv / ".archive-kms-installed"
    if marker.exists() and marker.read_text() == " ".join(pins):
        return venv
    py = find_python("3.11", "3.12") or sys.executable
    log = venv.parent / "infra-checks-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"[infra] installing {' '.join(pins)} into {venv} (once)", file=sys.stderr, flush=True)
    with log.open("ab") as out:
        for cmd in (
            [py, "-m", "venv", "--clear", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins],
        ):
            if subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT) != 0:
                raise ChecksError(f"installing the infra checkers failed: {' '.join(cmd)} — see {log}")
    marker.write_text(" ".join(pins))
    return venv


@dataclass(frozen=True)
class CheckovResult:
    file: str
    passed: int
    failed: list[tuple[str, str, str]]  # (check id, resource, name)
    skipped: list[tuple[str, str, str]]  # (check id, resource, reason)
    parsing_errors: int


def _env() -> dict[str, str]:
    # checkov asks a SaaS for its guideline mapping unless told not to; nothing leaves here.
    return dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", LOG_LEVEL="ERROR")


def run_cfn_lint(templates: list[Path] | None = None) -> tuple[int, str]:
    """(exit code, output) of cfn-lint over the AWS templates; 0 means no finding."""
    venv = ensure_tools()
    files = [str(p) for p in (templates or AWS_TEMPLATES)]
    out = subprocess.run([str(venv / "bin" / "cfn-lint"), *files], capture_output=True, text=True, env=_env())
    return out.returncode, (out.stdout + out.stderr).strip()


def checkov_all() -> list[CheckovResult]:
    """checkov over every template and the Dockerfile in one run (one start-up, ~10 s);
    in-file suppressions count as skipped, with their reasons. One result per file."""
    venv = ensure_tools()
    files = [*AWS_TEMPLATES, *AZURE_TEMPLATES, ROOT / "Dockerfile"]
    cmd = [str(venv / "bin" / "checkov"), "--framework", "cloudformation", "arm", "dockerfile"]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += ["--skip-download", "--compact", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if out.returncode not in (0, 1):
        raise ChecksError(f"checkov failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_file: dict[str, dict[str, list]] = {
        f.relative_to(ROOT).as_posix(): {"passed": [], "failed": [], "skipped": []} for f in files
    }
    parsing_errors = 0
    for report in reports:
        results = report.get("results", {})
        parsing_errors += len(results.get("parsing_errors", []))
        for kind in ("passed", "failed", "skipped"):
            for c in results.get(f"{kind}_checks", []):
                path = c["file_path"]
                rel = path[len(str(ROOT)) :] if path.startswith(str(ROOT)) else path
                rel = rel.lstrip("/")
                by_file.setdefault(rel, {"passed": [], "failed": [], "skipped": []})[kind].append(c)
    return [
        CheckovResult(
            rel,
            len(r["passed"]),
            [(c["check_id"], c["resource"], c.get("check_name", "")) for c in r["failed"]],
            [
                (c["check_id"], c["resource"], (c.get("check_result") or {}).get("suppress_comment", ""))
                for c in r["skipped"]
            ],
            parsing_errors,
        )
        for rel, r in sorted(by_file.items())
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="cfn-lint and checkov over infra/")
    ap.add_argument("what", nargs="?", choices=["cfn-lint", "checkov", "all"], default="all")
    ap.add_argument("--install", action="store_true", help="only install the tools (cached) and exit")
    args = ap.parse_args(argv)
    rc = 0
    try:
        if args.install:
            print(f"[infra] checkers in {ensure_tools()}", file=sys.stderr)
            return 0
        if args.what in ("cfn-lint", "all"):
            code, text = run_cfn_lint()
            print(
                f"cfn-lint {CFN_LINT_VERSION}: {len(AWS_TEMPLATES)} templates, {'clean' if code == 0 else 'FINDINGS'}"
            )
            if text:
                print(text)
            rc |= code != 0
        if args.what in ("checkov", "all"):
            for r in checkov_all():
                print(f"checkov {r.file}: {r.passed} passed, {len(r.failed)} failed, {len(r.skipped)} skipped")
                for cid, res, name in r.failed:
                    print(f"  FAILED {cid} {res}: {name}")
                for cid, res, why in r.skipped:
                    print(f"  skipped {cid} {res}: {why}")
                rc |= bool(r.failed or r.parsing_errors)
    except ChecksError as e:
        print(f"infra checks: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
