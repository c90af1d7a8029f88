"""The deployed device on the links phones have: 50, 100 and 200 ms each way
between node and device (tests/slowlink.py), and many clients at once.

The field-like device (tests/fielddevice.py) parses one object per read and
takes each ``control_connection_waiting`` on its command thread itself, so a
second message that reaches it while it does is lost: a login that hangs. The
node must pace by what the device has provably read, not by timers.
"""

from __future__ import annotations

import concurrent.futures
import ftplib
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fielddevice import FieldDevice
from tests.helpers import fd_targets, wait_for_fds, wait_until
from tests.slowlink import SlowLink
from tests.stack import ProxyThread, node_settings

CLIENTS = 16
#: Clients come from four addresses, four each: one address may hold only half of a
#: device's control slots while logging in (clients.py).
SOURCES = [f"127.0.0.{n}" for n in range(1, 5)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy(backend_name: str, tmp_path: Path) -> Iterator[ProxyThread]:
    # the defaults, but for loopback ports: rendezvous 30 s, device login 10 s
    node = ProxyThread(node_settings(
        tmp_path / "state", relay_backend=backend_name, rendezvous_timeout=30,
        device_login_timeout=10, pasv_accept_timeout=20, connect_timeout=10,
    ))
    try:
        yield node
    finally:
        node.close()


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2])
def test_sixteen_clients_at_once_over_a_slow_link(proxy: ProxyThread, delay: float) -> None:
    link = SlowLink(delay)
    files = {"photo.jpg": os.urandom(300_000)}
    device = FieldDevice(proxy.device_port, files=files, dial=link.dial).start()
    wait_until(lambda: proxy.run(lambda n: n.online(device.prefix) is not None), 10, "device online")
    tasks, fds = proxy.quiet_tasks(), fd_targets()
    start = threading.Barrier(CLIENTS, timeout=30)
    uploads = {f"up{i}.bin": os.urandom(200_000) for i in range(CLIENTS)}

    def client(i: int) -> tuple[float, str]:
        ftp = ftplib.FTP()
        ftp.trust_server_pasv_ipv4_address = True  # the 227 address must be the node's
        start.wait()
        began = time.monotonic()
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=90, source_address=(SOURCES[i % 4], 0))
        ftp.login(f"{device.prefix}_user{i}", "pw")
        logged_in = time.monotonic() - began
        got = io.BytesIO()
        ftp.retrbinary("RETR photo.jpg", got.write)
        name = f"up{i}.bin"
        ftp.storbinary(f"STOR {name}", io.BytesIO(uploads[name]))
        ftp.quit()
        return logged_in, sha(got.getvalue())

    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(client, range(CLIENTS)))
        assert [digest for _, digest in results] == [sha(files["photo.jpg"])] * CLIENTS
        for name, data in uploads.items():
            assert sha(device.files[name]) == sha(data), name
        assert not device.errors, device.errors
        waits = sorted(t for t, _ in results)
        print(f"\n{delay * 1000:.0f} ms each way: {CLIENTS}/{CLIENTS} logged in, "
              f"login p50 {waits[CLIENTS // 2]:.2f} s, last {waits[-1]:.2f} s")
        assert proxy.quiet_tasks() == tasks
        wait_for_fds(fds)
    finally:
        device.stop()
        link.close()
    assert not device.errors, device.errors
