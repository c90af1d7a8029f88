"""The proxy against a device that behaves like the deployed phone app
(tests/fielddevice.py): one object per read, no banner, its own private
address in 227, 502 to EPSV/EPRT."""

from __future__ import annotations

import concurrent.futures
import ftplib
import hashlib
import io
import json
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


def curl(*args: str) -> None:
    done = subprocess.run(["curl", "-sS", "--max-time", "30", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mode", ["passive", "active"])
def test_curl_epsv_and_eprt_reach_the_device_as_pasv_and_port(
    proxy: ProxyThread, device: FieldDevice, tmp_path: Path, mode: str
) -> None:
    """curl tries EPSV (or EPRT) first; the device only knows PASV and PORT, so the
    proxy translates and curl never sees the device's 502."""
    url = f"ftp://{device.prefix}_alice:pw@127.0.0.1:{proxy.ftp_port}/"
    args = ["--ftp-port", "127.0.0.1"] if mode == "active" else []
    upload = tmp_path / "up.bin"
    upload.write_bytes(os.urandom(2 << 20))
    curl(*args, "-o", str(tmp_path / "photo.jpg"), url + "photo.jpg")
    curl(*args, "-T", str(upload), url + "up.bin")
    assert sha((tmp_path / "photo.jpg").read_bytes()) == sha(device.files["photo.jpg"])
    assert sha(device.files["up.bin"]) == sha(upload.read_bytes())
    expected = "PASV" if mode == "passive" else "PORT"
    assert device.commands.count(expected) == 2
    assert "EPSV" not in device.commands and "EPRT" not in device.commands


def test_epsv_all(proxy: ProxyThread, device: FieldDevice) -> None:
    ftp = login(proxy, device)
    assert ftp.sendcmd("EPSV ALL").startswith("200 EPSV ALL")
    host, port = ftplib.parse229(ftp.sendcmd("EPSV"), ftp.sock.getpeername())
    with socket.create_connection((host, port), timeout=10) as data:
        assert ftp.sendcmd("RETR photo.jpg").startswith("150")
        got = recv_all(data)
    assert ftp.getresp().startswith("226")
    assert sha(got) == sha(device.files["photo.jpg"])
    ftp.quit()
    assert device.commands[-4:] == ["NOOP", "PASV", "RETR", "QUIT"]


@pytest.fixture
def proxy6(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    """A node listening on every address, IPv6 and IPv4 alike ("::")."""
    node = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name, listen="::"))
    try:
        yield node
    finally:
        node.close()


def test_ipv6_clients_get_passive_mode(proxy6: ProxyThread, tmp_path: Path) -> None:
    """An IPv6 client cannot use PASV (227 has no IPv6 form) and the field device does
    not do EPSV: the proxy's translation is what makes passive mode work for it."""
    device = FieldDevice(proxy6.device_port, files={"photo.jpg": os.urandom(3 << 20)}).start()
    try:
        ftp = ftplib.FTP()
        ftp.connect("::1", proxy6.ftp_port, timeout=20)
        ftp.login(f"{device.prefix}_alice", "pw")
        got = io.BytesIO()
        ftp.retrbinary("RETR photo.jpg", got.write)  # ftplib sends EPSV on IPv6
        upload = os.urandom(5 << 20)
        ftp.storbinary("STOR v6.bin", io.BytesIO(upload))
        assert sha(got.getvalue()) == sha(device.files["photo.jpg"])
        assert sha(device.files["v6.bin"]) == sha(upload)
        # active mode needs EPRT with an IPv6 address, which PORT cannot carry: the
        # device's own 502 comes back, a clear answer rather than a hang
        ftp.set_pasv(False)
        with pytest.raises(ftplib.error_perm, match=r"^502"):
            ftp.retrbinary("RETR photo.jpg", got.write)
        ftp.quit()

        url = f"ftp://{device.prefix}_alice:pw@[::1]:{proxy6.ftp_port}/"
        curl("-g", "-o", str(tmp_path / "curl.jpg"), url + "photo.jpg")
        assert sha((tmp_path / "curl.jpg").read_bytes()) == sha(device.files["photo.jpg"])
        script = (
            "set net:max-retries 1; set net:timeout 20; set xfer:clobber on; "
            f"open -u {device.prefix}_alice,pw -p {proxy6.ftp_port} ::1; "
            f"get photo.jpg -o {tmp_path / 'lftp.jpg'}; put {tmp_path / 'curl.jpg'} -o lftp.bin; bye"
        )
        done = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert sha((tmp_path / "lftp.jpg").read_bytes()) == sha(device.files["photo.jpg"])
        assert sha(device.files["lftp.bin"]) == sha(device.files["photo.jpg"])
        assert "EPSV" not in device.commands and device.commands.count("PASV") >= 4
    finally:
        device.stop()
    assert not device.errors, device.errors


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
    # the stale session is told why (the device's reader or this one reads it), then closed
    first.command.settimeout(5)
    rest = recv_all(first.command)
    if not rest:
        wait_until(lambda: first.notices, 5, "the device's reader to keep the notice")
    notices = first.notices + ([json.loads(rest)] if rest else [])
    assert notices == [{"action": "message", "reason": "replaced",
                        "text": "this device id logged in again from 127.0.0.1; this session is replaced"}]
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
