"""Nodes sharing an S3 bucket: one prefix per device on every node, the server list
kept by heartbeats, and a drain that sends devices to another node.  S3 is moto's
standalone server process, reached over HTTP by boto3 as AWS or MinIO would be."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ftplib
import hashlib
import io
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from swiftftp.agent import Agent, AgentSettings
from swiftftp.stats import snapshot
from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import wait_until
from tests.stack import FTP_PASSWORD, FTP_USER, FtpServerThread, LoopThread, ProxyThread, node_settings

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
                                 fleet_bucket=bucket[1],
                                 s3_endpoint=s3_endpoint, fleet_host=host, fleet_heartbeat=0.5,
                                 **overrides)
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
