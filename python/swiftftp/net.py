"""Socket plumbing shared by the listeners: port ranges, first-good accept, dialing."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import aio

T = TypeVar("T")


@functools.lru_cache(maxsize=4096)
def normalize_ip(address: str) -> str:
    """Canonical text of an IP, IPv4-mapped IPv6 folded to IPv4 (``::ffff:1.2.3.4`` → ``1.2.3.4``).

    Cached: the same few addresses are parsed several times per connection (each
    parse ≈ 5 µs, six per data connection in benches/test_latency.py)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


@functools.lru_cache(maxsize=4096)
def address_group(ip: str, ipv6_prefix: int = 64) -> str:
    """What a per-address limit counts: an IPv4 address itself, an IPv6 address by its
    ``/ipv6_prefix`` network (one subscriber usually holds a whole /64, and every
    address in it is as easy to take as the next). ``ip`` as :func:`normalize_ip` gives it."""
    if ":" not in ip:
        return ip
    return str(ipaddress.IPv6Network(f"{ip}/{ipv6_prefix}", strict=False))


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def bracketed(host: str) -> str:
    """``host`` as it is written before ``:port``: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def split_server(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def listen_on(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A non-blocking listening TCP socket (dual-stack when ``host`` is ``::``)."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_in_range(host: str, ports: tuple[int, int], backlog: int = 4) -> socket.socket:
    """A listener on a free port of ``ports`` (inclusive), tried in random order.

    ``(0, 0)`` lets the kernel choose.  Raises ``OSError`` when every port is taken.
    """
    low, high = ports
    if low == 0:
        return listen_on(host, 0, backlog)
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)
    for port in candidates[:256]:
        try:
            return listen_on(host, port, backlog)
        except OSError:
            continue
    raise OSError(f"no free port in {low}-{high}")


async def accept_first(
    listener: socket.socket,
    check: Callable[[socket.socket], Awaitable[T | None]],
    timeout: float,
    max_pending: int = 4,
) -> tuple[socket.socket, T]:
    """Accept until one connection passes ``check``; the others are closed.

    ``check`` runs concurrently for up to ``max_pending`` candidates, so a
    stranger who connects and stays silent cannot hold the port against the
    peer we wait for.  Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    checks: dict[asyncio.Task, socket.socket] = {}
    accept: asyncio.Future | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                if accept is None and len(checks) < max_pending:
                    accept = asyncio.ensure_future(aio.accept(listener))
                waiting: set[asyncio.Future] = set(checks)
                if accept is not None:
                    waiting.add(accept)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if accept in done:
                    sock, _addr = accept.result()
                    accept = None
                    sock.setblocking(False)
                    checks[asyncio.ensure_future(check(sock))] = sock
                for task in done & set(checks):
                    sock = checks.pop(task)
                    if not task.cancelled() and task.exception() is None:
                        value = task.result()
                        if value is not None:
                            return sock, value
                    sock.close()
    finally:
        # Cancel, then wait: a task may still be registered on a socket until it has
        # run its cancellation, and closing the socket first would orphan that.
        pending = [t for t in (accept, *checks) if t is not None]
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*pending, return_exceptions=True)
        if accept is not None and isinstance(results[0], tuple):
            results[0][0].close()
        for sock in checks.values():
            sock.close()


async def close_gracefully(sock: socket.socket, timeout: float = 1.0, limit: int = 1 << 20) -> None:
    """Half-close, drain what the peer still sends (bounded), then close.

    Closing a socket with unread input makes the kernel send RST, and the
    peer may then lose our last reply (a 530, an error 9) still in flight.
    """
    if sock.fileno() < 0:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(timeout):
            while limit > 0 and (data := await aio.recv(sock, 65536)):
                limit -= len(data)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


async def dial(host: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket, or ``OSError``/``TimeoutError``."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await aio.connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
