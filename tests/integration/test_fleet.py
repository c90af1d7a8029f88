"""Nodes sharing an S3 bucket: one prefix per device on every node, the server list
kept by heartbeats, and a drain that sends devices to another node.  S3 is moto's
standalone server process, reached over HTTP by boto3 as AWS or MinIO would be."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ftplib
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from swiftftp.agent import Agent, AgentSettings
from swiftftp.identity import DeviceKey, fingerprint, load_or_create_key, unb64
from swiftftp.quota import period_key
from swiftftp.stats import human_bytes, snapshot
from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import wait_until
from tests.integration.test_identity import Stranger, refused
from tests.integration.test_identity import login as json_login
from tests.stack import (
    FTP_PASSWORD,
    FTP_USER,
    AgentProcess,
    FtpServerThread,
    LoopThread,
    ProxyThread,
    node_settings,
)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fleet-test", "AWS_SECRET_ACCESS_KEY": "fleet-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server in a process of its own, on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            assert proc.poll() is None, "moto server exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 30, "moto server listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint: str) -> tuple[Any, str]:
    """A fresh bucket for each test: (boto3 client, name)."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"fleet-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def fleet(backend_name: str, tmp_path: Path, s3_endpoint: str, bucket: tuple[Any, str]) -> Iterator[Any]:
    """make(host) starts a node of the fleet, with a state dir of its own."""
    started: list[ProxyThread] = []

    def make(host: str, **overrides: Any) -> ProxyThread:
        settings = node_settings(tmp_path / f"node{len(started)}", relay_backend=backend_name,
                                 fleet_bucket=bucket[1], fleet_host=host, fleet_heartbeat=0.5,
                                 **{"s3_endpoint": s3_endpoint, **overrides})
        node = ProxyThread(settings)
        started.append(node)
        return node

    yield make
    for node in started:
        node.close()


def servers(bucket: tuple[Any, str]) -> str:
    client, name = bucket
    return client.get_object(Bucket=name, Key="servers")["Body"].read().decode()


def keys(bucket: tuple[Any, str], folder: str) -> list[str]:
    client, name = bucket
    return [o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix=folder).get("Contents", [])]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_device_keeps_its_prefix_on_every_node(fleet: Any, bucket: tuple[Any, str]) -> None:
    a, b = fleet("a.test"), fleet("b.test")
    first = FieldDevice(a.device_port, android_id="roaming-phone").start()
    first.stop()
    files = {"photo.jpg": os.urandom(1 << 20)}
    again = FieldDevice(b.device_port, android_id="roaming-phone", files=files).start()
    try:
        assert again.prefix == first.prefix
        assert b.run(lambda n: n.registry.prefix_for("roaming-phone")) == first.prefix
        # and the bookmarked URL works on the new node, both ways
        wait_until(lambda: b.run(lambda n: n.online(again.prefix) is not None), 5, "online on b")
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", b.ftp_port, timeout=20)
        ftp.login(f"{first.prefix}_alice", "pw")
        got = io.BytesIO()
        ftp.retrbinary("RETR photo.jpg", got.write)
        upload = os.urandom(1 << 20)
        ftp.storbinary("STOR up.bin", io.BytesIO(upload))
        ftp.quit()
        assert sha(got.getvalue()) == sha(files["photo.jpg"])
        assert sha(again.files["up.bin"]) == sha(upload)
    finally:
        again.stop()
    assert keys(bucket, "devices/") == [f"devices/{b'roaming-phone'.hex()}"]
    assert not first.errors and not again.errors


def test_first_logins_at_the_same_moment_agree(fleet: Any, bucket: tuple[Any, str]) -> None:
    """Ten new devices, each logging in on both nodes at once: one prefix per device,
    the same on both nodes, ten different ones, and no claim left over."""
    a, b = fleet("a.test"), fleet("b.test")

    def login(node: ProxyThread, android_id: str) -> str:
        with socket.create_connection(("127.0.0.1", node.device_port), timeout=20) as sock:
            write_one(sock, {"action": "login", "android_id": android_id, "swiftp_version": "2"})
            assert read_one(sock) == {}
        return node.run(lambda n: n.registry.prefix_for(android_id))

    ids = [f"new-phone-{i}" for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        on_a = pool.map(login, [a] * 10, ids)
        on_b = pool.map(login, [b] * 10, ids)
        pairs = list(zip(on_a, on_b, strict=True))
    assert all(pa == pb for pa, pb in pairs), pairs
    assert len({pa for pa, _ in pairs}) == 10
    assert len(keys(bucket, "prefixes/")) == 10 and len(keys(bucket, "devices/")) == 10


def test_server_list_heartbeats_and_drain(fleet: Any, bucket: tuple[Any, str]) -> None:
    a, b = fleet("a.test"), fleet("b.test")
    # not on the default port 2222, so each name carries its port
    listed_a, listed_b = f"a.test:{a.device_port}", f"b.test:{b.device_port}"
    wait_until(lambda: servers(bucket) == f"{listed_a}\n{listed_b}\n", 10, "both nodes listed")
    wait_until(lambda: a.run(lambda n: snapshot(n)["fleet_servers"]) == [listed_a, listed_b], 5)
    device = FieldDevice(a.device_port, android_id="drained-phone").start()
    try:
        assert a.call(a.node.drain(2.0)) is True
        wait_until(lambda: device.notices, 5, "the reconnect")
        assert device.notices == [{"action": "reconnect", "newserver": listed_b}]
        assert servers(bucket) == f"{listed_b}\n"
        # the drained node's heartbeat has stopped: it does not come back on the list
        beats = b.run(lambda n: n.fleet.beats)
        wait_until(lambda: b.run(lambda n: n.fleet.beats) >= beats + 3, 10, "three more beats of b")
        assert servers(bucket) == f"{listed_b}\n"
    finally:
        device.stop()
    b.close()
    assert servers(bucket) == ""
    assert not device.errors


def test_bucket_gone_after_start_is_error_0_not_a_crash(fleet: Any, bucket: tuple[Any, str]) -> None:
    node = fleet("a.test")
    client, name = bucket
    for key in keys(bucket, ""):
        client.delete_object(Bucket=name, Key=key)
    client.delete_bucket(Bucket=name)
    with socket.create_connection(("127.0.0.1", node.device_port), timeout=30) as sock:
        write_one(sock, {"action": "login", "android_id": "unlucky", "swiftp_version": "2"})
        reply = read_one(sock)
    assert reply["error_code"] == 0 and "registry unavailable" in reply["error_string"]
    with pytest.raises(AssertionError, match="error_code"):  # answered again: still serving
        FieldDevice(node.device_port, android_id="unlucky").connect()


def test_unreachable_bucket_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "swiftftp", "serve", "--listen", "127.0.0.1", "--ftp-port", "0",
         "--device-port", "0", "--stats-listen", "off", "--state-dir", str(tmp_path),
         "--s3-bucket", "nowhere", "--s3-endpoint", f"http://127.0.0.1:{closed}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **CREDENTIALS},
    )
    assert done.returncode == 1
    assert "cannot join the fleet" in done.stderr and "nowhere" in done.stderr


def test_agent_follows_the_server_list_and_the_drain(
    fleet: Any, bucket: tuple[Any, str], tmp_path: Path, backend_name: str
) -> None:
    """swiftftp-agent --servers URL: it picks a node from the list; when that node
    drains, it moves to the node named in ``reconnect`` and keeps its prefix."""
    nodes = [fleet("127.0.0.1"), fleet("127.0.0.1")]
    wait_until(lambda: servers(bucket).count("\n") == 2, 10, "both nodes listed")
    root = tmp_path / "ftproot"
    root.mkdir()
    (root / "data.bin").write_bytes(os.urandom(1 << 20))
    ftpd = FtpServerThread(root)
    loop = LoopThread("fleet-agent")
    urls: list[str] = []
    # the list as devices fetch it: plain HTTP, no credentials (a presigned URL here;
    # a public object or a CDN in production)
    client, name = bucket
    servers_url = client.generate_presigned_url("get_object", Params={"Bucket": name, "Key": "servers"},
                                                ExpiresIn=600)
    agent = Agent(
        AgentSettings(proxy_host="", proxy_port=2222, ftp_host="127.0.0.1", ftp_port=ftpd.port,
                      state_dir=tmp_path / "agent", user=FTP_USER, relay_backend=backend_name,
                      servers_url=servers_url),
        on_ready=urls.append,
    )
    task = asyncio.run_coroutine_threadsafe(agent.run(), loop.loop)

    def transfer_through(node: ProxyThread) -> None:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", node.ftp_port, timeout=20)
        ftp.login(f"{agent.prefix}_{FTP_USER}", FTP_PASSWORD)
        got = io.BytesIO()
        ftp.retrbinary("RETR data.bin", got.write)
        upload = os.urandom(1 << 20)
        ftp.storbinary(f"STOR up-{node.device_port}.bin", io.BytesIO(upload))
        ftp.quit()
        assert sha(got.getvalue()) == sha((root / "data.bin").read_bytes())
        assert sha((root / f"up-{node.device_port}.bin").read_bytes()) == sha(upload)

    try:
        wait_until(lambda: urls, 15, "the agent online")
        first = next(n for n in nodes if n.device_port == agent.proxy_port)
        other = next(n for n in nodes if n is not first)
        prefix = agent.prefix
        transfer_through(first)
        assert first.call(first.node.drain(5.0)) is True
        wait_until(lambda: len(urls) == 2, 15, "the agent on the other node")
        assert agent.proxy_port == other.device_port and agent.prefix == prefix
        transfer_through(other)
    finally:
        task.cancel()
        loop.stop()
        ftpd.close()


# ---- fleet-wide quotas, usage and overrides ----------------------------------------------


def fleet_used(bucket: tuple[Any, str], android_id: str) -> int:
    """A device's usage this period as the bucket holds it: the sum of every node's object."""
    client, name = bucket
    total = 0
    for key in keys(bucket, f"usage/{period_key('month')}/{android_id.encode().hex()}/"):
        total += orjson.loads(client.get_object(Bucket=name, Key=key)["Body"].read())["bytes"]
    return total


def ftp_to(node: ProxyThread, prefix: str) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", node.ftp_port, timeout=20)
    ftp.login(f"{prefix}_alice", "pw")
    return ftp


def both_ways(node: ProxyThread, device: FieldDevice, name: str, upload_size: int = 50_000) -> None:
    """A download and an upload through ``node``, checked with SHA-256."""
    ftp = ftp_to(node, device.prefix)
    got = io.BytesIO()
    ftp.retrbinary(f"RETR {name}", got.write)
    upload = os.urandom(upload_size)
    ftp.storbinary(f"STOR up-{node.device_port}.bin", io.BytesIO(upload))
    ftp.quit()
    assert sha(got.getvalue()) == sha(device.files[name])
    assert sha(device.files[f"up-{node.device_port}.bin"]) == sha(upload)


def used_on(node: ProxyThread, android_id: str) -> int:
    return node.run(lambda n: n.quota.used(n.devices[android_id]))


def idle(node: ProxyThread) -> bool:
    return node.run(lambda n: not [s for s in n.sessions if s.kind != "command"])


def cli_config(tmp_path: Path, node: ProxyThread, bucket: tuple[Any, str], s3_endpoint: str) -> Path:
    """A configuration file naming the node's state dir and the fleet's bucket."""
    path = tmp_path / f"node-{node.device_port}.toml"
    path.write_text(f'[node]\nstate_dir = "{node.node.settings.state_dir}"\n\n'
                    f'[fleet]\nbucket = "{bucket[1]}"\ns3_endpoint = "{s3_endpoint}"\n')
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swiftftp", "devices", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30)


def test_a_device_that_fails_over_keeps_its_quota(fleet: Any, bucket: tuple[Any, str]) -> None:
    """Used on A, counted in A's usage object; on B the fleet-wide sum refuses it (15, the
    client's 425) though B alone counted less than the quota."""
    quota = 600_000
    a = fleet("a.test", quota_bytes=quota, quota_flush_interval=0.2)
    b = fleet("b.test", quota_bytes=quota, quota_flush_interval=0.2)
    files = {"f.bin": os.urandom(400_000)}
    on_a = FieldDevice(a.device_port, android_id="roaming-meter", files=files).start()
    try:
        both_ways(a, on_a, "f.bin")
        wait_until(lambda: idle(a), 10, "transfers on a ended")
        used_a = used_on(a, "roaming-meter")
        assert 450_000 < used_a < quota
        wait_until(lambda: fleet_used(bucket, "roaming-meter") == used_a, 10, "a's usage in the bucket")
    finally:
        on_a.stop()  # its session on a ends; it logs in on b
    on_b = FieldDevice(b.device_port, android_id="roaming-meter", files=dict(on_a.files)).start()
    try:
        assert on_b.prefix == on_a.prefix
        ftp = ftp_to(b, on_b.prefix)
        got = io.BytesIO()
        ftp.retrbinary("RETR f.bin", got.write)  # under the quota fleet-wide: crosses it, finishes
        assert sha(got.getvalue()) == sha(files["f.bin"])
        with pytest.raises(ftplib.error_temp, match="425"):
            ftp.retrbinary("RETR f.bin", got.write)
        ftp.quit()
        assert {"error_code": 15, "error_string": "the device is over its quota"} in on_b.data_replies
        wait_until(lambda: idle(b), 10, "transfers on b ended")
        moved_on_b = used_on(b, "roaming-meter") - used_a
        assert moved_on_b < quota  # b alone would have let it go on
        assert b.run(lambda n: n.stats.quota_refusals) == 1
        wait_until(lambda: fleet_used(bucket, "roaming-meter") == used_a + moved_on_b, 10, "b's usage too")
        # one object per device and node
        hexid = b"roaming-meter".hex()
        assert sorted(k.rsplit("/", 1)[1] for k in keys(bucket, f"usage/{period_key('month')}/{hexid}/")) \
            == sorted([f"a.test:{a.device_port}", f"b.test:{b.device_port}"])
    finally:
        on_b.stop()
    assert not on_a.errors and not on_b.errors


def test_overrides_and_resets_from_any_node_apply_fleet_wide(
    fleet: Any, bucket: tuple[Any, str], s3_endpoint: str, tmp_path: Path
) -> None:
    """``devices set-quota``, ``set-rate`` and ``reset-usage`` with node A's configuration
    reach a device that only ever logged in on node B."""
    a = fleet("a.test", quota_flush_interval=0.2)
    b = fleet("b.test", quota_flush_interval=0.2)
    config_a = cli_config(tmp_path, a, bucket, s3_endpoint)
    device = FieldDevice(b.device_port, android_id="managed-phone",
                         files={"f.bin": os.urandom(300_000)}).start()
    try:
        both_ways(b, device, "f.bin")
        wait_until(lambda: idle(b), 10, "transfers on b ended")
        used = used_on(b, "managed-phone")
        wait_until(lambda: fleet_used(bucket, "managed-phone") == used, 10, "b's usage in the bucket")
        done = cli(config_a, "show", device.prefix)  # a's registry has never seen it
        assert done.returncode == 0, done.stderr
        assert re.search(rf"used\s+{used} ", done.stdout), done.stdout
        # list: the devices this node's registry knows (b's), with the fleet's figures
        done = cli(cli_config(tmp_path, b, bucket, s3_endpoint), "list")
        assert done.returncode == 0, done.stderr
        row = rf"^{device.prefix} +managed-phone +\S+ +{re.escape(human_bytes(used))} "
        assert re.search(row, done.stdout, re.M), done.stdout

        done = cli(config_a, "set-quota", device.prefix, "100000")
        assert done.returncode == 0 and done.stdout == f"{device.prefix}: quota 100000\n", done
        b.run(lambda n: n.reload(n.settings))  # SIGHUP
        wait_until(lambda: b.run(lambda n: n.devices["managed-phone"].quota_bytes) == 100_000, 10,
                   "the quota on b")
        ftp = ftp_to(b, device.prefix)
        with pytest.raises(ftplib.error_temp, match="425"):
            ftp.retrbinary("RETR f.bin", lambda _: None)

        done = cli(config_a, "set-rate", device.prefix, "--download", "2M", "--upload", "1M")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{device.prefix}: upload 1000000, download 2000000 ")
        b.run(lambda n: n.reload(n.settings))
        wait_until(lambda: b.run(lambda n: n.throttle.device_rates(n.devices["managed-phone"]))
                   == (1_000_000, 2_000_000), 10, "the rates on b")

        done = cli(config_a, "reset-usage", device.prefix)
        assert done.returncode == 0 and "reset to 0" in done.stdout, done
        # b re-reads a device it refused over quota: the reset frees it
        wait_until(lambda: used_on(b, "managed-phone") < 100_000, 10, "the reset on b")
        got = io.BytesIO()
        ftp.retrbinary("RETR f.bin", got.write)
        ftp.quit()
        assert sha(got.getvalue()) == sha(device.files["f.bin"])
        done = cli(config_a, "set-quota", device.prefix, "default")
        assert done.returncode == 0 and done.stdout == f"{device.prefix}: quota node default\n"
    finally:
        device.stop()
    assert not device.errors


class CutLink:
    """A TCP forwarder to S3 that a test can cut (every connection closed, the port
    refusing) and mend (the same port again): the bucket unreachable, then back."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.port = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.mend()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mend(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return  # cut
            far = socket.create_connection(self.target, timeout=10)
            with self._lock:
                self._conns += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_an_unreachable_bucket_keeps_the_counts(
    fleet: Any, bucket: tuple[Any, str], s3_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket cannot be reached mid-way: transfers go on, the node keeps its counts
    in memory (one warning, not one per device), and sends them when S3 is back."""
    link = CutLink(s3_endpoint)
    a = fleet("a.test", quota_flush_interval=0.2, quota_bytes=50_000_000, s3_endpoint=link.url)
    ids = ["patient-phone", "patient-tablet"]
    devices = [FieldDevice(a.device_port, android_id=i, files={"f.bin": os.urandom(200_000)}).start()
               for i in ids]
    try:
        for device in devices:
            both_ways(a, device, "f.bin")
        wait_until(lambda: idle(a), 10)
        for i in ids:
            wait_until(lambda i=i: fleet_used(bucket, i) == used_on(a, i), 10, "usage in the bucket")
        link.cut()
        for _ in range(2):
            for device in devices:
                both_ways(a, device, "f.bin")
        wait_until(lambda: idle(a), 10)
        wait_until(lambda: a.run(lambda n: n.quota.fleet_error) is not None, 20, "the warning")
        assert a.run(lambda n: snapshot(n)["fleet_usage_error"])
        used = {i: used_on(a, i) for i in ids}
        assert all(u > 3 * 250_000 for u in used.values()), used  # nothing forgotten
        assert all(fleet_used(bucket, i) < used[i] for i in ids)
        link.mend()
        for i in ids:
            wait_until(lambda i=i: fleet_used(bucket, i) == used[i], 20, "the counts sent when S3 is back")
        wait_until(lambda: a.run(lambda n: n.quota.fleet_error) is None, 10)
    finally:
        for device in devices:
            device.stop()
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "fleet_usage_unreachable"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


# ---- device keys, fleet-wide ------------------------------------------------------------------


def fleet_key(bucket: tuple[Any, str], android_id: str) -> dict | None:
    """The bucket's ``keys/<id as hex>``, or None."""
    client, name = bucket
    try:
        found = client.get_object(Bucket=name, Key=f"keys/{android_id.encode().hex()}")
    except client.exceptions.NoSuchKey:
        return None
    return orjson.loads(found["Body"].read())


def keyed_login(port: int, source: str, android_id: str, key: DeviceKey) -> dict:
    """A login that proves ``key`` (signs the node's challenge): the node's last answer."""
    device = Stranger(port, source)
    try:
        device.send(json_login(android_id, key=key.public))
        reply = device.recv()
        if "challenge" in reply:
            device.send({"action": "login_proof",
                         "signature": key.sign(android_id, unb64(reply["challenge"], 32))})
            reply = device.recv()
        return reply
    finally:
        device.close()


def keyless_login(port: int, android_id: str) -> dict:
    device = Stranger(port, "127.0.0.1")
    try:
        device.send(json_login(android_id))
        return device.recv()
    finally:
        device.close()


@pytest.mark.parametrize("backend_name", ["rust"])
def test_a_key_bound_on_one_node_is_bound_on_every_node(
    fleet: Any, bucket: tuple[Any, str], s3_endpoint: str, tmp_path: Path
) -> None:
    """The agent binds its key on A: on B, where its id was never seen, a stranger with
    the id and no key, or another key, gets error 16; the agent itself logs in on B
    and moves files. ``devices unbind`` with A's configuration unbinds it fleet-wide:
    a new key binds on B (where the old one was bound too), and A then refuses the old."""
    a = fleet("a.test", guess_max_failures=100)
    b = fleet("b.test", guess_max_failures=100)
    (tmp_path / "root").mkdir()
    ftpd = FtpServerThread(tmp_path / "root")
    state = tmp_path / "agent"
    agent = AgentProcess(a, "127.0.0.1", ftpd.port, state)
    try:
        device_id = (state / "agent-device-id").read_text().strip()
        key = load_or_create_key(state)[0]
        prefix = agent.prefix
        assert (fleet_key(bucket, device_id) or {}).get("key") == key.public
        start = {"action": "start_command_session"}
        assert "bound to a key" in refused(b.device_port, "127.0.0.2", json_login(device_id), start)
        other = DeviceKey.generate()
        assert "another key" in refused(b.device_port, "127.0.0.2", json_login(device_id, key=other.public),
                                        start)
        assert "another key" in refused(b.device_port, "127.0.0.2", json_login(device_id, key=other.public))
        assert b.run(lambda n: n.stats.login_failures) == 3
        assert b.run(lambda n: n.registry.key_of(device_id)) is None  # nothing bound by strangers
        assert agent.close() == 0
        agent = AgentProcess(b, "127.0.0.1", ftpd.port, state)  # the agent moves to b
        assert agent.prefix == prefix
        assert b.run(lambda n: n.registry.key_of(device_id)) == key.public
        asked = b.run(lambda n: n.keys.asked)
        data = os.urandom(200_000)
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", b.ftp_port, timeout=20)
        ftp.login(f"{prefix}_{FTP_USER}", FTP_PASSWORD)
        ftp.storbinary("STOR moved.bin", io.BytesIO(data))
        got = io.BytesIO()
        ftp.retrbinary("RETR moved.bin", got.write)
        ftp.quit()
        assert sha(got.getvalue()) == sha(data)
        assert b.run(lambda n: n.keys.asked) == asked  # data connections: the token, no bucket read

        config_a = cli_config(tmp_path, a, bucket, s3_endpoint)
        done = cli(config_a, "unbind", prefix)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{prefix}: unbound from key {fingerprint(key.public)} in the fleet")
        assert (fleet_key(bucket, device_id) or {}).get("key", "absent") is None  # the tombstone
        assert "unbound fleet-wide" in cli(config_a, "show", prefix).stdout
        new = DeviceKey.generate()  # b still has the old key in its registry: it asks the bucket
        assert keyed_login(b.device_port, "127.0.0.3", device_id, new) == {}
        assert (fleet_key(bucket, device_id) or {}).get("key") == new.public
        assert b.run(lambda n: n.registry.key_of(device_id)) == new.public
        assert "bound to a key" in refused(a.device_port, "127.0.0.2", json_login(device_id))
        assert "another key" in refused(a.device_port, "127.0.0.2", json_login(device_id, key=key.public))
        assert keyed_login(a.device_port, "127.0.0.3", device_id, new) == {}
        assert f"bound to key {fingerprint(new.public)}" in cli(config_a, "show", prefix).stdout
    finally:
        agent.close()
        ftpd.close()


@pytest.mark.parametrize("backend_name", ["rust"])
def test_an_unreachable_bucket_keeps_bound_ids_closed_and_others_open(
    fleet: Any, bucket: tuple[Any, str], s3_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """"Unbound in the fleet" is known from a listing (a keyless device's logins cost no read);
    with the bucket unreachable an id bound here still needs its proof, an id not bound
    here is accepted after one bounded wait, with one warning for the outage."""
    link = CutLink(s3_endpoint)
    a = fleet("a.test", s3_endpoint=link.url, guess_max_failures=100)
    key = DeviceKey.generate()
    assert keyed_login(a.device_port, "127.0.0.1", "keyed-meter", key) == {}
    assert (fleet_key(bucket, "keyed-meter") or {}).get("key") == key.public
    asked = a.run(lambda n: n.keys.asked)
    for _ in range(3):
        assert keyless_login(a.device_port, "field-meter") == {}
    assert a.run(lambda n: n.keys.asked) == asked  # "unbound": the listing of keys/ made above

    def expire(node: Any) -> None:  # every login asks the bucket from now on
        node.keys.unbound_ttl, node.keys.backoff, node.keys._listed_until = 0, 1.0, 0.0
        node.keys.timeout = 1.0  # (2 s by default) well within the test's 3 s login timeout

    a.run(expire)
    link.cut()
    try:
        started = time.monotonic()
        assert keyless_login(a.device_port, "field-meter") == {}  # open: the bounded wait
        assert keyless_login(a.device_port, "field-meter") == {}  # no more waiting in the outage
        assert time.monotonic() - started < 3
        assert "bound to a key" in refused(a.device_port, "127.0.0.2", json_login("keyed-meter"))
        other = DeviceKey.generate()
        assert "another key" in refused(a.device_port, "127.0.0.2",
                                        json_login("keyed-meter", key=other.public))
        assert keyed_login(a.device_port, "127.0.0.1", "keyed-meter", key) == {}
        assert a.run(lambda n: snapshot(n)["fleet_keys_error"])
    finally:
        link.mend()
    wait_until(lambda: keyless_login(a.device_port, "field-meter") == {}
               and a.run(lambda n: n.keys.outage) is None, 15, "the bucket answering again")
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "fleet_keys_unreachable"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


@pytest.mark.parametrize("backend_name", ["rust"])
def test_a_binding_from_before_the_fleet_is_published_when_the_node_joins(
    fleet: Any, bucket: tuple[Any, str], tmp_path: Path
) -> None:
    """A node bound a key on its own; started in a fleet, it publishes it, and the
    other nodes refuse a login of that id without the key."""
    solo = ProxyThread(node_settings(tmp_path / "node0"))  # the state dir of the fleet's first node
    key = DeviceKey.generate()
    try:
        assert keyed_login(solo.device_port, "127.0.0.1", "old-agent", key) == {}
    finally:
        solo.close()
    a = fleet("a.test")
    assert a.node.settings.state_dir == tmp_path / "node0"
    b = fleet("b.test")
    wait_until(lambda: (fleet_key(bucket, "old-agent") or {}).get("key") == key.public, 10,
               "the binding published")
    assert a.run(lambda n: n.registry.key_of("old-agent")) == key.public
    assert "bound to a key" in refused(b.device_port, "127.0.0.2", json_login("old-agent"))
    assert keyed_login(b.device_port, "127.0.0.1", "old-agent", key) == {}
