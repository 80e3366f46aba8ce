"""/health, /status, /analytics and the /analytics/stream SSE feed."""

import json
import socket
import threading
import time

import pytest
import requests

from dario_lib.client import Client
from dario_lib.events import MAX_SUBSCRIBERS, EventBus

from dario_lib.server import GatewayServer

from .helpers import FakeClock, RecordingNotifier, make_settings, running_gateway, wait_until

MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def url(gateway, path):
    return f"http://127.0.0.1:{gateway.port}{path}"


def post(gateway, headers=None, key="sk-a"):
    return requests.post(url(gateway, "/v1/messages"), json=MESSAGE, headers={"x-api-key": key, **(headers or {})})


def test_health_and_status(gateway):
    post(gateway)
    assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
    health = requests.get(url(gateway, "/health")).json()
    assert health["status"] == "ok" and health["guard"] == "normal" and health["requests"] == 1
    assert health["version"] and health["uptimeS"] >= 0
    status = requests.get(url(gateway, "/status")).json()
    assert status["bind"] == f"127.0.0.1:{gateway.port}" and status["configSource"] == "missing"
    assert status["outcomes"]["ok"] == 1 and status["guard"]["state"] == "normal"
    assert status["lastClaims"][-1]["claim"] == "five_hour"


def test_analytics_totals_breakdowns_and_accounts(gateway):
    post(gateway, {"x-sim-cache-read": "100"}, key="sk-a")
    post(gateway, {"x-sim-claim": "five_hour_fallback", "x-sim-util5h": "0.5"}, key="sk-b")
    requests.post(url(gateway, "/v1/messages/count_tokens"), json=MESSAGE, headers={"x-sim-claim": "none"})
    assert wait_until(lambda: gateway.store.summary()["requests"] == 3)   # stored just after the reply
    report = requests.get(url(gateway, "/analytics")).json()
    for window in (report["lastHour"], report["allTime"]):
        assert window["requests"] == 3
        assert window["outputTokens"] == 12 and window["cacheReadTokens"] == 100
        assert window["claimBreakdown"] == {"five_hour": 1, "five_hour_fallback": 1, "unknown": 1}
        assert window["billingBucketBreakdown"] == {"subscription": 1, "subscription_fallback": 1, "unknown": 1}
        assert window["subscriptionPercent"] == 100.0
        assert window["estimatedCostUsd"] > 0 and window["errorRate"] == 0.0
    assert set(report["perAccount"]) == {"key:" + h for h in _hashes("sk-a", "sk-b")} | {"anonymous"}
    assert report["perModel"]["claude-opus-4-5"]["requests"] == 3
    assert report["utilization"]["util5h"] == 0.5
    assert len(report["utilizationTrend"]) == 12 and report["utilizationTrend"][-1]["requests"] == 3
    assert report["burnRate"]["tokensPerMinute"] > 0


def _hashes(*keys):
    import hashlib
    return [hashlib.sha256(k.encode()).hexdigest()[:8] for k in keys]


def test_account_aliases_from_config(sim, home):
    import hashlib
    (home / "config.json").write_text(json.dumps({"accounts": {"work": hashlib.sha256(b"sk-work").hexdigest()}}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, key="sk-work")
        requests.post(url(gateway, "/v1/messages"), json=MESSAGE)
        assert wait_until(lambda: gateway.store.summary()["requests"] == 2)
        assert [r["account"] for r in gateway.store.snapshot()] == ["work", "anonymous"]


def open_stream(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    sock.sendall(b"GET /analytics/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def read_until(sock, needle, limit=5.0):
    buf, deadline = b"", time.monotonic() + limit
    while needle not in buf and time.monotonic() < deadline:
        buf += sock.recv(65536)
    return buf


def test_stream_backlog_then_live_records(sim, home):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        for _ in range(60):
            requests.get(url(gateway, "/v1/models"))
        events = Client(gateway.port).events(timeout=5)
        backlog = [next(events) for _ in range(50)]
        assert [data["id"] for _, data in backlog] == list(range(11, 61))
        assert all(name == "record" for name, _ in backlog)
        post(gateway)
        name, live = next(events)
        assert name == "record" and live["id"] == 61 and live["path"] == "/v1/messages"
        post(gateway, {"x-sim-claim": "overage"})
        names = [next(events)[0] for _ in range(2)]
        assert names == ["overage_halt", "record"]      # the halt is decided before the body is relayed
        requests.post(url(gateway, "/admin/resume"), json={})
        name, data = next(events)
        assert name == "overage_resume" and data["reason"] == "manual"
        events.close()


def test_stream_replays_the_halt_to_a_late_subscriber(gateway):
    post(gateway, {"x-sim-claim": "overage"})
    events = Client(gateway.port).events(timeout=5)
    first = next(events)
    second = next(events)
    assert first[0] == "record" and second[0] == "overage_halt"
    assert second[1]["request"]["claim"] == "overage"
    events.close()


def test_heartbeats(sim, home):
    with running_gateway(make_settings(home, sim.url), heartbeat_s=0.1) as gateway:
        sock = open_stream(gateway)
        assert read_until(sock, b": heartbeat").count(b": heartbeat") >= 1
        sock.close()


def test_subscribers_are_bounded(gateway):
    socks = [open_stream(gateway) for _ in range(MAX_SUBSCRIBERS)]
    for sock in socks:
        assert b"200 OK" in read_until(sock, b"\r\n\r\n")
    assert wait_until(lambda: gateway.bus.count == MAX_SUBSCRIBERS)
    extra = open_stream(gateway)
    reply = read_until(extra, b"}}")
    assert b"503" in reply.split(b"\r\n")[0] and b"overloaded_error" in reply
    for sock in socks + [extra]:
        sock.close()
    assert wait_until(lambda: gateway.bus.count == 0, timeout=15)


def test_a_subscriber_that_never_reads_is_dropped_without_slowing_requests(sim, home):
    with running_gateway(make_settings(home, sim.url), bus=EventBus(queue_size=8)) as gateway:
        stuck = socket.create_connection(("127.0.0.1", gateway.port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /analytics/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert wait_until(lambda: gateway.bus.count == 1)
        session = requests.Session()
        padding = {"x-sim-model": "m" * 190}        # big records fill the socket buffers sooner
        for _ in range(2000):
            assert session.get(url(gateway, "/v1/models/x"), headers=padding).status_code == 404
            if gateway.bus.count == 0:
                break
        assert gateway.bus.count == 0 and gateway.bus.dropped == 1
        assert session.get(url(gateway, "/v1/models")).status_code == 200
        stuck.close()


def test_drain_closes_stream_subscribers_at_once(sim, home):
    gateway = GatewayServer(make_settings(home, sim.url), notifier=RecordingNotifier()).start()
    sock = open_stream(gateway)
    read_until(sock, b"\r\n\r\n")
    started = time.monotonic()
    threading.Thread(target=gateway.drain, kwargs={"timeout": 5}).start()
    sock.settimeout(3)
    while sock.recv(65536):
        pass
    assert time.monotonic() - started < 2
    sock.close()


# -- the burn-rate prediction and the spend outside the subscription ----------------

from dario_lib.analytics import _minutes_to_full  # noqa: E402

MINUTE = 60_000


def series(*values, step=MINUTE):
    return [(1_700_000_000_000 + i * step, value) for i, value in enumerate(values)]


@pytest.mark.parametrize("samples", [
    series(0.5, 0.5, 0.5, 0.5),                                 # flat
    series(0.5, 0.5, 0.5, 0.50000001),                          # flat up to float noise: was 9.3e24-style minutes
    series(0.30, 0.45, 0.20, 0.50, 0.25, 0.40),                 # noise with a slight upward fit
    series(0.2, 0.3),                                           # two readings prove nothing
    series(0.2, 0.25, 0.3, step=5_000),                         # ten seconds of readings
    series(0.60, 0.55, 0.50, 0.45),                             # falling
    series(0.100, 0.101, 0.102, 0.103),                         # rising, but full in 15 h: past the reset
    series(0.9, 1.0, 1.0, 1.0),                                 # already full
])
def test_no_prediction_from_readings_that_do_not_support_one(samples):
    assert _minutes_to_full(samples) is None


def test_a_steady_rise_predicts_when_the_window_fills():
    assert _minutes_to_full(series(0.50, 0.55, 0.60, 0.65)) == 7.0
    # A reset (a big fall) starts the fit over from the readings after it.
    assert _minutes_to_full(series(0.90, 0.95, 0.10, 0.15, 0.20, 0.25)) == 15.0


def test_the_report_never_predicts_from_a_noisy_series_through_a_gateway(sim, home):
    clock = FakeClock()
    with running_gateway(make_settings(home, sim.url), clock=clock) as gateway:
        for util in ("0.40", "0.41", "0.40", "0.41"):            # noise, no trend
            post(gateway, {"x-sim-util5h": util})
            clock.advance(60)
        assert requests.get(url(gateway, "/analytics")).json()["burnRate"]["util5hFullInMinutes"] is None
        for util in ("0.50", "0.60", "0.70"):
            post(gateway, {"x-sim-util5h": util})
            clock.advance(60)
        full_in = requests.get(url(gateway, "/analytics")).json()["burnRate"]["util5hFullInMinutes"]
        assert full_in is not None and 0 < full_in <= 300


def test_windows_count_and_cost_what_was_billed_outside_the_subscription(gateway):
    post(gateway)
    post(gateway, {"x-sim-claim": "api"})                        # halts; counted and costed
    requests.post(url(gateway, "/admin/resume"), json={})
    post(gateway, {"x-sim-claim": "overage"})
    assert wait_until(lambda: gateway.store.summary()["requests"] == 3)
    report = requests.get(url(gateway, "/analytics")).json()
    outside = [r for r in gateway.store.snapshot() if r["bucket"] in ("api", "extra_usage")]
    cost = round(sum(r["costUsd"] for r in outside), 4)
    for window in (report["lastHour"], report["allTime"]):
        assert window["nonSubscriptionRequests"] == 2
        assert window["nonSubscriptionCostUsd"] == cost > 0
