"""The relayed control connection as loop callbacks: lines in, rewritten lines out.

Both sockets stay registered with the loop for as long as the relay lives, and
each readable event is one ``recv``, one pass through the line rewriting and
one ``send``: no task wakes up, no future is created, no registration is made
and undone per read. A destination that does not take the bytes pauses the
source (back pressure) until it does, within ``send_timeout``.

Measured with the agent's 1-byte RETR through a node (benches/test_latency.py,
two relayed hops per command and reply on the node): the task-based relay
this replaces cost ≈ 0.25 ms per hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from .ftp import LineSplitter


class _Direction:
    __slots__ = ("src", "dst", "lines", "pending", "since", "eof", "shut", "reading")

    def __init__(self, src: socket.socket, dst: socket.socket, lines: LineSplitter) -> None:
        self.src = src
        self.dst = dst
        self.lines = lines
        self.pending = b""  # accepted from src, not yet taken by dst
        self.since = 0.0  # when ``pending`` became non-empty
        self.eof = False
        self.shut = False
        self.reading = False


class ControlRelay:
    """Relays two sockets line by line until both directions have ended.

    ``up`` is client → device, ``down`` device → client; each has its
    :class:`LineSplitter` (with the rewriting). ``deadline()`` (a
    ``time.monotonic()`` instant, read again at every check) ends the relay with
    ``TimeoutError("idle")``; so does a destination that takes nothing for
    ``send_timeout`` seconds (``TimeoutError("send")``). ``on_down`` runs after
    each chunk from the device. Await :attr:`done`; :meth:`close` stops it.
    """

    __slots__ = ("_loop", "_dirs", "_deadline", "_send_timeout", "_counts", "_on_down", "_answers",
                 "_timer", "last", "done")

    def __init__(
        self,
        client: socket.socket,
        device: socket.socket,
        up: LineSplitter,
        down: LineSplitter,
        *,
        deadline: Callable[[], float],
        send_timeout: float,
        counts: list[int],
        on_down: Callable[[], None] = lambda: None,
        answers: Callable[[], bytes] = bytes,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._dirs = (_Direction(client, device, up), _Direction(device, client, down))
        self._deadline = deadline
        self._send_timeout = send_timeout
        self._counts = counts
        self._on_down = on_down
        self._answers = answers  # the node's own replies to the client (ftp.ControlRewriter)
        self._timer: asyncio.TimerHandle | None = None
        self.last = time.monotonic()
        self.done: asyncio.Future[None] = self._loop.create_future()

    def start(self, to_device: bytes = b"", to_client: bytes = b"") -> None:
        """Write what was already received (rewritten), then relay."""
        up, down = self._dirs
        self._write(up, to_device)
        if to_client:
            self._counts[1] += len(to_client)
            self._write(down, to_client)
        for d in self._dirs:
            if not d.pending and not self.done.done():
                self._read(d, True)
        self._answer()
        self.check()

    # ---- reading and writing ------------------------------------------------------------

    def _read(self, d: _Direction, on: bool) -> None:
        if on and not d.reading and not d.eof:
            self._loop.add_reader(d.src.fileno(), self._readable, d)
            d.reading = True
        elif not on and d.reading:
            self._loop.remove_reader(d.src.fileno())
            d.reading = False

    def _readable(self, d: _Direction) -> None:
        try:
            data = d.src.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        self.last = time.monotonic()
        if not data:
            d.eof = True
            self._read(d, False)
            self._write(d, d.lines.flush())
            return
        up = d is self._dirs[0]
        if up:
            self._counts[0] += len(data)
        else:
            # Acknowledge the device's reply now, not after the delayed-ACK timer: a
            # device with Nagle on (Java's default) holds its next small reply (the
            # 226 after a 150) until this one is acknowledged. Field-like device,
            # 1-byte RETR through the node: p50 44 ms without, 14 ms with (test_latency.py).
            with contextlib.suppress(OSError):
                d.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        out = d.lines.feed(data)
        if not up:
            self._counts[1] += len(out)
            self._on_down()
        self._write(d, out)
        if up:
            self._answer()

    def _answer(self) -> None:
        """Send the client what the node answered itself; while the client has not taken
        it, read nothing more from the client (its commands are what makes answers)."""
        if answer := self._answers():
            up, down = self._dirs
            self._counts[1] += len(answer)
            self._write(down, answer)
            if down.pending:
                self._read(up, False)

    def _write(self, d: _Direction, data: bytes) -> None:
        if self.done.done():
            return
        if data and not d.pending:
            try:
                sent = d.dst.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent < len(data):
                d.pending = data[sent:]
                d.since = time.monotonic()
                self._read(d, False)  # back pressure: stop reading until it drains
                self._loop.add_writer(d.dst.fileno(), self._writable, d)
                self.check()
        elif data:
            d.pending += data
        if not d.pending:
            self._flushed(d)

    def _writable(self, d: _Direction) -> None:
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        d.pending = d.pending[sent:]
        if not d.pending:
            self._loop.remove_writer(d.dst.fileno())
            self._flushed(d)

    def _flushed(self, d: _Direction) -> None:
        """``d`` has nothing pending: read on, or pass its EOF on."""
        up = self._dirs[0]
        if d is not up and not up.pending and not self.done.done():
            self._read(up, True)  # the client took the node's answers (see _answer)
        if not d.eof:
            self._read(d, True)
            return
        if not d.shut:
            d.shut = True
            with contextlib.suppress(OSError):
                d.dst.shutdown(socket.SHUT_WR)
        if all(x.shut for x in self._dirs):
            self._finish(None)

    # ---- deadlines ---------------------------------------------------------------------

    def check(self) -> None:
        """Look at the deadlines now (and again when the next one is due): call it
        when ``deadline()`` may have come earlier (a login)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.done.done():
            return
        now = time.monotonic()
        if now >= (due := self._deadline()):
            self._fail(TimeoutError("idle"))
            return
        for d in self._dirs:
            if d.pending:
                if now >= d.since + self._send_timeout:
                    self._fail(TimeoutError(f"peer took nothing for {self._send_timeout:g} s"))
                    return
                due = min(due, d.since + self._send_timeout)
        self._timer = self._loop.call_at(self._loop.time() + (due - now), self.check)

    # ---- the end -----------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        self.close()
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    def close(self) -> None:
        """Stop relaying (the sockets stay open: their owner closes them)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for d in self._dirs:
            self._read(d, False)
            if d.pending and d.dst.fileno() >= 0:
                self._loop.remove_writer(d.dst.fileno())
                d.pending = b""
