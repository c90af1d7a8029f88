"""A slow link between a test device and the node: this kernel has no netem, so a
userspace forwarder delays each direction of every connection the device opens.

``SlowLink(delay).dial(port)`` stands for the device's ``connect()`` to the
node's ``port`` over a link of ``delay`` seconds each way: it returns after a
round trip (SYN, SYN-ACK), and every chunk written at either end comes out at
the other ``delay`` seconds later, in order, as it was written (a chunk is
never merged with the next by the forwarder: if the device's ``recv()``
returns two messages at once, the node sent them too close together). EOF is
delayed the same way. All on loopback; the node sees the forwarder's address,
the same for every connection of the device, as it would see a phone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tests.helpers import tcp_pair
from tests.stack import LoopThread


class SlowLink:
    """Connections to the node through ``delay`` seconds of latency each way."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._thread = LoopThread("slowlink")
        self._tasks: set[asyncio.Task] = set()
        self._socks: set[socket.socket] = set()

    def dial(self, port: int, timeout: float = 30) -> socket.socket:
        """A connected socket for the device, its far end at the node's ``port``."""
        device_end, link_end = tcp_pair()
        try:
            self._thread.submit(self._open(link_end, port)).result(timeout)
        except BaseException:
            device_end.close()
            raise
        return device_end

    async def _open(self, link_end: socket.socket, port: int) -> None:
        loop = asyncio.get_running_loop()
        node_end = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for s in (link_end, node_end):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.sleep(self.delay)  # the SYN on its way
            await loop.sock_connect(node_end, ("127.0.0.1", port))
        except BaseException:
            link_end.close()
            node_end.close()
            raise
        self._socks |= {link_end, node_end}
        live = [2]  # directions still open; the last one to end closes both sockets
        for src, dst in ((link_end, node_end), (node_end, link_end)):
            task = loop.create_task(self._direction(src, dst, live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(self.delay)  # the SYN-ACK on its way back

    async def _direction(self, src: socket.socket, dst: socket.socket, live: list[int]) -> None:
        """Copy ``src`` to ``dst``, each chunk ``delay`` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                await loop.sock_sendall(dst, data)

        writer = loop.create_task(deliver())
        failed = False
        try:
            while data := await loop.sock_recv(src, 65536):
                queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((loop.time() + self.delay, b""))
            await writer
        except OSError:
            failed = True  # a reset: the whole connection goes
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            live[0] -= 1
            if failed or live[0] == 0:
                for sock in (src, dst):
                    self._socks.discard(sock)
                    sock.close()

    def close(self) -> None:
        async def stop() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for s in list(self._socks):
                s.close()
            self._socks.clear()

        self._thread.call(stop())
        self._thread.stop()
