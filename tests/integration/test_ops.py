"""Operating a node, on real ``swiftftp-proxy serve`` processes: the stats HTTP server
(health, readiness, OpenMetrics, gzip, process metrics, histograms, per-device
bytes), the status page in a real headless Chromium, systemd's notify protocol on
a real datagram socket, log rotation with the real logrotate, start-up errors, and
the node under MemoryDenyWriteExecute's kernel rule."""

from __future__ import annotations

import ctypes
import ftplib
import gzip
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.cdp import Browser, chromium_binary
from tests.fielddevice import FieldDevice
from tests.helpers import wait_until
from tests.serveproc import Serve, clean_env, download, node_config


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    node = Serve("--config", str(node_config(tmp_path, relay='"rust"')))
    try:
        yield node
    finally:
        node.kill()


def samples(text: str, openmetrics: bool = False) -> dict[tuple[str, tuple], float]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parse(text) for s in family.samples}


# ---- stats HTTP server -------------------------------------------------------------------


def test_health_readiness_metrics_and_device_usage(serve: Serve, tmp_path: Path) -> None:
    status, _, body = serve.get("/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = serve.get("/readyz")
    assert (status, body) == (200, b"ready\n")

    # a registry that cannot take a write (here: locked by another writer) is not ready
    other = sqlite3.connect(tmp_path / "state" / "registry.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        status, _, body = serve.get("/readyz")
        assert status == 503 and body == b"not ready: registry not writable: database is locked\n"
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert serve.get("/readyz")[0] == 200

    data = os.urandom(300_000)
    device = FieldDevice(serve.device_port, android_id="ops-phone", files={"f": data}).start()
    try:
        assert download(serve.ftp_port, device.prefix, "f") == data

        # OpenMetrics when asked for, gzip when accepted: prometheus_client's negotiation
        status, headers, body = serve.get(
            "/metrics", Accept="application/openmetrics-text; version=1.0.0", Accept_Encoding="gzip"
        )
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        text = gzip.decompress(body).decode()
        assert text.endswith("# EOF\n")
        m = samples(text, openmetrics=True)
        for name in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes",
                     "process_cpu_seconds_total"):
            assert m[(name, ())] > 0, name
        assert m[("swiftftp_transfer_seconds_count", ())] == 1
        assert m[("swiftftp_transfer_bytes_sum", ())] == len(data)
        assert m[("swiftftp_transfer_bytes_bucket", (("le", "+Inf"),))] == 1
        # one login (connect to the device's 230) and its rendezvous, each under a second
        assert m[("swiftftp_login_seconds_count", ())] == 1
        assert m[("swiftftp_rendezvous_seconds_count", ())] == 1
        assert m[("swiftftp_login_seconds_bucket", (("le", "1.0"),))] == 1
        down = ("swiftftp_device_relayed_bytes_total", (("direction", "down"), ("prefix", device.prefix)))
        assert m[down] >= len(data)

        # the classic text format by default, and no gzip unless asked
        status, headers, body = serve.get("/metrics")
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "content-encoding" not in headers
        m = samples(body.decode())
        assert m[down] >= len(data) and m[("swiftftp_devices_online", ())] == 1

        stats = orjson.loads(serve.get("/stats")[2])
        history = stats["throughput_history"]
        assert history["step_seconds"] == 5 and len(history["up"]) == len(history["down"])

        # draining: not ready, while a client still holds the node open
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", serve.ftp_port, timeout=30)
        ftp.login(f"{device.prefix}_u", "pw")
        serve.send(signal.SIGTERM)
        wait_until(lambda: serve.get("/readyz")[0] == 503, 10, "readyz to say draining")
        assert serve.get("/readyz")[2] == b"not ready: draining\n"
        assert serve.get("/healthz")[0] == 200
        ftp.quit()
        assert serve.proc.wait(20) == 0
    finally:
        device.stop()


def test_status_page_in_a_real_browser(tmp_path: Path) -> None:
    """The page's numbers are /stats's, and the page logs no error or warning."""
    if not chromium_binary():
        pytest.fail("chromium is not installed (scripts/test installs Debian's chromium)")
    node = Serve("--config", str(node_config(tmp_path, "max_connections_per_ip = 1\n")))
    device = FieldDevice(node.device_port, android_id="page-phone", files={"f": b"x" * 200_000}).start()
    browser = None
    ftp = ftplib.FTP()
    try:
        ftp.connect("127.0.0.1", node.ftp_port, timeout=30)
        ftp.login(f"{device.prefix}_u", "pw")  # one control session, held open
        with socket.create_connection(("127.0.0.1", node.ftp_port), timeout=10) as second:
            assert second.recv(200).startswith(b"421")  # refused: one connection per address
        browser = Browser(1200, 900)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{node.stats_port}/")
        # two refreshes of the page's numbers
        browser.wait_for("!!document.body && Number(document.body.dataset.loaded || 0) >= 2", 20)
        shown = browser.evaluate(
            "JSON.stringify({fields: Object.fromEntries([...document.querySelectorAll('[data-field]')]"
            ".map(e => [e.dataset.field, e.textContent])),"
            " refusals: [...document.querySelectorAll('#refusals tr')].map(r => r.textContent),"
            " fleet: document.getElementById('fleet').textContent,"
            " state: document.getElementById('state').textContent,"
            " points: document.getElementById('line-down').getAttribute('points')})"
        )
        page = orjson.loads(shown)
        stats = orjson.loads(node.get("/stats")[2])
        fields = page["fields"]
        assert fields["devices_online"] == str(stats["devices_online"]) == "1"
        for kind in ("command", "control", "data"):
            assert fields[f"sessions_open.{kind}"] == str(stats["sessions_open"][kind])
            assert fields[f"sessions_opened.{kind}"] == str(stats["sessions_opened"][kind])
        assert (stats["sessions_open"]["command"], stats["sessions_open"]["control"]) == (1, 1)
        for key in ("quota_refusals", "login_failures", "ips_locked_out"):
            assert fields[key] == str(stats[key])
        assert fields["version"] == stats["version"] and fields["relay_backend"] == stats["relay_backend"]
        assert page["refusals"] == [f"{reason}{n}" for reason, n in stats["sessions_refused"].items()]
        assert stats["sessions_refused"] == {"too many connections from this address": 1}
        assert page["fleet"] == "not in a fleet" and page["state"] == "serving"
        browser.screenshot(tmp_path / "status.png")
        assert (tmp_path / "status.png").stat().st_size > 10_000
        assert browser.problems() == []
    finally:
        if browser:
            browser.close()
        ftp.close()
        device.stop()
        node.kill()


def test_readiness_follows_the_fleet_heartbeat(tmp_path: Path) -> None:
    """In a fleet, /readyz is 503 once a heartbeat could not reach the bucket (moto's S3
    server process, stopped under the node)."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    credentials = {"AWS_ACCESS_KEY_ID": "ops-test", "AWS_SECRET_ACCESS_KEY": "ops-test",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env(**credentials))
    node = None
    try:
        def up() -> bool:
            assert moto.poll() is None, "moto server exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 30, "moto server listening")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="ops-test",
                     aws_secret_access_key="ops-test", region_name="us-east-1").create_bucket(Bucket="ops")
        config = node_config(tmp_path, f'[fleet]\nbucket = "ops"\ns3_endpoint = "{endpoint}"\n'
                                       'host = "node-a"\nheartbeat = 0.3\n')
        node = Serve("--config", str(config), env=clean_env(**credentials))
        assert node.get("/readyz")[:3:2] == (200, b"ready\n")
        moto.terminate()
        moto.wait(10)
        wait_until(lambda: node.get("/readyz")[0] == 503, 30, "readyz to see the failed heartbeat")
        body = node.get("/readyz")[2].decode()
        assert body.startswith("not ready: fleet bucket unreachable at the last heartbeat: S3 bucket 'ops': ")
        assert body.count("\n") == 1
        assert node.stop() == 0
    finally:
        if node:
            node.kill()
        if moto.poll() is None:
            moto.kill()
            moto.wait(5)


# ---- systemd: sd_notify on a real datagram socket ----------------------------------------


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_sd_notify_ready_reloading_stopping(tmp_path: Path, kind: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"swiftftp-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(15)

    def message() -> dict[str, str]:
        return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())

    node = Serve("--config", str(node_config(tmp_path)), env=clean_env(NOTIFY_SOCKET=address))
    try:
        ready = message()
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving: FTP clients port ")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        node.send(signal.SIGHUP)
        reloading = message()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        reloaded = message()
        assert reloaded["READY"] == "1" and "reloaded" in reloaded["STATUS"]
        node.send(signal.SIGTERM)
        stopping = message()
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("draining")
        assert node.proc.wait(20) == 0
    finally:
        node.kill()
        sock.close()


# ---- logrotate: rename, SIGHUP (the unit's reload), a fresh transfer log ------------------


def test_logrotate_rotates_the_transfer_log_and_sighup_reopens_it(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(logrotate):
        pytest.fail("logrotate is not installed (scripts/test installs it)")
    node = Serve("--config", str(node_config(tmp_path)))
    data = os.urandom(50_000)
    device = FieldDevice(node.device_port, android_id="rotated-phone", files={"f": data}).start()
    try:
        log = tmp_path / "state" / "transfers.log"
        assert download(node.ftp_port, device.prefix, "f") == data
        wait_until(lambda: log.exists() and log.read_text().count("\n") == 1, 10, "one transfer line")
        # contrib's file, pointed at this node: its path, and kill -HUP for systemctl reload
        conf = (Path(__file__).parents[2] / "contrib" / "logrotate" / "swiftftp").read_text()
        conf = conf.replace("/var/lib/swiftftp/transfers.log", str(log))
        conf = conf.replace("systemctl reload swiftftp-proxy", f"kill -HUP {node.proc.pid}")
        conf = re.sub(r"(?m)^\s*(su|create) .*\n", "", conf)  # no swiftftp user here
        (tmp_path / "logrotate.conf").write_text(conf)
        done = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "logrotate.state"),
                               str(tmp_path / "logrotate.conf")], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "state" / "transfers.log.1").read_text().count("\n") == 1
        node.logged("reloaded")
        assert download(node.ftp_port, device.prefix, "f") == data
        wait_until(lambda: log.exists() and log.read_text().count("\n") == 1, 10, "a line in the new file")
        assert "outcome=ok" in log.read_text()
        assert node.stop() == 0
    finally:
        device.stop()
        node.kill()


# ---- start-up errors: one line naming the setting and the value --------------------------


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swiftftp", "serve", *args], capture_output=True,
                          text=True, timeout=30, env=clean_env(**env))


def base_args(state: Path) -> list[str]:
    return ["--listen", "127.0.0.1", "--ftp-port", "0", "--device-port", "0", "--data-ports", "0",
            "--stats-listen", "off", "--state-dir", str(state)]


@pytest.mark.parametrize("setting", ["ftp_port", "device_port", "stats_listen"])
def test_port_in_use_names_the_setting_and_port(tmp_path: Path, setting: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        flag = {"ftp_port": ["--ftp-port", str(port)], "device_port": ["--device-port", str(port)],
                "stats_listen": ["--stats-listen", f"127.0.0.1:{port}"]}[setting]
        done = run_serve(*base_args(tmp_path), *flag)
    assert done.returncode == 1
    assert done.stderr == (f"swiftftp-proxy: cannot listen on 127.0.0.1 port {port} (node.{setting}): "
                           "Address already in use (another node running?)\n")


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--listen", "0.0.0.O"], {}, r"node\.listen: cannot resolve '0\.0\.0\.O': .+ \(command line\)"),
    (["--listen", "192.0.2.1"], {},
     r"node\.listen: cannot listen on '192\.0\.2\.1': Cannot assign requested address \(command line\)"),
    (["--public-address", "proxy.example.org"], {},
     r"node\.public_address: expected an IP address, got 'proxy\.example\.org' \(command line\)"),
    (["--stats-listen", "localhost"], {}, r"node\.stats_listen: expected 'ADDR:PORT', got 'localhost' "
                                          r"\(command line\)"),
    ([], {"SWIFTFTP_NODE_FTP_PROT": "21"},
     r"SWIFTFTP_NODE_FTP_PROT: unknown environment variable; did you mean SWIFTFTP_NODE_FTP_PORT\? "
     r"\(environment\)"),
])
def test_bad_settings_stop_serve_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                                message: str) -> None:
    done = run_serve(*base_args(tmp_path / "state"), *args, **env)
    assert done.returncode == 2 and done.stdout == ""
    assert re.fullmatch(rf"swiftftp-proxy: config error: {message}\n", done.stderr), done.stderr


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = run_serve(*base_args(tmp_path / "file"))
    assert done.returncode == 2
    assert done.stderr == (f"swiftftp-proxy: config error: node.state_dir: {tmp_path}/file is not a "
                           "directory (command line)\n")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory the node cannot write: a read-only tmpfs as root, else mode 0500."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
        try:
            yield path, "Read-only file system"
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o500)
        try:
            yield path, "Permission denied"
        finally:
            path.chmod(0o700)


def test_read_only_state_dir(read_only_dir: tuple[Path, str], tmp_path: Path) -> None:
    path, reason = read_only_dir
    done = run_serve(*base_args(path))
    assert done.returncode == 2
    assert done.stderr == (f"swiftftp-proxy: config error: node.state_dir: {path} is not writable: "
                           f"{reason} (command line)\n")
    config = node_config(tmp_path, state_dir=f'"{path}/state"')
    done = run_serve("--config", str(config))
    assert done.returncode == 2
    assert done.stderr == (f"swiftftp-proxy: config error: node.state_dir: cannot create {path}/state: "
                           f"{reason} ({config}:6)\n")


# ---- MemoryDenyWriteExecute=yes (the unit's): the kernel's own rule, PR_SET_MDWE ----------

MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_node_works_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """What systemd's MemoryDenyWriteExecute=yes enforces with seccomp, Linux 6.3+
    enforces with PR_SET_MDWE (kept across execve): the node, the Rust relay and the
    process metrics run under it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    node = Serve("--config", str(node_config(tmp_path, relay='"rust"')),
                 wrapper=(sys.executable, "-c", MDWE_WRAPPER))
    data = os.urandom(2_000_000)
    device = FieldDevice(node.device_port, android_id="mdwe-phone", files={"f": data}).start()
    try:
        assert node.backend == "rust"
        assert download(node.ftp_port, device.prefix, "f") == data
        m = samples(node.get("/metrics")[2].decode())
        assert m[("process_resident_memory_bytes", ())] > 0
        node.send(signal.SIGHUP)
        node.logged("reloaded")
        assert node.stop() == 0
    finally:
        device.stop()
        node.kill()


# ---- the unit's hardening score ------------------------------------------------------------


def test_unit_hardening_score() -> None:
    """``systemd-analyze security --offline=true`` scores the unit at most 3.0, and the
    unit's comment gives the score it gets."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("no systemd-analyze here")
    unit = Path(__file__).parents[2] / "contrib" / "swiftftp-proxy.service"
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    m = re.search(r"Overall exposure level for swiftftp-proxy\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout[-500:] + done.stderr
    assert float(m[1]) <= 3.0
    assert f"scores {m[1]} OK" in unit.read_text()
