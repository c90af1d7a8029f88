"""The command-line contract, on a real ``swiftftp-proxy serve`` process: the
ready line, SIGHUP reload of a running session's rate, the stats and devices
commands, JSON logs with session ids, clean stop on SIGTERM."""

from __future__ import annotations

import ftplib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fielddevice import FieldDevice
from tests.helpers import wait_until

READY = re.compile(
    r"listening on 127\.0\.0\.1: FTP clients port (\d+), devices port (\d+), "
    r"relay (\w+), stats http://127\.0\.0\.1:(\d+)"
)


def config_text(state: Path, backend: str, session_rate: int) -> str:
    return f"""
[node]
listen = "127.0.0.1"
ftp_port = 0
device_port = 0
data_ports = "0"
state_dir = "{state}"
stats_listen = "127.0.0.1:0"
log_format = "json"
relay = "{backend}"

[limits]
session_rate = {session_rate}
burst = 16384
failure_delay = 0

[quota]
flush_interval = 0.2  # usage reaches the registry, where the CLI reads it, this often
"""


class Node:
    """``python -m swiftftp serve --config FILE`` with its output collected."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swiftftp", "serve", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.logs: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        m = READY.search(line)
        assert m, f"no ready line: {line!r} {self.logs}"
        self.ftp_port, self.device_port = int(m[1]), int(m[2])
        self.backend, self.stats_port = m[3], int(m[4])

    def _read_logs(self) -> None:
        for line in self.proc.stderr:
            self.logs.append((time.monotonic(), line))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "swiftftp", *args], capture_output=True,
                              text=True, timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self._reader.join(5)
        return code


@pytest.fixture
def node(tmp_path: Path, backend_name: str) -> Iterator[Node]:
    config = tmp_path / "node.toml"
    config.write_text(config_text(tmp_path / "state", backend_name, 300_000))
    n = Node(config)
    try:
        yield n
    finally:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait(5)


def test_sighup_reload_devices_and_stats_commands(node: Node, backend_name: str, tmp_path: Path) -> None:
    assert node.backend == backend_name
    device = FieldDevice(node.device_port, android_id="cli-phone",
                         files={"f": os.urandom(3_500_000)}).start()
    marks: list[tuple[float, int]] = []

    def download() -> None:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", node.ftp_port, timeout=30)
        ftp.login(f"{device.prefix}_u", "pw")
        ftp.retrbinary("RETR f", lambda d: marks.append((time.monotonic(), len(d))), 65536)
        ftp.quit()

    worker = threading.Thread(target=download)
    worker.start()
    wait_until(lambda: marks and time.monotonic() - marks[0][0] > 1.5, 20, "a slow start")
    node.config.write_text(config_text(tmp_path / "state", backend_name, 1_500_000))
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any("reloaded: limits.session_rate" in line for _, line in node.logs), 10)
    reloaded = next(t for t, line in node.logs if "reloaded: limits.session_rate" in line)
    worker.join(60)
    assert not worker.is_alive()

    def rate(start: float, end: float) -> float:
        inside = [(t, n) for t, n in marks if start <= t <= end]
        return sum(n for _, n in inside[1:]) / (inside[-1][0] - inside[0][0])

    before = rate(marks[0][0] + 0.2, reloaded)
    after = rate(reloaded + 0.2, marks[-1][0])
    assert abs(before - 300_000) <= 0.10 * 300_000, before
    assert abs(after - 1_500_000) <= 0.10 * 1_500_000, after

    # stats: a table for people, JSON on request
    done = node.cli("stats", "--stats-listen", f"127.0.0.1:{node.stats_port}")
    assert done.returncode == 0, done.stderr
    assert re.search(rf"relay backend\s+{backend_name}", done.stdout)
    assert re.search(r"devices online\s+1", done.stdout)
    done = node.cli("stats", "--stats-listen", f"127.0.0.1:{node.stats_port}", "--json")
    assert orjson.loads(done.stdout)["sessions_opened"]["data"] == 1

    # devices: list, show, set-quota, reset-usage, message (to the running node)
    config = ["--config", str(node.config)]
    done = node.cli("devices", *config, "list")
    assert done.returncode == 0 and device.prefix in done.stdout and "cli-phone" in done.stdout
    def used() -> int:
        done = node.cli("devices", *config, "show", device.prefix)
        return int(re.search(r"used\s+(\d+)", done.stdout)[1])

    wait_until(lambda: used() >= 3_500_000, 5, "usage in the registry")
    assert node.cli("devices", *config, "set-quota", "cli-phone", "2M").returncode == 0
    done = node.cli("devices", *config, "show", "cli-phone")
    assert re.search(r"quota\s+2000000 \(device\)", done.stdout)
    assert node.cli("devices", *config, "reset-usage", device.prefix).returncode == 0
    assert re.search(r"used\s+0\b", node.cli("devices", *config, "show", device.prefix).stdout)
    done = node.cli("devices", *config, "message", device.prefix, "Maintenance at 22:00 UTC")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: device.notices, 5)
    assert device.notices[-1] == {"action": "message", "text": "Maintenance at 22:00 UTC"}
    done = node.cli("devices", *config, "message", "zzzzz", "hi")
    assert done.returncode == 1 and "not online" in done.stderr
    done = node.cli("devices", *config, "show", "nosuch")
    assert done.returncode == 1 and "no device" in done.stderr

    device.stop()
    assert node.stop() == 0
    assert not device.errors

    # JSON logs, with the session id on the session's lines
    entries = [orjson.loads(line) for _, line in node.logs if line.strip()]
    assert all({"time", "level", "logger", "session", "message"} <= set(e) for e in entries)
    closed = [e for e in entries if e.get("event") == "session_close"]
    assert {e["kind"] for e in closed} == {"command", "control", "data"}
    for e in closed:  # the facts as fields, the session id on the session's own line
        assert e["id"] == e["session"] and e["message"].startswith(f"session close id={e['session']} ")
        assert {"prefix", "peer", "up", "down", "duration", "reason"} <= set(e)
    assert any(e["message"] == "stopped" for e in entries)
    transfers = (tmp_path / "state" / "transfers.log").read_text().splitlines()
    assert len(transfers) == 1 and orjson.loads(transfers[0])["bytes"] == 3_500_000


def test_sigterm_lets_a_running_download_finish(node: Node) -> None:
    """SIGTERM drains: the device is asked to reconnect, a new client gets 421, the
    download already running (3 s at the 300 kB/s session rate) arrives whole, and
    then the node exits 0."""
    data = os.urandom(900_000)
    device = FieldDevice(node.device_port, android_id="drain-phone", files={"f": data}).start()
    chunks: list[bytes] = []

    def download() -> None:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", node.ftp_port, timeout=30)
        ftp.login(f"{device.prefix}_u", "pw")
        ftp.retrbinary("RETR f", chunks.append)
        ftp.quit()

    worker = threading.Thread(target=download)
    worker.start()
    wait_until(lambda: chunks, 10, "the download under way")
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: {"action": "reconnect"} in device.notices, 5, "reconnect sent")
    with socket.create_connection(("127.0.0.1", node.ftp_port), timeout=10) as late:
        assert late.recv(200).startswith(b"421 This node is shutting down")
    assert node.proc.poll() is None  # still serving the download
    worker.join(30)
    assert not worker.is_alive()
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert node.proc.wait(15) == 0
    assert any('"drained"' in line for _, line in node.logs), node.logs[-3:]
    device.stop()


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nsession_rate = 5\nsesion_burst = 3\n")
    done = subprocess.run([sys.executable, "-m", "swiftftp", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "limits.sesion_burst: unknown setting" in done.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "swiftftp", "serve", "--listen", "127.0.0.1", "--ftp-port",
             str(port), "--device-port", "0", "--stats-listen", "off", "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr == (f"swiftftp-proxy: cannot listen on 127.0.0.1 port {port} (node.ftp_port): "
                           "Address already in use (another node running?)\n")


def local_non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
        except OSError:
            return None
        ip = probe.getsockname()[0]
    return None if ip.startswith("127.") else ip


def start_demo() -> tuple[subprocess.Popen, str, Path]:
    """``demo`` with no state dir: (process, URL, the temporary folder it serves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWIFTFTP_")}
    proc = subprocess.Popen([sys.executable, "-m", "swiftftp", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()  # the first thing printed, anywhere
    ready = proc.stderr.readline()
    m = re.fullmatch(r"demo ready: serving (\S+) \(Ctrl-C to stop\)\n", ready)
    assert m, ready
    return proc, url, Path(m[1])


def test_demo_prints_a_url_any_client_can_open() -> None:
    proc, url, folder = start_demo()
    try:
        assert re.fullmatch(r"ftp://[a-z]{5}_anonymous:@127\.0\.0\.1:(\d+)/", url), url
        assert folder.name == "files" and folder.parent.name.startswith("swiftftp-demo-")
        got = subprocess.run(["curl", "-sS", "--max-time", "20", url + "hello.txt"],
                             capture_output=True, text=True, timeout=30)
        assert got.stdout == "Hello from behind the NAT!\n", got.stderr
        got = subprocess.run(["lftp", "-c", f"open {url}; cat hello.txt"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=30)
        assert got.stdout == "Hello from behind the NAT!\n", got.stderr
        # loopback only: the FTP port is closed on the machine's other addresses
        if ip := local_non_loopback_ip():
            port = int(url.rsplit(":", 1)[1].rstrip("/"))
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, port), timeout=5).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert proc.stdout.read() == "" and not folder.parent.exists()  # its temporary state is gone


def test_demo_cleans_up_on_ctrl_c() -> None:
    proc, _, folder = start_demo()
    assert folder.is_dir()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert not folder.parent.exists()
    assert "Traceback" not in proc.stderr.read()
