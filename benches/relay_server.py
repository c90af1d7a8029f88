"""A bare relay process for the benchmarks: accept on a loopback port, relay each
connection to a target port with the chosen backend.

    python benches/relay_server.py --backend rust --target 5201

Prints ``PORT <n>`` once listening, then serves until killed. It runs in a
process of its own so that the benchmark can read its CPU time alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys

from swiftftp import relay


async def serve(backend_name: str, target: int, port: int) -> None:
    backend = relay.get_backend(backend_name)
    running: set[asyncio.Task[None]] = set()

    async def handle(client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", target))
        except OSError:
            upstream.close()
            client.close()
            return
        with contextlib.suppress(OSError):
            await backend.start(client, upstream)

    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setblocking(False)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.cancel)
    accept: asyncio.Task[tuple[socket.socket, object]] | None = None
    try:
        while True:
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            await asyncio.wait({accept, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                break
            client, _ = accept.result()
            task = asyncio.create_task(handle(client), name=f"bench-relay-{client.fileno()}")
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        if accept is not None:
            accept.cancel()
        for task in running:
            task.cancel()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["rust", "python"], required=True)
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.backend not in relay.available():
        sys.exit(f"backend {args.backend} not available here")
    asyncio.run(serve(args.backend, args.target, args.port))


if __name__ == "__main__":
    main()
