"""Stock FTP servers for tests and benches, each on loopback with its own files.

``start_server(kind, host)`` starts one and returns it once it has greeted a
connection with ``220``. Every server gets a private temporary directory
(``.workdir``, mode 0755) holding its generated configuration, its logs and
the directory it serves read-write (``.root``); it listens on a free
control port (``.port``) with a passive range of its own
(``.passive_ports``) on ``host``, 127.0.0.1 or ::1. ``.stop()`` ends it
(SIGTERM to its process group, SIGKILL after a bounded wait) and removes
the directory.

Kinds, and how each is run (as root, which the tests are):

``pyftpdlib``
    ``ThreadedFTPServer`` in a thread of this process; virtual user
    ``user``/``secret`` with full rights on the root.
``vsftpd``
    ``vsftpd FILE`` in the foreground (``listen=YES`` or ``listen_ipv6=YES``,
    ``background=NO``), ``run_as_launching_user=YES`` so it neither switches
    user nor chroots, ``seccomp_sandbox=NO``. In that mode vsftpd takes only
    anonymous logins, so the login is ``anonymous`` (any password) with
    upload, mkdir and rename/delete rights on ``anon_root``.
``proftpd``
    ``proftpd -n -c FILE`` (foreground), ``User nobody``/``Group nogroup``,
    ``CapabilitiesEngine off``, ``DelayEngine off``, ``AuthOrder
    mod_auth_file.c``: virtual user ``user``/``secret`` from an
    ``AuthUserFile`` mapped to nobody:nogroup, home = the root, no
    ``DefaultRoot`` (no chroot). The root belongs to nobody.
``pureftpd``
    ``pure-ftpd -S HOST,PORT -p LOW:HIGH -l puredb:FILE -E -f none ...`` in
    the foreground: virtual user ``user``/``secret`` in a PureDB built with
    ``pure-pw mkdb``, mapped to nobody:nogroup (pure-pw refuses uid 0), home
    without ``/./`` (no chroot). The root belongs to nobody.

The ProFTPD and pure-ftpd passwords are stored as SHA-512 crypt hashes made
with ``openssl passwd -6``: pure-pw's own argon2id hash costs 1.6 s of CPU
per login here.

The server binaries are Debian's, unpacked (not installed: they conflict
with each other and would start as services) by ``scripts/install-ftp-tools``
under ``.cache/ftp-tools/root``; ``ensure_tools()`` runs that script when a
binary or a client is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
#: Where scripts/install-ftp-tools unpacks the servers (the same variable overrides both).
TOOLS = Path(os.environ.get("SWIFTFTP_FTP_TOOLS") or REPO / ".cache" / "ftp-tools")
TOOLS_ROOT = TOOLS / "root"
PROFTPD_MODULES = TOOLS_ROOT / "usr/lib/proftpd"
INSTALL_SCRIPT = REPO / "scripts" / "install-ftp-tools"

KINDS = ("pyftpdlib", "vsftpd", "proftpd", "pureftpd")
USER, PASSWORD = "user", "secret"
ANONYMOUS_PASSWORD = "swiftftp"  # vsftpd takes any
#: The command-line clients tests/ftpclients.py drives, all from Debian.
CLIENT_COMMANDS = ("curl", "lftp", "tnftp", "wget", "rclone", "openssl")
#: Server binaries relative to TOOLS_ROOT.
SERVER_FILES = (
    "usr/sbin/vsftpd",
    "usr/sbin/pure-ftpd",
    "usr/bin/pure-pw",
    "usr/sbin/proftpd",
    "usr/lib/proftpd/mod_proxy.so",
    "usr/lib/proftpd/mod_tls.so",
)

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
#: Control and passive ports are taken from here: below Linux's ephemeral range
#: (32768-60999), so no client socket takes one between our check and the bind.
PORT_LOW, PORT_HIGH = 20000, 32000

# A handler of its own keeps pyftpdlib from installing its stderr one; warnings only.
logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
if not logging.getLogger("pyftpdlib").handlers:
    logging.getLogger("pyftpdlib").addHandler(logging.NullHandler())
_install_lock = threading.Lock()


def tools_missing() -> list[str]:
    """The FTP clients and unpacked server files that are not there."""
    missing = [cmd for cmd in CLIENT_COMMANDS if shutil.which(cmd) is None]
    missing += [f for f in SERVER_FILES if not (TOOLS_ROOT / f).exists()]
    return missing


_tools_checked = False


def ensure_tools(timeout: float = 900) -> None:
    """Run scripts/install-ftp-tools once per process (it returns at once when all is
    there, libraries included); fail if a client or a server is still missing.

    A missing tool is an error, never a skip."""
    global _tools_checked
    with _install_lock:
        if _tools_checked and not tools_missing():
            return
        done = subprocess.run(
            [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        missing = tools_missing()
        if done.returncode != 0 or missing:
            raise RuntimeError(
                f"scripts/install-ftp-tools exited {done.returncode}; missing: {missing}\n"
                f"{done.stdout}{done.stderr}"
            )
        _tools_checked = True


def nobody() -> tuple[int, int]:
    """uid and gid of the unprivileged user the ProFTPD and pure-ftpd sessions run as."""
    user = pwd.getpwnam("nobody")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = user.pw_gid
    return user.pw_uid, gid


@functools.cache
def crypt_sha512(password: str) -> str:
    """A ``$6$`` crypt(3) hash of ``password`` (what /etc/shadow holds)."""
    salt = secrets.token_hex(8)
    done = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
        input=password, capture_output=True, text=True, timeout=30, check=True,
    )
    return done.stdout.strip()


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(host: str, count: int) -> int:
    """A first port ``p`` such that ``p .. p+count-1`` can all be bound on ``host`` now."""
    for _ in range(200):
        base = random.randrange(PORT_LOW, PORT_HIGH - count)
        if all(_bindable(host, p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free consecutive ports on {host}")


def read_greeting(host: str, port: int, timeout: float) -> str:
    """Connect, read the whole ``220`` greeting (multi-line too), send QUIT; the greeting."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        lines = []
        while True:
            line = reader.readline(4096).decode("latin-1")
            if not line:
                raise ConnectionError(f"{host}:{port} closed before greeting: {lines}")
            lines.append(line.rstrip("\r\n"))
            if line[:3].isdigit() and line[3:4] == " ":
                break
        if not lines[-1].startswith("220"):
            raise ConnectionError(f"{host}:{port} greeted {lines}")
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
            reader.readline(4096)
        return "\n".join(lines)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


class FtpEndpoint:
    """Something listening for FTP clients on loopback, with a private directory."""

    kind: str = ""

    def __init__(self, host: str, passive_count: int) -> None:
        if not (host == "::1" or host.startswith("127.")):
            raise ValueError(f"loopback addresses only, not {host!r}")
        self.host = host
        self.passive_count = passive_count
        self.workdir = Path(tempfile.mkdtemp(prefix=f"swiftftp-{self.kind}-"))
        self.workdir.chmod(0o755)  # unprivileged sessions must reach what is inside
        self.port = 0
        self.passive_ports = (0, 0)
        self.greeting = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop it and remove its directory."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.kind} {url_host(self.host)}:{self.port}>"


class FtpServer(FtpEndpoint):
    """A running FTP server: where it listens, who logs in, what it serves."""

    def __init__(self, host: str, passive_count: int) -> None:
        super().__init__(host, passive_count)
        self.user = USER
        self.password = PASSWORD
        self.root = self.workdir / "root"
        self.root.mkdir()

    def url(self, path: str = "") -> str:
        """``ftp://user:password@host:port/path``."""
        login = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"ftp://{login}@{url_host(self.host)}:{self.port}/{path}"

    def __repr__(self) -> str:
        return f"<{self.kind} {url_host(self.host)}:{self.port} root={self.root}>"


class PyftpdlibServer(FtpServer):
    """pyftpdlib's ThreadedFTPServer in a thread of this process."""

    kind = "pyftpdlib"

    def start(self) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

        authorizer = DummyAuthorizer()
        authorizer.add_user(self.user, self.password, str(self.root), perm="elradfmwMT")
        base = free_port_block(self.host, self.passive_count)
        self.passive_ports = (base, base + self.passive_count - 1)
        handler = type(
            "SwiftFtpTestHandler",
            (FTPHandler,),
            {"authorizer": authorizer, "timeout": 120,
             "passive_ports": list(range(base, base + self.passive_count))},
        )
        self.server = ThreadedFTPServer((self.host, 0), handler)
        self.port = self.server.address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"timeout": 0.1}, name="pyftpdlib", daemon=True
        )
        self.thread.start()
        self.greeting = read_greeting(self.host, self.port, READY_TIMEOUT)

    def stop(self) -> None:
        if hasattr(self, "thread"):
            self.server.close_all()
            self.thread.join(STOP_TIMEOUT)
        super().stop()


class ForegroundProcess(FtpEndpoint):
    """A server binary run in the foreground in a process group of its own; ready once it
    has greeted a connection with 220."""

    proc: subprocess.Popen[bytes] | None = None

    def __init__(self, host: str, passive_count: int) -> None:
        ensure_tools()
        super().__init__(host, passive_count)

    def command(self) -> list[str]:
        """The argv, once ``port``, ``passive_ports`` and the files are in place."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the configuration files for ``port`` and ``passive_ports``."""

    def start(self) -> None:
        ensure_tools()
        last = ""
        for _ in range(3):  # another process may take a port between our check and its bind
            base = free_port_block(self.host, self.passive_count + 1)
            self.port = base
            self.passive_ports = (base + 1, base + self.passive_count)
            self.prepare()
            log = (self.workdir / "stderr.log").open("ab")
            try:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    cwd=self.workdir, start_new_session=True,
                )
            finally:
                log.close()
            _running.add(self)
            try:
                self.greeting = self._wait_ready()
                return
            except RuntimeError as exc:
                last = str(exc)
                self._kill_group()
        raise RuntimeError(f"{self.kind} did not start: {last}")

    def _wait_ready(self) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {self.log_tail()}")
            try:
                return read_greeting(self.host, self.port, max(0.1, deadline - time.monotonic()))
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no 220 on {self.port}: {exc}; {self.log_tail()}") from exc
                if exc.errno not in (errno.ECONNREFUSED, None) and not isinstance(exc, TimeoutError):
                    raise RuntimeError(f"{exc}; {self.log_tail()}") from exc
            time.sleep(0.02)  # not listening yet: nothing to await but the bind

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's logs (stderr and its log files)."""
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def _kill_group(self) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever is left after STOP_TIMEOUT."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group's id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT  # session children exit on their own signal
        while group_members(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.02)
        self.proc = None
        _running.discard(self)

    def stop(self) -> None:
        self._kill_group()
        super().stop()


#: Started and not stopped yet: stopped at exit, so an interrupted run leaves no server behind.
_running: weakref.WeakSet[ForegroundProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_running):
        process.stop()


class ProcessServer(ForegroundProcess, FtpServer):
    """An FTP server binary with a root and a user."""


class VsftpdServer(ProcessServer):
    """vsftpd run as the launching user (root): anonymous, read-write, no chroot."""

    kind = "vsftpd"

    def __init__(self, host: str, passive_count: int) -> None:
        super().__init__(host, passive_count)
        self.user = "anonymous"
        self.password = ANONYMOUS_PASSWORD
        (self.workdir / "empty").mkdir()
        uid, gid = nobody()
        os.chown(self.root, uid, gid)

    def prepare(self) -> None:
        ipv6 = ":" in self.host
        listen = (
            f"listen=NO\nlisten_ipv6=YES\nlisten_address6={self.host}\n"
            if ipv6 else f"listen=YES\nlisten_ipv6=NO\nlisten_address={self.host}\n"
        )
        low, high = self.passive_ports
        (self.workdir / "vsftpd.conf").write_text(
            listen
            + f"""listen_port={self.port}
background=NO
run_as_launching_user=YES
seccomp_sandbox=NO
ftp_username=nobody
nopriv_user=nobody
secure_chroot_dir={self.workdir / "empty"}
anonymous_enable=YES
local_enable=NO
no_anon_password=NO
anon_root={self.root}
write_enable=YES
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_world_readable_only=NO
anon_umask=022
pasv_enable=YES
pasv_min_port={low}
pasv_max_port={high}
port_enable=YES
connect_from_port_20=NO
delay_failed_login=0
idle_session_timeout=300
data_connection_timeout=120
xferlog_enable=YES
vsftpd_log_file={self.workdir / "vsftpd.log"}
syslog_enable=NO
"""
        )

    def command(self) -> list[str]:
        return [str(TOOLS_ROOT / "usr/sbin/vsftpd"), str(self.workdir / "vsftpd.conf")]


def proftpd_base_config(workdir: Path, host: str, port: int, passive_ports: tuple[int, int],
                        name: str, *, ipv6: bool = True) -> str:
    """The directives every ProFTPD here shares: foreground-friendly, quiet, unprivileged
    sessions, logs and state files in ``workdir``, no capabilities, no delays."""
    low, high = passive_ports
    return f"""ServerType standalone
ServerName "{name}"
DefaultAddress {host}
SocketBindTight on
Port {port}
UseIPv6 {"on" if ipv6 else "off"}
User nobody
Group {grp.getgrgid(nobody()[1]).gr_name}
PidFile {workdir / "proftpd.pid"}
ScoreboardFile {workdir / "proftpd.scoreboard"}
ModulePath {PROFTPD_MODULES}
SystemLog {workdir / "proftpd.log"}
TransferLog {workdir / "xfer.log"}
WtmpLog off
UseReverseDNS off
AuthPAM off
DelayEngine off
CapabilitiesEngine off
PassivePorts {low} {high}
MaxInstances 128
TimeoutIdle 300
"""


class ProftpdServer(ProcessServer):
    """ProFTPD in the foreground, virtual user from an AuthUserFile, no chroot."""

    kind = "proftpd"

    def __init__(self, host: str, passive_count: int) -> None:
        super().__init__(host, passive_count)
        uid, gid = nobody()
        os.chown(self.root, uid, gid)
        group = grp.getgrgid(gid).gr_name
        passwd = self.workdir / "passwd"
        passwd.write_text(f"{self.user}:{crypt_sha512(self.password)}:{uid}:{gid}::{self.root}:/bin/false\n")
        groups = self.workdir / "group"
        groups.write_text(f"{group}:x:{gid}:\n")
        passwd.chmod(0o600)
        groups.chmod(0o644)

    def prepare(self) -> None:
        config = proftpd_base_config(
            self.workdir, self.host, self.port, self.passive_ports, "swiftftp test proftpd"
        ) + f"""AuthOrder mod_auth_file.c
AuthUserFile {self.workdir / "passwd"}
AuthGroupFile {self.workdir / "group"}
RequireValidShell off
Umask 022
AllowOverwrite on
AllowStoreRestart on
"""
        (self.workdir / "proftpd.conf").write_text(config)

    def command(self) -> list[str]:
        return [str(TOOLS_ROOT / "usr/sbin/proftpd"), "-n", "-c", str(self.workdir / "proftpd.conf")]


class PureftpdServer(ProcessServer):
    """pure-ftpd in the foreground, virtual user from a PureDB, no chroot, no anonymous."""

    kind = "pureftpd"

    def __init__(self, host: str, passive_count: int) -> None:
        super().__init__(host, passive_count)
        uid, gid = nobody()
        os.chown(self.root, uid, gid)
        passwd = self.workdir / "pureftpd.passwd"
        # The line pure-pw useradd writes (home without /./: no chroot), with a crypt hash.
        passwd.write_text(f"{self.user}:{crypt_sha512(self.password)}:{uid}:{gid}::{self.root}"
                          + ":" * 12 + "\n")
        passwd.chmod(0o600)
        subprocess.run(
            [str(TOOLS_ROOT / "usr/bin/pure-pw"), "mkdb", str(self.workdir / "pureftpd.pdb"),
             "-f", str(passwd)],
            check=True, capture_output=True, timeout=30,
        )

    def command(self) -> list[str]:
        low, high = self.passive_ports
        return [
            str(TOOLS_ROOT / "usr/sbin/pure-ftpd"),
            "--bind", f"{self.host},{self.port}",
            "--passiveportrange", f"{low}:{high}",
            "--login", f"puredb:{self.workdir / 'pureftpd.pdb'}",
            "--noanonymous",
            "--syslogfacility", "none",
            "--altlog", f"clf:{self.workdir / 'xfer.log'}",
            "--pidfile", str(self.workdir / "pure-ftpd.pid"),
            "--dontresolve",
            "--maxclientsnumber", "100",
            "--maxclientsperip", "100",
            "--maxidletime", "5",
        ]


SERVER_CLASSES: dict[str, type[FtpServer]] = {
    "pyftpdlib": PyftpdlibServer,
    "vsftpd": VsftpdServer,
    "proftpd": ProftpdServer,
    "pureftpd": PureftpdServer,
}


def start_server(kind: str, host: str = "127.0.0.1", *, passive_count: int = 16) -> FtpServer:
    """Start an FTP server of ``kind`` (one of KINDS) on ``host`` and return it once it
    greets with 220. Stop it with ``.stop()`` (or use it as a context manager)."""
    server = SERVER_CLASSES[kind](host, passive_count)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
