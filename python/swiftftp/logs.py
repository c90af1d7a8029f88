"""Logging: a plain format for people, JSON lines for machines, the session id on
every line a session writes, and the transfer log."""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import orjson

#: Id of the connection whose task is logging ("-" outside any).
session_id: ContextVar[str] = ContextVar("session_id", default="-")

PLAIN = "%(asctime)s %(levelname)s [%(session)s] %(name)s: %(message)s"


class SessionFilter(logging.Filter):
    """Stamps each record with the id of the session it was logged from."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session = session_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "session": getattr(record, "session", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _iso(timestamp: float) -> str:
    ms = int(timestamp * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{ms:03d}Z"


def setup(log_format: str = "plain", verbose: bool = False) -> None:
    """Configure the root logger on stderr (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_swiftftp", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._swiftftp = True  # type: ignore[attr-defined]
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


transfers = logging.getLogger("swiftftp.transfers")


def setup_transfer_log(target: str | Path | None, log_format: str) -> None:
    """Send the transfer log to a file (``-``: stderr); never into the general log."""
    for handler in list(transfers.handlers):
        transfers.removeHandler(handler)
        handler.close()
    transfers.propagate = False
    transfers.setLevel(logging.INFO)
    if target is None:
        return
    if str(target) == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._json = log_format == "json"  # type: ignore[attr-defined]
    transfers.addHandler(handler)


def log_transfer(**fields: Any) -> None:
    """One line per finished data connection (format: README, "Transfer log")."""
    if not transfers.handlers:
        return
    fields = {"time": _iso(time.time()), **fields}
    if getattr(transfers.handlers[0], "_json", False):
        transfers.info(orjson.dumps(fields).decode())
    else:
        transfers.info(" ".join(f"{k}={v}" for k, v in fields.items()))
