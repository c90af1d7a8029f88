"""A test device that behaves like the deployed phone app, not like our agent.

What it copies from the field (docs/protocol.md): it writes one JSON object
per write with no delimiter; it reads at most 2048 bytes per ``recv()`` and
parses exactly one object from what that read returned (here: a test failure
if anything followed it); after ``control_connection_waiting`` its command
thread itself connects to the port and logs in there before it reads its
command session again; it sends no FTP banner on a proxied control connection;
it answers ``PASV`` itself with the *local* address of its control socket (a
private address on a phone, ``private_address`` here), and ``EPSV``/``EPRT``
with 502.  It serves an in-memory file system.  Blocking sockets and threads,
as on the phone.  ``dial`` replaces how it connects to the proxy (a slow link:
tests/slowlink.py).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def read_one(sock: socket.socket) -> dict:
    """One read, one object: whatever followed it in the same read is lost (field fact)."""
    data = sock.recv(2048)
    if not data:
        raise ConnectionError("proxy closed")
    obj, end = json.JSONDecoder().raw_decode(data.decode())
    if data[end:].strip():
        raise AssertionError(f"bytes after the object in one read were dropped: {data[end:]!r}")
    return obj


def write_one(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode())


def request(sock: socket.socket, obj: dict) -> dict:
    """Write a request, read its reply with one read (as ``read_one``).

    The deployed device (Java) is in ``read()`` microseconds after its
    ``write()``; a Python thread must first win the GIL back after ``sendall``,
    which can take milliseconds while the node's reply, and bytes right behind
    it, arrive: a merge the real device would not see. So here the read is
    already waiting, on a thread of its own, before the request goes out."""
    result: list[dict | BaseException] = []

    def read() -> None:
        try:
            result.append(read_one(sock))
        except BaseException as exc:
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    write_one(sock, obj)
    reader.join(sock.gettimeout())
    if not result:
        raise TimeoutError("no reply")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass
class FieldDevice:
    proxy_port: int
    android_id: str = "f1e1dd3v1ce00001"
    private_address: str = "10.0.0.2"
    files: dict[str, bytes] = field(default_factory=dict)
    prefix: str = ""
    errors: list[str] = field(default_factory=list)
    replies: list[dict] = field(default_factory=list)
    notices: list[dict] = field(default_factory=list)
    #: replies the proxy gave on data connections (data_pasv_listen, _accept, _port_connect)
    data_replies: list[dict] = field(default_factory=list)
    #: FTP verbs received on proxied control connections, in order
    commands: list[str] = field(default_factory=list)
    #: name → (time of the first chunk, time of the last, bytes after the first chunk)
    upload_times: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    #: connects to the proxy's port N (default: straight to 127.0.0.1:N)
    dial: Callable[[int], socket.socket] | None = None
    #: the FTP password it accepts; None: any
    password: str | None = None

    def __post_init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._stop = False

    # ---- command session --------------------------------------------------------------

    def connect(self, port: int | None = None) -> socket.socket:
        """A connection to the proxy (its device port, or ``port``), logged in."""
        port = port or self.proxy_port
        if self.dial is not None:
            sock = self.dial(port)
            sock.settimeout(30)
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        reply = request(sock, {"action": "login", "android_id": self.android_id, "swiftp_version": "2.16"})
        assert reply == {}, reply
        return sock

    def start(self) -> FieldDevice:
        self.command = self.connect()
        write_one(self.command, {"action": "start_command_session"})
        self.prefix = read_one(self.command)["prefix"]
        self.command.settimeout(None)
        self._spawn(self._command_loop)
        return self

    def request(self, obj: dict) -> None:
        """Send a request on the command session; the reply lands in ``replies``."""
        write_one(self.command, obj)

    def stop(self) -> None:
        self._stop = True
        try:
            self.command.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.command.close()
        for t in self._threads:
            t.join(10)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
        self._threads.append(t)
        t.start()

    def _guarded(self, target, *args) -> None:
        try:
            target(*args)
        except Exception as exc:
            if not self._stop:
                self.errors.append(f"{target.__name__}: {exc!r}")

    def _command_loop(self) -> None:
        while not self._stop:
            try:
                message = read_one(self.command)
            except (ConnectionError, OSError):
                return
            if message.get("action") == "control_connection_waiting":
                # field fact: this thread connects and logs in itself before reading again
                try:
                    sock = self.connect(message["port"])
                except (AssertionError, OSError) as exc:
                    self.errors.append(f"rendezvous on {message['port']}: {exc!r}")
                    continue
                self._spawn(self._control, sock)
            elif "action" not in message:
                self.replies.append(message)
            else:
                self.notices.append(message)

    # ---- control connection: a minimal FTP server, no banner ---------------------------

    def _control(self, sock: socket.socket) -> None:
        FtpSession(self, sock).serve()


class FtpSession:
    def __init__(self, device: FieldDevice, sock: socket.socket) -> None:
        self.device = device
        self.sock = sock
        self.buf = b""
        self.pasv: socket.socket | None = None
        self.port_target: tuple[str, int] | None = None

    def reply(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def lines(self):
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(2048)
                if not data:
                    return
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            yield line.rstrip(b"\r").decode()

    def serve(self) -> None:
        with self.sock:
            for line in self.lines():
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                self.device.commands.append(verb)
                handler = getattr(self, f"ftp_{verb}", None)
                if handler is None:
                    self.reply("502 Command not implemented.")
                    continue
                if handler(arg) is False:
                    return

    def ftp_USER(self, arg: str) -> None:
        self.user = arg
        self.reply("331 Send password.")

    def ftp_PASS(self, arg: str) -> None:
        if self.device.password is not None and arg != self.device.password:
            self.reply("530 Login incorrect.")
            return
        self.reply("230 Logged in.")

    def ftp_SYST(self, arg: str) -> None:
        self.reply("215 UNIX Type: L8")

    def ftp_TYPE(self, arg: str) -> None:
        self.reply("200 Type set.")

    def ftp_PWD(self, arg: str) -> None:
        self.reply('257 "/"')

    def ftp_CWD(self, arg: str) -> None:
        self.reply("250 CWD ok.")

    def ftp_FEAT(self, arg: str) -> None:
        self.reply("211-Features:\r\n SIZE\r\n211 End")

    def ftp_OPTS(self, arg: str) -> None:
        self.reply("200 OK.")

    def ftp_NOOP(self, arg: str) -> None:
        self.reply("200 NOOP.")

    def ftp_SIZE(self, arg: str) -> None:
        data = self.device.files.get(arg.lstrip("/"))
        self.reply(f"213 {len(data)}" if data is not None else "550 No such file.")

    def ftp_QUIT(self, arg: str) -> bool:
        self.reply("221 Bye.")
        return False

    def ftp_PASV(self, arg: str) -> None:
        if self.pasv:
            self.pasv.close()
        self.port_target = None
        sock = self.device.connect()
        reply = request(sock, {"action": "data_pasv_listen"})
        self.device.data_replies.append(reply)
        if "port" not in reply:
            sock.close()
            self.reply("425 Cannot open data connection.")
            return
        self.pasv = sock
        port = reply["port"]
        h = self.device.private_address.replace(".", ",")
        # the field device names its own local address: the proxy must rewrite it
        self.reply(f"227 Entering Passive Mode ({h},{port >> 8},{port & 255}).")

    def ftp_PORT(self, arg: str) -> None:
        nums = [int(x) for x in arg.split(",")]
        self.port_target = (".".join(map(str, nums[:4])), nums[4] * 256 + nums[5])
        if self.pasv:
            self.pasv.close()
            self.pasv = None
        self.reply("200 PORT ok.")

    def _data(self) -> socket.socket | None:
        """Open the data connection the way the field device does, at transfer time."""
        if self.pasv:
            sock, self.pasv = self.pasv, None
            message: dict = {"action": "data_pasv_accept"}
        elif self.port_target:
            sock = self.device.connect()
            address, port = self.port_target
            self.port_target = None
            message = {"action": "data_port_connect", "address": address, "port": port}
        else:
            self.reply("425 Use PASV or PORT first.")
            return None
        reply = request(sock, message)  # "{}" alone: raw bytes in this read would be lost
        self.device.data_replies.append(reply)
        if reply != {}:
            sock.close()
            self.reply("425 Cannot open data connection.")
            return None
        return sock

    def ftp_LIST(self, arg: str) -> None:
        sock = self._data()
        if sock is None:
            return
        self.reply("150 Here comes the listing.")
        with sock:
            for name, data in sorted(self.device.files.items()):
                sock.sendall(f"-rw-r--r-- 1 u g {len(data)} Jan 1 00:00 {name}\r\n".encode())
        self.reply("226 Transfer complete.")

    def ftp_RETR(self, arg: str) -> None:
        data = self.device.files.get(arg.lstrip("/"))
        if data is None:
            self.reply("550 No such file.")
            return
        sock = self._data()
        if sock is None:
            return
        self.reply("150 Opening data connection.")
        with sock:
            sock.sendall(data)
        self.reply("226 Transfer complete.")

    def ftp_STOR(self, arg: str) -> None:
        sock = self._data()
        if sock is None:
            return
        self.reply("150 Ok to send data.")
        chunks = []
        first = last = 0.0
        with sock:
            while chunk := sock.recv(65536):
                last = time.monotonic()
                first = first or last
                chunks.append(chunk)
        name = arg.lstrip("/")
        self.device.files[name] = b"".join(chunks)
        if chunks:
            self.device.upload_times[name] = (first, last, len(self.device.files[name]) - len(chunks[0]))
        self.reply("226 Transfer complete.")
