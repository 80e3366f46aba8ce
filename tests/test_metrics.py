"""GET /metrics, parsed back by a small Prometheus text-format parser."""

import json
import re

import requests

from .helpers import make_settings, running_gateway, wait_until

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value}, and the declared types."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, labels, value = match.groups()
        pairs = frozenset((k, v.encode().decode("unicode_escape")) for k, v in LABEL.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples, types


def find(samples, name, **labels):
    want = set(labels.items())
    return [v for (n, pairs), v in samples.items() if n == name and want <= set(pairs)]


def test_metrics_parse_back(sim, home):
    (home / "config.json").write_text(json.dumps({"guards": {"budgets": [{"usd": 10, "window": "1d"}]}}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        base = f"http://127.0.0.1:{gateway.port}"
        for _ in range(3):
            requests.post(base + "/v1/messages", json={"model": "claude-opus-4-5"}, headers={"x-api-key": "k"})
        requests.post(base + "/v1/messages", json={"model": "claude-opus-4-5"},
                      headers={"x-api-key": "k", "x-sim-claim": "overage"})
        requests.post(base + "/v1/messages", json={"model": "claude-opus-4-5"}, headers={"x-api-key": "k"})
        assert wait_until(lambda: gateway.store.summary()["requests"] == 5)
        resp = requests.get(base + "/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples, types = parse(resp.text)
    assert types["dario_requests_total"] == "counter" and types["dario_request_duration_seconds"] == "histogram"
    assert find(samples, "dario_requests_total", model="claude-opus-4-5", bucket="subscription", outcome="ok") == [3]
    assert find(samples, "dario_requests_total", bucket="extra_usage") == [1]
    assert find(samples, "dario_requests_total", outcome="halted") == [1]
    assert sum(find(samples, "dario_tokens_total", kind="output")) == 4 * 6
    assert find(samples, "dario_guard_halted", account="") == [1]
    assert find(samples, "dario_guard_trips_total", reason="overage_detected") == [1]
    assert find(samples, "dario_spend_usd", account="*", window="1d")[0] > 0
    buckets = sorted((float(dict(pairs)["le"].replace("+Inf", "inf")), v) for (n, pairs), v in samples.items()
                     if n == "dario_request_duration_seconds_bucket")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 5
    assert find(samples, "dario_request_duration_seconds_count") == [5]


def test_metrics_need_the_key(sim, home):
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": "k"})) as gateway:
        base = f"http://127.0.0.1:{gateway.port}"
        assert requests.get(base + "/metrics").status_code == 401
        assert requests.get(base + "/metrics", headers={"x-dario-api-key": "k"}).status_code == 200


def test_window_series_from_hostile_header_text_parse_back(sim, home):
    """A window's status is upstream text: quotes and backslashes in it stay inside its label."""
    from prometheus_client.parser import text_string_to_metric_families

    status = 'rej"ected\\ {x="1"}'
    windows = {"7d_sonnet": {"utilization": "0.5", "status": status, "reset": "1790000000"},
               "overage": {"disabled-reason": 'no "credits"'}}
    with running_gateway(make_settings(home, sim.url)) as gateway:
        base = f"http://127.0.0.1:{gateway.port}"
        requests.post(base + "/v1/messages", json={"model": "claude-opus-4-5"},
                      headers={"x-api-key": "k", "x-sim-windows": json.dumps(windows)})
        assert wait_until(lambda: gateway.store.summary()["requests"] == 1)
        text = requests.get(base + "/metrics").text
    samples, types = parse(text)
    assert types["dario_window_utilization"] == "gauge"
    assert find(samples, "dario_window_utilization", window="7d_sonnet") == [0.5]
    assert find(samples, "dario_window_status", window="7d_sonnet", status=status) == [1]
    parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert parsed[("dario_window_status", (("status", status), ("window", "7d_sonnet")))] == 1
    assert parsed[("dario_window_reset_timestamp_seconds", (("window", "7d_sonnet"),))] == 1790000000
    assert parsed[("dario_overage_disabled", (("reason", 'no "credits"'),))] == 1
