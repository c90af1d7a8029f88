"""Logging: a plain format for people, JSON lines for machines, the session id on
every line a session writes, structured events, and the transfer log.

Structured events carry their facts as fields, not as one formatted string::

    logs.event(log, "session_close", prefix="mugvk", peer="203.0.113.7:58578", up=45)

is ``session close prefix=mugvk peer=203.0.113.7:58578 up=45`` in the plain
format, and ``{"event": "session_close", "prefix": "mugvk", "peer": …, "up": 45,
"message": "session close prefix=…"}`` (with ``time``, ``level``, ``logger``,
``session``) in the JSON format.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import orjson

#: Id of the connection whose task is logging ("-" outside any).
session_id: ContextVar[str] = ContextVar("session_id", default="-")

PLAIN = "%(asctime)s %(levelname)s [%(session)s] %(name)s: %(message)s"

#: Keys every JSON line has; an event's fields may not reuse them (``session`` may:
#: an explicit session id wins over the logging task's).
_RESERVED = frozenset({"time", "level", "logger", "message", "event", "exception"})


class SessionFilter(logging.Filter):
    """Stamps each record with the id of the session it was logged from."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session = session_id.get()
        return True


#: What makes a value need quotes in a plain line (a regex: a per-character scan was a
#: tenth of a reconnect storm's logging).
_QUOTE = re.compile(r'[\s"=\\]')


def plain_value(value: Any) -> str:
    """A field's value as it appears after ``key=`` in plain lines: bare when it is a
    single word, else JSON-quoted (so ``key=value`` lines split on spaces)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if text and _QUOTE.search(text) is None:
        return text
    return orjson.dumps(text).decode()


def json_value(value: Any) -> Any:
    """A field's value in JSON lines: numbers, booleans and null as they are, else text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return round(value, 6)
    return str(value)


def render(name: str, fields: dict[str, Any]) -> str:
    """The plain text of an event: its name in words, then ``key=value`` pairs."""
    words = name.replace("_", " ")
    pairs = " ".join(f"{k}={plain_value(v)}" for k, v in fields.items() if v is not None)
    return f"{words} {pairs}" if pairs else words


def event(
    logger: logging.Logger, name: str, /, *, level: int = logging.INFO, exc_info: Any = None,
    **fields: Any,
) -> None:
    """Log the event ``name`` (``snake_case``) with its fields (``None`` ones are left out).

    Plain lines read ``name in words key=value …``; JSON lines get ``event``, one
    key per field, and the same text as ``message``.
    """
    clash = _RESERVED.intersection(fields)
    if clash:
        raise TypeError(f"log fields may not be named {', '.join(sorted(clash))}")
    if not logger.isEnabledFor(level):
        return
    fields = {k: v for k, v in fields.items() if v is not None}
    logger.log(level, "%s", render(name, fields), exc_info=exc_info, stacklevel=2,
               extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``session``, an
    event's ``event`` and fields, ``message`` (and ``exception``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "session": getattr(record, "session", "-"),
        }
        name = getattr(record, "event", None)
        if name:
            entry["event"] = name
            entry.update((k, json_value(v)) for k, v in getattr(record, "fields", {}).items())
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _iso(timestamp: float) -> str:
    ms = int(timestamp * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{ms:03d}Z"


def setup(log_format: str = "plain", verbose: bool = False, level: int | None = None) -> None:
    """Configure the root logger on stderr (idempotent); ``level`` overrides INFO
    (DEBUG with ``verbose``)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_swiftftp", False):
            root.removeHandler(handler)
    # No record needs its caller's file and line, nor the process id or thread name:
    # skipping them saves a stack walk and a getpid() per line (a reconnect storm of
    # 15,000 devices logs tens of thousands of lines).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler._swiftftp = True  # type: ignore[attr-defined]
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else level if level is not None else logging.INFO)


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


def reopen() -> int:
    """Reopen the log files (the transfer log) at their paths, e.g. after logrotate
    renamed them (SIGHUP); returns how many were reopened."""
    count = 0
    for handler in transfers.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
            count += 1
    return count


def log_transfer(**fields: Any) -> None:
    """One line per finished data connection (format: README, "Transfer log")."""
    if not transfers.handlers:
        return
    fields = {"time": _iso(time.time()), **fields}
    if getattr(transfers.handlers[0], "_json", False):
        transfers.info(orjson.dumps({k: json_value(v) for k, v in fields.items()}).decode())
    else:
        transfers.info(" ".join(f"{k}={plain_value(v)}" for k, v in fields.items()))


class Refusals:
    """Refusals and other stranger-driven events, logged per reason as a summary.

    The first of a reason in a quiet period is logged at once, with its detail;
    the ones after it are counted and logged every ``interval`` seconds as one
    line per reason (how many, and the addresses that caused most of them), so
    a probe sizes the counts, not the log. Memory is bounded: at most
    ``max_addresses`` addresses are told apart per reason, the rest are summed.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_addresses: int = 1000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_addresses = max_addresses
        self._counts: dict[str, int] = {}
        self._addresses: dict[str, dict[str, int]] = {}

    def add(self, reason: str, detail: str = "", address: str = "") -> None:
        if reason not in self._counts:
            self._counts[reason] = 0
            event(self.logger, "refused", level=logging.WARNING, reason=reason, detail=detail or None)
            return
        self._counts[reason] += 1
        if address:
            by_address = self._addresses.setdefault(reason, {})
            if address in by_address or len(by_address) < self.max_addresses:
                by_address[address] = by_address.get(address, 0) + 1

    def flush(self) -> None:
        """Log the summary of the period that ended; reasons quiet in it are forgotten
        (the next one is logged at once again)."""
        for reason, count in list(self._counts.items()):
            if not count:
                del self._counts[reason]
                continue
            by_address = self._addresses.pop(reason, {})
            top = sorted(by_address.items(), key=lambda kv: -kv[1])[:3]
            event(self.logger, "refused_summary", level=logging.WARNING, reason=reason, count=count,
                  seconds=self.interval, top=", ".join(f"{a} x{n}" for a, n in top) or None)
            self._counts[reason] = 0

    async def run(self) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
