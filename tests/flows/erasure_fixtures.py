"""A tenant with data in two time buckets on the real services, for the erase tests
(``test_erase_e2e.py``, ``test_lifecycle_crash.py``).

The keychain's bucket width is ``BUCKET_SECONDS`` (2 s) instead of an hour: the first job
is archived, the test waits for the next bucket boundary (the **cutoff**), and the second
job is archived after it. Erasing ``--before cutoff`` must take exactly the first job's
objects, keys and index documents."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from archive_kms.operations.archive import RECORD_PREFIX, JobSpec, submit_job
from archive_kms.operations.tenants import create_tenant
from archive_kms.search.documents import document_id

BUCKET_SECONDS = 2


@dataclass(frozen=True)
class TwoBuckets:
    tenant_id: str
    cutoff: datetime  # the start of the second job's bucket
    old: frozenset[bytes]  # objects of the first job (before the cutoff)
    new: frozenset[bytes]  # objects of the second job

    @property
    def old_records(self) -> set[tuple[str, str, str]]:
        return record_keys(self.old)

    @property
    def new_records(self) -> set[tuple[str, str, str]]:
        return record_keys(self.new)


def record_keys(names: Any) -> set[tuple[str, str, str]]:
    out = set()
    for n in names:
        if n.startswith(RECORD_PREFIX):
            _, ws, typ, rid = n.decode().split("/", 3)
            out.add((ws, typ, rid))
    return out


def doc_ids(platform: Any, tenant_id: str, records: set[tuple[str, str, str]]) -> set[str]:
    """The document ids of ``records`` in the tenant's index as its key mode makes them."""
    from archive_kms.domain.records import Record

    t = platform.state.get_tenant(tenant_id)
    keys = platform.search_keys(tenant_id, t.key_mode)
    return {document_id(tenant_id, Record(typ, rid, {}, (), ws), keys) for ws, typ, rid in records}


def listing(platform: Any, tenant_id: str) -> set[bytes]:
    return {i.name for i in platform.store_for(platform.location_of(tenant_id)).list()}


def two_buckets(
    platform: Any, tenant_id: str, *, cloud: str, key_ref: str | None = None, records: int = 6
) -> TwoBuckets:
    assert platform.settings.dek_bucket_seconds == BUCKET_SECONDS, "use the erase tests' flow_settings"
    create_tenant(platform, tenant_id, cloud=cloud, key_ref=key_ref, actor="test")

    def job(name: str, offset: int) -> JobSpec:
        return JobSpec(
            f"{tenant_id}-{name}",
            tenant_id,
            "synthetic",
            synthetic={"count": records, "seed": 5, "offset": offset, "mix": "small", "workspaces": 2},
        )

    assert submit_job(platform.state, job("old", 0), platform.open_archive).decision == "run"
    old = listing(platform, tenant_id)
    boundary = (int(time.time()) // BUCKET_SECONDS + 1) * BUCKET_SECONDS
    time.sleep(max(0.0, boundary - time.time()) + 0.05)
    assert submit_job(platform.state, job("new", 1000), platform.open_archive).decision == "run"
    new = listing(platform, tenant_id) - old
    assert old and new
    return TwoBuckets(tenant_id, datetime.fromtimestamp(boundary, UTC), frozenset(old), frozenset(new))
