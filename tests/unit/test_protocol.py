"""The device protocol without sockets: stream decoding, encoding, field checks."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swiftftp.errors import ErrorCode, ProtocolError
from swiftftp.protocol import (
    MAX_OUTGOING,
    JsonStreamDecoder,
    action_of,
    encode,
    field,
    notice,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def decode_all(chunks: list[bytes]) -> list[dict]:
    decoder = JsonStreamDecoder(max_size=1 << 20)
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (obj := decoder.pop()) is not None:
            out.append(obj)
    assert decoder.rest() == b""
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(objects, max_size=6),
    st.lists(st.sampled_from([b"", b" ", b"\n", b"\r\n", b"\t "]), min_size=7, max_size=7),
    st.data(),
)
def test_any_split_of_any_sequence_decodes_the_same(messages, gaps, data) -> None:
    stream = b"".join(gaps[i] + orjson.dumps(m) for i, m in enumerate(messages)) + gaps[-1]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode_all(chunks) == messages


@given(st.lists(objects, min_size=1, max_size=4))
def test_byte_by_byte(messages) -> None:
    stream = b"".join(orjson.dumps(m) for m in messages)
    assert decode_all([stream[i : i + 1] for i in range(len(stream))]) == messages


def test_strings_with_braces_quotes_and_escapes() -> None:
    msgs = [{"a": "}{\"\\"}, {"b": "\\\\\"}"}, {"c": ["{", "}"]}]
    stream = b"".join(orjson.dumps(m) for m in msgs)
    for cut in range(len(stream) + 1):
        assert decode_all([stream[:cut], stream[cut:]]) == msgs


def test_rest_keeps_bytes_after_the_last_message() -> None:
    d = JsonStreamDecoder()
    d.feed(b'{"action":"data_pasv_accept"}RAW\x00BYTES')
    assert d.pop() == {"action": "data_pasv_accept"}
    assert d.rest() == b"RAW\x00BYTES"


@pytest.mark.parametrize("junk", [b"[1]", b'"s"', b"42", b"{bad}", b'{"a":1,}', b"\xff{}"])
def test_junk_is_error_9(junk: bytes) -> None:
    d = JsonStreamDecoder()
    d.feed(junk)
    with pytest.raises(ProtocolError) as info:
        while d.pop() is not None:
            pass
        raise AssertionError("no error")
    assert info.value.code == ErrorCode.MALFORMED


def test_oversized_is_error_9_before_it_is_complete() -> None:
    d = JsonStreamDecoder(max_size=100)
    d.feed(b'{"x": "' + b"a" * 200)
    with pytest.raises(ProtocolError):
        d.pop()


def test_encode_refuses_messages_the_device_cannot_read() -> None:
    assert encode({"port": 40123}) == b'{"port":40123}'
    with pytest.raises(ValueError):
        encode({"text": "x" * 3000})


@given(st.text(max_size=5000))
def test_notice_always_fits(text: str) -> None:
    message = notice(text)
    assert len(encode(message)) <= MAX_OUTGOING
    assert text.startswith(message["text"])


def test_fields() -> None:
    assert action_of({"action": "noop"}) == "noop"
    assert field({"port": 5}, "port", int) == 5
    assert field({}, "x", str, required=False) is None
    for bad in ({}, {"action": 1}, {"action": None}):
        with pytest.raises(ProtocolError):
            action_of(bad)
    with pytest.raises(ProtocolError):
        field({"port": True}, "port", int)
