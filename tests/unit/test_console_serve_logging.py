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
        result = CliRunner().invoke(cli.app, ["console", "serve", "--port", "18799"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert served["log_config"] is None and served["port"] == 18799
        assert watched.touched == [] and prefect_logger.handlers == [watched]  # left alone
        ours = [h for h in uvicorn_logger.handlers if getattr(h, "archive_kms_console", False)]
        assert len(ours) == 1 and uvicorn_logger.propagate is False
        record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "port in use", None, None)
        assert ours[0].format(record) == "WARNING uvicorn.error: port in use"
    finally:
        prefect_logger.removeHandler(watched)
        uvicorn_logger.handlers[:], uvicorn_logger.propagate = before
