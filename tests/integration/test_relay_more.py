"""More relay behaviour on both backends: interactive latency, live counters and
totals, errors as OSError subclasses, chained and changed buckets, cancel while
throttled, AF_UNIX sockets, urgent data."""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
import threading
import time

import pytest

from swiftftp import relay
from tests.helpers import recv_all, run, sha256, tcp_pair


async def _relay_pair(backend: relay.Backend, **kw):
    client, relay_a = tcp_pair()
    relay_b, server = tcp_pair()
    return client, server, backend.start(relay_a, relay_b, **kw)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def test_small_writes_are_not_delayed(backend: relay.Backend) -> None:
    """A request written in two pieces (length, then body) crosses at once: no
    Nagle/delayed-ACK stall (~40 ms) and no SPLICE_F_MORE cork (~200 ms) on
    the relay's outgoing side, which would cripple an FTP control connection."""
    rounds = 100

    async def main() -> float:
        client, server, handle = await _relay_pair(backend)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def echo() -> None:
            for _ in range(rounds):
                size = int.from_bytes(_recv_exactly(server, 4), "big")
                server.sendall(_recv_exactly(server, size)[:8])

        def talk() -> float:
            t0 = time.monotonic()
            for i in range(rounds):
                body = b"%08d" % i + b"x" * 100
                client.sendall(len(body).to_bytes(4, "big"))
                client.sendall(body)
                assert _recv_exactly(client, 8) == b"%08d" % i
            return time.monotonic() - t0

        echoer = asyncio.create_task(asyncio.to_thread(echo))
        elapsed = await asyncio.to_thread(talk)
        await echoer
        client.close()
        server.close()
        await handle
        return elapsed

    elapsed = run(main())
    # Measured: rust 0.006 s, python 0.11 s; rust without TCP_NODELAY ~2 s.
    assert elapsed < rounds * 0.01, f"{rounds} request/response rounds took {elapsed:.3f} s"


def test_counters_are_live_and_totals_add_up(backend: relay.Backend) -> None:
    async def main() -> None:
        before = backend.totals()
        client, server, handle = await _relay_pair(backend)
        client.sendall(b"a" * 300_000)
        got = await asyncio.to_thread(_recv_exactly, server, 300_000)
        assert len(got) == 300_000
        assert handle.counters() == (300_000, 0), "counted while running"
        assert not handle.done()
        server.sendall(b"b" * 1234)
        await asyncio.to_thread(_recv_exactly, client, 1234)
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert await handle == (300_000, 1234)
        after = backend.totals()
        assert (after[0] - before[0], after[1] - before[1]) == (300_000, 1234)
        client.close()
        server.close()

    run(main())


def test_reset_raises_connection_error_with_errno(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        client.sendall(b"x" * 10)
        await asyncio.to_thread(_recv_exactly, server, 10)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()  # RST
        with pytest.raises(OSError) as info:
            await handle
        assert isinstance(info.value, ConnectionError), repr(info.value)
        assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
        client.close()

    run(main())


def test_chain_is_limited_by_its_slowest_bucket(backend: relay.Backend) -> None:
    """Session bucket 2 MB/s, node bucket 500 kB/s: the node bucket rules."""

    async def main() -> float:
        session = backend.bucket(2_000_000)
        node = backend.bucket(500_000, 10_000)
        client, server, handle = await _relay_pair(backend, down=[session, node])
        stop = time.monotonic() + 20

        def feed() -> None:
            try:
                while time.monotonic() < stop:
                    server.sendall(b"n" * 65536)
            except OSError:
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        def measure() -> float:
            client.recv(65536)
            t0, total = time.monotonic(), 0
            while time.monotonic() - t0 < 2.0:
                total += len(client.recv(65536))
            return total / (time.monotonic() - t0)

        rate = await asyncio.to_thread(measure)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        client.close()
        server.close()
        return rate

    rate = run(main())
    assert abs(rate - 500_000) <= 0.05 * 500_000, rate


def test_unlimiting_a_bucket_wakes_a_sleeping_session(backend: relay.Backend) -> None:
    """At 1 kB/s the next 8 KiB quantum is seconds away; set_rate(0) must not wait for it."""

    async def main() -> float:
        bucket = backend.bucket(1000, 16384)
        client, server, handle = await _relay_pair(backend, up=[bucket])
        client.sendall(b"s" * 100_000)
        await asyncio.to_thread(_recv_exactly, server, 16384)  # the burst
        await asyncio.sleep(0.2)  # now asleep for tokens
        t0 = time.monotonic()
        bucket.set_rate(0)
        await asyncio.to_thread(_recv_exactly, server, 100_000 - 16384)
        elapsed = time.monotonic() - t0
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert await handle == (100_000, 0)
        client.close()
        server.close()
        return elapsed

    assert run(main()) < 0.5


def test_cancel_while_asleep_for_tokens(backend: relay.Backend) -> None:
    async def main() -> None:
        bucket = backend.bucket(100, 16384)
        client, server, handle = await _relay_pair(backend, up=[bucket])
        client.sendall(b"t" * 50_000)
        await asyncio.to_thread(_recv_exactly, server, 16384)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        server.settimeout(5)
        assert await asyncio.to_thread(recv_all, server) == b""
        assert time.monotonic() - t0 < 1.0
        assert handle.counters()[0] < 20_000
        client.close()
        server.close()

    run(main())


def test_idle_timeout_spares_a_slow_but_steady_session(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend, idle_timeout=0.3)
        for _ in range(8):
            client.sendall(b".")
            await asyncio.to_thread(_recv_exactly, server, 1)
            await asyncio.sleep(0.1)
        assert not handle.done()
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert await handle == (8, 0)
        client.close()
        server.close()

    run(main())


def test_unix_socketpairs(backend: relay.Backend) -> None:
    data = bytes(range(256)) * 4096

    async def main() -> None:
        client, relay_a = socket.socketpair()
        relay_b, server = socket.socketpair()
        handle = backend.start(relay_a, relay_b)

        def exchange() -> bytes:
            t = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(1)))
            t.start()
            got = recv_all(server)
            t.join()
            server.close()
            assert recv_all(client) == b""
            client.close()
            return got

        assert await asyncio.to_thread(exchange) == data
        assert await handle == (len(data), 0)

    run(main())


def test_a_relay_can_be_awaited_twice_and_after_the_end(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        client.close()
        server.close()
        first = await handle
        await asyncio.sleep(0.05)
        assert await handle == first == (0, 0)
        assert handle.done()

    run(main())


def test_urgent_data_is_relayed_in_the_stream(backend: relay.Backend) -> None:
    """A byte sent with MSG_OOB (telnet's Synch, as in an FTP ABOR) arrives in its place:
    not dropped, and not a stall (splice stops at the urgent mark, whatever SO_OOBINLINE says)."""

    async def main() -> None:
        client, server, handle = await _relay_pair(backend, idle_timeout=30)
        client.sendall(b"before-")
        client.send(b"!", socket.MSG_OOB)
        client.sendall(b"-after")
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        got = await asyncio.to_thread(recv_all, server)
        assert got == b"before-!-after"
        assert await handle == (len(got), 0)
        client.close()
        server.close()

    run(main(), timeout=10)


def test_urgent_bytes_in_a_large_transfer_both_ways(backend: relay.Backend) -> None:
    """4 MiB each way, every 512 KiB ending in an urgent byte, both ways at once:
    everything arrives intact, in order, with nothing lost at any mark."""
    size, every = 4 << 20, 512 << 10
    rng = random.Random(7)
    up, down = rng.randbytes(size), rng.randbytes(size)

    def send(sock: socket.socket, data: bytes) -> None:
        for i in range(0, len(data), every):
            chunk = data[i : i + every]
            sock.sendall(chunk[:-1])
            assert sock.send(chunk[-1:], socket.MSG_OOB) == 1
        sock.shutdown(socket.SHUT_WR)

    async def main() -> None:
        client, server, handle = await _relay_pair(backend, idle_timeout=30)
        _, _, at_server, at_client = await asyncio.gather(
            asyncio.to_thread(send, client, up),
            asyncio.to_thread(send, server, down),
            asyncio.to_thread(recv_all, server),
            asyncio.to_thread(recv_all, client),
        )
        assert (len(at_server), sha256(at_server)) == (size, sha256(up))
        assert (len(at_client), sha256(at_client)) == (size, sha256(down))
        assert await handle == (size, size)
        client.close()
        server.close()

    run(main(), timeout=10)
