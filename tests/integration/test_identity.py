"""Device proof of identity and the TLS device port, with real parts: a node, a
``swiftftp-agent`` process with pyftpdlib behind it, ftplib moving files both ways,
strangers speaking the JSON protocol from raw sockets, the CLI as operators run it.

Strangers connect from 127.0.0.2 and 127.0.0.3 (loopback too), so that the lockout
their failures earn does not touch the agent on 127.0.0.1."""

from __future__ import annotations

import ftplib
import io
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from swiftftp.identity import DeviceKey, b64, fingerprint, load_or_create_key, unb64
from tests import tlscerts
from tests.fielddevice import FieldDevice
from tests.helpers import fd_targets, sha256, wait_for_fds, wait_until
from tests.stack import FTP_PASSWORD, FTP_USER, AgentProcess, FtpServerThread, ProxyThread, node_settings

GUESSES = 4  # the node's guess_max_failures here


@dataclass
class Site:
    proxy: ProxyThread
    ftpd: FtpServerThread
    agent: AgentProcess
    state: Path  # the agent's
    node_state: Path

    @property
    def prefix(self) -> str:
        return self.agent.prefix

    @property
    def device_id(self) -> str:
        return (self.state / "agent-device-id").read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_site(tmp_path: Path, *, tls: tlscerts.Certs | None = None, ca: bytes | None = None) -> Site:
    root = tmp_path / "root"
    root.mkdir()
    overrides: dict = {"guess_max_failures": GUESSES, "guess_lockout": 600}
    extra: list[str] = []
    if tls is not None:
        (tmp_path / "node.pem").write_bytes(tls.chain)
        (tmp_path / "node.key").write_bytes(tls.key)
        (tmp_path / "ca.pem").write_bytes(ca or tls.ca)
        overrides |= {"tls_certificate": tmp_path / "node.pem", "tls_key": tmp_path / "node.key",
                      "tls_device_port": free_port(), "relay_backend": "rust"}
        extra = ["--tls", "--ca", str(tmp_path / "ca.pem")]
    proxy = ProxyThread(node_settings(tmp_path / "node", **overrides))
    ftpd = FtpServerThread(root)
    port = proxy.node.tls_device_port if tls is not None else None
    try:
        agent = AgentProcess(proxy, "127.0.0.1", ftpd.port, tmp_path / "agent", port=port, extra=extra,
                             wait=ca is None)
    except BaseException:
        ftpd.close()
        proxy.close()
        raise
    return Site(proxy, ftpd, agent, tmp_path / "agent", tmp_path / "node")


def close_site(site: Site) -> None:
    site.agent.close()
    site.ftpd.close()
    site.proxy.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    started = start_site(tmp_path)
    try:
        yield started
    finally:
        close_site(started)


# ---- a stranger: the JSON protocol from a raw socket -------------------------------------


class Stranger:
    """One connection to the node's device port from ``source``, speaking JSON."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.buf = ""

    def send(self, *messages: dict) -> None:
        self.sock.sendall(b"".join(json.dumps(m).encode() for m in messages))

    def recv(self) -> dict:
        decoder = json.JSONDecoder()
        while True:
            text = self.buf.lstrip()
            if text:
                try:
                    obj, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buf = text[end:]
                    return obj
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("node closed")
            self.buf += data.decode()

    def closed(self) -> bool:
        """The node closed the connection (after its last reply)."""
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def login(android_id: str, **more: object) -> dict:
    return {"action": "login", "android_id": android_id, "swiftp_version": "2.16"} | more


def refused(port: int, source: str, *messages: dict) -> str:
    """Send ``messages`` at once; the error 16 the node answers (its text), then closes."""
    stranger = Stranger(port, source)
    try:
        stranger.send(*messages)
        reply = stranger.recv()
        assert reply.get("error_code") == 16, reply
        assert stranger.closed()
        return reply["error_string"]
    finally:
        stranger.close()


# ---- FTP through the node ------------------------------------------------------------------


def round_trip(site: Site, *, passive: bool, name: str) -> None:
    """STOR then RETR 1 MiB of random bytes, SHA-256 compared both ways."""
    data = os.urandom(1 << 20)
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", site.proxy.ftp_port, timeout=20)
    try:
        ftp.login(f"{site.prefix}_{FTP_USER}", FTP_PASSWORD)
        ftp.set_pasv(passive)
        ftp.storbinary(f"STOR {name}", io.BytesIO(data))
        assert sha256((site.ftpd.root / name).read_bytes()) == sha256(data)  # upload arrived whole
        back = io.BytesIO()
        ftp.retrbinary(f"RETR {name}", back.write)
        assert sha256(back.getvalue()) == sha256(data)  # and came back whole
        ftp.quit()
    finally:
        ftp.close()


def cli(site: Site, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from swiftftp.cli import proxy_main; sys.exit(proxy_main())"
    return subprocess.run([sys.executable, "-c", code, "devices", "--state-dir", str(site.node_state), *args],
                          capture_output=True, text=True, timeout=60)


def failures(site: Site) -> int:
    return site.proxy.run(lambda node: node.stats.login_failures)


def baseline(site: Site) -> tuple[int, dict[int, str]]:
    return site.proxy.quiet_tasks(), fd_targets()


def settle(site: Site, base: tuple[int, dict[int, str]]) -> None:
    tasks, fds = base
    wait_until(lambda: site.proxy.quiet_tasks() == tasks, 10, "the node's tasks back to the baseline")
    wait_for_fds(fds)


# ---- the tests -------------------------------------------------------------------------------


def test_agent_binds_its_key_at_first_login_and_moves_files(site: Site, tmp_path: Path) -> None:
    """The agent made a key (0600) at its first start; the node bound it to the device id;
    transfers (each a data connection with its own login, by token) work both ways; a
    restarted agent logs in with the bound key and keeps its prefix."""
    key_file = site.state / "agent-device-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key, made = load_or_create_key(site.state)
    assert not made
    assert site.proxy.run(lambda node: node.registry.key_of(site.device_id)) == key.public
    base = baseline(site)
    round_trip(site, passive=True, name="up-passive.bin")
    round_trip(site, passive=False, name="up-active.bin")
    settle(site, base)
    assert failures(site) == 0
    prefix = site.prefix
    assert site.agent.close() == 0
    site.agent = AgentProcess(site.proxy, "127.0.0.1", site.ftpd.port, site.state)
    assert site.agent.prefix == prefix
    round_trip(site, passive=True, name="again.bin")
    assert failures(site) == 0
    done = cli(site, "show", prefix)
    assert done.returncode == 0, done.stderr
    assert f"bound to key {fingerprint(key.public)}" in done.stdout


def test_stranger_knowing_a_bound_id_cannot_log_in(site: Site) -> None:
    """Without the key (none, another one, the right public key but no signature, a
    made-up token), a login with the agent's id gets error 16 on every kind of
    connection; the agent keeps its session and serves; the failures count towards
    the address's lockout, which then refuses at once."""
    node_port, device_id = site.proxy.device_port, site.device_id
    command = site.proxy.run(lambda node: node.online(site.prefix).command)
    base = baseline(site)
    public = load_or_create_key(site.state)[0].public
    assert "bound to a key" in refused(node_port, "127.0.0.2", login(device_id),
                                       {"action": "start_command_session"})
    assert "another key" in refused(node_port, "127.0.0.2", login(device_id, key=DeviceKey.generate().public),
                                    {"action": "start_command_session"})
    assert "session token not valid" in refused(
        node_port, "127.0.0.2", login(device_id, token=b64(os.urandom(32))), {"action": "data_pasv_listen"})
    # the public key is no secret: knowing it is not enough to answer the challenge
    stranger = Stranger(node_port, "127.0.0.2")
    try:
        stranger.send(login(device_id, key=public))
        challenge = unb64(stranger.recv()["challenge"], 32)
        forged = DeviceKey.generate().sign(device_id, challenge)
        stranger.send({"action": "login_proof", "signature": forged})
        reply = stranger.recv()
        assert reply["error_code"] == 16 and "signature not valid" in reply["error_string"], reply
    finally:
        stranger.close()
    assert failures(site) == GUESSES
    # locked out now: refused without a challenge (and a data connection too)
    assert "too many failed logins" in refused(node_port, "127.0.0.2", login(device_id, key=public))
    assert "too many failed logins" in refused(node_port, "127.0.0.2", login(device_id),
                                               {"action": "data_port_connect", "address": "127.0.0.2",
                                                "port": 5000})
    # the device kept its session, and serves
    assert site.proxy.run(lambda node: node.online(site.prefix).command) is command
    round_trip(site, passive=True, name="still.bin")
    settle(site, base)
    assert "error" not in " ".join(site.agent.logs).lower()


def test_unbind_then_a_keyless_login_is_accepted(site: Site) -> None:
    """``devices unbind`` (the node running) forgets the key: a login without one is
    accepted; the agent's running session goes on; its next login binds its key again."""
    device_id, prefix = site.device_id, site.prefix
    assert "bound to a key" in refused(site.proxy.device_port, "127.0.0.3", login(device_id))
    done = cli(site, "unbind", prefix)
    assert done.returncode == 0, done.stderr
    public = load_or_create_key(site.state)[0].public
    assert done.stdout.startswith(f"{prefix}: unbound from key {fingerprint(public)}")
    assert "not bound" in cli(site, "show", device_id).stdout
    assert cli(site, "unbind", prefix).stdout == f"{prefix}: not bound to a key; nothing to do\n"
    stranger = Stranger(site.proxy.device_port, "127.0.0.3")
    try:
        stranger.send(login(device_id))
        assert stranger.recv() == {}
    finally:
        stranger.close()
    round_trip(site, passive=False, name="after-unbind.bin")  # its token still works…
    assert "not bound" in cli(site, "show", prefix).stdout  # …and binds nothing
    assert site.agent.close() == 0
    site.agent = AgentProcess(site.proxy, "127.0.0.1", site.ftpd.port, site.state)
    assert site.agent.prefix == prefix
    assert f"bound to key {fingerprint(public)}" in cli(site, "show", prefix).stdout


def test_field_device_without_a_key_is_unchanged(site: Site) -> None:
    """A device without a key logs in as before, is never bound, and serves."""
    device = FieldDevice(site.proxy.device_port, android_id="f1e1d-no-key", files={"a.txt": b"field"})
    device.start()
    try:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", site.proxy.ftp_port, timeout=20)
        ftp.login(f"{device.prefix}_user", "pw")
        back = io.BytesIO()
        ftp.retrbinary("RETR a.txt", back.write)
        assert back.getvalue() == b"field"
        ftp.quit()
    finally:
        device.stop()
    assert not device.errors
    assert site.proxy.run(lambda node: node.registry.key_of("f1e1d-no-key")) is None
    assert "not bound" in cli(site, "show", device.prefix).stdout


def test_agent_over_tls_verifies_the_node(tmp_path: Path) -> None:
    """The agent dials the TLS device port and checks the node's certificate against
    the test's CA; every connection of its (command session, rendezvous, data) is TLS;
    files move both ways. Field devices stay on the plain port."""
    certs = tlscerts.make()
    site = start_site(tmp_path, tls=certs)
    try:
        base = baseline(site)

        def agent_fds() -> int:  # the agent's TLS pumps and socket pairs end with their connections
            return len(os.listdir(f"/proc/{site.agent.proc.pid}/fd"))

        agent_base = agent_fds()
        assert site.proxy.run(lambda node: node.online(site.prefix).command.tls)
        round_trip(site, passive=True, name="tls-passive.bin")
        round_trip(site, passive=False, name="tls-active.bin")
        settle(site, base)
        wait_until(lambda: agent_fds() <= agent_base, 10, "the agent's descriptors back to its baseline")
        assert failures(site) == 0
        device = FieldDevice(site.proxy.device_port, android_id="plain-beside-tls").start()
        assert device.prefix
        device.stop()
    finally:
        close_site(site)


def test_agent_refuses_a_node_whose_certificate_does_not_verify(tmp_path: Path) -> None:
    """A node whose certificate is not from the CA the agent was given: one clear line,
    no URL, the agent retries like after any other connection failure."""
    certs = tlscerts.make()
    site = start_site(tmp_path, tls=certs, ca=tlscerts.make().ca)
    try:
        line = site.agent.logged("command session to", timeout=20)
        # (both test CAs have the same name: OpenSSL finds the issuer, not its signature)
        port = site.proxy.node.tls_device_port
        assert line.endswith(f"command session to 127.0.0.1:{port} ended: the node's TLS certificate "
                             "does not verify: certificate signature failure"), line
        assert site.agent.proc.poll() is None and not site.agent.urls
        assert site.proxy.run(lambda node: node.command_sessions) == 0
    finally:
        assert site.agent.close() == 0
        site.ftpd.close()
        site.proxy.close()


def test_stranger_on_a_rendezvous_port_is_refused(tmp_path: Path) -> None:
    """A bound device's rendezvous (a client's control connection) takes only a login
    that shows the command session's token: a stranger from the device's own address
    who connects to the announced port first, keyless or with a made-up token, gets
    error 16, and the device's own login there still goes through."""
    import concurrent.futures

    proxy = ProxyThread(node_settings(tmp_path / "node", guess_max_failures=GUESSES))
    key, device_id = DeviceKey.generate(), "keyed-test-device"
    device = Stranger(proxy.device_port, "127.0.0.1")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        device.send(login(device_id, key=key.public, json_stream=True))
        challenge = unb64(device.recv()["challenge"], 32)
        device.send({"action": "login_proof", "signature": key.sign(device_id, challenge)})
        assert device.recv() == {}
        device.send({"action": "start_command_session"})
        started = device.recv()
        prefix, token = started["prefix"], started["token"]
        assert proxy.run(lambda node: node.registry.key_of(device_id)) == key.public

        def client() -> str:
            ftp = ftplib.FTP()
            ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
            try:
                ftp.sendcmd(f"USER {prefix}_bob")
            except ftplib.error_perm as exc:
                return str(exc)
            finally:
                ftp.close()
            return "no error"

        answered = pool.submit(client)
        waiting = device.recv()
        assert waiting["action"] == "control_connection_waiting", waiting
        port = waiting["port"]
        assert "bound to a key" in refused(port, "127.0.0.1", login(device_id))
        made_up = login(device_id, token=b64(os.urandom(32)))
        assert "session token not valid" in refused(port, "127.0.0.1", made_up)
        own = Stranger(port, "127.0.0.1")
        try:
            own.send(login(device_id, token=token, json_stream=True))
            assert own.recv() == {}
            line = b""
            while not line.endswith(b"\n"):
                line += own.sock.recv(100)
            assert line == b"USER bob\r\n"
            own.sock.sendall(b"530 Not this time.\r\n")
        finally:
            own.close()
        assert answered.result(20) == "530 Not this time."
        assert proxy.run(lambda node: node.stats.refused["device identity not proven"]) == 2
    finally:
        pool.shutdown()
        device.close()
        proxy.close()


def test_a_node_starts_on_a_registry_from_before_device_keys(tmp_path: Path) -> None:
    """A registry file of an earlier version (no key columns) is migrated at start: its
    devices keep their prefixes, and are not bound."""
    import sqlite3

    from tests.unit.test_registry import OLD_SCHEMA

    state = tmp_path / "node"
    state.mkdir()
    db = sqlite3.connect(state / "registry.sqlite3")
    db.executescript(OLD_SCHEMA.replace("old-phone", "f1e1dd-old").replace("oldph", "oldpx"))
    db.close()
    proxy = ProxyThread(node_settings(state))
    try:
        device = FieldDevice(proxy.device_port, android_id="f1e1dd-old").start()
        assert device.prefix == "oldpx"
        device.stop()
        assert not device.errors
    finally:
        proxy.close()
    code = "import sys; from swiftftp.cli import proxy_main; sys.exit(proxy_main())"
    done = subprocess.run([sys.executable, "-c", code, "devices", "--state-dir", str(state), "show", "oldpx"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "not bound" in done.stdout and "quota" in done.stdout


def test_a_tls_device_port_with_an_unusable_certificate_stops_the_node(tmp_path: Path) -> None:
    """One line naming the setting; no registry left open, nothing listening."""
    from swiftftp.errors import ConfigError
    from swiftftp.node import ProxyNode

    certs = tlscerts.make()
    (tmp_path / "expired.pem").write_bytes(certs.expired)
    (tmp_path / "node.key").write_bytes(certs.key)
    from swiftftp import relay

    relay.get_backend("rust")  # its engine's threads and epoll fds: for the whole process
    base = fd_targets()
    settings = node_settings(tmp_path / "node", tls_device_port=free_port(), relay_backend="rust",
                             tls_certificate=tmp_path / "expired.pem", tls_key=tmp_path / "node.key")
    with pytest.raises(ConfigError) as info:
        ProxyNode(settings)
    assert str(info.value).startswith(f"tls.certificate: {tmp_path / 'expired.pem'} with ")
    assert str(info.value).endswith("certificate expired on 2001-01-01 00:00:00 UTC")
    assert "\n" not in str(info.value)
    from dataclasses import replace

    (tmp_path / "node.pem").write_bytes(certs.chain)
    with pytest.raises(ConfigError, match="the python relay cannot terminate TLS"):
        ProxyNode(replace(settings, relay_backend="python", tls_certificate=tmp_path / "node.pem"))
    wait_for_fds(base)


def test_a_silent_device_on_the_tls_port_is_closed(tmp_path: Path) -> None:
    """Over TLS the node's socket towards the session is the relay's, whose
    acknowledgements say nothing of the device's: a command session there that sends
    nothing for three times the agent's noop interval (45 s), or three keepalives if
    longer, is closed, as an unacknowledged noop closes a plain one. (The keepalive
    wheel is driven here with a clock moved on: ``tick(now)``.)"""
    import ssl

    from swiftftp.command import DEVICE_NOOP_INTERVAL

    certs = tlscerts.make()
    (tmp_path / "node.pem").write_bytes(certs.chain)
    (tmp_path / "node.key").write_bytes(certs.key)
    proxy = ProxyThread(node_settings(
        tmp_path / "node", tls_certificate=tmp_path / "node.pem", tls_key=tmp_path / "node.key",
        tls_device_port=free_port(), relay_backend="rust"))
    context = ssl.create_default_context(cadata=certs.ca.decode())
    raw = socket.create_connection(("127.0.0.1", proxy.node.tls_device_port), timeout=10)
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(json.dumps(login("silent-tls-device", json_stream=True)).encode())
            assert json.loads(tls.recv(4096)) == {}
            tls.sendall(b'{"action": "start_command_session"}')
            prefix = json.loads(tls.recv(4096))["prefix"]
            session = proxy.run(lambda node: node.online(prefix).command)
            heard = session.last_recv
            silence = 3 * max(proxy.node.settings.keepalive_interval, DEVICE_NOOP_INTERVAL)
            assert proxy.run(lambda node: session.tick(heard + silence - 1)) is not None
            assert proxy.run(lambda node: node.command_sessions) == 1
            assert proxy.run(lambda node: session.tick(heard + silence + 1)) is None
            assert proxy.run(lambda node: node.command_sessions) == 0
            tls.settimeout(10)
            while tls.recv(4096):  # the noop the first tick sent, then the close
                pass
    finally:
        raw.close()
        proxy.close()


def test_sighup_reloads_the_tls_device_certificate(tmp_path: Path) -> None:
    """A renewed certificate (here: from another CA) is used for new TLS connections
    once the node reloads; a pair that does not load is logged and the old one stays."""
    import ssl

    old, new = tlscerts.make(), tlscerts.make()
    (tmp_path / "node.pem").write_bytes(old.chain)
    (tmp_path / "node.key").write_bytes(old.key)
    proxy = ProxyThread(node_settings(
        tmp_path / "node", tls_certificate=tmp_path / "node.pem", tls_key=tmp_path / "node.key",
        tls_device_port=free_port(), relay_backend="rust"))

    def handshake(ca: bytes) -> str:
        context = ssl.create_default_context(cadata=ca.decode())
        try:
            with socket.create_connection(("127.0.0.1", proxy.node.tls_device_port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost"):
                return "ok"
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message

    try:
        assert handshake(old.ca) == "ok"
        (tmp_path / "node.pem").write_bytes(new.chain)
        (tmp_path / "node.key").write_bytes(new.key)
        proxy.run(lambda node: node.reload_tls())
        assert handshake(new.ca) == "ok"
        assert handshake(old.ca) != "ok"
        (tmp_path / "node.pem").write_bytes(new.expired)  # a bad renewal: the good pair stays
        proxy.run(lambda node: node.reload_tls())
        assert handshake(new.ca) == "ok"
    finally:
        proxy.close()
