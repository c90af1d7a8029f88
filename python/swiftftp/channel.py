"""One device TCP connection speaking JSON: decoded reads, paced writes.

The deployed device parses one object per ``read()`` and drops the rest of
what that read returned (PROTOCOL.md).  So a message is written on its own,
and nothing else is written to the same socket until the device's TCP has
acknowledged it and a grace period has passed: long enough for the device's
reader, blocked in ``read()``, to have taken it alone.
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
from .protocol import JsonStreamDecoder, encode

_OUTQ = struct.pack("i", 0)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer has not acknowledged yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _OUTQ)
    return struct.unpack("i", raw)[0]


def tune_device_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (one object per segment) and keepalive (find dead phones)."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


class DeviceChannel:
    """JSON messages over one device socket.

    ``recv()`` returns the next object; ``send()`` writes one object per
    write and paces them; ``settle()`` waits until the last write has
    reached the device alone, so raw bytes may follow; ``detach()`` hands
    the socket and any bytes read past the last message to a relay.
    """

    #: How long to wait for the device's ACK before giving up on pacing.
    ACK_WAIT = 5.0

    def __init__(self, sock: socket.socket, *, grace: float = 0.03) -> None:
        tune_device_socket(sock)
        self.sock: socket.socket | None = sock
        self.grace = grace
        self._decoder = JsonStreamDecoder()
        self._lock = asyncio.Lock()
        self._unsettled = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_recv = time.monotonic()
        self.last_send = time.monotonic()

    @property
    def peer(self) -> tuple[str, int]:
        assert self.sock is not None
        return self.sock.getpeername()[:2]

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

    async def send(self, message: dict[str, Any]) -> None:
        """Write one object, after any earlier one has settled."""
        assert self.sock is not None
        data = encode(message)
        async with self._lock:
            await self._settle()
            await aio.sendall(self.sock, data)
            self.bytes_out += len(data)
            self.last_send = time.monotonic()
            self._unsettled = True

    async def settle(self) -> None:
        """Wait until everything written has reached the device on its own."""
        async with self._lock:
            await self._settle()

    async def _settle(self) -> None:
        if not self._unsettled or self.sock is None:
            return
        deadline = time.monotonic() + self.ACK_WAIT
        delay = 0.0005
        while unacknowledged(self.sock) and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)
        await asyncio.sleep(self.grace)
        self._unsettled = False

    def detach(self) -> tuple[socket.socket, bytes]:
        """Give up the socket and the bytes received after the last message."""
        assert self.sock is not None
        sock, self.sock = self.sock, None
        return sock, self._decoder.rest()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
