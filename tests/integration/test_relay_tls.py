"""FTPS in the Rust relay: TLS data connections through ``start(tls=...)``,
control connections through ``wrap_tls``, session resumption with tags,
certificate errors and reload. Python's ``ssl`` is the client.

Rust backend only (the Python backend refuses TLS, which is tested too).
Every test leaves the process's fds and threads as it found them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from swiftftp import relay
from tests.helpers import fd_targets, recv_all, run, sha256, tcp_pair, threads, wait_for_fds
from tests.tlscerts import Certs, make

pytest.importorskip("cryptography")

VERSIONS = {"tls13": ssl.TLSVersion.TLSv1_3, "tls12": ssl.TLSVersion.TLSv1_2}


@pytest.fixture(scope="module")
def certs() -> Certs:
    return make()


@pytest.fixture(scope="module")
def backend() -> relay.Backend:
    return relay.get_backend("rust")


@pytest.fixture
def config(backend, certs: Certs):
    return backend.tls_config(certs.chain, certs.key)


@pytest.fixture(autouse=True)
def no_leaks(backend) -> Iterator[None]:
    """fds and threads back to where they were after each test."""
    fds, nthreads = fd_targets(), threads()
    yield
    wait_for_fds(fds)
    deadline = time.monotonic() + 10
    while threads() > nthreads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == nthreads


def client_context(certs: Certs, version: str = "tls13") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=certs.ca.decode())
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


class BioClient:
    """A TLS client over a blocking socket through an ``SSLObject``, which
    (unlike ``SSLSocket``) can send close_notify and go on reading."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost", session=session)

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _do(self, fn):
        while True:
            try:
                result = fn()
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def client_hello(self) -> bytes:
        """Start the handshake; the bytes to send (not sent)."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def handshake(self) -> None:
        self._do(self.obj.do_handshake)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = view[: 1 << 16]
            n = self._do(lambda chunk=chunk: self.obj.write(chunk))
            view = view[n:]

    def recv(self, n: int = 1 << 16) -> bytes:
        try:
            return self._do(lambda: self.obj.read(n))
        except ssl.SSLZeroReturnError:
            return b""

    def recv_all(self) -> bytes:
        chunks = []
        while chunk := self.recv():
            chunks.append(chunk)
        return b"".join(chunks)

    def close_write(self) -> None:
        """close_notify, then FIN; reading goes on."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)


async def tls_pair(backend, config, **kw):
    """TLS client socket <-> [relay, TLS ends] <-> plain server: (client, server, handle)."""
    client, relay_a = tcp_pair()
    relay_b, server = tcp_pair()
    handle = backend.start(relay_a, relay_b, tls=config, **kw)
    return client, server, handle


@pytest.mark.parametrize("version", ["tls13", "tls12"])
def test_64mib_each_way_intact(backend, config, certs: Certs, version: str) -> None:
    size = 64 << 20
    up_data, down_data = os.urandom(size), os.urandom(size)
    ctx = client_context(certs, version)

    async def stor() -> None:
        client, server, handle = await tls_pair(backend, config)

        def send() -> None:
            c = BioClient(client, ctx)
            c.handshake()
            c.sendall(up_data)
            c.close_write()
            assert c.recv_all() == b""
            client.close()

        sender = asyncio.create_task(asyncio.to_thread(send))
        got = await asyncio.to_thread(recv_all, server)
        server.close()
        await sender
        assert sha256(got) == sha256(up_data)
        assert await handle == (size, 0)
        assert handle.tls_path == "rustls"
        info = handle.tls_info()
        assert info["version"] == {"tls13": "TLSv1_3", "tls12": "TLSv1_2"}[version]
        assert "AES_128_GCM" in info["cipher"]

    async def retr() -> None:
        client, server, handle = await tls_pair(backend, config)

        def receive() -> bytes:
            tls = ctx.wrap_socket(client, server_hostname="localhost")
            data = recv_all(tls)  # ends at the relay's close_notify
            tls.close()
            return data

        def send() -> None:
            server.sendall(down_data)
            server.shutdown(socket.SHUT_WR)
            assert recv_all(server) == b""
            server.close()

        got, _ = await asyncio.gather(asyncio.to_thread(receive), asyncio.to_thread(send))
        assert sha256(got) == sha256(down_data)
        result = await handle
        assert result == (0, size)

    run(stor(), timeout=120)
    run(retr(), timeout=120)


def test_half_close_request_then_response(backend, config, certs: Certs) -> None:
    """close_notify from the client is EOF at the server; the response still flows,
    and the server's EOF comes to the client as close_notify."""

    async def main() -> None:
        client, server, handle = await tls_pair(backend, config)

        def talk() -> bytes:
            c = BioClient(client, client_context(certs))
            c.handshake()
            c.sendall(b"request")
            c.close_write()
            assert recv_all(server) == b"request"  # EOF after the bytes
            server.sendall(b"response after eof")
            server.close()
            data = c.recv_all()  # SSLZeroReturnError: a close_notify, not a bare EOF
            client.close()
            return data

        assert await asyncio.to_thread(talk) == b"response after eof"
        assert await handle == (len(b"request"), len(b"response after eof"))

    run(main())


def test_throttled_download_holds_its_rate(backend, config, certs: Certs) -> None:
    rate = 1_000_000

    async def main() -> float:
        bucket = backend.bucket(rate, rate / 50)
        client, server, handle = await tls_pair(backend, config, down=[bucket])
        stop = time.monotonic() + 30

        def feed() -> None:
            try:
                while time.monotonic() < stop:
                    server.sendall(b"d" * 65536)
            except OSError:
                pass

        feeder = asyncio.create_task(asyncio.to_thread(feed))

        def measure() -> float:
            tls = client_context(certs).wrap_socket(client, server_hostname="localhost")
            tls.recv(65536)  # first bytes: the clock starts
            t0, total = time.monotonic(), 0
            while (elapsed := time.monotonic() - t0) < 3.0:
                total += len(tls.recv(65536))
            tls.close()
            return total / elapsed

        measured = await asyncio.to_thread(measure)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        server.close()
        await feeder
        return measured

    measured = run(main())
    print(f"TLS relay limit {rate} B/s: measured {measured:.0f} B/s")
    assert abs(measured - rate) <= 0.05 * rate, measured


def test_idle_and_handshake_timeouts(backend, config, certs: Certs) -> None:
    async def main() -> None:
        # No ClientHello: the handshake timeout.
        client, server, handle = await tls_pair(backend, config, handshake_timeout=0.2)
        with pytest.raises(TimeoutError, match="TLS handshake timed out"):
            await handle
        client.close()
        server.close()
        # Handshake done, then silence: the idle timeout.
        client, server, handle = await tls_pair(backend, config, idle_timeout=0.3)
        tls = await asyncio.to_thread(
            client_context(certs).wrap_socket, client, server_hostname="localhost"
        )
        with pytest.raises(TimeoutError):
            await handle
        tls.close()
        server.close()

    run(main())


def test_cancel_closes_both(backend, config, certs: Certs) -> None:
    async def main() -> None:
        client, server, handle = await tls_pair(backend, config)

        def hello() -> ssl.SSLSocket:
            tls = client_context(certs).wrap_socket(client, server_hostname="localhost")
            tls.sendall(b"hello")
            assert server.recv(5) == b"hello"
            return tls

        tls = await asyncio.to_thread(hello)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.counters() == (5, 0)
        server.settimeout(10)
        assert await asyncio.to_thread(recv_all, server) == b""
        tls.close()
        server.close()

    run(main())


def test_garbage_instead_of_a_client_hello(backend, config) -> None:
    async def main() -> None:
        client, server, handle = await tls_pair(backend, config)
        client.sendall(b"USER anonymous\r\n")
        with pytest.raises(OSError, match="TLS handshake failed"):
            await handle
        client.close()
        server.close()

    run(main())


def _read_line(sock: socket.socket, pending: bytearray) -> bytes:
    while b"\r\n" not in pending:
        data = sock.recv(4096)
        if not data:
            raise EOFError
        pending += data
    line, _, rest = bytes(pending).partition(b"\r\n")
    pending[:] = rest
    return line


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined-client-hello"])
def test_wrap_tls_control_dialogue(backend, config, certs: Certs, pipelined: bool) -> None:
    """AUTH TLS, then a line dialogue both ways over the plaintext socket. A
    client that sends its ClientHello right behind AUTH TLS gets it relayed
    through ``initial``."""

    async def main() -> None:
        client, node = tcp_pair()

        def client_side() -> list[bytes]:
            c = BioClient(client, client_context(certs))
            hello = c.client_hello()
            client.sendall(b"AUTH TLS\r\n" + (hello if pipelined else b""))
            pending = bytearray()
            assert _read_line(client, pending) == b"234 AUTH TLS ok"
            if not pipelined:
                client.sendall(hello)
            c.incoming.write(bytes(pending))  # TLS bytes right behind the 234 line
            c.handshake()
            replies = []
            for command in (b"USER bob", b"PASS x", b"PBSZ 0"):
                c.sendall(command + b"\r\n")
                replies.append(c.recv())
            c.close_write()
            assert c.recv_all() == b""
            client.close()
            return replies

        talker = asyncio.create_task(asyncio.to_thread(client_side))
        pending = bytearray()
        assert await asyncio.to_thread(_read_line, node, pending) == b"AUTH TLS"
        await asyncio.to_thread(node.sendall, b"234 AUTH TLS ok\r\n")
        if pipelined:
            assert pending, "the ClientHello came with the command"
        node.setblocking(False)
        plain, handle = backend.wrap_tls(node, config, tag=b"ctl", initial=bytes(pending))
        assert node.fileno() == -1, "the socket went to the relay"
        assert not plain.getblocking()
        loop = asyncio.get_running_loop()
        lines = bytearray()
        for reply in (b"331 password", b"230 in", b"200 PBSZ=0"):
            while b"\r\n" not in lines:
                lines += await loop.sock_recv(plain, 4096)
            _, _, rest = bytes(lines).partition(b"\r\n")
            lines[:] = rest
            await loop.sock_sendall(plain, reply + b"\r\n")
        assert await loop.sock_recv(plain, 4096) == b"", "the client's close_notify is EOF"
        assert handle.tls_path == "rustls"
        plain.close()  # close_notify and close
        assert await talker == [b"331 password\r\n", b"230 in\r\n", b"200 PBSZ=0\r\n"]
        up, down = await handle
        assert up == len(b"USER bob\r\nPASS x\r\nPBSZ 0\r\n")
        assert down == len(b"331 password\r\n230 in\r\n200 PBSZ=0\r\n")

    run(main())


async def _control(backend, config, ctx: ssl.SSLContext, tag: bytes):
    """A control connection through wrap_tls with ``tag``; the client has read
    the greeting (so TLS 1.3 tickets are in). Returns (client tls, plain, handle)."""
    client, node = tcp_pair()
    node.setblocking(False)
    plain, handle = backend.wrap_tls(node, config, tag=tag)
    loop = asyncio.get_running_loop()
    tls_task = asyncio.create_task(
        asyncio.to_thread(ctx.wrap_socket, client, server_hostname="localhost")
    )
    await loop.sock_sendall(plain, b"220 ready\r\n")
    tls = await tls_task
    assert await asyncio.to_thread(tls.recv, 100) == b"220 ready\r\n"
    return tls, plain, handle


async def _data(backend, config, ctx, session, require: bytes | None):
    """A PROT P data connection requiring ``require``: (session_reused, result or error)."""
    client, server, handle = await tls_pair(backend, config, require_tag=require)

    def transfer() -> bool:
        try:
            tls = ctx.wrap_socket(client, server_hostname="localhost", session=session)
        except (ssl.SSLError, OSError):
            client.close()
            return False
        reused = tls.session_reused
        try:
            tls.sendall(b"file")
            tls.unwrap()
        except (ssl.SSLError, OSError):
            pass
        tls.close()
        return reused

    def sink() -> bytes:
        data = recv_all(server)
        server.close()
        return data

    reused, got = await asyncio.gather(asyncio.to_thread(transfer), asyncio.to_thread(sink))
    try:
        outcome = await handle
    except OSError as exc:
        outcome = exc
    return reused, got, outcome, handle


@pytest.mark.parametrize("version", ["tls13", "tls12"])
def test_data_connections_resume_the_control_session(backend, config, certs: Certs, version: str) -> None:
    ctx = client_context(certs, version)

    async def main() -> None:
        tls1, plain1, h1 = await _control(backend, config, ctx, b"ctl-1")
        reused, got, outcome, handle = await _data(backend, config, ctx, tls1.session, b"ctl-1")
        assert reused and got == b"file" and outcome == (4, 0), outcome
        assert handle.tls_info()["resumed_tag"] == b"ctl-1"
        # Again: FTP clients resume the same session for every transfer.
        reused, got, outcome, _ = await _data(backend, config, ctx, tls1.session, b"ctl-1")
        assert reused and outcome == (4, 0)
        # A fresh handshake is refused ...
        reused, got, outcome, _ = await _data(backend, config, ctx, None, b"ctl-1")
        assert isinstance(outcome, PermissionError), outcome
        assert "TLS session not resumed from the control connection" in str(outcome)
        assert got == b""
        # ... and so is the session of another control connection.
        tls2, plain2, h2 = await _control(backend, config, ctx, b"ctl-2")
        reused, got, outcome, handle = await _data(backend, config, ctx, tls2.session, b"ctl-1")
        assert isinstance(outcome, PermissionError), outcome
        assert handle.tls_info()["resumed_tag"] == b"ctl-2"
        # Without require_tag, any handshake goes.
        reused, got, outcome, _ = await _data(backend, config, ctx, None, None)
        assert not reused and outcome == (4, 0)
        for tls, plain, h in ((tls1, plain1, h1), (tls2, plain2, h2)):
            tls.close()
            plain.close()
            await h

    run(main())


def test_bad_pairs_are_one_clear_line(backend, certs: Certs) -> None:
    cases = {
        "no certificate in the certificate PEM": (b"", certs.key),
        "no private key in the key PEM": (certs.chain, b""),
        "the private key does not match the certificate": (certs.chain, certs.other_key),
        "certificate expired on 2001-01-01 00:00:00 UTC": (certs.expired, certs.key),
        "certificate not valid before 2100-01-01 00:00:00 UTC": (certs.future, certs.key),
    }
    for message, (chain, key) in cases.items():
        with pytest.raises(ValueError) as info:
            backend.tls_config(chain, key)
        assert str(info.value) == message
    garbled = certs.chain.replace(b"MII", b"M!I", 1)
    with pytest.raises(ValueError, match=r"^bad certificate"):
        backend.tls_config(garbled, certs.key)
    config = backend.tls_config(certs.chain, certs.key)
    assert config.names == ["localhost", "ftp.example.test"]
    assert config.not_before < time.time() < config.not_after


def test_reload_swaps_the_certificate_for_new_handshakes(backend, config, certs: Certs) -> None:
    other = make(["other.example.test"])

    async def handshake(ctx: ssl.SSLContext, name: str) -> tuple[str, object]:
        client, server, handle = await tls_pair(backend, config)

        def connect() -> str:
            try:
                tls = ctx.wrap_socket(client, server_hostname=name)
            except ssl.SSLCertVerificationError as exc:
                client.close()
                return f"refused: {exc.verify_message}"
            cn = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            tls.close()
            return cn

        cn = await asyncio.to_thread(connect)
        server.close()
        try:
            await handle
        except OSError:
            pass
        return cn

    async def main() -> None:
        old_ctx = ssl.create_default_context(cadata=certs.ca.decode())
        new_ctx = ssl.create_default_context(cadata=other.ca.decode())
        # A session running across the reload keeps its certificate.
        client, server, running = await tls_pair(backend, config)
        tls = await asyncio.to_thread(old_ctx.wrap_socket, client, server_hostname="localhost")
        with pytest.raises(ValueError, match="expired"):
            config.reload(other.expired, other.key)
        assert await handshake(old_ctx, "localhost") == "localhost", "a bad pair changed nothing"
        config.reload(other.chain, other.key)
        assert config.names == ["other.example.test"]
        assert await handshake(new_ctx, "other.example.test") == "other.example.test"
        assert (await handshake(old_ctx, "localhost")).startswith("refused")
        await asyncio.to_thread(tls.sendall, b"still here")
        assert await asyncio.to_thread(server.recv, 100) == b"still here"
        server.close()
        assert await asyncio.to_thread(recv_all, tls) == b""
        tls.close()
        assert await running == (10, 0)

    run(main())


def test_python_backend_refuses_tls(certs: Certs) -> None:
    py = relay.get_backend("python")
    with pytest.raises(NotImplementedError, match="rust relay backend"):
        py.tls_config(certs.chain, certs.key)
    a, b = socket.socketpair()

    async def main() -> None:
        with pytest.raises(NotImplementedError, match="rust relay backend"):
            py.start(a, b, tls=object())
        with pytest.raises(NotImplementedError, match="rust relay backend"):
            py.wrap_tls(a, object())

    run(main())
    a.close()
    b.close()


def test_plain_sessions_have_no_tls_facts(backend) -> None:
    async def main() -> None:
        client, ra = tcp_pair()
        rb, server = tcp_pair()
        handle = backend.start(ra, rb)
        assert handle.tls_path is None and handle.tls_info() is None
        with pytest.raises(ValueError, match="need tls"):
            backend.start(*socket.socketpair(), require_tag=b"x")
        client.close()
        server.close()
        await handle

    run(main())


def test_kernel_tls_detection(backend) -> None:
    """kTLS is used when the kernel has the tls ULP; here it says why not."""
    from swiftftp import _splice

    with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
        listed = "tls" in f.read().split()
    status = backend.tls_status()
    if listed:
        assert _splice.ktls_available(), status
    if not _splice.ktls_available():
        assert "no kernel TLS" in status or "SWIFTFTP_KTLS" in status, status
    print(status)


def test_many_short_tls_sessions_leave_nothing_behind(backend, config, certs: Certs) -> None:
    ctx = client_context(certs)

    async def one() -> None:
        client, server, handle = await tls_pair(backend, config)

        def talk() -> None:
            tls = ctx.wrap_socket(client, server_hostname="localhost")
            tls.sendall(b"abc")
            assert server.recv(3) == b"abc"
            server.close()
            assert recv_all(tls) == b""
            tls.close()

        await asyncio.to_thread(talk)
        assert await handle == (3, 0)

    async def main() -> None:
        for _ in range(5):
            await asyncio.gather(*(one() for _ in range(20)))

    run(main(), timeout=120)
    assert threading.active_count() >= 1
