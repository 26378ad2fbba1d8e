"""``migration.threads``: the work steps run beside their own always ends with the block.
Fast, no services."""

from __future__ import annotations

import threading
import time

import pytest

from archive_kms.migration.threads import beside, worker_threads


class Boom(Exception):
    pass


def test_beside_runs_the_call_on_its_own_thread_and_hands_back_its_result():
    seen: dict[str, str] = {}

    def listing(n: int, *, step: int) -> list[int]:
        seen["thread"] = threading.current_thread().name
        return list(range(0, n, step))

    with beside(listing, 6, step=2) as future:
        mine = threading.current_thread().name
    assert future.done()
    assert future.result() == [0, 2, 4]
    assert seen["thread"] != mine and seen["thread"].startswith("akms-listing")


def test_beside_raises_the_calls_error_unchanged_even_when_the_block_never_asked():
    err = Boom("source listing failed")

    def failing() -> None:
        raise err

    with pytest.raises(Boom) as raised:
        with beside(failing) as future:
            pass
    assert raised.value is err
    with pytest.raises(Boom) as again:
        future.result()
    assert again.value is err


def test_beside_joins_the_call_before_the_block_is_left_and_the_blocks_error_wins():
    started, release = threading.Event(), threading.Event()
    ended: list[bool] = []

    def slow() -> None:
        started.set()
        release.wait(5)
        ended.append(True)
        raise Boom("the call's own error is dropped")

    def let_go() -> None:
        time.sleep(0.05)
        release.set()

    with pytest.raises(KeyError):
        with beside(slow):
            assert started.wait(5)
            threading.Thread(target=let_go).start()
            raise KeyError("the block's error")
    assert ended == [True]  # joined: nothing of the step still runs once it raised


def test_beside_a_quick_block_never_cancels_a_call_that_has_not_started_yet():
    for _ in range(50):
        with beside(lambda: 7) as future:
            pass  # ends at once, maybe before the thread took the call
        assert future.result() == 7


def test_worker_threads_cancel_queued_calls_and_join_running_ones_when_left_early():
    gate = threading.Event()
    running = threading.Semaphore(0)
    ran: list[int] = []

    def load(i: int) -> int:
        running.release()
        gate.wait(5)
        ran.append(i)
        return i

    def reader():
        with worker_threads(2, name="akms-test") as pool:
            futures = [pool.submit(load, i) for i in range(20)]
            yield futures

    gen = reader()
    futures = next(gen)
    assert running.acquire(timeout=5) and running.acquire(timeout=5)  # both threads busy
    threading.Timer(0.05, gate.set).start()
    gen.close()  # the consumer stopped reading
    assert sorted(ran) == [0, 1]  # the two running loads ended; the other 18 never started
    assert all(f.cancelled() for f in futures[2:])
