"""The Redis store (redis_store.py, redis_lua.py) against a real redis-server.

Several RedisStore objects on one Redis stand for several gateways. Time: Redis's clock
cannot be moved, so the scripts add `clock_offset_ms` (0 outside tests) to TIME and the
window tests move it forward on every store, as FakeClock does for one gateway. The
reservation-expiry test uses a real 1 s ttl, as a dead gateway's would run out.
"""

import json
import logging
import os
import random
import sys
import threading
import time

import pytest

from dario_lib import config
from dario_lib.redis_store import (ALL, STATE_LOST, BudgetRef, MissingDependency, RedisStore, Reserve,
                                   StoreUnavailable, new_id, open_store, to_micro)

from . import redis_kit
from .helpers import wait_until

pytest.importorskip("redis", reason="the redis package (requirements-dev.txt) is not installed")

MINUTE_MS = 60_000
DAY_MS = 86_400_000


@pytest.fixture
def make_store(redis_server):
    """make_store(gateway_id, url=…, marker_path=…, **StoreConfig fields) -> RedisStore."""
    made = []

    def make(gateway_id="A", url=None, marker_path=None, **fields):
        store = RedisStore(config.StoreConfig(url=url or redis_server.url(), **fields),
                           gateway_id=gateway_id, marker_path=marker_path)
        made.append(store)
        return store
    yield make
    for store in made:
        store.close()


def a_halt(reason="overage_detected", account=None, cooldown_until=None, since=1_700_000_000_000):
    return {"since": since, "cooldownUntil": cooldown_until, "reason": reason,
            "request": {"model": "claude-opus-4-5", "account": account or "k"}, "account": account,
            "detail": {}}


class Events:
    """A subscriber's callback: the events it got, in order."""

    def __init__(self):
        self.got = []
        self._lock = threading.Lock()

    def __call__(self, event):
        with self._lock:
            self.got.append(event)

    def of(self, kind):
        with self._lock:
            return [e for e in self.got if e["type"] == kind]


def subscribed(store, publisher):
    """Subscribe `store`; return its Events once a probe from `publisher` gets through."""
    events = Events()
    store.subscribe(events)
    assert wait_until(lambda: publisher.publish("probe", {}) is None and bool(events.of("probe")),
                      timeout=10, interval=0.05)
    return events


# -- halts ---------------------------------------------------------------------------

def test_a_halt_from_one_gateway_blocks_every_gateway_and_any_gateway_resumes_it(make_store):
    a, b, c = make_store("A"), make_store("B"), make_store("C")
    events_c = subscribed(c, a)
    assert a.gate("alice").halts == ()

    created, current = a.put_halt(None, a_halt())
    assert created and current["gateway"] == "A" and current["id"]
    for store in (a, b, c):
        gate = store.gate("alice")
        assert [h["id"] for h in gate.halts] == [current["id"]] and not gate.reserved
        assert gate.halts[0]["reason"] == "overage_detected" and gate.halts[0]["gateway"] == "A"
    assert b.halts() == {"*": current}

    removed, resumed_at = b.clear_halt(ALL)
    assert [h["id"] for h in removed] == [current["id"]] and resumed_at > 0
    assert all(store.gate("alice").halts == () for store in (a, b, c))
    assert wait_until(lambda: len(events_c.of("overage_resume")) == 1)
    halt_event, = events_c.of("overage_halt")
    resume, = events_c.of("overage_resume")
    assert halt_event["gateway"] == "A" and halt_event["data"]["id"] == current["id"]
    assert resume["gateway"] == "B" and resume["data"]["reason"] == "manual"
    assert resume["data"]["previousSince"] == current["since"] and resume["data"]["account"] is None


def test_a_halt_is_set_only_when_none_is_there(make_store):
    a, b = make_store("A"), make_store("B")
    created, first = a.put_halt(None, a_halt())
    created_again, current = b.put_halt(None, a_halt(reason="utilization_threshold"))
    assert created and not created_again and current == first


def test_an_account_halt_blocks_only_that_account(make_store):
    a, b = make_store("A"), make_store("B")
    a.put_halt("alice", a_halt(account="alice"))
    assert [h["account"] for h in b.gate("alice").halts] == ["alice"]
    assert b.gate("bob").halts == () and b.gate(None).halts == ()
    b.put_halt(None, a_halt())
    assert len(a.gate("alice").halts) == 2 and len(a.gate("bob").halts) == 1
    removed, _ = a.clear_halt("alice")
    assert [h["account"] for h in removed] == ["alice"] and len(b.gate("alice").halts) == 1


def test_a_late_cooldown_clears_nothing_and_publishes_nothing(make_store):
    a, b, watcher = make_store("A"), make_store("B"), make_store("W")
    events = subscribed(watcher, a)
    _, old = a.put_halt(None, a_halt())
    b.clear_halt(ALL)                                   # a person resumed
    _, new = b.put_halt(None, a_halt(reason="utilization_threshold"))
    removed, _ = a.clear_halt(None, expect_id=old["id"], reason="cooldown")     # A's old timer fires late
    assert removed == [] and [h["id"] for h in b.gate("x").halts] == [new["id"]]
    a.publish("probe", {"last": True})
    assert wait_until(lambda: any(e["data"].get("last") for e in events.of("probe")))
    assert [e["data"]["reason"] for e in events.of("overage_resume")] == ["manual"]


def test_of_all_gateways_timers_one_clears_the_halt(make_store):
    stores = [make_store(name) for name in "ABCDE"]
    watcher = make_store("W")
    events = subscribed(watcher, stores[0])
    _, halt = stores[0].put_halt(None, a_halt(cooldown_until=1_700_000_060_000))
    results, barrier = [], threading.Barrier(len(stores))

    def fire(store):
        barrier.wait()
        results.append(store.clear_halt(None, expect_id=halt["id"], reason="cooldown")[0])
    threads = [threading.Thread(target=fire, args=(s,), name=f"cooldown-{s.gateway_id}") for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(len(r) for r in results) == [0, 0, 0, 0, 1]
    stores[0].publish("probe", {"last": True})
    assert wait_until(lambda: any(e["data"].get("last") for e in events.of("probe")))
    assert len(events.of("overage_resume")) == 1


def test_a_halt_past_its_cooldown_is_cleared_once_by_whoever_looks_first(make_store):
    a, b = make_store("A"), make_store("B")
    now = a.gate("x").now_ms
    a.put_halt(None, a_halt(since=now, cooldown_until=now + 10_000))
    assert len(b.gate("x").halts) == 1
    for store in (a, b):
        store.clock_offset_ms = 11_000              # every gateway's timer died with it
    first = b.gate("x")
    assert first.halts == () and [h["reason"] for h in first.cleared] == ["overage_detected"]
    assert a.gate("x").cleared == () and a.gate("x").halts == () and a.halts() == {}
    # An expired halt does not keep a new one out.
    created, _ = a.put_halt(None, a_halt(since=now, cooldown_until=now + 5_000))
    assert created and b.gate("x").halts == ()


# -- threshold crossings -------------------------------------------------------------

def test_a_crossing_fires_once_for_the_team(make_store):
    stores = [make_store(name) for name in "ABC"]
    barrier = threading.Barrier(30)
    previous, created = [], []

    def observe(n, level, halt):
        barrier.wait()
        got, made = stores[n % 3].cross(None, "util5h", level, halt=halt)
        previous.append(got)
        created.append(made)

    def run(level, halt=None):
        previous.clear()
        created.clear()
        threads = [threading.Thread(target=observe, args=(n, level, halt), name=f"cross-{n}") for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    run("warn")
    assert previous.count(None) == 1 and previous.count("warn") == 29
    run("halt", a_halt(reason="utilization_threshold"))
    assert previous.count("warn") == 1 and previous.count("halt") == 29
    made = [h for h in created if h]
    assert len(made) == 1 and list(stores[0].halts()) == ["*"]
    stores[1].clear_halt(ALL)
    assert stores[2].cross(None, "util5h", "halt", halt=a_halt()) == ("halt", None)   # same crossing
    assert stores[2].cross(None, "util5h", None) == ("halt", None)                    # back under
    assert stores[0].cross(None, "util5h", "halt", halt=a_halt())[1]["gateway"] == "A"  # a new one


def test_several_crossings_are_recorded_in_one_call(make_store):
    a, b = make_store("A"), make_store("B")
    assert a.crosses([]) == []
    got = a.crosses([(None, "util5h", "warn", None), (None, "util7d", "halt", a_halt(reason="utilization_threshold")),
                     ("alice", "unifiedStatus", None, None)])
    assert [previous for previous, _ in got] == [None, None, None]
    assert got[0][1] is None and got[1][1]["gateway"] == "A" and got[2][1] is None
    again = b.crosses([(None, "util5h", "warn", None), (None, "util7d", "halt", a_halt())])
    assert again == [("warn", None), ("halt", None)]
    assert list(b.halts()) == ["*"]


# -- budgets -------------------------------------------------------------------------

def budget_ref(usd=1.0, account="*", window_ms=DAY_MS, key=None):
    name = f"{account}:{window_ms}:{usd}"
    return BudgetRef(name, account, to_micro(usd), window_ms, (key, "budget:" + name))


def test_reservations_are_refused_while_in_flight_ones_fill_the_budget(make_store):
    a, b = make_store("A"), make_store("B")
    budget = budget_ref(1.0)
    assert a.gate("alice", Reserve("r1", 0.6, (budget,))).reserved
    assert b.gate("bob", Reserve("r2", 0.6, (budget,))).reserved          # 0 + 0.6 < 1: room
    refused = a.gate("carol", Reserve("r3", 0.01, (budget,)))
    assert not refused.reserved and refused.refusal.budget == budget
    assert (refused.refusal.spent_micro, refused.refusal.reserved_micro) == (0, 1_200_000)
    assert a.spent([budget])[budget.id][:2] == (0, 1_200_000)

    b.settle("r2", "bob", 0.55, (budget,))
    spend = a.settle("r1", "alice", 0.5, (budget,))[budget.id]
    assert (spend.spent_micro, spend.reserved_micro) == (1_050_000, 0) and spend.roll_ms is not None
    # Past the limit, but the crossing is not recorded yet: nobody slips through.
    assert a.gate("carol", Reserve("r4", 0.01, (budget,))).refusal is not None
    previous, halt = b.cross(None, budget.crossing[1], "halt", halt=a_halt(reason="budget_exceeded"))
    assert previous is None and halt["reason"] == "budget_exceeded"
    halted = a.gate("carol", Reserve("r5", 0.01, (budget,)))
    assert halted.halts and not halted.reserved and halted.refusal is None
    a.clear_halt(ALL)                                   # a person resumed past the limit
    assert a.gate("carol", Reserve("r6", 0.01, (budget,))).reserved
    # A budget of another account does not apply.
    other = budget_ref(0.01, account="zed")
    assert a.gate("carol", Reserve("r7", 5.0, (other,))).reserved


def test_thirty_requests_on_three_gateways_never_overspend_by_more_than_one_reservation(make_store):
    stores = [make_store(name) for name in "ABC"]
    limit, worst = 1_000_000, 50_000
    budget = budget_ref(1.0)
    settled, seen, errors, lock = [], [], [], threading.Lock()
    done = threading.Event()
    deadline = time.monotonic() + 30

    def client(n):
        store, rng = stores[n % 3], random.Random(n)
        try:
            while time.monotonic() < deadline:
                rid = new_id()
                gate = store.gate(f"acct{n % 4}", Reserve(rid, worst / 1e6, (budget,)))
                if gate.halts:
                    return
                if gate.refusal is not None:
                    done.wait(0.002)
                    continue
                cost = rng.randint(10_000, worst)
                spend = store.settle(rid, f"acct{n % 4}", cost / 1e6, (budget,))[budget.id]
                with lock:
                    settled.append(cost)
                    seen.append(spend.spent_micro + spend.reserved_micro)
                level = "halt" if spend.spent_micro >= limit else None
                store.cross(None, budget.crossing[1], level,
                            halt=a_halt(reason="budget_exceeded") if level else None)
        except Exception as err:        # reported by the test, not lost in a thread
            errors.append(err)

    def sampler():
        while not done.is_set():
            spend = stores[0].spent([budget])[budget.id]
            with lock:
                seen.append(spend.spent_micro + spend.reserved_micro)
            done.wait(0.001)

    threads = [threading.Thread(target=client, args=(n,), name=f"budget-{n}") for n in range(30)]
    watch = threading.Thread(target=sampler, name="budget-sampler")
    watch.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    done.set()
    watch.join(10)
    assert not errors
    final = stores[1].spent([budget])[budget.id]
    assert final.spent_micro == sum(settled)            # exact: integer micro-dollars
    assert final.reserved_micro == 0
    assert limit <= final.spent_micro < limit + worst
    assert max(seen) < limit + worst, "spend plus reservations passed the limit by more than one"
    assert len(settled) >= 20 and stores[2].gate("acct0").halts


def test_a_reservation_nobody_refreshes_expires_and_a_refreshed_one_lives(make_store):
    budget = budget_ref(10.0)
    alive, dead = make_store("A", reservation_ttl_s=1), make_store("B", reservation_ttl_s=1)
    alive.start()                                       # the heartbeat: every ttl/3
    started = time.monotonic()
    assert alive.gate("a", Reserve("ra", 0.1, (budget,))).reserved
    assert dead.gate("b", Reserve("rb", 0.2, (budget,))).reserved    # B is then kill -9ed
    assert alive.spent([budget])[budget.id].reserved_micro == 300_000
    assert wait_until(lambda: alive.spent([budget])[budget.id].reserved_micro == 100_000, timeout=5)
    assert time.monotonic() - started >= 0.9
    threading.Event().wait(1.2)                         # past another ttl: A's is still held
    assert alive.spent([budget])[budget.id].reserved_micro == 100_000
    # B's late settle still counts its cost, once.
    dead.settle("rb", "b", 0.15)
    dead.settle("rb", "b", 0.15)
    alive.settle("ra", "a", 0.05)
    assert alive.spent([budget])[budget.id][:2] == (200_000, 0)


def test_settling_is_idempotent_and_exact(make_store):
    a, b = make_store("A"), make_store("B")
    budget = budget_ref(100.0)
    account_budget = budget_ref(100.0, account="alice")
    assert a.gate("alice", Reserve("r1", 0.3, (budget, account_budget))).reserved
    assert a.spent([budget])[budget.id].reserved_micro == 300_000      # 0.3 * 1e6 is 300000.00000000006
    first = a.settle("r1", "alice", 0.1, (budget, account_budget))
    again = b.settle("r1", "alice", 0.1, (budget, account_budget))
    assert first == again and first[budget.id][:2] == (100_000, 0)
    for _ in range(10):
        a.settle(None, "bob", 0.1)                      # a cost without a reservation
    spend = b.spent([budget, account_budget])
    assert spend[budget.id].spent_micro == 1_100_000    # 0.1 eleven times, no float drift
    assert spend[account_budget.id].spent_micro == 100_000


def test_windows_follow_the_redis_clock_and_age_spend_out(make_store):
    a, b = make_store("A"), make_store("B")
    now = a.gate("x").now_ms
    assert abs(now - time.time() * 1000) < 60_000       # Redis's clock, not a made-up one
    hour = budget_ref(1.0, window_ms=3_600_000)
    ninety = budget_ref(1000.0, window_ms=90 * DAY_MS)

    def move(ms):
        for store in (a, b):
            store.clock_offset_ms = ms

    def spent():
        got = b.spent([hour, ninety])
        return got[hour.id].spent_micro, got[ninety.id].spent_micro
    assert spent() == (0, 0)                            # the totals now exist
    for day in range(3):
        move(day * DAY_MS)
        a.settle(None, "alice", 2.0)
    assert spent() == (2_000_000, 6_000_000)
    roll = b.spent([hour])[hour.id].roll_ms
    settle_minute = (now + 2 * DAY_MS) // MINUTE_MS * MINUTE_MS
    assert settle_minute + MINUTE_MS + 3_600_000 <= roll + 60_000 and roll <= settle_minute + 2 * MINUTE_MS + 3_600_000
    move(2 * DAY_MS + 30 * MINUTE_MS)
    assert spent() == (2_000_000, 6_000_000)
    move(2 * DAY_MS + 62 * MINUTE_MS)
    assert spent() == (0, 6_000_000)
    move(90 * DAY_MS + 30 * MINUTE_MS)                  # day 0 has aged out of 90 days
    assert spent() == (0, 4_000_000)
    move(92 * DAY_MS + 2 * MINUTE_MS)
    assert spent() == (0, 0)


# -- failures ------------------------------------------------------------------------

def test_redis_stopped_is_store_unavailable_within_the_bound_and_it_reconnects(make_store, redis_server, caplog):
    store = make_store("A", timeout_ms=200)
    assert store.gate("x").halts == () and store.status()["up"] is True
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="dario_lib.redis_store"):
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                store.gate("x", Reserve("r", 0.1, (budget_ref(),)))
            assert time.monotonic() - started < 1.0
    assert f"127.0.0.1:{redis_server.port}" in str(err.value)
    status = store.status()
    assert status["up"] is False and status["errors"] == 3
    assert store.metrics()["up"] == 0
    assert sum("STORE DOWN" in r.getMessage() for r in caplog.records) == 1     # one line, not one per call
    redis_server.start()
    with caplog.at_level(logging.WARNING, logger="dario_lib.redis_store"):
        assert store.check()
    assert store.status()["up"] is True and any("STORE BACK" in r.getMessage() for r in caplog.records)


def test_a_hung_redis_is_store_unavailable_after_the_timeout(make_store, redis_server):
    store = make_store("A", timeout_ms=200)
    store.gate("x")
    redis_server.pause()
    try:
        for call in (lambda: store.gate("x"), lambda: store.settle("r", "x", 0.1), store.halts):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within 200 ms"):
                call()
            assert 0.15 <= time.monotonic() - started < 1.5
    finally:
        redis_server.resume()
    assert wait_until(store.check, timeout=5)
    assert store.status()["pendingSettles"] == 1        # the failed settle waits for the heartbeat


def test_a_failed_settle_is_retried_until_it_lands(make_store, redis_server):
    budget = budget_ref(10.0)
    store = make_store("A", reservation_ttl_s=1)
    assert store.gate("a", Reserve("r1", 0.5, (budget,))).reserved
    redis_server.pause()
    try:
        with pytest.raises(StoreUnavailable):
            store.settle("r1", "a", 0.25)
    finally:
        redis_server.resume()
    store.start()
    assert wait_until(lambda: store.status()["pendingSettles"] == 0, timeout=5)
    assert store.spent([budget])[budget.id][:2] == (250_000, 0)


def test_redis_back_empty_halts_the_team_once_until_someone_resumes(make_store, redis_server, tmp_path):
    marker_a = str(tmp_path / "a" / "store-marker.json")
    a = make_store("A", marker_path=marker_a)
    b = make_store("B")
    assert a.gate("x").halts == () and b.gate("x").halts == ()
    saved = open(marker_a).read()
    assert json.loads(saved)["namespace"] == "dario" and oct(os.stat(marker_a).st_mode & 0o777) == "0o600"
    a.put_halt("alice", a_halt(account="alice"))

    redis_server.restart()                              # no persistence: back empty
    lost = a.gate("x")
    assert lost.state_lost and [h["reason"] for h in lost.halts] == [STATE_LOST]
    assert lost.halts[0]["cooldownUntil"] is None and lost.halts[0]["gateway"] == "A"
    follow = b.gate("x", Reserve("r", 0.1, (budget_ref(),)))
    assert not follow.state_lost and [h["reason"] for h in follow.halts] == [STATE_LOST]
    assert not follow.reserved

    b.clear_halt(ALL)                                   # `dario resume` on any gateway
    assert a.gate("x").halts == () and b.gate("x").halts == ()
    # A gateway restarted with the marker it saved before the loss: that loss is already
    # a halt (resumed since), so no second one.
    (tmp_path / "copy.json").write_text(saved)
    again = make_store("A-restarted", marker_path=str(tmp_path / "copy.json"))
    assert again.gate("x").halts == () and not again.gate("x").state_lost


def test_a_gateway_restarted_after_the_loss_still_notices_it(make_store, redis_server, tmp_path):
    marker = str(tmp_path / "store-marker.json")
    make_store("A", marker_path=marker).gate("x")
    redis_server.restart()
    fresh = make_store("A-restarted", marker_path=marker)
    gate = fresh.gate("x")
    assert gate.state_lost and [h["reason"] for h in gate.halts] == [STATE_LOST]


def test_with_aof_a_restart_keeps_the_state(tmp_path):
    server = redis_kit.redis_server(aof=True)
    try:
        store = RedisStore(config.StoreConfig(url=server.url()), gateway_id="A")
        store.gate("x")
        store.put_halt(None, a_halt())
        server.restart()
        gate = store.gate("x")
        assert not gate.state_lost and [h["reason"] for h in gate.halts] == ["overage_detected"]
        store.close()
    finally:
        server.close()


def test_scripts_forgotten_by_redis_are_sent_again(make_store, redis_server):
    store = make_store("A")
    store.gate("x")
    store._client.script_flush()
    assert store.gate("x", Reserve("r", 0.1, (budget_ref(),))).reserved


# -- isolation, credentials, transports ----------------------------------------------

def test_two_namespaces_do_not_see_each_other(make_store):
    team1, team2 = make_store("A", namespace="team1"), make_store("B", namespace="team2")
    budget = budget_ref(1.0)
    team1.put_halt(None, a_halt())
    team1.settle(None, "x", 0.9)
    team1.cross(None, "util5h", "warn")
    assert team2.gate("x").halts == () and team2.halts() == {}
    assert team2.spent([budget])[budget.id].spent_micro == 0
    assert team2.cross(None, "util5h", "warn") == (None, None)
    assert team1.gate("x").halts and team1.spent([budget])[budget.id].spent_micro == 900_000
    keys = team1._client.keys("*")
    assert keys and all(key.startswith(("team1:", "team2:")) for key in keys)


def test_a_password_protected_redis_works_and_the_password_shows_nowhere(tmp_path, caplog):
    password = "s3cret-Pass-word"
    server = redis_kit.redis_server(password=password)
    made = []
    try:
        env = {"DARIO_HOME": str(tmp_path), "DARIO_STORE": server.url(2), "DARIO_STORE_PASSWORD": password}
        settings = config.resolve({}, env)
        assert password not in repr(settings) and password not in json.dumps(settings.store.public())
        store = open_store(settings.store, gateway_id="A")
        made.append(store)
        assert store.gate("x").halts == () and store.put_halt(None, a_halt())[0]

        in_url = f"redis://:{password}@127.0.0.1:{server.port}/2"
        settings = config.resolve({"store.url": in_url}, {"DARIO_HOME": str(tmp_path)})
        assert password not in repr(settings) and password not in json.dumps(settings.store.public())
        assert password not in config.public_value("store.url", settings.store.url)
        store = open_store(settings.store, gateway_id="B")
        made.append(store)
        assert [h["gateway"] for h in store.gate("x").halts] == ["A"]

        texts = []
        with caplog.at_level(logging.DEBUG):
            for url, env_password in ((server.url(2), password + "-wrong"),
                                      (in_url.replace(password, password + "-wrong"), None),
                                      (server.url(2), None)):
                bad = RedisStore(config.StoreConfig(url=url, password=env_password), gateway_id="C")
                made.append(bad)
                with pytest.raises(StoreUnavailable) as err:
                    bad.gate("x")
                texts += [str(err.value), json.dumps(bad.status())]
        texts += [record.getMessage() for record in caplog.records]
        assert all(password not in text for text in texts), [t for t in texts if password in t]
        with pytest.raises(config.ConfigError) as err:
            config.resolve({}, {"DARIO_HOME": str(tmp_path), "DARIO_STORE": in_url + "?x=" + password})
        assert password not in str(err.value)
    finally:
        for store in made:
            store.close()
        server.close()


def test_a_unix_socket_url_works(tmp_path):
    server = redis_kit.redis_server(unix=True)
    try:
        url = server.unix_url(db=3)
        assert config.resolve({"store.url": url}, {"DARIO_HOME": str(tmp_path)}).store.url == url
        store = RedisStore(config.StoreConfig(url=url), gateway_id="A")
        over_tcp = RedisStore(config.StoreConfig(url=server.url(3)), gateway_id="B")
        try:
            store.put_halt(None, a_halt())
            assert [h["gateway"] for h in over_tcp.gate("x").halts] == ["A"]
            assert store.status()["host"] == f"unix://{server.socket_path}?db=3"
        finally:
            store.close()
            over_tcp.close()
    finally:
        server.close()


def test_events_skip_the_gateways_own_and_resume_after_a_redis_restart(make_store, redis_server):
    a, b = make_store("A"), make_store("B")
    events_b = subscribed(b, a)
    b.publish("overage_warn", {"reason": "mine"})
    a.publish("overage_warn", {"reason": "theirs"})
    assert wait_until(lambda: events_b.of("overage_warn"))
    assert [e["data"]["reason"] for e in events_b.of("overage_warn")] == ["theirs"]
    redis_server.restart()
    assert wait_until(lambda: a.publish("after", {}) is None and bool(events_b.of("after")),
                      timeout=15, interval=0.1)


def test_status_and_metrics_count_round_trips(make_store):
    store = make_store("A", namespace="ns1")
    for _ in range(5):
        store.gate("x")
    status = store.status()
    assert status["kind"] == "redis" and status["namespace"] == "ns1" and status["up"] is True
    assert status["host"].startswith("redis://127.0.0.1:") and status["errors"] == 0
    assert status["roundtripMs"] is not None
    histogram = store.metrics()["roundtrip"]
    assert histogram.count == 5 and histogram.counts[-1] == 5


def test_without_the_redis_package_building_a_store_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingDependency, match=r"pip install 'redis>=5.0'"):
        open_store(config.StoreConfig(url="redis://127.0.0.1:1/0"))
    assert open_store(config.StoreConfig()) is None         # the file store needs nothing


# -- config --------------------------------------------------------------------------

def test_store_settings_resolve_with_their_defaults(tmp_path):
    store = config.resolve({}, {"DARIO_HOME": str(tmp_path)}).store
    assert (store.kind, store.url, store.namespace, store.fail_open, store.reservation_ttl_s,
            store.timeout_ms, store.password) == ("file", "file", "dario", False, 30, 250, None)
    env = {"DARIO_HOME": str(tmp_path), "DARIO_STORE": "rediss://redis.example:6380/1"}
    assert config.resolve({}, env).store.kind == "redis"
    assert config.resolve({"store.url": "file"}, env).store.url == "file"      # the flag wins


@pytest.mark.parametrize("url", ["file", "redis://localhost", "redis://h:6379/0", "redis://u:p@h:1/15",
                                 "rediss://h/", "redis://[::1]:6379/2", "unix:///run/redis.sock",
                                 "unix:///tmp/r.sock?db=4", "unix://:pw@/tmp/r.sock"])
def test_store_urls_allowed(url):
    assert config.parse_value("store.url", url) == url


@pytest.mark.parametrize("url", ["", "files", "http://h:6379", "redis://", "redis://h:99999",
                                 "redis://h/db", "redis://h:1/0?password=x", "unix://host/sock",
                                 "unix:///tmp/r.sock?db=x", "redis://h#frag", "redis://h /0"])
def test_store_urls_refused_without_echoing_them(url):
    with pytest.raises(config.ConfigError) as err:
        config.parse_value("store.url", url)
    assert "redis://[user:password@]host:port/db" in str(err.value)
    assert not url or repr(url) not in str(err.value)


def test_store_namespace_and_numbers_are_checked(tmp_path):
    for name, bad in (("store.namespace", "a b"), ("store.namespace", "x" * 65),
                      ("store.reservationTtlS", "0"), ("store.reservationTtlS", "3601"),
                      ("store.timeoutMs", "5"), ("store.failOpen", "maybe")):
        with pytest.raises(config.ConfigError):
            config.parse_value(name, bad)
    values, warnings = config.sanitize({"store": {"namespace": "team-1:prod", "failOpen": True,
                                                   "reservationTtlS": 5, "timeoutMs": 100,
                                                   "url": "redis://u:hunter2@h/0?bad"}})
    assert values == {"store.namespace": "team-1:prod", "store.failOpen": True,
                      "store.reservationTtlS": 5, "store.timeoutMs": 100}
    assert len(warnings) == 1 and "hunter2" not in warnings[0]


# -- the extra-usage cap (overageGuard.allowExtraUsage) ----------------------------------

def cap_ref(usd=1.0, key=None, window_ms=DAY_MS):
    return BudgetRef.cap(config.ExtraUsageCap(usd, "1d", window_ms), key)


def test_the_cap_is_held_only_while_in_extra_usage_and_apart_from_budgets(make_store):
    a, b = make_store("A"), make_store("B")
    budget, cap = budget_ref(100.0), cap_ref(1.0)
    assert cap.scope == "x:*" and cap_ref(1.0, "alice").scope == "x:a:alice"
    gate = a.gate("alice", Reserve("r1", 0.6, (budget, cap)))
    assert gate.reserved and not gate.cap_held and gate.extra_mode is False
    assert a.extra_mode(cap, True) is False and b.extra_mode(cap, True) is True
    gate = a.gate("alice", Reserve("r2", 0.6, (budget, cap)))
    assert gate.reserved and gate.cap_held and gate.extra_mode is True
    assert b.gate("bob", Reserve("r3", 0.6, (cap,))).cap_held                 # 0 + 0.6 < 1: room
    refused = b.gate("bob", Reserve("r4", 0.01, (budget, cap)))
    assert refused.refusal.budget == cap and (refused.refusal.spent_micro, refused.refusal.reserved_micro) == \
        (0, 1_200_000)
    assert a.spent([budget])[budget.id].reserved_micro == 1_200_000      # r1 and r2: the cap's holds apart
    # r2's answer came from the subscription after all: its hold goes, nothing counts for the cap.
    assert a.settle_cap("r2", "alice", 0.0, cap)[:2] == (0, 600_000)
    a.settle("r2", "alice", 0.4, (budget,))
    # r3 was served from extra usage: it counts, once (idempotent), against the cap only there.
    assert b.settle_cap("r3", "bob", 0.7, cap)[:2] == (700_000, 0)
    assert b.settle_cap("r3", "bob", 0.7, cap)[:2] == (700_000, 0)
    assert a.spent([budget])[budget.id][:2] == (400_000, 600_000)           # r1 still holds the budget
    # Account by account (account scope): alice has nothing in this cap's series, so is not listed.
    assert a.cap_status(DAY_MS, True) == [("bob", 700_000, 0, False)]
    assert a.cap_status(DAY_MS, False) == [("*", 700_000, 0, True)]
    # A settle without a hold (the request went out before the key was in extra usage).
    spend = a.settle_cap(None, "carol", 0.4, cap)
    assert spend.spent_micro == 1_100_000 and spend.roll_ms is not None
    # Past the cap, not recorded yet: refused; recorded: the guard's halt decides.
    assert a.gate("alice", Reserve("r5", 0.01, (cap,))).refusal is not None
    a.cross(None, cap.crossing[1], "halt")
    assert a.gate("alice", Reserve("r6", 0.01, (cap,))).cap_held


def test_back_on_the_subscription_the_cap_is_re_armed(make_store):
    a = make_store("A")
    cap = cap_ref(1.0)
    a.extra_mode(cap, True)
    a.settle_cap(None, "alice", 1.5, cap)
    a.cross(None, cap.crossing[1], "halt")
    assert a.gate("alice", Reserve("r1", 0.01, (cap,))).cap_held       # resumed past the cap: goes on
    a.settle_cap("r1", "alice", 0.0, cap)
    assert a.extra_mode(cap, False) is True                             # an answer from the subscription
    assert a.gate("alice", Reserve("r2", 0.01, (cap,))).extra_mode is False
    a.extra_mode(cap, True)
    # Back into extra usage past the cap: refused until the crossing is recorded again.
    assert a.gate("alice", Reserve("r3", 0.01, (cap,))).refusal is not None
    assert a.cross(None, cap.crossing[1], "halt", halt=a_halt(reason="extra_usage_cap"))[0] == "warn"


def test_a_cap_hold_of_a_dead_gateway_expires(make_store):
    dead = make_store("B", reservation_ttl_s=1)
    alive = make_store("A", reservation_ttl_s=1)
    cap = cap_ref(1.0)
    alive.extra_mode(cap, True)
    assert dead.gate("b", Reserve("rb", 1.0, (cap,))).cap_held
    assert alive.gate("a", Reserve("ra", 0.2, (cap,))).refusal is not None
    assert wait_until(lambda: alive.cap_status(DAY_MS, False)[0][2] == 0, timeout=5)
    assert alive.gate("a", Reserve("ra", 0.2, (cap,))).cap_held
    dead.settle_cap("rb", "b", 0.3, cap)                               # a late settle still counts, once
    assert alive.cap_status(DAY_MS, False)[0][1:3] == (300_000, 200_000)
