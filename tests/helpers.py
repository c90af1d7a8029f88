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


def fd_targets() -> dict[int, str]:
    """This process's open file descriptors and what each points at."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own fd, or one closed meanwhile
            pass
    return targets


def _tcp_endpoints() -> dict[str, str]:
    """socket inode -> 'local -> remote state' for this process's TCP sockets (IPv4)."""
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    found = {}
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            found[inode] = f"{_addr(local)} -> {_addr(remote)} {states.get(state, state)}"
    return found


def _addr(hex_endpoint: str) -> str:
    ip, port = hex_endpoint.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(port, 16)}"


def wait_for_fds(baseline: dict[int, str], timeout: float = 10) -> None:
    """Wait until no more fds are open than in ``baseline``; on failure name the extra ones."""
    deadline = time.monotonic() + timeout
    while len(now := fd_targets()) > len(baseline):
        if time.monotonic() > deadline:
            endpoints = _tcp_endpoints()
            extra = []
            for fd, target in sorted(now.items()):
                if baseline.get(fd) != target:
                    inode = target.removeprefix("socket:[").removesuffix("]")
                    extra.append(f"{fd}: {target} {endpoints.get(inode, '')}".rstrip())
            raise AssertionError(
                f"{len(now)} fds open, {len(baseline)} at the baseline; new or changed: {extra}"
            )
        time.sleep(0.01)


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
