"""No money leaks past the guard (the relay's side): every billed answer is counted, no
request is sent twice, generation stops when the client leaves, and labels follow the
credential actually forwarded. Each test reproduces an escape over real sockets.
"""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import time

import pytest
import requests

from .helpers import RawUpstream, json_answer, make_settings, running_gateway, wait_until
from .hostile_kit import Wire, request_bytes
from .test_cli import DARIO, Gateway

SONNET = {"model": "claude-sonnet-4-5", "max_tokens": 10_000, "messages": [{"role": "user", "content": "hi"}]}
SUBSCRIPTION = [("anthropic-ratelimit-unified-representative-claim", "five_hour"),
                ("anthropic-ratelimit-unified-status", "allowed")]


def configure(home, **config):
    (home / "config.json").write_text(json.dumps(config))


def url(gateway, path="/v1/messages"):
    return f"http://127.0.0.1:{gateway.port}{path}"


def last_record(gateway):
    assert wait_until(lambda: gateway.store.summary()["requests"] >= 1)
    return gateway.store.snapshot()[-1]


# -- 1. billed answers are never counted as free -----------------------------------

def test_openai_streams_without_usage_are_charged_their_worst_case_and_hit_the_budget(sim, home):
    """The OpenAI SDK's default stream carries no usage: it used to pass a budget at $0."""
    configure(home, guards={"budgets": [{"account": "*", "usd": 0.5, "window": "1d"}]})
    chat = {"model": "claude-sonnet-4-5", "max_tokens": 10_000, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(make_settings(home, sim.url)) as gateway:
        statuses = []
        for _ in range(8):
            resp = requests.post(url(gateway, "/v1/chat/completions"), json=chat,
                                 headers={"Authorization": "Bearer sk-test"}, timeout=10)
            statuses.append(resp.status_code)
        forwarded = [r for r in gateway.store.snapshot() if r["outcome"] == "ok"]
        assert forwarded and all(r["usageEstimated"] for r in forwarded)
        worst = (len(json.dumps(chat)) * 3.75 + 10_000 * 15.0) / 1e6      # sonnet: dearest input, output
        assert forwarded[0]["costUsd"] == pytest.approx(worst, rel=0.05)
        assert statuses.count(200) == 4 and statuses[4:] == [503] * 4      # 4 x $0.15 > $0.50
        assert gateway.guard.snapshot().reason == "budget_exceeded"


def test_openai_streams_with_usage_are_metered_exactly(sim, home):
    chat = {"model": "claude-sonnet-4-5", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(make_settings(home, sim.url)) as gateway:
        requests.post(url(gateway, "/v1/chat/completions"), json=chat, headers={"Authorization": "Bearer k"})
        record = last_record(gateway)
        assert record["outputTokens"] == 6 and not record.get("usageEstimated")


def test_accept_encoding_is_narrowed_to_what_dario_meters(sim, gateway):
    for sent, forwarded in (("br, gzip", "gzip"), ("br", "identity"), ("gzip;q=0.5, zstd, deflate", "gzip;q=0.5, deflate"),
                            ("*", "gzip, deflate"), ("gzip;q=0, br", "identity")):
        requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k", "Accept-Encoding": sent})
        assert sim.requests[-1].header("accept-encoding") == forwarded, sent


def test_an_answer_dario_cannot_decode_is_charged_its_worst_case(home):
    """An upstream that sends brotli anyway (or garbage) is never metered as $0."""
    body = b"\x1b\x0f\x00\xf8\x8d\x94\x6e\xde" * 10          # not JSON dario could read
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: br\r\n"
              b"anthropic-ratelimit-unified-representative-claim: five_hour\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with RawUpstream(lambda n, head, b, conn: conn.sendall(answer) or True) as upstream, \
            running_gateway(make_settings(home, upstream.url)) as gateway:
        resp = requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k", "Accept-Encoding": "br"})
        assert resp.status_code == 200
        record = last_record(gateway)
        assert record["usageEstimated"] is True and record["costUsd"] > 0.14


# -- 2. a billed POST is never sent twice ------------------------------------------

def test_a_post_the_upstream_took_and_dropped_is_not_sent_again(home):
    """The upstream reads a whole POST on a pooled connection and closes without a word:
    dario used to take it for a stale connection and send it again (two bills)."""
    def answer(n, head, body, conn):
        if n == 1:
            conn.sendall(json_answer({"type": "message", "usage": {"input_tokens": 1, "output_tokens": 1}},
                                     SUBSCRIPTION))
            return True                 # keep the connection: dario pools it
        return False                    # took the request, closes without answering

    with RawUpstream(answer) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        assert requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k"}).status_code == 200
        resp = requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k"})
        assert resp.status_code == 502 and "never sends a request twice" in resp.json()["error"]["message"]
        time.sleep(0.2)
        assert len(upstream.requests) == 2          # once each, never again
        record = gateway.store.snapshot()[-1]
        assert record["outcome"] == "upstream_error" and record["usageEstimated"] is True


def test_an_idle_pooled_connection_closed_by_the_upstream_is_not_reused(home):
    """Proven alive before the write: a pooled connection the upstream closed is dropped
    and a fresh one used, so the request still goes out exactly once."""
    def answer(n, head, body, conn):
        conn.sendall(json_answer({"type": "message"}, SUBSCRIPTION, keep_alive=False))
        conn.shutdown(socket.SHUT_WR)
        return False

    with RawUpstream(answer) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        for _ in range(3):
            assert requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k"}).status_code == 200
        assert len(upstream.requests) == 3


# -- 3. generation stops when the client leaves ------------------------------------

def test_a_client_that_leaves_before_the_answer_stops_the_upstream(sim, gateway):
    """A long non-streamed generation (the upstream still silent): the client hangs up and
    the upstream connection is closed within a second, not when the upstream answers."""
    body = json.dumps(SONNET).encode()
    with Wire(gateway.port) as client:
        client.send(request_bytes("POST", "/v1/messages", [("x-api-key", "k"), ("x-sim-headers-delay-ms", "30000")],
                                  body))
        assert sim.wait_for_requests(1)
        time.sleep(0.3)
    left = time.monotonic()
    assert sim.wait_for_disconnect(timeout=5)
    assert time.monotonic() - left < 1.5
    assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
    record = gateway.store.snapshot()[-1]
    assert record["outcome"] == "client_gone"
    assert record["usageEstimated"] is True and record["costUsd"] > 0    # it reached the upstream


def test_a_client_that_pipelined_its_next_request_then_left_mid_stream_is_noticed(sim, gateway):
    """The pipelined bytes kept the hang-up from being seen until two more events had been
    written into the closed connection (6 s here, with 3 s between events)."""
    body = json.dumps(dict(SONNET, stream=True)).encode()
    first = request_bytes("POST", "/v1/messages", [("x-api-key", "k"), ("x-sim-delay-ms", "3000"),
                                                    ("x-sim-events", "3")], body)
    with Wire(gateway.port) as client:
        client.send(first)
        assert sim.wait_for_requests(1)
        client.send(request_bytes("GET", "/health"))            # the next request, pipelined
        client.sock.settimeout(5)
        got = b""
        while b"event: ping" not in got:                        # all that comes before the pause
            got += client.sock.recv(65536)
    left = time.monotonic()                                     # closed with nothing unread: a FIN
    assert sim.wait_for_disconnect(timeout=8)
    assert time.monotonic() - left < 1.5
    assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
    record = gateway.store.snapshot()[-1]
    assert record["outcome"] == "client_gone" and record["inputTokens"] > 0    # usage reported is kept


def test_endless_interim_answers_are_bounded(home):
    def answer(n, head, body, conn):
        for _ in range(1000):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.01)
        return False

    with RawUpstream(answer) as upstream, running_gateway(make_settings(home, upstream.url)) as gateway:
        began = time.monotonic()
        resp = requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k"}, timeout=10)
        assert resp.status_code == 502 and "interim" in resp.json()["error"]["message"]
        assert time.monotonic() - began < 2
        assert upstream.closed.wait(2)               # the upstream connection was dropped


# -- 5. labels follow what is sent -------------------------------------------------

def test_a_decoy_credential_stripped_before_forwarding_does_not_relabel_a_halted_account(sim, home):
    configure(home, overageGuard={"scope": "account"})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        tripped = requests.post(url(gateway), json=SONNET, headers={"Authorization": "Bearer T",
                                                                    "x-sim-claim": "overage"})
        assert tripped.status_code == 200 and gateway.guard.snapshot() is not None
        seen = len(sim.requests)
        resp = requests.post(url(gateway), json=SONNET, headers={
            "Authorization": "Bearer T", "x-api-key": "decoy", "Connection": "x-api-key"})
        assert resp.status_code == 503
        assert len(sim.requests) == seen
        other = requests.post(url(gateway), json=SONNET, headers={"Authorization": "Bearer U"})
        assert other.status_code == 200


# -- 6. a halt survives descriptor exhaustion --------------------------------------

def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2400, reason="needs a hard limit >= 2400")
def test_a_halt_is_saved_at_the_descriptor_limit_and_survives_kill_9(sim, home):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2400), hard))     # this test's own clients
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    environ.update(DARIO_HOME=str(home), DARIO_OVERAGE_NOTIFY="off")
    proc = subprocess.Popen(DARIO + ["proxy", "--port=0", "--upstream=" + sim.url], env=environ,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_fds)
    idle = []
    try:
        log = ""
        while "listening on" not in log:
            line = proc.stderr.readline()
            assert line, log
            log += line
        port = int(re.search(r"127\.0\.0\.1:(\d+)", log).group(1))
        early = socket.create_connection(("127.0.0.1", port))      # open before the crowd
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        began = time.monotonic()
        late = requests.get(f"http://127.0.0.1:{port}/health", timeout=4)
        assert late.status_code == 503 and late.json()["error"]["type"] == "overloaded_error"
        assert time.monotonic() - began < 1
        body = json.dumps(SONNET).encode()
        early.sendall(request_bytes("POST", "/v1/messages", [("x-api-key", "k"), ("x-sim-claim", "overage")], body))
        early.settimeout(5)
        assert early.recv(65536).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: (home / "guard-state.json").exists(), timeout=5)
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait()
    again = Gateway(home, ["--upstream=" + sim.url])
    try:
        assert requests.get(f"{again.url}/health", timeout=5).json()["guard"] == "halted"
        assert "STARTING HALTED" in again.log.upper()
    finally:
        again.stop(signal.SIGKILL)


def test_unmetered_spend_is_shown_apart_in_analytics_and_metrics(sim, gateway):
    chat = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    requests.post(url(gateway, "/v1/chat/completions"), json=chat, headers={"Authorization": "Bearer k"})
    requests.post(url(gateway), json=SONNET, headers={"x-api-key": "k"})
    hour = requests.get(url(gateway, "/analytics")).json()["lastHour"]
    assert hour["unmeteredRequests"] == 1 and 0 < hour["unmeteredCostUsd"] < hour["estimatedCostUsd"]
    text = requests.get(url(gateway, "/metrics")).text
    assert re.search(r'^dario_unmetered_cost_usd_total\{[^}]*path', text, re.M) is None
    assert re.search(r'^dario_unmetered_cost_usd_total\{.*\} [0-9.]+$', text, re.M)


def test_an_absurd_max_tokens_is_a_clean_400_not_a_traceback(sim, home, caplog):
    configure(home, guards={"budgets": [{"account": "*", "usd": 0.5, "window": "1d"}]})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        body = '{"model": "claude-sonnet-4-5", "max_tokens": ' + "9" * 400 + ', "messages": []}'
        resp = requests.post(url(gateway), data=body, headers={"x-api-key": "k"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in resp.json()["error"]["message"] and sim.requests == []
        assert "Traceback" not in caplog.text
        assert gateway.store.snapshot()[-1]["outcome"] == "rejected"
