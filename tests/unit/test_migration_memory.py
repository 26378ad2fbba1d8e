"""The migration process's copy budget and allocator limits (ADR 0019). Fast, no services."""

from __future__ import annotations

import threading
import time

from archive_kms.config import Settings
from archive_kms.migration.memory import (
    OBJECT_OVERHEAD,
    SEGMENT,
    SEGMENT_COPIES,
    CopyBudget,
    limit_allocator,
)

MiB = 1024 * 1024


def test_cost_counts_what_an_object_in_flight_holds():
    # A small object: its one part and its segment buffers, each no larger than itself
    # (ADR 0046: the encryptor's buffer grows to the object, not to a whole segment).
    assert CopyBudget.cost(100, 8 * MiB) == 100 + SEGMENT_COPIES * 100 + OBJECT_OVERHEAD
    assert CopyBudget.cost(5 * MiB, 8 * MiB) == 5 * MiB + SEGMENT_COPIES * SEGMENT + OBJECT_OVERHEAD
    # An object of several parts: the part being cut and one its writer may upload, not its size.
    big = 2 * 8 * MiB + SEGMENT_COPIES * SEGMENT + OBJECT_OVERHEAD
    assert CopyBudget.cost(400 * MiB, 8 * MiB) == big == CopyBudget.cost(2048 * MiB, 8 * MiB)
    assert CopyBudget.cost(0, 8 * MiB) == OBJECT_OVERHEAD


def test_default_budgets_are_the_documented_ones():
    # The settings are the one source of the budgets' defaults; the docs state them.
    from pathlib import Path

    flows = (Path(__file__).parents[2] / "docs" / "migration-flows.md").read_text()
    fields = Settings.model_fields
    for name in ("migration_copy_buffer_mib", "migration_upload_buffer_mib"):
        assert f"`settings.{name}`, default {fields[name].default} MiB" in flows, name


def test_holders_never_exceed_the_capacity_and_an_oversized_one_runs_alone():
    budget = CopyBudget(10 * MiB)
    inside = {"now": 0, "max": 0, "alone": True}
    lock = threading.Lock()

    def work(cost: int) -> None:
        with budget.hold(cost):
            with lock:
                inside["now"] += min(cost, budget.capacity)
                inside["max"] = max(inside["max"], inside["now"])
                if cost > budget.capacity and inside["now"] != budget.capacity:
                    inside["alone"] = False
            time.sleep(0.01)
            with lock:
                inside["now"] -= min(cost, budget.capacity)

    threads = [threading.Thread(target=work, args=(c,)) for c in [3 * MiB] * 12 + [50 * MiB] + [2 * MiB] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert inside["max"] <= 10 * MiB and budget.peak <= 10 * MiB and inside["alone"]


def test_limit_allocator_is_idempotent():
    first = limit_allocator()
    assert limit_allocator() is True or first is False
