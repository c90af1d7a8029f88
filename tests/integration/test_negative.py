"""Bad input from clients and devices: the right reply or error code, a clean
close, and nothing leaked (tasks of the node, file descriptors of the process)."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.fielddevice import FieldDevice, read_one, write_one
from tests.helpers import open_fds, recv_all, wait_until
from tests.stack import ProxyThread, node_settings


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    node = ProxyThread(
        node_settings(tmp_path / "state", relay_backend=backend_name, device_login_timeout=1,
                      client_login_timeout=2, pasv_accept_timeout=1)
    )
    tasks, fds, nthreads = node.tasks(), open_fds(), threading.active_count()
    try:
        yield node
        # every test leaves the node as it found it: tasks, sockets, listening ports, threads
        wait_until(lambda: node.tasks() == tasks, 10, "node tasks back to baseline")
        wait_until(lambda: open_fds() <= fds, 10, "fds back to baseline")
        wait_until(lambda: threading.active_count() <= nthreads, 10, "threads back to baseline")
        assert node.run(lambda n: (n.pending_listeners, len(n.sessions), len(n.devices))) == (0, 0, 0)
    finally:
        node.close()


class FtpClient:
    """A raw FTP control connection, to see exactly what the proxy answers."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        line = self.file.readline().decode()
        while line[3:4] == "-":
            line = self.file.readline().decode()
        return line.rstrip("\r\n")

    def send(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_unknown_prefix(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    assert c.reply().startswith("220")
    answer = c.send("USER nosuch_bob")
    assert answer.startswith("530") and "not signed in" in answer
    c.close()


def test_anonymous_first_gets_a_hint(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.send("USER anonymous").startswith("331")
    answer = c.send("PASS guest@")
    assert answer.startswith("530") and "<prefix>_<user>" in answer
    c.close()


def test_three_failures_and_out(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.send("USER aaaaa_x").startswith("530")
    assert c.send("USER anonymous").startswith("331")
    assert c.send("PASS x").startswith("530")
    assert c.send("USER bbbbb_y").startswith("530")
    assert c.closed()
    c.close()


def test_pre_login_commands(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.send("AUTH TLS").startswith("502")
    assert c.send("FEAT").startswith("530")
    assert c.send("PASS x").startswith("503")
    assert c.send("NOOP").startswith("200")
    assert c.send("LIST").startswith("530")
    assert c.send("QUIT").startswith("221")
    assert c.closed()
    c.close()


def test_overlong_line_is_refused(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.send("USER " + "x" * 5000).startswith("500")
    assert c.closed()
    c.close()


def test_client_login_timeout(proxy: ProxyThread) -> None:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.reply().startswith("421")  # after client_login_timeout (2 s here)
    assert c.closed()
    c.close()


def device_exchange(proxy: ProxyThread, *payloads: bytes) -> list[dict]:
    """Send raw payloads on the device port; return every reply until the proxy closes."""
    sock = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    for payload in payloads:
        sock.sendall(payload)
    data = recv_all(sock)
    sock.close()
    decoder, replies, pos = json.JSONDecoder(), [], 0
    text = data.decode()
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        replies.append(obj)
    return replies


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"action": "login", "android_id": ', 9),  # truncated, then silence: timeout closes
        (b"{not json}", 9),
        (b"[1, 2, 3]", 9),
        (b'"just a string"', 9),
        (b'{"android_id": "abc"}', 9),  # no action
        (b'{"action": 5}', 9),
        (b'{"action": "login"}', 9),  # no android_id
        (b'{"action": "login", "android_id": 12345}', 9),
        (b'{"action": "fly", "android_id": "abc"}', 9),
        (b'{"action": "login", "android_id": ""}', 12),
        (b'{"action": "login", "android_id": "' + b"x" * 500 + b'"}', 12),
        (b'{"action": "login", "android_id": "bad\\u0000id"}', 12),
        (b'{"action": "login", "android_id": "' + b"y" * 20000 + b'"}', 9),  # oversized
    ],
)
def test_malformed_device_input(proxy: ProxyThread, payload: bytes, code: int) -> None:
    replies = device_exchange(proxy, payload)
    if payload.endswith(b": "):
        assert replies == []  # incomplete message: closed at the login timeout, no reply
        return
    assert replies[-1]["error_code"] == code, replies
    assert isinstance(replies[-1]["error_string"], str)


def test_device_that_logs_in_and_goes_silent(proxy: ProxyThread) -> None:
    replies = device_exchange(proxy, b'{"action": "login", "android_id": "quiet1"}')
    assert replies == [{}]  # logged in, then closed after device_login_timeout


def test_legacy_create_account_and_authenticate(proxy: ProxyThread) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    write_one(sock, {"action": "create_account", "android_id": "legacy-1"})
    secret = read_one(sock)["secret"]
    write_one(sock, {"action": "authenticate", "android_id": "legacy-1", "secret": secret})
    assert read_one(sock) == {}
    write_one(sock, {"action": "start_command_session"})
    assert "prefix" in read_one(sock)
    sock.close()
    replies = device_exchange(proxy, b'{"action": "create_account", "android_id": "legacy-1"}')
    assert replies[-1]["error_code"] == 10
    replies = device_exchange(
        proxy, b'{"action": "authenticate", "android_id": "legacy-1", "secret": "wrong"}'
    )
    assert replies[-1]["error_code"] == 11


@pytest.fixture
def device(proxy: ProxyThread) -> Iterator[FieldDevice]:
    dev = FieldDevice(proxy.device_port, files={"f": b"x" * 10_000_000}).start()
    try:
        yield dev
    finally:
        dev.stop()


def control_connection(proxy: ProxyThread, device: FieldDevice) -> FtpClient:
    c = FtpClient(proxy.ftp_port)
    c.reply()
    assert c.send(f"USER {device.prefix}_me").startswith("331")
    assert c.send("PASS pw").startswith("230")
    return c


def data_request(proxy: ProxyThread, device: FieldDevice, request: dict) -> dict:
    sock = device.connect()
    write_one(sock, request)
    reply = read_one(sock)
    sock.close()
    return reply


def test_port_connect_to_a_foreign_address_is_refused(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    with socket.create_server(("127.0.0.2", 0)) as victim:
        port = victim.getsockname()[1]
        reply = data_request(proxy, device,
                             {"action": "data_port_connect", "address": "127.0.0.2", "port": port})
        assert reply["error_code"] == 14
        victim.settimeout(0.5)
        with pytest.raises(TimeoutError):
            victim.accept()  # nobody was dialled
    c.close()


def test_port_connect_to_a_privileged_port_is_refused(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    reply = data_request(proxy, device,
                         {"action": "data_port_connect", "address": "127.0.0.1", "port": 22})
    assert reply["error_code"] == 14
    c.close()


def test_port_connect_without_control_connection(proxy: ProxyThread, device: FieldDevice) -> None:
    reply = data_request(proxy, device,
                         {"action": "data_port_connect", "address": "127.0.0.1", "port": 5000})
    assert reply["error_code"] == 14


def test_port_connect_to_a_closed_port(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    reply = data_request(proxy, device,
                         {"action": "data_port_connect", "address": "127.0.0.1", "port": port})
    assert reply["error_code"] == 14
    c.close()


def test_passive_port_refuses_strangers(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    reply = c.send("PASV")
    nums = [int(x) for x in reply[reply.index("(") + 1 : reply.index(")")].split(",")]
    port = nums[4] * 256 + nums[5]
    # a stranger (another address) races for the port: accepted and dropped at once
    thief = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
    assert recv_all(thief) == b""
    thief.close()
    data = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sock.sendall(b"RETR f\r\n")
    assert c.reply().startswith("150")
    assert len(recv_all(data)) == 10_000_000
    assert c.reply().startswith("226")
    data.close()
    c.close()


def test_passive_accept_times_out_with_13(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    sock = device.connect()
    write_one(sock, {"action": "data_pasv_listen"})
    port = read_one(sock)["port"]
    write_one(sock, {"action": "data_pasv_accept"})
    assert read_one(sock)["error_code"] == 13  # nobody came within pasv_accept_timeout
    sock.close()
    # and the port is closed again
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    c.close()


def test_client_vanishes_mid_transfer(proxy: ProxyThread, device: FieldDevice) -> None:
    c = control_connection(proxy, device)
    reply = c.send("PASV")
    nums = [int(x) for x in reply[reply.index("(") + 1 : reply.index(")")].split(",")]
    data = socket.create_connection(("127.0.0.1", nums[4] * 256 + nums[5]), timeout=5)
    c.sock.sendall(b"RETR f\r\n")
    assert c.reply().startswith("150")
    data.recv(1000)
    # vanish: RST on both connections
    for s in (data, c.sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    c.file.close()
    # the proxy's fixture checks that tasks and fds return to baseline


def test_device_rendezvous_timeout_gives_421(proxy: ProxyThread) -> None:
    """A device whose command session is open but which never takes the client."""
    sock = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    write_one(sock, {"action": "login", "android_id": "mute-phone"})
    assert read_one(sock) == {}
    write_one(sock, {"action": "start_command_session"})
    prefix = read_one(sock)["prefix"]
    c = FtpClient(proxy.ftp_port)
    c.reply()
    c.sock.sendall(f"USER {prefix}_x\r\n".encode())
    assert "control_connection_waiting" in read_one(sock)["action"]
    assert c.reply().startswith("421")
    c.close()
    sock.close()


def test_garbage_flood_does_not_hurt_the_listener(proxy: ProxyThread) -> None:
    def flood() -> None:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
            s.sendall(b"\xff\xfe garbage " * 100)
            recv_all(s)
            s.close()

    threads = [threading.Thread(target=flood) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # still serving
    dev = FieldDevice(proxy.device_port, android_id="after-flood").start()
    assert dev.prefix
    dev.stop()


# Values of every JSON type, and the edge cases a parser of ports and addresses meets.
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.sampled_from(["127.0.0.1", "::1", "0", "65536", "1e9", "..", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
REQUEST = st.fixed_dictionaries(
    {"action": st.sampled_from(["start_command_session", "data_pasv_listen", "data_pasv_accept",
                                "data_port_connect", "noop", "check_quota", "finished",
                                "login", "authenticate", "create_account", "message"])},
    optional={key: ANY_VALUE for key in ("address", "port", "android_id", "secret", "text")},
)


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=1, max_size=3))
def test_any_request_after_login_gets_a_reply_or_a_clean_close(
    proxy: ProxyThread, caplog: pytest.LogCaptureFixture, requests: list[dict]
) -> None:
    """Whatever fields, of whatever types, follow a good login: every reply is a JSON
    object and no handler fails with an exception of its own."""
    login = {"action": "login", "android_id": "fuzzed-device"}
    sock = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10)
    write_one(sock, login)
    assert read_one(sock) == {}
    for request in requests:
        sock.sendall(json.dumps(request).encode())
    sock.shutdown(socket.SHUT_WR)  # our EOF ends whatever the node still waits for
    data = recv_all(sock)
    sock.close()
    decoder, pos, text = json.JSONDecoder(), 0, data.decode()
    while pos < len(text):
        reply, pos = decoder.raw_decode(text, pos)
        assert isinstance(reply, dict)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
