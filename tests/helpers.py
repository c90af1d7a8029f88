"""Small helpers shared by the tests: real loopback sockets, hashes, resource counts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60, *, uvloop: bool = False) -> T:
    """Run ``coro`` on a fresh loop, failing after ``timeout`` seconds instead of hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    if uvloop:
        import uvloop as uv

        return uv.run(bounded())
    return asyncio.run(bounded())


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one real TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


async def await_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def threads() -> int:
    return threading.active_count()


def recv_all(sock: socket.socket) -> bytes:
    """Blocking read until EOF."""
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
