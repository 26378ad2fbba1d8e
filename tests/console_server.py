"""The console served by uvicorn on a free loopback port, in a thread of the test process
(for the tests that talk to it over real HTTP: the worker end-to-end and the browser)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served at the yielded base URL until the block ends."""
    import uvicorn

    port = free_port()
    # log_config=None: uvicorn must not reconfigure this process's logging. Its dictConfig
    # takes the logging lock and flushes every handler, Prefect's API log handler among
    # them, while a background thread (a key-state probe emitting a Prefect event) may hold
    # Prefect's service lock and wait for the logging lock: the suite deadlocked there once.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="console-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the console did not start serving")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
