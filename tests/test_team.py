"""A team of gateways on one Redis (issue 13): real gateways, a real redis-server.

Each gateway has its own DARIO_HOME, as gateways on different hosts do, and shares the
guard only through Redis (`store.url` in its config file). In-process gateways
(running_gateway) stand for most of the team; a real `python3 dario.py proxy` child is
used where a process must die (kill -9) or the command line itself is the subject.
"""

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest
import requests

from . import redis_kit
from .helpers import TimerFactory, make_settings, running_gateway, sse_events, wait_until
from .test_cli import DARIO, Gateway

pytest.importorskip("redis", reason="the redis package (requirements-dev.txt) is not installed")

MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
# The request's worst case: every body byte a token at opus's dearest input rate (cache
# writes, $6.25/M) plus max_tokens of output at $25/M.
WORST = (len(json.dumps(MESSAGE)) * 6.25 + 100 * 25) / 1e6
RECORDER = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read().strip() + '\\n')"


@pytest.fixture
def team(sim, tmp_path, redis_server):
    """team(n, **config) -> n gateways on one Redis, each with its own home and an alert
    log (`gateway.alert_log`: every event its notifyCommand ran with, one JSON per line)."""
    homes = iter(range(100))
    with contextlib.ExitStack() as stack:
        def start(n=3, store=None, gateway_kwargs=None, **config):
            gateways = []
            for _ in range(n):
                home = tmp_path / f"gateway-{next(homes)}"
                home.mkdir()
                alert_log = home / "alerts.jsonl"
                written = {"store": {"url": redis_server.url(), **(store or {})},
                           "notifyCommand": [sys.executable, "-c", RECORDER, str(alert_log)], **config}
                (home / "config.json").write_text(json.dumps(written))
                gateway = stack.enter_context(running_gateway(make_settings(home, sim.url),
                                                              **(gateway_kwargs or {})))
                gateway.alert_log = alert_log
                gateways.append(gateway)
            return gateways
        yield start


def url(gateway, path="/v1/messages"):
    return f"http://127.0.0.1:{gateway.port}{path}"


def post(gateway, headers=None, key="sk-a", body=MESSAGE, timeout=10):
    return requests.post(url(gateway), json=body, headers={"x-api-key": key, **(headers or {})}, timeout=timeout)


def alerts(gateway):
    """(event, reason) of every alert this gateway's notifyCommand got."""
    try:
        lines = gateway.alert_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(e["event"], e.get("reason")) for e in map(json.loads, lines)]


def notified(gateway, title):
    return [message for got, message in gateway.notifier.calls if got == title]


class StreamReader:
    """GET /analytics/stream over a real socket, read on a thread; `events()` parses what came."""

    def __init__(self, gateway):
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        self.sock.sendall(b"GET /analytics/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.data = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, name="team-sse-reader", daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                piece = self.sock.recv(65536)
            except OSError:
                return
            if not piece:
                return
            with self.lock:
                self.data += piece

    def events(self, name=None):
        with self.lock:
            text = self.data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
        return [data for got, data in sse_events(text) if name is None or got == name]

    def close(self):
        self.sock.close()
        self.thread.join(5)


# -- halts ---------------------------------------------------------------------------

def test_three_gateways_share_a_halt_and_a_resume_from_any_clears_it_for_all(team, sim):
    a, b, c = team(3)
    stream_b = StreamReader(b)
    try:
        assert [post(g).status_code for g in (a, b, c)] == [200, 200, 200]
        assert post(a, {"x-sim-claim": "overage"}).status_code == 200         # relayed in full
        reached = len(sim.requests)
        for gateway in (a, b, c):
            blocked = post(gateway)
            assert blocked.status_code == 503 and blocked.headers["x-should-retry"] == "false"
            assert blocked.json()["error"]["type"] == "dario_overage_guard"
        assert len(sim.requests) == reached
        state = requests.get(url(c, "/admin/resume")).json()
        assert state["halted"] and state["state"]["gateway"] == a.guard.gateway_id != c.guard.gateway_id
        # The other gateways relay A's halt on their own stream, naming A.
        assert wait_until(lambda: stream_b.events("overage_halt"))
        assert stream_b.events("overage_halt")[0]["gateway"] == a.guard.gateway_id
        # Bell and desktop notification on every gateway; the alert once, from A.
        assert all(wait_until(lambda g=g: notified(g, "dario halted")) for g in (a, b, c))
        assert wait_until(lambda: alerts(a) == [("halt", "overage_detected")])

        resumed = requests.post(url(c, "/admin/resume"), json={}).json()
        assert resumed["wasHalted"] is True
        assert [post(g).status_code for g in (a, b, c)] == [200, 200, 200]
        assert wait_until(lambda: stream_b.events("overage_resume"))
        assert stream_b.events("overage_resume")[0]["gateway"] == c.guard.gateway_id
        assert wait_until(lambda: alerts(c) == [("resume", "manual")])
        assert requests.post(url(b, "/admin/resume"), json={}).json()["wasHalted"] is False
        time.sleep(0.3)                         # any stray alert would have been written by now
        assert alerts(a) == [("halt", "overage_detected")] and alerts(b) == []
        assert [len(notified(g, "dario halted")) for g in (a, b, c)] == [1, 1, 1]
    finally:
        stream_b.close()


def test_no_request_that_checks_after_the_halt_reaches_upstream_on_any_gateway(team, sim):
    """Clients hammer B and C while an overage answer reaches A's client: nothing sent to
    B or C after A's client saw the halting headers may reach the upstream."""
    a, b, c = team(3)
    sent, results, lock, stop = {}, {}, threading.Lock(), threading.Event()
    counter = iter(range(1, 1_000_000))

    def client(gateway):
        session = requests.Session()
        while not stop.is_set():
            with lock:
                rid = str(next(counter))
                sent[rid] = time.monotonic_ns()
            try:
                status = session.post(url(gateway), json=MESSAGE, timeout=10,
                                      headers={"x-api-key": "k", "x-req-id": rid}).status_code
            except requests.RequestException:
                status = None
            with lock:
                results[rid] = status
        session.close()

    threads = [threading.Thread(target=client, args=(g,), name=f"team-hammer-{n}")
               for n, g in enumerate([b, c] * 8)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(results) > 32, timeout=10)
    payload = json.dumps(MESSAGE).encode()
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
        sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\nx-req-id: trigger\r\n"
                      f"x-sim-claim: overage\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                      ).encode() + payload)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        halted_at = time.monotonic_ns()
        while sock.recv(65536):
            pass
    time.sleep(0.4)                             # keep hammering while halted
    stop.set()
    for thread in threads:
        thread.join(15)
    reached = {req.header("x-req-id") for req in sim.requests}
    with lock:
        after = [rid for rid, t in sent.items() if t > halted_at]
    assert after and all(results.get(rid) == 503 for rid in after)
    assert [rid for rid in after if rid in reached] == []


def test_account_scope_is_shared_by_the_team(team):
    a, b = team(2, overageGuard={"scope": "account"})
    post(a, {"x-sim-claim": "overage"}, key="sk-a")
    assert post(b, key="sk-a").status_code == 503
    assert post(b, key="sk-b").status_code == 200
    label = requests.get(url(b, "/admin/resume")).json()["halts"][0]["account"]
    assert requests.post(url(b, "/admin/resume"), json={"account": label}).json()["wasHalted"]
    assert post(a, key="sk-a").status_code == 200


def test_a_cooldown_clears_the_halt_once_for_the_whole_team(team):
    timers = [TimerFactory() for _ in range(3)]
    gateways = [team(1, gateway_kwargs={"timer_factory": t})[0] for t in timers]
    a, b, c = gateways
    post(a, {"x-sim-claim": "overage"})
    # Every gateway holds the halt with a timer for its cooldown (B and C from A's event).
    assert all(wait_until(lambda t=t: t.timers) for t in timers)
    for t in timers:
        t.last.fire()
    assert [post(g).status_code for g in gateways] == [200, 200, 200]
    time.sleep(0.3)
    resumes = [event for g in gateways for event in alerts(g) if event[0] == "resume"]
    assert resumes == [("resume", "cooldown")]


def test_a_threshold_crossing_fires_once_for_the_team(team):
    gateways = team(3, guards={"utilization": {"util5h": {"warn": 0.8, "halt": 0.95}}})
    subs = [g.bus.subscribe() for g in gateways]
    for gateway in gateways:
        assert post(gateway, {"x-sim-util5h": "0.85"}).status_code == 200
    assert wait_until(lambda: sum(len(alerts(g)) for g in gateways) == 1)
    time.sleep(0.3)
    assert [a for g in gateways for a in alerts(g)] == [("warn", "utilization_threshold")]

    def warns(sub):
        out = []
        while True:
            item = sub.get(0.2)
            if item is None or item[0] == "timeout":
                return out
            if item[0] == "overage_warn":
                out.append(item[1])
    assert [len(warns(sub)) for sub in subs] == [1, 1, 1]      # each gateway shows the team's one warning
    assert post(gateways[2], {"x-sim-util5h": "0.97"}).status_code == 200
    assert all(post(g).status_code == 503 for g in gateways)
    assert wait_until(lambda: [a for g in gateways for a in alerts(g) if a[0] == "halt"]
                      == [("halt", "utilization_threshold")])


def test_a_crossing_re_arms_when_any_gateway_sees_the_value_drop(team):
    a, b, c = team(3, guards={"utilization": {"util5h": {"halt": 0.95}}})
    post(a, {"x-sim-util5h": "0.97"})
    assert post(b).status_code == 503
    requests.post(url(c, "/admin/resume"), json={})
    assert post(c, {"x-sim-util5h": "0.98"}).status_code == 200     # still above: no new halt
    assert post(a).status_code == 200
    post(b, {"x-sim-util5h": "0.5"})                                 # B never saw it above: re-armed anyway
    post(a, {"x-sim-util5h": "0.99"})
    assert post(c).status_code == 503


def test_two_namespaces_do_not_see_each_other(team):
    (first,) = team(1, store={"namespace": "team-1"})
    (second,) = team(1, store={"namespace": "team-2"})
    post(first, {"x-sim-claim": "overage"})
    assert post(first).status_code == 503
    assert post(second).status_code == 200
    assert requests.get(url(second, "/status")).json()["store"]["namespace"] == "team-2"


# -- budgets -------------------------------------------------------------------------

def test_thirty_concurrent_requests_across_three_gateways_never_overspend_a_budget(team, sim):
    budget = 0.05
    gateways = team(3, guards={"budgets": [{"account": "*", "usd": budget, "window": "1d"}]},
                    overageGuard={"cooldownMs": 0})
    barrier = threading.Barrier(30)
    statuses, lock = [], threading.Lock()

    def client(n):
        gateway = gateways[n % 3]
        barrier.wait()
        for _ in range(6):
            resp = post(gateway, {"x-sim-headers-delay-ms": "30", "x-sim-events": "50"})
            with lock:
                statuses.append((resp.status_code, resp.json().get("error", {}).get("reason")))

    threads = [threading.Thread(target=client, args=(n,), name=f"team-budget-{n}") for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    admitted = sum(1 for status, _ in statuses if status == 200)
    assert admitted == len(sim.requests) and admitted >= 2
    spent = gateways[1].budgets.status()[0]
    assert spent["reservedUsd"] == 0
    assert budget <= spent["spentUsd"] <= budget + WORST, "more than one reservation past the budget"
    assert ("budget_exceeded" in {reason for _, reason in statuses})
    blocked = post(gateways[2])
    assert blocked.status_code == 503 and blocked.json()["error"]["reason"] == "budget_exceeded"
    # One halt for the team, alerted once.
    halt_alerts = lambda: sum(1 for g in gateways for a in alerts(g) if a == ("halt", "budget_exceeded"))  # noqa: E731
    assert wait_until(lambda: halt_alerts() == 1)
    time.sleep(0.3)
    assert halt_alerts() == 1


def test_a_billed_answer_without_usage_is_charged_its_worst_case_in_the_team_budget(team):
    a, b = team(2, guards={"budgets": [{"account": "*", "usd": 100, "window": "1d"}]})
    chat = {"model": "claude-sonnet-4-5", "max_tokens": 10_000, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(url(a, "/v1/chat/completions"), json=chat, headers={"Authorization": "Bearer k"})
    assert resp.status_code == 200
    assert wait_until(lambda: a.store.summary()["requests"] == 1)
    record = a.store.snapshot()[-1]
    assert record["usageEstimated"] is True and record["costUsd"] > 0.1
    assert wait_until(lambda: b.budgets.status()[0]["spentUsd"] == pytest.approx(record["costUsd"], abs=1e-6))


def test_a_reservation_of_a_gateway_killed_with_sigkill_expires(team, sim, tmp_path, redis_server):
    config = {"guards": {"budgets": [{"account": "*", "usd": 10, "window": "1d"}]}}
    (watcher,) = team(1, **config)
    home = tmp_path / "doomed"
    home.mkdir()
    (home / "config.json").write_text(json.dumps(dict(config, store={"reservationTtlS": 1})))
    doomed = Gateway(home, ["--upstream=" + sim.url, "--store=" + redis_server.url()])
    try:
        assert any("team store: " in line for line in doomed.lines + [doomed.proc.stderr.readline()])

        def slow():
            with contextlib.suppress(requests.RequestException):
                requests.post(doomed.url + "/v1/messages", json=MESSAGE, timeout=30,
                              headers={"x-api-key": "k", "x-sim-headers-delay-ms": "20000"})
        thread = threading.Thread(target=slow, name="team-doomed-client", daemon=True)
        thread.start()
        assert wait_until(lambda: watcher.budgets.status()[0]["reservedUsd"] > 0, timeout=10)
        time.sleep(2.5)                         # past two ttls: the heartbeat keeps it
        assert watcher.budgets.status()[0]["reservedUsd"] == pytest.approx(WORST, abs=1e-6)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        killed = time.monotonic()
        assert wait_until(lambda: watcher.budgets.status()[0]["reservedUsd"] == 0, timeout=5)
        assert time.monotonic() - killed < 3
        assert post(watcher).status_code == 200
    finally:
        if doomed.proc.poll() is None:
            doomed.proc.kill()
        doomed.proc.wait(10)


# -- when Redis fails ----------------------------------------------------------------

def test_redis_stopped_fails_closed_and_redis_back_empty_halts_until_a_resume(team, redis_server, sim, caplog):
    a, b = team(2)
    assert post(a).status_code == 200 and post(b).status_code == 200
    redis_server.stop()
    reached = len(sim.requests)
    for _ in range(3):
        refused = post(a)
        assert refused.status_code == 503 and refused.json()["error"]["reason"] == "store_unavailable"
        assert refused.json()["error"]["type"] == "dario_guard"
        assert refused.headers["Retry-After"] == "5" and "x-should-retry" not in refused.headers
    assert len(sim.requests) == reached
    # Every other endpoint keeps answering.
    assert requests.get(url(a, "/health")).json()["status"] == "ok"
    store = requests.get(url(a, "/status")).json()["store"]
    assert store["kind"] == "redis" and store["up"] is False and store["errors"] >= 3
    assert "dario_store_up 0" in requests.get(url(a, "/metrics")).text
    assert requests.post(url(a, "/v1/messages/count_tokens"), json=MESSAGE,
                         headers={"x-api-key": "k"}).status_code == 200
    resume = requests.post(url(b, "/admin/resume"), json={})
    assert resume.status_code == 503 and "nothing was resumed" in resume.json()["error"]["message"]
    lines = sum("STORE UNAVAILABLE" in r.getMessage() for r in caplog.records)
    assert 1 <= lines <= 2                      # one line per gateway, not one per request

    redis_server.start()                        # no persistence: back empty
    for gateway in (a, b):
        lost = post(gateway)
        assert lost.status_code == 503 and lost.json()["error"]["reason"] == "store_state_lost"
    assert requests.get(url(b, "/status")).json()["store"]["up"] is True
    assert requests.post(url(b, "/admin/resume"), json={}).json()["wasHalted"] is True
    assert post(a).status_code == 200 and post(b).status_code == 200
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_hung_redis_is_unavailable_after_the_timeout(team, redis_server):
    (gateway,) = team(1, store={"timeoutMs": 100})
    assert post(gateway).status_code == 200
    redis_server.pause()
    try:
        started = time.monotonic()
        refused = post(gateway)
        assert refused.status_code == 503 and refused.json()["error"]["reason"] == "store_unavailable"
        assert time.monotonic() - started < 1.5
        assert requests.get(url(gateway, "/health"), timeout=5).status_code == 200
    finally:
        redis_server.resume()
    assert wait_until(lambda: post(gateway).status_code == 200, timeout=5)


def test_fail_open_forwards_on_local_guards_and_writes_their_halt_when_redis_is_back(team, redis_server, sim,
                                                                                     caplog):
    a, b = team(2, store={"failOpen": True})
    post(a)
    redis_server.stop()
    assert post(a).status_code == 200                      # forwarded on this gateway's own guard
    assert sum("FAIL OPEN" in r.getMessage() for r in caplog.records) >= 1
    assert post(a, {"x-sim-claim": "overage"}).status_code == 200
    assert post(a).status_code == 503                      # its own halt holds here
    assert post(b).status_code == 200                      # B cannot know yet
    redis_server.start()
    # A writes its halt as soon as Redis answers (its sync thread does, without traffic).
    # Redis came back empty, so the team may be halted for the lost state first: one
    # halt holds the team either way.
    assert wait_until(lambda: post(b).status_code == 503, timeout=10)
    halts = requests.get(url(b, "/admin/resume")).json()["halts"]
    assert [h["reason"] for h in halts] in (["overage_detected"], ["store_state_lost"])


def test_a_gateway_started_while_redis_is_down_serves_and_fails_closed_until_it_answers(sim, tmp_path):
    redis_kit.require_redis_server()
    server = redis_kit.RedisServer()            # not started yet
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"store": {"url": server.url()}}))
    try:
        with running_gateway(make_settings(home, sim.url)) as gateway:
            assert requests.get(url(gateway, "/health")).status_code == 200
            assert requests.get(url(gateway, "/status")).json()["store"]["up"] is False
            assert post(gateway).json()["error"]["reason"] == "store_unavailable"
            server.start()
            assert post(gateway).status_code == 200
    finally:
        server.close()


def test_the_store_password_shows_nowhere(sim, tmp_path, caplog):
    password = "hunter2-team-Secret"
    server = redis_kit.redis_server(password=password)
    home = tmp_path / "home"
    home.mkdir()
    try:
        settings = make_settings(home, sim.url, flags={"store.url": server.url()},
                                 env={"DARIO_STORE_PASSWORD": password})
        with running_gateway(settings) as gateway:
            assert post(gateway).status_code == 200
            assert requests.get(url(gateway, "/status")).json()["store"]["host"] == server.url()
            texts = [requests.get(url(gateway, path)).text for path in ("/status", "/metrics", "/admin/resume")]
            server.stop()
            texts.append(post(gateway).text)
            texts += [r.getMessage() for r in caplog.records]
            assert all(password not in text for text in texts)
    finally:
        server.close()


# -- the command line ----------------------------------------------------------------

def test_proxy_with_a_redis_store_but_no_redis_package_exits_2_saying_what_to_install(tmp_path):
    fake = tmp_path / "no-redis"
    (fake / "redis").mkdir(parents=True)
    (fake / "redis" / "__init__.py").write_text("raise ImportError('No module named redis')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env.update(DARIO_HOME=str(tmp_path), PYTHONPATH=str(fake))
    import subprocess
    result = subprocess.run(DARIO + ["proxy", "--port=0", "--store=redis://127.0.0.1:1/0"], env=env,
                            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "pip install 'redis>=5.0'" in result.stderr and "Traceback" not in result.stderr
