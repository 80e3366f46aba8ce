"""GET and PUT /admin/config over real sockets: the gateway's own file, validated,
saved atomically and applied at once, all or nothing, credentials never shown."""

import json
import logging

import pytest
import requests

from dario_lib import config

from .helpers import make_settings, parse_response, raw_request, running_gateway

PROXY_SECRET = "hunter2-proxy"
STORE_SECRET = "hunter2-redis"


def url(gateway):
    return f"http://127.0.0.1:{gateway.port}/admin/config"


def put(gateway, changes, **kwargs):
    return requests.put(url(gateway), json={"set": changes}, timeout=5, **kwargs)


@pytest.fixture
def applying(sim, home):
    """A gateway that applies changes as `dario proxy` does (a resolver: its flags and
    environment, re-read with the file)."""
    with running_gateway(make_settings(home, sim.url)) as gateway:
        gateway.resolver = lambda: make_settings(home, sim.url)
        yield gateway


def test_get_shows_the_file_and_every_value_in_force_with_credentials_masked(sim, home):
    (home / "config.json").write_text(json.dumps({
        "custom": {"mine": True}, "overageGuard": {"cooldownMs": 60000},
        "upstream": {"proxy": f"http://user:{PROXY_SECRET}@127.0.0.1:3128"},
        "store": {"url": f"redis://:{STORE_SECRET}@127.0.0.1:6379/0"}}))
    settings = make_settings(home, sim.url, flags={"overageGuard.behavior": "warn"})
    # The Redis store itself is not what this test is about: run on the file store.
    import dataclasses
    settings = dataclasses.replace(settings, store=config.StoreConfig())
    with running_gateway(settings) as gateway:
        answer = requests.get(url(gateway), timeout=5)
    assert answer.status_code == 200
    state = answer.json()
    assert PROXY_SECRET not in answer.text and STORE_SECRET not in answer.text
    assert state["path"] == str(home / "config.json") and state["source"] == "file"
    assert state["file"]["custom"] == {"mine": True}
    assert state["file"]["upstream"]["proxy"] == "http://***:***@127.0.0.1:3128"
    assert state["file"]["store"]["url"] == "redis://***@127.0.0.1:6379/0"
    assert set(state["effective"]) == {key.name for key in config.SCHEMA} == set(state["sources"])
    assert state["effective"]["overageGuard.cooldownMs"] == 60000
    assert state["effective"]["overageGuard.behavior"] == "warn"
    assert state["effective"]["upstream.proxy"] == "http://***:***@127.0.0.1:3128"
    assert state["sources"]["overageGuard.behavior"] == "flag"
    assert state["sources"]["overageGuard.cooldownMs"] == "file"
    assert state["sources"]["overageGuard.notifyOs"] == "default"
    assert state["pending"] == ["store.url"]        # the file names a store the gateway is not on


def test_put_saves_the_gateways_own_file_and_applies_it_at_once(applying, home):
    path = home / "config.json"
    path.write_text(json.dumps({"custom": {"mine": True}}))
    answer = put(applying, {"overageGuard.behavior": "warn", "overageGuard.cooldownMs": "60000",
                            "allowedOrigins": ["https://a.example"], "guards.utilization": {"util5h": {"halt": 0.9}},
                            "overageGuard.notifyOs": False})
    assert answer.status_code == 200, answer.text
    state = answer.json()
    assert state["changed"] == ["overageGuard.behavior", "overageGuard.cooldownMs", "allowedOrigins",
                                "guards.utilization", "overageGuard.notifyOs"]
    assert state["effective"]["overageGuard.behavior"] == "warn"
    assert state["effective"]["overageGuard.cooldownMs"] == 60000          # text parsed as `config set` does
    assert state["pending"] == [] and state["overridden"] == {}
    assert json.loads(path.read_text()) == {
        "custom": {"mine": True}, "allowedOrigins": ["https://a.example"],
        "overageGuard": {"behavior": "warn", "cooldownMs": 60000, "notifyOs": False},
        "guards": {"utilization": {"util5h": {"halt": 0.9}}}}
    assert path.stat().st_mode & 0o777 == 0o600
    # Applied: the guard and the exposure checks use the new values now.
    guard = requests.get(f"http://127.0.0.1:{applying.port}/admin/resume", timeout=5).json()["config"]
    assert guard == {"enabled": True, "behavior": "warn", "cooldownMs": 60000, "notifyOs": False}
    assert applying.settings.allowed_origins == ("https://a.example",)
    assert not list(home.glob(".dario-*"))                                  # no temp file left
    # null removes a setting from the file: its default applies again.
    again = put(applying, {"overageGuard.cooldownMs": None}).json()
    assert again["effective"]["overageGuard.cooldownMs"] == 1_800_000
    assert "cooldownMs" not in json.loads(path.read_text())["overageGuard"]


@pytest.mark.parametrize("changes, named", [
    ({"overageGuard.behavior": "warn", "overageGuard.cooldownMs": -5},
     "invalid value -5 for overageGuard.cooldownMs (allowed: an integer from 0 to"),
    ({"overageGuard.behavior": "nuke"}, "invalid value 'nuke' for overageGuard.behavior (allowed: halt or warn)"),
    ({"overageGuard.notifyOs": "maybe"}, "invalid value 'maybe' for overageGuard.notifyOs (allowed: true/false"),
    ({"port": 3.5}, "invalid value 3.5 for port (allowed: an integer from 0 to 65535)"),
    ({"allowedHosts": [1, 2]}, "invalid value [1, 2] for allowedHosts (allowed: a list of non-empty strings)"),
    ({"overageGuard.behavior": "warn", "nope.nothing": 1}, "unknown config key 'nope.nothing'; keys: port, host"),
    ({"upstream.proxy": f"socks5://u:{PROXY_SECRET}@h:1"}, "upstream.proxy (allowed: an http:// proxy URL"),
])
def test_a_bad_value_or_key_is_a_400_naming_it_and_nothing_is_written(applying, home, changes, named):
    path = home / "config.json"
    path.write_text(json.dumps({"overageGuard": {"cooldownMs": 60000}}))
    before = path.read_bytes()
    answer = put(applying, changes)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"], error["message"]
    assert PROXY_SECRET not in answer.text
    assert answer.headers["x-should-retry"] == "false"
    assert path.read_bytes() == before
    assert applying.guard.config.behavior == "halt" and applying.guard.config.cooldown_ms == 1_800_000


def test_restart_settings_are_saved_and_reported_pending(applying, home):
    state = put(applying, {"maxRecords": 50, "overageGuard.behavior": "warn"}).json()
    assert state["pending"] == ["maxRecords"]
    assert state["effective"]["maxRecords"] == 10_000 and state["effective"]["overageGuard.behavior"] == "warn"
    assert json.loads((home / "config.json").read_text())["maxRecords"] == 50
    assert requests.get(url(applying), timeout=5).json()["pending"] == ["maxRecords"]


def test_a_flag_that_outranks_the_file_is_reported_overridden(sim, home):
    flags = {"overageGuard.behavior": "halt"}
    with running_gateway(make_settings(home, sim.url, flags=flags)) as gateway:
        gateway.resolver = lambda: make_settings(home, sim.url, flags=flags)
        state = put(gateway, {"overageGuard.behavior": "warn"}).json()
    assert state["overridden"] == {"overageGuard.behavior": "flag"}
    assert state["effective"]["overageGuard.behavior"] == "halt"
    assert state["file"]["overageGuard"]["behavior"] == "warn"


def test_a_masked_credential_given_back_keeps_the_real_one(applying, home, caplog):
    caplog.set_level(logging.DEBUG)
    secret_url = f"http://user:{PROXY_SECRET}@127.0.0.1:3128"
    answer = put(applying, {"upstream.proxy": secret_url})
    assert answer.status_code == 200 and PROXY_SECRET not in answer.text
    shown = answer.json()["effective"]["upstream.proxy"]
    assert shown == "http://***:***@127.0.0.1:3128"
    again = put(applying, {"upstream.proxy": shown, "overageGuard.behavior": "warn"})
    assert again.status_code == 200
    assert json.loads((home / "config.json").read_text())["upstream"]["proxy"] == secret_url
    assert PROXY_SECRET not in caplog.text


def test_a_gateway_that_cannot_reload_says_so_and_writes_nothing(gateway, home):
    answer = put(gateway, {"overageGuard.behavior": "warn"})
    assert answer.status_code == 409
    assert "cannot apply configuration changes" in answer.json()["error"]["message"]
    assert not (home / "config.json").exists()


def test_settings_that_cannot_be_applied_put_the_file_back(sim, home, monkeypatch):
    path = home / "config.json"
    path.write_text(json.dumps({"upstream": {"url": sim.url}}))
    before = path.read_bytes()
    with running_gateway(make_settings(home)) as gateway:
        gateway.resolver = lambda: make_settings(home)
        # An https upstream would go through HTTPS_PROXY, and this one is unusable.
        monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        answer = put(gateway, {"upstream.url": "https://127.0.0.1:9"})
        assert answer.status_code == 400
        assert "not applied: HTTPS_PROXY is not a usable proxy" in answer.json()["error"]["message"]
        assert path.read_bytes() == before
        assert gateway.settings.upstream == sim.url


def test_invalid_json_in_the_file_is_left_alone(applying, home):
    (home / "config.json").write_text("{broken")
    answer = put(applying, {"overageGuard.behavior": "warn"})
    assert answer.status_code == 409 and "not a valid JSON object" in answer.json()["error"]["message"]
    assert (home / "config.json").read_text() == "{broken"
    assert requests.get(url(applying), timeout=5).json()["source"] == "invalid"


def request_bytes(method, body=b"", headers=(), host="127.0.0.1"):
    lines = [f"{method} /admin/config HTTP/1.1", f"Host: {host}", "Connection: close",
             f"Content-Length: {len(body)}", *[f"{n}: {v}" for n, v in headers]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


JSON = [("Content-Type", "application/json")]


@pytest.mark.parametrize("method, body, headers, host, status", [
    ("PUT", b'{"set": {"overageGuard.behavior": "warn"}}', [("Content-Type", "text/plain")], "127.0.0.1", 415),
    ("PUT", b'{"set": {"overageGuard.behavior": "warn"}}', JSON, "evil.example", 403),
    ("PUT", b'{"set": {"overageGuard.behavior": "warn"}}', JSON + [("Origin", "https://evil.example")],
     "127.0.0.1", 403),
    ("GET", b"", [("Origin", "https://evil.example")], "127.0.0.1", 403),
    ("PUT", b"[" * 60000 + b"]" * 60000, JSON, "127.0.0.1", 413),
    ("PUT", b"[" * 30000 + b"]" * 30000, JSON, "127.0.0.1", 400),
    ("PUT", b'{"set": {"port": ' + b"[" * 20000 + b"]" * 20000 + b"}}", JSON, "127.0.0.1", 400),
    ("PUT", b'{"set": {"allowedHosts": ' + b"[" * 900 + b"]" * 900 + b"}}", JSON, "127.0.0.1", 400),
    ("PUT", b'{"set": []}', JSON, "127.0.0.1", 400),
    ("PUT", b'{"set": {}}', JSON, "127.0.0.1", 400),
    ("PUT", b'{"set": {"port": 1}, "also": 2}', JSON, "127.0.0.1", 400),
    ("PUT", b'\xff\xfe', JSON, "127.0.0.1", 400),
    ("DELETE", b"", [], "127.0.0.1", 405),
    ("POST", b"{}", JSON, "127.0.0.1", 405),
])
def test_the_same_gate_as_resume_and_hostile_bodies_are_never_a_500(applying, home, method, body, headers,
                                                                      host, status):
    raw = raw_request(applying.port, request_bytes(method, body, headers, host))
    got, response_headers, payload = parse_response(raw)
    assert got == status, payload[:300]
    assert json.loads(payload)["type"] == "error"
    assert not (home / "config.json").exists()


def test_the_api_key_guards_both_methods(sim, home):
    settings = make_settings(home, sim.url, env={"DARIO_API_KEY": "gw-key"})
    with running_gateway(settings) as gateway:
        gateway.resolver = lambda: make_settings(home, sim.url, env={"DARIO_API_KEY": "gw-key"})
        assert requests.get(url(gateway), timeout=5).status_code == 401
        assert put(gateway, {"overageGuard.behavior": "warn"}).status_code == 401
        assert not (home / "config.json").exists()
        ok = put(gateway, {"overageGuard.behavior": "warn"}, headers={"x-dario-api-key": "gw-key"})
        assert ok.status_code == 200 and "gw-key" not in ok.text


def test_a_browser_origin_allowed_by_config_may_preflight_put(sim, home):
    (home / "config.json").write_text(json.dumps({"allowedOrigins": ["https://ok.example"]}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        answer = requests.options(url(gateway), timeout=5, headers={
            "Origin": "https://ok.example", "Access-Control-Request-Method": "PUT"})
    assert answer.status_code == 204 and "PUT" in answer.headers["Access-Control-Allow-Methods"]


def test_a_file_nested_deeper_than_an_answer_can_be_is_never_a_500(applying, home):
    # Deep enough for the parser, too deep to copy or serialise again inside an answer.
    depth = 0
    for depth in (990, 900, 800, 700, 600, 500):
        text = '{"custom": ' + "[" * depth + "]" * depth + "}"
        try:
            json.loads(text)
            break
        except RecursionError:
            continue
    (home / "config.json").write_text(text)
    got = requests.get(url(applying), timeout=5)
    assert got.status_code == 200
    answer = put(applying, {"overageGuard.behavior": "warn"})
    assert answer.status_code in (200, 409), answer.text
    if answer.status_code == 409:
        assert (home / "config.json").read_text() == text


def test_the_in_flight_allowances_follow_a_change_at_once(applying, home):
    answer = put(applying, {"maxBodyBytesInFlight": 1 << 21})
    assert answer.status_code == 200, answer.text
    assert "maxBodyBytesInFlight" not in answer.json()["pending"] and applying.bodies.limit == 1 << 21


def test_a_store_change_is_saved_and_pending_until_a_restart(applying, home):
    answer = put(applying, {"store.namespace": "team-b"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["pending"] == ["store.namespace"]
    assert applying.settings.store.namespace == "dario"


