"""FTPS through the node against plain FTP through it and ProFTPD mod_proxy
terminating FTPS: RETR and STOR of 256 MiB, side by side in one run.

    .venv/bin/python -m pytest benches/test_ftps_throughput.py --benchmark-json=ftps.json
    .venv/bin/python benches/report.py ftps.json

Every target serves the same pyftpdlib process (benches/processes.py, sendfile
for RETR); the client is curl (OpenSSL), writing to /dev/null or reading a file
on tmpfs. Targets:

* ``node-ftps``: ``swiftftp-proxy serve`` (rust relay, ``[tls]`` with an ECDSA
  P-256 certificate) and ``swiftftp-agent`` in front of pyftpdlib; curl with
  ``--ssl-reqd`` (AUTH TLS, PROT P, the data connection resuming the control
  session);
* ``node-plain``: the same node and agent, plain FTP;
* ``mod_proxy-ftps``: ProFTPD 1.3.8 mod_proxy (benches/peers.py) with mod_tls,
  same certificate, in front of the same pyftpdlib.

Figures: throughput (the file's size over curl's wall time, login included)
and the proxy's CPU seconds per GiB: the node process (all threads), or
ProFTPD's master with its reaped session processes (cutime). The agent is the
device side and is not counted, like pyftpdlib. Nothing is asserted on time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
from tests.tlscerts import make

from benches.peers import start_mod_proxy
from benches.processes import Part
from conftest import free_port  # benches/ is on sys.path (no package)

SIZE = int(os.environ.get("SWIFTFTP_BENCH_FTPS_MIB", "256")) << 20
ROUNDS = int(os.environ.get("SWIFTFTP_BENCH_FTPS_ROUNDS", "2"))
TARGETS = ["node-ftps", "node-plain", "mod_proxy-ftps"]


@dataclass
class Target:
    kind: str
    port: int
    user: str
    pid: int
    tls: bool
    children: bool = False  # ProFTPD: count reaped session processes too


def cpu_seconds(pid: int, children: bool) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / os.sysconf("SC_CLK_TCK")


def wait_children_reaped(pid: int, timeout: float = 10) -> None:
    """ProFTPD's session process ends after the client's QUIT; its CPU reaches the
    master's cutime once the master reaps it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = "".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
        if not kids.strip():
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs = make()
    (directory / "ca.pem").write_bytes(certs.ca)
    (directory / "server.pem").write_bytes(certs.chain)
    (directory / "server.key").write_bytes(certs.key)
    return directory


@pytest.fixture(scope="module")
def ftpd_root() -> Iterator[Path]:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    root = root / f"swiftftp-ftps-bench-{os.getpid()}"
    root.mkdir()
    with (root / "big.bin").open("wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    (root / "upload").mkdir()
    try:
        yield root
    finally:
        for path in sorted(root.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        root.rmdir()


@pytest.fixture(scope="module")
def ftpd(ftpd_root: Path) -> Iterator[int]:
    port = free_port()
    part = Part([sys.executable, "-m", "benches.processes", "ftpd", str(port), str(ftpd_root)], "ready")
    try:
        yield port
    finally:
        part.stop()


@pytest.fixture(scope="module")
def node(ftpd: int, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, str]]:
    """The node with TLS configured, and an agent publishing pyftpdlib: (ftp port, pid, user)."""
    tmp = tmp_path_factory.mktemp("node")
    ftp_port, device_port = free_port(), free_port()
    config = tmp / "node.toml"
    config.write_text(
        f'[node]\nlisten = "127.0.0.1"\nftp_port = {ftp_port}\ndevice_port = {device_port}\n'
        f'state_dir = "{tmp / "state"}"\ndata_ports = "0"\nstats_listen = ""\nrelay = "rust"\n'
        f'[tls]\ncertificate = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n'
    )
    server = Part([sys.executable, "-m", "swiftftp", "serve", "--config", str(config)], "listening on")
    try:
        agent = Part(
            [str(Path(sys.executable).parent / "swiftftp-agent"), "--proxy", f"127.0.0.1:{device_port}",
             "--ftp", f"127.0.0.1:{ftpd}", "--state-dir", str(tmp / "agent"),
             "--client-port", str(ftp_port), "--user", "user"],
            "ftp://",
        )
        try:
            prefix = re.search(r"ftp://([a-z]+)_", agent.line)[1]  # type: ignore[index]
            yield ftp_port, server.pid, f"{prefix}_user"
        finally:
            agent.stop()
    finally:
        server.stop()


@pytest.fixture
def target(request: pytest.FixtureRequest, node: Any, ftpd: int, pki: Path) -> Iterator[Target]:
    kind = request.param
    if kind.startswith("node"):
        port, pid, user = node
        yield Target(kind, port, user, pid, tls=kind == "node-ftps")
        return
    proxy = start_mod_proxy("127.0.0.1", ftpd, tls=(pki / "server.pem", pki / "server.key"))
    try:
        yield Target(kind, proxy.port, "user", proxy.proc.pid, tls=True, children=True)
    finally:
        proxy.stop()


def curl(target: Target, pki: Path, *args: str) -> None:
    cmd = ["curl", "--silent", "--show-error", "--max-time", "300", "--user", f"{target.user}:secret"]
    if target.tls:
        cmd += ["--ssl-reqd", "--cacert", str(pki / "ca.pem")]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=330)
    assert done.returncode == 0, f"curl {args}: {done.returncode} {done.stderr}"


def _measure(benchmark: Any, target: Target, pki: Path, ftpd_root: Path, direction: str) -> None:
    rounds: list[dict[str, float]] = []
    url = f"ftp://127.0.0.1:{target.port}/"

    def one_round() -> None:
        before = cpu_seconds(target.pid, target.children)
        start = time.monotonic()
        if direction == "retr":
            curl(target, pki, "--output", "/dev/null", url + "big.bin")
        else:
            curl(target, pki, "--upload-file", str(ftpd_root / "big.bin"), url + "upload/up.bin")
        wall = time.monotonic() - start
        if target.children:
            wait_children_reaped(target.pid)
        cpu = cpu_seconds(target.pid, target.children) - before
        if direction == "stor":
            assert (ftpd_root / "upload" / "up.bin").stat().st_size == SIZE
        gib = SIZE / 2**30
        rounds.append({"gbit_s": SIZE * 8 / wall / 1e9, "cpu_s_per_gib": cpu / gib})

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        ftps_target=target.kind,
        ftps_direction=direction,
        gbit_s=round(mean(r["gbit_s"] for r in rounds), 2),
        gbit_s_rounds=[round(r["gbit_s"], 2) for r in rounds],
        cpu_s_per_gib=round(mean(r["cpu_s_per_gib"] for r in rounds), 3),
        mib=SIZE >> 20,
    )


@pytest.mark.parametrize("target", TARGETS, indirect=True)
def test_ftps_retr(benchmark: Any, target: Target, pki: Path, ftpd_root: Path) -> None:
    """RETR of 256 MiB."""
    _measure(benchmark, target, pki, ftpd_root, "retr")


@pytest.mark.parametrize("target", TARGETS, indirect=True)
def test_ftps_stor(benchmark: Any, target: Target, pki: Path, ftpd_root: Path) -> None:
    """STOR of 256 MiB."""
    _measure(benchmark, target, pki, ftpd_root, "stor")
