"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read untrusted bytes.
Not part of the test suite; see fuzz/README.md.

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz.py TARGET -runs=1000000 [libFuzzer flags…]

Targets and the invariants each input is held to (a broken one raises, and libFuzzer
keeps the input as ``crash-…``):

``json``     protocol.JsonStreamDecoder, fed in arbitrary pieces. Raw bytes: nothing but
             ProtocolError comes out, and the buffer never holds more than the limit plus
             the last piece. A valid stream (objects built from the input, whitespace
             between them): every object comes out, in order, whatever the pieces.
``prelogin`` ftp.PreLogin.on_line, line after line: a list of events, replies one line
             with a three-digit code, a Lookup only for a valid prefix with the line as
             the device gets it, a Close once the failures reach the limit.
``rewriter`` ftp.ControlRewriter behind LineSplitters as the node uses them, client and
             device bytes interleaved: bytes out; every PORT the device gets names the
             client, no EPRT/LPRT/LPSV does (IPv4 client) or EPRT names the client (IPv6);
             bounded state. A structured half: commands from a small vocabulary (good and
             bad data verbs among them), each answered by a device model: the client sees
             one final reply per command, in order (the node's own answers included).
``port``     ftp.parse_port / parse_eprt / parse_port_argument on raw bytes: what is
             accepted converts and comes back the same (PORT: the input is the canonical
             form), and a PORT line built from it passes the rewriter.
"""

from __future__ import annotations

import ipaddress
import sys

import atheris

with atheris.instrument_imports(include=["swiftftp"]):
    import orjson

    from swiftftp import ftp, protocol
    from swiftftp.errors import ProtocolError

CLIENT4, CLIENT6, PUBLIC = "198.51.100.7", "2001:db8::7", "203.0.113.1"


# ---- json -----------------------------------------------------------------------------------


def _pieces(fdp: atheris.FuzzedDataProvider, data: bytes) -> list[bytes]:
    cuts = sorted(fdp.ConsumeIntInRange(0, len(data)) for _ in range(fdp.ConsumeIntInRange(0, 8)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 6 if depth < 3 else 3)
    if kind == 0:
        return fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 1:
        return fdp.ConsumeIntInRange(-(2**53), 2**53)
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.ConsumeUnicodeNoSurrogates(6): _value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))}


def fuzz_json(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decoder = protocol.JsonStreamDecoder(max_size=512)
    if fdp.ConsumeBool():  # raw bytes
        for piece in _pieces(fdp, fdp.ConsumeBytes(fdp.remaining_bytes())):
            decoder.feed(piece)
            try:
                while (obj := decoder.pop()) is not None:
                    assert isinstance(obj, dict)
            except ProtocolError:
                return
            assert len(decoder._buf) <= 512 + len(piece), "decoder buffer unbounded"
        return
    objects = [{"action": fdp.ConsumeUnicodeNoSurrogates(8), "v": _value(fdp)}
               for _ in range(fdp.ConsumeIntInRange(1, 4))]
    stream = b"".join(orjson.dumps(o) + b" \r\n\t"[: fdp.ConsumeIntInRange(0, 4)] for o in objects)
    if any(len(orjson.dumps(o)) > 512 for o in objects):
        return
    got = []
    for piece in _pieces(fdp, stream):
        decoder.feed(piece)
        while (obj := decoder.pop()) is not None:
            got.append(obj)
    assert got == objects, (got, objects)
    assert decoder.rest().strip() == b""


# ---- pre-login -----------------------------------------------------------------------------


def fuzz_prelogin(data: bytes) -> None:
    dialogue = ftp.PreLogin(max_failures=3)
    for line in data.split(b"\n")[:20]:
        events = dialogue.on_line(line + b"\n")
        assert isinstance(events, list) and events
        for event in events:
            if isinstance(event, ftp.Reply):
                assert event.text[:3].isdigit() and event.text[3:4] in (" ", "")
                assert "\n" not in event.text and "\r" not in event.text
            elif isinstance(event, ftp.Lookup):
                assert ftp._PREFIX_RE.fullmatch(event.prefix)
                assert event.user_line.endswith(b"\n") and len(event.user_line) < len(line) + 1
            else:
                assert isinstance(event, ftp.Close | ftp.Failure)
        if dialogue.failures >= 3:
            assert any(isinstance(e, ftp.Close) for e in events)
            return
        if any(isinstance(e, ftp.Close) for e in events):
            return


# ---- the rewriter --------------------------------------------------------------------------


def _check_to_device(out: bytes, v6: bool) -> None:
    for line in out.split(b"\n"):
        verb = ftp.command_verb(line)
        if verb == "PORT":
            assert not v6 and line.startswith(b"PORT 198,51,100,7,"), line
            ftp.parse_port(line[5:].rstrip(b"\r"))
        elif verb == "EPRT":
            assert v6 and line.startswith(b"EPRT |2|2001:db8::7|"), line
        assert verb not in ("LPRT", "LPSV", "EPSV"), line  # EPSV goes on as PASV or NOOP
        if verb == "PASV":
            assert line == b"PASV\r", line


def _raw_rewriter(fdp: atheris.FuzzedDataProvider) -> None:
    v6 = fdp.ConsumeBool()
    rewriter = ftp.ControlRewriter(CLIENT6 if v6 else CLIENT4, PUBLIC)
    up = ftp.LineSplitter(rewriter.command, max_line=256)
    down = ftp.LineSplitter(rewriter.reply, max_line=256)
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300))
        if fdp.ConsumeBool():
            out = up.feed(chunk)
            assert isinstance(out, bytes)
            _check_to_device(out, v6)
            assert isinstance(rewriter.take_answers(), bytes)
        else:
            assert isinstance(down.feed(chunk), bytes)
        assert rewriter._held <= ftp.MAX_HELD_ANSWERS
        assert len(rewriter._pending) <= ftp.MAX_PENDING + 2 * ftp.MAX_HELD_ANSWERS + 1
    _check_to_device(up.flush(), v6)
    down.flush()


#: Commands of the structured half: (line, what the client must see as the final reply:
#: a prefix of it; "device" = the device's own reply passes).
_VOCABULARY = [
    (b"NOOP\r\n", b"200 "), (b"PASV\r\n", b"227 Entering Passive Mode (203,0,113,1,"),
    (b"EPSV\r\n", b"229 "), (b"EPSV ALL\r\n", b"200 EPSV ALL"), (b"PORT 1,2,3,4,5,6\r\n", b"200 "),
    (b"EPRT |1|1.2.3.4|5000|\r\n", b"200 "), (b"PORT 0127,0,0,2,233,65\r\n", b"501 "),
    (b"EPRT |1|127.0.0.2|059713|\r\n", b"501 "), (b"LPRT 4,4,1,2,3,4,2,4,1\r\n", b"502 "),
    (b"EPSV 9\r\n", b"522 "), (b"PORT 1,2,3,4,0,7\r\n", b"504 "), (b"RETR f\r\n", b"226 "),
    (b"FEAT\r\n", b"211 "), (b"NOOP\rPORT 6,6,6,6,4,1\r\n", b"501 "),
]
#: The device model's answer to each command it gets.
_ANSWERS = {
    b"NOOP": [b"200 NOOP ok.\r\n"], b"PASV": [b"227 Entering Passive Mode (10,0,0,2,4,1).\r\n"],
    b"PORT": [b"200 PORT ok.\r\n"], b"RETR": [b"150 Opening.\r\n", b"226 Done.\r\n"],
    b"FEAT": [b"211-Features:\r\n", b" SIZE\r\n", b" 227 (1,2,3,4,5,6)\r\n", b"211 End\r\n"],
}


def _structured_rewriter(fdp: atheris.FuzzedDataProvider) -> None:
    rewriter = ftp.ControlRewriter(CLIENT4, PUBLIC)
    commands = [_VOCABULARY[fdp.ConsumeIntInRange(0, len(_VOCABULARY) - 1)]
                for _ in range(fdp.ConsumeIntInRange(1, 30))]
    to_client = bytearray()
    sent = []
    for line, _ in commands:
        out = rewriter.command(line)
        if out:
            sent.append(out.split(b" ")[0].rstrip(b"\r\n"))
        to_client += rewriter.take_answers()
    for verb in sent:
        for reply in _ANSWERS[verb]:
            to_client += rewriter.reply(reply)
    finals = [line for line in bytes(to_client).split(b"\r\n")
              if line[:3].isdigit() and line[3:4] == b" " and line[:1] != b"1"]
    assert len(finals) == len(commands), (commands, finals)
    for (_, expected), final in zip(commands, finals, strict=True):
        assert final.startswith(expected), (commands, finals)


def fuzz_rewriter(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        _raw_rewriter(fdp)
    else:
        _structured_rewriter(fdp)


# ---- PORT/EPRT -----------------------------------------------------------------------------


def fuzz_port(data: bytes) -> None:
    try:
        ip, port = ftp.parse_port(data)
    except ValueError:
        pass
    else:
        assert ftp.port_command(ip, port) == b"PORT " + data + b"\r\n"  # canonical, exactly
        out = ftp.ControlRewriter(CLIENT4, PUBLIC).command(b"PORT " + data + b"\r\n")
        assert out == (ftp.port_command(ipaddress.IPv4Address(CLIENT4), port) if port >= 1024 else b"")
    try:
        ip6, port6 = ftp.parse_eprt(data)
    except ValueError:
        pass
    else:
        assert 0 < port6 < 65536 and isinstance(ip6, ipaddress.IPv4Address | ipaddress.IPv6Address)
        assert ftp.parse_eprt(ftp.eprt_command(ip6, port6)[5:-2]) == (ip6, port6)
        if ip6.version == 4:
            assert ftp.eprt_command(ip6, port6)[6:-3] == data[1:-1].replace(data[:1], b"|")
    for verb in ("PORT", "EPRT"):
        try:
            address, number = ftp.parse_port_argument(verb, data)
        except ValueError:
            continue
        assert ipaddress.ip_address(address) and 0 < number < 65536


TARGETS = {"json": fuzz_json, "prelogin": fuzz_prelogin, "rewriter": fuzz_rewriter, "port": fuzz_port}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
