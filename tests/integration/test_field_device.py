"""The proxy against a device that behaves like the deployed phone app
(tests/fielddevice.py): one object per read, no banner, its own private
address in 227, 502 to EPSV/EPRT."""

from __future__ import annotations

import concurrent.futures
import ftplib
import hashlib
import io
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import fd_targets, recv_all, wait_for_fds, wait_until
from tests.stack import ProxyThread, node_settings


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    node = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name))
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def device(proxy: ProxyThread) -> Iterator[FieldDevice]:
    dev = FieldDevice(proxy.device_port, files={"photo.jpg": os.urandom(3 << 20)}).start()
    wait_until(lambda: proxy.run(lambda n: n.online(dev.prefix) is not None), 5, "device online")
    try:
        yield dev
    finally:
        dev.stop()
    assert not dev.errors, dev.errors


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def login(proxy: ProxyThread, device: FieldDevice, passive: bool = True) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
    # Use the address in the 227 reply, as older ftplib, FileZilla and many others do:
    # the field device put its private address there and the proxy must have fixed it.
    ftp.trust_server_pasv_ipv4_address = True
    ftp.login(f"{device.prefix}_alice", "pw")
    ftp.set_pasv(passive)
    return ftp


@pytest.mark.parametrize("mode", ["passive", "active"])
def test_retr_and_stor_both_ways(proxy: ProxyThread, device: FieldDevice, mode: str) -> None:
    ftp = login(proxy, device, passive=mode == "passive")
    got = io.BytesIO()
    ftp.retrbinary("RETR photo.jpg", got.write)
    assert sha(got.getvalue()) == sha(device.files["photo.jpg"])
    upload = os.urandom(5 << 20)
    ftp.storbinary("STOR new.bin", io.BytesIO(upload))
    assert sha(device.files["new.bin"]) == sha(upload)
    ftp.quit()


def test_pasv_reply_names_the_proxy_not_the_phone(proxy: ProxyThread, device: FieldDevice) -> None:
    ftp = login(proxy, device)
    reply = ftp.sendcmd("PASV")
    assert reply.startswith("227")
    assert "(127,0,0,1," in reply and "10,0,0,2" not in reply
    ftp.close()


def test_curl_falls_back_from_epsv(proxy: ProxyThread, device: FieldDevice, tmp_path: Path) -> None:
    out = tmp_path / "photo.jpg"
    url = f"ftp://{device.prefix}_alice:pw@127.0.0.1:{proxy.ftp_port}/photo.jpg"
    done = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", str(out), url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sha(out.read_bytes()) == sha(device.files["photo.jpg"])


def test_upload_bytes_sent_at_once_are_not_lost(proxy: ProxyThread, device: FieldDevice) -> None:
    """The client's data is already waiting when the device gets its "{}": none of it
    may share the device's read with the "{}" (the device would drop it)."""
    upload = os.urandom(1 << 20)
    ftp = login(proxy, device)
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    data = socket.create_connection((host, port), timeout=10)
    data.sendall(upload[:200_000])  # before STOR: in flight when "{}" is sent
    ftp.putcmd("STOR instant.bin")
    data.sendall(upload[200_000:])
    data.close()
    assert ftp.getresp().startswith("150")
    assert ftp.getresp().startswith("226")
    assert sha(device.files["instant.bin"]) == sha(upload)
    ftp.quit()


def test_many_clients_at_the_same_moment(proxy: ProxyThread, device: FieldDevice) -> None:
    """Eight control_connection_waiting at once: paced so the device reads each alone."""

    def fetch(_: int) -> str:
        ftp = login(proxy, device)
        buf = io.BytesIO()
        ftp.retrbinary("RETR photo.jpg", buf.write)
        ftp.quit()
        return sha(buf.getvalue())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(fetch, range(8)))
    assert digests == [sha(device.files["photo.jpg"])] * 8


def test_command_session_requests(proxy: ProxyThread, device: FieldDevice) -> None:
    for request in ({"action": "noop"}, {"action": "check_quota"}, {"action": "bogus"}):
        device.request(request)
        wait_until(lambda: len(device.replies) >= 1, 5, f"reply to {request}")
        reply = device.replies.pop()
        if request["action"] == "noop":
            assert reply == {}
        elif request["action"] == "check_quota":
            assert set(reply) == {"quota", "used"} and reply["used"] >= 0 < reply["quota"]
        else:
            assert reply["error_code"] == 9


def test_finished_closes_cleanly(proxy: ProxyThread) -> None:
    tasks = proxy.tasks()
    dev = FieldDevice(proxy.device_port, android_id="leaving-device")
    sock = dev.connect()
    write_one(sock, {"action": "start_command_session"})
    prefix = read_one(sock)["prefix"]
    write_one(sock, {"action": "finished"})
    assert read_one(sock) == {}
    assert recv_all(sock) == b""  # the proxy closed
    sock.close()
    wait_until(lambda: proxy.run(lambda n: n.online(prefix)) is None, 5)
    wait_until(lambda: proxy.tasks() == tasks, 5)


def test_second_login_replaces_the_stale_session(proxy: ProxyThread) -> None:
    first = FieldDevice(proxy.device_port, android_id="phone-42", files={"a": b"old"}).start()
    second = FieldDevice(proxy.device_port, android_id="phone-42", files={"a": b"new"}).start()
    assert first.prefix == second.prefix  # same device id, same prefix
    # the stale session is closed by the proxy
    first.command.settimeout(5)
    assert recv_all(first.command) == b""
    ftp = login(proxy, second)
    buf = io.BytesIO()
    ftp.retrbinary("RETR a", buf.write)
    assert buf.getvalue() == b"new"
    ftp.quit()
    first.stop()
    second.stop()
    assert not second.errors


def test_prefix_is_stable_across_restarts(backend_name: str, tmp_path: Path) -> None:
    prefixes = []
    for _ in range(2):
        node = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name))
        dev = FieldDevice(node.device_port, android_id="stable-id").start()
        prefixes.append(dev.prefix)
        dev.stop()
        node.close()
    assert prefixes[0] == prefixes[1] and len(prefixes[0]) == 5 and prefixes[0].isalpha()


def test_no_leaks_after_transfers(proxy: ProxyThread, device: FieldDevice) -> None:
    test_retr_and_stor_both_ways(proxy, device, "passive")  # warm up
    tasks = proxy.quiet_tasks()
    fds = fd_targets()
    for mode in ("passive", "active", "passive"):
        test_retr_and_stor_both_ways(proxy, device, mode)
    assert proxy.quiet_tasks() == tasks
    wait_for_fds(fds)
