"""The agent's parts without a network: strict parsing of passive replies and active
commands, the state directory's lock and default, the one-line reasons it logs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from swiftftp.agent import (
    StateDirLocked,
    StateLock,
    default_state_dir,
    describe,
    endpoint,
    parse_227,
    parse_229,
    parse_active,
)
from swiftftp.errors import PeerClosed


@pytest.mark.parametrize(("reply", "expected"), [
    (b"227 Entering Passive Mode (127,0,0,1,78,32).", ("127.0.0.1", 20000)),
    (b"227 Entering Passive Mode (192,168,1,10,0,1)\r\n", ("192.168.1.10", 1)),
    (b"227 =10,0,0,2,255,255", ("10.0.0.2", 65535)),  # RFC 1123: parentheses optional
])
def test_227_parses(reply: bytes, expected: tuple[str, int]) -> None:
    assert parse_227(reply) == expected


@pytest.mark.parametrize("reply", [
    b"227 Entering Passive Mode (127,0,0,1,78)",  # five numbers
    b"227 Entering Passive Mode (127,0,0,1,78,32,1)",  # seven
    b"227 Entering Passive Mode (127,0,0,256,78,32)",  # a number above 255
    b"227 Entering Passive Mode (127,0,0,1,0,0)",  # port 0
    b"227 Entering Passive Mode (127,0,0,1,1000,1)",
    b"227 (127,0,0,1,78,32) or (127,0,0,1,78,33)",  # two groups
    b"227 Entering Passive Mode (127, 0, 0, 1, 78, 32)",  # spaces
    b"227 Entering Passive Mode",
])
def test_227_that_does_not_parse(reply: bytes) -> None:
    assert parse_227(reply) is None


@pytest.mark.parametrize(("reply", "port"), [
    (b"229 Entering Extended Passive Mode (|||6446|)", 6446),
    (b"229 Extended Passive mode OK (|||22728|)\r\n", 22728),
    (b"229 Entering Extended Passive Mode (!!!65535!)", 65535),
])
def test_229_parses(reply: bytes, port: int) -> None:
    assert parse_229(reply) == port


@pytest.mark.parametrize("reply", [
    b"229 Entering Extended Passive Mode (||6446|)",  # two delimiters
    b"229 Entering Extended Passive Mode (|||6446!)",  # mixed
    b"229 Entering Extended Passive Mode (|||0|)",
    b"229 Entering Extended Passive Mode (|||65536|)",
    b"229 Entering Extended Passive Mode (   6446 )",  # space is not a delimiter
    b"229 Entering Extended Passive Mode (|||6446|) (|||6447|)",
    b"229 Entering Extended Passive Mode",
])
def test_229_that_does_not_parse(reply: bytes) -> None:
    assert parse_229(reply) is None


def test_active_arguments() -> None:
    assert parse_active("PORT", b"127,0,0,1,78,32") == ("127.0.0.1", 20000)
    assert parse_active("EPRT", b"|2|::1|6446|") == ("::1", 6446)
    assert parse_active("EPRT", b"|1|10.0.0.7|1024|") == ("10.0.0.7", 1024)
    for verb, arg in [("PORT", b"1,2,3"), ("PORT", b"127,0,0,1,0,0"), ("PORT", b"127,0,0,1,300,1"),
                      ("PORT", b"a,b,c,d,e,f"), ("EPRT", b"|3|x|1|"), ("EPRT", b"|1|127.0.0.1|0|"),
                      ("EPRT", b"|1|127.0.0.1|70000|"), ("EPRT", b"|1|not-an-ip|21|"), ("EPRT", b"")]:
        with pytest.raises(ValueError):
            parse_active(verb, arg)


def test_state_dir_lock(tmp_path: Path) -> None:
    """One holder at a time (flock: two in one process exclude each other too);
    released, the directory can be taken again."""
    first, second = StateLock(tmp_path / "state"), StateLock(tmp_path / "state")
    first.acquire()
    try:
        with pytest.raises(StateDirLocked, match=r"another swiftftp-agent \(pid \d+\) is running on "
                                                  r"the state directory .*; give each agent its own"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_state_dir_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateDirLocked, match="cannot use the state directory"):
        StateLock(tmp_path / "file" / "state").acquire()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "swiftftp-agent"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / ".local" / "state" / "swiftftp-agent"


def test_reasons_are_short() -> None:
    assert describe(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "connection refused"
    refused = OSError(errno.ECONNREFUSED, "connect to 127.0.0.1:21: ECONNREFUSED")  # swiftftp.aio's
    assert describe(refused) == "connection refused"
    assert describe(TimeoutError(), 10) == "no answer within 10 s"
    closed = "the FTP server closed the connection"
    assert describe(PeerClosed(closed)) == closed
    assert endpoint("::1", 21) == "[::1]:21"
    assert endpoint("127.0.0.1", 21) == "127.0.0.1:21"


def test_tls_options_are_checked_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--ca`` needs ``--tls``; a CA file that does not load is one line, exit 2."""
    from swiftftp.cli import agent_main

    base = ["--proxy", "127.0.0.1:9", "--ftp", "127.0.0.1:9", "--state-dir", str(tmp_path / "s")]
    assert agent_main([*base, "--ca", "ca.pem"]) == 2
    assert capsys.readouterr().err == "swiftftp-agent: --ca needs --tls\n"
    missing = tmp_path / "missing.pem"
    assert agent_main([*base, "--tls", "--ca", str(missing)]) == 2
    assert capsys.readouterr().err == f"swiftftp-agent: --ca {missing}: No such file or directory\n"
    (tmp_path / "junk.pem").write_text("junk")
    assert agent_main([*base, "--tls", "--ca", str(tmp_path / "junk.pem")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"swiftftp-agent: --ca {tmp_path / 'junk.pem'}: ") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # nothing started


def test_tls_failures_read_as_one_phrase() -> None:
    import ssl

    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    assert describe(failure) == ("the node's TLS certificate does not verify: "
                                 "unable to get local issuer certificate")
