"""bench/bench_migration.py runs end to end on a tiny archive: both copies complete, and it
prints the ratio ours/rclone and both peak RSS figures. Timings are reported, never judged
here: the figures depend on the machine and on whatever else it is running."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from archive_kms.config import PROJECT_ROOT

BENCH = PROJECT_ROOT / "bench" / "bench_migration.py"
TIMEOUT_S = 300  # a hang fails the test instead of the session
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("rclone") is None:
        raise AssertionError("rclone is not installed: run localstack/system-deps.sh (or apt-get install -y rclone)")
    return subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--objects",
            "20",
            "--mix",
            "small",
            "--parallel-shards",
            "2",
            "--threads",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_bench_prints_ratio_and_peak_rss(localstack, elasticsearch) -> None:
    done = _run_bench()
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    ratio = re.search(rf"^ratio ours/rclone \(copy \+ verify\): {NUMBER}", done.stdout, re.MULTILINE)
    rss = re.search(rf"^peak RSS: ours {NUMBER} MiB, rclone {NUMBER} MiB", done.stdout, re.MULTILINE)
    assert ratio is not None, done.stdout
    assert rss is not None, done.stdout
    assert float(ratio.group(1)) > 0
    assert float(rss.group(1)) > 0 and float(rss.group(2)) > 0
    # Same data on both sides: the table names the object count and rclone's concurrency.
    assert re.search(r"^data: [0-9]+ objects \(20 records", done.stdout, re.MULTILINE), done.stdout
    assert "rclone --transfers 4 --checkers 4 --disable Copy" in done.stdout
    raw = re.search(rf"^ratio ours/raw boto3 \(copy \+ verify\): {NUMBER}", done.stdout, re.MULTILINE)
    assert raw is not None and float(raw.group(1)) > 0, done.stdout
    assert re.search(r"^verify mode: attested$", done.stdout, re.MULTILINE), done.stdout


def test_bench_json_has_the_figures(localstack, elasticsearch) -> None:
    done = _run_bench("--json")
    assert done.returncode == 0, f"exit {done.returncode}\nstderr:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    assert result["ratio"] > 0
    assert result["ours"]["peak_rss_bytes"] > 0 and result["rclone"]["peak_rss_bytes"] > 0
    assert result["data"]["objects"] == result["data"]["records"] + result["data"]["attachments"]
    assert result["ours"]["copy_seconds"] > 0 and result["ours"]["verify_seconds"] > 0
    step_cpu = result["ours"]["step_cpu_seconds"]
    assert set(step_cpu) == set(result["ours"]["steps"]) and step_cpu["build_index"] > 0, step_cpu
    assert result["raw_boto3"]["seconds"] > 0 and result["ratio_vs_raw_boto3"] > 0


def test_bench_index_prints_its_ratio(elasticsearch) -> None:
    """bench/bench_index.py on 60 records, one repeat: it completes and prints the ratio
    of our rebuild to the faster raw bulk peer (no timing is judged)."""
    done = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "bench" / "bench_index.py"),
            "--records",
            "60",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstderr:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    assert result["records"] == 60 and result["median"]["ratio"] > 0
    run = result["runs"][0]
    assert set(run) == {"ours", "bulk", "parallel_bulk", "ratio", "ours_cpu", "bulk_cpu", "parallel_bulk_cpu"}
    assert all(run[k] > 0 for k in ("ours_cpu", "bulk_cpu", "parallel_bulk_cpu"))
