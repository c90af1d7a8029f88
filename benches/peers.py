"""Peers the proxy is compared with: ProFTPD's mod_proxy as a reverse FTP proxy.

``start_mod_proxy(backend_host, backend_port)`` runs Debian's ProFTPD with
mod_proxy 0.9 (unpacked by scripts/install-ftp-tools) in the foreground,
``proftpd -n -c FILE``, in front of one FTP server: a client that logs in to
it with the backend's user and password is relayed to the backend, control
and data connections alike (``ProxyRole reverse``, ``ProxyReverseConnectPolicy
RoundRobin``, ``ProxyReverseServers ftp://HOST:PORT``, ``ProxyDataTransferPolicy
client``: the backend sees the data mode the client chose). USER and PASS go
through to the backend unchanged (no ``UseReverseProxyAuth``), so the backend
alone authenticates. ProFTPD forks a process per client; each session chroots
into the ``ProxyTables`` directory and runs as nobody.

Settings forced by this machine: ``CapabilitiesEngine off`` (mod_cap fails in
the sandbox), ``DelayEngine off``, ``UseIPv6 off`` (with it on, mod_proxy
binds the backend data socket to ``::ffff:127.0.0.1`` and its connect to the
backend's IPv4 passive port fails with EINVAL, so the proxy is IPv4 only),
``ProxyTables`` in a fresh directory on /dev/shm (SQLite on tmpfs), removed
at stop. ``mod_tls`` is always loaded: mod_proxy.so needs its OpenSSL
symbols. Toward the backend it speaks plain FTP (``ProxyTLSEngine off``).

``tls=TlsFiles(cert, key)`` terminates FTPS toward the client with mod_tls:
explicit ``AUTH TLS`` only (``TLSRequired on``: control and data both
protected, a plain login is refused with 550), TLS 1.2 and 1.3,
``TLSOptions NoSessionReuseRequired`` (the data connections need not resume
the control connection's TLS session: not every client does), no client
certificates, no renegotiation.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.ftpservers import TOOLS_ROOT, ForegroundProcess, proftpd_base_config


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (``cert``, optionally followed by its chain) and its private key."""

    cert: Path
    key: Path


def key_algorithm(key: Path) -> str:
    """``"rsa"`` or ``"ec"``: which of mod_tls's certificate directives a key needs."""
    done = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-noout", "-text"],
        capture_output=True, text=True, timeout=30,
    )
    if done.returncode != 0:
        raise ValueError(f"cannot read private key {key}: {done.stderr.strip()}")
    if "modulus:" in done.stdout:
        return "rsa"
    if "ASN1 OID:" in done.stdout or "NIST CURVE:" in done.stdout:
        return "ec"
    raise ValueError(f"{key}: mod_tls takes RSA or EC keys only")


class ModProxy(ForegroundProcess):
    """ProFTPD + mod_proxy as a reverse proxy for one backend; ``.host``/``.port`` is its
    frontend, ``.backend`` the server behind it, ``.tls`` the FTPS files or None."""

    kind = "mod_proxy"

    def __init__(
        self, backend_host: str, backend_port: int, tls: TlsFiles | None = None,
        host: str = "127.0.0.1", passive_count: int = 32,
    ) -> None:
        for address in (host, backend_host):
            if not address.startswith("127."):
                raise ValueError(f"mod_proxy runs IPv4 loopback only here, not {address!r}")
        super().__init__(host, passive_count)
        self.backend = (backend_host, backend_port)
        self.tls = tls
        shm = Path("/dev/shm")
        self.tables = Path(tempfile.mkdtemp(
            prefix="swiftftp-mod_proxy-", dir=shm if shm.is_dir() else self.workdir
        ))
        self.tables.chmod(0o755)

    def prepare(self) -> None:
        backend_host, backend_port = self.backend
        config = proftpd_base_config(
            self.workdir, self.host, self.port, self.passive_ports, "swiftftp mod_proxy peer",
            ipv6=False,
        ) + f"""LoadModule mod_tls.c
LoadModule mod_proxy.c
<IfModule mod_proxy.c>
  ProxyEngine on
  ProxyLog {self.workdir / "proxy.log"}
  ProxyTables {self.tables}
  ProxyRole reverse
  ProxyReverseConnectPolicy RoundRobin
  ProxyReverseServers ftp://{backend_host}:{backend_port}
  ProxyDataTransferPolicy client
  ProxyTimeoutConnect 5
  ProxyTLSEngine off
</IfModule>
"""
        if self.tls is not None:
            kind = "RSA" if key_algorithm(self.tls.key) == "rsa" else "EC"
            config += f"""<IfModule mod_tls.c>
  TLSEngine on
  TLSLog {self.workdir / "tls.log"}
  TLSProtocol TLSv1.2 TLSv1.3
  TLS{kind}CertificateFile {self.tls.cert}
  TLS{kind}CertificateKeyFile {self.tls.key}
  TLSRequired on
  TLSOptions NoSessionReuseRequired
  TLSVerifyClient off
  TLSRenegotiate none
</IfModule>
"""
        (self.workdir / "proftpd.conf").write_text(config)

    def command(self) -> list[str]:
        return [str(TOOLS_ROOT / "usr/sbin/proftpd"), "-n", "-c", str(self.workdir / "proftpd.conf")]

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.tables, ignore_errors=True)


def start_mod_proxy(
    backend_host: str, backend_port: int, tls: TlsFiles | tuple[Path, Path] | None = None,
) -> ModProxy:
    """Start ProFTPD mod_proxy in front of ``backend_host:backend_port`` (IPv4 loopback)
    and return it once it greets with 220; ``tls`` (certificate, key) makes it FTPS-only
    toward the client. Clients log in with the backend's user and password.
    ``.stop()`` ends it."""
    if isinstance(tls, tuple):
        tls = TlsFiles(Path(tls[0]), Path(tls[1]))
    proxy = ModProxy(backend_host, backend_port, tls)
    try:
        proxy.start()
    except BaseException:
        proxy.stop()
        raise
    return proxy
