"""Every billing signal trips the guard, over real sockets (issue 10 item 4).

The simulator sends one value per header, so these tests put a small upstream of their
own behind the gateway: it answers POST /v1/messages with exactly the header lines a test
sets, repeated names included.
"""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from .helpers import make_settings, running_gateway

PREFIX = "anthropic-ratelimit-unified-"
MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
ANSWER = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-5",
                     "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                     "usage": {"input_tokens": 3, "output_tokens": 1}}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, lines = self.server.replies.pop(0) if self.server.replies else (200, [])
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        for name, value in lines:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def upstream():
    """A loopback upstream; append (status, [(name, value), ...]) to `.replies` per answer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.replies = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="signals-upstream", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def rig(home):
    with upstream() as up:
        settings = make_settings(home, f"http://127.0.0.1:{up.server_address[1]}")
        with running_gateway(settings) as gateway:
            yield up, gateway


def post(gateway):
    return requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json=MESSAGE,
                         headers={"x-api-key": "sk-test"}, timeout=10)


def unified(*pairs):
    return [(PREFIX + name, value) for name, value in pairs]


TRIPS = [
    pytest.param(200, unified(("representative-claim", "five_hour"), ("representative-claim", "overage")),
                 "representative-claim=overage", "billed to extra usage", id="repeated-claim"),
    pytest.param(200, unified(("representative-claim", "five_hour, api")),
                 "representative-claim=api", "billed as API usage", id="comma-claim"),
    pytest.param(200, unified(("representative-claim", "weekly_pool")),
                 "representative-claim=weekly_pool", "billed outside the subscription (claim 'weekly_pool')",
                 id="new-claim"),
    pytest.param(200, unified(("representative-claim", "five_hour"), ("overage-in-use", "true")),
                 "overage-in-use=true", "served from extra usage", id="overage-in-use"),
    pytest.param(429, unified(("representative-claim", "five_hour"), ("status", "rejected"),
                              ("overage-status", "allowed")),
                 "status=rejected+overage-status=allowed", "served from extra usage", id="rejected-allowed"),
    pytest.param(200, unified(("representative-claim", "seven_day"), ("status", "rejected"),
                              ("overage-status", "allowed_warning")),
                 "status=rejected+overage-status=allowed_warning", "served from extra usage",
                 id="rejected-allowed-warning"),
]


@pytest.mark.parametrize("status, lines, signal, words", TRIPS)
def test_each_billing_signal_halts_and_the_503_names_it(rig, status, lines, signal, words):
    up, gateway = rig
    up.replies.append((status, lines))
    first = post(gateway)
    assert first.status_code == status                  # the answer that tripped is relayed in full
    assert first.content == ANSWER
    blocked = post(gateway)
    assert blocked.status_code == 503 and blocked.headers["x-should-retry"] == "false"
    error = blocked.json()["error"]
    assert error["type"] == "dario_overage_guard"
    assert f"signal {signal}" in error["message"] and words in error["message"]
    state = requests.get(f"http://127.0.0.1:{gateway.port}/admin/resume").json()["state"]
    assert state["detail"]["signal"] == signal
    records = gateway.store.snapshot()
    assert records[0]["billingSignal"] == signal and records[-1]["outcome"] == "halted"


NO_TRIPS = [
    pytest.param(200, unified(("representative-claim", "five_hour")), id="subscription"),
    pytest.param(200, unified(("representative-claim", "five_hour"), ("overage-in-use", "false")),
                 id="overage-not-in-use"),
    pytest.param(200, unified(("representative-claim", "five_hour"), ("representative-claim", "seven_day")),
                 id="repeated-subscription"),
    pytest.param(200, unified(("representative-claim", "seven_day_fallback")), id="fallback"),
    pytest.param(200, unified(("representative-claim", "five_hour"), ("overage-utilization", "1.0")),
                 id="overage-utilization-alone"),
    pytest.param(429, [], id="bare-429"),
    pytest.param(429, unified(("representative-claim", "five_hour"), ("status", "rejected"),
                              ("overage-status", "rejected")), id="rejected-no-overage"),
]


@pytest.mark.parametrize("status, lines", NO_TRIPS)
def test_no_signal_no_halt(rig, status, lines):
    up, gateway = rig
    up.replies.append((status, lines))
    assert post(gateway).status_code == status
    assert post(gateway).status_code == 200
    assert gateway.guard.snapshot() is None
    assert gateway.store.snapshot()[0]["billingSignal"] is None


def test_warn_mode_names_the_signal(home):
    (home / "config.json").write_text(json.dumps({"overageGuard": {"behavior": "warn"}}))
    with upstream() as up:
        with running_gateway(make_settings(home, f"http://127.0.0.1:{up.server_address[1]}")) as gateway:
            sub = gateway.bus.subscribe()
            up.replies.append((200, unified(("representative-claim", "five_hour"), ("overage-in-use", "true"))))
            assert post(gateway).status_code == 200
            assert post(gateway).status_code == 200
            warns = []
            while True:
                item = sub.get(0.2)
                if item is None or item[0] == "timeout":
                    break
                if item[0] == "overage_warn":
                    warns.append(item[1])
            assert [w["detail"] for w in warns] == [{"claim": "five_hour", "signal": "overage-in-use=true"}]
