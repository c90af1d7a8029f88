"""How far apart two messages must be written for a device's reader to take them
in two reads: the figure behind ``outbox.GRACE``.

The deployed device reads with a thread blocked in ``read()`` and parses one
object per read. Two messages written ``gap`` seconds apart reach it in one
read when its thread had not yet run after the first arrived. On a link with
a round trip above the gap, the acknowledgement the node waits for keeps them
apart; on loopback nothing does. This writes N pairs of small messages at each
gap on loopback (the writer in its own process, sleeping through the gap as the
node does; the
reader a thread blocked in ``recv(2048)``; with ``--hog`` beside a thread that
keeps the GIL busy, as the test device beside the node in the test process),
with ``--burn`` processes spinning on the CPUs, and counts the pairs read at once.

    .venv/bin/python benches/wakeup.py --pairs 5000 --burn 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import threading
import time
from typing import Any

GAPS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def _burn(stop: Any) -> None:  # a multiprocessing Event
    while not stop.is_set():
        sum(range(10_000))


def _writer(port: int, pairs: int, gaps: tuple[float, ...], pause: float) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for gap in gaps:
        for _ in range(pairs):
            time.sleep(pause)  # the reader is back in recv() by now (the usual case)
            sock.send(b'{"action": "noop"}')
            if gap:
                time.sleep(gap)  # the node waits in epoll too, leaving the CPU to others
            sock.send(b'{"action": "noop"}')
            if sock.recv(1) != b".":  # the reader took both: next pair
                return
    sock.close()


def measure(pairs: int, hog: bool, pause: float) -> dict[float, int]:
    """Pairs read in one recv() at each gap."""
    listener = socket.create_server(("127.0.0.1", 0))
    writer = multiprocessing.Process(target=_writer, args=(listener.getsockname()[1], pairs, GAPS, pause))
    writer.start()
    reader, _ = listener.accept()
    listener.close()
    merged = dict.fromkeys(GAPS, 0)
    busy = threading.Event()

    def spin() -> None:
        while not busy.is_set():
            sum(range(1000))

    if hog:
        threading.Thread(target=spin, daemon=True).start()
    message = len(b'{"action": "noop"}')
    for gap in GAPS:
        for _ in range(pairs):
            data = reader.recv(2048)
            if len(data) > message:
                merged[gap] += 1
            else:
                while len(data) < 2 * message:
                    data += reader.recv(2048)
            reader.send(b".")
    busy.set()
    writer.join()
    reader.close()
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5000, help="pairs per gap")
    parser.add_argument("--burn", type=int, default=2, help="CPU-spinning processes meanwhile")
    parser.add_argument("--hog", action="store_true", help="a thread keeps the reader's GIL busy")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds the writer waits before each pair (the reader waits in recv)")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(args.burn)]
    for p in burners:
        p.start()
    try:
        merged = measure(args.pairs, args.hog, args.pause)
    finally:
        stop.set()
        for p in burners:
            p.join()
    hog = (", GIL hog" if args.hog else "") + (f", pause {args.pause * 1000:g} ms" if args.pause else "")
    print(f"{args.pairs} pairs per gap, {args.burn} burners{hog}: " + ", ".join(
        f"{gap * 1000:g} ms: {n} merged" for gap, n in merged.items()))


if __name__ == "__main__":
    main()
