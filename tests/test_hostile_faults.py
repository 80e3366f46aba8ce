"""Hostile faults: a flaky or hostile upstream, and a broken disk or state file.

Upstream faults: every way the far end can fail gives the client a clean Anthropic-shaped
error (or the upstream's own answer, relayed), leaves one record with the right outcome,
and never halts the guard. Process faults: an unusable `$DARIO_HOME` and corrupt files are
reported and survived, and a state file the gateway cannot read keeps it halted.

The cases test_gateway.py already pins (502 on refusal, 504 before headers, mid-stream
SSE error events) appear here only as rows of the "never a halt" matrix.
"""

import dataclasses
import json
import logging
import os
import socket

import pytest
import requests

from .helpers import make_settings, parse_response, running_gateway, wait_until
from .hostile_kit import (
    MESSAGE,
    Wire,
    count_responses,
    health,
    no_tracebacks,
    still_serving,
    url,
)
from .test_cli import Gateway
from .test_gateway import CannedUpstream


@pytest.fixture(autouse=True)
def debug_log(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(gateway, path="/v1/messages", headers=None, stream=False):
    """A raw POST that reads until the gateway closes: (status, headers, body bytes, raw)."""
    body = json.dumps(dict(MESSAGE, stream=stream)).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nx-api-key: k\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n").encode()
    with Wire(gateway.port, timeout=10) as wire:
        wire.send(head + body)
        assert wire.closed_within(10)
        raw = wire.buf
    status, out, payload = parse_response(raw)
    return status, out, payload, raw


def anthropic_error(payload, kind):
    error = json.loads(payload)
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    return error["error"]["message"]


def record(gateway):
    assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
    return gateway.store.snapshot()[-1]


def dechunk(body):
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


# -- the upstream fault matrix ----------------------------------------------------------

def _unreachable(sim, home):
    return dataclasses.replace(make_settings(home), upstream=f"http://127.0.0.1:{free_port()}")


def _dns(sim, home):
    return dataclasses.replace(make_settings(home), upstream="https://nonexistent.invalid")


def _tls(sim, home):
    # The simulator speaks plain HTTP: the TLS handshake fails on its first answer.
    return dataclasses.replace(make_settings(home), upstream=f"https://127.0.0.1:{sim.port}")


def _slow(sim, home):
    return make_settings(home, sim.url, read_timeout_s=0.5)


def _plain(sim, home):
    return make_settings(home, sim.url)


CONNECT_FAULTS = [
    # (name, settings, expected status, error kind, message)
    ("refused", _unreachable, 502, "api_error", "upstream unreachable: connection refused"),
    ("dns failure", _dns, 502, "api_error", "upstream unreachable: name resolution failed"),
    ("tls failure", _tls, 502, "api_error", "upstream unreachable: TLS handshake failed"),
]


@pytest.mark.parametrize("name, build, status, kind, message", CONNECT_FAULTS, ids=[c[0] for c in CONNECT_FAULTS])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_unreachable_upstreams_give_a_clean_error_and_never_halt(sim, home, caplog, name, build, status,
                                                                 kind, message, path):
    with running_gateway(build(sim, home)) as gateway:
        got, headers, payload, _ = send(gateway, path, {"x-sim-claim": "overage"})
        assert got == status and headers["content-type"] == "application/json"
        assert anthropic_error(payload, kind) == message
        rec = record(gateway)
        assert rec["outcome"] == "upstream_error" and rec["status"] == status
        assert rec["claim"] == "unknown" and health(gateway) == "normal"
    no_tracebacks(caplog)


RESPONSE_FAULTS = [
    # (name, settings, request headers, stream?, status, outcome, check(payload, raw))
    ("silent before headers", _slow, {"x-sim-headers-delay-ms": "3000"}, False, 504, "upstream_error",
     lambda p, raw: anthropic_error(p, "timeout_error")),
    ("silent mid-stream", _slow, {"x-sim-fail": "hang_mid_stream", "x-sim-hang-s": "5"}, True, 200,
     "upstream_error", lambda p, raw: b"event: error" in p and b"api_error" in p),
    ("reset mid-stream", _plain, {"x-sim-fail": "reset_mid_stream"}, True, 200, "upstream_error",
     lambda p, raw: b"event: error" in p),
    ("closed mid-stream", _plain, {"x-sim-fail": "die_mid_stream"}, True, 200, "upstream_error",
     lambda p, raw: b"event: error" in p),
    ("reset mid-JSON", _plain, {"x-sim-fail": "reset_mid_stream"}, False, 200, "upstream_error",
     lambda p, raw: len(p) < int(parse_response(raw)[1]["content-length"])),   # cut short, then closed
    ("silent mid-JSON", _slow, {"x-sim-fail": "hang_mid_stream", "x-sim-hang-s": "5"}, False, 200,
     "upstream_error", lambda p, raw: len(p) < int(parse_response(raw)[1]["content-length"])),
    ("garbage SSE", _plain, {"x-sim-fail": "garbage_sse"}, True, 200, "ok",
     lambda p, raw: dechunk(p).startswith(b"\x00\xff\xfe<html>") and dechunk(p).endswith(b"\x1a\n")),
    ("500", _plain, {"x-sim-http-status": "500"}, False, 500, "upstream_error",
     lambda p, raw: anthropic_error(p, "api_error") == "Internal Server Error"),
    ("529 overloaded", _plain, {"x-sim-http-status": "529"}, True, 529, "upstream_error",
     lambda p, raw: anthropic_error(p, "overloaded_error")),
    ("503 without claim", _plain, {"x-sim-http-status": "503", "x-sim-claim": "none"}, False, 503,
     "upstream_error", lambda p, raw: json.loads(p)["type"] == "error"),
    ("no rate-limit headers", _plain, {"x-sim-claim": "none"}, False, 200, "ok",
     lambda p, raw: json.loads(p)["type"] == "message"),
    ("no rate-limit headers, stream", _plain, {"x-sim-claim": "none"}, True, 200, "ok",
     lambda p, raw: b"message_stop" in p),
]


@pytest.mark.parametrize("name, build, headers, stream, status, outcome, check", RESPONSE_FAULTS,
                         ids=[c[0] for c in RESPONSE_FAULTS])
def test_upstream_response_faults_are_relayed_cleanly_and_never_halt(sim, home, caplog, name, build, headers,
                                                                     stream, status, outcome, check):
    with running_gateway(build(sim, home)) as gateway:
        got, _, payload, raw = send(gateway, headers=headers, stream=stream)
        assert got == status
        assert check(payload, raw)
        assert count_responses(raw) == 1
        rec = record(gateway)
        assert rec["outcome"] == outcome and rec["status"] == status
        assert health(gateway) == "normal"
        still_serving(gateway)
    no_tracebacks(caplog, only="dario_lib")


CANNED = [
    # (name, raw upstream answer, expected status to the client, reason in the 502)
    ("closes without a word", b"", 502, "upstream unreachable:"),
    ("not HTTP at all", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 502, "upstream unreachable:"),
    ("negative status", b"HTTP/1.1 -1 Nope\r\nContent-Length: 2\r\n\r\n{}", 502, "upstream unreachable:"),
    ("150 headers", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
     + b"Content-Length: 2\r\n\r\n{}", 502, "upstream unreachable:"),
    ("header over 64 KiB", b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\n{}",
     502, "upstream unreachable:"),
    ("two lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 502,
     "upstream unreachable:"),
    ("bad chunk size", (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\nzz\r\nhello\r\n0\r\n\r\n"), 200, None),
    ("length longer than body", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", 200, None),
    ("101 switching protocols", (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                 b"Connection: Upgrade\r\n\r\nraw bytes"), 502, "upstream unreachable:"),
]


@pytest.mark.parametrize("name, canned, status, reason", CANNED, ids=[c[0] for c in CANNED])
def test_a_hostile_upstream_answer_is_survived(home, caplog, name, canned, status, reason):
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        got, _, payload, raw = send(gateway)
        assert got == status and count_responses(raw) == 1   # send() saw the close
        if reason is not None:
            assert anthropic_error(payload, "api_error").startswith(reason)
        rec = record(gateway)
        assert rec["outcome"] in ("ok", "upstream_error") and rec["claim"] == "unknown"
        assert rec["outcome"] == "upstream_error"
        assert health(gateway) == "normal"
        assert wait_until(lambda: gateway.connections == 0)
    no_tracebacks(caplog, only="dario_lib")


DEEP = b"[" * 100000


@pytest.mark.parametrize("content_type, body", [
    ("application/json", DEEP),
    ("text/event-stream", b"event: message_start\ndata: " + DEEP + b"\n\n"),
], ids=["json", "sse"])
def test_a_deeply_nested_upstream_body_is_relayed_and_recorded(home, caplog, content_type, body):
    canned = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
              b"anthropic-ratelimit-unified-representative-claim: five_hour\r\n\r\n"
              % (content_type.encode(), len(body))
              + body)
    with CannedUpstream(canned) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        got, _, payload, raw = send(gateway)
        assert got == 200 and payload == body and count_responses(raw) == 1
        rec = record(gateway)
        assert rec["outcome"] == "ok" and rec["claim"] == "five_hour"
    no_tracebacks(caplog)


# -- process faults: the home folder and its files ----------------------------------------

def breakable_home(tmp_path):
    """A DARIO_HOME that works at start and can be made unwritable afterwards.

    `break_it()` chmods it 0500; tests often run as root, where permissions do not stop a
    write, so it probes and then instead moves the folder away and puts a regular file in
    its place (ENOTDIR/EEXIST for anyone). Returns (home, break_it, restore).
    """
    home = tmp_path / "home"
    home.mkdir()

    def break_it():
        os.chmod(home, 0o500)
        probe = home / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return                              # not root: the chmod holds
        probe.unlink()
        os.chmod(home, 0o700)
        home.rename(tmp_path / "home-moved")
        home.write_text("")

    def restore():
        if home.is_dir():
            os.chmod(home, 0o700)

    return home, break_it, restore


def test_unwritable_home_keeps_the_halt_in_memory_and_says_so_loudly(sim, tmp_path, caplog):
    home, break_it, restore = breakable_home(tmp_path)
    try:
        with running_gateway(make_settings(home, sim.url)) as gateway:
            still_serving(gateway)
            break_it()
            resp = requests.post(url(gateway, "/v1/messages"), json=MESSAGE, headers={"x-sim-claim": "overage"})
            assert resp.status_code == 200                       # the trigger is relayed in full
            assert health(gateway) == "halted"
            blocked = requests.post(url(gateway, "/v1/messages"), json=MESSAGE)
            assert blocked.status_code == 503
            assert blocked.json()["error"]["type"] == "dario_overage_guard"
            assert len(sim.requests) == 2
            loud = [r for r in caplog.records
                    if r.levelno >= logging.ERROR and "COULD NOT SAVE THE HALT" in r.getMessage()]
            assert loud and "memory" in loud[0].getMessage() and "restart" in loud[0].getMessage()
            assert not os.path.exists(os.path.join(str(home), "guard-state.json"))
            assert health(gateway) == "halted"                   # still, on every later look
            assert requests.post(url(gateway, "/admin/resume"), json={}).json()["wasHalted"] is True
            assert health(gateway) == "normal"
            still_serving(gateway)
    finally:
        restore()
    no_tracebacks(caplog)


def test_unwritable_home_in_the_real_process(sim, tmp_path):
    home, break_it, restore = breakable_home(tmp_path)
    try:
        gateway = Gateway(home, ["--upstream=" + sim.url])
        try:
            break_it()
            requests.post(gateway.url + "/v1/messages", json=MESSAGE, headers={"x-sim-claim": "overage"})
            assert requests.get(gateway.url + "/health").json()["guard"] == "halted"
            assert requests.post(gateway.url + "/v1/messages", json=MESSAGE).status_code == 503
            assert len(sim.requests) == 1
        finally:
            assert gateway.stop() == 0
    finally:
        restore()
    assert "COULD NOT SAVE THE HALT" in gateway.log and "Traceback" not in gateway.log


def test_a_home_that_cannot_hold_a_state_file_starts_halted(sim, tmp_path):
    """DARIO_HOME under a regular file: the saved state cannot even be read, so the guard
    fails closed from the start and says why."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    gateway = Gateway(blocker / "home", ["--upstream=" + sim.url])
    try:
        assert requests.get(gateway.url + "/health").json()["guard"] == "halted"
        assert requests.post(gateway.url + "/v1/messages", json=MESSAGE).status_code == 503
        assert sim.requests == []
    finally:
        assert gateway.stop() == 0
    assert "unreadable" in gateway.log and "Traceback" not in gateway.log


def start_gateway(sim, home):
    gateway = Gateway(home, ["--upstream=" + sim.url])
    return gateway


CORRUPT_CONFIGS = [
    ("binary", lambda path: path.write_bytes(b"\x00\xff\xfe\x80garbage")),
    ("array", lambda path: path.write_text("[1, 2, 3]")),
    ("a folder", lambda path: path.mkdir()),
    ("huge number", lambda path: path.write_text('{"port": ' + "9" * 5000 + "}")),
    ("deep nesting", lambda path: path.write_text("[" * 100000)),
]


@pytest.mark.parametrize("name, corrupt", CORRUPT_CONFIGS)
def test_a_corrupt_config_file_is_reported_never_a_crash(sim, home, name, corrupt):
    corrupt(home / "config.json")
    gateway = start_gateway(sim, home)
    try:
        status = requests.get(gateway.url + "/status").json()
        assert status["configSource"] == "invalid"
        assert requests.post(gateway.url + "/v1/messages", json=MESSAGE).status_code == 200
    finally:
        assert gateway.stop() == 0
    assert "config.json" in gateway.log and "Traceback" not in gateway.log


CORRUPT_STATES = [
    ("not JSON", lambda path: path.write_text("{oops")),
    ("binary", lambda path: path.write_bytes(b"\x00\xff\xfe\x80garbage")),
    ("null", lambda path: path.write_text("null")),
    ("a folder", lambda path: path.mkdir()),
    ("halts not a list", lambda path: path.write_text('{"halts": {"since": 1}}')),
    ("since is a float", lambda path: path.write_text('{"halts": [{"since": 1.5e12}]}')),
    ("deep nesting", lambda path: path.write_text("[" * 100000)),
    ("since past year 9999", lambda path: path.write_text(
        '{"halts": [{"since": 99999999999999999999, "cooldownUntil": null}]}')),
    ("cooldown in year 10000", lambda path: path.write_text(
        '{"halts": [{"since": 1700000000000, "cooldownUntil": 253402300800000}]}')),
]


@pytest.mark.parametrize("name, corrupt", CORRUPT_STATES)
def test_a_corrupt_guard_state_starts_halted_and_says_why(sim, home, name, corrupt):
    corrupt(home / "guard-state.json")
    gateway = start_gateway(sim, home)
    try:
        assert requests.get(gateway.url + "/health").json()["guard"] == "halted"
        blocked = requests.post(gateway.url + "/v1/messages", json=MESSAGE)
        message = blocked.json()["error"]["message"]
        assert blocked.status_code == 503 and f"dario.py resume --port={gateway.port}`" in message
        assert sim.requests == []
        assert requests.post(gateway.url + "/admin/resume", json={}).json()["wasHalted"] is True
        assert requests.post(gateway.url + "/v1/messages", json=MESSAGE).status_code == 200
    finally:
        assert gateway.stop() == 0
    assert "guard-state.json" in gateway.log and "Traceback" not in gateway.log


@pytest.mark.parametrize("content", ["[" * 100000, '{"halts": [{"since": 99999999999999999999}]}'],
                         ids=["deep", "out of range"])
def test_a_state_file_corrupted_while_running_fails_closed(gateway, sim, home, caplog, content):
    still_serving(gateway)
    (home / "guard-state.json").write_text(content)
    assert requests.get(url(gateway, "/health")).json()["guard"] == "halted"
    assert requests.post(url(gateway, "/v1/messages"), json=MESSAGE).status_code == 503
    assert len(sim.requests) == 1
    no_tracebacks(caplog)
