"""Work the steps run on threads beside their own: one place that starts those threads
and always ends them.

``beside`` runs one call (a second listing, an index deletion) while the step does its
own part; ``worker_threads`` is a pool for many calls (the record reader's loads). Both
join their threads when the block ends, however it ends: a step never returns, or raises,
with its work still running. Calls not started yet are cancelled when the block raises
(or a generator holding the pool is closed). An error of a call is raised unchanged by
``Future.result()``; ``beside`` raises it on leaving a block that finished without asking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["beside", "worker_threads"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


@contextmanager
def worker_threads(workers: int, *, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads named ``name-N`` for the block; on leaving it, calls
    still queued are cancelled and the running ones joined."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def beside(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[Future[_T]]:
    """``fn(*args, **kwargs)`` on its own thread (named after ``fn``) while the block runs.
    Leaving the block waits for the call to end. If the block raised, that error goes on
    (the call's own outcome is dropped); if it did not, the call's error, if any, is raised
    as it was (the block may have read it already through ``result()``)."""
    with worker_threads(1, name=f"akms-{getattr(fn, '__name__', 'beside')}") as pool:
        future = pool.submit(fn, *args, **kwargs)
        yield future  # an error here: worker_threads cancels the call if it has not started
        wait([future])  # the block ended well: the call runs to its end, never cancelled
    future.result()
