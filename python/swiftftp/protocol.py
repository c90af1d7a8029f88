"""The device wire protocol without I/O: messages, error replies, the stream decoder.

Devices write unframed JSON objects, one per ``write()``, and may put several
in one TCP segment or split one over several; :class:`JsonStreamDecoder`
recovers them.  Everything we send goes through :func:`encode`, which keeps a
message well under the 2048 bytes the deployed device reads at once.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .errors import ErrorCode, ProtocolError

#: The deployed device reads at most this many bytes per read() and parses one object.
DEVICE_READ_SIZE = 2048
#: Largest message we send to a device; leaves room under DEVICE_READ_SIZE.
MAX_OUTGOING = 1536
#: Largest object we accept from a device; real ones are < 300 bytes.
MAX_INCOMING = 8192

_WHITESPACE = b" \t\r\n"
# Outside a string only braces and quotes matter; inside one, quotes and backslashes.
_OUTSIDE = re.compile(rb'[{}"]')
_INSIDE = re.compile(rb'["\\]')


def encode(message: dict[str, Any]) -> bytes:
    """Serialise one message for a device, refusing anything the device could not read."""
    data = orjson.dumps(message)
    if len(data) > MAX_OUTGOING:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_OUTGOING}")
    return data


def error(code: ErrorCode, text: str) -> dict[str, Any]:
    """A failed request's reply."""
    return {"error_code": int(code), "error_string": text}


def notice(text: str) -> dict[str, Any]:
    """A ``message`` request, its text cut so the whole object fits one device read."""
    overhead = len(encode({"action": "message", "text": ""}))
    room = MAX_OUTGOING - overhead
    body = orjson.dumps(text)[1:-1]
    while len(body) > room:
        text = text[: max(0, len(text) - (len(body) - room) // 6 - 1)]
        body = orjson.dumps(text)[1:-1]
    return {"action": "message", "text": text}


class JsonStreamDecoder:
    """Splits a byte stream of concatenated JSON objects, one object at a time.

    ``feed()`` bytes as they arrive and ``pop()`` objects until it returns
    ``None``.  Bytes after the last popped object stay available through
    ``rest()``: a device connection switches to raw relaying after its last
    JSON message, and those bytes belong to the relay.
    """

    def __init__(self, max_size: int = MAX_INCOMING) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._scan = 0  # where scanning resumes in _buf
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def rest(self) -> bytes:
        """Take the bytes not consumed by ``pop()``."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scan = self._depth = 0
        self._in_string = False
        return data

    def pop(self) -> dict[str, Any] | None:
        """The next complete object, or ``None`` if more bytes are needed.

        Raises :class:`ProtocolError` (code 9) for anything but a stream of
        JSON objects; the stream cannot be resynchronised after that.
        """
        buf = self._buf
        if self._depth == 0:
            start = 0
            while start < len(buf) and buf[start] in _WHITESPACE:
                start += 1
            if start:
                del buf[:start]
            if not buf:
                return None
            if buf[0] != 0x7B:  # "{"
                raise ProtocolError(ErrorCode.MALFORMED, "expected a JSON object")
            if len(buf) <= self._max:
                # The usual read holds exactly one object: orjson alone takes it, without
                # the scan below (36 regex searches for a login; a reconnect storm spent
                # a tenth of the node's CPU there). Anything else falls through to it.
                try:
                    obj = orjson.loads(buf)
                except orjson.JSONDecodeError:
                    pass
                else:
                    buf.clear()
                    return obj  # it began with "{": a dict
            self._scan, self._depth = 1, 1
        end = self._find_end()
        if end is None:
            if len(buf) > self._max:
                raise ProtocolError(ErrorCode.MALFORMED, f"message over {self._max} bytes")
            return None
        chunk = bytes(buf[:end])
        del buf[:end]
        self._scan = self._depth = 0
        try:
            obj = orjson.loads(chunk)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"invalid JSON: {exc}") from None
        if len(chunk) > self._max:
            raise ProtocolError(ErrorCode.MALFORMED, f"message over {self._max} bytes")
        return obj  # a balanced "{...}" that orjson accepts is always a dict

    def _find_end(self) -> int | None:
        """Scan on from ``_scan``; the index just past the closing brace, if seen."""
        buf, pos = self._buf, self._scan
        while True:
            if self._in_string:
                m = _INSIDE.search(buf, pos)
                if m is None:
                    self._scan = len(buf)
                    return None
                pos = m.end()
                if m.group() == b"\\":
                    if pos >= len(buf):  # escape split across reads: resume before it
                        self._scan = pos - 1
                        return None
                    pos += 1
                else:
                    self._in_string = False
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                self._scan = len(buf)
                return None
            pos = m.end()
            ch = m.group()
            if ch == b'"':
                self._in_string = True
            elif ch == b"{":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return pos


def field(message: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """A typed field of a request, or :class:`ProtocolError` 9 naming it."""
    value = message.get(name)
    if value is None and not required:
        return None
    # bool is an int in Python; no field of ours is a bool
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {name!r} must be {kind.__name__}")
    return value


def action_of(message: dict[str, Any]) -> str:
    """The ``action`` of a request, or :class:`ProtocolError` 9."""
    return field(message, "action", str)
