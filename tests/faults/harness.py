"""Small helpers the fault-tier modules share: reaching into a run at a step, and a
platform whose traffic to one service goes through a fault proxy."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

from archive_kms.config import Settings
from archive_kms.migration.steps import STEP_FUNCTIONS
from archive_kms.operations.platform import Platform


def at_step(monkeypatch, step: str, action: Callable[[], None], *, after: bool = False, once: bool = True) -> None:
    """Run ``action()`` when a run reaches ``step``: before the step's own work, or
    ``after`` it (its side effects done, its completion not yet recorded); by default
    only the first time (a resume runs the step again without it)."""
    real = STEP_FUNCTIONS[step]
    fired: list[bool] = []

    def wrapper(ctx, _real=real):
        go = not (once and fired)
        if go and not after:
            fired.append(True)
            action()
        result = _real(ctx)
        if go and after:
            fired.append(True)
            action()
        return result

    monkeypatch.setitem(STEP_FUNCTIONS, step, wrapper)


def upstream_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def proxied_platform(settings: Settings, **endpoints: str):
    """A platform on ``settings`` with some endpoints replaced (e.g. ``elasticsearch_url``
    pointing at a proxy)."""
    return Platform.from_settings(settings.model_copy(update=endpoints))


def run_in_worker(ctx, target, *args, timeout: float = 180) -> tuple[int | None, list]:
    """``target(*args, conn)`` in a worker process; (exit code, messages it sent)."""
    reader, writer = ctx.Pipe(False)
    proc = ctx.Process(target=target, args=(*args, writer))
    proc.start()
    writer.close()
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reader.poll(0.2):
            try:
                messages.append(reader.recv())
            except EOFError:
                break
        elif not proc.is_alive():
            break
    proc.join(max(0.0, deadline - time.monotonic()))
    if proc.is_alive():
        proc.kill()
        proc.join()
    while reader.poll(0):  # what it sent just before it ended
        try:
            messages.append(reader.recv())
        except EOFError:
            break
    reader.close()
    return proc.exitcode, messages
