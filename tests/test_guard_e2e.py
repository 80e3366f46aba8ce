"""The overage guard end to end: real gateway, simulator and clients over sockets."""

import json

import anthropic
import pytest
import requests

from .helpers import (TimerFactory, hammer_until_halt, make_settings, running_gateway,
                      sse_events, wait_until)

MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
OVERAGE = {"x-sim-claim": "overage"}


def url(gateway, path):
    return f"http://127.0.0.1:{gateway.port}{path}"


def post(gateway, path="/v1/messages", headers=None, body=MESSAGE, **kwargs):
    return requests.post(url(gateway, path), json=body, headers={"x-api-key": "k", **(headers or {})}, **kwargs)


def health(gateway):
    return requests.get(url(gateway, "/health")).json()["guard"]


def test_overage_mid_stream_blocks_a_concurrent_request_while_the_stream_runs(gateway, sim):
    trigger = post(gateway, headers={**OVERAGE, "x-sim-delay-ms": "100", "x-sim-events": "8"},
                   body=dict(MESSAGE, stream=True), stream=True)
    assert trigger.status_code == 200            # headers are in; the body is still coming
    assert health(gateway) == "halted"
    blocked = post(gateway)
    assert blocked.status_code == 503
    assert blocked.headers["x-should-retry"] == "false" and int(blocked.headers["Retry-After"]) > 1700
    error = blocked.json()["error"]
    assert error["type"] == "dario_overage_guard" and "dario resume" in error["message"]
    for path in ("/v1/complete", "/v1/chat/completions"):
        assert post(gateway, path).status_code == 503
    # The triggering stream is relayed in full.
    events = sse_events(trigger.text)
    assert events[-1][0] == "message_stop" and len([e for e in events if e[0] == "content_block_delta"]) == 8
    assert len(sim.requests) == 1
    # Everything that is not a generation keeps working while halted.
    assert post(gateway, "/v1/messages/count_tokens").status_code == 200
    assert requests.get(url(gateway, "/v1/models"), headers={"x-api-key": "k"}).status_code == 200
    for path in ("/health", "/status", "/analytics", "/admin/resume"):
        assert requests.get(url(gateway, path)).status_code == 200
    assert wait_until(lambda: gateway.store.summary()["outcomes"]["ok"] == 3)
    assert gateway.store.summary()["outcomes"]["halted"] == 3


@pytest.mark.parametrize("claim", ["api", "brand_new_billing_mode"])
def test_api_and_unknown_new_claims_halt(gateway, claim):
    post(gateway, headers={"x-sim-claim": claim})
    assert post(gateway).status_code == 503


@pytest.mark.parametrize("claim", ["five_hour_overage_included", "seven_day_fallback", "none"])
def test_subscription_fallback_and_absent_claims_never_halt(gateway, claim):
    post(gateway, headers={"x-sim-claim": claim})
    assert post(gateway).status_code == 200 and health(gateway) == "normal"


def test_configured_subscription_claim_does_not_halt(sim, home):
    (home / "config.json").write_text(json.dumps({"overageGuard": {"subscriptionClaims": ["ten_hour"]}}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway, headers={"x-sim-claim": "ten_hour"})
        assert health(gateway) == "normal"
        assert wait_until(lambda: gateway.store.snapshot())
        assert gateway.store.snapshot()[-1]["bucket"] == "subscription"


def test_upstream_errors_without_claim_never_halt(gateway):
    for headers in ({"x-sim-http-status": "529", "x-sim-claim": "none"},
                    {"x-sim-fail": "die_mid_stream", "x-sim-claim": "none"}):
        post(gateway, headers=headers, body=dict(MESSAGE, stream=True))
    assert health(gateway) == "normal"


def test_an_error_status_with_overage_claim_still_halts(gateway):
    assert post(gateway, headers={**OVERAGE, "x-sim-http-status": "429"}).status_code == 429
    assert health(gateway) == "halted"


def test_no_request_reaches_upstream_after_the_halt_under_32_clients(gateway, sim):
    figures = hammer_until_halt(gateway, sim)
    assert figures["total"] > 50
    assert figures["late"] == []                 # the halt-to-block figure: zero
    assert len(figures["sent_after"]) > 10
    assert sorted(figures["blocked_after"]) == sorted(figures["sent_after"])


def test_halt_survives_a_restart_with_its_cooldown_end(sim, home):
    with running_gateway(make_settings(home, sim.url)) as first:
        post(first, headers=OVERAGE)
        state = requests.get(url(first, "/admin/resume")).json()["state"]
    with running_gateway(make_settings(home, sim.url)) as second:
        assert health(second) == "halted"
        again = requests.get(url(second, "/admin/resume")).json()
        assert again["state"]["since"] == state["since"]
        assert again["state"]["cooldownUntil"] == state["cooldownUntil"]
        assert post(second).status_code == 503
        assert len(sim.requests) == 1


def test_anthropic_sdk_gets_a_503_that_says_how_to_resume_and_does_not_retry(gateway, sim):
    post(gateway, headers=OVERAGE)
    client = anthropic.Anthropic(api_key="k", base_url=url(gateway, ""), max_retries=2)
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MESSAGE["messages"])
    client.close()
    assert err.value.status_code == 503
    assert "dario resume" in str(err.value) and "dario_overage_guard" in str(err.value)
    assert gateway.store.summary()["outcomes"]["halted"] == 1      # x-should-retry: false honoured


def test_admin_resume_endpoints(gateway):
    state = requests.get(url(gateway, "/admin/resume")).json()
    assert state == {"halted": False, "state": None, "halts": [], "config": {
        "enabled": True, "behavior": "halt", "cooldownMs": 1800000, "notifyOs": True}}
    post(gateway, headers=OVERAGE)
    state = requests.get(url(gateway, "/admin/resume")).json()
    assert state["halted"] is True and state["state"]["request"]["claim"] == "overage"
    assert state["state"]["request"]["model"] == "claude-opus-4-5"
    assert state["state"]["reason"] == "overage_detected"
    refused = requests.post(url(gateway, "/admin/resume"), data="{}", headers={"Content-Type": "text/plain"})
    assert refused.status_code == 415 and health(gateway) == "halted"
    resumed = requests.post(url(gateway, "/admin/resume"), json={})
    assert resumed.json()["ok"] is True and resumed.json()["wasHalted"] is True
    assert resumed.json()["resumedAt"].endswith("Z")
    assert health(gateway) == "normal" and post(gateway).status_code == 200
    assert requests.post(url(gateway, "/admin/resume"), json={}).json()["wasHalted"] is False


def test_cooldown_resumes_through_the_timer(sim, home):
    timers = TimerFactory()
    with running_gateway(make_settings(home, sim.url, flags={"overageGuard.cooldownMs": "60000"}),
                         timer_factory=timers) as gateway:
        post(gateway, headers=OVERAGE)
        assert timers.last.interval == 60 and health(gateway) == "halted"
        timers.last.fire()
        assert health(gateway) == "normal"
        assert not (home / "guard-state.json").exists()


def test_warn_mode_keeps_flowing(sim, home):
    with running_gateway(make_settings(home, sim.url, flags={"overageGuard.behavior": "warn"})) as gateway:
        for _ in range(3):
            assert post(gateway, headers=OVERAGE).status_code == 200
        assert health(gateway) == "normal" and gateway.guard.warnings == 3
        assert len(gateway.notifier.calls) == 1


def test_disabled_guard_detects_nothing(sim, home):
    with running_gateway(make_settings(home, sim.url, flags={"overageGuard.enabled": False})) as gateway:
        post(gateway, headers=OVERAGE)
        assert post(gateway).status_code == 200 and gateway.notifier.calls == []


def test_halt_notifies_and_logs_loudly(gateway, caplog):
    post(gateway, headers=OVERAGE)
    assert len(gateway.notifier.calls) == 1
    assert "OVERAGE GUARD HALTED" in caplog.text and "'overage'" in caplog.text
