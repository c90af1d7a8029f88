"""Structured log events in both formats, and the transfer log reopened after a rotation."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from swiftftp import logs


def capture(log_format: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.SessionFilter())
    handler.setFormatter(logs.JsonFormatter() if log_format == "json" else logging.Formatter(logs.PLAIN))
    logger = logging.getLogger(f"swiftftp.test.{log_format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_event_plain_is_key_value() -> None:
    logger, stream = capture("plain")
    token = logs.session_id.set("ftp12")
    try:
        logs.event(logger, "session_close", prefix="mugvk", peer="203.0.113.7:58578", up=45,
                   duration=0.15, reason="ok", note="two words", missing=None)
    finally:
        logs.session_id.reset(token)
    line = stream.getvalue().strip()
    assert line.endswith(' INFO [ftp12] swiftftp.test.plain: session close prefix=mugvk '
                         'peer=203.0.113.7:58578 up=45 duration=0.150 reason=ok note="two words"'), line


def test_event_json_has_fields() -> None:
    logger, stream = capture("json")
    logs.event(logger, "session_close", level=logging.WARNING, prefix="mugvk", up=45, duration=0.15,
               draining=True, session="dev40")
    entry = orjson.loads(stream.getvalue())
    assert entry["event"] == "session_close" and entry["level"] == "warning"
    assert (entry["prefix"], entry["up"], entry["duration"], entry["draining"]) == ("mugvk", 45, 0.15, True)
    assert entry["session"] == "dev40"  # an explicit session id wins
    assert entry["message"] == "session close prefix=mugvk up=45 duration=0.150 draining=true session=dev40"
    assert {"time", "logger"} <= set(entry)


def test_event_without_fields_is_its_name_and_reserved_names_are_refused() -> None:
    logger, stream = capture("json")
    logs.event(logger, "stopped")
    assert orjson.loads(stream.getvalue())["message"] == "stopped"
    with pytest.raises(TypeError):
        logs.event(logger, "x", message="no")


def test_event_exception_in_json() -> None:
    logger, stream = capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        logs.event(logger, "flush_failed", level=logging.ERROR, exc_info=True)
    entry = orjson.loads(stream.getvalue())
    assert "ValueError: boom" in entry["exception"] and entry["message"] == "flush failed"


def test_transfer_log_reopened_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "transfers.log"
    logs.setup_transfer_log(path, "plain")
    try:
        logs.log_transfer(session="dev1", outcome="ok")
        path.rename(tmp_path / "transfers.log.1")
        logs.log_transfer(session="dev2", outcome="ok")  # still into the renamed file
        assert logs.reopen() == 1
        logs.log_transfer(session="dev3", outcome="ConnectionResetError")
    finally:
        logs.setup_transfer_log(None, "plain")
    old = (tmp_path / "transfers.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [line.split()[1] for line in old] == ["session=dev1", "session=dev2"]
    assert len(new) == 1 and new[0].endswith("session=dev3 outcome=ConnectionResetError")
