import email.message
import io

import pytest
from hypothesis import given, strategies as st

from dario_lib import wire


def headers(*pairs):
    message = email.message.Message()
    for name, value in pairs:
        message[name] = value
    return message


@pytest.mark.parametrize("pairs, status", [
    ((("Content-Length", "5"), ("Transfer-Encoding", "chunked")), 400),
    ((("Content-Length", "5"), ("Content-Length", "6")), 400),
    ((("Content-Length", "5, 6"),), 400),
    ((("Content-Length", "-1"),), 400),
    ((("Content-Length", "abc"),), 400),
    ((("Content-Length", "+5"),), 400),
    ((("Content-Length", "99999999999999999999999"),), 400),
    ((("Content-Length", "2000"),), 413),
    ((("Transfer-Encoding", "gzip, chunked"),), 400),
    ((("Transfer-Encoding", "identity"),), 400),
])
def test_bad_framing_is_refused(pairs, status):
    with pytest.raises(wire.HttpError) as err:
        wire.body_framing(headers(*pairs), limit=1000)
    assert err.value.status == status


def test_good_framings():
    assert wire.body_framing(headers(), 1000) == ("none", 0)
    assert wire.body_framing(headers(("Content-Length", "5"), ("Content-Length", "5")), 1000) == ("length", 5)
    assert wire.body_framing(headers(("Transfer-Encoding", "Chunked")), 1000) == ("chunked", None)


def read(raw, kind="chunked", length=None, limit=1000):
    return wire.BodyReader(io.BufferedReader(io.BytesIO(raw)), limit).read(kind, length)


def test_chunked_body_with_extensions_and_trailers():
    assert read(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n") == b"hello world"


@pytest.mark.parametrize("raw, status", [
    (b"zz\r\nhello\r\n0\r\n\r\n", 400),
    (b"-5\r\nhello\r\n0\r\n\r\n", 400),
    (b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (b"5\r\nhelloXX0\r\n\r\n", 400),
    (b"5\r\nhel", 400),
    (b"fff\r\n" + b"a" * 4095 + b"\r\n0\r\n\r\n", 413),
])
def test_bad_chunked_bodies(raw, status):
    with pytest.raises(wire.HttpError) as err:
        read(raw)
    assert err.value.status == status


def test_short_content_length_body():
    with pytest.raises(wire.HttpError):
        read(b"abc", "length", 10)


@given(st.binary(max_size=3000), st.lists(st.integers(1, 400), max_size=10))
def test_any_chunking_round_trips(body, sizes):
    pieces, rest = [], body
    for size in sizes:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    raw = b"".join(wire.chunk(p) for p in pieces if p) + wire.LAST_CHUNK
    assert read(raw, limit=10_000) == body


def test_relayable_drops_hop_by_hop_named_and_injected():
    items = [("Connection", "x-private"), ("Keep-Alive", "5"), ("X-Private", "1"), ("TE", "trailers"),
             ("Proxy-Authorization", "Bearer k"), ("Upgrade", "h2c"), ("X-Folded", "a\r\n b"),
             ("X-Nul", "a\x00b"), ("Bad Name", "v"), ("x-api-key", "sk"), ("Accept", "*/*")]
    kept = list(wire.relayable(items, {"x-private"}))
    assert kept == [("x-api-key", "sk"), ("Accept", "*/*")]
