"""Socket operations for asyncio that clean up synchronously when cancelled.

``loop.sock_recv()`` and friends unregister their fd from a done-callback that
runs one loop iteration *after* a cancellation.  Closing the socket in between
(the natural thing in a ``finally``) leaves that callback to unregister a
closed fd, or worse a new socket that reused the number ("No such file or
directory" from epoll, or a connection that never wakes up).  These helpers
register a reader or writer only while they wait and remove it in their own
``finally``, so once a cancelled operation has returned, the socket may be
closed at once.  They work on the default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def _wait(sock: socket.socket, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(sock: socket.socket) -> None:
    await _wait(sock, write=False)


async def wait_writable(sock: socket.socket) -> None:
    await _wait(sock, write=True)


async def recv(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, InterruptedError):
            await _wait(sock, write=False)


async def recv_into(sock: socket.socket, buffer: memoryview) -> int:
    while True:
        try:
            return sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            await _wait(sock, write=False)


async def sendall(sock: socket.socket, data: bytes | memoryview, *, timeout: float | None) -> None:
    """Write all of ``data``; ``TimeoutError`` if the peer does not take it within
    ``timeout`` seconds (None: only where another deadline bounds the caller)."""
    view = memoryview(data)
    try:
        sent = sock.send(view)  # the usual case: it all fits at once, no timer needed
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent == len(view):
        return
    view = view[sent:]
    async with asyncio.timeout(timeout):
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                await _wait(sock, write=True)
                continue
            view = view[sent:]


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple]:
    """Accept one connection; the new socket is non-blocking."""
    while True:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            await _wait(listener, write=False)
            continue
        sock.setblocking(False)
        return sock, address


async def connect(sock: socket.socket, address: tuple) -> None:
    """Connect a non-blocking socket."""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await _wait(sock, write=True)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {socket.errno.errorcode.get(err, err)}")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when it is installed (``SWIFTFTP_LOOP=asyncio``
    forces asyncio's own loop), else on asyncio's."""
    import os

    if os.environ.get("SWIFTFTP_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def run_all(
    *coros: Coroutine[Any, Any, Any], deadline: Callable[[], float] | None = None
) -> None:
    """Run ``coros`` as tasks until every one has finished.

    The first to fail cancels the others (and they are awaited before this
    returns, so their sockets may be closed right after); its exception is raised.
    Every task's outcome is retrieved, also when several fail in the same loop
    iteration (both pumps of a relay whose client died), so asyncio never logs "Task
    exception was never retrieved".  ``deadline``, read
    again after every wake-up, is a ``time.monotonic()`` instant: once it has
    passed, ``TimeoutError`` (an idle timeout that activity keeps pushing back).
    """
    tasks = {asyncio.ensure_future(coro) for coro in coros}
    try:
        while tasks:
            timeout = None if deadline is None else max(0.0, deadline() - time.monotonic())
            done, tasks = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            failure: BaseException | None = None
            for task in done:  # look at each one: that marks its exception retrieved
                outcome = asyncio.CancelledError() if task.cancelled() else task.exception()
                failure = failure or outcome
            if failure is not None:
                raise failure
            if deadline is not None and not done and time.monotonic() >= deadline():
                raise TimeoutError("idle")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
