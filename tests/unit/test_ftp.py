"""The FTP pre-login dialogue and the rewriting of relayed lines, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from swiftftp.ftp import (
    Close,
    ControlRewriter,
    Failure,
    LineSplitter,
    Lookup,
    PreLogin,
    Reply,
    parse_port_argument,
    rewrite_pasv_reply,
)


def replies(events) -> list[str]:
    return [e.text[:3] for e in events if isinstance(e, Reply)]


def test_user_with_prefix_keeps_the_rest_as_sent() -> None:
    d = PreLogin()
    [lookup] = d.on_line(b"USER AbCdE_Bob_Smith\r\n")
    assert lookup == Lookup("abcde", b"USER Bob_Smith\r\n")
    [lookup] = d.on_line(b"user abcde_x\n")
    assert lookup == Lookup("abcde", b"user x\n")


def test_anonymous_then_pass_fails_with_a_hint() -> None:
    d = PreLogin()
    assert replies(d.on_line(b"USER anonymous\r\n")) == ["331"]
    events = d.on_line(b"PASS me@\r\n")
    assert replies(events) == ["530"] and any(isinstance(e, Failure) for e in events)
    assert "<prefix>_<user>" in next(e.text for e in events if isinstance(e, Reply))


def test_third_failure_closes() -> None:
    d = PreLogin(max_failures=3)
    assert not any(isinstance(e, Close) for e in d.unknown_prefix("aaaaa"))
    assert not any(isinstance(e, Close) for e in d.unknown_prefix("bbbbb"))
    assert any(isinstance(e, Close) for e in d.unknown_prefix("ccccc"))


def test_verbs_before_login() -> None:
    d = PreLogin()
    assert replies(d.on_line(b"QUIT\r\n")) == ["221"]
    assert replies(d.on_line(b"AUTH TLS\r\n")) == ["502"]
    assert replies(d.on_line(b"NOOP\r\n")) == ["200"]
    assert replies(d.on_line(b"SYST\r\n")) == ["530"]
    assert replies(d.on_line(b"PASS x\r\n")) == ["503"]
    assert replies(d.on_line(b"\r\n")) == ["500"]
    assert replies(d.on_line(b"USER\r\n")) == ["501"]
    assert replies(d.on_line(b"USER bad!prefix_x\r\n")) == ["530"]
    assert d.failures == 1


def test_pasv_reply_rewrite() -> None:
    line = b"227 Entering Passive Mode (10,0,0,2,156,64).\r\n"
    assert rewrite_pasv_reply(line, "203.0.113.9") == b"227 Entering Passive Mode (203,0,113,9,156,64).\r\n"
    # rebuilt, never copied: the device's text goes, the numbers are ours
    assert rewrite_pasv_reply(b"227 =10,0,0,2,1,2\r\n", "1.2.3.4") == (
        b"227 Entering Passive Mode (1,2,3,4,1,2).\r\n"
    )
    assert rewrite_pasv_reply(line, "::ffff:1.2.3.4").startswith(b"227 Entering Passive Mode (1,2,3,4,")
    assert rewrite_pasv_reply(line, "2001:db8::1").startswith(b"425 ")  # no IPv4 to offer
    for bad in (b"227 Entering Passive Mode (10,0,0,2,256,1).\r\n",  # not a byte
                b"227 Entering Passive Mode (0127,0,0,2,1,2).\r\n",  # a fourth digit
                b"227 Entering Passive Mode (10,0,0,2,0,0).\r\n",  # port 0
                b"227 Entering Passive Mode.\r\n"):
        assert rewrite_pasv_reply(bad, "1.2.3.4").startswith(b"425 "), bad


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_line_splitter_loses_nothing(data: bytes, cuts: list[int]) -> None:
    s = LineSplitter(max_line=64)
    points = sorted(c for c in cuts if c <= len(data))
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    out = b"".join(s.feed(p) for p in pieces) + s.flush()
    assert out == data


def test_parse_port_argument() -> None:
    assert parse_port_argument("PORT", b"127,0,0,1,4,1") == ("127.0.0.1", 1025)
    assert parse_port_argument("EPRT", b"|1|10.0.0.5|5282|") == ("10.0.0.5", 5282)
    assert parse_port_argument("EPRT", b"|2|::ffff:1.2.3.4|5282|") == ("1.2.3.4", 5282)
    assert parse_port_argument("EPRT", b"!2!2001:db8::1!65535!") == ("2001:db8::1", 65535)
    for verb, bad in (("PORT", b"1,2,3"), ("PORT", b"1,2,3,4,5,300"), ("EPRT", b"|3|x|1|"), ("EPRT", b""),
                      ("PORT", b"0127,0,0,2,233,65"), ("PORT", b"127,0,0,2,233,065"),
                      ("PORT", b"1,2,3,4,0,0"), ("PORT", b"1, 2,3,4,5,6"), ("PORT", b"+1,2,3,4,5,6"),
                      ("PORT", "\u0661,2,3,4,5,6".encode()), ("EPRT", b"|1|127.0.0.2|059713|"),
                      ("EPRT", b"|1|127.0.0.2|0|"), ("EPRT", b"|1|127.0.0.2|65536|"),
                      ("EPRT", b"|1|127.000.0.2|5000|"), ("EPRT", b"|1|::1|5000|"),
                      ("EPRT", b"|2|127.0.0.1|5000|"), ("EPRT", b"|2|fe80::1%eth0|5000|"),
                      ("EPRT", b"|1|127.0.0.2|5000"), ("EPRT", b"|1|127.0.0.2|5000||"),
                      ("EPRT", b" |1|127.0.0.2|5000|"[1:] + b"x"), ("EPRT", b"\x7f1\x7f1.2.3.4\x7f5000\x7f"),
                      ("LPRT", b"4,4,1,2,3,4,2,4,1")):
        try:
            parse_port_argument(verb, bad)
        except ValueError:
            continue
        raise AssertionError(f"{verb} {bad!r} accepted")


def test_epsv_reaches_the_device_as_pasv_and_comes_back_as_229() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    assert r.command(b"EPSV\r\n") == b"PASV\r\n"
    assert r.reply(b"227 Entering Passive Mode (10,0,0,2,156,64).\r\n") == (
        b"229 Entering Extended Passive Mode (|||40000|)\r\n"
    )
    assert r.command(b"epsv 2\r\n") == b"PASV\r\n"
    assert r.reply(b"425 Cannot open data connection.\r\n") == b"425 Cannot open data connection.\r\n"
    assert r.command(b"PASV\r\n") == b"PASV\r\n"  # a plain PASV keeps its 227, our address in it
    assert r.reply(b"227 Entering Passive Mode (10,0,0,2,156,64).\r\n") == (
        b"227 Entering Passive Mode (203,0,113,1,156,64).\r\n"
    )


def test_epsv_all_is_answered_through_a_noop() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    assert r.command(b"EPSV ALL\r\n") == b"NOOP\r\n"
    assert r.reply(b"200 NOOP ok.\r\n") == b"200 EPSV ALL command successful.\r\n"


def test_eprt_becomes_port_for_ipv4_clients_only() -> None:
    v4 = ControlRewriter("198.51.100.7", "203.0.113.1")
    assert v4.command(b"EPRT |1|192.0.2.9|50000|\r\n") == b"PORT 198,51,100,7,195,80\r\n"
    assert v4.command(b"EPRT |2|2001:db8::9|50000|\r\n") == b"PORT 198,51,100,7,195,80\r\n"
    v6 = ControlRewriter("2001:db8::7", "2001:db8::1")
    assert v6.command(b"EPRT |2|2001:db8::9|50000|\r\n") == b"EPRT |2|2001:db8::7|50000|\r\n"


# What a device that only knows PASV answers to each command, as reply lines.
DEVICE_ANSWERS = {
    b"NOOP": [b"200 NOOP ok.\r\n"],
    b"FEAT": [b"211-Features:\r\n", b" SIZE\r\n", b" 227 is not a reply here\r\n", b"211 End\r\n"],
    b"RETR": [b"150 Opening data connection.\r\n", b"226 Transfer complete.\r\n"],
    b"PASV": [b"227 Entering Passive Mode (10,0,0,2,4,1).\r\n"],
    b"SIZE": [b"550 No such file.\r\n"],
}


@given(st.lists(st.sampled_from([b"NOOP", b"FEAT", b"RETR", b"PASV", b"EPSV", b"SIZE"]), max_size=30))
def test_pipelined_commands_get_their_own_translation(commands: list[bytes]) -> None:
    """All commands sent at once, all replies after: each EPSV still gets a 229, each
    PASV a 227, whatever multi-line and preliminary replies come in between."""
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    sent = [r.command(c + b"\r\n").rstrip() for c in commands]
    assert b"EPSV" not in sent
    replies = [r.reply(line) for c in sent for line in DEVICE_ANSWERS[c]]
    finals = [line for line in replies if line[:3].isdigit() and line[3:4] == b" " and line[:1] != b"1"]
    assert len(finals) == len(commands)
    for command, final in zip(commands, finals, strict=True):
        if command == b"EPSV":
            assert final == b"229 Entering Extended Passive Mode (|||1025|)\r\n"
        elif command == b"PASV":
            assert final == b"227 Entering Passive Mode (203,0,113,1,4,1).\r\n"
        else:
            assert not final.startswith((b"227", b"229"))


# ---- fail closed: data verbs that do not parse exactly are answered by the node ----------


def node_answer(r: ControlRewriter, line: bytes) -> str:
    """The node's own answer to ``line`` (which must not reach the device)."""
    assert r.command(line) == b""
    answer = r.take_answers()
    assert answer.endswith(b"\r\n") and answer.count(b"\r\n") == 1, answer
    return answer.decode()


def test_issue_8_port_and_eprt_that_do_not_parse_get_501() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    # vsftpd and pyftpdlib read this as 127.0.0.2: never passed on
    assert node_answer(r, b"PORT 0127,0,0,2,233,65\r\n").startswith("501 ")
    # RFC 2428 ports are decimal 1-65535: six digits are not one
    assert node_answer(r, b"EPRT |1|127.0.0.2|059713|\r\n").startswith("501 ")
    for line in (b"PORT 1,2,3,4,5\r\n", b"PORT\r\n", b"PORT 1,2,3,4,5,6,7\r\n", b"PORT 1,2,3,4,5,6 x\r\n",
                 b"EPRT\r\n", b"EPRT |1|1.2.3.4|5000\r\n", b"EPRT |3|1.2.3.4|5000|\r\n",
                 b" PORT 1,2,3,4,5,6\r\n", b"\xff\xf1PORT 1,2,3,4,5,6\r\n", b"PO\xff\xf1RT 1,2,3,4,5,6\r\n",
                 b"PORT\t1,2,3,4,5,6\r\n", b"PORT 1,2,3,4,5,6\x00\r\n", b"EPSV x\r\n", b"PASV 1\r\n"):
        assert node_answer(r, line).startswith("501 "), line
    assert node_answer(r, b"EPSV 3\r\n").startswith("522 ")
    assert node_answer(r, b"PORT 1,2,3,4,3,255\r\n").startswith("504 ")  # port 1023 (RFC 2577)
    assert node_answer(r, b"LPRT 4,4,1,2,3,4,2,4,1\r\n").startswith("502 ")
    assert node_answer(r, b"LPSV\r\n").startswith("502 ")


def test_port_and_eprt_reach_the_device_rebuilt_with_the_client_address() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    assert r.command(b"PORT 6,6,6,6,4,1\r\n") == b"PORT 198,51,100,7,4,1\r\n"
    assert r.command(b"port  6,6,6,6,4,1  \n") == b"PORT 198,51,100,7,4,1\r\n"
    assert r.command(b"EPRT |1|6.6.6.6|1025|\r\n") == b"PORT 198,51,100,7,4,1\r\n"
    assert r.command(b"eprt #2#2001:db8::6#1025#\r\n") == b"PORT 198,51,100,7,4,1\r\n"
    assert r.take_answers() == b""
    v6 = ControlRewriter("2001:db8::5", "2001:db8::1")
    assert v6.command(b"EPRT |2|::6|1025|\r\n") == b"EPRT |2|2001:db8::5|1025|\r\n"
    assert v6.command(b"EPRT |1|6.6.6.6|1025|\r\n") == b"EPRT |2|2001:db8::5|1025|\r\n"
    v6 = ControlRewriter("2001:db8::5", "2001:db8::1")
    assert node_answer(v6, b"PORT 6,6,6,6,4,1\r\n").startswith("501 ")
    mapped = ControlRewriter("::ffff:198.51.100.7", "203.0.113.1")
    assert mapped.command(b"EPRT |2|::6|1025|\r\n") == b"PORT 198,51,100,7,4,1\r\n"


def test_other_commands_pass_unchanged() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    for line in (b"RETR x\r\n", b"\xff\xf4\xff\xf2ABOR\r\n", b"PORTABLE\r\n", b"STOR PORT 1,2,3,4,5,6\r\n",
                 b"SITE EPRT |1|6.6.6.6|1025|\n"):
        assert r.command(line) == line
    assert r.take_answers() == b""


def test_long_lines_and_inner_cr_never_reach_the_device() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    # a server that cuts lines at 4096 bytes would read the tail as a command
    padded = b"NOOP " + b" " * 4200 + b"PORT 6,6,6,6,4,1\r\n"
    assert node_answer(r, padded).startswith("500 ")
    # Java's readLine (the field device's) ends a line at a lone CR too
    assert node_answer(r, b"NOOP\rPORT 6,6,6,6,4,1\r\n").startswith("501 ")
    # pieces of a line over the splitter's limit, and the rest at EOF, are held back
    s = LineSplitter(r.command, max_line=64)
    assert s.feed(b"PORT 6,6,6,6,4,1" + b" " * 100) == b""
    assert s.feed(b"  \r\nNOOP\r\n") == b"NOOP\r\n"
    assert r.take_answers().startswith(b"500 ")
    assert s.feed(b"PORT 6,6,6,6,4,1") == b"" and s.flush() == b""
    assert r.take_answers() == b""


def test_the_nodes_answers_wait_for_the_replies_before_them() -> None:
    """Pipelined: NOOP, a bad PORT, PASV — the 501 comes between the device's two replies."""
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    sent = [r.command(b"NOOP\r\n"), r.command(b"PORT 0127,0,0,2,233,65\r\n"), r.command(b"PASV\r\n")]
    assert sent == [b"NOOP\r\n", b"", b"PASV\r\n"]
    assert r.take_answers() == b""
    out = r.reply(b"200 NOOP ok.\r\n")
    assert out.startswith(b"200 NOOP ok.\r\n501 ")
    assert r.reply(b"227 Entering Passive Mode (10,0,0,2,4,1).\r\n") == (
        b"227 Entering Passive Mode (203,0,113,1,4,1).\r\n"
    )


def test_held_answers_are_bounded() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    r.command(b"NOOP\r\n")
    for _ in range(10_000):
        assert r.command(b"PORT x\r\n") == b""
    out = r.reply(b"200 NOOP ok.\r\n")
    assert out.count(b"\r\n501 ") == 256  # MAX_HELD_ANSWERS; the rest get none


_octet = st.integers(0, 255)
_ipv4s = st.builds(lambda *o: ".".join(map(str, o)), _octet, _octet, _octet, _octet)


@given(_ipv4s, st.integers(1, 65535))
def test_port_round_trip(address: str, port: int) -> None:
    import ipaddress

    from swiftftp.ftp import parse_port, port_command

    line = port_command(ipaddress.IPv4Address(address), port)
    assert parse_port(line[5:-2]) == (ipaddress.IPv4Address(address), port)


@given(st.ip_addresses(), st.integers(1, 65535), st.sampled_from("|!#$%&'()*+,-/;<=>?@[]^_`{}~"))
def test_eprt_round_trip(ip, port: int, delimiter: str) -> None:
    from swiftftp.ftp import parse_eprt

    arg = f"{delimiter}{1 if ip.version == 4 else 2}{delimiter}{ip}{delimiter}{port}{delimiter}"
    assert parse_eprt(arg.encode()) == (ip, port)


@given(st.binary(max_size=80) | st.from_regex(rb"\A(?:PORT|EPRT|EPSV|PASV|port|eprt) [ -~]{0,60}\r\n\Z"))
def test_only_the_clients_address_ever_reaches_the_device(line: bytes) -> None:
    """Whatever the client sends, a PORT the device gets names the client, an EPRT never
    gets through (an IPv4 client's becomes PORT), and a line is passed on or answered."""
    from swiftftp.ftp import command_verb

    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    out = r.command(line + (b"" if line.endswith(b"\n") else b"\r\n"))
    answer = r.take_answers()
    assert bool(out) != bool(answer)
    verb = command_verb(out)
    if verb == "PORT":
        assert out.startswith(b"PORT 198,51,100,7,") and out.endswith(b"\r\n")
    assert verb not in ("EPRT", "LPRT", "LPSV")
    if verb in ("PASV", "EPSV"):
        assert out == b"PASV\r\n"


def test_passive_replies_for_the_agent() -> None:
    """The agent reads its local server's 227/229 with these: strict, None when not exact."""
    import ipaddress

    from swiftftp.ftp import parse_epsv_reply, parse_pasv_reply

    assert parse_pasv_reply(b"227 Entering Passive Mode (127,0,0,1,195,80).\r\n") == (
        ipaddress.IPv4Address("127.0.0.1"), 50000)
    assert parse_pasv_reply(b"227 (0127,0,0,1,195,80)\r\n") is None
    assert parse_pasv_reply(b"227 (127,0,0,1,256,80)\r\n") is None
    assert parse_epsv_reply(b"229 Entering Extended Passive Mode (|||50000|)\r\n") == 50000
    assert parse_epsv_reply(b"229 (!!!65535!)\r\n") == 65535
    for bad in (b"229 (|||0|)", b"229 (|||99999|)", b"229 (|||050000|)", b"229 (||50000|)", b"229 (|||x|)"):
        assert parse_epsv_reply(bad) is None, bad
