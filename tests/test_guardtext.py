"""guardtext: how halts and warnings are worded, and the resume command a user can paste."""

import os
import re
import subprocess
import sys

import pytest
import requests
from hypothesis import given, strategies as st

from dario_lib import guardtext
from dario_lib.guardtext import (blocked_response, cause, halt_notification, how_to_resume, iso,
                                 refusal_response, resume_command, title)

from .helpers import make_settings, running_gateway

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARIO_PY = os.path.join(ROOT, "dario.py")
SINCE = 1_700_000_000_000
REQUEST = {"timestamp": 1, "model": "claude-opus-4-5", "account": "key:abcd1234", "claim": "five_hour",
           "path": "/v1/messages", "requestId": "req_1"}


def halt(reason="overage_detected", detail=None, account=None, until=SINCE + 1_800_000, request=REQUEST):
    return {"since": SINCE, "cooldownUntil": until, "reason": reason, "request": dict(request),
            "account": account, "detail": dict(detail or {})}


# -- titles say what happened ------------------------------------------------------

@pytest.mark.parametrize("reason, detail, expected", [
    ("overage_detected", {"claim": "api", "signal": "representative-claim=api"}, "billed as API usage"),
    ("overage_detected", {"claim": "overage", "signal": "representative-claim=overage"}, "billed to extra usage"),
    ("overage_detected", {"claim": "ten_hour", "signal": "representative-claim=ten_hour"},
     "billed outside the subscription (claim 'ten_hour')"),
    ("overage_detected", {"claim": "five_hour", "signal": "overage-in-use=true"}, "served from extra usage"),
    ("overage_detected", {"claim": "five_hour", "signal": "status=rejected+overage-status=allowed"},
     "served from extra usage"),
    ("overage_detected", {"claim": "overage"}, "billed to extra usage"),       # a halt saved before signals
    ("utilization_threshold", {"metric": "util5h", "value": 0.96, "threshold": 0.95},
     "5-hour utilization at 96% (halt at 95%)"),
    ("utilization_threshold", {"metric": "util7d", "value": 0.9, "threshold": 0.9},
     "7-day utilization at 90% (halt at 90%)"),
    ("status_rejected", {"status": "rejected"}, "unified rate-limit status 'rejected'"),
    ("budget_exceeded", {"spentUsd": 1.02, "budgetUsd": 1, "window": "1d", "budgetAccount": "*"},
     "spent $1.02 of the $1.00 budget per 1d for all accounts"),
    ("budget_exceeded", {"spentUsd": 3, "budgetUsd": 2.5, "window": "12h", "budgetAccount": "team"},
     "spent $3.00 of the $2.50 budget per 12h for account team"),
    ("budget_ledger_error", {"error": "x"}, "the spend ledger cannot be trusted"),
    ("extra_usage_cap", {"spentUsd": 5.02, "capUsd": 5, "window": "1d", "capAccount": "*"},
     "extra usage $5.02 of the $5.00 cap per 1d for all accounts"),
    ("extra_usage_cap", {"spentUsd": 1.2, "capUsd": 1, "window": "12h", "capAccount": "key:abcd1234"},
     "extra usage $1.20 of the $1.00 cap per 12h for account key:abcd1234"),
    ("state_file_corrupt", {"error": "x"}, "the saved guard state is unreadable"),
    ("something_new", {}, "something new"),
])
def test_each_halt_title_says_what_happened(reason, detail, expected):
    assert title(halt(reason, detail)) == expected


def test_a_warning_title_names_the_warn_threshold():
    event = {"timestamp": 1, "reason": "utilization_threshold", "request": REQUEST,
             "detail": {"metric": "util5h", "value": 0.85, "threshold": 0.8}}
    assert title(event) == "5-hour utilization at 85% (warn at 80%)"
    event = {"timestamp": 1, "reason": "budget_warning", "request": REQUEST,
             "detail": {"spentUsd": 0.51, "budgetUsd": 1, "window": "1d", "budgetAccount": "*", "warnAt": 0.5}}
    assert title(event) == "spent $0.51 of the $1.00 budget per 1d for all accounts (warn at 50%)"
    event = {"timestamp": 1, "reason": "extra_usage_warning", "request": REQUEST,
             "detail": {"spentUsd": 4.1, "capUsd": 5, "window": "1d", "capAccount": "*", "warnAt": 0.8}}
    assert title(event) == "extra usage $4.10 of the $5.00 cap per 1d for all accounts (warn at 80%)"
    assert guardtext.warn_line(event).startswith("GUARD WARNING (extra_usage_warning): extra usage $4.10")


def test_the_cause_names_the_request_and_the_evidence():
    assert cause(halt(detail={"claim": "five_hour", "signal": "overage-in-use=true"})) == (
        "claude-opus-4-5 (account key:abcd1234) was served from extra usage "
        "(signal overage-in-use=true; representative-claim 'five_hour')")
    assert cause(halt(detail={"claim": "api", "signal": "representative-claim=api"})) == (
        "claude-opus-4-5 (account key:abcd1234) was billed as API usage (representative-claim 'api')")
    assert cause(halt("budget_ledger_error", {"error": "line 3 is not a ledger entry"})) == (
        "the spend ledger cannot be trusted (line 3 is not a ledger entry)")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
                    max_leaves=10)
FIELDS = st.fixed_dictionaries({}, optional={
    "since": JSON, "cooldownUntil": JSON, "account": JSON, "timestamp": JSON,
    "reason": st.sampled_from(list(guardtext.REASON_NAMES) + ["x"]) | JSON,
    "request": st.dictionaries(st.sampled_from(["model", "account", "claim"]), JSON) | JSON,
    "detail": st.dictionaries(st.sampled_from(["claim", "signal", "metric", "value", "threshold", "spentUsd",
                                               "budgetUsd", "window", "budgetAccount", "warnAt", "error",
                                               "status", "capUsd", "capAccount"]), JSON) | JSON})


@given(st.one_of(FIELDS, JSON))
def test_no_function_raises_on_whatever_a_remote_gateway_sends(item):
    for fn in (title, cause, how_to_resume, guardtext.halt_line, guardtext.starting_halted_line,
               guardtext.warn_line, guardtext.warn_notification, halt_notification,
               lambda h: guardtext.resume_line(h, h), lambda h: guardtext.shared_halt_line(h, "/x"),
               lambda h: blocked_response(h, 0), lambda h: refusal_response(h, 1, 2),
               lambda h: guardtext.reason_name(h), lambda h: guardtext.cap_refusal_response(h, 1, 2)):
        assert isinstance(fn(item), (str, tuple))
    assert isinstance(guardtext.extra_usage_lines(item, item), list)
    assert isinstance(guardtext.extra_usage_lines({"usd": 5, "caps": item}), list)


# -- the 503 and the hold-back ----------------------------------------------------------

def test_the_503_names_signal_claim_and_command():
    headers, body = blocked_response(halt(detail={"claim": "five_hour", "signal": "overage-in-use=true"}),
                                     SINCE + 10_000, "dario resume --port=4000")
    assert headers == {"x-should-retry": "false", "Retry-After": "1790"}
    error = body["error"]
    assert error["type"] == "dario_overage_guard" and error["reason"] == "overage_detected"
    assert error["message"] == (
        "dario halted to prevent API-rate bleed. A response was served from extra usage (signal "
        "overage-in-use=true; representative-claim 'five_hour'): non-subscription billing instead of your "
        "subscription pool. To resume: run `dario resume --port=4000` in another terminal, or wait until "
        f"{iso(SINCE + 1_800_000)} for the cooldown to auto-clear.")


def test_other_halts_are_dario_guard_with_their_reason_and_no_retry_after_without_cooldown():
    headers, body = blocked_response(halt("status_rejected", {"status": "rejected"}, until=None), SINCE)
    assert headers == {"x-should-retry": "false"}
    assert body["error"]["type"] == "dario_guard" and body["error"]["reason"] == "status_rejected"
    assert body["error"]["message"].endswith("run `dario resume` in another terminal (automatic resume is off).")


def test_a_budget_halt_says_when_the_window_rolls():
    _, body = blocked_response(halt("budget_exceeded", {"spentUsd": 2, "budgetUsd": 1, "window": "1h",
                                                        "budgetAccount": "*"}), SINCE)
    assert "when enough spend has aged out of the budget's window" in body["error"]["message"]


def test_an_extra_usage_cap_halt_says_why_and_when_the_window_rolls():
    headers, body = blocked_response(halt("extra_usage_cap", {"spentUsd": 5.1, "capUsd": 5, "window": "1d",
                                                              "capAccount": "*"}), SINCE)
    assert headers == {"x-should-retry": "false", "Retry-After": "1800"}
    error = body["error"]
    assert error["type"] == "dario_guard" and error["reason"] == "extra_usage_cap"
    assert error["message"].startswith("dario halted (extra_usage_cap): extra usage $5.10 of the $5.00 cap per "
                                       "1d for all accounts, seen on a claude-opus-4-5 response. Answers were "
                                       "being served from extra usage (overageGuard.allowExtraUsage)")
    assert "when enough extra-usage spend has aged out of the cap's window" in error["message"]


def test_the_extra_usage_hold_back_is_retryable_and_says_how_to_raise_the_cap():
    cap = {"usd": 5, "window": "1d", "warnAt": 0.8, "account": "key:abcd1234"}
    headers, body = guardtext.cap_refusal_response(cap, 4.5, 0.6)
    assert headers == {"Retry-After": "5"}
    assert body["error"]["reason"] == "extra_usage_cap" and body["error"]["type"] == "dario_guard"
    assert ("the $5.00 extra-usage cap per 1d for account key:abcd1234 is fully committed ($4.50 spent, $0.60 "
            "reserved by requests in flight). Retry when they finish, or raise overageGuard.allowExtraUsage.") \
        in body["error"]["message"]


def test_the_extra_usage_headroom_lines():
    extra = {"usd": 5, "window": "1d", "warnAt": 0.8, "scope": "proxy",
             "caps": [{"account": "*", "spentUsd": 1.2, "reservedUsd": 0, "inExtraUsage": False}]}
    assert guardtext.extra_usage_lines(extra) == [("extra usage $1.20 of $5.00 per 1d", "normal")]
    extra["caps"] = [{"account": "key:a", "spentUsd": 4.2, "reservedUsd": 0.3, "inExtraUsage": True},
                     {"account": "key:b", "spentUsd": 5, "reservedUsd": 0, "inExtraUsage": False}]
    assert guardtext.extra_usage_lines(extra) == [
        ("extra usage $4.20 of $5.00 per 1d for key:a (+$0.30 in flight), in use", "warn"),
        ("extra usage $5.00 of $5.00 per 1d for key:b", "bad")]
    # Only the configured cap (a gateway without the figures): it is still shown.
    assert guardtext.extra_usage_lines(None, {"usd": 5, "window": "1d", "warnAt": 0.8}) == [
        ("extra usage cap $5.00 per 1d", "normal")]
    assert guardtext.extra_usage_lines({"usd": 5, "window": "1d", "scope": "account", "caps": []}) == [
        ("extra usage cap $5.00 per 1d per account, none spent", "normal")]
    assert guardtext.extra_usage_lines(None, None) == []


def test_the_hold_back_is_retryable():
    headers, body = refusal_response({"account": "*", "usd": 1, "window": "1d", "warnAt": 0.8}, 0.9, 0.2)
    assert headers == {"Retry-After": "5"}
    assert body["error"]["type"] == "dario_guard" and body["error"]["reason"] == "budget_exceeded"
    assert "$1.00 budget per 1d for all accounts is fully committed ($0.90 spent, $0.20 reserved" \
        in body["error"]["message"]


def test_a_notification_keeps_the_resume_command_whole():
    command = "python3 /a/rather/long/path/to/a/checkout/of/dario/dario.py resume --port=40000"
    detail = {"claim": "x" * 64, "signal": "representative-claim=" + "x" * 64}
    title_text, message = halt_notification(halt(detail=detail, account="team-with-a-long-name"), command)
    assert title_text == "dario halted" and len(message) <= 200
    assert message.endswith(f"Resume: {command} --account=team-with-a-long-name")


# -- the resume command ---------------------------------------------------------------

@pytest.mark.parametrize("port, argv0, executable, expected", [
    (3456, "/usr/local/bin/dario", "/usr/bin/python3.11", "dario resume"),
    (4000, "/usr/local/bin/dario", "/usr/bin/python3.11", "dario resume --port=4000"),
    (3456, "/home/me/dario/dario.py", "/usr/bin/python3.11", "python3 /home/me/dario/dario.py resume"),
    (3457, "/home/me/dario/dario.py", "/usr/bin/python3", "python3 /home/me/dario/dario.py resume --port=3457"),
    (3456, "/home/me/my dario/dario.py", "/usr/bin/python3", "python3 '/home/me/my dario/dario.py' resume"),
    (3456, "/srv/dario/dario.py", "/srv/venv/bin/python", "python /srv/dario/dario.py resume"),
    (3456, "/srv/dario/dario.py", "/srv/venv/Scripts/python.exe", "python /srv/dario/dario.py resume"),
    (3456, "/srv/dario/dario.py", "", "python3 /srv/dario/dario.py resume"),
    (3456, "/opt/dario/dario.py", "/opt/pypy/bin/pypy3", "pypy3 /opt/dario/dario.py resume"),
])
def test_resume_command_as_this_user_can_run_it(port, argv0, executable, expected):
    assert resume_command(port, argv0=argv0, executable=executable) == expected


def test_a_relative_checkout_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert resume_command(3456, argv0="dario.py", executable="/usr/bin/python3") == f"python3 {DARIO_PY} resume"


def test_an_account_label_is_shell_quoted():
    assert guardtext.halt_command({"account": "key:abcd1234"}, "dario resume") == "dario resume --account=key:abcd1234"
    assert guardtext.halt_command({"account": "a b'c"}, "dario resume") == "dario resume --account='a b'\"'\"'c'"


def test_the_command_in_a_503_resumes_that_gateway_when_pasted_into_a_shell(sim, home, tmp_path):
    with running_gateway(make_settings(home, sim.url)) as gateway:
        requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json={"model": "m"},
                      headers={"x-sim-claim": "overage"})
        state = gateway.guard.snapshot()
        assert state is not None
        command = resume_command(gateway.port, argv0=DARIO_PY)
        _, body = blocked_response(state.public(), SINCE, command)
        pasted = re.search(r"run `([^`]+)` in another terminal", body["error"]["message"]).group(1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        done = subprocess.run(["sh", "-c", pasted], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=20)
        assert done.returncode == 0, done.stderr
        assert "Resumed at" in done.stdout
        assert gateway.guard.snapshot() is None


def test_a_checkout_gateway_on_another_port_tells_the_exact_command(sim, home, tmp_path):
    """`python3 dario.py proxy` on port N: the 503 says `python3 <abs>/dario.py resume --port=N`,
    and that pasted into a shell elsewhere resumes it (issue 12, "Say exactly what to run")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env.update(DARIO_HOME=str(home), DARIO_OVERAGE_NOTIFY="off")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([sys.executable, DARIO_PY, "proxy", "--port=0", "--upstream=" + sim.url],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                break
        port = int(found.group(1))
        base = f"http://127.0.0.1:{port}/v1/messages"
        requests.post(base, json={"model": "m"}, headers={"x-sim-claim": "overage"}, timeout=10)
        message = requests.post(base, json={"model": "m"}, timeout=10).json()["error"]["message"]
        expected = f"python3 {DARIO_PY} resume --port={port}"
        assert f"run `{expected}` in another terminal" in message
        pasted = re.search(r"run `([^`]+)` in another terminal", message).group(1)
        done = subprocess.run(["sh", "-c", pasted], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=20)
        assert done.returncode == 0 and "Resumed at" in done.stdout, done.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
