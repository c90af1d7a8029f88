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
from collections.abc import Generator, Sequence
from typing import Any

from . import aio
from .relay import RelayResult, default_burst

CHUNK = 256 * 1024
# Smallest grant worth a syscall when throttled; bounded by each bucket's burst.
QUANTUM = 16 * 1024
# A throttled pump re-reads its buckets at least this often, so set_rate() bites fast.
MAX_NAP = 0.05


class PyBucket:
    """Token bucket: ``rate`` bytes/s refill, ``burst`` bytes capacity; rate 0 = unlimited."""

    def __init__(self, rate: float = 0, burst: float | None = None) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self.set_rate(rate, burst)
        self._tokens = self._burst

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """Change the limits; takes effect at once for every session using the bucket."""
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError("rate and burst must be >= 0")
        self._refill(time.monotonic())
        self._rate = float(rate)
        self._burst = float(burst) if burst else default_burst(self._rate)
        self._tokens = min(self._tokens, self._burst)

    def _refill(self, now: float) -> None:
        if self._rate:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


def _grant_now(chain: Sequence[PyBucket], want: int) -> tuple[int, float]:
    """Take up to ``want`` tokens from every limited bucket: (granted, or 0 and the wait)."""
    limited = [b for b in chain if b._rate]
    if not limited:
        return want, 0.0
    now = time.monotonic()
    for b in limited:
        b._refill(now)
    # Wait for half a burst, not a whole one: tokens that pile up while a timer
    # overshoots still fit under the cap instead of being thrown away.
    need = max(1, min(want, QUANTUM, *(int(b._burst) // 2 for b in limited)))
    avail = min(b._tokens for b in limited)
    if avail >= need:
        n = min(want, int(avail))
        for b in limited:
            b._tokens -= n
        return n, 0.0
    return 0, max((need - b._tokens) / b._rate for b in limited)


def _refund(chain: Sequence[PyBucket], n: int) -> None:
    for b in chain:
        if b._rate:
            b._tokens = min(b._burst, b._tokens + n)


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
        pumps = {
            asyncio.ensure_future(self._pump(a, b, up, 0)),
            asyncio.ensure_future(self._pump(b, a, down, 1)),
        }
        try:
            while pumps:
                timeout = None if idle is None else max(0.0, self._last + idle - time.monotonic())
                done, pumps = await asyncio.wait(
                    pumps, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()
                if idle is not None and not done and time.monotonic() - self._last >= idle:
                    raise TimeoutError(f"relay idle for {idle:g} s")
            return RelayResult(*self._counts)
        finally:
            for task in pumps:
                task.cancel()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
            a.close()
            b.close()

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
            await aio.sendall(dst, view[:n])
            self._counts[index] += n
            totals[index] += n
            self._last = time.monotonic()

    @staticmethod
    async def _throttled_recv(src: socket.socket, view: memoryview, chain: list[PyBucket]) -> int:
        # Wait for data before taking tokens, so an idle session holds none of a shared bucket.
        while True:
            await aio.wait_readable(src)
            granted, wait = _grant_now(chain, len(view))
            if not granted:
                await asyncio.sleep(min(wait, MAX_NAP))
                continue
            try:
                n = src.recv_into(view[:granted])
            except (BlockingIOError, InterruptedError):
                _refund(chain, granted)
                continue
            _refund(chain, granted - n)
            return n


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
    ) -> PyRelay:
        return PyRelay(self, a, b, up, down, idle_timeout)

    def totals(self) -> tuple[int, int]:
        return self._totals[0], self._totals[1]
