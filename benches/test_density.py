"""How many idle phones a node holds, and how fast it takes them all back.

    pytest benches/test_density.py --benchmark-json=density.json && python benches/report.py density.json

For 1,000, 5,000 and 15,000 devices, a node (``swiftftp-proxy serve``, rust relay,
caps raised in its config as an operator would) in its own process, and the load
generator (benches/density_load.rs, built with cargo: one thread, epoll, so that
the node and not the generator is what is measured) in another, dialling from 250
loopback addresses like the deployed phone (one object per write, no json_stream):

* the first wave: every device logs in for the first time (its id is registered);
  logins/s, and the node's CPU per login;
* idle: the node's RSS per device over its RSS before, and its CPU over
  ``SWIFTFTP_BENCH_IDLE`` seconds (60 by default: one keepalive round at the
  default 50 s);
* at 1,000 devices, 1,000 FTP clients logged in through them and idle: RSS per
  relayed control connection;
* the reconnect storm: every device drops its connection at once and logs in
  again; logins/s and CPU per login;
* everyone leaves: the node's RSS against its RSS before the first wave.

Figures go to ``extra_info``; nothing is asserted but that the logins happened.
The relay backend does not matter here (nothing is relayed but control lines,
which Python relays with either), so this runs the default, rust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benches.processes import Part
from conftest import cpu_seconds, free_port  # benches/ is on sys.path (no package)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COUNTS = [int(n) for n in os.environ.get("SWIFTFTP_BENCH_DEVICES", "1000,5000,15000").split(",")]
IDLE = float(os.environ.get("SWIFTFTP_BENCH_IDLE", "60"))
CONTROLS = 1000

CONFIG = """\
[node]
stats_listen = "127.0.0.1:{stats}"
[limits]
max_command_sessions = 20000
max_pending_connections = 20000
max_connections_per_ip = 4000
max_pending_logins_per_ip = 1024
max_new_devices_per_ip = 100000
max_pending_listeners = 20000
max_control_per_device = 16
"""


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def load_generator() -> Path:
    """benches/density_load.rs, built (release) into target/."""
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "density_load"],
                   cwd=ROOT, check=True, timeout=900)
    return ROOT / "target" / "release" / "examples" / "density_load"


class Generator:
    """The load generator in its own process, driven line by line."""

    def __init__(self, device_port: int, ftp_port: int, devices: int) -> None:
        self.proc = subprocess.Popen(
            [str(load_generator()), str(device_port), str(ftp_port), str(devices)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(self.proc.stdout.readline())["ready"]  # type: ignore[union-attr]

    def do(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator died during {command!r}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]: EOF ends it
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def online(stats: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stats}/stats", timeout=10) as response:
        return json.loads(response.read())["devices_online"]


def wait_online(stats: int, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while online(stats) != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"devices online did not reach {count}")
        time.sleep(0.2)


def settle(pid: int, seconds: float = 0.5, timeout: float = 30) -> None:
    """Wait until the node has used less than 5 % CPU over ``seconds``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(seconds)
        if cpu_seconds(pid) - before < 0.05 * seconds:
            return


@pytest.fixture(params=COUNTS, ids=[f"{n}" for n in COUNTS])
def devices(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Part, int, int, int]]:
    ftp_port, device_port, stats = free_port(), free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(CONFIG.format(stats=stats))
    part = Part(
        [sys.executable, "-m", "swiftftp", "serve", "--config", str(config), "--listen", "127.0.0.1",
         "--ftp-port", str(ftp_port), "--device-port", str(device_port), "--state-dir",
         str(tmp_path / "state"), "--data-ports", "0", "--relay", "rust"],
        "listening",
    )
    try:
        yield part, ftp_port, device_port, stats
    finally:
        part.stop()


@pytest.mark.timeout(1800)
def test_density(benchmark: Any, node: tuple[Part, int, int, int], devices: int) -> None:
    part, ftp_port, device_port, stats = node
    pid = part.pid
    figures: dict[str, Any] = {"devices": devices}

    def measure() -> None:
        settle(pid)
        rss0 = rss(pid)
        load = Generator(device_port, ftp_port, devices)
        try:
            cpu = cpu_seconds(pid)
            first = load.do("connect")
            print(f"\nfirst wave: {first}", flush=True)
            wait_online(stats, devices)
            figures["first_wave_logins_per_s"] = round(devices / first["seconds"])
            figures["cpu_ms_per_first_login"] = round((cpu_seconds(pid) - cpu) / devices * 1000, 3)
            settle(pid)
            cpu, began = cpu_seconds(pid), time.monotonic()
            time.sleep(IDLE)
            idle_cpu = cpu_seconds(pid) - cpu
            figures["idle_cpu_percent"] = round(idle_cpu / (time.monotonic() - began) * 100, 2)
            idle_rss = rss(pid)
            figures["rss_per_device_kib"] = round((idle_rss - rss0) / devices / 1024, 2)
            if devices == CONTROLS:
                load.do(f"clients {CONTROLS}")
                settle(pid)
                figures["rss_per_control_kib"] = round((rss(pid) - idle_rss) / CONTROLS / 1024, 2)
                load.do("close_clients")
            load.do("drop")
            wait_online(stats, 0)
            settle(pid)
            cpu = cpu_seconds(pid)
            storm = load.do("connect")
            wait_online(stats, devices)
            figures["storm_logins_per_s"] = round(devices / storm["seconds"])
            figures["cpu_ms_per_storm_login"] = round((cpu_seconds(pid) - cpu) / devices * 1000, 3)
            load.do("drop")
            wait_online(stats, 0)
            time.sleep(12)  # the node gives memory back within 10 s of a drop (memory.py)
            settle(pid, 1.0)
            after = rss(pid)
            figures["rss_before_mib"] = round(rss0 / 2**20, 1)
            figures["rss_after_mib"] = round(after / 2**20, 1)
            figures["rss_after_over_before"] = round(after / rss0, 2)
        finally:
            load.close()

    benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(density=figures)
    print(f"\n{devices} devices: {figures}")
    assert figures["first_wave_logins_per_s"] > 0
