"""Moving a tenant onto its own key and back: plan, steps, copy/verify shards, the step
engine and the run report. Plain functions; the Prefect flows in ``flows/`` compose them.
See ``docs/migration-flows.md``."""

from archive_kms.migration.engine import (
    Hooks,
    Outcome,
    WaiveOutcome,
    cancel,
    execute,
    rerun,
    resume,
    thread_shard_runner,
    trigger,
    waive,
)
from archive_kms.migration.plan import STEPS, EnableMode, MigrationPlan, plan_enable, plan_remove
from archive_kms.migration.report import build_report, progress
from archive_kms.migration.stopping import StopRequest, request_stop

__all__ = [
    "STEPS",
    "EnableMode",
    "Hooks",
    "MigrationPlan",
    "Outcome",
    "StopRequest",
    "WaiveOutcome",
    "build_report",
    "cancel",
    "execute",
    "plan_enable",
    "plan_remove",
    "progress",
    "request_stop",
    "rerun",
    "resume",
    "thread_shard_runner",
    "trigger",
    "waive",
]
