"""The relay backends, on real loopback TCP connections: integrity, half-close,
errors, cancel, idle timeout, concurrency, throttling and leaks."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest

from swiftftp import relay
from tests.helpers import open_fds, recv_all, run, sha256, tcp_pair, threads


def _exchange(end: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read to EOF (in a thread); returns what arrived."""
    import threading

    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(end)))
    reader.start()
    end.sendall(payload)
    end.shutdown(socket.SHUT_WR)
    reader.join(60)
    assert not reader.is_alive(), "reader did not see EOF"
    end.close()
    return got[0]


async def _relay_pair(backend: relay.Backend, **kw):
    """client <-> [relay] <-> server: returns the two outer ends and the handle."""
    client, relay_a = tcp_pair()
    relay_b, server = tcp_pair()
    handle = backend.start(relay_a, relay_b, **kw)
    return client, server, handle


def test_both_directions_intact(backend: relay.Backend) -> None:
    up_data, down_data = os.urandom(8 << 20), os.urandom(5 << 20)

    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        up_got, down_got = await asyncio.gather(
            asyncio.to_thread(_exchange, server, down_data),
            asyncio.to_thread(_exchange, client, up_data),
        )
        result = await handle
        assert sha256(up_got) == sha256(up_data)
        assert sha256(down_got) == sha256(down_data)
        assert result == (len(up_data), len(down_data))
        assert handle.counters() == (len(up_data), len(down_data))

    run(main())


def test_half_close_request_then_response(backend: relay.Backend) -> None:
    """EOF from one side reaches the other as EOF, and the reverse direction goes on."""

    async def main() -> None:
        client, server, handle = await _relay_pair(backend)

        def talk() -> bytes:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(server) == b"request"  # EOF arrived after the bytes
            server.sendall(b"response after eof")
            server.close()
            data = recv_all(client)
            client.close()
            return data

        assert await asyncio.to_thread(talk) == b"response after eof"
        assert await handle == (len(b"request"), len(b"response after eof"))

    run(main())


def test_reset_mid_transfer_closes_both(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        client.sendall(b"x" * 100_000)
        await asyncio.to_thread(server.recv, 1000)
        # RST instead of FIN
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(OSError):
            await handle
        client.settimeout(10)
        with pytest.raises(OSError):
            # the relay closed its end: EOF or reset, then writes fail
            while client.recv(65536):
                pass
            client.sendall(b"y" * 1_000_000)
            client.sendall(b"y" * 1_000_000)
        client.close()

    run(main())


def test_cancel_closes_both_sockets(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        client.sendall(b"hello")
        assert await asyncio.to_thread(server.recv, 5) == b"hello"
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.counters() == (5, 0)
        client.settimeout(10)
        server.settimeout(10)
        assert await asyncio.to_thread(recv_all, client) == b""
        assert await asyncio.to_thread(recv_all, server) == b""
        client.close()
        server.close()

    run(main())


def test_cancelling_the_awaiting_task_cancels_the_relay(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend)

        async def waiter() -> None:
            await handle

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.settimeout(10)
        assert await asyncio.to_thread(recv_all, client) == b""
        assert handle.done()
        client.close()
        server.close()

    run(main())


def test_idle_timeout(backend: relay.Backend) -> None:
    async def main() -> None:
        client, server, handle = await _relay_pair(backend, idle_timeout=0.3)
        client.sendall(b"ping")
        assert await asyncio.to_thread(server.recv, 4) == b"ping"
        with pytest.raises(TimeoutError):
            await handle
        client.close()
        server.close()

    run(main())


def test_many_concurrent_sessions(backend: relay.Backend) -> None:
    n = 200

    async def main() -> None:
        pairs = [await _relay_pair(backend) for _ in range(n)]
        payloads = [os.urandom(64 * 1024 + i) for i in range(n)]

        def one(i: int) -> bool:
            client, server, _ = pairs[i]
            import threading

            got: list[bytes] = []
            t = threading.Thread(target=lambda: got.append(_exchange(server, b"")))
            t.start()
            _exchange(client, payloads[i])
            t.join(60)
            return got[0] == payloads[i]

        results = await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(n)))
        assert all(results)
        finals = await asyncio.gather(*(h for _, _, h in pairs))
        assert [r.up for r in finals] == [len(p) for p in payloads]

    run(main(), timeout=120)


def test_works_on_uvloop(backend: relay.Backend) -> None:
    data = os.urandom(3 << 20)

    async def main() -> None:
        client, server, handle = await _relay_pair(backend)
        got, _ = await asyncio.gather(
            asyncio.to_thread(_exchange, server, b""), asyncio.to_thread(_exchange, client, data)
        )
        assert sha256(got) == sha256(data)
        assert (await handle).up == len(data)

    run(main(), uvloop=True)


def _measure_rate(backend: relay.Backend, rate: float, seconds: float = 3.0):
    """Bytes/s a saturating sender gets through a relay limited to ``rate``."""

    async def main() -> float:
        bucket = backend.bucket(rate, max(8192, rate / 50))  # 20 ms worth
        client, server, handle = await _relay_pair(backend, up=[bucket])
        server.settimeout(10)
        stop = time.monotonic() + 60

        def sender() -> None:
            client.setblocking(True)
            chunk = b"z" * 65536
            try:
                while time.monotonic() < stop:
                    client.sendall(chunk)
            except OSError:
                pass

        send_task = asyncio.create_task(asyncio.to_thread(sender))

        def receive_for(duration: float) -> tuple[int, float]:
            server.recv(65536)  # first byte: clock starts
            t0 = time.monotonic()
            total = 0
            while (elapsed := time.monotonic() - t0) < duration:
                total += len(server.recv(65536))
            return total, elapsed

        total, elapsed = await asyncio.to_thread(receive_for, seconds)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        client.close()
        server.close()
        await send_task
        return total / elapsed

    return run(main())


@pytest.mark.parametrize("rate", [200_000, 1_000_000, 4_000_000])
def test_throttle_accuracy(backend: relay.Backend, rate: int) -> None:
    measured = _measure_rate(backend, rate)
    print(f"relay limit {rate} B/s: measured {measured:.0f} B/s")
    assert abs(measured - rate) <= 0.05 * rate, f"{measured:.0f} B/s for a limit of {rate}"


def test_shared_device_bucket_is_split_fairly(backend: relay.Backend) -> None:
    rate = 2_000_000

    async def main() -> list[int]:
        device = backend.bucket(rate, 16384)
        sessions = [await _relay_pair(backend, down=[device]) for _ in range(2)]

        def pump(client: socket.socket, server: socket.socket, seconds: float) -> int:
            client.settimeout(10)
            end = time.monotonic() + seconds
            import threading

            def feed() -> None:
                try:
                    while time.monotonic() < end + 1:
                        server.sendall(b"d" * 65536)
                except OSError:
                    pass

            t = threading.Thread(target=feed, daemon=True)
            t.start()
            total = 0
            while time.monotonic() < end:
                total += len(client.recv(65536))
            return total

        totals = await asyncio.gather(
            *(asyncio.to_thread(pump, c, s, 3.0) for c, s, _ in sessions)
        )
        for c, s, h in sessions:
            h.cancel()
            with pytest.raises(asyncio.CancelledError):
                await h
            c.close()
            s.close()
        return totals

    totals = run(main())
    print(f"shared device bucket {rate} B/s over 3 s: sessions moved {totals}")
    half = sum(totals) / 2
    for t in totals:
        assert abs(t - half) <= 0.10 * half, f"unfair split {totals}"
    assert abs(sum(totals) / 3.0 - rate) <= 0.05 * rate, f"{sum(totals) / 3:.0f} B/s total"


def test_set_rate_takes_effect_while_running(backend: relay.Backend) -> None:
    async def main() -> tuple[float, float]:
        bucket = backend.bucket(300_000, 8192)
        client, server, handle = await _relay_pair(backend, up=[bucket])
        stop = time.monotonic() + 30

        def sender() -> None:
            try:
                while time.monotonic() < stop:
                    client.sendall(b"r" * 65536)
            except OSError:
                pass

        send_task = asyncio.create_task(asyncio.to_thread(sender))

        def window(seconds: float) -> float:
            t0, total = time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                total += len(server.recv(65536))
            return total / (time.monotonic() - t0)

        slow = await asyncio.to_thread(window, 1.5)
        bucket.set_rate(1_500_000, 8192)
        await asyncio.to_thread(server.recv, 65536)
        fast = await asyncio.to_thread(window, 1.5)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        client.close()
        server.close()
        await send_task
        return slow, fast

    slow, fast = run(main())
    print(f"set_rate 300000 -> 1500000 B/s: measured {slow:.0f} then {fast:.0f} B/s")
    assert abs(slow - 300_000) <= 0.05 * 300_000, slow
    assert abs(fast - 1_500_000) <= 0.05 * 1_500_000, fast


def test_no_leaks_after_1000_sessions(backend: relay.Backend) -> None:
    async def main() -> None:
        async def one() -> None:
            client, server, handle = await _relay_pair(backend)
            client.sendall(b"abc")
            client.shutdown(socket.SHUT_WR)
            server.sendall(b"de")
            server.shutdown(socket.SHUT_WR)
            assert await handle == (3, 2)
            client.close()
            server.close()

        await one()  # warm up: lazily started workers, thread pools
        fds, nthreads = open_fds(), threads()
        for _ in range(10):
            await asyncio.gather(*(one() for _ in range(100)))
        assert open_fds() == fds
        assert threads() == nthreads
        assert len(asyncio.all_tasks()) == 1

    run(main(), timeout=120)
