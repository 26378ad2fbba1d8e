"""Index rebuild against raw ``elasticsearch.helpers`` bulk: same documents, same Elasticsearch, same run.

    .venv/bin/python bench/bench_index.py [--records 5000] [--mode keyed|plaintext] [--repeats 3] [--json]

Needs the stack's Elasticsearch (`archive-kms stack up`). Per repeat, on fresh indices:

* **ours**: ``search.rebuild_generation`` of ``--records`` synthetic records (the ETL's
  indexing half: it builds every document, keyed tokens and sealed display fields for a
  keyed tenant, creates the generation, bulk-indexes with per-item retry, refreshes, counts
  and marks the generation complete) through ``ElasticsearchSearchIndex``, the adapter the
  migration uses;
* **peers**: the *same documents*, built beforehand and not timed, sent with
  ``elasticsearch.helpers.bulk`` (500 per request, one thread) and
  ``elasticsearch.helpers.parallel_bulk`` (500 per request, 4 threads) into an index
  created with the same mapping and settings, then refreshed and counted (timed from the
  index creation, as ours is).

The ratio is our throughput over the faster peer's (records per second), median of the
repeats; the target is >= 0.8. Every index made here is deleted at the end; timings are
printed, never judged (exit 1 only if a count is wrong).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.search import documents as D
from archive_kms.search.elasticsearch import ElasticsearchSearchIndex
from archive_kms.search.naming import index_name
from archive_kms.search.port import IndexMode
from archive_kms.search.rebuild import rebuild_generation
from archive_kms.search.tokens import derive_search_keys
from archive_kms.synthetic import generate_records

BATCH = 500


def records_for(tenant: str, n: int) -> list[Any]:
    return [record for record, _ in generate_records(tenant, n, seed=3, workspaces=2)]


def run_ours(
    index: ElasticsearchSearchIndex, tenant: str, gen: int, records: list[Any], mode: IndexMode, keys
) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    report = rebuild_generation(iter(records), index, tenant, gen, mode, keys, batch_size=BATCH)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    report.require_complete()
    if report.count != len(records):
        raise SystemExit(f"ours indexed {report.count} of {len(records)}")
    return seconds, cpu


def run_peer(
    es: Any, name: str, docs: list[Any], tenant: str, gen: int, mode: IndexMode, parallel: bool
) -> tuple[float, float]:
    from elasticsearch import helpers

    actions = ({"_op_type": "create", "_index": name, "_id": d.doc_id, "_source": dict(d.source)} for d in docs)
    started, cpu = time.perf_counter(), time.process_time()  # from index creation to a counted, refreshed index
    es.indices.create(index=name, mappings=D.index_mapping(tenant, gen, mode), settings=D.index_settings())
    if parallel:
        for ok, item in helpers.parallel_bulk(es, actions, chunk_size=BATCH, thread_count=4):
            if not ok:
                raise SystemExit(f"parallel_bulk item failed: {item}")
    else:
        ok, errors = helpers.bulk(es, actions, chunk_size=BATCH, stats_only=True)
        if errors:
            raise SystemExit(f"bulk: {errors} items failed")
    es.indices.refresh(index=name)
    count = es.count(index=name)["count"]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if count != len(docs):
        raise SystemExit(f"peer indexed {count} of {len(docs)}")
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--mode", choices=("keyed", "plaintext"), default="keyed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    es = clients.elasticsearch_client(settings)
    index = ElasticsearchSearchIndex(es)
    mode = IndexMode(args.mode)
    tenant = f"bench-idx-{uuid.uuid4().hex[:8]}"
    keys = derive_search_keys(SecretBytes.random(32), tenant) if mode is IndexMode.KEYED else None
    records = records_for(tenant, args.records)
    created: list[str] = []
    runs: list[dict[str, float]] = []
    try:
        for rep in range(args.repeats):
            gen = 10 + rep
            created.append(index_name(tenant, gen))
            ours, ours_cpu = run_ours(index, tenant, gen, records, mode, keys)
            docs = [D.build_document(r, tenant=tenant, mode=mode, keys=keys) for r in records]  # not timed
            peer_times, peer_cpu = {}, {}
            for label, parallel, g in (("bulk", False, 100 + rep), ("parallel_bulk", True, 200 + rep)):
                name = index_name(tenant, g)
                created.append(name)
                peer_times[label], peer_cpu[f"{label}_cpu"] = run_peer(es, name, docs, tenant, g, mode, parallel)
            best = min(peer_times.values())
            runs.append({"ours": ours, **peer_times, "ratio": best / ours, "ours_cpu": ours_cpu, **peer_cpu})
    finally:
        for name in created:
            es.options(ignore_status=404).indices.delete(index=name)
    result = {
        "records": len(records),
        "mode": mode.value,
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{len(records)} records, mode {mode.value}, {args.repeats} repeats (seconds; records/s)")
    for i, r in enumerate(runs, 1):
        print(
            f"  run {i}: ours {r['ours']:.2f} ({len(records) / r['ours']:.0f}/s)  bulk {r['bulk']:.2f}  "
            f"parallel_bulk {r['parallel_bulk']:.2f}  ratio {r['ratio']:.2f}  "
            f"CPU s ours {r['ours_cpu']:.2f} bulk {r['bulk_cpu']:.2f} parallel_bulk {r['parallel_bulk_cpu']:.2f}"
        )
    m = result["median"]
    print(
        f"median: ours {m['ours']:.2f} s, bulk {m['bulk']:.2f} s, parallel_bulk {m['parallel_bulk']:.2f} s; "
        f"ratio ours/best peer {m['ratio']:.2f}   (target >= 0.8); CPU s ours {m['ours_cpu']:.2f}, "
        f"bulk {m['bulk_cpu']:.2f}, parallel_bulk {m['parallel_bulk_cpu']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
