"""FTPS through a node: explicit (AUTH TLS) and implicit, PROT P data connections in
passive and active mode, with curl, lftp and ftplib checking the certificate against
a CA the test made; pyftpdlib behind the agent sees plain FTP. Policies (TLS
required, data protection required, session reuse), a bad certificate pair at
start and in check-config, and a certificate reloaded on SIGHUP.

Rust relay only: the Python relay cannot terminate TLS (a node refuses to start
with it and a certificate; tested here too).
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.ftpservers import TOOLS, ensure_tools
from tests.helpers import wait_until
from tests.integration.conftest import Files, Stack
from tests.serveproc import Serve, clean_env, node_config
from tests.stack import FTP_PASSWORD, FTP_USER, AgentThread, FtpServerThread, ProxyThread, node_settings
from tests.tlscerts import Certs, make

pytest.importorskip("cryptography")

#: What the transfer tests move: LIST, 1 MiB and 64 MiB down, 16 MiB up.
RETRS = ["one-mib.bin", "big.bin"]


@pytest.fixture(scope="module")
def certs() -> Certs:
    return make()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    (directory / "ca.pem").write_bytes(certs.ca)
    (directory / "server.pem").write_bytes(certs.chain)
    (directory / "server.key").write_bytes(certs.key)
    (directory / "other.key").write_bytes(certs.other_key)
    (directory / "expired.pem").write_bytes(certs.expired)
    return directory


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, files: Files, pki: Path) -> Iterator[Stack]:
    import shutil

    base = tmp_path_factory.mktemp("ftps")
    root = base / "root"
    shutil.copytree(files.root, root)
    settings = node_settings(
        base / "proxy-state", relay_backend="rust", tls_certificate=pki / "server.pem",
        tls_key=pki / "server.key", tls_implicit_port=free_port(),
    )
    proxy = ProxyThread(settings)
    ftpd = FtpServerThread(root)
    agent = AgentThread(proxy, ftpd.port, base / "agent-state", "rust")
    try:
        yield Stack("rust", proxy, ftpd, agent, root)
    finally:
        agent.close()
        ftpd.close()
        proxy.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def context(pki: Path) -> ssl.SSLContext:
    """A client context that trusts only the test CA and checks the name."""
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


class ResumingFTP(ftplib.FTP_TLS):
    """ftplib's FTP_TLS resuming the control connection's TLS session on data
    connections, as FileZilla, lftp and curl do (stock ftplib does not)."""

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


class ForeignSessionFTP(ftplib.FTP_TLS):
    """Data connections resuming ``foreign``: another control connection's session."""

    foreign: ssl.SSLSession | None = None

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.foreign)
        return conn, size


def login_tls(stack: Stack, pki: Path, cls: type[ftplib.FTP_TLS] = ResumingFTP,
              ctx: ssl.SSLContext | None = None) -> ftplib.FTP_TLS:
    ftp = cls(context=ctx or context(pki), timeout=30)
    ftp.connect("127.0.0.1", stack.port)
    ftp.auth()
    ftp.login(f"{stack.prefix}_{FTP_USER}", FTP_PASSWORD)
    return ftp


# ---- transfers ---------------------------------------------------------------------------


def run_ftplib(stack: Stack, pki: Path, passive: bool, out: Path, upload: Path, upname: str) -> str:
    ftp = login_tls(stack, pki)
    ftp.prot_p()
    ftp.set_pasv(passive)
    lines: list[str] = []
    ftp.retrlines("LIST", lines.append)
    for name in RETRS:
        buf = io.BytesIO()
        ftp.retrbinary(f"RETR {name}", buf.write)
        (out / name).write_bytes(buf.getvalue())
    with upload.open("rb") as f:
        ftp.storbinary(f"STOR {upname}", f)
    ftp.quit()
    return "\n".join(lines)


def run_curl(stack: Stack, pki: Path, passive: bool, out: Path, upload: Path, upname: str) -> str:
    url = f"ftp://{stack.prefix}_{FTP_USER}:{FTP_PASSWORD}@127.0.0.1:{stack.port}/"
    base = [curl_for_active_ftps() if not passive else "curl", "--silent", "--show-error",
            "--max-time", "60", "--ssl-reqd", "--cacert", str(pki / "ca.pem")]
    if not passive:
        base += ["--ftp-port", "-"]

    def curl(*args: str) -> str:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, f"curl {args}: {done.returncode} {done.stderr}"
        return done.stdout

    listing = curl(url)
    for name in RETRS:
        curl("--output", str(out / name), url + name)
    curl("--upload-file", str(upload), url + upname)
    return listing


def run_lftp(stack: Stack, pki: Path, passive: bool, out: Path, upload: Path, upname: str) -> str:
    gets = "; ".join(f"get {name} -o {out / name}" for name in RETRS)
    script = (
        f"set ftp:passive-mode {'on' if passive else 'off'}; set net:max-retries 1; "
        "set net:timeout 20; set net:reconnect-interval-base 1; set xfer:clobber on; "
        "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ftp:ssl-protect-list true; "
        f"set ssl:ca-file {pki / 'ca.pem'}; set ssl:verify-certificate true; "
        f"open -u {stack.prefix}_{FTP_USER},{FTP_PASSWORD} -p {stack.port} 127.0.0.1; "
        f"cls -l; {gets}; put {upload} -o {upname}; bye"
    )
    done = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"lftp: {done.returncode} {done.stderr}"
    return done.stdout


CLIENTS = {"ftplib": run_ftplib, "curl": run_curl, "lftp": run_lftp}


def curl_version(curl: str = "curl") -> tuple[int, ...]:
    out = subprocess.run([curl, "--version"], capture_output=True, text=True, timeout=10).stdout
    return tuple(int(x) for x in out.split()[1].split(".")[:2])


def curl_for_active_ftps() -> str:
    """curl 7.88 (Debian 12) accepts an active FTPS data connection, then fails before
    its TLS handshake ("sa_addr inet_ntop() failed", curl issue #10622, fixed in 8.0;
    the same against ProFTPD mod_tls): then the curl 8 that scripts/install-ftp-tools
    unpacked from backports."""
    if curl_version() >= (8, 0):
        return "curl"
    ensure_tools()
    curl8 = TOOLS / "curl8" / "curl"
    assert curl_version(str(curl8)) >= (8, 0), f"{curl8} is not curl 8"
    return str(curl8)


@pytest.mark.parametrize("mode", ["passive", "active"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_ftps_transfers(tls_stack: Stack, files: Files, pki: Path, client: str, mode: str,
                        tmp_path: Path) -> None:
    stack = tls_stack
    baseline = stack.baseline()
    upname = f"up-{client}-{mode}.bin"
    listing = CLIENTS[client](stack, pki, mode == "passive", tmp_path, files.upload, upname)
    assert "big.bin" in listing
    for name in RETRS:
        assert digest(tmp_path / name) == digest(stack.root / name), f"RETR {name}"
    assert digest(stack.root / upname) == digest(files.upload), "STOR"
    stack.settle(baseline)


def test_implicit_ftps_with_curl(tls_stack: Stack, pki: Path, tmp_path: Path) -> None:
    stack = tls_stack
    baseline = stack.baseline()
    port = stack.proxy.node.implicit_port
    url = f"ftps://{stack.prefix}_{FTP_USER}:{FTP_PASSWORD}@127.0.0.1:{port}/"
    base = ["curl", "--silent", "--show-error", "--max-time", "60", "--cacert", str(pki / "ca.pem")]
    done = subprocess.run([*base, url], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "one-mib.bin" in done.stdout
    out = tmp_path / "one.bin"
    done = subprocess.run([*base, "--output", str(out), url + "one-mib.bin"],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert digest(out) == digest(stack.root / "one-mib.bin")
    stack.settle(baseline)


# ---- the node's own answers and policies -------------------------------------------------


def test_security_commands_answered_by_the_node(tls_stack: Stack, pki: Path) -> None:
    stack = tls_stack
    baseline = stack.baseline()
    ftp = login_tls(stack, pki)
    assert ftp.sendcmd("PBSZ 0") == "200 PBSZ=0"
    assert ftp.sendcmd("PROT C").startswith("200")
    assert ftp.sendcmd("PROT P").startswith("200")
    with pytest.raises(ftplib.error_perm, match=r"^536"):
        ftp.sendcmd("PROT S")
    with pytest.raises(ftplib.error_perm, match=r"^534"):
        ftp.sendcmd("CCC")
    with pytest.raises(ftplib.error_perm, match=r"^503"):
        ftp.sendcmd("AUTH TLS")
    feat = ftp.sendcmd("FEAT")
    assert " AUTH TLS" in feat and " PROT" in feat and " PBSZ" in feat, feat
    assert ftp.sendcmd("NOOP").startswith("200")  # replies still in step
    ftp.quit()
    stack.settle(baseline)


def set_policy(stack: Stack, **values: bool) -> None:
    """The policy is read at each connection: flip it on the running node."""

    def apply(node) -> None:
        for key, value in values.items():
            setattr(node.settings, key, value)

    stack.proxy.run(apply)


def test_plain_client_refused_when_tls_is_required(tls_stack: Stack) -> None:
    stack = tls_stack
    baseline = stack.baseline()
    set_policy(stack, tls_require=True)
    try:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", stack.port, timeout=30)
        with pytest.raises(ftplib.error_perm, match=r"^530 This proxy requires TLS"):
            ftp.login(f"{stack.prefix}_{FTP_USER}", FTP_PASSWORD)
        ftp.close()
        url = f"ftp://{stack.prefix}_{FTP_USER}:{FTP_PASSWORD}@127.0.0.1:{stack.port}/"
        done = subprocess.run(["curl", "--silent", "--max-time", "30", url], capture_output=True, timeout=60)
        assert done.returncode == 67  # CURLE_LOGIN_DENIED
    finally:
        set_policy(stack, tls_require=False)
    stack.settle(baseline)


def test_data_protection_required(tls_stack: Stack, pki: Path) -> None:
    stack = tls_stack
    baseline = stack.baseline()
    set_policy(stack, tls_require_data_protection=True)
    try:
        ftp = login_tls(stack, pki)
        with pytest.raises(ftplib.error_perm, match=r"^521"):
            ftp.nlst()
        ftp.prot_p()
        assert "one-mib.bin" in ftp.nlst()
        ftp.quit()
    finally:
        set_policy(stack, tls_require_data_protection=False)
    stack.settle(baseline)


def test_data_connection_of_another_tls_session_refused(tls_stack: Stack, pki: Path) -> None:
    """Stock ftplib starts a fresh TLS session on each data connection, and a client
    may offer another control connection's session: both refused while session reuse
    is required; a fresh session is taken when it is not."""
    stack = tls_stack
    baseline = stack.baseline()
    ftp = login_tls(stack, pki, ftplib.FTP_TLS)
    ftp.prot_p()
    with pytest.raises((ssl.SSLError, OSError, EOFError, ftplib.Error)):
        ftp.nlst()
    ftp.close()
    reason = "TLS data connection not resuming its control session"

    def refusals() -> int:  # counted when the relay's end reaches the loop
        return stack.proxy.run(lambda node: node.stats.refused.get(reason, 0))

    wait_until(lambda: refusals() >= 1, 10, "the refusal counted")
    refused = refusals()
    # The session of another control connection of the same client: refused too.
    shared = context(pki)
    other = login_tls(stack, pki, ResumingFTP, shared)
    other.prot_p()
    assert "one-mib.bin" in other.nlst()  # its session now holds tickets
    ftp = login_tls(stack, pki, ForeignSessionFTP, shared)
    assert isinstance(ftp, ForeignSessionFTP)
    ftp.foreign = other.sock.session
    ftp.prot_p()
    with pytest.raises((ssl.SSLError, OSError, EOFError, ftplib.Error)):
        ftp.nlst()
    ftp.close()
    other.quit()
    wait_until(lambda: refusals() > refused, 10, "the second refusal counted")
    set_policy(stack, tls_require_session_reuse=False)
    try:
        ftp = login_tls(stack, pki, ftplib.FTP_TLS)
        ftp.prot_p()
        assert "one-mib.bin" in ftp.nlst()
        ftp.quit()
    finally:
        set_policy(stack, tls_require_session_reuse=True)
    stack.settle(baseline)


# ---- start-up and reload -----------------------------------------------------------------


def tls_config(tmp_path: Path, cert: Path, key: Path, **node: str) -> Path:
    return node_config(tmp_path, f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n', **node)


@pytest.mark.parametrize("case", ["mismatched", "expired", "missing", "python relay"])
def test_bad_pair_is_one_line_at_start_and_in_check_config(pki: Path, tmp_path: Path, case: str) -> None:
    cert, key, node = pki / "server.pem", pki / "server.key", {}
    if case == "mismatched":
        key = pki / "other.key"
    elif case == "expired":
        cert = pki / "expired.pem"
    elif case == "missing":
        key = tmp_path / "nothing.key"
    else:
        node = {"relay": '"python"'}
    config = tls_config(tmp_path, cert, key, **node)
    expected = {"mismatched": "tls.certificate:", "expired": "tls.certificate:",
                "missing": "tls.key: cannot read", "python relay": "node.relay: the python relay"}[case]
    for command in ("serve", "check-config"):
        args = ["--config", str(config)] if command == "serve" else [str(config)]
        done = subprocess.run([sys.executable, "-m", "swiftftp", command, *args], capture_output=True,
                              text=True, timeout=30, env=clean_env())
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert expected in done.stderr, done.stderr


def served_certificate(port: int) -> bytes:
    """The DER certificate the node presents after AUTH TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220")
        sock.sendall(b"AUTH TLS\r\n")
        assert f.readline().startswith(b"234")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der
            return der


def test_sighup_reloads_the_certificate(tmp_path: Path) -> None:
    first, second = make(), make(["ftp2.example.test"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(first.chain)
    key.write_bytes(first.key)
    node = Serve("--config", str(tls_config(tmp_path, cert, key)))
    try:
        node.logged("certificate for localhost, ftp.example.test")
        node.logged("TLS aws-lc-rs")
        before = served_certificate(node.ftp_port)
        cert.write_bytes(b"not a certificate")  # a bad pair on reload: the old one stays
        node.send(signal.SIGHUP)
        node.logged("TLS certificate not reloaded, keeping the old one")
        assert served_certificate(node.ftp_port) == before
        cert.write_bytes(second.chain)
        key.write_bytes(second.key)
        node.send(signal.SIGHUP)
        node.logged("certificate for ftp2.example.test")
        after = served_certificate(node.ftp_port)
        assert after != before
        wait_until(lambda: served_certificate(node.ftp_port) == after, what="the new certificate")
        assert node.stop() == 0
    finally:
        node.kill()


def test_tls_settings_without_a_certificate_are_errors(tmp_path: Path) -> None:
    config = node_config(tmp_path, "[tls]\nrequire = true\nimplicit_port = 990\n")
    done = subprocess.run([sys.executable, "-m", "swiftftp", "check-config", str(config)],
                          capture_output=True, text=True, timeout=30, env=clean_env())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert all("needs tls.certificate and tls.key" in line for line in lines)


def test_settings_describe_round_trip() -> None:
    from swiftftp import config

    text = "\n".join(config.describe(replace(config.Settings(), tls_require=True)))
    assert "tls.require = true" in text and 'tls.certificate = ""' in text


# ---- the field device (the deployed phone's behaviour) -----------------------------------


@pytest.mark.parametrize("mode", ["passive", "active"])
def test_field_device_sees_plain_ftp(tmp_path: Path, pki: Path, mode: str) -> None:
    import os

    from tests.fielddevice import FieldDevice

    proxy = ProxyThread(node_settings(tmp_path / "state", relay_backend="rust",
                                      tls_certificate=pki / "server.pem", tls_key=pki / "server.key"))
    try:
        device = FieldDevice(proxy.device_port, files={"photo.jpg": os.urandom(3 << 20)}).start()
        try:
            wait_until(lambda: proxy.run(lambda n: n.online(device.prefix) is not None), 5, "device online")
            ftp = ResumingFTP(context=context(pki), timeout=20)
            ftp.connect("127.0.0.1", proxy.ftp_port)
            ftp.auth()
            ftp.prot_p()  # before USER: the node keeps it for the whole session
            ftp.login(f"{device.prefix}_alice", "pw")
            ftp.set_pasv(mode == "passive")
            got = io.BytesIO()
            ftp.retrbinary("RETR photo.jpg", got.write)
            assert got.getvalue() == device.files["photo.jpg"]
            upload = os.urandom(5 << 20)
            ftp.storbinary("STOR new.bin", io.BytesIO(upload))
            assert device.files["new.bin"] == upload
            ftp.quit()
            assert not {"AUTH", "PBSZ", "PROT"} & set(device.commands), device.commands
        finally:
            device.stop()
        assert not device.errors, device.errors
    finally:
        proxy.close()
