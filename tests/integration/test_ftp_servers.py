"""The stock FTP servers and clients the proxy tests build on, without the proxy.

Each server kind (pyftpdlib, vsftpd, ProFTPD, pure-ftpd), started once for
the module on 127.0.0.1, is driven by every client in every data mode it has
(curl EPSV/PASV/EPRT/PORT, lftp, ftplib and tnftp passive/active, wget
passive/active, rclone EPSV/PASV): LIST, RETR of a 1 MiB random file and
STOR of another, SHA-256 compared both ways (wget cannot STOR). One curl
case per server on ::1. Then ProFTPD's mod_proxy (benches/peers.py) in front
of pyftpdlib, plain and FTPS-terminating: login, LIST, RETR and STOR through
it. A missing tool is installed (scripts/install-ftp-tools), never skipped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benches.peers import TlsFiles, start_mod_proxy
from tests.ftpclients import (
    CLIENTS,
    Curl,
    FtpClient,
    Ftplib,
    Lftp,
    Target,
    check_transfers,
    client_modes,
)
from tests.ftpservers import KINDS, FtpServer, start_server

pytestmark = [pytest.mark.servers, pytest.mark.timeout(60)]

DOWNLOAD = "down.bin"
SIZE = 1 << 20


@dataclass
class Files:
    download: bytes  # put into each server's root as DOWNLOAD
    upload: Path  # a local file to STOR


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    upload = tmp_path_factory.mktemp("upload") / "upload.bin"
    upload.write_bytes(os.urandom(SIZE))
    return Files(os.urandom(SIZE), upload)


def serve(kind: str, host: str, files: Files) -> FtpServer:
    server = start_server(kind, host)
    (server.root / DOWNLOAD).write_bytes(files.download)
    return server


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest, files: Files) -> Iterator[FtpServer]:
    """One server of each kind on 127.0.0.1, shared by the module's tests."""
    srv = serve(request.param, "127.0.0.1", files)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize(("client", "mode"), client_modes())
def test_client_against_server(server: FtpServer, client: str, mode: str, files: Files,
                               tmp_path: Path) -> None:
    check_transfers(CLIENTS[client], mode, server, server.root, DOWNLOAD, files.upload, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_ipv6_curl(kind: str, files: Files, tmp_path: Path) -> None:
    """curl on ::1: EPSV, and EPRT with an IPv6 address."""
    with serve(kind, "::1", files) as srv:
        assert srv.host == "::1"
        for mode in ("epsv", "eprt"):
            check_transfers(CLIENTS["curl"], mode, srv, srv.root, DOWNLOAD, files.upload, tmp_path)


@pytest.fixture(scope="module")
def backend(files: Files) -> Iterator[FtpServer]:
    """pyftpdlib behind ProFTPD's mod_proxy."""
    srv = serve("pyftpdlib", "127.0.0.1", files)
    try:
        yield srv
    finally:
        srv.stop()


def test_mod_proxy(backend: FtpServer, files: Files, tmp_path: Path) -> None:
    """Plain FTP through mod_proxy with the backend's login, passive and active."""
    with start_mod_proxy(backend.host, backend.port) as proxy:
        assert proxy.greeting.startswith("220")
        login = Target(proxy.host, proxy.port, backend.user, backend.password)
        for client, mode in (("curl", "epsv"), ("curl", "pasv"), ("curl", "eprt"), ("curl", "port"),
                             ("ftplib", "passive"), ("lftp", "active")):
            check_transfers(CLIENTS[client], mode, login, backend.root, DOWNLOAD, files.upload, tmp_path)


@dataclass
class Certificate:
    algorithm: str  # "rsa" or "ec"
    files: TlsFiles


@pytest.fixture(scope="module", params=["rsa", "ec"])
def certificate(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, with an RSA or an EC key."""
    base = tmp_path_factory.mktemp(f"cert-{request.param}")
    key_options = (["-newkey", "rsa:2048"] if request.param == "rsa"
                   else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
    subprocess.run(
        ["openssl", "req", "-x509", *key_options, "-nodes", "-days", "2",
         "-keyout", str(base / "key.pem"), "-out", str(base / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return Certificate(request.param, TlsFiles(base / "cert.pem", base / "key.pem"))


def test_mod_proxy_ftps(backend: FtpServer, certificate: Certificate, files: Files, tmp_path: Path) -> None:
    """mod_proxy terminating explicit FTPS toward the client: plain logins are refused,
    TLS clients (verifying the certificate) move files in passive and active mode.
    The EC certificate gets one client: it only proves the key type is picked up."""
    with start_mod_proxy(backend.host, backend.port, tls=certificate.files) as proxy:
        login = Target(proxy.host, proxy.port, backend.user, backend.password)
        with pytest.raises(AssertionError, match="exit status"):
            CLIENTS["curl"].list(login, "epsv")  # TLSRequired: 550 to a plain login
        cafile = certificate.files.cert
        cases: list[tuple[FtpClient, str]] = [(Curl(tls=True, cafile=cafile), "epsv")]
        if certificate.algorithm == "rsa":
            cases += [(Lftp(tls=True, cafile=cafile), "active"), (Ftplib(tls=True, cafile=cafile), "passive")]
        for client, mode in cases:
            check_transfers(client, mode, login, backend.root, DOWNLOAD, files.upload, tmp_path)
