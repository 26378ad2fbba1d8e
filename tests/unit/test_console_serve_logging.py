"""`archive-kms console serve` leaves the process's logging alone: uvicorn gets
``log_config=None`` (no ``dictConfig``, which cleared, flushed and closed every handler
under the logging lock and deadlocked against a thread holding Prefect's service lock),
and uvicorn's own warnings still reach stderr through the command's handler."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import pytest
from typer.testing import CliRunner

from archive_kms import cli


class WatchedHandler(logging.Handler):
    """A handler that records being flushed or closed (what dictConfig does to all)."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: list[str] = []
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def flush(self) -> None:
        self.touched.append("flush")

    def close(self) -> None:
        self.touched.append("close")
        super().close()


def test_console_serve_does_not_reconfigure_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import archive_kms.api.app as api_app

    served: dict[str, Any] = {}

    def run(app: Any, **kwargs: Any) -> None:
        served.update(kwargs)
        uvicorn.Config(app, **kwargs)  # what uvicorn.run does first: configures logging
        logging.getLogger("uvicorn.error").warning("port in use (a uvicorn warning)")

    def no_dict_config(*_: Any, **__: Any) -> None:
        raise AssertionError("dictConfig called: the process's handlers would be cleared and flushed")

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(logging.config, "dictConfig", no_dict_config)
    monkeypatch.setattr(cli, "_prefect_api", lambda: "http://127.0.0.1:1/api")
    monkeypatch.setattr(api_app, "console_from_settings", lambda settings: object())
    monkeypatch.setattr(api_app, "create_app", lambda console: object())
    watched = WatchedHandler()
    prefect_logger = logging.getLogger("prefect.test-console-serve")
    prefect_logger.addHandler(watched)
    uvicorn_logger = logging.getLogger("uvicorn")
    before = (list(uvicorn_logger.handlers), uvicorn_logger.propagate)
    try:
        port = _free_port()  # console serve first checks that it can listen there
        result = CliRunner().invoke(cli.app, ["console", "serve", "--port", str(port)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert served["log_config"] is None and served["port"] == port
        assert watched.touched == [] and prefect_logger.handlers == [watched]  # left alone
        ours = [h for h in uvicorn_logger.handlers if getattr(h, "archive_kms_console", False)]
        assert len(ours) == 1 and uvicorn_logger.propagate is False
        record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "port in use", None, None)
        assert ours[0].format(record) == "WARNING uvicorn.error: port in use"
    finally:
        prefect_logger.removeHandler(watched)
        uvicorn_logger.handlers[:], uvicorn_logger.propagate = before


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(monkeypatch: pytest.MonkeyPatch, *args: str, run: Any = None):
    import uvicorn

    import archive_kms.api.app as api_app

    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", run or (lambda app, **kw: started.append(kw)))
    monkeypatch.setattr(cli, "_prefect_api", lambda: "http://127.0.0.1:1/api")
    monkeypatch.setattr(api_app, "console_from_settings", lambda settings: object())
    monkeypatch.setattr(api_app, "create_app", lambda console: object())
    return CliRunner().invoke(cli.app, ["console", "serve", *args]), started


def test_an_address_the_console_cannot_listen_on_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: errors are one line naming what to fix, exit code 2; uvicorn's own startup
    failure was exit 3 (our code for a bug) and a port out of range a traceback."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        out, started = _serve(monkeypatch, "--host", "127.0.0.1", "--port", str(busy))
    assert out.exit_code == 2 and not started, out.output
    assert out.output.startswith(f"error: cannot listen on 127.0.0.1:{busy}: ") and out.output.count("\n") == 1

    out, started = _serve(monkeypatch, "--host", "no-such-host.invalid", "--port", str(_free_port()))
    assert out.exit_code == 2 and not started and out.output.startswith("error: --host 'no-such-host.invalid'")

    for port in ("0", "70000"):
        out, started = _serve(monkeypatch, "--port", port)
        assert out.exit_code == 2 and not started and "--port" in out.output and "Traceback" not in out.output

    def startup_failure(app: Any, **kw: Any) -> None:
        raise SystemExit(3)  # what uvicorn does when it cannot bind after all (a race with another process)

    port = _free_port()
    out, _ = _serve(monkeypatch, "--host", "127.0.0.1", "--port", str(port), run=startup_failure)
    assert out.exit_code == 2 and f"error: the console could not start on http://127.0.0.1:{port}/" in out.output


def test_the_console_listens_where_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    out, started = _serve(monkeypatch, "--host", "127.0.0.1", "--port", str(port))
    assert out.exit_code == 0, out.output
    assert (started[0]["host"], started[0]["port"]) == ("127.0.0.1", port)
