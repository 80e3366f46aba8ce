"""Who may talk to the gateway: Host, Origin, Sec-Fetch-Site and DARIO_API_KEY."""

import json

import pytest

from .helpers import make_settings, parse_response, raw_request, running_gateway


def request(port, method="GET", path="/v1/models", headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    raw = raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    status, headers_out, payload = parse_response(raw)
    return status, headers_out, payload


@pytest.mark.parametrize("host", ["localhost", "LocalHost:3456", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:3456"])
def test_loopback_host_names_are_accepted(gateway, host):
    assert request(gateway.port, headers=[("Host", host)])[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:3456", "", ":3456", "attacker.localhost",
                                  "127.0.0.1.evil.example", "localhost.", "0.0.0.0"])
def test_foreign_host_names_get_403_before_routing(gateway, sim, host):
    status, _, body = request(gateway.port, headers=[("Host", host)])
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
    assert request(gateway.port, path="/status", headers=[("Host", host)])[0] == 403
    assert sim.requests == []


def test_missing_or_duplicate_host(gateway):
    raw = raw_request(gateway.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert parse_response(raw)[0] == 403
    status = request(gateway.port, headers=[("Host", "localhost"), ("Host", "evil.example")])[0]
    assert status == 400


def test_allowed_hosts_from_config(sim, home):
    (home / "config.json").write_text(json.dumps({"allowedHosts": ["dario.lan"]}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert request(gateway.port, headers=[("Host", "Dario.LAN:3456")])[0] == 200


def test_cross_origin_and_cross_site_requests_get_403(gateway, sim):
    host = ("Host", "127.0.0.1")
    for headers in ([("Origin", "https://evil.example")], [("Origin", "null")],
                    [("Sec-Fetch-Site", "cross-site")]):
        for path in ("/v1/models", "/status", "/analytics", "/analytics/stream", "/admin/resume"):
            status, out, _ = request(gateway.port, path=path, headers=[host] + headers)
            assert status == 403 and "access-control-allow-origin" not in out
    assert request(gateway.port, path="/health", headers=[host, ("Origin", "https://evil.example")])[0] == 200
    assert request(gateway.port, headers=[host, ("Sec-Fetch-Site", "same-origin")])[0] == 200
    assert sim.requests[-1].path == "/v1/models" and len(sim.requests) == 1


def test_preflight_only_for_allowed_origins(sim, home):
    (home / "config.json").write_text(json.dumps({"allowedOrigins": ["https://app.example"]}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        host = ("Host", "127.0.0.1")
        status, out, _ = request(gateway.port, "OPTIONS", "/v1/messages", [
            host, ("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "x-api-key, content-type")])
        assert status == 204 and out["access-control-allow-origin"] == "https://app.example"
        assert out["access-control-allow-headers"] == "x-api-key, content-type"
        status, out, _ = request(gateway.port, "OPTIONS", "/v1/messages", [host, ("Origin", "https://evil.example")])
        assert status == 403 and "access-control-allow-origin" not in out
        status, out, _ = request(gateway.port, headers=[host, ("Origin", "https://app.example")])
        assert status == 200 and out["access-control-allow-origin"] == "https://app.example"
        assert request(gateway.port, "OPTIONS", "/v1/messages", [host])[0] == 403


@pytest.fixture
def keyed(sim, home):
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": "gw-sekret-ü"})) as gateway:
        yield gateway


def test_every_endpoint_but_health_needs_the_key(keyed, sim):
    host = ("Host", "127.0.0.1")
    for method, path in (("GET", "/status"), ("GET", "/analytics"), ("GET", "/analytics/stream"),
                         ("GET", "/admin/resume"), ("POST", "/admin/resume"), ("GET", "/v1/models"),
                         ("POST", "/v1/messages"), ("GET", "/nope")):
        for headers in ([], [("x-dario-api-key", "wrong")], [("Proxy-Authorization", "Bearer wrong")],
                        [("x-api-key", "gw-sekret-ü".encode().decode("latin-1"))]):
            status, _, body = request(keyed.port, method, path, [host] + headers)
            assert status == 401, (path, headers)
            assert json.loads(body)["error"]["type"] == "authentication_error"
    assert request(keyed.port, path="/health", headers=[host])[0] == 200
    assert sim.requests == []


def test_key_is_accepted_and_never_forwarded(keyed, sim):
    key = "gw-sekret-ü".encode().decode("latin-1")         # as bytes on the wire
    for header in (("x-dario-api-key", key), ("Proxy-Authorization", "Bearer " + key)):
        status, _, _ = request(keyed.port, headers=[("Host", "127.0.0.1"), header, ("x-api-key", "sk-client")])
        assert status == 200
        seen = sim.requests[-1]
        assert seen.header("x-dario-api-key") is None and seen.header("Proxy-Authorization") is None
        assert seen.header("x-api-key") == "sk-client"


def test_non_ascii_key_from_client_is_401_not_500(keyed):
    status = request(keyed.port, headers=[("Host", "127.0.0.1"), ("x-dario-api-key", "ключ".encode().decode("latin-1"))])[0]
    assert status == 401


def test_with_upstream_key_client_may_send_gateway_key_as_api_key(sim, home):
    env = {"DARIO_API_KEY": "gw-key", "DARIO_UPSTREAM_API_KEY": "sk-up"}
    with running_gateway(make_settings(home, sim.url, env=env)) as gateway:
        for header in (("x-api-key", "gw-key"), ("Authorization", "Bearer gw-key")):
            assert request(gateway.port, headers=[("Host", "127.0.0.1"), header])[0] == 200
            seen = sim.requests[-1]
            assert seen.header("x-api-key") == "sk-up" and seen.header("Authorization") is None


def test_early_refusal_closes_the_connection_so_a_body_is_never_a_request(gateway, sim):
    smuggled = b"POST /admin/resume HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    raw = raw_request(gateway.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
                      b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    status, headers, _ = parse_response(raw)
    assert status == 403 and headers["connection"] == "close" and raw.count(b"HTTP/1.1 ") == 1
