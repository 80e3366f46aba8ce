"""The gateway end to end: a real gateway in front of the simulator, over real sockets."""

import gzip
import http.client
import json
import socket
import threading
import time

import pytest
import requests


from .helpers import make_settings, parse_response, raw_request, running_gateway, sse_events, wait_until

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def url(gateway, path):
    return f"http://127.0.0.1:{gateway.port}{path}"


def post(gateway, path="/v1/messages", body=MESSAGE, headers=None, **kwargs):
    base = {"x-api-key": "sk-client-1", "anthropic-version": "2023-06-01"}
    base.update(headers or {})
    return requests.post(url(gateway, path), json=body, headers=base, **kwargs)


def last_record(gateway, count=1):
    """The latest record, once `count` exist: one is stored a moment after its last byte."""
    assert wait_until(lambda: gateway.store.summary()["requests"] >= count)
    return gateway.store.snapshot()[-1]


# -- forwarding ---------------------------------------------------------------------

def test_plain_message_matches_direct_and_is_metered(gateway, sim):
    direct = requests.post(sim.url + "/v1/messages", json=MESSAGE)
    through = post(gateway, headers={"x-sim-cache-read": "7", "x-sim-cache-create": "3"})
    assert through.status_code == 200
    body, direct_body = through.json(), direct.json()
    assert body["usage"]["input_tokens"] == direct_body["usage"]["input_tokens"]
    assert body["content"] == direct_body["content"]
    record = last_record(gateway)
    assert record["outcome"] == "ok" and record["status"] == 200 and record["stream"] is False
    assert record["api"] == "anthropic" and record["path"] == "/v1/messages"
    assert record["model"] == "claude-sonnet-4-5"
    assert record["inputTokens"] == body["usage"]["input_tokens"] and record["outputTokens"] == 6
    assert record["cacheReadTokens"] == 7 and record["cacheCreateTokens"] == 3
    assert record["claim"] == "five_hour" and record["bucket"] == "subscription"
    assert record["util5h"] == 0.12 and record["util7d"] == 0.34 and record["unifiedStatus"] == "allowed"
    assert record["requestId"] == through.headers["request-id"]
    assert record["account"].startswith("key:") and len(record["account"]) == 12
    assert record["ttfbMs"] > 0 and record["latencyMs"] >= record["ttfbMs"]


def test_every_forwarded_route_and_query_is_passed_unchanged(gateway, sim):
    cases = [("POST", "/v1/messages/count_tokens"), ("POST", "/v1/complete"),
             ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/claude-sonnet-4-5"),
             ("POST", "/v1/messages?beta=true")]
    for method, path in cases:
        resp = requests.request(method, url(gateway, path), json=None if method == "GET" else MESSAGE,
                                headers={"x-api-key": "k"})
        assert resp.status_code == 200, (path, resp.text)
        seen = sim.requests[-1]
        assert seen.method == method and seen.path + ("?" + seen.query if seen.query else "") == path
    assert wait_until(lambda: gateway.store.summary()["requests"] == len(cases))
    assert gateway.store.snapshot()[2]["api"] == "openai"


def test_stream_bytes_identical_to_direct(gateway, sim):
    body = dict(MESSAGE, stream=True)
    direct = requests.post(sim.url + "/v1/messages", json=body).content
    through = post(gateway, body=body).content
    strip = lambda b: b.replace(b"msg_sim_1", b"X").replace(b"msg_sim_2", b"X")
    assert strip(direct) == strip(through)
    record = last_record(gateway)
    assert record["stream"] is True and record["outputTokens"] == 6 and record["inputTokens"] > 0


def stream_arrivals(port, extra_headers, body=None):
    """Send a streaming request on a raw socket; return [(monotonic s, event name)] as they arrive."""
    payload = json.dumps(body or dict(MESSAGE, stream=True)).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"x-api-key: k\r\nContent-Length: {len(payload)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in extra_headers.items()) + "\r\n").encode()
    arrivals, buf = [], b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + payload)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            now = time.monotonic()
            buf += data
            for name in (b"message_start", b"content_block_delta", b"message_stop"):
                count = data.count(b"event: " + name)
                arrivals += [(now, name.decode())] * count
            if b"0\r\n\r\n" in buf[-7:] or b"message_stop" in data:
                break
    return arrivals


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_events_arrive_one_by_one_as_upstream_sends_them(gateway, framing):
    arrivals = stream_arrivals(gateway.port, {"x-sim-delay-ms": "150", "x-sim-events": "4",
                                              "x-sim-framing": framing})
    deltas = [t for t, name in arrivals if name == "content_block_delta"]
    assert len(deltas) == 4
    gaps = [b - a for a, b in zip(deltas, deltas[1:])]
    # Each event is relayed when it is sent, ~150 ms apart: never coalesced, never held to the end.
    assert all(gap > 0.09 for gap in gaps), gaps
    start = next(t for t, name in arrivals if name == "message_start")
    assert deltas[0] - start > 0.09


def test_close_delimited_upstream_is_rechunked_for_keep_alive(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for _ in range(2):            # the same client connection serves both
        conn.request("POST", "/v1/messages", json.dumps(dict(MESSAGE, stream=True)),
                     {"x-sim-framing": "close", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        events = sse_events(resp.read().decode())
        assert events[-1][0] == "message_stop"
    conn.close()


@pytest.mark.parametrize("stream", [False, True])
def test_gzip_relayed_as_is_and_metered(gateway, stream):
    resp = post(gateway, body=dict(MESSAGE, stream=stream), headers={"x-sim-gzip": "1"}, stream=True)
    raw = resp.raw.read(decode_content=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(raw).decode()
    assert ("message_stop" in text) if stream else json.loads(text)["usage"]["output_tokens"] == 6
    record = last_record(gateway)
    assert record["outputTokens"] == 6 and record["inputTokens"] > 0


def test_chunked_request_body_is_forwarded_with_a_length(gateway, sim):
    payload = json.dumps(MESSAGE).encode()
    pieces = [payload[:10], payload[10:30], payload[30:]]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    raw = raw_request(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost:3456\r\n"
                      b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body)
    status, _, _ = parse_response(raw)
    assert status == 200
    seen = sim.requests[-1]
    assert seen.body == payload and seen.header("Content-Length") == str(len(payload))
    assert seen.header("Transfer-Encoding") is None


def test_keep_alive_serves_many_requests_on_one_connection(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    for _ in range(5):
        conn.request("POST", "/v1/messages", json.dumps(MESSAGE), {"Content-Type": "application/json"})
        assert conn.getresponse().read() and True
    assert gateway.connections == 1
    conn.close()


# -- headers and credentials ----------------------------------------------------------

def test_hop_by_hop_and_gateway_headers_are_not_forwarded(gateway, sim):
    post(gateway, headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "5",
                           "TE": "trailers", "Proxy-Authorization": "Bearer p", "Upgrade": "h2c",
                           "x-dario-api-key": "nope", "X-Custom": "kept", "anthropic-beta": "b1"})
    names = {name.lower() for name, _ in sim.requests[-1].headers}
    for gone in ("connection", "x-hop", "keep-alive", "te", "proxy-authorization", "upgrade", "x-dario-api-key"):
        assert gone not in names
    seen = sim.requests[-1]
    assert seen.header("X-Custom") == "kept" and seen.header("anthropic-beta") == "b1"
    assert seen.header("Host") == f"127.0.0.1:{sim.port}"


def test_client_credentials_pass_through_untouched(gateway, sim):
    post(gateway, headers={"x-api-key": "sk-ant-api03-secret", "Authorization": "Bearer oauth-token-xyz"})
    seen = sim.requests[-1]
    assert seen.header("x-api-key") == "sk-ant-api03-secret"
    assert seen.header("Authorization") == "Bearer oauth-token-xyz"


def test_no_default_headers_are_added_upstream(gateway, sim):
    raw_request(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    names = [name.lower() for name, _ in sim.requests[-1].headers]
    assert names == ["host"]                # no User-Agent or Accept-Encoding of our own


def test_upstream_api_key_replaces_client_credentials(sim, home):
    settings = make_settings(home, sim.url, env={"DARIO_UPSTREAM_API_KEY": "sk-upstream"})
    with running_gateway(settings) as gateway:
        post(gateway, headers={"x-api-key": "sk-client", "Authorization": "Bearer client"})
        seen = sim.requests[-1]
        assert seen.header("x-api-key") == "sk-upstream" and seen.header("Authorization") is None
        assert [v for n, v in seen.headers if n.lower() == "x-api-key"] == ["sk-upstream"]


def test_upstream_response_headers_hop_by_hop_and_folded_are_dropped(home):
    canned = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Private\r\n"
              b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Folded: a\r\n b\r\nX-Fine: yes\r\n"
              b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\n{}")
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        status, headers, body = parse_response(raw_request(
            gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
        assert status == 200 and body == b"{}"
        assert "x-private" not in headers and "keep-alive" not in headers and "x-folded" not in headers
        assert headers["x-fine"] == "yes"
        raw = raw_request(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert raw.count(b"Set-Cookie:") == 2


class CannedUpstream:
    """A raw upstream that answers every request with fixed bytes, then closes."""

    def __init__(self, response):
        self.response = response
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                self.seen.append(data)
                conn.sendall(self.response)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()


# -- routing and refusals -----------------------------------------------------------

def test_unknown_path_404_and_wrong_method_405(gateway, sim):
    resp = requests.get(url(gateway, "/v1/secret"))
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = requests.get(url(gateway, "/v1/messages"))
    assert resp.status_code == 405 and resp.json()["error"]["type"] == "invalid_request_error"
    assert requests.post(url(gateway, "/health")).status_code == 405
    assert requests.get(url(gateway, "/v1/models/../../admin")).status_code == 404
    assert sim.requests == []


@pytest.mark.parametrize("target", [b"http://evil.example/v1/models", b"@evil.example/v1/models", b"*"])
def test_non_origin_form_targets_are_refused(gateway, sim, target):
    raw = raw_request(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert status == 400 and json.loads(body)["type"] == "error"
    assert sim.requests == []


def test_body_over_limit_is_413_closed_and_not_forwarded(sim, home):
    with running_gateway(make_settings(home, sim.url, max_body_bytes=2048)) as gateway:
        raw = raw_request(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 5000\r\n\r\n" + b"x" * 5000)
        status, headers, body = parse_response(raw)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "request_too_large"
        chunked = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" \
                  + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 3 + b"0\r\n\r\n"
        assert parse_response(raw_request(gateway.port, chunked))[0] == 413
        assert sim.requests == []
        record = last_record(gateway, 2)
        assert record["outcome"] == "rejected" and record["status"] == 413


def test_smuggling_framings_are_400_and_close(gateway, sim):
    for framing in (b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                    b"Content-Length: 4\r\nContent-Length: 5\r\n", b"Content-Length: -4\r\n"):
        raw = raw_request(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing
                          + b"\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = parse_response(raw)
        assert status == 400 and headers["connection"] == "close"
        assert raw.count(b"HTTP/1.1") == 1      # the smuggled request was never parsed
    assert sim.requests == []


# -- faults -------------------------------------------------------------------------

def test_unreachable_upstream_is_502(home):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                               # nothing listens there now
    with running_gateway(make_settings(home, f"http://127.0.0.1:{port}")) as gateway:
        resp = post(gateway)
        assert resp.status_code == 502
        assert resp.json()["error"] == {"type": "api_error", "message": "upstream unreachable: connection refused"}
        record = last_record(gateway)
        assert record["outcome"] == "upstream_error" and record["claim"] == "unknown"


def test_upstream_silent_before_headers_is_504(sim, home):
    with running_gateway(make_settings(home, sim.url, read_timeout_s=0.5)) as gateway:
        resp = post(gateway, headers={"x-sim-headers-delay-ms": "3000"})
        assert resp.status_code == 504 and resp.json()["error"]["type"] == "timeout_error"
        assert last_record(gateway)["outcome"] == "upstream_error"


@pytest.mark.parametrize("fail", ["die_mid_stream", "reset_mid_stream"])
def test_upstream_dying_mid_stream_sends_an_sse_error_event(gateway, fail):
    resp = post(gateway, body=dict(MESSAGE, stream=True), headers={"x-sim-fail": fail, "x-sim-events": "6"})
    events = sse_events(resp.text)
    assert events[0][0] == "message_start"
    assert events[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "upstream connection lost mid-stream"}})
    assert resp.headers.get("Connection") == "close" or resp.raw.closed
    record = last_record(gateway)
    assert record["outcome"] == "upstream_error" and record["inputTokens"] > 0


def test_upstream_stalling_mid_stream_times_out_with_an_error_event(sim, home):
    with running_gateway(make_settings(home, sim.url, read_timeout_s=0.5)) as gateway:
        resp = post(gateway, body=dict(MESSAGE, stream=True),
                    headers={"x-sim-fail": "hang_mid_stream", "x-sim-hang-s": "5"})
        assert sse_events(resp.text)[-1][0] == "error"
        assert last_record(gateway)["outcome"] == "upstream_error"


def test_redirects_are_relayed_not_followed(gateway, sim):
    resp = post(gateway, headers={"x-sim-fail": "redirect"}, allow_redirects=False)
    assert resp.status_code == 307 and resp.headers["Location"] == "http://127.0.0.1:9/elsewhere"
    assert len(sim.requests) == 1


def open_stream_and_hang_up(port, headers, after_events=1):
    payload = json.dumps(dict(MESSAGE, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
                  + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + payload)
    buf = b""
    while buf.count(b"event: ") < after_events:
        buf += sock.recv(65536)
    sock.close()
    return time.monotonic_ns()


@pytest.mark.parametrize("headers", [
    {"x-sim-delay-ms": "200", "x-sim-events": "50"},                   # upstream keeps talking
    {"x-sim-fail": "hang_mid_stream", "x-sim-hang-s": "20", "x-sim-events": "6"},  # upstream silent
])
def test_client_hang_up_closes_upstream_within_a_second(gateway, sim, headers):
    closed_at = open_stream_and_hang_up(gateway.port, headers, after_events=2)
    assert sim.wait_for_disconnect(timeout=3)
    assert (sim.disconnects[0].at_ns - closed_at) / 1e9 < 1.0
    assert wait_until(lambda: gateway.store.snapshot())
    record = gateway.store.snapshot()[-1]
    assert record["outcome"] == "client_gone" and record["inputTokens"] > 0


def test_log_file_gets_one_json_line_per_record(sim, home, tmp_path):
    log_path = tmp_path / "records.jsonl"
    with running_gateway(make_settings(home, sim.url, log_file=str(log_path))) as gateway:
        post(gateway)
        post(gateway, body=dict(MESSAGE, stream=True))
        requests.get(url(gateway, "/nope"))
        wait_until(lambda: gateway.store.summary()["requests"] == 2)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line.get("outcome") for line in lines] == ["ok", "ok", "rejected"]
    assert lines[1]["stream"] is True and lines[0]["id"] == 1


def test_100_continue_only_after_the_checks_pass(sim, home):
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": "k"})) as gateway:
        head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                b"Content-Length: 2\r\n")
        refused = raw_request(gateway.port, head + b"\r\n", timeout=2)
        assert refused.startswith(b"HTTP/1.1 401") and b"100 Continue" not in refused
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(head + b"x-dario-api-key: k\r\nConnection: close\r\n\r\n")
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"{}")
            rest = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                rest += piece
        assert rest.startswith(b"HTTP/1.1 200")


def test_an_upstream_that_closes_idle_connections_is_followed_to_a_fresh_one(home):
    # CannedUpstream answers once per connection, then closes it without saying so.
    canned = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        session = requests.Session()
        for _ in range(3):
            time.sleep(0.05)            # the upstream's close has arrived before the next send
            assert session.get(url(gateway, "/v1/models")).status_code == 200
        assert len(upstream.seen) == 3
