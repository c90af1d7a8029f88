"""Benchmark fixtures: iperf3 ends and the relays under test, each in its own process.

The traffic ends (Debian's ``iperf3`` client and server) never run in the
relay's process, so the relay process's CPU time (read from ``/proc``) is
the relay's own cost. haproxy and iperf3 are installed with apt-get when
missing. Only loopback addresses are used.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TOOLS = {"haproxy": "haproxy", "iperf3": "iperf3"}  # binary -> Debian package


def _apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """Paths of haproxy and iperf3, installing the Debian packages if needed."""
    missing = [pkg for binary, pkg in TOOLS.items() if shutil.which(binary) is None]
    if missing:
        _apt_install(missing)
    paths = {binary: shutil.which(binary) for binary in TOOLS}
    absent = [binary for binary, path in paths.items() if path is None]
    if absent:
        pytest.skip(f"could not install {', '.join(absent)} (apt-get as root needed)")
    return {binary: str(path) for binary, path in paths.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (read from /proc, no probe
    connection: iperf3 would take one for a client)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            return True
    return False


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {port}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="session")
def iperf3_server(tools: dict[str, str]) -> Iterator[int]:
    """Port of an iperf3 server on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen(
        [tools["iperf3"], "-s", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc, "iperf3 server")
        yield port
    finally:
        _stop(proc)


@dataclass
class Target:
    """Where the iperf3 client connects, and the relay process to charge (if any)."""

    kind: str
    port: int
    pid: int | None


HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-request
    option splice-response
listen relay
    bind 127.0.0.1:{port}
    server iperf3 127.0.0.1:{target}
"""


def _start_relay(
    kind: str, target: int, tools: dict[str, str], tmp: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ)
    if kind == "haproxy":
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, target=target))
        cmd = [tools["haproxy"], "-db", "-f", str(cfg)]
    else:
        backend, _, workers = kind.partition("-")  # "rust-1worker": one worker thread
        if workers:
            env["SWIFTFTP_RELAY_WORKERS"] = workers.removesuffix("worker")
        cmd = [sys.executable, str(HERE / "relay_server.py"), "--backend", backend]
        cmd += ["--target", str(target), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_listening(port, proc, kind)
    return proc, port


@pytest.fixture
def target(
    request: pytest.FixtureRequest,
    iperf3_server: int,
    tools: dict[str, str],
    tmp_path: Path,
) -> Iterator[Target]:
    """The iperf3 server directly, or a relay to it in its own process."""
    kind: str = request.param
    if kind == "direct":
        yield Target(kind, iperf3_server, None)
        return
    proc, port = _start_relay(kind, iperf3_server, tools, tmp_path)
    try:
        yield Target(kind, port, proc.pid)
    finally:
        _stop(proc)
