"""The node's local control socket (``<state_dir>/control.sock``, mode 0600), through
which ``swiftftp-proxy devices message`` (and ``online``, ``unbind``) reach a running node.

One JSON request per line, one JSON reply per line: ``{"command": "message",
"prefix": "abcde", "text": "…"}`` → ``{"ok": true}`` or ``{"ok": false, "error": "…"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import logs
from .protocol import notice

if TYPE_CHECKING:
    from .state import Node


log = logging.getLogger("swiftftp.admin")


class AdminError(Exception):
    """The running node could not be asked: none runs there, or it did not answer."""


def socket_path(state_dir: Path) -> Path:
    """The control socket of the node whose state directory is ``state_dir``."""
    return state_dir / "control.sock"


async def _execute(node: Node, request: dict[str, Any]) -> dict[str, Any]:
    command = request.get("command")
    if command == "message":
        prefix, text = request.get("prefix"), request.get("text")
        if not isinstance(prefix, str) or not isinstance(text, str):
            return {"ok": False, "error": "message needs prefix and text"}
        device = node.table.online_device(prefix.lower())
        if device is None or device.command is None:
            return {"ok": False, "error": f"device {prefix!r} is not online on this node"}
        device.command.notify(notice(text))
        logs.event(log, "device_message", prefix=prefix.lower(), text=text)
        return {"ok": True}
    if command == "forget_key":  # `devices unbind` changed the registry file: read it again
        android_id = request.get("android_id")
        if not isinstance(android_id, str):
            return {"ok": False, "error": "forget_key needs android_id"}
        node.registry.forget_key(android_id)
        if node.keys is not None:  # and what it read of the fleet's (the bucket has changed too)
            node.keys.forget(android_id)
        logs.event(log, "device_unbound", android_id=android_id)
        return {"ok": True}
    if command == "online":
        table = node.table
        return {"ok": True, "prefixes": sorted(p for p in table.by_prefix if table.online_device(p))}
    return {"ok": False, "error": f"unknown command {command!r}"}


async def serve(node: Node, path: Path) -> asyncio.Server:
    """Listen on ``path`` (mode 0600) for requests to ``node``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request: a line of JSON in, a line of JSON out."""
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
                try:
                    request = orjson.loads(line)
                    reply = await _execute(node, request) if isinstance(request, dict) else None
                except orjson.JSONDecodeError:
                    reply = None
                reply = reply or {"ok": False, "error": "expected one JSON object"}
                writer.write(orjson.dumps(reply) + b"\n")
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(handle, str(path))
    finally:
        os.umask(old)


def request(path: Path, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send one request to a running node and return its reply (blocking; for the CLI).
    Raises :class:`AdminError` with one line saying why when there is no reply."""
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(orjson.dumps(message) + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise AdminError(f"the node at {path} did not answer within {timeout:g} s") from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise AdminError(f"no running node at {path}: {exc.strerror}") from None
    except OSError as exc:
        raise AdminError(f"cannot reach the node at {path}: {exc.strerror or exc}") from None
    if not data:
        raise AdminError(f"the node at {path} closed the connection without an answer")
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise AdminError(f"the node at {path} answered something else than JSON: {data[:80]!r}") from None
    if not isinstance(reply, dict):
        raise AdminError(f"the node at {path} answered {reply!r}, not a JSON object")
    return reply
