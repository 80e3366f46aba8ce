"""Every rate-limit window the upstream reports (issue 14): from the answer's headers to
the records, /status, /metrics, `dario status` and the guard, over real sockets."""

import json
import os
import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dario_lib import billing, report
from dario_lib.guardtext import iso
from dario_lib.records import RecordStore
from dario_lib.simulator import Simulator

from .helpers import make_settings, running_gateway, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
RESET = 1790000000
# A window no release of dario has heard of, and the extra-usage headers beside it.
NEW_WINDOW = {"7d_oi": {"utilization": "0.42", "status": "allowed_warning", "reset": str(RESET),
                        "surpassed-threshold": "0.25"},
              "overage": {"reset": str(RESET + 3600), "disabled-reason": "out_of_credits"}}


def post(gateway, windows=None, headers=None):
    headers = dict(headers or {})
    if windows is not None:
        headers["x-sim-windows"] = json.dumps(windows)
    return requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json=MESSAGE,
                         headers={"x-api-key": "sk-a", **headers})


def configure(home, **config):
    (home / "config.json").write_text(json.dumps(config))


def metric_samples(gateway):
    """{(metric name, frozenset of labels): value}, parsed by the Prometheus client."""
    text = requests.get(f"http://127.0.0.1:{gateway.port}/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def dario_status(home, port):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    environ["DARIO_HOME"] = str(home)
    return subprocess.run([sys.executable, os.path.join(ROOT, "dario.py"), "status", f"--port={port}"],
                          capture_output=True, text=True, env=environ, timeout=20, stdin=subprocess.DEVNULL)


def test_a_new_window_shows_up_in_records_status_metrics_and_dario_status(sim, home):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert post(gateway, NEW_WINDOW).status_code == 200
        assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
        record = gateway.store.snapshot()[-1]
        assert record["windows"]["7d_oi"] == {"utilization": 0.42, "status": "allowed_warning",
                                              "reset": str(RESET), "surpassedThreshold": 0.25}
        assert set(record["windows"]) == {"5h", "7d", "7d_oi"}           # the simulator's own two too
        assert record["windows"]["5h"]["utilization"] == record["util5h"] == 0.12
        assert "overage" not in record["windows"]
        assert (record["overageReset"], record["overageDisabledReason"]) == (str(RESET + 3600), "out_of_credits")

        # The next answer leaves the window out: its latest reading is still what /status shows.
        assert post(gateway, headers={"x-sim-util5h": "0.2"}).status_code == 200
        assert wait_until(lambda: gateway.store.summary()["requests"] == 2)
        rate = requests.get(f"http://127.0.0.1:{gateway.port}/status").json()["lastRate"]
        assert rate["windows"]["7d_oi"]["utilization"] == 0.42 and rate["windows"]["5h"]["utilization"] == 0.2
        # ... but extra usage is no longer said to be disabled: that answer gave no reason.
        assert rate["overageDisabledReason"] is None

        assert post(gateway, NEW_WINDOW).status_code == 200
        samples = metric_samples(gateway)
        assert samples[("dario_window_utilization", frozenset({("window", "7d_oi")}))] == 0.42
        assert samples[("dario_window_utilization", frozenset({("window", "5h")}))] == 0.12
        assert samples[("dario_window_reset_timestamp_seconds", frozenset({("window", "7d_oi")}))] == RESET
        assert samples[("dario_window_surpassed_threshold", frozenset({("window", "7d_oi")}))] == 0.25
        assert samples[("dario_window_status", frozenset({("window", "7d_oi"), ("status", "allowed_warning")}))] == 1
        assert samples[("dario_overage_utilization", frozenset())] == 0
        assert samples[("dario_overage_disabled", frozenset({("reason", "out_of_credits")}))] == 1

        result = dario_status(home, gateway.port)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        line = next(line for line in lines if line.strip().startswith("7d_oi"))
        assert f"42%, allowed_warning, over 25%, resets {iso(RESET * 1000)}" in line
        assert any(line.startswith("extra usage: 0%, status rejected, disabled: out_of_credits, resets "
                                   + iso((RESET + 3600) * 1000)) for line in lines)


def test_a_new_window_trips_its_utilization_threshold(sim, home):
    # Needs Guard.observe to read thresholds through billing.utilization (helper D2).
    configure(home, guards={"utilization": {"7d_oi": {"warn": 0.5, "halt": 0.9}}})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        sub = gateway.bus.subscribe()
        assert post(gateway, {"7d_oi": {"utilization": "0.6"}}).status_code == 200
        assert wait_until(lambda: gateway.guard.warnings == 1)
        assert post(gateway, {"7d_oi": {"utilization": "0.95"}}).status_code == 200     # relayed in full
        blocked = post(gateway)
        assert blocked.status_code == 503
        error = blocked.json()["error"]
        assert error["reason"] == "utilization_threshold" and "7d_oi utilization at 95% (halt at 90%)" in error["message"]
        events = []
        while (item := sub.get(0.2)) is not None and item[0] != "timeout":
            if item[0] != "record":
                events.append(item)
        assert [e["detail"] for _, e in events] == [{"metric": "7d_oi", "value": 0.6, "threshold": 0.5},
                                                    {"metric": "7d_oi", "value": 0.95, "threshold": 0.9}]


def test_a_windows_status_trips_guards_unified_status_but_extra_usage_off_never_does(sim, home):
    # Needs Guard.observe to loop over billing.statuses (helper D2).
    configure(home, guards={"unifiedStatus": {"halt": ["rejected"]}})
    with running_gateway(make_settings(home, sim.url)) as gateway:
        # The simulator says overage-status: rejected (extra usage off) on every answer.
        for _ in range(2):
            assert post(gateway, {"7d_sonnet": {"status": "allowed"}}).status_code == 200
        assert post(gateway, {"7d_sonnet": {"status": "rejected"}}, {"x-sim-status": "allowed"}).status_code == 200
        blocked = post(gateway)
        assert blocked.status_code == 503 and blocked.json()["error"]["reason"] == "status_rejected"
        halt = requests.get(f"http://127.0.0.1:{gateway.port}/admin/resume").json()["state"]
        assert halt["detail"]["status"] == "rejected"


# -- the latest reading per window (records.py), socket-free -----------------------------

def _rate(*pairs):
    from dario_lib.headers import Headers
    return billing.parse_ratelimit(Headers([(billing.HEADER_PREFIX + k, v) for k, v in pairs]))


def test_last_rate_keeps_the_latest_value_of_each_windows_fields():
    store = RecordStore()
    store.add({"outcome": "ok", "timestamp": 1, **_rate(("7d_oi-utilization", "0.4"), ("7d_oi-reset", "100"),
                                                        ("status", "allowed"))})
    store.add({"outcome": "ok", "timestamp": 2, **_rate(("7d_oi-utilization", "0.5"), ("5h-status", "allowed"))})
    windows = store.summary()["lastRate"]["windows"]
    assert windows == {"5h": {"utilization": None, "status": "allowed", "reset": None, "surpassedThreshold": None},
                       "7d_oi": {"utilization": 0.5, "status": None, "reset": "100", "surpassedThreshold": None}}
    copy = store.rate_copy()
    copy["windows"]["7d_oi"]["utilization"] = 9              # a reader's copy is its own
    assert store.rate_copy()["windows"]["7d_oi"]["utilization"] == 0.5
    store.add({"outcome": "halted", "timestamp": 3})          # an answer dario gave itself changes nothing
    assert store.rate_copy()["windows"] == windows


def test_last_rate_holds_at_most_max_windows_evicting_the_one_updated_longest_ago():
    store = RecordStore()
    for n in range(billing.MAX_WINDOWS):
        store.add({"outcome": "ok", "timestamp": n, **_rate((f"w{n:02d}-utilization", "0.1"))})
    store.add({"outcome": "ok", "timestamp": 50, **_rate(("w00-utilization", "0.2"))})     # w00 is fresh again
    store.add({"outcome": "ok", "timestamp": 51, **_rate(("new-utilization", "0.3"))})
    windows = store.rate_copy()["windows"]
    assert len(windows) == billing.MAX_WINDOWS
    assert "w01" not in windows and windows["w00"]["utilization"] == 0.2 and windows["new"]["utilization"] == 0.3


# -- `dario status` text, socket-free ----------------------------------------------------

def test_status_text_lines_for_windows_are_inert_and_say_when_each_resets():
    rate = {"windows": {"5h": {"utilization": 0.12, "status": "allowed", "reset": "1700003600",
                               "surpassedThreshold": None},
                        "7d_x": {"utilization": None, "status": "re\x1b[2Jjected", "reset": "soon",
                                 "surpassedThreshold": None}},
            "overageStatus": "allowed", "overageInUse": True, "overageUtil": 0.5}
    lines = report.rate_limit_lines(rate, 1_700_000_000_000)
    assert lines == ["rate-limit windows (latest reading):",
                     "  5h     12%, allowed, resets 2023-11-14T23:13:20.000Z (in 1h 00m)",
                     "  7d_x     ?, re\x1b[2Jjected, resets soon",
                     "extra usage: 50%, status allowed, in use"]
    status = {"version": "x", "bind": "b", "upstream": "u", "configPath": "p", "configSource": "file",
              "uptimeS": 1, "guard": {"state": "normal", "config": {"enabled": True, "behavior": "halt",
                                                                    "cooldownMs": 0}},
              "requests": 1, "outcomes": {}, "lastRate": rate}
    text = report.status_text(status, now=1_700_000_000)
    assert "\x1b" not in text and "re\\x1b[2Jjected" in text
    assert report.rate_limit_lines({}, 0) == [] and report.rate_limit_lines(None, 0) == []


# -- the simulator's windows knob ----------------------------------------------------------

def test_simulator_windows_knob_adds_headers_and_refuses_what_cannot_be_a_header():
    with Simulator(windows={"7d_oi": {"utilization": 0.5}}) as sim:
        resp = requests.post(sim.url + "/v1/messages", json=MESSAGE,
                             headers={"x-sim-windows": json.dumps({"Future_W": {"surpassed-threshold": "1.0"}})})
        assert resp.headers["anthropic-ratelimit-unified-Future_W-surpassed-threshold"] == "1.0"
        assert "anthropic-ratelimit-unified-7d_oi-utilization" not in resp.headers      # replaced for this one
        resp = requests.post(sim.url + "/v1/messages", json=MESSAGE)
        assert resp.headers["anthropic-ratelimit-unified-7d_oi-utilization"] == "0.5"
        for bad in ('["7d"]', '{"7d oi": {"status": "x"}}', '{"7d": {"status": "a\\r\\nx-evil: 1"}}',
                    '{"7d": {"status": true}}', '{"7d": "allowed"}', "not json"):
            refused = requests.post(sim.url + "/v1/messages", json=MESSAGE, headers={"x-sim-windows": bad})
            assert refused.status_code == 400 and "knob windows" in refused.json()["error"]["message"]
        assert requests.post(sim.url + "/v1/messages", json=MESSAGE,
                             headers={"x-sim-windows": "{}", "x-sim-claim": "none"}).headers.get(
            "anthropic-ratelimit-unified-7d_oi-utilization") is None
    help_text = subprocess.run([sys.executable, "-m", "dario_lib.simulator", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=20).stdout
    assert "x-sim-windows" in help_text and "rate-limit windows:" in help_text


@pytest.mark.parametrize("value", [{"5h": {"utilization": "0.5"}}, '{"overage": {"disabled-reason": "x"}}'])
def test_simulator_windows_knob_from_python_and_text(value):
    with Simulator() as sim:
        sim.set_defaults(windows=value)
        assert requests.post(sim.url + "/_sim/defaults", json={}).json()["windows"].startswith("{")
