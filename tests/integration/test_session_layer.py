"""The device session layer under faults and abuse: every wait bounded, the
rendezvous protected, control slots strangers cannot hold, and idle meaning idle.
Each test checks the outcome, and that tasks, fds and threads come back."""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import fd_targets, recv_all, wait_for_fds, wait_until
from tests.integration.test_negative import FtpClient
from tests.stack import ProxyThread, node_settings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    node = ProxyThread(node_settings(
        tmp_path / "state", relay_backend=backend_name, rendezvous_timeout=2, device_login_timeout=2,
        client_login_timeout=3, send_timeout=3,
    ))
    tasks, fds, nthreads = node.quiet_tasks(), fd_targets(), threading.active_count()
    try:
        yield node
        wait_until(lambda: node.tasks() == tasks, 10, "node tasks back to baseline")
        wait_for_fds(fds)
        wait_until(lambda: threading.active_count() <= nthreads, 10, "threads back to baseline")
        assert node.run(lambda n: (n.pending_listeners, len(n.sessions), len(n.devices))) == (0, 0, 0)
    finally:
        node.close()


def raw_command_session(proxy: ProxyThread, android_id: str) -> tuple[socket.socket, str]:
    """A device that logs in and opens its command session, then does what the test says."""
    sock = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    write_one(sock, {"action": "login", "android_id": android_id})
    assert read_one(sock) == {}
    write_one(sock, {"action": "start_command_session"})
    return sock, read_one(sock)["prefix"]


def test_a_device_that_stops_reading_answers_every_client_within_the_rendezvous_timeout(
    proxy: ProxyThread,
) -> None:
    """It logs in, then never reads again (its kernel still acknowledges): three clients
    arriving together each get 421 within rendezvous_timeout (2 s here). Once it has
    let three rendezvous it was told of pass, the node closes its session (so that
    it reconnects); the clients after that hear at once that it is not signed in."""
    sock, prefix = raw_command_session(proxy, "deaf-phone")

    def arrive(n: int) -> list[float]:
        clients = [FtpClient(proxy.ftp_port) for _ in range(n)]
        for c in clients:
            assert c.reply().startswith("220")
        began = time.monotonic()
        for c in clients:
            c.sock.sendall(f"USER {prefix}_x\r\n".encode())
        waits = []
        for c in clients:
            answer = c.reply()
            waits.append(time.monotonic() - began)
            c.close()
            if answer.startswith("530"):  # closed by now: not signed in
                return waits
            assert answer.startswith("421"), answer
        return waits

    waits = arrive(3)
    print(f"\nthree at once: answers after {', '.join(f'{w:.2f}' for w in waits)} s")
    assert max(waits) < 2 + 1.0
    told = 0
    for _ in range(3):  # one at a time: each is told to the device, each times out
        if proxy.run(lambda n: n.online(prefix)) is None:
            break
        [wait] = arrive(1)
        assert wait < 2 + 1.0
        told += 1
    wait_until(lambda: proxy.run(lambda n: n.online(prefix)) is None, 5, "the deaf device closed")
    assert told <= 2  # three told in a row in all: one to three of them among the first three
    [wait] = arrive(1)
    assert wait < 0.5  # 530 at once
    # its buffer holds the control_connection_waiting messages it never read, then EOF
    sock.settimeout(5)
    assert b"control_connection_waiting" in recv_all(sock)
    sock.close()


def test_silent_strangers_on_the_rendezvous_port_do_not_keep_the_device_out(proxy: ProxyThread) -> None:
    """Connections from other addresses are closed at once; silent ones from the
    device's own address wait alongside it: the device logs in without delay."""
    sock, prefix = raw_command_session(proxy, "crowded-phone")
    c = FtpClient(proxy.ftp_port)
    c.reply()
    c.sock.sendall(f"USER {prefix}_bob\r\n".encode())
    port = read_one(sock)["port"]
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
                 for _ in range(4)]
    same_address = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    for s in strangers:
        assert recv_all(s) == b""  # closed by the node at once
        s.close()
    began = time.monotonic()
    device = socket.create_connection(("127.0.0.1", port), timeout=5)
    write_one(device, {"action": "login", "android_id": "crowded-phone"})
    assert read_one(device) == {}
    assert device.recv(100) == b"USER bob\r\n"
    assert time.monotonic() - began < 0.5  # not after the silent ones' login timeout
    device.sendall(b"331 Password please.\r\n")
    assert c.reply().startswith("331")
    for s in same_address:  # each answered at its own login timeout, or at once
        s.settimeout(5)
        recv_all(s)
        s.close()
    refused = proxy.run(lambda n: n.stats.refused["stranger on a rendezvous port"])
    assert refused == 4
    c.close()
    device.close()
    sock.close()


def test_logins_that_never_finish_cannot_fill_the_device(proxy: ProxyThread) -> None:
    """Sixteen connections from one address send USER and never a password: half the
    device's slots is that address's share, the rest get 421 at once; a client from
    another address still logs in and transfers; the stuck ones go at client_login."""
    device = FieldDevice(proxy.device_port, files={"f": os.urandom(1 << 20)}).start()
    try:
        stuck = [FtpClient(proxy.ftp_port, source="127.0.0.5") for _ in range(16)]
        answers = []
        for c in stuck:
            c.reply()
            answers.append(c.send(f"USER {device.prefix}_x")[:3])
        assert answers.count("331") == 8 and answers.count("421") == 8, answers
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=10, source_address=("127.0.0.6", 0))
        ftp.login(f"{device.prefix}_alice", "pw")
        got = io.BytesIO()
        ftp.retrbinary("RETR f", got.write)
        assert sha(got.getvalue()) == sha(device.files["f"])
        ftp.quit()
        for c, answer in zip(stuck, answers, strict=True):
            if answer == "331":
                assert c.reply().startswith("421")  # login timeout (3 s here)
            assert c.closed()
            c.close()
    finally:
        device.stop()
    assert not device.errors, device.errors


def test_a_transfer_longer_than_the_idle_timeout_keeps_its_control_connection(
    backend_name: str, tmp_path: Path
) -> None:
    """A RETR that lasts 3 s with idle = 1 s: the control connection is not idle while
    its data connection moves bytes, so the 226 arrives; idle afterwards, it is closed."""
    proxy = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name,
                                      idle_timeout=1, session_rate=1_000_000))
    data = os.urandom(3_000_000)
    device = FieldDevice(proxy.device_port, files={"big": data}).start()
    try:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
        ftp.login(f"{device.prefix}_alice", "pw")
        got = io.BytesIO()
        began = time.monotonic()
        assert ftp.retrbinary("RETR big", got.write).startswith("226")
        took = time.monotonic() - began
        assert sha(got.getvalue()) == sha(data) and took > 2
        with pytest.raises(ftplib.error_temp, match="421 Idle timeout"):
            ftp.voidresp()  # nothing sent for 1 s: the node closes it
        ftp.close()
    finally:
        device.stop()
        proxy.close()
    assert not device.errors, device.errors
