"""The pure-Python relay backend: asyncio sockets and token buckets.

The fallback when the Rust extension is not built (and the reference the Rust
backend is tested against).  It copies through user space, so it is far
slower than splice(2); see benches/.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import deque
from collections.abc import Generator, Sequence
from typing import Any

from . import aio
from .relay import RelayResult, default_burst

CHUNK = 256 * 1024


class PyBucket:
    """Token bucket: ``rate`` bytes/s refill, ``burst`` bytes capacity; rate 0 = unlimited.

    Sessions that must wait queue up in FIFO order, so sessions sharing a
    bucket (a device's, the node's) get equal turns.  Grants are at most half
    a burst: tokens that pile up while a timer overshoots still fit under the
    cap instead of being thrown away.
    """

    def __init__(self, rate: float = 0, burst: float | None = None) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._waiters: deque[tuple[asyncio.Future, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.set_rate(rate, burst)
        self._tokens = self._burst

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def grant(self) -> int:
        """Largest single grant."""
        return max(1, int(self._burst) // 2)

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """Change the limits; takes effect at once for every session using the bucket."""
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError("rate and burst must be >= 0")
        self._refill(time.monotonic())
        self._rate = float(rate)
        self._burst = float(burst) if burst else default_burst(self._rate)
        self._tokens = min(self._tokens, self._burst)
        if self._timer:
            self._timer.cancel()
            self._timer = None
        self._serve()

    def _refill(self, now: float) -> None:
        if self._rate:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def acquire(self, n: int) -> None:
        """Take ``n`` tokens, waiting in line if need be."""
        if not self._rate:
            return
        self._refill(time.monotonic())
        if not self._waiters and self._tokens >= n:
            self._tokens -= n
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, n))
        self._serve()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.refund(n)  # granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((fut, n))
            raise

    def refund(self, n: int) -> None:
        if self._rate:
            self._tokens = min(self._burst, self._tokens + n)
            self._serve()

    def _serve(self) -> None:
        """Grant the head of the line what it can have; set a timer for the rest."""
        while self._waiters:
            fut, n = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self._rate:
                self._refill(time.monotonic())
                if self._tokens < n:
                    if self._timer is None:
                        delay = (n - self._tokens) / self._rate
                        self._timer = asyncio.get_running_loop().call_later(delay, self._wake)
                    return
                self._tokens -= n
            self._waiters.popleft()
            fut.set_result(None)

    def _wake(self) -> None:
        self._timer = None
        self._serve()


class PyRelay:
    """One relay on the running loop: two pumps and an idle watchdog in one task."""

    _ids = itertools.count(1)

    def __init__(
        self,
        backend: PythonBackend,
        a: socket.socket,
        b: socket.socket,
        up: Sequence[PyBucket],
        down: Sequence[PyBucket],
        idle_timeout: float | None,
    ) -> None:
        for s in (a, b):
            s.setblocking(False)
            # a request written in two pieces must not wait ~40 ms (Nagle + delayed ACK)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # urgent data (MSG_OOB) stays in the byte stream, as every other byte
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        self._backend = backend
        self._counts = [0, 0]
        self._last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(
            self._run(a, b, list(up), list(down), idle_timeout), name=f"pyrelay-{next(self._ids)}"
        )

    def __await__(self) -> Generator[Any, None, RelayResult]:
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()

    def done(self) -> bool:
        return self._task.done()

    def counters(self) -> tuple[int, int]:
        return self._counts[0], self._counts[1]

    async def _run(
        self,
        a: socket.socket,
        b: socket.socket,
        up: list[PyBucket],
        down: list[PyBucket],
        idle: float | None,
    ) -> RelayResult:
        try:
            await aio.run_all(
                self._pump(a, b, up, 0),
                self._pump(b, a, down, 1),
                deadline=None if idle is None else lambda: self._last + idle,
            )
        except TimeoutError:
            if idle is None:
                raise
            raise TimeoutError(f"relay idle for {idle:g} s") from None
        finally:
            a.close()
            b.close()
        return RelayResult(*self._counts)

    async def _pump(
        self, src: socket.socket, dst: socket.socket, chain: list[PyBucket], index: int
    ) -> None:
        view = memoryview(bytearray(CHUNK))
        totals = self._backend._totals
        while True:
            if chain:
                n = await self._throttled_recv(src, view, chain)
            else:
                n = await aio.recv_into(src, view)
            if n == 0:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            await aio.sendall(dst, view[:n], timeout=None)  # the idle timeout bounds it
            self._counts[index] += n
            totals[index] += n
            self._last = time.monotonic()

    @staticmethod
    async def _throttled_recv(src: socket.socket, view: memoryview, chain: list[PyBucket]) -> int:
        limited = [b for b in chain if b.rate]
        if not limited:
            return await aio.recv_into(src, view)
        # Wait for data before taking tokens, so an idle session holds none of a shared bucket.
        await aio.wait_readable(src)
        n = min(len(view), *(b.grant for b in limited))
        for bucket in limited:
            await bucket.acquire(n)
        try:
            got = src.recv_into(view[:n])
        except (BlockingIOError, InterruptedError):
            got = 0
            for bucket in limited:
                bucket.refund(n)
            return await PyRelay._throttled_recv(src, view, chain)
        except BaseException:
            for bucket in limited:
                bucket.refund(n)
            raise
        if got < n:
            for bucket in limited:
                bucket.refund(n - got)
        return got


TLS_UNSUPPORTED = (
    "TLS (FTPS) needs the rust relay backend (swiftftp._splice); the python backend relays plain TCP only"
)


class PythonBackend:
    """The pure-Python backend (see :mod:`swiftftp.relay` for the interface)."""

    name = "python"

    def __init__(self) -> None:
        self._totals = [0, 0]

    def bucket(self, rate: float = 0, burst: float | None = None) -> PyBucket:
        return PyBucket(rate, burst)

    def start(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        up: Sequence[Any] = (),
        down: Sequence[Any] = (),
        idle_timeout: float | None = None,
        tls: Any = None,
        tls_tag: bytes | None = None,
        require_tag: bytes | None = None,
        handshake_timeout: float = 10.0,
    ) -> PyRelay:
        if tls is not None or tls_tag is not None or require_tag is not None:
            raise NotImplementedError(TLS_UNSUPPORTED)
        return PyRelay(self, a, b, up, down, idle_timeout)

    def tls_config(self, cert_pem: bytes, key_pem: bytes) -> Any:
        raise NotImplementedError(TLS_UNSUPPORTED)

    def wrap_tls(
        self,
        sock: socket.socket,
        config: Any,
        tag: bytes | None = None,
        initial: bytes = b"",
        idle_timeout: float | None = None,
        *,
        handshake_timeout: float = 10.0,
    ) -> tuple[socket.socket, PyRelay]:
        raise NotImplementedError(TLS_UNSUPPORTED)

    def totals(self) -> tuple[int, int]:
        return self._totals[0], self._totals[1]
