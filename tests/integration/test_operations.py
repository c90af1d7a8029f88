"""What an operator runs a node with: throughput limits, quotas, caps, the
prefix-guessing lockout, the stats server, and the transfer log."""

from __future__ import annotations

import concurrent.futures
import ftplib
import io
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swiftftp.stats import snapshot
from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import wait_until
from tests.stack import AgentThread, FtpServerThread, ProxyThread, node_settings

BURST = 32768


@pytest.fixture
def make_proxy(backend_name: str, tmp_path: Path) -> Iterator[Callable[..., ProxyThread]]:
    started: list[ProxyThread] = []

    def make(**overrides: Any) -> ProxyThread:
        proxy = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name, **overrides))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


@pytest.fixture
def devices() -> Iterator[list[FieldDevice]]:
    started: list[FieldDevice] = []
    yield started
    for device in started:
        device.stop()
    for device in started:
        assert not device.errors, device.errors


def start_device(devices: list[FieldDevice], proxy: ProxyThread, android_id: str,
                 files: dict[str, bytes]) -> FieldDevice:
    device = FieldDevice(proxy.device_port, android_id=android_id, files=files).start()
    devices.append(device)
    return device


def login(proxy: ProxyThread, device: FieldDevice, source: str = "127.0.0.1") -> ftplib.FTP:
    ftp = ftplib.FTP(source_address=(source, 0))
    ftp.connect("127.0.0.1", proxy.ftp_port, timeout=30)
    ftp.login(f"{device.prefix}_op", "pw")
    return ftp


def timed_download(proxy: ProxyThread, device: FieldDevice, name: str) -> tuple[float, float, int]:
    """(first chunk, last chunk, bytes after the first chunk) of one RETR."""
    marks: list[float] = []
    sizes: list[int] = []

    def chunk(data: bytes) -> None:
        marks.append(time.monotonic())
        sizes.append(len(data))

    ftp = login(proxy, device)
    ftp.retrbinary(f"RETR {name}", chunk, blocksize=65536)
    ftp.quit()
    assert sum(sizes) == len(device.files[name])
    return marks[0], marks[-1], sum(sizes) - sizes[0]


def rate_of(windows: list[tuple[float, float, int]]) -> float:
    """Aggregate bytes/s over concurrent transfers (first chunks excluded: the burst)."""
    start = min(w[0] for w in windows)
    end = max(w[1] for w in windows)
    return sum(w[2] for w in windows) / (end - start)


# ---- throughput limits --------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["session", "device", "node"])
def test_download_rate_limits(make_proxy, devices, scope: str) -> None:
    rate = 1_500_000
    proxy = make_proxy(**{f"{scope}_download_rate": rate}, burst=BURST)
    payload = os.urandom(4_000_000 if scope == "session" else 2_200_000)
    first = start_device(devices, proxy, "rate-dev-1", {"f": payload})
    # session: one download; device: two downloads of one device share its bucket;
    # node: downloads from two devices share the node's bucket
    second = start_device(devices, proxy, "rate-dev-2", {"f": payload}) if scope == "node" else first
    targets = [first] if scope == "session" else [first, second]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        windows = list(pool.map(lambda d: timed_download(proxy, d, "f"), targets))
    measured = rate_of(windows)
    print(f"{scope} download limit {rate} B/s: measured {measured:.0f} B/s")
    assert abs(measured - rate) <= 0.05 * rate, f"{scope}: {measured:.0f} B/s for {rate}"


def test_upload_rate_is_separate_from_download(make_proxy, devices) -> None:
    up_rate = 1_000_000
    proxy = make_proxy(session_upload_rate=up_rate, session_download_rate=0, burst=BURST)
    device = start_device(devices, proxy, "uploader", {"small": os.urandom(4_000_000)})
    ftp = login(proxy, device)
    started = time.monotonic()
    ftp.retrbinary("RETR small", lambda _: None)  # download: not limited
    assert time.monotonic() - started < 2.0  # 4 MB at 1 MB/s would take 4 s
    payload = os.urandom(3_000_000)
    ftp.storbinary("STOR up.bin", io.BytesIO(payload))
    ftp.quit()
    assert device.files["up.bin"] == payload
    first, last, nbytes = device.upload_times["up.bin"]
    measured = nbytes / (last - first)
    print(f"session upload limit {up_rate} B/s: measured {measured:.0f} B/s")
    assert abs(measured - up_rate) <= 0.05 * up_rate, f"{measured:.0f} B/s for {up_rate}"


def test_per_device_override_from_the_registry(make_proxy, devices) -> None:
    proxy = make_proxy(device_download_rate=200_000, burst=BURST)
    proxy.node.registry.prefix_for("paying")
    proxy.node.registry.set_rates("paying", None, 2_000_000)
    paying = start_device(devices, proxy, "paying", {"f": os.urandom(3_000_000)})
    measured = rate_of([timed_download(proxy, paying, "f")])
    print(f"device override 2000000 B/s: measured {measured:.0f} B/s")
    assert abs(measured - 2_000_000) <= 0.05 * 2_000_000, measured


# ---- quotas ---------------------------------------------------------------------------------


class CountingClient:
    """A raw FTP client that counts every byte it sends and receives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.total = 0
        self.buf = b""

    def reply(self) -> str:
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                assert data, "control connection closed"
                self.total += len(data)
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            if line[3:4] != b"-":
                return line.decode()

    def send(self, line: str) -> str:
        data = line.encode() + b"\r\n"
        self.sock.sendall(data)
        self.total += len(data)
        return self.reply()

    def pasv(self) -> socket.socket:
        reply = self.send("PASV")
        nums = [int(x) for x in reply[reply.index("(") + 1 : reply.index(")")].split(",")]
        return socket.create_connection((".".join(map(str, nums[:4])), nums[4] * 256 + nums[5]),
                                        timeout=20)

    def retr(self, name: str) -> bytes:
        data_sock = self.pasv()
        assert self.send(f"RETR {name}").startswith("150")
        chunks = []
        while chunk := data_sock.recv(65536):
            chunks.append(chunk)
        data_sock.close()
        assert self.reply().startswith("226")
        data = b"".join(chunks)
        self.total += len(data)
        return data

    def stor(self, name: str, payload: bytes) -> None:
        data_sock = self.pasv()
        assert self.send(f"STOR {name}").startswith("150")
        data_sock.sendall(payload)
        data_sock.close()
        self.total += len(payload)
        assert self.reply().startswith("226")

    def quit(self) -> None:
        assert self.send("QUIT").startswith("221")
        while data := self.sock.recv(65536):
            self.total += len(data)
        self.sock.close()


def test_quota_counts_exactly_the_bytes_moved(make_proxy, devices) -> None:
    proxy = make_proxy(quota_flush_interval=0.2)
    device = start_device(devices, proxy, "metered", {"a": os.urandom(300_000), "b": b"x" * 12345})
    moved = 0
    for _ in range(2):
        client = CountingClient(proxy.ftp_port)
        assert client.reply().startswith("220")
        assert client.send(f"USER {device.prefix}_me").startswith("331")
        assert client.send("PASS pw").startswith("230")
        assert client.retr("a") == device.files["a"]
        assert client.retr("b") == device.files["b"]
        client.stor("c", os.urandom(77_777))
        client.quit()
        moved += client.total
    node = proxy.node
    wait_until(lambda: proxy.run(lambda n: not [s for s in n.sessions if s.kind != "command"]), 10)
    used = proxy.run(lambda n: n.quota.used(n.devices["metered"]))
    assert used == moved
    # and in the registry at the next flush (every 0.2 s here)
    wait_until(lambda: node.registry.usage("metered", node.quota.period) == moved, 5, "flushed")
    device.request({"action": "check_quota"})
    wait_until(lambda: device.replies, 5)
    assert device.replies.pop() == {"quota": 2**53 - 1, "used": moved}


def test_over_quota_refuses_the_next_transfer_with_15(make_proxy, devices) -> None:
    proxy = make_proxy(quota_bytes=500_000)
    device = start_device(devices, proxy, "thrifty", {"big": os.urandom(800_000)})
    ftp = login(proxy, device)
    buf = io.BytesIO()
    ftp.retrbinary("RETR big", buf.write)  # crosses the quota midway: allowed to finish
    assert buf.getvalue() == device.files["big"]
    with pytest.raises(ftplib.error_temp, match="425"):
        ftp.retrbinary("RETR big", buf.write)  # refused: the field device answers 425
    assert {"error_code": 15, "error_string": "the device is over its quota"} in device.data_replies
    ftp.quit()
    device.request({"action": "check_quota"})
    wait_until(lambda: "quota" in (device.replies[-1] if device.replies else {}), 5)
    reply = device.replies[-1]
    assert reply["quota"] == 500_000 and reply["used"] > 800_000
    assert proxy.run(lambda n: n.stats.quota_refusals) == 1


def test_over_quota_through_the_agent_reaches_the_client(make_proxy, tmp_path: Path,
                                                         backend_name: str) -> None:
    """A real FTP server behind the agent: the client gets a 425 naming the quota, not a hang."""
    proxy = make_proxy(quota_bytes=100_000)
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.bin").write_bytes(os.urandom(300_000))
    ftpd = FtpServerThread(root)
    agent = AgentThread(proxy, ftpd.port, tmp_path / "agent", backend_name)
    try:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
        ftp.login(f"{agent.prefix}_user", "secret")
        ftp.retrbinary("RETR f.bin", lambda _: None)
        with pytest.raises(ftplib.error_temp, match=r"425.*quota"):
            ftp.retrbinary("RETR f.bin", lambda _: None)
        ftp.quit()
    finally:
        agent.close()
        ftpd.close()


# ---- caps and the guessing lockout ----------------------------------------------------------


def refused_command_session(proxy: ProxyThread, android_id: str) -> str:
    """Log in and ask for a command session; the error 0 text the node refuses it with."""
    with FieldDevice(proxy.device_port, android_id=android_id).connect() as sock:
        write_one(sock, {"action": "start_command_session"})
        reply = read_one(sock)
    assert reply["error_code"] == 0, reply
    return reply["error_string"]


def test_max_command_sessions(make_proxy, devices) -> None:
    proxy = make_proxy(max_command_sessions=1)
    start_device(devices, proxy, "first-phone", {})
    assert "too many devices" in refused_command_session(proxy, "second-phone")
    assert proxy.run(lambda n: n.stats.refused["too many devices on this node"]) == 1


def test_max_control_connections_per_device(make_proxy, devices) -> None:
    proxy = make_proxy(max_control_per_device=1)
    device = start_device(devices, proxy, "busy-phone", {})
    first = login(proxy, device)
    with pytest.raises(ftplib.error_temp, match="421 Too many control connections"):
        login(proxy, device)
    first.quit()
    wait_until(lambda: proxy.run(lambda n: n.devices["busy-phone"].connections["control"]) == 0, 5)
    login(proxy, device).quit()  # the slot is free again


def test_max_data_connections_per_device(make_proxy, devices) -> None:
    proxy = make_proxy(max_data_per_device=1)
    device = start_device(devices, proxy, "data-phone", {})
    ftp = login(proxy, device)
    held = device.connect()
    write_one(held, {"action": "data_pasv_listen"})
    assert "port" in read_one(held)
    extra = device.connect()
    write_one(extra, {"action": "data_pasv_listen"})
    reply = read_one(extra)
    assert reply["error_code"] == 0 and "too many data connections" in reply["error_string"]
    held.close()
    extra.close()
    ftp.quit()


def test_max_pending_listeners(make_proxy, devices) -> None:
    proxy = make_proxy(max_pending_listeners=1)
    device = start_device(devices, proxy, "listener-phone", {})
    ftp = login(proxy, device)  # its rendezvous listener is closed again
    held = device.connect()
    write_one(held, {"action": "data_pasv_listen"})
    assert "port" in read_one(held)  # the one pending listener
    with pytest.raises(ftplib.error_temp, match="421 Too many pending listeners"):
        login(proxy, device)
    held.close()
    ftp.quit()


def test_max_connections_per_ip(make_proxy) -> None:
    proxy = make_proxy(max_connections_per_ip=2)
    socks = [socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10) for _ in range(3)]
    replies = [s.recv(1000) for s in socks]
    assert replies[0].startswith(b"220") and replies[1].startswith(b"220")
    assert replies[2].startswith(b"421 Too many connections from your address")
    other = socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10,
                                     source_address=("127.0.0.2", 0))
    assert other.recv(1000).startswith(b"220")  # another address is not affected
    for s in [*socks, other]:
        s.close()


def test_max_pending_device_logins_per_ip(make_proxy) -> None:
    """Silent connections to the device port are bounded per address, so they cannot
    use up the node's descriptors; devices elsewhere, and later, still log in."""
    proxy = make_proxy(max_pending_logins_per_ip=2, device_login_timeout=30)
    silent = [socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10) for _ in range(2)]
    wait_until(lambda: proxy.run(lambda n: n.guard.logins["127.0.0.1"]) == 2, 5, "both counted")
    third = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    reply = read_one(third)
    assert reply["error_code"] == 0 and "too many connections" in reply["error_string"]
    assert third.recv(100) == b""  # and closed
    assert proxy.run(lambda n: n.stats.refused["too many pending device logins"]) == 1
    other = FieldDevice(proxy.device_port, android_id="other-address")
    with socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        write_one(sock, {"action": "login", "android_id": other.android_id, "swiftp_version": "2"})
        assert read_one(sock) == {}
    for sock in [*silent, third]:
        sock.close()
    wait_until(lambda: proxy.run(lambda n: not n.guard.logins), 5, "the slots freed")
    FieldDevice(proxy.device_port, android_id="back-again").connect().close()


def test_drain_is_bounded_and_turns_newcomers_away(make_proxy, devices) -> None:
    """A client that stays logged in does not hold a drain past its timeout; meanwhile
    a device logging in again is refused, and a client naming a device gets 421."""
    proxy = make_proxy()
    device = start_device(devices, proxy, "drain-op", {})
    idle = login(proxy, device)
    early = socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10)
    assert early.recv(200).startswith(b"220")  # greeted before the drain, logs in during it
    drain = proxy.submit(proxy.node.drain(1.0))
    wait_until(lambda: {"action": "reconnect"} in device.notices, 5, "reconnect sent")
    assert "shutting down" in refused_command_session(proxy, "drain-op")
    early.sendall(f"USER {device.prefix}_op\r\n".encode())
    assert early.recv(200).startswith(b"421 This node is shutting down")
    early.close()
    assert drain.result(10) is False  # the idle client is still there
    assert proxy.run(lambda n: n.busy) == 1
    assert proxy.run(lambda n: snapshot(n)["draining"]) is True
    idle.close()


def test_new_device_ids_per_address_are_bounded(make_proxy) -> None:
    """Each new device id takes a prefix for good: one address may not spray them."""
    proxy = make_proxy(max_new_devices_per_ip=2)

    def login_as(android_id: str, source: str = "127.0.0.1") -> dict:
        with socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10,
                                      source_address=(source, 0)) as sock:
            write_one(sock, {"action": "login", "android_id": android_id, "swiftp_version": "2"})
            return read_one(sock)

    assert login_as("new-1") == {} and login_as("new-2") == {}
    reply = login_as("new-3")
    assert reply["error_code"] == 0 and "too many new devices" in reply["error_string"]
    assert login_as("new-1") == {}  # a known device is not a new one
    assert login_as("new-3", source="127.0.0.2") == {}  # another address
    assert proxy.run(lambda n: n.stats.refused["too many new devices from one address"]) == 1
    registered = proxy.run(lambda n: [d.android_id for d in n.registry.all()])
    assert sorted(registered) == ["new-1", "new-2", "new-3"]


def test_prefix_guessing_locks_the_address_out(make_proxy) -> None:
    proxy = make_proxy(guess_max_failures=4, max_login_failures=3, guess_lockout=60)
    answers = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        for guess in ("aaaaa", "bbbbb", "ccccc"):
            s.sendall(f"USER {guess}_x\r\n".encode())
            line = f.readline()
            if not line:
                break
            answers.append(line)
        f.close()
        s.close()
    assert len(answers) == 4  # 3 on the first connection, the 4th failure locks out
    s = socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10)
    assert s.recv(1000).startswith(b"421 Too many failed logins")
    s.close()
    s = socket.create_connection(("127.0.0.1", proxy.ftp_port), timeout=10,
                                 source_address=("127.0.0.3", 0))
    assert s.recv(1000).startswith(b"220")
    s.close()
    counts = proxy.run(lambda n: (n.stats.login_failures, n.guard.locked_out))
    assert counts == (4, 1)


# ---- stats ----------------------------------------------------------------------------------


def scrape(proxy: ProxyThread, path: str) -> bytes:
    host, port = proxy.node.stats_address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
        return response.read()


def metrics(proxy: ProxyThread) -> dict[tuple[str, tuple], float]:
    families = text_string_to_metric_families(scrape(proxy, "/metrics").decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_move_during_a_transfer(make_proxy, devices) -> None:
    proxy = make_proxy(session_download_rate=1_000_000, burst=BURST)
    device = start_device(devices, proxy, "watched", {"f": os.urandom(2_500_000)})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        transfer = pool.submit(timed_download, proxy, device, "f")
        wait_until(lambda: proxy.run(lambda n: any(s.kind == "data" for s in n.sessions)), 10)
        first = metrics(proxy)
        rate = ("swiftftp_throughput_bytes_per_second", (("direction", "down"),))
        wait_until(lambda: metrics(proxy)[rate] > 500_000, 5, "throughput to show")
        second = metrics(proxy)
        transfer.result(30)
    down = ("swiftftp_relayed_bytes_total", (("direction", "down"),))
    assert second[down] - first[down] >= 300_000
    assert first[("swiftftp_sessions_open", (("kind", "data"),))] == 1
    assert first[("swiftftp_devices_online", ())] == 1
    info = [k for k in first if k[0] == "swiftftp_info"]
    assert info and dict(info[0][1])["relay_backend"] == proxy.node.backend.name
    stats = orjson.loads(scrape(proxy, "/stats"))
    assert stats["sessions_opened"]["data"] >= 1 and stats["bytes"]["down"] >= 2_500_000
    assert stats["relay_backend"] == proxy.node.backend.name


def test_transfer_log(make_proxy, devices, tmp_path: Path) -> None:
    proxy = make_proxy()
    device = start_device(devices, proxy, "logged", {"f": b"z" * 100_000})
    timed_download(proxy, device, "f")
    log = tmp_path / "state" / "transfers.log"
    wait_until(lambda: log.exists() and "direction=download" in log.read_text(), 5)
    line = log.read_text().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in line.split())
    assert fields["prefix"] == device.prefix and fields["bytes"] == "100000"
    assert fields["outcome"] == "ok" and fields["client"].startswith("127.0.0.1:")
    assert {"time", "session", "duration", "rate"} <= set(fields)
