"""A warm serving process for the revocation tests (tests/flows/test_revocation.py) and
the revocation benchmark (bench/bench_revocation.py).

    python tests/flows/probe_reader.py TENANT WORKSPACE TYPE RECORD_ID OUT.jsonl [--hz 10] [--seconds 120]

Builds ``Platform.from_settings(Settings())`` (the test passes the state store URL and any
key-state settings through ``ARCHIVE_KMS_*``), opens the tenant's archive *once* and keeps
it, reads the record and runs a search at ``--hz``, and appends one JSON line per attempt
to OUT: ``{"t": unix time, "op": "read"|"search", "ok": bool, "error": type, "message":
first 200 chars}``. The first line is ``{"ready": true, "t": ...}``, written once a read
and a search have succeeded (its caches are warm). Stops after ``--seconds`` or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probe_reader.py")
    parser.add_argument("tenant")
    parser.add_argument("workspace")
    parser.add_argument("object_type")
    parser.add_argument("record_id")
    parser.add_argument("out")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)

    from archive_kms.config import Settings
    from archive_kms.operations.platform import Platform
    from archive_kms.search import Query

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    platform = Platform.from_settings(Settings())
    archive = platform.open_archive(args.tenant)  # kept for the whole run: a warm process

    def read() -> None:
        archive.read_record(args.workspace, args.object_type, args.record_id)

    def search() -> None:
        archive.search(Query(limit=5))

    with open(args.out, "a", buffering=1) as out:

        def log(line: dict[str, Any]) -> None:
            out.write(json.dumps(line) + "\n")
            out.flush()

        deadline = time.monotonic() + 60
        while True:  # warm up: both succeed once
            try:
                read()
                search()
                break
            except Exception as exc:  # noqa: BLE001 - the stack may still be settling
                if time.monotonic() > deadline:
                    log({"ready": False, "error": type(exc).__name__, "message": str(exc)[:200]})
                    return 2
                time.sleep(0.2)
        log({"ready": True, "t": time.time()})
        period = 1.0 / args.hz
        end = time.monotonic() + args.seconds
        while not stop["now"] and time.monotonic() < end:
            tick = time.monotonic()
            for op, fn in (("read", read), ("search", search)):
                try:
                    fn()
                    log({"t": time.time(), "op": op, "ok": True})
                except Exception as exc:  # noqa: BLE001 - every refusal is the data
                    log(
                        {
                            "t": time.time(),
                            "op": op,
                            "ok": False,
                            "error": type(exc).__name__,
                            "message": str(exc)[:200],
                        }
                    )
            time.sleep(max(0.0, period - (time.monotonic() - tick)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
