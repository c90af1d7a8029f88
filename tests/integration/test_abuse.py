"""A node on the open internet, probed as an attacker would: every limit holds, a
normal client from another address is still served meanwhile (SHA-256 both ways),
the log stays small, and descriptors, tasks and threads come back afterwards."""

from __future__ import annotations

import ftplib
import hashlib
import io
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fielddevice import FieldDevice, request
from tests.helpers import fd_targets, wait_for_fds, wait_until
from tests.stack import ProxyThread, node_settings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyThread]:
    overrides = getattr(request, "param", {})
    node = ProxyThread(node_settings(tmp_path / "state", relay_backend=backend_name, failure_delay=0,
                                     client_login_timeout=3, **overrides))
    device = FieldDevice(node.device_port, android_id="abuse-victim",
                         files={"f": os.urandom(1 << 20)}).start()
    node.device = device  # type: ignore[attr-defined]
    tasks, fds, nthreads = node.quiet_tasks(), fd_targets(), threading.active_count()
    try:
        yield node
        wait_until(lambda: node.tasks() == tasks, 15, "node tasks back to baseline")
        wait_for_fds(fds, 15)
        wait_until(lambda: threading.active_count() <= nthreads, 10, "threads back to baseline")
        assert node.run(lambda n: (n.pending_listeners, n.guard.pending)) == (0, 0)
    finally:
        device.stop()
        node.close()
    assert not device.errors, device.errors


def normal_client(proxy: ProxyThread, source: str = "127.0.0.200") -> None:
    """A user from elsewhere logs in, downloads and uploads; both ways checked."""
    device: FieldDevice = proxy.device  # type: ignore[attr-defined]
    ftp = ftplib.FTP(source_address=(source, 0))
    ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
    ftp.login(f"{device.prefix}_user", "pw")
    got = io.BytesIO()
    ftp.retrbinary("RETR f", got.write)
    assert sha(got.getvalue()) == sha(device.files["f"])
    data = os.urandom(300_000)
    ftp.storbinary("STOR up.bin", io.BytesIO(data))
    assert sha(device.files["up.bin"]) == sha(data)
    ftp.quit()


def raw(proxy: ProxyThread, source: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", proxy.ftp_port))
    return s


def test_a_client_that_never_reads_is_gone_after_the_login_timeout(proxy: ProxyThread) -> None:
    """It sends commands as fast as it can and reads none of the replies (a 4 KiB
    receive window, soon full): the node's writes are bounded by the login deadline,
    so it is gone within client_login (3 s here) and a margin, not 9 to 90 s later."""
    sock = raw(proxy, "127.0.0.7", rcvbuf=4096)
    began = time.monotonic()
    sock.settimeout(0.5)
    try:
        while time.monotonic() - began < 2.5:
            sock.send(b"LIST\r\n" * 1000)  # each answered 530: eight times the bytes
    except OSError:
        pass  # the node stopped taking them: its writes are stuck too
    try:
        wait_until(lambda: proxy.run(lambda n: not n.guard.connections), 10, "the node let go")
        took = time.monotonic() - began
    finally:
        sock.close()
    print(f"\nnever-reading client let go after {took:.1f} s")
    assert took < 3 + 2.5
    normal_client(proxy)


@pytest.mark.parametrize("proxy", [{"max_pending_connections": 40}], indirect=True)
def test_connections_not_logged_in_are_capped_node_wide(proxy: ProxyThread) -> None:
    """Silent connections from many addresses fill the node-wide pre-login cap; past it
    newcomers get 421 at once (devices error 0), while a client that is logged in
    already goes on transferring and the device stays online."""
    device: FieldDevice = proxy.device  # type: ignore[attr-defined]
    ftp = ftplib.FTP(source_address=("127.0.0.200", 0))
    ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
    ftp.login(f"{device.prefix}_user", "pw")  # logged in before the flood
    junk = [raw(proxy, f"127.0.1.{n}") for n in range(40)]
    for s in junk:
        assert s.recv(100).startswith(b"220")
    late = raw(proxy, "127.0.2.1")
    assert late.recv(100).startswith(b"421 This node is busy")
    late.close()
    phone = socket.create_connection(("127.0.0.1", proxy.device_port), timeout=10,
                                     source_address=("127.0.2.2", 0))
    reply = request(phone, {"action": "login", "android_id": "late-phone"})
    assert reply["error_code"] == 0 and "busy" in reply["error_string"]
    phone.close()
    got = io.BytesIO()
    ftp.retrbinary("RETR f", got.write)  # the logged-in client is not affected
    assert sha(got.getvalue()) == sha(device.files["f"])
    ftp.quit()
    for s in junk:
        s.close()
    wait_until(lambda: proxy.run(lambda n: n.guard.pending) == 0, 10, "the junk gone")
    normal_client(proxy)
    refused = proxy.run(lambda n: n.stats.refused["too many connections not logged in on this node"])
    assert refused == 2


@pytest.mark.parametrize("proxy", [{"guess_max_failures": 10, "max_login_failures": 3}], indirect=True)
def test_a_lockout_closes_the_connections_the_guesser_opened_first(proxy: ProxyThread) -> None:
    """64 connections first, then guesses on all of them: the lockout after the 10th
    failure closes the others too (it used to allow 174 guesses), and the failures
    are remembered past it."""
    conns = [raw(proxy, "127.0.0.9") for _ in range(64)]
    files = [c.makefile("rb") for c in conns]
    for f in files:
        assert f.readline().startswith(b"220")
    answered = closed = 0
    for n, (c, f) in enumerate(zip(conns, files, strict=True)):
        try:
            c.sendall(f"USER zz{n:03d}_x\r\n".encode())
            line = f.readline()
        except OSError:
            line = b""
        if line.startswith(b"530"):
            answered += 1
        else:
            assert line.startswith(b"421 Too many failed logins") or not line
            closed += 1
    print(f"\n64 connections opened first: {answered} guesses answered, {closed} closed")
    assert answered == 9 and closed == 64 - 9  # the 10th failure locks: no answer to it
    for f in files:
        f.close()
    for c in conns:
        c.close()
    normal_client(proxy)


@pytest.mark.parametrize("proxy", [{"guess_rate": 5, "guess_max_failures": 1000}], indirect=True)
def test_guessing_spread_over_many_addresses_gets_the_node_wide_budget(proxy: ProxyThread) -> None:
    """100 addresses guessing at once get about guess_rate (5/s here) answered failures
    per second in all, plus its burst: the rest are refused before any lookup."""
    answered = []
    lock = threading.Lock()
    stop = time.monotonic() + 3

    def guesser(n: int) -> None:
        while time.monotonic() < stop:
            try:
                s = raw(proxy, f"127.0.3.{n}")
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"USER qqqqq_x\r\n")
                line = f.readline()
                f.close()
                s.close()
            except OSError:
                continue
            if line.startswith(b"530"):
                with lock:
                    answered.append(time.monotonic())

    threads = [threading.Thread(target=guesser, args=(n,)) for n in range(1, 101)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    seconds = time.monotonic() - began
    print(f"\n100 addresses for {seconds:.1f} s: {len(answered)} guesses answered "
          f"({len(answered) / seconds:.1f}/s)")
    assert len(answered) <= 5 * seconds + 10 + 100  # rate, burst, and one each as newcomers
    assert len(answered) / seconds < 5 + 100 / seconds  # not the hundreds a second of before
    assert proxy.run(lambda n: n.stats.refused["node-wide guess budget spent"]) > 0
    normal_client(proxy, source="127.0.0.201")


@pytest.mark.parametrize("proxy", [{"guess_max_failures": 3}], indirect=True)
def test_wrong_passwords_the_device_refuses_count(proxy: ProxyThread) -> None:
    """A device's 530 to PASS is a failed guess too: three lock the address out."""
    device: FieldDevice = proxy.device  # type: ignore[attr-defined]
    device.password = "right"  # the field device now checks it
    for attempt in range(3):
        ftp = ftplib.FTP(source_address=("127.0.0.11", 0))
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
        try:
            # the third locks the address out: its own connection is closed with a 421
            expected = (ftplib.error_perm, "530") if attempt < 2 else (ftplib.error_temp, "421 Too many")
            with pytest.raises(expected[0], match=expected[1]):
                ftp.login(f"{device.prefix}_user", "wrong")
        finally:
            ftp.close()
    s = raw(proxy, "127.0.0.11")
    assert s.recv(100).startswith(b"421 Too many failed logins")
    s.close()
    assert proxy.run(lambda n: n.stats.login_failures) == 3
    device.password = None
    normal_client(proxy)


def test_refusals_are_logged_as_a_summary(proxy: ProxyThread, caplog: pytest.LogCaptureFixture) -> None:
    """300 refused connections make one line at once and one summary line, with the
    count and the address behind them: not 300 lines."""
    caplog.set_level(logging.INFO, logger="swiftftp")
    limit = proxy.run(lambda n: n.settings.max_connections_per_ip)
    held = [raw(proxy, "127.0.0.12") for _ in range(limit)]
    for s in held:
        assert s.recv(100).startswith(b"220")
    for _ in range(300):
        s = raw(proxy, "127.0.0.12")
        assert s.recv(100).startswith(b"421")
        s.close()
    proxy.run(lambda n: n.refusals.flush())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert "count=299" in lines[1] and "127.0.0.12 x299" in lines[1]
    for s in held:
        s.close()
    normal_client(proxy)


def test_memory_stays_bounded_under_a_flood(proxy: ProxyThread) -> None:
    """5,000 connections that guess once and go, from 250 addresses: the node's per-address
    books stay small and the process does not grow by more than a few MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for n in range(5000):
        try:
            s = raw(proxy, f"127.0.{4 + n % 250 // 250}.{1 + n % 250}")
            s.sendall(b"USER aaaaa_x\r\nQUIT\r\n")
            s.close()
        except OSError:
            pass
    wait_until(lambda: proxy.run(lambda n: n.guard.pending) == 0, 20, "the flood gone")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    books = proxy.run(lambda n: (len(n.guard._failures._times), len(n.guard.connections)))
    print(f"\nafter 5000 connections: grown {grown:.1f} MiB, books {books}")
    assert books[0] <= 250 and books[1] == 0
    assert grown < 30
    normal_client(proxy)
