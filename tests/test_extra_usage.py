"""Capped extra usage (`overageGuard.allowExtraUsage`, issue 14), end to end.

Real gateways in front of the simulator, over real sockets; the file store (one home,
restarts) and a team of gateways on a real redis-server. Time moves only through an
injected clock and manual timers.
"""

import contextlib
import json
import threading

import pytest
import requests

from dario_lib import guardtext, metrics
from dario_lib.client import Client
from dario_lib.tui_tabs import guard_headroom

from .helpers import FakeClock, TimerFactory, guard_events, make_settings, running_gateway, wait_until

MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
# The request's worst case: every body byte a token at opus's dearest input rate (cache
# writes, $6.25/M) plus max_tokens of output at $25/M.
WORST = (len(json.dumps(MESSAGE)) * 6.25 + 100 * 25) / 1e6
EXTRA = {"x-sim-claim": "overage"}


def configure(home, cap, **config):
    overage = dict(config.pop("overageGuard", {}), allowExtraUsage=cap)
    (home / "config.json").write_text(json.dumps(dict(config, overageGuard=overage)))


def url(gateway, path="/v1/messages"):
    return f"http://127.0.0.1:{gateway.port}{path}"


def post(gateway, headers=None, key="sk-a", timeout=10):
    """A request, answered and settled: the client can read the answer a moment before
    its cost is settled, so wait until no request is in flight."""
    resp = requests.post(url(gateway), json=MESSAGE, headers={"x-api-key": key, **(headers or {})},
                         timeout=timeout)
    assert wait_until(lambda: gateway.tracker.count == 0)
    return resp


def reason(resp):
    return resp.json().get("error", {}).get("reason") if resp.status_code != 200 else None


def cap_of(gateway, account="*"):
    """The extra-usage cap's figures for `account` ("*": all traffic)."""
    extra = gateway.guard.extra_usage_status(gateway.budgets)
    return next((c for c in extra["caps"] if c["account"] == account), None)


def cost_of_one(sim, tmp_path):
    """What one MESSAGE answer costs (metered), from a throwaway gateway."""
    scratch = tmp_path / "scratch-home"
    scratch.mkdir(exist_ok=True)
    with running_gateway(make_settings(scratch, sim.url)) as gateway:
        assert post(gateway).status_code == 200
        assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
        cost = gateway.store.snapshot()[-1]["costUsd"]
    sim.reset()
    return cost


def seed_ledger(home, usd, account="key:aaaaaaaa", t_ms=None):
    import time
    t_ms = int(time.time() * 1000) - 60_000 if t_ms is None else t_ms
    line = {"t": t_ms, "account": account, "usd": usd, "extra": True}
    (home / "spend-ledger.jsonl").write_text(json.dumps(line) + "\n")


def hammer(gateways, n, headers):
    """n simultaneous requests spread over the gateways: their statuses and reasons."""
    barrier = threading.Barrier(n)
    results, lock = [], threading.Lock()

    def client(i):
        barrier.wait()
        resp = post(gateways[i % len(gateways)], headers)
        with lock:
            results.append((resp.status_code, reason(resp)))

    threads = [threading.Thread(target=client, args=(i,), name=f"extra-usage-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


# -- one gateway, the file store ---------------------------------------------------

def test_extra_usage_goes_on_under_the_cap_warns_once_at_warn_at_and_halts_at_the_cap(sim, home):
    cost = cost_of_one(sim, home.parent)
    configure(home, {"usd": round(cost * 6.5, 8), "window": "1d", "warnAt": 0.5}, overageGuard={"cooldownMs": 0})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        sub = gateway.bus.subscribe()
        statuses = [post(gateway, EXTRA).status_code for _ in range(7)]
        # Seven answers from extra usage went on; the seventh's cost reached the cap.
        assert statuses == [200] * 7
        blocked = post(gateway, EXTRA)
        assert blocked.status_code == 503 and reason(blocked) == "extra_usage_cap"
        error = blocked.json()["error"]
        assert error["type"] == "dario_guard" and blocked.headers["x-should-retry"] == "false"
        assert f"of the ${cost * 6.5:.2f} cap per 1d for all accounts" in error["message"]
        assert "served from extra usage" in error["message"] and "dario resume" in error["message"]
        assert len(sim.requests) == 7
        events = guard_events(sub)
        assert [(name, e["reason"]) for name, e in events] == [("overage_warn", "extra_usage_warning"),
                                                              ("overage_halt", "extra_usage_cap")]
        warn, halt = events[0][1], events[1][1]
        assert warn["detail"]["spentUsd"] == pytest.approx(cost * 4, abs=1e-4)
        assert halt["detail"]["capUsd"] == pytest.approx(cost * 6.5) and halt["detail"]["capAccount"] == "*"
        assert halt["cooldownUntil"] is not None         # the roll time, as a budget's
        ledger = [json.loads(line) for line in (home / "spend-ledger.jsonl").read_text().splitlines()]
        assert len(ledger) == 7 and all(entry["extra"] is True for entry in ledger)
        # /metrics and the headroom line say it.
        text = metrics.render(gateway)
        assert 'dario_extra_usage_cap_usd{account="*",window="1d"}' in text
        assert 'dario_extra_usage_active{account="*"} 1' in text
        spent = cap_of(gateway)["spentUsd"]
        assert f'dario_extra_usage_usd{{account="*",window="1d"}} {round(spent, 9)!r}' in text
        status = dict(requests.get(url(gateway, "/status")).json(),
                      extraUsage=gateway.guard.extra_usage_status(gateway.budgets))
        assert (f"extra usage ${spent:.2f} of ${cost * 6.5:.2f} per 1d, in use", "bad") in guard_headroom(status)


def test_an_api_claim_or_an_unknown_claim_still_halts_at_once(sim, home):
    configure(home, {"usd": 100, "window": "1d"}, overageGuard={"scope": "account"})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert post(gateway, EXTRA, key="sk-a").status_code == 200
        assert post(gateway, {"x-sim-overage-in-use": "true"}, key="sk-a").status_code == 200
        assert post(gateway, {"x-sim-status": "rejected", "x-sim-overage-status": "allowed"},
                    key="sk-a").status_code == 200
        assert post(gateway, key="sk-a").status_code == 200
        assert post(gateway, {"x-sim-claim": "api"}, key="sk-a").status_code == 200     # relayed in full
        blocked = post(gateway, EXTRA, key="sk-a")
        assert blocked.status_code == 503 and reason(blocked) == "overage_detected"
        assert "billed as API usage" in blocked.json()["error"]["message"]
        assert post(gateway, {"x-sim-claim": "seven_day_something_new"}, key="sk-b").status_code == 200
        assert reason(post(gateway, key="sk-b")) == "overage_detected"
        assert len(sim.requests) == 6


def test_without_a_cap_the_first_extra_usage_answer_halts(gateway):
    assert post(gateway, EXTRA).status_code == 200
    assert reason(post(gateway)) == "overage_detected"
    assert gateway.guard.extra_usage_status(gateway.budgets) is None
    assert "dario_extra_usage" not in metrics.render(gateway)


def test_twenty_concurrent_requests_pass_the_cap_by_one_reservation_at_most_and_spend_survives_a_restart(
        sim, home):
    cap = 0.01
    configure(home, {"usd": cap, "window": "1d"}, overageGuard={"cooldownMs": 0})
    seed_ledger(home, 0.0095)
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert post(gateway, EXTRA).status_code == 200          # now in extra usage: requests reserve
        before = cap_of(gateway)["spentUsd"]
        assert before < cap and gateway.guard.in_extra_usage()
        results = hammer([gateway], 20, dict(EXTRA, **{"x-sim-headers-delay-ms": "300"}))
        assert wait_until(lambda: gateway.store.summary()["requests"] == 21)
        admitted = [r for r in results if r[0] == 200]
        assert 1 <= len(admitted) <= 2 and len(sim.requests) == 1 + len(admitted)
        # Held back while the one in flight filled the cap: retryable, worded for the cap.
        assert {r for r in results if r[0] != 200} == {(503, "extra_usage_cap")}
        assert wait_until(lambda: gateway.guard.snapshot() is not None)
        spent = cap_of(gateway)["spentUsd"]
        assert cap <= spent <= cap + WORST, "more than one reservation past the cap"
        assert cap_of(gateway)["reservedUsd"] == 0
        assert gateway.guard.snapshot().reason == "extra_usage_cap"
    with running_gateway(make_settings(home, sim.url)) as again:
        assert cap_of(again)["spentUsd"] == pytest.approx(spent)
        blocked = post(again, EXTRA)
        assert blocked.status_code == 503 and reason(blocked) == "extra_usage_cap"
    assert len(sim.requests) == 1 + len(admitted)


def test_a_hold_back_is_retryable_and_names_the_cap(sim, home):
    configure(home, {"usd": 0.01, "window": "1d"})
    seed_ledger(home, 0.0095)
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, EXTRA)
        slow = threading.Thread(target=post, args=(gateway, dict(EXTRA, **{"x-sim-headers-delay-ms": "500"})))
        slow.start()
        assert wait_until(lambda: cap_of(gateway)["reservedUsd"] > 0)
        held = post(gateway, EXTRA)
        slow.join(10)
        assert held.status_code == 503 and held.headers["Retry-After"] == "5"
        assert "x-should-retry" not in held.headers
        assert "the $0.01 extra-usage cap per 1d for all accounts is fully committed" in held.json()["error"]["message"]


def test_an_answer_not_from_extra_usage_settles_its_cap_hold_at_zero_and_still_counts_for_budgets(sim, home):
    configure(home, {"usd": 5, "window": "1d"}, guards={"budgets": [{"account": "*", "usd": 50, "window": "1d"}]})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, EXTRA)
        extra_spent = cap_of(gateway)["spentUsd"]
        assert extra_spent > 0 and gateway.guard.in_extra_usage()
        # In extra usage, this one holds its worst case against the cap; its answer comes
        # from the subscription after all.
        assert post(gateway).status_code == 200
        assert wait_until(lambda: gateway.budgets.status()[0]["spentUsd"] > extra_spent * 1.5)
        assert cap_of(gateway) == {"account": "*", "spentUsd": extra_spent, "reservedUsd": 0,
                                   "inExtraUsage": False}
        assert gateway.budgets.status()[0]["spentUsd"] == pytest.approx(extra_spent * 2, rel=1e-3)


def test_the_cap_halt_clears_when_the_window_rolls(sim, home):
    cost = cost_of_one(sim, home.parent)
    configure(home, {"usd": round(cost * 2.5, 8), "window": "30m", "warnAt": 0.5})
    clock, timers = FakeClock(), TimerFactory()
    with running_gateway(make_settings(home, sim.url), clock=clock, timer_factory=timers) as gateway:
        sub = gateway.bus.subscribe()
        for _ in range(3):
            clock.advance(60)
            assert post(gateway, EXTRA).status_code == 200
        assert reason(post(gateway, EXTRA)) == "extra_usage_cap"
        halt = gateway.guard.snapshot()
        # The cap frees room when the first answer's minute leaves the 30-minute window.
        first_minute = int((clock.now - 120) * 1000) // 60_000 * 60_000
        assert halt.cooldown_until == first_minute + 60_000 + 30 * 60_000
        clock.advance(31 * 60)
        timers.last.fire()
        assert gateway.guard.snapshot() is None
        assert post(gateway, EXTRA).status_code == 200
        names = [(name, e["reason"] if name != "overage_resume" else e["reason"]) for name, e in guard_events(sub)]
        assert names == [("overage_warn", "extra_usage_warning"), ("overage_halt", "extra_usage_cap"),
                         ("overage_resume", "cooldown")]


def test_warn_at_warns_once_per_crossing(sim, home):
    cost = cost_of_one(sim, home.parent)
    configure(home, {"usd": round(cost * 10.5, 8), "window": "30m", "warnAt": 0.3})
    clock = FakeClock()
    with running_gateway(make_settings(home, sim.url), clock=clock) as gateway:
        sub = gateway.bus.subscribe()
        for _ in range(6):
            assert post(gateway, EXTRA).status_code == 200
        assert [e["reason"] for _, e in guard_events(sub)] == ["extra_usage_warning"]
        clock.advance(31 * 60)                      # the window rolls: under warnAt again
        for _ in range(4):
            assert post(gateway, EXTRA).status_code == 200
        assert [e["reason"] for _, e in guard_events(sub)] == ["extra_usage_warning"]
        assert gateway.guard.warnings == 2


def test_a_resume_lets_extra_usage_go_on_until_the_subscription_answers_again(sim, home):
    cost = cost_of_one(sim, home.parent)
    configure(home, {"usd": round(cost * 1.5, 8), "window": "1d"})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, EXTRA)
        post(gateway, EXTRA)
        assert reason(post(gateway, EXTRA)) == "extra_usage_cap"
        assert Client(gateway.port).resume()["wasHalted"] is True
        # Resumed: the person chose to go on (the crossing stays recorded, as a budget's).
        assert [post(gateway, EXTRA).status_code for _ in range(2)] == [200, 200]
        assert gateway.guard.snapshot() is None
        # The subscription serves again: the cap is re-armed. Back in extra usage while
        # the window is still past the cap, it halts again.
        assert post(gateway).status_code == 200
        assert post(gateway, EXTRA).status_code == 200
        assert wait_until(lambda: gateway.guard.snapshot() is not None)
        assert reason(post(gateway, EXTRA)) == "extra_usage_cap"


def test_in_account_scope_each_account_has_its_own_cap(sim, home):
    cost = cost_of_one(sim, home.parent)
    configure(home, {"usd": round(cost * 1.5, 8), "window": "1d"}, overageGuard={"scope": "account"})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, EXTRA, key="sk-a")
        post(gateway, EXTRA, key="sk-a")
        assert reason(post(gateway, EXTRA, key="sk-a")) == "extra_usage_cap"
        assert post(gateway, EXTRA, key="sk-b").status_code == 200
        assert post(gateway, EXTRA, key="sk-b").status_code == 200
        halts = gateway.guard.halts()
        assert [h.reason for h in halts] == ["extra_usage_cap", "extra_usage_cap"]
        label = halts[0].account
        assert "--account=" in post(gateway, key="sk-a").json()["error"]["message"]
        caps = gateway.guard.extra_usage_status(gateway.budgets)["caps"]
        assert {c["account"] for c in caps} == {h.account for h in halts} and label.startswith("key:")
        lines = guardtext.extra_usage_lines(gateway.guard.extra_usage_status(gateway.budgets))
        assert all(" for key:" in text and level == "bad" for text, level in lines)


def test_a_reload_that_adds_the_cap_counts_the_ledger_already_written(sim, home):
    configure(home, None, guards={"budgets": [{"account": "*", "usd": 50, "window": "1d"}]})
    seed_ledger(home, 0.0095)
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert gateway.guard.extra_usage_status(gateway.budgets) is None
        configure(home, {"usd": 0.01, "window": "1d"}, guards={"budgets": [{"account": "*", "usd": 50,
                                                                               "window": "1d"}]})
        gateway.resolver = lambda: make_settings(home, sim.url)
        gateway.reload()
        assert post(gateway, EXTRA).status_code == 200
        assert 0.0095 < cap_of(gateway)["spentUsd"] < 0.01        # the ledger's extra spend counts
        assert post(gateway, EXTRA).status_code == 200
        assert gateway.guard.snapshot().reason == "extra_usage_cap"


# -- a team of gateways on one Redis --------------------------------------------------

@pytest.fixture
def team(sim, tmp_path, redis_server):
    pytest.importorskip("redis", reason="the redis package (requirements-dev.txt) is not installed")
    server = redis_server
    homes = iter(range(100))
    with contextlib.ExitStack() as stack:

        def start(n, cap, **config):
            gateways = []
            for _ in range(n):
                home = tmp_path / f"gateway-{next(homes)}"
                home.mkdir()
                rest = {name: value for name, value in config.items() if name != "store"}
                configure(home, cap, store=dict(config.get("store", {}), url=server.url()), **rest)
                gateways.append(stack.enter_context(running_gateway(make_settings(home, sim.url))))
            return gateways
        start.redis = server
        yield start


def test_twenty_concurrent_requests_across_a_team_pass_the_cap_by_one_reservation_at_most(team, sim, tmp_path):
    cost = cost_of_one(sim, tmp_path)
    cap = round(cost * 3.5, 8)
    gateways = team(3, {"usd": cap, "window": "1d"}, overageGuard={"cooldownMs": 0})
    assert post(gateways[0], EXTRA).status_code == 200      # the team is in extra usage now
    assert gateways[2].guard.extra_usage_status()["caps"][0]["inExtraUsage"] is True
    # A request's worst case is many times its cost: each burst of twenty, across the
    # three gateways, lets one through while its hold fills the cap; bursts until the halt.
    results = []
    for _ in range(10):
        results += hammer(gateways, 20, dict(EXTRA, **{"x-sim-headers-delay-ms": "100"}))
        if all(g.guard.snapshot() is not None for g in gateways):
            break
    admitted = [r for r in results if r[0] == 200]
    assert len(sim.requests) == 1 + len(admitted) and len(admitted) >= 2
    assert {r for r in results if r[0] != 200} == {(503, "extra_usage_cap")}
    assert wait_until(lambda: all(g.guard.snapshot() is not None for g in gateways))
    figures = gateways[1].guard.extra_usage_status()["caps"][0]
    assert figures["reservedUsd"] == 0
    assert cap <= figures["spentUsd"] <= cap + WORST, "more than one reservation past the cap"
    blocked = post(gateways[2], EXTRA)
    assert blocked.status_code == 503 and reason(blocked) == "extra_usage_cap"
    assert 'dario_extra_usage_usd{account="*",window="1d"}' in metrics.render(gateways[1])


def test_in_account_scope_a_team_keeps_one_cap_per_account(team, sim, tmp_path):
    cost = cost_of_one(sim, tmp_path)
    a, b = team(2, {"usd": round(cost * 1.5, 8), "window": "1d"}, overageGuard={"scope": "account"})
    assert post(a, EXTRA, key="sk-a").status_code == 200
    assert post(b, EXTRA, key="sk-a").status_code == 200          # the team's second: past the cap
    assert wait_until(lambda: a.guard.halts() and b.guard.halts())
    assert reason(post(a, EXTRA, key="sk-a")) == "extra_usage_cap"
    assert post(b, EXTRA, key="sk-b").status_code == 200
    caps = {c["account"]: c for c in b.guard.extra_usage_status()["caps"]}
    (halt,) = b.guard.halts()
    assert halt.account == a.guard.halts()[0].account and halt.reason == "extra_usage_cap"
    assert len(caps) == 2 and caps[halt.account]["spentUsd"] == pytest.approx(cost * 2, abs=1e-6)
    other = next(label for label in caps if label != halt.account)
    assert caps[other]["spentUsd"] == pytest.approx(cost, abs=1e-6) and caps[other]["inExtraUsage"] is True


def test_failing_open_while_redis_is_down_the_cap_cannot_be_kept_so_extra_usage_halts(team, sim):
    (gateway,) = team(1, {"usd": 100, "window": "1d"}, store={"failOpen": True})
    assert post(gateway, EXTRA).status_code == 200 and gateway.guard.snapshot() is None
    team.redis.stop()
    assert post(gateway, EXTRA).status_code == 200                   # forwarded on local guards
    halt = gateway.guard.snapshot()
    assert halt is not None and halt.reason == "overage_detected"
    assert reason(post(gateway)) == "overage_detected"


def test_an_api_claim_halts_the_team_at_once_and_subscription_answers_are_not_capped(team, sim):
    a, b = team(2, {"usd": 100, "window": "1d"})
    assert post(a, EXTRA).status_code == 200
    assert post(b).status_code == 200 and post(b, EXTRA).status_code == 200
    figures = a.guard.extra_usage_status()["caps"][0]
    assert figures["spentUsd"] > 0 and figures["inExtraUsage"] is True
    assert post(a, {"x-sim-claim": "api"}).status_code == 200
    assert wait_until(lambda: b.guard.snapshot() is not None)
    assert reason(post(b)) == "overage_detected"


# -- what people see ------------------------------------------------------------------

def test_analytics_and_dario_status_show_extra_usage(sim, home):
    from dario_lib import analytics, report

    configure(home, {"usd": 5, "window": "1d"})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, EXTRA)
        post(gateway)
        hour = requests.get(url(gateway, "/analytics")).json()["lastHour"]
        record = gateway.store.snapshot()[0]
        assert hour["extraUsageRequests"] == 1 and hour["extraUsageCostUsd"] == round(record["costUsd"], 4)
        extra = gateway.guard.extra_usage_status(gateway.budgets)
        built = analytics.report(gateway.store, extra_usage=extra)
        assert built["extraUsage"]["caps"] == [{"account": "*", "spentUsd": record["costUsd"], "reservedUsd": 0,
                                                "inExtraUsage": False}]
        assert built["allTime"]["extraUsageRequests"] == 1
        status = dict(requests.get(url(gateway, "/status")).json(), extraUsage=extra)
        text = report.status_text(status)
        assert f"  extra usage ${record['costUsd']:.2f} of $5.00 per 1d" in text.splitlines()
