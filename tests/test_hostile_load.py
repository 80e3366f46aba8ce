"""A busy day: slow clients, idle crowds, the connection cap, mass hang-ups, stuck event
subscribers, and the guard's halt under 64 concurrent clients and racing threads.

Deadlines are shortened through the handler's module constants so each test takes
seconds; the only timing assertions are where timing is the behaviour ("closed within
the deadline plus 1.5 s"), with generous bounds.
"""

import itertools
import json
import os
import random
import socket
import threading
import time

import pytest
import requests

from dario_lib import handler
from dario_lib.config import GuardConfig
from dario_lib.events import MAX_SUBSCRIBERS, EventBus
from dario_lib.guard import Guard
from dario_lib.statefile import StateFile

from .helpers import FakeClock, TimerFactory, hammer_until_halt, make_settings, running_gateway, wait_until
from .hostile_kit import MESSAGE, Wire, health, request_bytes, still_serving, url

SLACK_S = 1.5


def trickle_until_closed(sock, first, byte=b"a", every=0.5, limit=30.0):
    """Send `first`, then one byte every `every` s until the gateway closes the connection.

    Returns (seconds from the first byte to the close, bytes the gateway sent).
    """
    started = time.monotonic()
    sock.sendall(first)
    got = b""
    while time.monotonic() - started < limit:
        sock.settimeout(every)
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            try:
                sock.send(byte)
            except OSError:
                break
            continue
        except OSError:
            break
        if not piece:
            break
        got += piece
    return time.monotonic() - started, got


# -- slow clients -----------------------------------------------------------------------

def test_headers_one_byte_at_a_time_hit_a_total_deadline(sim, home, monkeypatch):
    monkeypatch.setattr(handler, "HEAD_DEADLINE_S", 1.5)
    with running_gateway(make_settings(home, sim.url)) as gateway:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            took, _ = trickle_until_closed(sock, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert 1.2 < took < 1.5 + SLACK_S, took          # well inside the 60 s per-read timeout
        assert wait_until(lambda: gateway.connections == 0)
        still_serving(gateway)


def test_a_request_line_one_byte_at_a_time_hits_the_deadline_too(sim, home, monkeypatch):
    monkeypatch.setattr(handler, "HEAD_DEADLINE_S", 1.5)
    with running_gateway(make_settings(home, sim.url)) as gateway:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            took, _ = trickle_until_closed(sock, b"G", byte=b"E")
        assert took < 1.5 + SLACK_S
        assert sim.requests == []


@pytest.mark.parametrize("cut", ["hang-up", "deadline"])
def test_a_request_cut_off_inside_its_head_is_never_forwarded(sim, home, monkeypatch, cut):
    monkeypatch.setattr(handler, "HEAD_DEADLINE_S", 1.0)
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: sk-half\r\nX-Slow: a"
    with running_gateway(make_settings(home, sim.url)) as gateway:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            if cut == "hang-up":
                sock.sendall(head)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(3)
                while sock.recv(65536):
                    pass
            else:
                trickle_until_closed(sock, head)
        assert wait_until(lambda: gateway.connections == 0)
        assert sim.requests == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_one_byte_at_a_time_hits_a_total_deadline(sim, home, monkeypatch, framing):
    monkeypatch.setattr(handler, "BODY_DEADLINE_S", 1.5)
    with running_gateway(make_settings(home, sim.url, max_body_bytes=4096)) as gateway:
        head = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n"
        head += b"Content-Length: 1000\r\n\r\n" if framing == "length" else b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n"
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            took, _ = trickle_until_closed(sock, head + b"{")
        # The deadline grows by a second per 256 KiB of (declared or capped) body: ~0 here.
        assert 1.2 < took < 1.5 + SLACK_S, took
        assert sim.requests == []
        assert wait_until(lambda: gateway.connections == 0)
        still_serving(gateway)


def test_idle_keep_alive_crowd_does_not_stop_new_requests(sim, home):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        idle = []
        try:
            for n in range(200):
                wire = Wire(gateway.port)
                if n % 2:                       # half have been served once and now sit idle
                    wire.send(request_bytes("GET", "/health"))
                    assert wire.response()[0] == 200
                idle.append(wire)
            assert wait_until(lambda: gateway.connections == 200)
            session = requests.Session()
            started = time.monotonic()
            for _ in range(10):
                assert session.post(url(gateway, "/v1/messages"), json=MESSAGE, timeout=5).status_code == 200
            assert time.monotonic() - started < 5
            session.close()
        finally:
            for wire in idle:
                wire.close()
        assert wait_until(lambda: gateway.connections == 0, timeout=5)


def test_connection_cap_answers_503_and_recovers(sim, home):
    with running_gateway(make_settings(home, sim.url), max_connections=20) as gateway:
        held = [Wire(gateway.port) for _ in range(20)]
        try:
            assert wait_until(lambda: gateway.connections == 20)
            for _ in range(5):                  # every excess connection gets the answer at once
                with Wire(gateway.port) as extra:
                    extra.send(request_bytes("POST", "/v1/messages", [("x-api-key", "k")],
                                             json.dumps(MESSAGE).encode()))
                    status, headers, body = extra.response(timeout=3)
                    assert status == 503 and headers["connection"] == "close" and headers["retry-after"]
                    assert json.loads(body)["error"]["type"] == "overloaded_error"
                    assert extra.closed_within(2)
            assert sim.requests == [] and gateway.connections == 20
            for wire in held[:5]:
                wire.close()
            assert wait_until(lambda: gateway.connections == 15)
            still_serving(gateway)
            held[5].send(request_bytes("GET", "/health"))   # the ones held keep working too
            assert held[5].response()[0] == 200
        finally:
            for wire in held:
                wire.close()
        assert wait_until(lambda: gateway.connections == 0, timeout=5)


# -- mass hang-up -----------------------------------------------------------------------

def test_a_hundred_clients_hanging_up_mid_stream_leak_nothing(sim, home):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        still_serving(gateway)
        assert wait_until(lambda: gateway.connections == 0)
        baseline = threading.active_count()
        payload = json.dumps(dict(MESSAGE, stream=True)).encode()
        request = request_bytes("POST", "/v1/messages", [("x-api-key", "k"), ("x-sim-delay-ms", "100"),
                                                         ("x-sim-events", "200")], payload)
        socks = []
        try:
            for _ in range(100):
                sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
                sock.sendall(request)
                socks.append(sock)
            for sock in socks:                  # every stream is under way
                buf = b""
                while b"message_start" not in buf:
                    buf += sock.recv(65536)
        finally:
            for sock in socks:
                sock.close()
        assert wait_until(lambda: len(sim.disconnects) == 100, timeout=5), len(sim.disconnects)
        assert wait_until(lambda: gateway.connections == 0, timeout=5)
        assert wait_until(lambda: gateway.store.summary()["requests"] == 101, timeout=5)
        outcomes = [r["outcome"] for r in gateway.store.snapshot()[1:]]
        assert outcomes == ["client_gone"] * 100
        assert wait_until(lambda: threading.active_count() <= baseline + 2, timeout=10), \
            (threading.active_count(), baseline)
        assert gateway.tracker.count == 0
        still_serving(gateway)


# -- event subscribers ------------------------------------------------------------------

def test_a_full_house_of_stuck_subscribers_is_dropped_and_the_slots_come_back(sim, home):
    with running_gateway(make_settings(home, sim.url), bus=EventBus(queue_size=8)) as gateway:
        stuck = []
        try:
            for _ in range(MAX_SUBSCRIBERS):
                sock = socket.create_connection(("127.0.0.1", gateway.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /analytics/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                stuck.append(sock)
            assert wait_until(lambda: gateway.bus.count == MAX_SUBSCRIBERS)
            session = requests.Session()
            padding = {"x-sim-model": "m" * 190}
            slowest = 0.0
            for _ in range(3000):
                started = time.monotonic()
                assert session.get(url(gateway, "/v1/models/x"), headers=padding).status_code == 404
                slowest = max(slowest, time.monotonic() - started)
                if gateway.bus.count == 0:
                    break
            assert gateway.bus.count == 0 and gateway.bus.dropped == MAX_SUBSCRIBERS
            assert slowest < 1.0, slowest       # no request waited on a subscriber
            with Wire(gateway.port) as fresh:   # the slots are free again
                fresh.send(b"GET /analytics/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                deadline = time.monotonic() + 3
                while b"\r\n\r\n" not in fresh.buf and fresh._fill(deadline):
                    pass
                assert fresh.buf.startswith(b"HTTP/1.1 200 ")
            session.close()
        finally:
            for sock in stuck:
                sock.close()
        assert wait_until(lambda: gateway.connections == 0, timeout=10)


# -- the guard under load ---------------------------------------------------------------

def test_no_request_reaches_upstream_after_the_halt_under_64_mixed_clients(gateway, sim):
    figures = hammer_until_halt(gateway, sim, clients=64, after_s=0.5, mixed=True)
    assert figures["total"] > 100
    assert figures["late"] == []                # the halt-to-block figure: zero
    assert len(figures["sent_after"]) > 32
    assert sorted(figures["blocked_after"]) == sorted(figures["sent_after"])
    assert health(gateway) == "halted"
    assert wait_until(lambda: gateway.connections == 0, timeout=10)


RATE = {"bucket": "extra_usage", "claim": "overage"}
REQUEST = {"timestamp": 1, "model": "claude-opus-4-5", "account": "key:abcd1234", "claim": "overage",
           "path": "/v1/messages", "requestId": "req_1"}


def test_halts_resumes_and_cooldowns_racing_on_threads_stay_consistent(tmp_path):
    clock, timers, bus = FakeClock(), TimerFactory(), EventBus(queue_size=1_000_000)
    events = bus.subscribe()
    state = StateFile(str(tmp_path / "guard-state.json"))
    guard = Guard(GuardConfig(cooldown_ms=60_000), bus=bus, state_file=state, clock=clock, timer_factory=timers)
    guard.start()
    errors, barrier = [], threading.Barrier(8)

    def worker(seed):
        rng = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(150):
                op = rng.choice(["trip", "trip", "resume", "fire", "fire_old", "tick", "check"])
                if op == "trip":
                    guard.observe(RATE, REQUEST)
                elif op == "resume":
                    guard.clear("manual")
                elif op == "fire" and timers.timers:
                    timers.timers[-1].fire()
                elif op == "fire_old" and timers.timers:
                    rng.choice(list(timers.timers)).fire()      # a late Timer, after cancel()
                elif op == "tick":
                    clock.advance(rng.choice([1, 30, 61]))
                else:
                    guard.check()
        except Exception as err:                # noqa: BLE001 - reported below, with its thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(seed,), name=f"race-{seed}") for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    halts = guard.halts()
    assert len(halts) <= 1
    on_disk = state.read()
    assert os.path.exists(state.path) == bool(halts)
    if halts:
        assert on_disk[0] == "ok" and [h["since"] for h in on_disk[1]] == [halts[0].since]
    seen = []
    while (item := events.get(0)) not in (None, events.TIMEOUT):
        seen.append(item)
    names = [name for name, _ in seen]
    assert names.count("overage_halt") > 20 and names.count("overage_resume") > 20, names[:10]
    assert all(a != b for a, b in itertools.pairwise(names)), "two halts or two resumes in a row"
    assert names[0] == "overage_halt" and (names[-1] == "overage_halt") == bool(halts)
    for (_, halted), (name, resumed) in itertools.pairwise(seen):
        if name == "overage_resume":
            assert resumed["previousSince"] == halted["since"]
    assert guard.trips.get("overage_detected", 0) == names.count("overage_halt")
    guard.close()
