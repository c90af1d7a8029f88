"""The parts of the latency benchmark, each in a process of its own, on loopback.

    python -m benches.processes ftpd PORT ROOT          pyftpdlib (user/secret) on PORT
    python -m benches.processes field DEVICE_PORT       the field-like test device; prints its prefix

Each prints ``ready …`` on stdout once it serves, then runs until SIGTERM.
``Part`` starts one of them (or the node, or the agent) and stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Part:
    """A subprocess that prints one line when it is ready; ``.line`` is that line."""

    def __init__(self, argv: Sequence[str], marker: str, timeout: float = 30) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if marker in line:
                    found.append(line.strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise RuntimeError(f"{argv[0]} … did not print {marker!r} within {timeout} s")
        self.line = found[0]
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the node: stop at once, no drain
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ftpd(port: int, root: str) -> None:
    import logging

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    authorizer = DummyAuthorizer()
    authorizer.add_user("user", "secret", root, perm="elradfmwMT")
    from pyftpdlib.handlers import DTPHandler

    # 1 MiB reads for uploads (64 KiB by default): the device side of the FTPS bench's
    # STOR of 256 MiB, 2.7 → 4.3 Gbit/s plain through the node (benches/test_ftps_throughput.py).
    dtp = type("BenchDTP", (DTPHandler,), {"ac_in_buffer_size": 1 << 20})
    handler = type("BenchHandler", (FTPHandler,), {"authorizer": authorizer, "dtp_handler": dtp})
    server = FTPServer(("127.0.0.1", port), handler)  # one thread, asyncore: pyftpdlib's default
    print("ready", flush=True)
    server.serve_forever(timeout=0.5)


def _field(device_port: int) -> None:
    from tests.fielddevice import FieldDevice

    # as in the tests (tests/conftest.py): the device's threads wait less for the GIL,
    # closer to a device whose threads have no GIL to share
    sys.setswitchinterval(0.001)
    device = FieldDevice(device_port, android_id="bench-field-device", files={"one.bin": b"1"}).start()
    print(f"ready {device.prefix}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    device.stop()


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "ftpd":
        _ftpd(int(args[0]), args[1])
    elif kind == "field":
        _field(int(args[0]))
    else:
        sys.exit(f"unknown part {kind!r}")
