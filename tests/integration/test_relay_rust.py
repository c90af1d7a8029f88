"""What only the Rust backend has: its engine, per-loop notifiers, type checks.

Like every relay test, these fail (not skip) when the extension is not built.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from swiftftp import _rustrelay, relay
from tests.helpers import open_fds, run, tcp_pair


def _backend():
    return relay.get_backend("rust")


def test_start_takes_only_rust_buckets_and_keeps_the_sockets_on_refusal() -> None:
    a, b = socket.socketpair()

    async def main() -> None:
        with pytest.raises(TypeError):
            _backend().start(a, b, up=[relay.get_backend("python").bucket(1000)])

    run(main())
    assert a.fileno() >= 0 and b.fileno() >= 0, "still owned by the caller"
    a.close()
    b.close()


def test_start_needs_a_running_loop() -> None:
    a, b = socket.socketpair()
    with pytest.raises(RuntimeError):
        _backend().start(a, b)
    assert a.fileno() >= 0
    a.close()
    b.close()


def test_engine_runs_a_fixed_set_of_workers() -> None:
    from swiftftp import _splice

    async def one() -> None:
        client, ra = tcp_pair()
        rb, server = tcp_pair()
        handle = _backend().start(ra, rb)
        client.close()
        server.close()
        await handle

    run(one())
    workers, pipe_size = _splice.init()
    assert workers >= 1 and pipe_size > 0
    with pytest.raises(OSError):
        _splice.init(workers + 1)
    assert _splice.running() == 0


def test_notifiers_live_only_while_relays_run() -> None:
    """Many short-lived loops (uvloop too) do not pile up eventfds; an idle loop holds none."""

    async def one() -> None:
        client, ra = tcp_pair()
        rb, server = tcp_pair()
        handle = _backend().start(ra, rb)
        client.sendall(b"q")
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert await handle == (1, 0)
        client.close()
        server.close()
        await asyncio.sleep(0)
        assert asyncio.get_running_loop() not in _rustrelay._waiters

    run(one())
    run(one(), uvloop=True)
    fds = open_fds()
    for i in range(30):
        run(one(), uvloop=bool(i % 2))
    assert open_fds() == fds


def test_sessions_spread_over_workers_and_end_cleanly() -> None:
    from swiftftp import _splice

    async def main() -> None:
        pairs = []
        for _ in range(20):
            client, ra = tcp_pair()
            rb, server = tcp_pair()
            pairs.append((client, server, _backend().start(ra, rb)))
        await asyncio.sleep(0.05)
        assert _splice.running() == 20
        for client, server, _ in pairs:
            client.close()
            server.close()
        assert [await h for _, _, h in pairs] == [(0, 0)] * 20
        assert _splice.running() == 0

    run(main())


def test_loops_in_several_threads_at_once() -> None:
    """Each thread's loop gets its own notices (as the proxy's and an agent's loops do)."""
    import threading

    async def batch(tag: bytes) -> None:
        async def one() -> None:
            client, ra = tcp_pair()
            rb, server = tcp_pair()
            handle = _backend().start(ra, rb)
            client.sendall(tag)
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(server.recv, 10) == tag
            assert await handle == (len(tag), 0)
            client.close()
            server.close()

        for _ in range(5):
            await asyncio.gather(*(one() for _ in range(20)))

    errors: list[BaseException] = []

    def thread(tag: bytes, uv: bool) -> None:
        try:
            run(batch(tag), uvloop=uv)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(b"t%d" % i, i % 2 == 1)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
