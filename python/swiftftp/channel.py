"""One short-lived device connection speaking JSON (a login, then a rendezvous or a
data connection): decoded reads, bounded writes, and :meth:`DeviceChannel.settle`
before raw bytes follow a final ``{}``.

Every message the node writes on such a connection is the reply to the device's
request, which it sent right after reading the previous reply: replies need no
pacing here. Only raw bytes that follow the last reply (the client's ``USER``
line, an upload's first bytes) must not share the device's read with it
(docs/protocol.md): :meth:`DeviceChannel.settle` waits for that, by the rules of
:mod:`swiftftp.outbox`. The device's command session is :mod:`swiftftp.command`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from typing import Any

from . import aio
from .errors import PeerClosed
from .outbox import GRACE, Outbox
from .protocol import JsonStreamDecoder, encode

_OUTQ = struct.pack("i", 0)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer has not acknowledged yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _OUTQ)
    return struct.unpack("i", raw)[0]


def tune_device_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: one object per segment, written when written. (No TCP keepalives: a
    command session's own ``noop`` every ``keepalive`` seconds, unacknowledged by the
    next, finds a phone that vanished, and keeps its NAT mapping alive.)"""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DeviceChannel:
    """A device connection until it becomes a relay: JSON in, JSON out.

    ``paced`` is True until the device's login says it decodes a byte stream
    (``json_stream``); ``send_timeout`` bounds every write and :meth:`settle`.
    """

    __slots__ = ("sock", "_peer", "send_timeout", "outbox", "_decoder", "bytes_in", "bytes_out", "last_recv")

    def __init__(
        self, sock: socket.socket, *, send_timeout: float = 30.0, grace: float = GRACE, paced: bool = True,
        peer: tuple[str, int] | None = None,
    ) -> None:
        sock.setblocking(False)
        tune_device_socket(sock)
        self.sock: socket.socket | None = sock
        self._peer = peer
        self.send_timeout = send_timeout
        self.outbox = Outbox(paced, grace)
        self._decoder = JsonStreamDecoder()
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_recv = time.monotonic()

    @property
    def paced(self) -> bool:
        return self.outbox.paced

    @paced.setter
    def paced(self, value: bool) -> None:
        self.outbox.paced = value

    @property
    def peer(self) -> tuple[str, int]:
        """(address, port) of the device, as accept() or the first call found it."""
        if self._peer is None:
            assert self.sock is not None
            self._peer = self.sock.getpeername()[:2]
        return self._peer

    async def recv(self) -> dict[str, Any]:
        """The next message; :class:`PeerClosed` at EOF, ``ProtocolError`` on junk."""
        assert self.sock is not None
        while True:
            message = self._decoder.pop()
            if message is not None:
                return message
            data = await aio.recv(self.sock, 4096)
            if not data:
                raise PeerClosed("device closed the connection")
            self.bytes_in += len(data)
            self.last_recv = time.monotonic()
            self._decoder.feed(data)

    async def send(self, message: dict[str, Any], *more: dict[str, Any]) -> None:
        """Write one object (a reply: see the module docs), within ``send_timeout``;
        ``more`` objects in the same write (only towards a node: it reads a stream)."""
        assert self.sock is not None
        data = b"".join(encode(m) for m in (message, *more))
        await aio.sendall(self.sock, data, timeout=self.send_timeout)
        self.bytes_out += len(data)
        self.outbox.wrote(asyncio.get_running_loop().time())

    async def settle(self) -> None:
        """Wait until the device has read what was written on its own (nothing to
        wait for with a device that decodes a stream); ``TimeoutError`` if it does
        not acknowledge it within ``send_timeout``."""
        sock = self.sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        while (wake := self.outbox.ready(loop.time(), lambda: unacknowledged(sock))) is not None:
            since = self.outbox.blocked_since()
            if since is not None and loop.time() - since > self.send_timeout:
                raise TimeoutError(f"device did not acknowledge for {self.send_timeout:g} s")
            await asyncio.sleep(max(0.0, wake - loop.time()))

    def detach(self) -> tuple[socket.socket, bytes]:
        """Give up the socket and the bytes received after the last message."""
        assert self.sock is not None
        sock, self.sock = self.sock, None
        return sock, self._decoder.rest()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
