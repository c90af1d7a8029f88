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
    rewrite_port_command,
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
    assert rewrite_pasv_reply(b"227 =10,0,0,2,1,2\r\n", "1.2.3.4") == b"227 =1,2,3,4,1,2\r\n"
    assert rewrite_pasv_reply(line, "::ffff:1.2.3.4").startswith(b"227 Entering Passive Mode (1,2,3,4,")
    assert rewrite_pasv_reply(line, "2001:db8::1") == line  # no IPv4 to offer
    assert rewrite_pasv_reply(b"200 (10,0,0,2,1,2)\r\n", "1.2.3.4") == b"200 (10,0,0,2,1,2)\r\n"


def test_port_commands_are_pinned_to_the_client() -> None:
    assert rewrite_port_command(b"PORT 6,6,6,6,4,1\r\n", "198.51.100.7") == b"PORT 198,51,100,7,4,1\r\n"
    eprt = rewrite_port_command(b"EPRT |1|6.6.6.6|1025|\r\n", "198.51.100.7")
    assert eprt == b"EPRT |1|198.51.100.7|1025|\r\n"
    assert rewrite_port_command(b"EPRT |2|::6|1025|\r\n", "2001:db8::5") == b"EPRT |2|2001:db8::5|1025|\r\n"
    assert rewrite_port_command(b"RETR x\r\n", "1.2.3.4") == b"RETR x\r\n"


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
    for verb, bad in (("PORT", b"1,2,3"), ("PORT", b"1,2,3,4,5,300"), ("EPRT", b"|3|x|1|"), ("EPRT", b"")):
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
