"""What a login and a small file cost, against pyftpdlib alone and ProFTPD's mod_proxy.

    pytest benches/test_latency.py --benchmark-json=latency.json && python benches/report.py latency.json

Four targets, each serving the same pyftpdlib (its own process, ``FTPServer``):

* ``direct``: pyftpdlib itself;
* ``mod_proxy``: ProFTPD 1.3.8 with mod_proxy as a reverse FTP proxy in front of it
  (``ProxyRole reverse``, round robin, ``DelayEngine off``, its tables on a tmpfs;
  benches/peers.py), in the foreground;
* ``agent``: our node (``swiftftp-proxy serve``, rust relay) with ``swiftftp-agent``
  publishing it, each in its own process;
* ``field``: our node with the field-like test device (tests/fielddevice.py: one
  object per read, takes each client on its command thread) in its own process,
  serving an in-memory file.

Measured from this process with an asyncio client: a login (connect, 220, USER,
331, PASS, 230) one at a time, p50 and p99 (in batches of 25 kept open, see
``_login_times``); logins per second with 16 at once
(each login, QUIT, 221, close, again) for a few seconds; and a 1-byte RETR on a
logged-in connection (PASV, connect, RETR, the byte, 226), p50. The node runs
with ``limits.max_control_per_device = 64`` so that 16 logins at once from one
address stay under its per-address share (half the device's slots).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import quantiles
from typing import Any

import pytest

from benches.peers import start_mod_proxy
from benches.processes import Part
from conftest import free_port  # benches/ is on sys.path (no package)

KINDS = ["direct", "mod_proxy", "agent", "field"]
LOGINS = int(os.environ.get("SWIFTFTP_BENCH_LOGINS", "300"))
RETRS = int(os.environ.get("SWIFTFTP_BENCH_RETRS", "200"))
RATE_SECONDS = 5.0
CONCURRENCY = 16
_REPLY = re.compile(rb"^(\d{3}) ")


@dataclass
class Login:
    host: str
    port: int
    user: str
    password: str
    file: str
    pid: int | None = None


@pytest.fixture(scope="module")
def ftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("bench-root")
    (root / "one.bin").write_bytes(b"1")
    port = free_port()
    part = Part([sys.executable, "-m", "benches.processes", "ftpd", str(port), str(root)], "ready")
    try:
        yield port
    finally:
        part.stop()


def _node(tmp: Path) -> tuple[Part, int, int]:
    ftp_port, device_port = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "node.toml"
    config.write_text("[limits]\nmax_control_per_device = 64\n")
    part = Part(
        [sys.executable, "-m", "swiftftp", "serve", "--config", str(config), "--listen", "127.0.0.1",
         "--ftp-port", str(ftp_port), "--device-port", str(device_port), "--state-dir", str(tmp),
         "--stats-listen", "off", "--data-ports", "0", "--relay", "rust"],
        "listening",
    )
    return part, ftp_port, device_port


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, ftpd: int, tmp_path: Path) -> Iterator[Login]:
    kind = request.param
    if kind == "direct":
        yield Login("127.0.0.1", ftpd, "user", "secret", "one.bin")
        return
    if kind == "mod_proxy":
        proxy = start_mod_proxy("127.0.0.1", ftpd)
        try:
            yield Login("127.0.0.1", proxy.port, "user", "secret", "one.bin")
        finally:
            proxy.stop()
        return
    node, ftp_port, device_port = _node(tmp_path / "node")
    parts = [node]
    try:
        if kind == "agent":
            agent = Part(
                [str(Path(sys.executable).parent / "swiftftp-agent"), "--proxy", f"127.0.0.1:{device_port}",
                 "--ftp", f"127.0.0.1:{ftpd}", "--state-dir", str(tmp_path / "agent"),
                 "--client-port", str(ftp_port), "--user", "user"],
                "ftp://",
            )
            parts.append(agent)
            prefix = re.search(r"ftp://([a-z]+)_", agent.line)[1]  # type: ignore[index]
            yield Login("127.0.0.1", ftp_port, f"{prefix}_user", "secret", "one.bin", node.pid)
        else:
            device = Part([sys.executable, "-m", "benches.processes", "field", str(device_port)], "ready")
            parts.append(device)
            prefix = device.line.split()[1]
            yield Login("127.0.0.1", ftp_port, f"{prefix}_user", "pw", "one.bin", node.pid)
    finally:
        for part in reversed(parts):
            part.stop()


# ---- a small FTP client ---------------------------------------------------------------


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if _REPLY.match(line):
            return line


async def _expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    line = await _reply(reader)
    if not line.startswith(code):
        raise AssertionError(f"expected {code!r}, got {line!r}")
    return line


async def _login(t: Login) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(t.host, t.port)
    await _expect(reader, b"220")
    writer.write(f"USER {t.user}\r\n".encode())
    await _expect(reader, b"331")
    writer.write(f"PASS {t.password}\r\n".encode())
    await _expect(reader, b"230")
    return reader, writer


async def _quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"QUIT\r\n")
    await _expect(reader, b"221")
    writer.close()
    await writer.wait_closed()


async def _login_times(t: Login, n: int, batch: int = 25) -> list[float]:
    """One login at a time; each batch of sessions stays open until the batch is done,
    then all quit and the server gets a moment: ProFTPD's master process sleeps about
    0.4 s after its session processes exit (a retry interval compiled in), and a login
    arriving meanwhile would measure that, not the login."""
    times = []
    for start in range(0, n, batch):
        open_ = []
        for _ in range(min(batch, n - start)):
            began = time.perf_counter()
            open_.append(await _login(t))
            times.append(time.perf_counter() - began)
        for reader, writer in open_:
            await _quit(reader, writer)
        await asyncio.sleep(0.5)
    return times


async def _login_rate(t: Login, seconds: float, concurrency: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            reader, writer = await _login(t)
            await _quit(reader, writer)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - began)


async def _retr_times(t: Login, n: int) -> list[float]:
    reader, writer = await _login(t)
    writer.write(b"TYPE I\r\n")
    await _expect(reader, b"200")
    times = []
    for _ in range(n):
        began = time.perf_counter()
        writer.write(b"PASV\r\n")
        line = await _expect(reader, b"227")
        nums = [int(x) for x in re.search(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", line).groups()]  # type: ignore[union-attr]
        data_r, data_w = await asyncio.open_connection(".".join(map(str, nums[:4])), nums[4] * 256 + nums[5])
        writer.write(f"RETR {t.file}\r\n".encode())
        await _expect(reader, b"1")  # 150, or 125 (ProFTPD)
        assert await data_r.read() == b"1"
        data_w.close()
        await _expect(reader, b"226")
        times.append(time.perf_counter() - began)
    await _quit(reader, writer)
    return times


def _ms(values: list[float], q: int) -> float:
    """The q-th percentile of ``values`` in milliseconds."""
    return round(quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 3)


def _run(coro: Any, timeout: float = 300) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def test_login_and_small_file(benchmark: Any, target: Login, request: pytest.FixtureRequest) -> None:
    """Login latency, logins/s at concurrency 16, fixed cost of a 1-byte RETR."""
    kind = request.node.callspec.params["target"]
    figures: dict[str, Any] = {}

    def measure() -> None:
        _run(_login_times(target, 20))  # warm-up
        logins = _run(_login_times(target, LOGINS))
        figures["login_p50_ms"] = _ms(logins, 50)
        figures["login_p99_ms"] = _ms(logins, 99)
        figures["logins_per_s"] = round(_run(_login_rate(target, RATE_SECONDS, CONCURRENCY)), 1)
        retrs = _run(_retr_times(target, RETRS))
        figures["retr_p50_ms"] = _ms(retrs, 50)
        figures["retr_p99_ms"] = _ms(retrs, 99)

    benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(latency_target=kind, **figures)
    print(f"\n{kind}: {figures}")
    assert figures["logins_per_s"] > 0
