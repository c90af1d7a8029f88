"""Real FTP clients, driven with bounded timeouts: curl, lftp, tnftp, wget and rclone
(Debian's, run as processes) and Python's ftplib.

Each client is an ``FtpClient`` with three operations on a ``Login`` (anything
with ``host``, ``port``, ``user`` and ``password``: a server from
tests/ftpservers.py, or a proxy node with ``<prefix>_<user>``):

* ``list(login, mode)``: the listing of the login directory, as text. It is a
  ``LIST`` for every client but rclone, whose ``lsf`` (with MLSD turned off,
  so ``LIST`` too) prints names only.
* ``get(login, name, dest, mode)``: ``RETR name`` into the local file ``dest``.
* ``put(login, src, name, mode)``: ``STOR`` of the local file ``src`` as ``name``
  (wget cannot upload: ``can_store`` is False).

A failed command raises ``AssertionError`` with the client's exit status and
output; every process has a time limit (``TIMEOUT``), and the clients' own
network timeouts are set below it. The data-connection ``mode`` names what
the client sends:

=========  ===============================================================
curl       ``epsv`` (EPSV), ``pasv`` (``--disable-epsv``: PASV),
           ``eprt`` (``--ftp-port ADDR``: EPRT), ``port`` (``--disable-eprt``: PORT)
lftp       ``passive`` (PASV; EPSV over IPv6), ``active`` (PORT; EPRT over IPv6)
ftplib     ``passive`` (PASV; EPSV over IPv6), ``active`` (PORT; EPRT over IPv6)
tnftp      ``passive`` (EPSV), ``active`` (``-A``: EPRT)
wget       ``passive`` (PASV), ``active`` (``--no-passive-ftp``: PORT)
rclone     ``epsv`` (EPSV), ``pasv`` (``--ftp-disable-epsv``); it has no active mode
=========  ===============================================================

Over IPv6 a server refuses PASV (its reply cannot carry an IPv6 address), so
rclone's ``pasv`` fails there; curl, lftp, ftplib, tnftp and wget switch to
EPSV and EPRT on IPv6 by themselves. lftp 4.9's ``active`` mode does not work
over IPv6: its EPRT announces the unspecified address ``::`` (it has no
setting for that address), which ProFTPD, pure-ftpd and pyftpdlib refuse.

FTPS (explicit ``AUTH TLS``, protected data connections): ``Curl``, ``Lftp``
and ``Ftplib`` take ``tls=True`` and a CA file to trust (``cafile``; without
one the server's certificate is not verified). curl 7.88 cannot do active
FTPS (it never completes the data connection's handshake); lftp and ftplib can.

``roundtrip(login, mode, download, dest, upload, upname)`` does all three in
one login where the client can (curl with ``--next``, an lftp or tnftp
script, one ftplib session; wget and rclone need a process per operation).
``check_transfers`` is the usual exercise built on it: LIST, RETR of a file
compared by SHA-256 with the server's copy, STOR compared with the local one.
"""

from __future__ import annotations

import contextlib
import ftplib
import functools
import hashlib
import os
import secrets
import shlex
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from tests.ftpservers import ensure_tools

#: Seconds a client process may take for one operation on loopback.
TIMEOUT = 60.0
#: The clients' own network timeouts (connect, stall), below TIMEOUT.
NET_TIMEOUT = 20


class Login(Protocol):
    """Where an FTP client connects and how it logs in."""

    host: str
    port: int
    user: str
    password: str


@dataclass(frozen=True)
class Target:
    """A plain ``Login``: e.g. a proxy node's port with ``<prefix>_<user>``."""

    host: str
    port: int
    user: str
    password: str


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def ftp_url(login: Login, path: str = "", *, credentials: bool = False) -> str:
    """``ftp://host:port/path``, with percent-encoded ``user:password@`` if asked."""
    auth = ""
    if credentials:
        auth = f"{quote(login.user, safe='')}:{quote(login.password, safe='')}@"
    return f"ftp://{auth}{url_host(login.host)}:{login.port}/{quote(path)}"


def local_address(login: Login) -> str:
    """The loopback address a client in active mode announces for ``login``'s family."""
    return "::1" if ":" in login.host else "127.0.0.1"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_tool(
    argv: list[str],
    *,
    timeout: float = TIMEOUT,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    secret: str = "",
) -> subprocess.CompletedProcess[bytes]:
    """Run a client; fail (AssertionError) on a non-zero exit or after ``timeout`` seconds.

    ``secret`` (a password) is masked in the error message."""

    def masked(text: str) -> str:
        return text.replace(secret, "***") if secret else text

    shown = masked(shlex.join(argv))
    if shutil.which(argv[0]) is None:
        ensure_tools()  # scripts/install-ftp-tools; a missing client fails, never skips
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, timeout=timeout,
            env={**os.environ, **(env or {})}, cwd=cwd,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{shown}: no exit after {timeout} s\n{masked(_text(exc.stderr))}"
        ) from None
    if done.returncode != 0:
        raise AssertionError(
            f"{shown}: exit status {done.returncode}\n"
            f"stderr: {masked(_text(done.stderr))}\nstdout: {masked(_text(done.stdout))[-2000:]}"
        )
    return done


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


class FtpClient:
    """One FTP client program; see the module's docstring."""

    name = ""
    modes: tuple[str, ...] = ()
    can_store = True

    def check_mode(self, mode: str) -> None:
        """Reject a mode this client does not have."""
        if mode not in self.modes:
            raise ValueError(f"{self.name} has no mode {mode!r}; it has {self.modes}")

    def list(self, login: Login, mode: str) -> str:
        """The listing of the login directory."""
        raise NotImplementedError

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        """RETR ``name`` into ``dest``."""
        raise NotImplementedError

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        """STOR ``src`` as ``name``."""
        raise NotImplementedError

    def roundtrip(self, login: Login, mode: str, download: str, dest: Path, upload: Path,
                  upname: str) -> str:
        """LIST, RETR ``download`` into ``dest`` and (if ``can_store``) STOR ``upload`` as
        ``upname``, in one login where the client can; the listing."""
        listing = self.list(login, mode)
        self.get(login, download, dest, mode)
        if self.can_store:
            self.put(login, upload, upname, mode)
        return listing

    def __repr__(self) -> str:
        return self.name


class Curl(FtpClient):
    """curl: ``--user`` for the login, ``--max-time`` bounding each transfer."""

    name = "curl"
    modes = ("epsv", "pasv", "eprt", "port")

    def __init__(self, *, tls: bool = False, cafile: Path | None = None) -> None:
        self.tls = tls
        self.cafile = cafile

    def _argv(self, login: Login, mode: str) -> list[str]:
        self.check_mode(mode)
        argv = [
            "curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT - 5)),
            "--connect-timeout", str(NET_TIMEOUT), "--user", f"{login.user}:{login.password}",
        ]
        if mode == "pasv":
            argv.append("--disable-epsv")
        if mode in ("eprt", "port"):
            argv += ["--ftp-port", local_address(login)]
        if mode == "port":
            argv.append("--disable-eprt")
        if self.tls:
            argv.append("--ssl-reqd")
            argv += ["--cacert", str(self.cafile)] if self.cafile else ["--insecure"]
        return argv

    def list(self, login: Login, mode: str) -> str:
        done = run_tool([*self._argv(login, mode), ftp_url(login)], secret=login.password)
        return done.stdout.decode("utf-8", "replace")

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        run_tool([*self._argv(login, mode), "--output", str(dest), ftp_url(login, name)],
                 secret=login.password)

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        run_tool([*self._argv(login, mode), "--upload-file", str(src), ftp_url(login, name)],
                 secret=login.password)

    def roundtrip(self, login: Login, mode: str, download: str, dest: Path, upload: Path,
                  upname: str) -> str:
        """One curl, one login: the three URLs joined with ``--next`` share the connection."""
        curl, *options = self._argv(login, mode)  # --next resets the options: repeat them
        done = run_tool(
            [curl, *options, ftp_url(login),
             "--next", *options, "--output", str(dest), ftp_url(login, download),
             "--next", *options, "--upload-file", str(upload), ftp_url(login, upname)],
            secret=login.password,
        )
        return done.stdout.decode("utf-8", "replace")


def _lftp_quote(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Lftp(FtpClient):
    """lftp -c with a script: one retry, stall timeout, stop at the first failed command."""

    name = "lftp"
    modes = ("passive", "active")

    def __init__(self, *, tls: bool = False, cafile: Path | None = None) -> None:
        self.tls = tls
        self.cafile = cafile

    def _run(self, login: Login, mode: str, command: str) -> str:
        self.check_mode(mode)
        settings = [
            "set cmd:fail-exit yes",
            f"set net:timeout {NET_TIMEOUT}",
            "set net:max-retries 1",
            "set net:persist-retries 0",
            "set net:reconnect-interval-base 1",
            "set xfer:clobber on",
            f"set ftp:passive-mode {'on' if mode == 'passive' else 'off'}",
        ]
        if ":" not in login.host:  # the address in PORT; lftp has no such setting for EPRT
            settings.append(f"set ftp:port-ipv4 {local_address(login)}")
        if self.tls:
            settings += ["set ftp:ssl-force true", "set ftp:ssl-protect-data true",
                         "set ftp:ssl-protect-list true"]
            if self.cafile:
                settings.append(f"set ssl:ca-file {_lftp_quote(str(self.cafile))}")
            else:
                settings.append("set ssl:verify-certificate no")
        else:
            settings.append("set ftp:ssl-allow no")
        script = "; ".join([
            *settings,
            f"open -u {_lftp_quote(login.user + ',' + login.password)} -p {login.port} "
            f"{_lftp_quote(login.host)}",
            command,
            "bye",
        ])
        done = run_tool(["lftp", "-c", script], secret=login.password)
        return done.stdout.decode("utf-8", "replace")

    def list(self, login: Login, mode: str) -> str:
        return self._run(login, mode, "ls")

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        self._run(login, mode, f"get {_lftp_quote(name)} -o {_lftp_quote(str(dest))}")

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        self._run(login, mode, f"put {_lftp_quote(str(src))} -o {_lftp_quote(name)}")

    def roundtrip(self, login: Login, mode: str, download: str, dest: Path, upload: Path,
                  upname: str) -> str:
        return self._run(login, mode, f"ls; get {_lftp_quote(download)} -o {_lftp_quote(str(dest))}; "
                                      f"put {_lftp_quote(str(upload))} -o {_lftp_quote(upname)}")


class Ftplib(FtpClient):
    """Python's ftplib in this process (FTP_TLS with ``PROT P`` when ``tls``)."""

    name = "ftplib"
    modes = ("passive", "active")

    def __init__(self, *, tls: bool = False, cafile: Path | None = None) -> None:
        self.tls = tls
        self.cafile = cafile

    @contextlib.contextmanager
    def session(self, login: Login, mode: str) -> Iterator[ftplib.FTP]:
        """A logged-in ftplib.FTP in ``mode``; QUIT at the end."""
        self.check_mode(mode)
        ftp: ftplib.FTP
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)
            if not self.cafile:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ftp = ftplib.FTP_TLS(context=context, timeout=NET_TIMEOUT)
        else:
            ftp = ftplib.FTP(timeout=NET_TIMEOUT)
        try:
            ftp.connect(login.host, login.port)
            ftp.login(login.user, login.password)
            if isinstance(ftp, ftplib.FTP_TLS):
                ftp.prot_p()
            ftp.set_pasv(mode == "passive")
            yield ftp
            ftp.quit()
        finally:
            ftp.close()

    def list(self, login: Login, mode: str) -> str:
        lines: list[str] = []
        with self.session(login, mode) as ftp:
            ftp.retrlines("LIST", lines.append)
        return "\n".join(lines)

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        with self.session(login, mode) as ftp, dest.open("wb") as f:
            ftp.retrbinary(f"RETR {name}", f.write)

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        with self.session(login, mode) as ftp, src.open("rb") as f:
            ftp.storbinary(f"STOR {name}", f)

    def roundtrip(self, login: Login, mode: str, download: str, dest: Path, upload: Path,
                  upname: str) -> str:
        lines: list[str] = []
        with self.session(login, mode) as ftp:
            ftp.retrlines("LIST", lines.append)
            with dest.open("wb") as f:
                ftp.retrbinary(f"RETR {download}", f.write)
            with upload.open("rb") as f:
                ftp.storbinary(f"STOR {upname}", f)
        return "\n".join(lines)


class Tnftp(FtpClient):
    """NetBSD's ftp (tnftp): auto-fetch (``-o``) and auto-upload (``-u``) URLs, whose
    exit status tells failure; the listing runs ``ls`` on stdin with ``-v`` and must
    end in a 226 reply (tnftp exits 0 after interactive commands whatever happened)."""

    name = "tnftp"
    modes = ("passive", "active")

    def _argv(self, mode: str) -> list[str]:
        self.check_mode(mode)
        return ["tnftp", "-q", str(NET_TIMEOUT), *(["-A"] if mode == "active" else ["-p"])]

    def _script(self, login: Login, mode: str, commands: list[str]) -> list[str]:
        """Run ``commands`` (``ls`` first) in one verbose session; the listing's lines.
        Each command must end in a 226 (or 250) reply."""
        script = "\n".join([*commands, "quit", ""]).encode()
        done = run_tool([*self._argv(mode), "-v", ftp_url(login, credentials=True)],
                        stdin=script, secret=quote(login.password, safe=""))
        out = done.stdout.decode("utf-8", "replace").splitlines()

        def replies(*codes: str) -> list[int]:  # last lines of replies (multi-line ones too)
            return [i for i, line in enumerate(out) if line[:3] in codes and line[3:4] == " "]

        starts, ends = replies("125", "150"), replies("226", "250")
        assert len(starts) == len(ends) == len(commands) and starts[0] < ends[0], (
            f"tnftp {commands}: not every transfer completed:\n{done.stdout.decode(errors='replace')}"
        )
        listing = out[starts[0] + 1: ends[0]]
        while listing and listing[-1][:4] in ("226-", "250-"):  # the 226's own first lines
            listing.pop()
        return listing

    def list(self, login: Login, mode: str) -> str:
        return "\n".join(self._script(login, mode, ["ls"]))

    def roundtrip(self, login: Login, mode: str, download: str, dest: Path, upload: Path,
                  upname: str) -> str:
        return "\n".join(self._script(login, mode, ["ls", f"get {download} {dest}",
                                                    f"put {upload} {upname}"]))

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        run_tool([*self._argv(mode), "-o", str(dest), ftp_url(login, name, credentials=True)],
                 secret=quote(login.password, safe=""))

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        run_tool([*self._argv(mode), "-u", ftp_url(login, name, credentials=True), str(src)],
                 secret=quote(login.password, safe=""))


class Wget(FtpClient):
    """GNU wget: RETR, and LIST through the ``.listing`` file it keeps on request.
    It cannot upload."""

    name = "wget"
    modes = ("passive", "active")
    can_store = False

    def _argv(self, login: Login, mode: str) -> list[str]:
        self.check_mode(mode)
        argv = ["wget", "--quiet", "--tries=1", f"--timeout={NET_TIMEOUT}",
                f"--ftp-user={login.user}", f"--ftp-password={login.password}"]
        if mode == "active":
            argv.append("--no-passive-ftp")
        return argv

    def list(self, login: Login, mode: str) -> str:
        with tempfile.TemporaryDirectory(prefix="swiftftp-wget-") as tmp:
            run_tool([*self._argv(login, mode), "--no-remove-listing", "--no-directories",
                      "-O", f"{tmp}/index.html", ftp_url(login)], cwd=Path(tmp), secret=login.password)
            return (Path(tmp) / ".listing").read_text(errors="replace")

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        run_tool([*self._argv(login, mode), "-O", str(dest), ftp_url(login, name)],
                 secret=login.password)

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        raise NotImplementedError("wget cannot upload over FTP")


def _rclone_value(value: str) -> str:
    """A value in an rclone connection string, quoted when it has , : = or quotes."""
    if any(c in value for c in ',:="\''):
        return '"' + value.replace('"', '""') + '"'
    return value


@functools.cache
def rclone_obscure(password: str) -> str:
    """The password as rclone's ``pass=`` wants it (``rclone obscure``)."""
    done = run_tool(["rclone", "obscure", password], secret=password)
    return done.stdout.decode().strip()


class Rclone(FtpClient):
    """rclone's ``:ftp:`` backend from a connection string, one try, MLSD off."""

    name = "rclone"
    modes = ("epsv", "pasv")

    def _run(self, login: Login, mode: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        self.check_mode(mode)
        argv = [
            "rclone", "--config", "",  # no config file: the remote is on the command line
            "--retries", "1", "--low-level-retries", "1",
            "--contimeout", f"{NET_TIMEOUT}s", "--timeout", f"{NET_TIMEOUT}s",
            "--ftp-disable-mlsd",
            *(["--ftp-disable-epsv"] if mode == "pasv" else []), *args,
        ]
        return run_tool(argv, secret=rclone_obscure(login.password))

    @staticmethod
    def remote(login: Login, path: str = "") -> str:
        """``:ftp,host=…,port=…,user=…,pass=…:path`` (an IPv6 host in brackets: rclone
        joins host and port with a colon)."""
        fields = {"host": url_host(login.host), "port": str(login.port), "user": login.user,
                  "pass": rclone_obscure(login.password)}
        spec = ",".join(f"{key}={_rclone_value(value)}" for key, value in fields.items())
        return f":ftp,{spec}:{path}"

    def list(self, login: Login, mode: str) -> str:
        return self._run(login, mode, "lsf", self.remote(login)).stdout.decode("utf-8", "replace")

    def get(self, login: Login, name: str, dest: Path, mode: str) -> None:
        self._run(login, mode, "copyto", self.remote(login, name), str(dest))

    def put(self, login: Login, src: Path, name: str, mode: str) -> None:
        self._run(login, mode, "copyto", str(src), self.remote(login, name))


#: One of each, plain FTP.
CLIENTS: dict[str, FtpClient] = {
    client.name: client for client in (Curl(), Lftp(), Ftplib(), Tnftp(), Wget(), Rclone())
}


def client_modes(names: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Every (client, mode) pair, for parametrize; ``names`` picks clients."""
    return [(name, mode) for name, client in CLIENTS.items()
            if names is None or name in names for mode in client.modes]


def check_transfers(
    client: FtpClient, mode: str, login: Login, root: Path, download: str, upload: Path,
    workdir: Path,
) -> None:
    """LIST (``download`` appears), RETR ``download`` (same SHA-256 as ``root/download``),
    and, when the client can, STOR ``upload`` under a fresh name (same SHA-256 in ``root``),
    through ``client.roundtrip`` (one login where the client allows it).

    ``root`` is the directory the FTP server behind ``login`` serves."""
    got = workdir / f"{client.name}-{mode}-{secrets.token_hex(4)}.bin"
    name = f"up-{client.name}-{mode}-{secrets.token_hex(4)}.bin"
    listing = client.roundtrip(login, mode, download, got, upload, name)
    assert download in listing, f"{client.name} {mode}: {download} not in listing:\n{listing}"
    assert sha256_file(got) == sha256_file(root / download), f"{client.name} {mode}: RETR differs"
    got.unlink()
    if client.can_store:
        stored = root / name
        assert stored.exists(), f"{client.name} {mode}: STOR {name} left no file"
        assert sha256_file(stored) == sha256_file(upload), f"{client.name} {mode}: STOR differs"
