"""Issue 8: data verbs that do not parse exactly are answered by the node and never reach
the device, while a normal client from another address is served meanwhile; memory stays
bounded under a flood of them; tasks, descriptors and threads return to the baseline."""

from __future__ import annotations

import ftplib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fielddevice import FieldDevice
from tests.helpers import open_fds, sha256, wait_until
from tests.stack import ProxyThread, node_settings

FILE = os.urandom(3_000_000)


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    node = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name))
    tasks, fds, nthreads = node.tasks(), open_fds(), threading.active_count()
    try:
        yield node
        wait_until(lambda: node.tasks() == tasks, 10, "node tasks back to baseline")
        wait_until(lambda: open_fds() <= fds, 10, "fds back to baseline")
        wait_until(lambda: threading.active_count() <= nthreads, 10, "threads back to baseline")
        assert node.run(lambda n: (n.pending_listeners, len(n.sessions), len(n.devices))) == (0, 0, 0)
    finally:
        node.close()


@pytest.fixture
def device(proxy: ProxyThread) -> Iterator[FieldDevice]:
    phone = FieldDevice(proxy.device_port, android_id="fail-closed-phone", files={"f.bin": FILE}).start()
    try:
        yield phone
    finally:
        phone.stop()
        assert phone.errors == []


class Control:
    """A raw control connection through the node, logged in to the device."""

    def __init__(self, port: int, prefix: str, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220")
        assert self.send(f"USER {prefix}_u").startswith("331")
        assert self.send("PASS pw").startswith("230")

    def reply(self) -> str:
        line = self.file.readline().decode("latin-1")
        while line[3:4] == "-":
            line = self.file.readline().decode("latin-1")
        return line.rstrip("\r\n")

    def send(self, line: str | bytes) -> str:
        self.sock.sendall((line.encode("latin-1") if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def download(port: int, prefix: str, source: str, passive: bool) -> bytes:
    chunks: list[bytes] = []
    ftp = ftplib.FTP(source_address=(source, 0), timeout=30)
    ftp.connect("127.0.0.1", port)
    ftp.login(f"{prefix}_u", "pw")
    ftp.set_pasv(passive)
    ftp.retrbinary("RETR f.bin", chunks.append)
    ftp.quit()
    return b"".join(chunks)


BAD = [
    ("PORT 0127,0,0,2,233,65", "501"),  # read as 127.0.0.2 by vsftpd and pyftpdlib
    ("EPRT |1|127.0.0.2|059713|", "501"),  # once converted to PORT 127,0,0,2,233,65
    ("PORT 127,0,0,2,233,65,1", "501"),
    ("PORT 127, 0,0,2,233,65", "501"),
    ("EPRT |1|127.000.000.002|59713|", "501"),
    ("EPRT |2|fe80::1%lo|59713|", "501"),
    ("EPRT |1|127.0.0.2|59713", "501"),
    (b"\xff\xf1PORT 127,0,0,2,233,65", "501"),  # behind a Telnet NOP (ProFTPD strips it)
    ("PORT 127,0,0,2,0,21", "504"),  # a port below 1024 (RFC 2577)
    ("LPRT 4,4,127,0,0,2,2,233,65", "502"),
    ("EPSV junk", "501"),
    ("EPSV 7", "522"),
    ("PASV x", "501"),
    ("NOOP\rPORT 127,0,0,2,233,65", "501"),  # a lone CR ends a line for Java's readLine
    ("NOOP " + " " * 5000 + "PORT 127,0,0,2,233,65", "500"),  # cut at 4096 by vsftpd
]


def test_issue_8_bad_data_verbs_get_the_nodes_answer(proxy: ProxyThread, device: FieldDevice) -> None:
    bad = Control(proxy.ftp_port, device.prefix)
    try:
        served: list[bytes] = []
        other = threading.Thread(target=lambda: served.extend(
            download(proxy.ftp_port, device.prefix, "127.0.0.3", passive) for passive in (True, False)))
        other.start()  # a normal client from another address, passive and active, meanwhile
        for line, code in BAD:
            answer = bad.send(line)
            assert answer.startswith(code + " "), (line, answer)
        assert bad.send("NOOP").startswith("200")  # the connection goes on
        other.join(60)
        assert [sha256(d) for d in served] == [sha256(FILE)] * 2
        # the device saw the two clients' logins, the normal client's transfers and NOOPs:
        # no EPRT, no LPRT, and one PORT only, the normal client's (pinned to 127.0.0.3)
        assert "EPRT" not in device.commands and "LPRT" not in device.commands
        assert device.commands.count("PORT") == 1 and device.commands.count("NOOP") == 1
    finally:
        bad.close()


def test_a_good_port_still_reaches_the_device_pinned(proxy: ProxyThread, device: FieldDevice) -> None:
    c = Control(proxy.ftp_port, device.prefix, "127.0.0.4")
    try:
        with socket.create_server(("127.0.0.4", 0)) as data:
            port = data.getsockname()[1]
            # EPRT naming another address: the device gets PORT with the client's own
            answer = c.send(f"EPRT |1|127.0.0.9|{port}|")
            assert answer.startswith("200"), answer
            assert c.send("RETR f.bin").startswith("150")
            conn, _ = data.accept()
            with conn:
                got = b""
                while chunk := conn.recv(1 << 20):
                    got += chunk
            assert sha256(got) == sha256(FILE)
            assert c.reply().startswith("226")
        assert device.commands.count("PORT") == 1 and "EPRT" not in device.commands
    finally:
        c.close()


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024


def test_a_flood_of_bad_ports_is_answered_in_bounded_memory(proxy: ProxyThread, device: FieldDevice) -> None:
    """A million refused PORTs sent at once by a client that reads nothing for a while: the
    node stops reading it until it takes its answers (no pile of answers), then answers all."""
    c = Control(proxy.ftp_port, device.prefix)
    lines = 1_000_000
    flood = b"PORT 0127,0,0,2,233,65\r\n" * lines
    # the node stops reading the client while it does not take its answers: the client's
    # own sendall then waits as long as its reading lags, which a loaded machine stretches
    c.sock.settimeout(60)
    before = _rss()
    try:
        sender = threading.Thread(target=c.sock.sendall, args=(flood,))
        sender.start()
        time.sleep(1.0)  # the client reads nothing meanwhile
        grown = _rss() - before
        got = 0
        while got < lines:
            line = c.file.readline()
            assert line.startswith(b"501 "), line
            got += 1
        sender.join(30)
        assert c.send("NOOP").startswith("200")
        assert grown < 32 << 20, f"the node's process grew {grown >> 20} MiB while the client read nothing"
        assert "PORT" not in device.commands
    finally:
        c.close()
