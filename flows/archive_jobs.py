"""Archive jobs as a deployment, for schedulers: ``archive-job/archive`` runs one job (a
JSONL file readable by the worker, or a synthetic batch) exactly as ``archive-kms archive``
does (``operations.archive.submit_job``): everything checked before any write, deferred
while the tenant's gate is paused (replayed at resume), rolled back if it fails part-way,
and idempotent by ``job_id`` (docs/archive-jobs.md).

Thin: the flow builds this process's platform and calls the library. A refusal (bad input)
ends the flow run Failed with the one-line error as its message, without a traceback.
"""

from __future__ import annotations

from typing import Any

from archive_kms.flows.migration import _refused, process_platform
from prefect import flow, get_run_logger

from archive_kms.errors import ArchiveKmsError
from archive_kms.operations.archive import job_from_options, submit_job


@flow(name="archive-job", flow_run_name="archive-{tenant}", persist_result=False, retries=0)
def archive(
    tenant: str,
    job_id: str | None = None,
    jsonl: str | None = None,
    attachments_root: str | None = None,
    generate: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> Any:
    """Run one archive job for ``tenant`` (``jsonl`` or ``generate``, as the CLI takes them)."""
    try:
        spec = job_from_options(
            tenant,
            job_id=job_id,
            jsonl=jsonl,
            attachments_root=attachments_root,
            generate=generate,
            seed=seed,
            offset=offset,
        )
        platform = process_platform()
        out = submit_job(platform.state, spec, platform.open_archive)
    except ArchiveKmsError as exc:
        return _refused(exc)
    get_run_logger().info(
        "job %s for %s: %s; %d records, %d objects written, %d indexed",
        out.job_id,
        tenant,
        out.decision,
        out.records,
        out.objects_written,
        out.indexed,
    )
    return dict(out.__dict__)
