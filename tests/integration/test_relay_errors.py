"""A client that dies mid-transfer: the relay ends with the error, and asyncio has
nothing left to complain about ("Task exception was never retrieved"), on both backends."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import threading

from swiftftp import aio, relay
from tests.helpers import open_fds, run, tcp_pair, threads


def _flood(sock: socket.socket, stop: threading.Event) -> None:
    """The device's side of a RETR: send until the relay goes away."""
    chunk = b"\x5a" * 65536
    try:
        while not stop.is_set():
            sock.sendall(chunk)
    except OSError:
        pass


def test_client_dies_mid_retr(backend: relay.Backend) -> None:
    fds, nthreads = open_fds(), threads()
    complaints: list[dict] = []

    async def once() -> None:
        client, relay_client = tcp_pair()
        relay_device, device = tcp_pair()
        # small buffers: the relay's send to the client blocks soon, as it does for a
        # client that stopped reading before it died
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        handle = backend.start(relay_client, relay_device, idle_timeout=30)
        stop = threading.Event()
        sender = threading.Thread(target=_flood, args=(device, stop))
        sender.start()
        try:
            client.setblocking(False)
            assert await aio.recv(client, 1024)  # the transfer has started (the relay runs here)
            await asyncio.sleep(0.05)  # both of the relay's directions are waiting now
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST: the client process died
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_wait(handle))), 10)
            except (ConnectionError, OSError):
                pass
        finally:
            stop.set()
            device.close()
            sender.join(10)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: complaints.append(ctx))
        for _ in range(10):
            await once()
        gc.collect()
        await asyncio.sleep(0.05)

    run(main(), 120)
    assert [c.get("message") for c in complaints] == []
    assert open_fds() <= fds and threads() <= nthreads


async def _wait(handle: relay.Relay) -> relay.RelayResult:
    return await handle
