"""Hostile HTTP: a web page, a broken client and a crafted byte stream against the gateway.

Everything here runs over real sockets against a real gateway in front of the simulator.
What the existing suites already cover (test_exposure.py, test_gateway.py) is not repeated;
each test here adds an attack shape they do not try. Every rejection is checked for: a clear
status, nothing sent upstream, no traceback in the gateway's log, and the gateway still
serving a normal request afterwards.
"""

import json
import logging
import re
import socket

import pytest
import requests
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dario_lib.simulator import Simulator

from .helpers import make_settings, parse_response, running_gateway, wait_until
from .hostile_kit import (
    MESSAGE,
    Wire,
    count_responses,
    halt,
    health,
    no_tracebacks,
    request_bytes,
    still_serving,
    url,
)
from .test_gateway import CannedUpstream

KEY = "gw-hostile-Zq81x"
JSON_BODY = json.dumps(MESSAGE)


@pytest.fixture(autouse=True)
def debug_log(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
def evil():
    """A second upstream standing in for an attacker's server: it must see nothing."""
    simulator = Simulator().start()
    yield simulator
    simulator.stop()


@pytest.fixture
def keyed(sim, home):
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": KEY})) as gateway:
        yield gateway


@pytest.fixture
def small(sim, home):
    """A gateway with a 4 KiB body cap, to make 413s cheap."""
    with running_gateway(make_settings(home, sim.url, max_body_bytes=4096)) as gateway:
        yield gateway


def exchange(port, data, timeout=3.0):
    """Send raw bytes; read until the gateway closes, or a whole answer is followed by
    silence (a kept-alive connection). Returns (bytes read, closed?)."""
    with Wire(port, timeout) as wire:
        wire.send(data)
        closed = wire.settle(timeout)
        return wire.buf, closed


# -- browser attacks ----------------------------------------------------------------

RESUME_ATTACKS = [
    # The three content types a cross-site <form> or no-preflight fetch() can send.
    ([("Content-Type", "text/plain")], '{"resume": true}', 415),
    ([("Content-Type", "application/x-www-form-urlencoded")], "resume=1", 415),
    ([("Content-Type", "multipart/form-data; boundary=xx")], "--xx\r\n\r\n1\r\n--xx--\r\n", 415),
    ([("Content-Type", "text/plain; charset=application/json")], "{}", 415),
    ([("Content-Type", "application/jsonp")], "{}", 415),
    ([], "{}", 415),
    # JSON, but from a web page: the Origin or Sec-Fetch-Site gives it away.
    ([("Content-Type", "application/json"), ("Origin", "https://evil.example")], "{}", 403),
    ([("Content-Type", "application/json"), ("Origin", "null")], "{}", 403),
    ([("Content-Type", "application/json"), ("Sec-Fetch-Site", "cross-site")], "{}", 403),
    ([("Content-Type", "application/json"), ("Sec-Fetch-Site", "CROSS-SITE")], "{}", 403),
    ([("Content-Type", "text/plain"), ("Origin", "https://evil.example")], "{}", 403),
    # A DNS-rebound page: same-origin from the browser's view, but the Host gives it away.
    ([("Content-Type", "application/json"), ("Origin", "http://rebind.evil.example:3456")], "{}", 403),
]


@pytest.mark.parametrize("headers, body, status", RESUME_ATTACKS)
def test_cross_site_posts_never_clear_a_halt(gateway, sim, caplog, headers, body, status):
    halt(gateway)
    raw, closed = exchange(gateway.port, request_bytes("POST", "/admin/resume", headers, body.encode()))
    got, out, payload = parse_response(raw)
    assert got == status and closed
    assert json.loads(payload)["type"] == "error"
    assert "access-control-allow-origin" not in out
    assert health(gateway) == "halted"
    assert len(sim.requests) == 1                       # only the tripping request
    no_tracebacks(caplog)


@pytest.mark.parametrize("host", [
    "rebind.evil.example:3456", "localhost.evil.example", "127.0.0.1.nip.io", "LOCALHOST.EVIL.EXAMPLE",
    "localhost:3456@evil.example", "127.0.0.1:80:90", "localhost:abc", "127.1", "2130706433",
    "0x7f.0.0.1", "::1", "[::ffff:127.0.0.1]evil", "",
    "[::1]evil.example",
])
def test_dns_rebinding_cannot_resume_or_forward(gateway, sim, caplog, host):
    halt(gateway)
    json_headers = [("Content-Type", "application/json")]
    raw, _ = exchange(gateway.port, request_bytes("POST", "/admin/resume", json_headers, b"{}", host=host))
    assert parse_response(raw)[0] == 403
    raw, _ = exchange(gateway.port, request_bytes("GET", "/v1/models", [("Connection", "close")], host=host))
    assert parse_response(raw)[0] == 403
    assert health(gateway) == "halted" and len(sim.requests) == 1
    no_tracebacks(caplog)


def test_missing_host_on_http11_resume_is_403(gateway, sim):
    halt(gateway)
    raw, _ = exchange(gateway.port, request_bytes("POST", "/admin/resume", [("Content-Type", "application/json")],
                                                  b"{}", host=None))
    assert parse_response(raw)[0] == 403 and health(gateway) == "halted"


def test_cross_site_generation_request_never_reaches_upstream(gateway, sim, caplog):
    for headers in ([("Sec-Fetch-Site", "cross-site")], [("Origin", "https://evil.example")],
                    [("Origin", "http://127.0.0.1:3456.evil.example")], [("Origin", "file://")]):
        raw, _ = exchange(gateway.port, request_bytes("POST", "/v1/messages", headers + [
            ("Content-Type", "text/plain"), ("x-api-key", "sk-victim")], JSON_BODY.encode()))
        status, out, _ = parse_response(raw)
        assert status == 403 and "access-control-allow-origin" not in out
    assert sim.requests == []
    assert wait_until(lambda: gateway.store.summary()["outcomes"].get("rejected") == 4)
    still_serving(gateway)
    no_tracebacks(caplog)


LOOKALIKE_ORIGINS = ["https://evil.example", "https://app.example.evil.example", "https://APP.EXAMPLE",
                     "https://app.example:443", "https://app.example/", "http://app.example", "null",
                     "https://app.example\tx", "*"]
ALL_PATHS = [("GET", "/health"), ("GET", "/status"), ("GET", "/analytics"), ("GET", "/admin/resume"),
             ("POST", "/admin/resume"), ("GET", "/v1/models"), ("POST", "/v1/messages"), ("GET", "/nope")]


@pytest.fixture
def with_origin(sim, home):
    (home / "config.json").write_text(json.dumps({"allowedOrigins": ["https://app.example"]}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        yield gateway


def test_no_cors_headers_for_origins_not_listed(with_origin, sim, caplog):
    for origin in LOOKALIKE_ORIGINS:
        for method, path in ALL_PATHS:
            body = b"{}" if method == "POST" else b""
            raw, _ = exchange(with_origin.port, request_bytes(method, path, [
                ("Origin", origin), ("Content-Type", "application/json"), ("Connection", "close")], body))
            status, out, _ = parse_response(raw)
            assert status == (200 if path == "/health" else 403), (origin, path)
            assert not [name for name in out if name.startswith("access-control-")], (origin, path, out)
    assert sim.requests == []
    no_tracebacks(caplog)


def test_preflight_answered_only_for_the_listed_origin(with_origin, caplog):
    for method, path in ALL_PATHS:
        for origin in LOOKALIKE_ORIGINS + [None]:
            headers = [("Access-Control-Request-Method", "POST"),
                       ("Access-Control-Request-Headers", "content-type"), ("Connection", "close")]
            if origin is not None:
                headers.append(("Origin", origin))
            raw, _ = exchange(with_origin.port, request_bytes("OPTIONS", path, headers))
            status, out, _ = parse_response(raw)
            assert status == 403, (origin, path)
            assert not [name for name in out if name.startswith("access-control-")]
        raw, _ = exchange(with_origin.port, request_bytes("OPTIONS", path, [
            ("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST"),
            ("Connection", "close")]))
        status, out, _ = parse_response(raw)
        assert status == 204 and out["access-control-allow-origin"] == "https://app.example"
    no_tracebacks(caplog)


# -- keep-alive desync: a body that is itself a request ---------------------------------

def smuggled_resume(method="POST", key=None):
    """The request an attacker hides in a body: it would clear the halt if parsed."""
    headers = "Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if key:
        headers += f"x-dario-api-key: {key}\r\n"
    if method == "POST":
        return f"POST /admin/resume HTTP/1.1\r\n{headers}Content-Length: 2\r\n\r\n{{}}".encode()
    return f"GET /admin/resume HTTP/1.1\r\n{headers}\r\n".encode()


def outer(path, body, headers=(), host="127.0.0.1", length=None):
    extra = [("Content-Type", "text/plain"), ("Content-Length", str(len(body) if length is None else length))]
    return request_bytes("POST", path, list(headers) + extra, b"", host=host) + body


DESYNC = {
    # name: (gateway fixture, outer request builder(smuggled) -> bytes, expected status)
    "401-no-key": ("keyed", lambda s: outer("/v1/messages", s), 401),
    "401-wrong-key": ("keyed", lambda s: outer("/v1/messages", s, [("x-dario-api-key", "nope")]), 401),
    "403-host": ("gateway", lambda s: outer("/v1/messages", s, host="evil.example"), 403),
    "403-origin-on-resume": ("gateway", lambda s: outer("/admin/resume", s, [("Origin", "https://e.example")]), 403),
    "403-sec-fetch": ("gateway", lambda s: outer("/v1/messages", s, [("Sec-Fetch-Site", "cross-site")]), 403),
    "404": ("gateway", lambda s: outer("/v1/nothing-here", s), 404),
    "405": ("gateway", lambda s: outer("/health", s), 405),
    "413-declared": ("small", lambda s: outer("/v1/messages", s, length=5000), 413),
    "415-resume": ("gateway", lambda s: outer("/admin/resume", s), 415),
    "health-with-body": ("gateway", lambda s: request_bytes("GET", "/health", [
        ("Content-Length", str(len(s)))], b"") + s, 200),
    "status-with-body": ("gateway", lambda s: request_bytes("GET", "/status", [
        ("Content-Length", str(len(s)))], b"") + s, 200),
}


@pytest.mark.parametrize("inner", ["POST", "GET"])
@pytest.mark.parametrize("case", sorted(DESYNC))
def test_an_early_answer_never_parses_the_body_as_a_request(request, sim, caplog, case, inner):
    fixture, build, status = DESYNC[case]
    gateway = request.getfixturevalue(fixture)
    halt(gateway)
    forwarded = len(sim.requests)
    smuggled = smuggled_resume(inner, key=gateway.settings.api_key)
    raw, closed = exchange(gateway.port, build(smuggled))
    assert parse_response(raw)[0] == status
    assert count_responses(raw) == 1 and closed, raw
    assert b'"wasHalted"' not in raw and b'{"halted"' not in raw
    assert health(gateway) == "halted"
    assert len(sim.requests) == forwarded                # upstream saw nothing new
    no_tracebacks(caplog)


def test_413_mid_chunked_body_closes_before_the_rest_is_parsed(small, sim, caplog):
    halt(small)
    forwarded = len(sim.requests)
    smuggled = smuggled_resume()
    chunked = (request_bytes("POST", "/v1/messages", [("Transfer-Encoding", "chunked")])
               + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n")
    raw, closed = exchange(small.port, chunked)
    assert parse_response(raw)[0] == 413 and count_responses(raw) == 1 and closed
    assert health(small) == "halted" and len(sim.requests) == forwarded
    no_tracebacks(caplog)


@pytest.mark.parametrize("inner", ["POST", "GET"])
def test_halted_503_consumes_the_body_so_pipelined_bytes_are_not_a_request(gateway, sim, caplog, inner):
    """The 503 reads the whole body first, so keep-alive is fine: the next request is ours."""
    halt(gateway)
    forwarded = len(sim.requests)
    smuggled = smuggled_resume(inner)
    with Wire(gateway.port) as wire:
        wire.send(outer("/v1/messages", smuggled, [("x-api-key", "k")]))
        status, _, body = wire.response()
        assert status == 503 and json.loads(body)["error"]["type"] == "dario_overage_guard"
        if wire.closed_within(0.3):
            assert wire.buf == b""                          # closed: nothing else was said
        else:
            wire.send(request_bytes("GET", "/health"))      # still open: our request is next
            status, _, body = wire.response()
            assert status == 200 and json.loads(body)["guard"] == "halted"
            assert wire.buf == b""
    assert health(gateway) == "halted" and len(sim.requests) == forwarded
    no_tracebacks(caplog)


# -- request targets and where they can lead --------------------------------------------

def test_request_targets_never_reach_another_server(gateway, sim, evil, caplog):
    there = f"127.0.0.1:{evil.port}"
    cases = [
        ("GET", f"http://{there}/v1/models", there, 400),
        ("POST", f"http://{there}/v1/messages", "127.0.0.1", 400),
        ("POST", f"https://{there}/v1/messages", "127.0.0.1", 400),
        ("GET", f"@{there}/v1/models", "127.0.0.1", 400),
        ("GET", f"{there}/v1/models", "127.0.0.1", 400),
        ("CONNECT", there, there, 400),
        ("GET", f"//{there}/v1/models", "127.0.0.1", 404),
        ("GET", f"/v1/models/x@{there}", "127.0.0.1", None),        # a model id: goes to OUR upstream
        ("GET", f"/v1/models?u=http://{there}/", "127.0.0.1", 200),
        ("GET", f"/v1/models#@{there}", "127.0.0.1", 404),
        ("GET", f"/v1/models\\@{there}", "127.0.0.1", 404),
        ("POST", f"/v1/messages/../../{there}/v1/messages", "127.0.0.1", 404),
        ("GET", "/v1/models", f"evil.example:{evil.port}", 403),
    ]
    for method, target, host, status in cases:
        body = JSON_BODY.encode() if method == "POST" else b""
        raw, _ = exchange(gateway.port, request_bytes(method, target, [("Connection", "close")], body, host=host))
        got = parse_response(raw)[0]
        assert got != 500 and (status is None or got == status), (target, got)
    assert evil.requests == []
    for seen in sim.requests:                            # what did reach our upstream stayed a path
        assert seen.path.startswith("/v1/models")
    still_serving(gateway)
    no_tracebacks(caplog)


# -- authentication ---------------------------------------------------------------------

WRONG_KEYS = [
    [("x-dario-api-key", KEY[:-1])], [("x-dario-api-key", KEY + "x")], [("x-dario-api-key", KEY.upper())],
    [("x-dario-api-key", "")], [("x-dario-api-key", "Bearer " + KEY)],
    [("Proxy-Authorization", "Basic " + KEY)], [("Proxy-Authorization", KEY)],
    [("Proxy-Authorization", "Bearer")], [("Authorization", "Bearer " + KEY)], [("x-api-key", KEY)],
    [("x-dario-api-key", "wrong"), ("x-dario-api-key", KEY + "y")],
    [("x-dario-api-key", "\xff\xfe" + KEY)], [("x-dario-api-key", KEY + "\x00")],
    [("X-Dario-Api-Key", KEY + " x")],
]


def test_wrong_keys_are_401_on_every_route_and_nothing_moves(keyed, sim, caplog):
    halt_headers = [("x-dario-api-key", KEY), ("x-sim-claim", "overage"), ("x-api-key", "k")]
    raw, _ = exchange(keyed.port, request_bytes("POST", "/v1/messages", halt_headers, JSON_BODY.encode()))
    assert parse_response(raw)[0] == 200
    routes = [("POST", "/admin/resume"), ("GET", "/admin/resume"), ("GET", "/analytics/stream"),
              ("GET", "/status"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"),
              ("POST", f"/v1/messages?x-dario-api-key={KEY}")]
    for headers in WRONG_KEYS:
        for method, path in routes:
            body = b"{}" if method == "POST" else b""
            raw, _ = exchange(keyed.port, request_bytes(
                method, path, headers + [("Content-Type", "application/json"), ("Connection", "close")], body))
            status, _, payload = parse_response(raw)
            assert status == 401, (headers, path)
            assert json.loads(payload)["error"]["type"] == "authentication_error"
    assert len(sim.requests) == 1
    resp = requests.get(url(keyed, "/health"))
    assert resp.status_code == 200 and resp.json()["guard"] == "halted"
    no_tracebacks(caplog)


@pytest.mark.parametrize("upstream_key", [None, "sk-upstream-Tq3"])
def test_upstream_redirect_is_relayed_and_no_credential_reaches_its_target(sim, home, evil, upstream_key):
    env = {"DARIO_API_KEY": KEY}
    if upstream_key:
        env["DARIO_UPSTREAM_API_KEY"] = upstream_key
    sim.set_defaults(fail="redirect", location=evil.url + "/v1/messages")
    with running_gateway(make_settings(home, sim.url, env=env)) as gateway:
        for method, path in (("POST", "/v1/messages"), ("GET", "/v1/models"), ("POST", "/v1/complete")):
            resp = requests.request(method, url(gateway, path), json=MESSAGE if method == "POST" else None,
                                    headers={"x-dario-api-key": KEY, "x-api-key": "sk-client-secret",
                                             "Authorization": "Bearer oauth-client-secret"},
                                    allow_redirects=False)
            assert resp.status_code == 307 and resp.headers["Location"] == evil.url + "/v1/messages"
        assert evil.requests == [] and len(sim.requests) == 3
        for seen in sim.requests:
            assert seen.header("x-dario-api-key") is None
            if upstream_key:
                assert seen.header("x-api-key") == upstream_key and seen.header("Authorization") is None
        assert health(gateway) == "normal"


# -- malformed requests ---------------------------------------------------------------

H = b"Host: 127.0.0.1\r\n"
MALFORMED = [
    # (name, raw request, expected status or None for "closed without an answer")
    ("empty line", b"\r\n\r\n", None),
    ("only junk bytes", b"\x00\x01\x02\r\n\r\n", 400),
    ("one word", b"GET\r\n\r\n", 400),
    ("four words", b"GET /v1/models HTTP/1.1 extra\r\n" + H + b"\r\n", 400),
    ("HTTP/9.9", b"GET /v1/models HTTP/9.9\r\n" + H + b"\r\n", 505),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("not HTTP", b"GET /v1/models FOO/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/0.9 POST", b"POST /v1/messages\r\n\r\n", 400),
    ("request line over 64 KiB", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("header over 64 KiB", b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ("150 headers", b"GET /v1/models HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
     + b"\r\n", 431),
]


def _malformed_params():
    for name, data, status in MALFORMED:
        yield pytest.param(data, status, id=name)


@pytest.mark.parametrize("data, status", list(_malformed_params()))
def test_malformed_request_heads_get_a_clear_answer(gateway, sim, caplog, data, status):
    raw, closed = exchange(gateway.port, data)
    assert closed
    assert raw or status is None, "no answer at all: the connection was dropped"
    if status is None:
        assert raw == b""
    else:
        got, headers, body = parse_response(raw)
        assert got == status and headers["connection"] == "close"
        assert json.loads(body)["type"] == "error"
    assert sim.requests == []
    no_tracebacks(caplog)
    still_serving(gateway)


def test_malformed_heads_never_stop_the_gateway(gateway, sim):
    """Whatever the answer (or none), the gateway survives every malformed head."""
    for _, data, _ in MALFORMED:
        raw, closed = exchange(gateway.port, data)
        assert closed and b" 500 " not in raw.split(b"\r\n", 1)[0]
    assert sim.requests == []
    still_serving(gateway)
    assert wait_until(lambda: gateway.connections == 0)


POST = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
FRAMING = [
    ("comma list of lengths", POST + b"Content-Length: 2, 3\r\n\r\n{}", 400),
    ("plus sign", POST + b"Content-Length: +2\r\n\r\n{}", 400),
    ("hex length", POST + b"Content-Length: 0x2\r\n\r\n{}", 400),
    ("exponent", POST + b"Content-Length: 2e0\r\n\r\n{}", 400),
    ("minus zero", POST + b"Content-Length: -0\r\n\r\n", 400),
    ("unicode digit", POST + "Content-Length: \uff12\r\n\r\n{}".encode(), 400),
    ("twenty digits", POST + b"Content-Length: 99999999999999999999\r\n\r\n{}", 400),
    ("length over the cap", POST + b"Content-Length: 999999999999\r\n\r\n{}", 413),
    ("TE identity", POST + b"Transfer-Encoding: identity\r\n\r\n{}", 400),
    ("TE chunked, identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("TE gzip, chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("TE and CL 0", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n", 400),
    ("chunk size zz", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    ("chunk size -2", POST + b"Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n", 400),
    ("chunk size 0x2", POST + b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n", 400),
    ("chunk size 17 digits", POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 16 + b"2\r\n{}\r\n0\r\n\r\n", 400),
    ("chunk size empty", POST + b"Transfer-Encoding: chunked\r\n\r\n\r\n{}\r\n0\r\n\r\n", 400),
    ("chunk size huge", POST + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n", 413),
    ("chunk without CRLF", POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400),
    ("chunk line over 4 KiB", POST + b"Transfer-Encoding: chunked\r\n\r\n2;" + b"x" * 5000
     + b"\r\n{}\r\n0\r\n\r\n", 400),
    ("100 trailers", POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: 1\r\n" * 100 + b"\r\n", 400),
    ("body shorter than length", POST + b"Content-Length: 50\r\n\r\n{}", 400),
    ("chunked body cut short", POST + b"Transfer-Encoding: chunked\r\n\r\n10\r\n{}", 400),
]


@pytest.mark.parametrize("data, status", [pytest.param(d, s, id=n) for n, d, s in FRAMING])
def test_bad_framing_is_rejected_and_closed(small, sim, caplog, data, status):
    with Wire(small.port) as wire:
        wire.send(data)
        wire.sock.shutdown(socket.SHUT_WR)          # the cut-short bodies end here
        assert wire.closed_within(3)
        got, headers, body = parse_response(wire.buf)
    assert got == status and headers["connection"] == "close"
    assert json.loads(body)["type"] == "error"
    assert count_responses(wire.buf) == 1
    assert sim.requests == []
    no_tracebacks(caplog)
    still_serving(small)


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe\x00\x80", b"[]", b"null", b'{"model": 7}', b"{" * 5000,
                                  b'{"model": "\xff"}', b"\x00" * 100])
def test_non_json_bodies_are_relayed_as_is_never_a_crash(gateway, sim, caplog, body):
    raw, _ = exchange(gateway.port, request_bytes("POST", "/v1/messages", [
        ("Content-Type", "application/json"), ("Connection", "close")], body))
    status, _, payload = parse_response(raw)
    assert status in (200, 400) and json.loads(payload)     # the simulator's own answer, relayed
    assert sim.requests[-1].body == body                    # forwarded byte for byte
    assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
    assert gateway.store.snapshot()[-1]["status"] == status
    no_tracebacks(caplog)
    still_serving(gateway)


def test_deeply_nested_json_body_is_forwarded_not_a_500(gateway, sim, caplog):
    body = b"[" * 100000                        # under the 256 KiB whole-parse limit of relay.request_facts
    raw, _ = exchange(gateway.port, request_bytes("POST", "/v1/messages", [
        ("Content-Type", "application/json"), ("Connection", "close")], body))
    assert parse_response(raw)[0] != 500
    assert sim.requests and sim.requests[-1].body_len == len(body)
    no_tracebacks(caplog)
    still_serving(gateway)


def test_non_json_body_on_admin_resume_is_not_a_crash(gateway, caplog):
    halt(gateway)
    for body in (b"not json", b"\xff\xfe", b"[1]", b'{"account": 7}', b"{" * 5000):
        raw, _ = exchange(gateway.port, request_bytes("POST", "/admin/resume", [
            ("Content-Type", "application/json"), ("Connection", "close")], body))
        status, _, payload = parse_response(raw)
        assert status in (200, 400) and json.loads(payload)
    no_tracebacks(caplog)


def test_deeply_nested_json_on_admin_resume_is_a_clean_400(gateway, caplog):
    raw, _ = exchange(gateway.port, request_bytes("POST", "/admin/resume", [
        ("Content-Type", "application/json"), ("Connection", "close")], b"[" * 5000))
    assert parse_response(raw)[0] == 400
    no_tracebacks(caplog)


def test_invalid_utf8_and_control_bytes_in_path_query_and_headers(gateway, sim, evil, caplog):
    cases = [
        (b"GET /v1/models/\xff\xfe HTTP/1.1\r\n" + H, (404,)),
        (b"GET /v1/models?a=\xff\xfe HTTP/1.1\r\n" + H, (200,)),
        (b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: \xff\xfe\x80\r\n", (200,)),
        (b"GET /v1/models HTTP/1.1\r\n" + H + b"X-Nul: a\x00b\r\n", (200,)),
        (b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api-key: \xe2\x82\xac\xff\r\n", (200,)),
        (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\xff\r\n", (403,)),
        (b"GET /v1/models HTTP/1.1\r\nHost: \xff\xfe\r\n", (403,)),
        (b"GET /health HTTP/1.1\r\n" + H + b"Origin: https://\xff.example\r\n", (200,)),
    ]
    for data, statuses in cases:
        raw, _ = exchange(gateway.port, data + b"Connection: close\r\n\r\n")
        assert parse_response(raw)[0] in statuses, data
    for seen in sim.requests:
        assert seen.header("X-Nul") is None
    assert evil.requests == []
    no_tracebacks(caplog)
    still_serving(gateway)


def test_control_bytes_in_the_request_target_are_refused_cleanly(gateway, sim, evil, caplog):
    for data, statuses in [
        (b"GET /v1/models\x00 HTTP/1.1\r\n" + H, (400, 404)),         # refused either way
        (b"GET /admin/resume\x00 HTTP/1.1\r\n" + H, (400, 404)),
        (b"GET /v1/models?a=\x7f\x01%00 HTTP/1.1\r\n" + H, (200, 400)),  # forwarded encoded, or refused
    ]:
        raw, _ = exchange(gateway.port, data + b"Connection: close\r\n\r\n")
        assert parse_response(raw)[0] in statuses, data
    assert evil.requests == []
    still_serving(gateway)
    no_tracebacks(caplog)


def test_crlf_in_raw_headers_is_just_two_headers(gateway, sim):
    raw, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: a\r\nX-Injected: 1\r\n"
                      b"Connection: close\r\n\r\n")
    assert parse_response(raw)[0] == 200
    seen = sim.requests[-1]
    assert seen.header("X-A") == "a" and seen.header("X-Injected") == "1"


def test_obs_fold_continuations_are_dropped_never_forwarded(gateway, sim, caplog):
    raw, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: a\r\n  folded\r\n"
                      b"X-B: b\r\n\tX-Injected: 1\r\nX-Fine: yes\r\nConnection: close\r\n\r\n")
    assert parse_response(raw)[0] == 200
    seen = sim.requests[-1]
    assert seen.header("X-A") is None and seen.header("X-B") is None and seen.header("X-Injected") is None
    assert seen.header("X-Fine") == "yes"
    assert not any("folded" in value or "Injected" in value for _, value in seen.headers)
    no_tracebacks(caplog)


def test_obs_fold_never_passes_a_gate(keyed, sim, caplog):
    cases = [
        (b"Host: evil.example\r\n 127.0.0.1\r\nx-dario-api-key: " + KEY.encode() + b"\r\n", 403),
        (b"Host: 127.0.0.1\r\n evil.example\r\nx-dario-api-key: " + KEY.encode() + b"\r\n", 403),
        (H + b"x-dario-api-key: " + KEY.encode() + b"\r\n x\r\n", 401),
        (H + b"x-dario-api-key: " + KEY.encode() + b"\r\nContent-Length: 2\r\n 0\r\n", 400),
    ]
    for head, status in cases:
        raw, _ = exchange(keyed.port, b"POST /v1/messages HTTP/1.1\r\n" + head + b"\r\n" + b"{}" + b"0" * 18)
        assert parse_response(raw)[0] == status, head
    assert sim.requests == []
    no_tracebacks(caplog)


@pytest.mark.parametrize("line", [b"Transfer-Encoding : chunked", b"NoColonHere", b"Name\twith-tab: 1",
                                  b"X-\xff-Name: 1"])
def test_header_lines_that_are_not_fields_get_400(gateway, sim, caplog, line):
    body = b"2\r\n{}\r\n0\r\n\r\n"
    raw, closed = exchange(gateway.port, POST + line + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert parse_response(raw)[0] == 400 and closed and count_responses(raw) == 1
    assert sim.requests == []
    no_tracebacks(caplog)


def test_upstream_header_values_with_cr_lf_nul_or_folding_are_not_relayed(home, caplog):
    canned = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Nul: a\x00b\r\nX-Good: yes\r\n"
              b"X-Ctl: a\x1bb\r\nX-Cr: a\rX-After-Cr: 1\r\nX-Fold: a\r\n\tb\r\nX-Fold2: a\r\n  b: c\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        raw, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
        status, headers, body = parse_response(raw)
        assert status == 200 and body == b"{}"
        head = raw.partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n"):
            assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, line
        assert headers["x-good"] == "yes" and "x-nul" not in headers
        assert "x-fold" not in headers and "x-fold2" not in headers and "b" not in headers
        assert not any(value.endswith("a\rb") for value in headers.values())
        assert still_serving_through(gateway)
    no_tracebacks(caplog)


def still_serving_through(gateway):
    raw, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    return parse_response(raw)[0] == 200


def test_upstream_header_line_that_is_not_a_field_still_gives_a_well_formed_answer(home, caplog):
    """A non-field line ends the upstream's header block (urllib3 says so in its own log);
    what the client gets is still one well-formed response, and the gateway keeps going."""
    canned = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Good: yes\r\nX Space: 1\r\n"
              b"X-Lost: 1\r\nContent-Length: 2\r\n\r\n{}")
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        raw, closed = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
        assert closed and count_responses(raw) == 1
        status, headers, _ = parse_response(raw)
        assert status == 200 and headers["x-good"] == "yes" and "x space" not in headers
        for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
            assert b"\r" not in line and b"\x00" not in line
        assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
        assert health(gateway) == "normal"
    no_tracebacks(caplog, only="dario_lib")


# -- fuzzing the HTTP parser -------------------------------------------------------------

def _field(strategy, samples):
    return st.one_of(st.sampled_from(samples), strategy)


METHODS = _field(st.binary(max_size=8), [b"GET", b"POST", b"OPTIONS", b"PUT", b"HEAD", b"CONNECT", b"G\x00T", b""])
TARGETS = _field(st.binary(max_size=40), [
    b"/v1/messages", b"/v1/models", b"/v1/models/x", b"/health", b"/status", b"/admin/resume",
    b"/analytics/stream", b"*", b"http://evil.example/v1/models", b"@evil/v1/models", b"/v1/messages?\xff"])
VERSIONS = _field(st.binary(max_size=10), [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1x", b""])
NAMES = _field(st.binary(min_size=1, max_size=20), [
    b"Host", b"Content-Length", b"Transfer-Encoding", b"Origin", b"Sec-Fetch-Site", b"Content-Type",
    b"Connection", b"Expect", b"x-dario-api-key", b"Proxy-Authorization", b"Host "])
VALUES = _field(st.binary(max_size=40), [
    b"127.0.0.1", b"chunked", b"0", b"-1", b"5", b"close", b"100-continue", b"application/json",
    b"cross-site", b"https://evil.example", b" a\r\n b", b"2, 3"])
REQUESTS = st.tuples(METHODS, TARGETS, VERSIONS, st.booleans(),
                     st.lists(st.tuples(NAMES, VALUES), max_size=6), st.binary(max_size=64))


def test_fuzzed_request_heads_get_a_status_line_or_a_close(gateway, sim):
    statuses = []

    @hsettings(max_examples=50, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(REQUESTS)
    def one(parts):
        method, target, version, with_host, headers, body = parts
        head = method + b" " + target + b" " + version + b"\r\n"
        if with_host:
            head += b"Host: 127.0.0.1\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        with Wire(gateway.port, timeout=5) as wire:
            try:
                wire.send(head + b"\r\n" + body)
                wire.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                            # the gateway may already have hung up
            assert wire.closed_within(5), "the gateway kept a finished connection open"
        raw = wire.buf
        if raw:
            assert re.match(rb"HTTP/1\.1 \d{3} ", raw), raw[:100]
            found = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]
            assert 500 not in found, raw[:300]
            statuses.extend(found)

    one()
    assert statuses                             # some heads were answered, not all just closed
    still_serving(gateway)
    assert wait_until(lambda: gateway.connections == 0, timeout=5)
