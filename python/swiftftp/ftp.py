"""The FTP side without I/O: the proxy's pre-login dialogue and the rewriting
of relayed control lines.

Until a client's ``USER <prefix>_<user>`` names a device that is online, the
proxy itself answers (docs/protocol.md, "Control connection").  :class:`PreLogin`
is that dialogue as a small state machine: it takes one line at a time and
returns what to do, so it is tested without sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .net import normalize_ip

#: Longest command line accepted before login (RFC 959 has no limit; paths can be long).
MAX_LINE = 2048

GREETING = "220 SwiftFTP proxy ready. Log in as <prefix>_<user>."
_PREFIX_RE = re.compile(r"[a-z0-9]{1,32}")


@dataclass(frozen=True)
class Reply:
    """Send this reply line (without CRLF) to the client."""

    text: str


@dataclass(frozen=True)
class Close:
    """Close the client connection."""

    reason: str


@dataclass(frozen=True)
class Lookup:
    """The client asked for device ``prefix``; ``user_line`` is what the device gets."""

    prefix: str
    user_line: bytes


@dataclass(frozen=True)
class Failure:
    """A failed login attempt (unknown prefix, no prefix); counted per client address.
    ``guess``: a prefix was tried (it takes from the node-wide guess budget too)."""

    reason: str
    guess: bool = True


Event = Reply | Close | Lookup | Failure


def split_command(line: bytes) -> tuple[str, bytes]:
    """(upper-case verb, argument bytes without the line ending)."""
    body = line.rstrip(b"\r\n")
    verb, _, arg = body.partition(b" ")
    return verb.decode("latin-1").upper(), arg


class PreLogin:
    """The proxy's answers before a device takes over the control connection.

    ``on_line`` returns a list of events; the caller sends replies, closes on
    :class:`Close`, and on :class:`Lookup` checks the prefix and calls
    ``unknown_prefix`` if no such device is online.
    """

    def __init__(self, max_failures: int = 3) -> None:
        self.max_failures = max_failures
        self.failures = 0
        self._anonymous = False  # USER without a prefix was sent: fail the PASS
        self._verbs: dict[str, Callable[[bytes, bytes], list[Event]]] = {
            "USER": self._user,
            "PASS": self._pass,
            "QUIT": lambda line, arg: [Reply("221 Goodbye."), Close("quit")],
            "NOOP": lambda line, arg: [Reply("200 NOOP ok.")],
            # TLS is not offered; a 5xx here makes lftp and FileZilla carry on in plain FTP.
            "AUTH": lambda line, arg: [Reply("502 TLS is not available through this proxy.")],
        }

    def on_line(self, line: bytes) -> list[Event]:
        if len(line) > MAX_LINE:
            return [Reply("500 Command line too long."), Close("line too long")]
        verb, arg = split_command(line)
        if not verb:
            return [Reply("500 Syntax error, command unrecognized.")]
        handler = self._verbs.get(verb)
        if handler is None:
            return [Reply("530 Please log in with USER <prefix>_<user> first.")]
        return handler(line, arg)

    def unknown_prefix(self, prefix: str) -> list[Event]:
        return self._fail(
            f"530 Device {prefix!r} is not signed in to this proxy.", f"unknown prefix {prefix!r}"
        )

    def device_unavailable(self) -> list[Event]:
        """The device was online but did not take the connection in time."""
        return [Reply("421 The device did not answer; try again later."), Close("rendezvous")]

    def timed_out(self) -> list[Event]:
        return [Reply("421 Login timeout, closing control connection."), Close("login timeout")]

    def _user(self, line: bytes, arg: bytes) -> list[Event]:
        self._anonymous = False
        if not arg.strip():
            return [Reply("501 Syntax: USER <prefix>_<user>.")]
        if b"_" not in arg:
            # Many clients try "anonymous" first; let them send PASS, then explain.
            self._anonymous = True
            return [Reply("331 Password required.")]
        prefix_bytes = arg.split(b"_", 1)[0]
        prefix = prefix_bytes.decode("latin-1").lower()
        if not _PREFIX_RE.fullmatch(prefix):
            return self.unknown_prefix(prefix)
        start = line.index(arg)  # keep the verb, spacing and line ending as sent
        user_line = line[:start] + line[start + len(prefix_bytes) + 1 :]
        return [Lookup(prefix, user_line)]

    def _pass(self, line: bytes, arg: bytes) -> list[Event]:
        if not self._anonymous:
            return [Reply("503 Login with USER first.")]
        self._anonymous = False
        return self._fail(
            "530 Login incorrect: log in as <prefix>_<user>, with the prefix your device shows.",
            "no prefix", guess=False,
        )

    def _fail(self, text: str, reason: str, guess: bool = True) -> list[Event]:
        self.failures += 1
        events: list[Event] = [Failure(reason, guess), Reply(text)]
        if self.failures >= self.max_failures:
            events.append(Close("too many failures"))
        return events


# ---- rewriting of relayed control lines ---------------------------------------------

_227 = re.compile(rb"^(227[ -].*?)(\d{1,3}(?:\s*,\s*\d{1,3}){3})((?:\s*,\s*\d{1,3}){2})")
_PORT = re.compile(rb"^(port\s+)(\d{1,3},\d{1,3},\d{1,3},\d{1,3})(,\d{1,3},\d{1,3}\s*)$", re.I)
_EPRT = re.compile(rb"^(eprt\s+)(.)([12])\2([^|]+)\2(\d{1,5})\2(\s*)$", re.I)


def _ipv4(address: str) -> ipaddress.IPv4Address | None:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped
    return ip


def rewrite_pasv_reply(line: bytes, public_address: str) -> bytes:
    """A device's ``227`` names an address the client cannot reach: put ours there."""
    ip = _ipv4(public_address)
    if ip is None:
        return line
    return _227.sub(lambda m: m[1] + str(ip).replace(".", ",").encode() + m[3], line, count=1)


def rewrite_port_command(line: bytes, peer_address: str) -> bytes:
    """A client's ``PORT``/``EPRT`` may name any address: the device may only dial the
    client's own (RFC 2577), so the address becomes the control connection's peer."""
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :]
    if m := _PORT.match(body):
        ip = _ipv4(peer_address)
        if ip is None:
            return line
        return m[1] + str(ip).replace(".", ",").encode() + m[3] + ending
    if m := _EPRT.match(body):
        ip = ipaddress.ip_address(peer_address.split("%")[0])
        mapped = isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped
        if mapped:
            ip = mapped
        family = b"1" if ip.version == 4 else b"2"
        d = m[2]
        return m[1] + d + family + d + str(ip).encode() + d + m[5] + d + m[6] + ending
    return line


_REPLY = re.compile(rb"^(\d{3})([ -]?)")


class ControlRewriter:
    """Everything the proxy changes on a relayed control connection, line by line.

    - A client's ``PORT``/``EPRT`` address becomes its own (RFC 2577).
    - A device's ``227`` address becomes the node's public one.
    - ``EPSV`` (RFC 2428) reaches the device as ``PASV`` and its ``227`` goes back
      as ``229 (|||port|)``: the field device answers 502 to ``EPSV`` (docs/protocol.md),
      and the port is the proxy's in either form.  So clients that insist on ``EPSV``
      (IPv6 clients, ``EPSV ALL``) get passive mode too, and curl saves a round trip.
      ``EPSV ALL`` reaches the device as ``NOOP``, whose ``200`` is answered for it.
    - ``EPRT |1|…`` becomes ``PORT`` for the same reason.  An IPv6 client's ``EPRT``
      is passed on as it is: ``PORT`` has no IPv6 form.

    Replies are matched to commands in order, one final (non-1xx) reply each
    (RFC 959, 4.2), so pipelined commands are translated correctly.

    It also follows the login: :attr:`logged_in` once the device answered ``230``,
    and :attr:`failures` counts its ``530`` replies before that.
    """

    def __init__(self, client_ip: str, public_address: str) -> None:
        self._client_ip = client_ip
        self._public = public_address
        self._pending: deque[str] = deque()  # per command sent on: what its reply becomes
        self._multiline: bytes | None = None  # code of the multi-line reply being passed on
        self.logged_in = False
        self.failures = 0

    def command(self, line: bytes) -> bytes:
        """A line from the client, as the device gets it."""
        if not line.endswith(b"\n"):
            return line  # a fragment of an over-long line: passed on as it is
        verb, arg = split_command(line)
        ending = b"\r\n"
        expect = ""
        if verb == "EPSV":
            if arg.strip().upper() == b"ALL":
                line, expect = b"NOOP" + ending, "EPSV ALL"
            elif arg.strip() in (b"", b"1", b"2"):
                line, expect = b"PASV" + ending, "EPSV"
        elif verb in ("PORT", "EPRT"):
            line = rewrite_port_command(line, self._client_ip)
            if verb == "EPRT" and (port := _eprt_as_port(line)):
                line = port + ending
        self._pending.append(expect)
        return line

    def reply(self, line: bytes) -> bytes:
        """A line from the device, as the client gets it."""
        m = _REPLY.match(line)
        if self._multiline is not None:
            if m and m[1] == self._multiline and m[2] == b" ":
                self._multiline = None
                self._final()
                self._login_reply(m[1])
            return line
        if not m:
            return line
        if m[2] == b"-":
            self._multiline = m[1]
            return line
        if line.startswith(b"1"):
            return line  # preliminary: the command's final reply is still to come
        expect = self._final()
        self._login_reply(m[1])
        if expect == "EPSV" and m[1] == b"227" and (port := _pasv_port(line)) is not None:
            return b"229 Entering Extended Passive Mode (|||%d|)\r\n" % port
        if expect == "EPSV ALL" and line.startswith(b"2"):
            return b"200 EPSV ALL command successful.\r\n"
        return rewrite_pasv_reply(line, self._public)

    def _login_reply(self, code: bytes) -> None:
        if not self.logged_in:
            if code == b"230":
                self.logged_in = True
            elif code == b"530":
                self.failures += 1

    def _final(self) -> str:
        return self._pending.popleft() if self._pending else ""


def _pasv_port(line: bytes) -> int | None:
    m = _227.match(line)
    if not m:
        return None
    p1, p2 = (int(x) for x in m[3].replace(b" ", b"").split(b",")[1:])
    return p1 * 256 + p2 if p1 < 256 and p2 < 256 else None


def _eprt_as_port(line: bytes) -> bytes | None:
    """``PORT h1,…,p2`` for an IPv4 ``EPRT`` line (already rewritten), else None."""
    try:
        address, port = parse_port_argument("EPRT", split_command(line)[1])
    except ValueError:
        return None
    if ":" in address or not 0 < port < 65536:
        return None
    return b"PORT %s,%d,%d" % (address.replace(".", ",").encode(), port >> 8, port & 255)


class LineSplitter:
    """Cuts a byte stream into lines for rewriting, passing over-long lines through."""

    def __init__(self, rewrite: Callable[[bytes], bytes] = bytes, max_line: int = 8192) -> None:
        self._rewrite = rewrite
        self._max = max_line
        self._partial = b""

    def split(self, data: bytes) -> list[bytes]:
        """The complete lines (and over-long fragments) ``data`` finishes."""
        data = self._partial + data
        out = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            out.append(data[start : end + 1])
            start = end + 1
        rest = data[start:]
        if len(rest) > self._max:
            out.append(rest)
            rest = b""
        self._partial = rest
        return out

    def feed(self, data: bytes) -> bytes:
        """The rewritten lines ``data`` finishes."""
        return b"".join(self._rewrite(line) for line in self.split(data))

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest


def parse_port_argument(verb: str, arg: bytes) -> tuple[str, int]:
    """(address, port) of a ``PORT h1,h2,h3,h4,p1,p2`` or ``EPRT |af|addr|port|``."""
    text = arg.decode("latin-1").strip()
    if verb == "PORT":
        parts = [int(x) for x in text.split(",")]
        if len(parts) != 6 or not all(0 <= x <= 255 for x in parts):
            raise ValueError(text)
        return ".".join(map(str, parts[:4])), parts[4] * 256 + parts[5]
    delim = text[:1]
    fields = text.split(delim)
    if len(fields) != 5 or fields[1] not in ("1", "2"):
        raise ValueError(text)
    return normalize_ip(fields[2]), int(fields[3])
