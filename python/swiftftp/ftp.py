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


@dataclass(frozen=True)
class StartTls:
    """``AUTH TLS`` was accepted (234 sent before this): TLS from the next byte on."""


Event = Reply | Close | Lookup | Failure | StartTls


_SECURITY_VERBS = frozenset({"AUTH", "PBSZ", "PROT", "CCC"})


@dataclass
class Ftps:
    """One control connection's FTPS state (RFC 4217), on a node with a certificate.

    The pre-login dialogue and the relayed connection's :class:`ControlRewriter`
    share it: ``PBSZ``/``PROT`` sent before ``USER`` hold after the login, and the
    node answers them itself at any time (the device sees a plain FTP session).
    ``tag`` names the connection's TLS session, which its ``PROT P`` data
    connections resume.
    """

    tag: bytes = b""
    require: bool = False  # [tls] require: no USER before AUTH TLS
    require_protection: bool = False  # [tls] require_data_protection
    secured: bool = False  # TLS on the control connection (AUTH TLS, or implicit)
    protect: bool = False  # PROT P

    def answer(self, verb: str, arg: bytes) -> str:
        """The node's reply to ``AUTH`` (after login), ``PBSZ``, ``PROT`` or ``CCC``."""
        level = arg.strip().upper()
        if verb == "AUTH":
            if self.secured:
                return "503 TLS is already on for this connection."
            return "503 AUTH TLS must come before USER through this proxy."
        if not self.secured:
            return f"503 {verb} needs AUTH TLS first."
        if verb == "PBSZ":
            # TLS needs no buffer size (RFC 4217, 9): always 0, whatever was asked.
            return "200 PBSZ=0" if level.isdigit() else "501 Syntax: PBSZ 0."
        if verb == "PROT":
            # PROT before PBSZ is taken (vsftpd and ProFTPD take it too), not a 503.
            if level in (b"P", b"C"):
                self.protect = level == b"P"
                return f"200 Protection level set to {'Private' if self.protect else 'Clear'}."
            if level in (b"S", b"E"):
                return "536 Only PROT P and PROT C are available with TLS."
            return "504 Syntax: PROT P or PROT C."
        return "534 CCC refused: the control connection stays encrypted."

    def data_refusal(self) -> str | None:
        """Why a data connection may not be set up now (``require_data_protection``)."""
        if self.require_protection and not self.protect:
            return "521 Data connections must be protected here: send PBSZ 0 and PROT P first."
        return None


def feat_lines(ftps: Ftps | None) -> bytes:
    """What the node adds to a device's ``211`` FEAT reply."""
    return b" AUTH TLS\r\n PBSZ\r\n PROT\r\n" if ftps is not None else b""


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

    __slots__ = ("max_failures", "failures", "ftps", "_anonymous")

    def __init__(self, max_failures: int = 3, ftps: Ftps | None = None) -> None:
        self.max_failures = max_failures
        self.failures = 0
        self.ftps = ftps  # None: the node has no certificate
        self._anonymous = False  # USER without a prefix was sent: fail the PASS

    #: The verbs answered before login, by method name: a table per class, not per
    #: connection (a dialogue lives as long as its relayed control connection).
    _VERBS = {"USER": "_user", "PASS": "_pass", "QUIT": "_quit", "NOOP": "_noop", "AUTH": "_auth",
              "PBSZ": "_security", "PROT": "_security", "CCC": "_security"}

    def _quit(self, line: bytes, arg: bytes) -> list[Event]:
        return [Reply("221 Goodbye."), Close("quit")]

    def _noop(self, line: bytes, arg: bytes) -> list[Event]:
        return [Reply("200 NOOP ok.")]

    def _auth(self, line: bytes, arg: bytes) -> list[Event]:
        ftps = self.ftps
        if ftps is None:
            # TLS is not offered; a 5xx here makes lftp and FileZilla carry on in plain FTP.
            return [Reply("502 TLS is not available through this proxy.")]
        if ftps.secured:
            return [Reply("503 TLS is already on for this connection.")]
        mechanism = arg.strip().upper()
        if mechanism not in (b"TLS", b"SSL", b"TLS-C", b"TLS-P"):
            return [Reply("504 Only AUTH TLS is available.")]
        # AUTH SSL and TLS-P (the drafts before RFC 4217) meant protected data too;
        # vsftpd and ProFTPD keep that meaning.
        ftps.protect = mechanism in (b"SSL", b"TLS-P")
        return [Reply(f"234 AUTH {mechanism.decode()} successful."), StartTls()]

    def _security(self, line: bytes, arg: bytes) -> list[Event]:
        if self.ftps is None:
            return [Reply("530 Please log in with USER <prefix>_<user> first.")]
        verb, arg = split_command(line)
        return [Reply(self.ftps.answer(verb, arg))]

    def on_line(self, line: bytes) -> list[Event]:
        if len(line) > MAX_LINE:
            return [Reply("500 Command line too long."), Close("line too long")]
        verb, arg = split_command(line)
        if not verb:
            return [Reply("500 Syntax error, command unrecognized.")]
        name = self._VERBS.get(verb)
        if name is None:
            return [Reply("530 Please log in with USER <prefix>_<user> first.")]
        handler: Callable[[bytes, bytes], list[Event]] = getattr(self, name)
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
        if self.ftps is not None and self.ftps.require and not self.ftps.secured:
            # Before the password crosses in clear; not a failed login (no guess made).
            return [Reply("530 This proxy requires TLS: send AUTH TLS first, or use FTPS.")]
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
        start = line.index(b" ") + 1  # keep the verb, spacing and line ending as sent
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
#
# Fail closed: a command that sets up a data connection (PORT, EPRT, PASV, EPSV, and the
# long forms LPRT/LPSV of RFC 1639) is *recognised* the way the most lenient server would
# read it (Telnet commands skipped, any case, leading blanks), and *accepted* only in the
# exact form below. Anything else is answered by the node (501, 502, 504 or 522) and never
# reaches the device; what does reach it is rebuilt from the parsed numbers, never copied.
#
#   PORT <SP> h1,h2,h3,h4,p1,p2      six decimal numbers 0-255, no leading zeros, no
#                                    blanks inside (RFC 959 4.1.2); port 1024-65535
#   EPRT <SP> <d>af<d>addr<d>port<d> RFC 2428: d one ASCII character 33-126, af 1 (IPv4,
#                                    dotted quad, no leading zeros) or 2 (IPv6, no zone),
#                                    port decimal 1024-65535 without leading zeros
#   PASV                             no argument
#   EPSV [<SP> 1|2|ALL]              RFC 2428; another number is 522, anything else 501
#
# One or more spaces may separate verb and argument and trail the argument; the line ends
# in CRLF or LF. The address a client names is never used: the device gets the client's
# own (RFC 2577). Ports below 1024 are refused with 504 (RFC 2577 section 3).

#: Longest relayed command line (line end included) that reaches a device.  vsftpd reads
#: 4096 bytes per command at most; a server that cuts a longer line could take its tail
#: for a command of its own (a PORT behind padding), so such lines are answered 500.
MAX_COMMAND_LINE = 4096
#: Runs of commands sent on and not answered yet that are told apart (beyond: merged, and
#: their replies get the plain treatment: still rewritten, never translated).
MAX_PENDING = 4096
#: The node's own answers waiting behind unanswered commands; beyond that a pipelining
#: client gets no answer to further refused commands (no real client pipelines so much).
MAX_HELD_ANSWERS = 256
#: Answers not taken yet (:meth:`ControlRewriter.take_answers` after every feed keeps it small).
MAX_ANSWER_BYTES = 1 << 20

#: Telnet commands (RFC 854) a lenient server strips anywhere in a line (ProFTPD does):
#: IAC WILL/WONT/DO/DONT <option>, IAC SB ... IAC SE, IAC <command>.
_TELNET = re.compile(rb"\xff(?:[\xfb-\xfe].|\xfa.*?\xff\xf0|[^\xff])", re.S)
_LEADING_VERB = re.compile(rb"[ \t\x00]*([A-Za-z]+)")
#: A command line as accepted for a data verb: verb, optional argument, line end.
_COMMAND = re.compile(rb"([A-Za-z]+)(?: +([^ \r\n]+))? *\r?\n")
_NUMBER = rb"(?:0|[1-9][0-9]{0,2})"
_PORT_ARG = re.compile(rb"%s(?:,%s){5}" % (_NUMBER, _NUMBER))
_EPRT_PORT = re.compile(rb"[1-9][0-9]{0,4}")
_IPV4_CHARS = re.compile(rb"[0-9.]{7,15}")
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
#: Six numbers in a 227 reply, as clients find them (ftplib: the first such run).
_227_NUMBERS = re.compile(
    rb"(?<![0-9])([0-9]{1,3}) *, *([0-9]{1,3}) *, *([0-9]{1,3}) *, *([0-9]{1,3})"
    rb" *, *([0-9]{1,3}) *, *([0-9]{1,3})(?![0-9])"
)
_DATA_VERBS = frozenset({"PORT", "EPRT", "LPRT", "PASV", "EPSV", "LPSV"})


def command_verb(line: bytes) -> str:
    """The verb of a client's command line as a lenient server could read it: Telnet
    commands and leading blanks skipped, the letters up to the first other byte, upper case."""
    m = _LEADING_VERB.match(_TELNET.sub(b"", line))
    return m[1].decode("ascii").upper() if m else ""


def parse_port(arg: bytes) -> tuple[ipaddress.IPv4Address, int]:
    """(address, port) of a ``PORT`` argument in the exact form above; ``ValueError``
    for anything else (port 0 included: nothing can be dialled there)."""
    if not _PORT_ARG.fullmatch(arg):
        raise ValueError(f"not h1,h2,h3,h4,p1,p2: {arg[:64]!r}")
    numbers = [int(x) for x in arg.split(b",")]
    if max(numbers) > 255:
        raise ValueError(f"a number over 255: {arg!r}")
    port = numbers[4] << 8 | numbers[5]
    if not port:
        raise ValueError("port 0")
    return ipaddress.IPv4Address(bytes(numbers[:4])), port


def parse_eprt(arg: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """(address, port) of an ``EPRT`` argument (RFC 2428) in the exact form above;
    ``ValueError`` for anything else."""
    if not arg or not 33 <= arg[0] <= 126:
        raise ValueError(f"no delimiter: {arg[:64]!r}")
    fields = arg.split(arg[:1])
    if len(fields) != 5 or fields[0] or fields[4]:
        raise ValueError(f"not <d>af<d>addr<d>port<d>: {arg[:64]!r}")
    family, address, port_text = fields[1:4]
    if not _EPRT_PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"bad port {port_text[:16]!r}")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == b"1":
        if not _IPV4_CHARS.fullmatch(address):
            raise ValueError(f"bad IPv4 address {address[:64]!r}")
        ip = ipaddress.IPv4Address(address.decode("ascii"))  # no leading zeros, four parts
    elif family == b"2":
        if not _IPV6_CHARS.fullmatch(address):  # no zone id, nothing but the address
            raise ValueError(f"bad IPv6 address {address[:64]!r}")
        ip = ipaddress.IPv6Address(address.decode("ascii"))
    else:
        raise ValueError(f"unknown address family {family[:8]!r}")
    return ip, int(port_text)


def port_command(ip: ipaddress.IPv4Address, port: int) -> bytes:
    """``PORT h1,h2,h3,h4,p1,p2`` with its CRLF."""
    return b"PORT %s,%d,%d\r\n" % (str(ip).replace(".", ",").encode(), port >> 8, port & 255)


def eprt_command(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    """``EPRT |af|addr|port|`` with its CRLF."""
    return b"EPRT |%d|%s|%d|\r\n" % (1 if ip.version == 4 else 2, str(ip).encode(), port)


def parse_pasv_reply(line: bytes) -> tuple[ipaddress.IPv4Address, int] | None:
    """(address, port) of a ``227`` reply: the first run of six numbers, each 0-255, port
    not 0; None if there is none."""
    m = _227_NUMBERS.search(line)
    if not m:
        return None
    numbers = [int(x) for x in m.groups()]
    port = numbers[4] << 8 | numbers[5]
    if max(numbers) > 255 or not port:
        return None
    return ipaddress.IPv4Address(bytes(numbers[:4])), port


_229 = re.compile(rb"\(([!-~])\1\1([1-9][0-9]{0,4})\1\)")


def parse_epsv_reply(line: bytes) -> int | None:
    """The port of a ``229 … (|||port|)`` reply (RFC 2428: any delimiter 33-126, port
    1-65535 in decimal); None if there is none."""
    m = _229.search(line)
    if not m or int(m[2]) > 65535:
        return None
    return int(m[2])


def pasv_reply(ip: ipaddress.IPv4Address, port: int) -> bytes:
    """``227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).`` with its CRLF."""
    numbers = str(ip).replace(".", ",").encode()
    return b"227 Entering Passive Mode (%s,%d,%d).\r\n" % (numbers, port >> 8, port & 255)


def _ipv4(address: str) -> ipaddress.IPv4Address | None:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped
    return ip


def _client_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


_NO_PASV = b"425 Cannot open data connection: the device's passive reply did not parse.\r\n"


def rewrite_pasv_reply(line: bytes, public_address: str) -> bytes:
    """A device's ``227`` names an address the client cannot reach: the reply is rebuilt
    with ours and the device's port, or becomes ``425`` when it does not parse (or
    ``public_address`` has no IPv4 form)."""
    parsed = parse_pasv_reply(line)
    ip = _ipv4(public_address)
    if parsed is None:
        return _NO_PASV
    if ip is None:
        return b"425 Passive mode needs IPv4 here; use EPSV.\r\n"
    return pasv_reply(ip, parsed[1])


_REPLY = re.compile(rb"^(\d{3})([ -]?)")


class ControlRewriter:
    """Everything the proxy changes on a relayed control connection, line by line.

    - A client's ``PORT``/``EPRT`` address becomes its own (RFC 2577); a data verb
      that does not parse exactly is answered by the node (see above).
    - A device's ``227`` is rebuilt with the node's public address (``425`` if it
      does not parse).
    - ``EPSV`` (RFC 2428) reaches the device as ``PASV`` and its ``227`` goes back
      as ``229 (|||port|)``: the field device answers 502 to ``EPSV`` (docs/protocol.md),
      and the port is the proxy's in either form.  So clients that insist on ``EPSV``
      (IPv6 clients, ``EPSV ALL``) get passive mode too, and curl saves a round trip.
      ``EPSV ALL`` reaches the device as ``NOOP``, whose ``200`` is answered for it.
    - ``EPRT`` becomes ``PORT`` for an IPv4 client for the same reason.  An IPv6
      client's goes on as ``EPRT |2|…``: ``PORT`` has no IPv6 form.
    - Command lines over :data:`MAX_COMMAND_LINE`, or with a CR inside (Java's
      ``readLine``, the field device's, ends a line there too), are answered ``500``/``501``.

    :meth:`command` returns what the device gets, ``b""`` when the node answers
    the line itself; the answer is then in :meth:`take_answers`, or, if commands sent
    before it are still unanswered, comes out of :meth:`reply` right after their
    replies.  Replies are matched to commands in order, one final (non-1xx) reply
    each (RFC 959, 4.2), so pipelined commands are translated correctly.

    It also follows the login: :attr:`logged_in` once the device answered ``230``,
    and :attr:`failures` counts its ``530`` replies before that.
    """

    __slots__ = ("_client", "_public", "_ftps", "_data_port", "_pending", "_held", "_answers",
                 "_multiline", "_long", "logged_in", "failures")

    def __init__(
        self,
        client_ip: str,
        public_address: str,
        ftps: Ftps | None = None,
        data_port: Callable[[str, int], None] | None = None,
    ) -> None:
        self._client = _client_address(client_ip)
        self._public = public_address
        #: FTPS: the security commands are answered here, the FEAT reply completed.
        self._ftps = ftps
        #: Told of every data port set up (``("pasv", port)`` from a 227, ``("port",
        #: port)`` from PORT/EPRT), so that the data connection finds this connection.
        self._data_port = data_port or (lambda kind, port: None)
        #: Per run of commands sent on: [what its reply becomes, how many]; or the
        #: node's own answer waiting behind them: [answer bytes, how many].
        # A list, not a deque: it is almost always empty or short, and an empty deque
        # is 624 bytes for every idle control connection.
        self._pending: list[list] = []
        self._held = 0  # answers in _pending
        self._answers = bytearray()  # due to the client, not taken yet
        self._multiline: bytes | None = None  # code of the multi-line reply being passed on
        self._long = False  # inside a command line longer than the line splitter's limit
        self.logged_in = False
        self.failures = 0

    # ---- client → device ----------------------------------------------------------

    def command(self, line: bytes) -> bytes:
        """A line from the client, as the device gets it (``b""``: answered here)."""
        if not line.endswith(b"\n"):
            self._long = True  # a piece of an over-long line (or the rest at EOF)
            return b""
        if self._long or len(line) > MAX_COMMAND_LINE:
            self._long = False
            self._answer("500 Command line too long.")
            return b""
        body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in body:
            self._answer("501 A CR inside a command line is not accepted here.")
            return b""
        verb = command_verb(line)
        ftps = self._ftps
        if ftps is not None:
            if verb in _SECURITY_VERBS:
                self._answer(ftps.answer(verb, split_command(line)[1]))
                return b""
            if verb in _DATA_VERBS and (refusal := ftps.data_refusal()):
                self._answer(refusal)
                return b""
            if verb == "FEAT":
                self._expect("FEAT")
                return line
        if verb not in _DATA_VERBS:
            self._expect("")
            return line
        result = self._data_command(verb, line)
        if isinstance(result, str):
            self._answer(result)
            return b""
        out, expect = result
        self._expect(expect)
        return out

    def _data_command(self, verb: str, line: bytes) -> tuple[bytes, str] | str:
        """(line for the device, what its reply becomes), or the node's answer."""
        m = _COMMAND.fullmatch(line)
        if m is None or m[1].upper() != verb.encode():
            return f"501 Syntax error in the {verb} command."
        arg = m[2] or b""
        if verb == "PASV":
            return (b"PASV\r\n", "PASV") if not arg else "501 PASV takes no argument."
        if verb == "EPSV":
            if arg.upper() == b"ALL":
                return b"NOOP\r\n", "EPSV ALL"
            if arg in (b"", b"1", b"2"):
                return b"PASV\r\n", "EPSV"
            if arg.isdigit():
                return "522 Network protocol not supported, use (1,2)."
            return "501 Syntax: EPSV [1|2|ALL]."
        if verb == "LPRT":
            return "502 LPRT is not available through this proxy; use EPRT or PORT."
        if verb == "LPSV":
            return "502 LPSV is not available through this proxy; use EPSV or PASV."
        try:
            _, port = parse_port(arg) if verb == "PORT" else parse_eprt(arg)
        except ValueError:
            if verb == "PORT":
                return "501 Syntax: PORT h1,h2,h3,h4,p1,p2 (numbers 0-255)."
            return "501 Syntax: EPRT |1|IPv4 address|port| or |2|IPv6 address|port|."
        if port < 1024:
            return "504 Data port below 1024 refused (RFC 2577)."
        self._data_port("port", port)
        if isinstance(self._client, ipaddress.IPv4Address):
            return port_command(self._client, port), ""
        if verb == "PORT":
            return "501 PORT cannot name an IPv6 address; use EPRT."
        return eprt_command(self._client, port), ""

    def _expect(self, expect: str) -> None:
        last = self._pending[-1] if self._pending else None
        if last is not None and (last[0] == expect or (len(self._pending) >= MAX_PENDING
                                                       and isinstance(last[0], str))):
            last[1] += 1
        else:
            self._pending.append([expect, 1])

    def _answer(self, text: str) -> None:
        """The node answers a command: now, or after the replies to the commands before it."""
        data = text.encode() + b"\r\n"
        if not self._pending:
            if len(self._answers) < MAX_ANSWER_BYTES:
                self._answers += data
            return
        if self._held >= MAX_HELD_ANSWERS:
            return
        self._held += 1
        last = self._pending[-1]
        if last[0] == data:
            last[1] += 1
        else:
            self._pending.append([data, 1])

    def take_answers(self) -> bytes:
        """The node's answers due to the client now (call after every :meth:`command`)."""
        data, self._answers = bytes(self._answers), bytearray()
        return data

    # ---- device → client ----------------------------------------------------------

    def reply(self, line: bytes) -> bytes:
        """A line from the device, as the client gets it (with any of the node's own
        answers that were waiting for it)."""
        before = self.take_answers() if self._answers else b""
        m = _REPLY.match(line)
        if self._multiline is not None:
            if m and m[1] == self._multiline and m[2] == b" ":
                self._multiline = None
                expect = self._final()
                self._login_reply(m[1])
                if expect == "FEAT" and m[1] == b"211":
                    line = feat_lines(self._ftps) + line
                return before + line + self._release()
            return before + line
        if not m:
            return before + line
        if m[2] == b"-":
            self._multiline = m[1]
            return before + line
        if line.startswith(b"1"):
            return before + line  # preliminary: the command's final reply is still to come
        expect = self._final()
        self._login_reply(m[1])
        if m[1] == b"227":
            if parsed_port := parse_pasv_reply(line):
                self._data_port("pasv", parsed_port[1])
            if expect == "EPSV":
                parsed = parse_pasv_reply(line)
                line = b"229 Entering Extended Passive Mode (|||%d|)\r\n" % parsed[1] if parsed else _NO_PASV
            else:
                line = rewrite_pasv_reply(line, self._public)
        elif expect == "EPSV ALL" and line.startswith(b"2"):
            line = b"200 EPSV ALL command successful.\r\n"
        return before + line + self._release()

    def _login_reply(self, code: bytes) -> None:
        if not self.logged_in:
            if code == b"230":
                self.logged_in = True
            elif code == b"530":
                self.failures += 1

    def _final(self) -> str:
        """What the oldest unanswered command's reply becomes ("" if none is known)."""
        if not self._pending or not isinstance(self._pending[0][0], str):
            return ""
        head = self._pending[0]
        head[1] -= 1
        if not head[1]:
            self._pending.pop(0)
        return head[0]

    def _release(self) -> bytes:
        """The node's answers whose turn has come."""
        out = b""
        while self._pending and isinstance(self._pending[0][0], bytes):
            data, count = self._pending.pop(0)
            self._held -= count
            out += data * count
        return out


class LineSplitter:
    """Cuts a byte stream into lines for rewriting, passing over-long lines on in pieces
    (through the rewriting too, which may hold them back)."""

    __slots__ = ("_rewrite", "_max", "_partial")

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
        """The unfinished last line (at the end of the stream), rewritten as a fragment."""
        rest, self._partial = self._partial, b""
        return self._rewrite(rest) if rest else b""


def parse_port_argument(verb: str, arg: bytes) -> tuple[str, int]:
    """(address, port) of a ``PORT h1,h2,h3,h4,p1,p2`` or ``EPRT |af|addr|port|``
    argument in the exact form the node accepts (surrounding spaces allowed);
    ``ValueError`` for anything else.  An IPv4-mapped IPv6 address comes out as IPv4."""
    arg = arg.strip(b" ")
    if verb.upper() == "PORT":
        ip, port = parse_port(arg)
    elif verb.upper() == "EPRT":
        ip, port = parse_eprt(arg)
    else:
        raise ValueError(f"not PORT or EPRT: {verb[:16]!r}")
    return normalize_ip(str(ip)), port
