"""FTPS in the pre-login dialogue and the control-line rewriting, without sockets:
AUTH/PBSZ/PROT/CCC answered by the node, in reply order; FEAT completed; the data
ports a control connection sets up reported (for its PROT P data connections)."""

from __future__ import annotations

from swiftftp.ftp import ControlRewriter, Ftps, Lookup, PreLogin, Reply, StartTls


def replies(events: list) -> list[str]:
    return [e.text for e in events if isinstance(e, Reply)]


def test_auth_tls_without_a_certificate_is_502() -> None:
    assert replies(PreLogin().on_line(b"AUTH TLS\r\n")) == ["502 TLS is not available through this proxy."]


def test_auth_tls_then_security_commands_before_user() -> None:
    ftps = Ftps(tag=b"t")
    dialogue = PreLogin(3, ftps)
    assert replies(dialogue.on_line(b"PBSZ 0\r\n"))[0].startswith("503")
    events = dialogue.on_line(b"AUTH TLS\r\n")
    assert replies(events) == ["234 AUTH TLS successful."] and any(isinstance(e, StartTls) for e in events)
    ftps.secured = True  # the caller did start TLS
    assert replies(dialogue.on_line(b"AUTH TLS\r\n"))[0].startswith("503")
    assert replies(dialogue.on_line(b"PBSZ 0\r\n")) == ["200 PBSZ=0"]
    assert replies(dialogue.on_line(b"PROT P\r\n"))[0].startswith("200")
    assert ftps.protect
    assert replies(dialogue.on_line(b"PROT E\r\n"))[0].startswith("536")
    assert replies(dialogue.on_line(b"PROT X\r\n"))[0].startswith("504")
    assert replies(dialogue.on_line(b"CCC\r\n"))[0].startswith("534")
    assert replies(dialogue.on_line(b"AUTH KERBEROS\r\n"))[0].startswith("503")


def test_auth_ssl_means_protected_data() -> None:
    ftps = Ftps()
    PreLogin(3, ftps).on_line(b"AUTH SSL\r\n")
    assert ftps.protect


def test_user_refused_in_clear_when_tls_is_required() -> None:
    ftps = Ftps(require=True)
    dialogue = PreLogin(3, ftps)
    events = dialogue.on_line(b"USER abcde_bob\r\n")
    assert replies(events)[0].startswith("530 This proxy requires TLS")
    assert dialogue.failures == 0  # not a guess
    ftps.secured = True
    assert isinstance(dialogue.on_line(b"USER abcde_bob\r\n")[0], Lookup)


def test_security_commands_after_login_answered_in_reply_order() -> None:
    ftps = Ftps(secured=True)
    ports: list[tuple[str, int]] = []
    rw = ControlRewriter("127.0.0.1", "127.0.0.1", ftps, lambda kind, port: ports.append((kind, port)))
    assert rw.command(b"NOOP\r\n") == b"NOOP\r\n"
    assert rw.command(b"PBSZ 0\r\n") == b""
    assert rw.command(b"PROT P\r\n") == b""
    assert rw.take_answers() == b""  # behind the NOOP's reply
    out = rw.reply(b"200 NOOP ok.\r\n")
    assert out == b"200 NOOP ok.\r\n200 PBSZ=0\r\n200 Protection level set to Private.\r\n"
    assert ftps.protect
    assert rw.command(b"CCC\r\n") == b""
    assert rw.take_answers().startswith(b"534")
    assert rw.command(b"PASV\r\n") == b"PASV\r\n"
    rw.reply(b"227 Entering Passive Mode (10,0,0,1,195,80).\r\n")
    assert rw.command(b"PORT 127,0,0,1,200,10\r\n").startswith(b"PORT")
    assert ports == [("pasv", 195 * 256 + 80), ("port", 200 * 256 + 10)]


def test_feat_reply_gets_the_tls_features() -> None:
    rw = ControlRewriter("127.0.0.1", "127.0.0.1", Ftps(secured=True))
    assert rw.command(b"FEAT\r\n") == b"FEAT\r\n"
    out = rw.reply(b"211-Features:\r\n") + rw.reply(b" MDTM\r\n") + rw.reply(b"211 End\r\n")
    assert out == b"211-Features:\r\n MDTM\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n"


def test_data_protection_required() -> None:
    ftps = Ftps(secured=True, require_protection=True)
    rw = ControlRewriter("127.0.0.1", "127.0.0.1", ftps)
    assert rw.command(b"PASV\r\n") == b""
    assert rw.take_answers().startswith(b"521")
    rw.command(b"PROT P\r\n")
    rw.take_answers()
    assert rw.command(b"EPSV\r\n") == b"PASV\r\n"


def test_without_tls_security_commands_pass_as_before() -> None:
    rw = ControlRewriter("127.0.0.1", "127.0.0.1")
    assert rw.command(b"PBSZ 0\r\n") == b"PBSZ 0\r\n"
