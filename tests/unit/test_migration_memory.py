"""The migration process's copy budget and allocator limits (ADR 0019). Fast, no services."""

from __future__ import annotations

import threading
import time

from archive_kms.migration.memory import OBJECT_OVERHEAD, CopyBudget, limit_allocator

MiB = 1024 * 1024


def test_cost_counts_the_part_twice_and_the_overhead():
    assert CopyBudget.cost(100, 8 * MiB) == 200 + OBJECT_OVERHEAD
    assert CopyBudget.cost(400 * MiB, 8 * MiB) == 16 * MiB + OBJECT_OVERHEAD  # a big object: its parts, not its size


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
