"""The bytes dario writes: one owner (reply.Reply) for every response head and its framing.

Each test pins a wire defect seen against an earlier version, over real sockets.
"""

import json
import socket
import time

import pytest
import requests

from .helpers import RawUpstream, make_settings, running_gateway, wait_until
from .hostile_kit import MESSAGE, Wire, request_bytes

BODY = json.dumps(MESSAGE).encode()


def post_bytes(extra=(), body=BODY):
    return request_bytes("POST", "/v1/messages", [("x-api-key", "k"), *extra], body)


# -- framing of relayed answers ------------------------------------------------------

def test_transfer_encoding_wins_over_content_length_from_the_upstream(home):
    """RFC 9112 6.3: an answer with both is read as chunked and relayed without the
    Content-Length; relaying the length made the rest of the body a bogus next response."""
    payload = b'{"type":"message","content":[{"type":"text","text":"hello world, this is long"}]}'
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
              b"Content-Length: 5\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    with RawUpstream(lambda n, head, body, conn: conn.sendall(answer) or True) as upstream, \
            running_gateway(make_settings(home, upstream.url)) as gateway, Wire(gateway.port) as client:
        client.send(post_bytes())
        status, headers, body = client.response()
        assert status == 200 and "content-length" not in headers
        assert headers["transfer-encoding"] == "chunked"
        assert payload in body
        client.send(request_bytes("GET", "/health"))
        status, _, body = client.response()
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert not client.settle(idle=0.2) and client.buf == b""


def test_head_answers_never_carry_a_body(gateway):
    with Wire(gateway.port) as client:
        client.send(request_bytes("HEAD", "/no/such/thing"))
        client.sock.settimeout(2)
        time.sleep(0.2)
        first = client.sock.recv(65536)
        head, _, rest = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and rest == b""
        client.send(request_bytes("GET", "/health"))
        status, _, body = client.response()
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_head_and_get_on_the_root_answer_200_and_are_not_recorded(gateway):
    resp = requests.head(f"http://127.0.0.1:{gateway.port}/")
    assert resp.status_code == 200 and resp.content == b""
    resp = requests.get(f"http://127.0.0.1:{gateway.port}/")
    assert resp.status_code == 200 and "dario" in resp.text and "/health" in resp.text
    assert gateway.store.summary()["requests"] == 0


def test_an_http10_request_with_chunked_framing_closes_after_the_answer(gateway):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    raw = (b"POST /v1/messages HTTP/1.0\r\nHost: 127.0.0.1\r\nx-api-key: k\r\nConnection: keep-alive\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    with Wire(gateway.port) as client:
        client.send(raw)
        status, headers, _ = client.response()
        assert status == 200 and headers.get("connection") == "close"
        assert client.closed_within(2)


@pytest.mark.parametrize("header", [
    b"Transfer-Encoding: chunked\x0b", b"Transfer-Encoding: \xa0chunked", b"Transfer-Encoding: chunked\x85",
    b"Content-Length: 2\x0b", b"Content-Length: \x0c2",
])
def test_framing_values_padded_with_anything_but_optional_whitespace_are_refused(gateway, header):
    body = b"2\r\n{}\r\n0\r\n\r\n" if b"chunked" in header else b"{}"
    with Wire(gateway.port) as client:
        client.send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n" + header + b"\r\n\r\n" + body)
        status, headers, _ = client.response()
        assert status == 400 and headers.get("connection") == "close"


def test_a_chunk_size_padded_with_a_form_feed_is_refused(gateway):
    with Wire(gateway.port) as client:
        client.send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n2\x0c\r\n{}\r\n0\r\n\r\n")
        status, _, _ = client.response()
        assert status == 400


# -- answers before the body --------------------------------------------------------

def test_a_halted_gateway_never_invites_a_body_it_will_refuse(sim, gateway):
    requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json=MESSAGE,
                  headers={"x-api-key": "k", "x-sim-claim": "overage"})
    assert gateway.guard.snapshot() is not None
    with Wire(gateway.port) as client:
        client.send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 33554432\r\n\r\n")
        status, headers, body = client.response()
        assert status == 503 and b"100 Continue" not in client.buf
        assert headers.get("x-should-retry") == "false" and headers.get("connection") == "close"
        assert json.loads(body)["error"]["type"] == "dario_overage_guard"


@pytest.mark.parametrize("raw, status", [
    (request_bytes("GET", "/v1/nothing"), 404),
    (request_bytes("PUT", "/v1/messages"), 405),
    (request_bytes("POST", "/admin/resume", [("Content-Type", "text/plain")], b"{}"), 415),
    (request_bytes("POST", "/v1/messages", [("Content-Length", "999999999999")]), 413),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (request_bytes("GET", "/status", host="evil.example"), 403),
], ids=["404", "405", "415", "413", "431", "403"])
def test_answers_no_retry_can_fix_say_so(gateway, raw, status):
    with Wire(gateway.port) as client:
        client.send(raw)
        got, headers, _ = client.response()
        assert got == status and headers.get("x-should-retry") == "false"


def test_a_wrong_key_is_final_and_says_how_claude_code_sends_it(sim, home):
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": "s3cret"})) as gateway:
        resp = requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json=MESSAGE)
        assert resp.status_code == 401 and resp.headers["x-should-retry"] == "false"
        assert 'ANTHROPIC_CUSTOM_HEADERS="x-dario-api-key:' in resp.json()["error"]["message"]


# -- the accept loop and memory bounds ------------------------------------------------

def test_the_over_cap_answer_never_waits_on_silent_clients(sim, home):
    """Eight silent extras used to delay the next over-cap 503 by a second each."""
    with running_gateway(make_settings(home, sim.url), max_connections=2) as gateway:
        held = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(2)]
        assert wait_until(lambda: gateway.connections == 2)
        silent = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(8)]
        began = time.monotonic()
        resp = requests.get(f"http://127.0.0.1:{gateway.port}/health", timeout=5)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert "x-should-retry" not in resp.headers            # a retry can help here
        assert time.monotonic() - began < 0.5
        for sock in held + silent:
            sock.close()


def test_request_heads_held_are_bounded_in_total(sim, home):
    settings = make_settings(home, sim.url, flags={"maxHeadBytesInFlight": str(1 << 20)})
    with running_gateway(settings) as gateway:
        slow = []
        for _ in range(20):                         # 20 x 60 KiB heads that never end
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 60000 + b"\r\n")
            slow.append(sock)
        assert wait_until(lambda: gateway.heads.used > (1 << 20) - 65536)
        resp = requests.get(f"http://127.0.0.1:{gateway.port}/health", headers={"X-Pad": "a" * 35000})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["type"] == "overloaded_error"
        for sock in slow:
            sock.close()
        assert wait_until(lambda: gateway.heads.used == 0)
        assert requests.get(f"http://127.0.0.1:{gateway.port}/health").status_code == 200


def test_request_bodies_held_are_bounded_in_total(sim, home):
    settings = make_settings(home, sim.url, flags={"maxBodyBytesInFlight": str(1 << 20)})
    with running_gateway(settings) as gateway, Wire(gateway.port) as stalled:
        stalled.send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n"
                     b"Content-Length: 900000\r\n\r\n{")         # declared, never sent
        assert wait_until(lambda: gateway.bodies.used == 900000)
        resp = requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", data=b"x" * 200_000,
                             headers={"x-api-key": "k"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        stalled.close()
        assert wait_until(lambda: gateway.bodies.used == 0, timeout=70)


# -- secrets in the upstream's answers -------------------------------------------------

def test_an_upstream_error_echoing_the_upstream_key_is_redacted(home):
    key = "sk-ant-upstream-SECRET-123"
    body = json.dumps({"type": "error", "error": {"type": "authentication_error",
                                                  "message": f"invalid x-api-key: {key}"}}).encode()
    answer = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nX-Echo: %s\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
    with RawUpstream(lambda n, head, b, conn: conn.sendall(answer) or True) as upstream, \
            running_gateway(make_settings(home, upstream.url, env={"DARIO_UPSTREAM_API_KEY": key,
                                                                   "DARIO_API_KEY": "dk"})) as gateway:
        resp = requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json=MESSAGE,
                             headers={"x-dario-api-key": "dk"})
        assert resp.status_code == 401
        assert key not in resp.text and "[redacted]" in resp.text
        assert key not in json.dumps(dict(resp.headers))
        assert key.encode() in upstream.requests[0][0]          # it was sent upstream, as it must be


def test_pipelined_requests_each_get_one_answer(gateway):
    with Wire(gateway.port) as client:
        client.send(post_bytes() + request_bytes("GET", "/health") + post_bytes())
        assert client.response()[0] == 200
        assert client.response()[0] == 200
        assert client.response()[0] == 200
        assert not client.settle(idle=0.2) and client.buf == b""


def test_the_in_flight_bounds_follow_a_reload(sim, home):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        (home / "config.json").write_text(json.dumps({"maxBodyBytesInFlight": 1 << 20}))
        gateway.resolver = lambda: make_settings(home, sim.url)
        assert gateway.reload() == []
        assert gateway.bodies.limit == 1 << 20
        resp = requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", data=b"x" * (2 << 20),
                             headers={"x-api-key": "k"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
