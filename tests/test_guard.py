"""The guard's state machine, with fake time and manual timers."""

import json
import os
import stat

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dario_lib import guard as guard_mod
from dario_lib.config import GuardConfig
from dario_lib.events import EventBus
from dario_lib.guard import Guard
from dario_lib.statefile import StateFile

from .helpers import FakeClock, RecordingNotifier, TimerFactory

REQUEST = {"timestamp": 1, "model": "claude-opus-4-5", "account": "key:abcd1234", "claim": "overage",
           "path": "/v1/messages", "requestId": "req_1"}


def rate(bucket, claim="overage", **values):
    """A parse_ratelimit()-shaped dict; a non-subscription bucket carries its claim's signal."""
    signal = f"representative-claim={claim}" if bucket in ("extra_usage", "api", "other") else None
    return {"bucket": bucket, "claim": claim, "billingSignal": signal, **values}


class RecordingAlerts:
    def __init__(self):
        self.events = []

    def send(self, event):
        self.events.append(event)


class Rig:
    def __init__(self, tmp_path, resume_command="dario resume", **config):
        self.clock = FakeClock()
        self.timers = TimerFactory()
        self.bus = EventBus()
        self.events = self.bus.subscribe()
        self.notifier = RecordingNotifier()
        self.alerts = RecordingAlerts()
        self.file = StateFile(str(tmp_path / "guard-state.json"))
        self.guard = Guard(GuardConfig(**config), bus=self.bus, notifier=self.notifier, alerts=self.alerts,
                           state_file=self.file, clock=self.clock, timer_factory=self.timers,
                           resume_command=resume_command)

    def drain_events(self):
        out = []
        while True:
            item = self.events.get(0)
            if item is None or item[0] == "timeout":
                return out
            out.append(item)


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def test_subscription_and_unknown_never_trip(rig):
    for bucket in ("subscription", "subscription_fallback", "unknown"):
        assert rig.guard.observe(rate(bucket), REQUEST) is None
    assert rig.guard.check() is None and rig.drain_events() == []


@pytest.mark.parametrize("bucket", ["extra_usage", "api", "other"])
def test_non_subscription_halts_once(rig, bucket):
    halt = rig.guard.observe(rate(bucket), REQUEST)
    assert halt is not None and rig.guard.check() == halt
    assert halt.since == 1_700_000_000_000 and halt.cooldown_until == halt.since + 1_800_000
    assert halt.reason == "overage_detected" and dict(halt.request) == REQUEST and halt.account is None
    assert rig.guard.observe(rate(bucket), REQUEST) is None          # fires once
    events = rig.drain_events()
    assert [name for name, _ in events] == ["overage_halt"]
    assert events[0][1] == halt.public()
    assert len(rig.notifier.calls) == 1 and "overage" in rig.notifier.calls[0][1]
    assert len(rig.timers.timers) == 1 and rig.timers.last.daemon is True
    assert rig.timers.last.interval == 1800


def test_manual_resume_cancels_timer_and_emits(rig):
    halt = rig.guard.observe(rate("extra_usage"), REQUEST)
    rig.clock.advance(5)
    was, resumed_at = rig.guard.clear("manual")
    assert was is True and resumed_at == halt.since + 5000
    assert rig.timers.last.cancelled
    assert rig.guard.check() is None
    assert rig.drain_events()[-1] == ("overage_resume", {
        "reason": "manual", "previousSince": halt.since, "resumedAt": resumed_at, "account": None,
        "previousReason": "overage_detected"})
    assert rig.guard.clear("manual")[0] is False                # no-op, no event
    assert rig.drain_events() == []


def test_cooldown_clears(rig):
    rig.guard.observe(rate("extra_usage"), REQUEST)
    rig.clock.advance(1800)
    rig.timers.last.fire()
    assert rig.guard.check() is None
    assert rig.drain_events()[-1][1]["reason"] == "cooldown"
    assert not os.path.exists(rig.file.path)


def test_stale_timer_cannot_clear_a_newer_halt(rig):
    rig.guard.observe(rate("extra_usage"), REQUEST)
    old_timer = rig.timers.last
    rig.guard.clear("manual")
    newer = rig.guard.observe(rate("api"), REQUEST)
    old_timer.fire()                     # fires late, after cancel()
    assert rig.guard.check() == newer
    rig.timers.last.fire()
    assert rig.guard.check() is None


def test_cooldown_zero_means_manual_only(tmp_path):
    rig = Rig(tmp_path, cooldown_ms=0)
    halt = rig.guard.observe(rate("extra_usage"), REQUEST)
    assert halt.cooldown_until is None and rig.timers.timers == []
    headers, body = rig.guard.blocked_response(halt, halt.since)
    assert "Retry-After" not in headers
    assert "automatic resume is off" in body["error"]["message"]


def test_blocked_response_says_how_to_resume(rig):
    halt = rig.guard.observe(rate("extra_usage"), REQUEST)
    headers, body = rig.guard.blocked_response(halt, halt.since + 10_000)
    assert headers == {"x-should-retry": "false", "Retry-After": "1790"}
    assert body["type"] == "error" and body["error"]["type"] == "dario_overage_guard"
    message = body["error"]["message"]
    assert message.startswith("dario halted to prevent API-rate bleed.")
    assert "billed to extra usage (signal representative-claim=overage)" in message
    assert "dario resume" in message
    assert guard_mod.iso(halt.cooldown_until) in message


def test_admit_answers_a_halt_a_refusal_or_a_ticket_to_settle(rig, tmp_path):
    from dario_lib.budgets import Budgets, Ledger
    from dario_lib.config import Budget
    book = Budgets([Budget("*", 1.0, "1d", 86_400_000)], Ledger(str(tmp_path / "ledger.jsonl")), rig.guard,
                   rig.clock)
    assert rig.guard.admit("k") == guard_mod.GO                     # no budgets: nothing to hold
    first, second = rig.guard.admit("k", book, 0.6), rig.guard.admit("k", book, 0.5)
    assert first.response is None and first.ticket.budgets is book and first.ticket.worst_usd == 0.6
    headers, body = rig.guard.admit("k", book, 0.1).response         # 1.1 held fills the $1 budget
    assert headers == {"Retry-After": "5"} and "fully committed" in body["error"]["message"]
    first.ticket.settle("k", float("nan"), {})      # a cost that is not a number charges the worst case
    second.ticket.settle("k", 0.1, {})
    assert book.status()[0]["spentUsd"] == pytest.approx(0.7) and book.status()[0]["reservedUsd"] == 0
    rig.guard.observe(rate("api", claim="api"), REQUEST)
    headers, body = rig.guard.admit("k", book, 0.1).response
    assert headers["x-should-retry"] == "false" and body["error"]["type"] == "dario_overage_guard"
    assert book.status()[0]["reservedUsd"] == 0                     # a halted request holds nothing


def test_warn_never_halts_and_notifies_once_a_minute(tmp_path):
    rig = Rig(tmp_path, behavior="warn")
    for _ in range(3):
        assert rig.guard.observe(rate("extra_usage"), REQUEST) is None
    assert rig.guard.check() is None
    assert [n for n, _ in rig.drain_events()] == ["overage_warn"] * 3
    assert len(rig.notifier.calls) == 1
    rig.clock.advance(61)
    rig.guard.observe(rate("other"), REQUEST)
    assert len(rig.notifier.calls) == 2 and rig.guard.warnings == 4


def test_disabled_detects_nothing(tmp_path):
    rig = Rig(tmp_path, enabled=False)
    assert rig.guard.observe(rate("extra_usage"), REQUEST) is None
    assert rig.guard.check() is None and rig.drain_events() == [] and rig.notifier.calls == []


def test_halt_is_saved_privately_and_removed_on_resume(rig):
    halt = rig.guard.observe(rate("extra_usage"), REQUEST)
    saved = json.loads(open(rig.file.path).read())
    assert saved == {"halts": [halt.public()]}
    assert stat.S_IMODE(os.stat(rig.file.path).st_mode) == 0o600
    rig.guard.clear()
    assert not os.path.exists(rig.file.path)


def test_restart_keeps_halt_and_its_cooldown_end(tmp_path):
    first = Rig(tmp_path)
    halt = first.guard.observe(rate("extra_usage"), REQUEST)
    second = Rig(tmp_path)
    second.clock.advance(600)
    second.guard.start()
    restored = second.guard.check()
    assert restored.since == halt.since and restored.cooldown_until == halt.cooldown_until
    assert second.timers.last.interval == 1200
    assert second.drain_events()[0][0] == "overage_halt"


def test_restart_after_expiry_clears_as_cooldown(tmp_path):
    Rig(tmp_path).guard.observe(rate("extra_usage"), REQUEST)
    later = Rig(tmp_path)
    later.clock.advance(1801)
    later.guard.start()
    assert later.guard.check() is None
    assert not os.path.exists(later.file.path)


@pytest.mark.parametrize("config", [{"enabled": False}, {"behavior": "warn"}])
def test_saved_halt_cleared_when_operator_chose_off_or_warn(tmp_path, config, caplog):
    Rig(tmp_path).guard.observe(rate("extra_usage"), REQUEST)
    later = Rig(tmp_path, **config)
    later.guard.start()
    assert later.guard.check() is None and not os.path.exists(later.file.path)
    assert "cleared because the overage guard is" in caplog.text


@pytest.mark.parametrize("content", ["{broken", "[]", '{"since": "yesterday"}', '{"since": 1, "cooldownUntil": "x"}'])
def test_corrupt_state_file_fails_closed_until_resume(tmp_path, content, caplog):
    (tmp_path / "guard-state.json").write_text(content)
    rig = Rig(tmp_path)
    rig.guard.start()
    halt = rig.guard.check()
    assert halt is not None and halt.reason == "state_file_corrupt" and halt.cooldown_until is None
    assert (tmp_path / "guard-state.json").read_text() == content       # evidence kept
    assert "unreadable" in caplog.text
    _, body = rig.guard.blocked_response(halt, 0)
    assert "dario resume" in body["error"]["message"]
    assert rig.guard.clear()[0] is True
    assert rig.guard.check() is None and not (tmp_path / "guard-state.json").exists()


def test_sibling_gateways_share_halt_and_resume(tmp_path):
    a, b = Rig(tmp_path), Rig(tmp_path)
    a.guard.start()
    b.guard.start()
    halt = a.guard.observe(rate("extra_usage"), REQUEST)
    seen = b.guard.check()
    assert seen is not None and seen.since == halt.since
    b.guard.clear("manual")
    assert a.guard.check() is None
    assert a.drain_events()[-1][1]["reason"] == "external"


def test_unwritable_home_keeps_halt_in_memory_and_says_so(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rig = Rig(tmp_path)
    rig.guard._file = StateFile(str(blocker / "guard-state.json"))
    halt = rig.guard.observe(rate("extra_usage"), REQUEST)
    assert rig.guard.check() == halt
    assert "COULD NOT SAVE THE HALT" in caplog.text


# -- billing signals, wording, adopted halts ------------------------------------------

def test_trips_on_the_billing_signal_not_the_bucket(rig):
    # overage-in-use on a subscription claim: parse_ratelimit names the signal.
    signalled = {"bucket": "extra_usage", "claim": "five_hour", "billingSignal": "overage-in-use=true"}
    halt = rig.guard.observe(signalled, dict(REQUEST, claim="five_hour"))
    assert halt is not None and dict(halt.detail) == {"claim": "five_hour", "signal": "overage-in-use=true"}
    assert rig.drain_events()[0][1]["detail"]["signal"] == "overage-in-use=true"


def test_no_signal_no_trip_whatever_the_bucket_says(rig):
    assert rig.guard.observe({"bucket": "other", "claim": "x", "billingSignal": None}, REQUEST) is None
    assert rig.guard.check() is None


def test_warn_mode_warns_on_the_signal(tmp_path):
    rig = Rig(tmp_path, behavior="warn")
    signal = "status=rejected+overage-status=allowed"
    assert rig.guard.observe({"bucket": "extra_usage", "claim": "seven_day", "billingSignal": signal},
                             REQUEST) is None
    (name, event), = rig.drain_events()
    assert name == "overage_warn" and event["detail"] == {"claim": "seven_day", "signal": signal}
    assert rig.notifier.calls == [("dario warning", "Served from extra usage; still forwarding")]


def test_every_message_names_the_resume_command_it_was_given(tmp_path, caplog):
    command = "python3 /opt/dario/dario.py resume --port=4000"
    rig = Rig(tmp_path, resume_command=command)
    halt = rig.guard.observe(rate("api", claim="api"), dict(REQUEST, claim="api"))
    _, body = rig.guard.blocked_response(halt, halt.since)
    assert f"run `{command}` in another terminal" in body["error"]["message"]
    assert "billed as API usage" in body["error"]["message"]
    assert f"Run `{command}`" in caplog.text and "billed as API usage" in caplog.text
    assert rig.notifier.calls == [("dario halted", f"Billed as API usage (representative-claim=api). Resume: {command}")]
    (alert,) = rig.alerts.events
    assert alert["event"] == "halt" and alert["resumeCommand"] == command
    assert alert["detail"] == {"claim": "api", "signal": "representative-claim=api"}


def test_an_account_halt_names_the_account_shell_quoted(tmp_path):
    rig = Rig(tmp_path, scope="account")
    halt = rig.guard.observe(rate("extra_usage"), dict(REQUEST, account="team a; rm -rf ~"))
    _, body = rig.guard.blocked_response(halt, halt.since)
    assert "run `dario resume --account='team a; rm -rf ~'` in another terminal" in body["error"]["message"]
    assert rig.alerts.events[0]["resumeCommand"] == "dario resume --account='team a; rm -rf ~'"


def test_a_restart_says_starting_halted_once_without_a_second_alarm(tmp_path, caplog):
    Rig(tmp_path).guard.observe(rate("extra_usage"), REQUEST)
    caplog.clear()
    later = Rig(tmp_path, resume_command="dario resume --port=4000")
    later.guard.start()
    assert later.guard.check() is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("STARTING HALTED")
    assert "billed to extra usage" in lines[0] and "`dario resume --port=4000`" in lines[0]
    assert later.notifier.calls == [] and later.alerts.events == []
    assert [name for name, _ in later.drain_events()] == ["overage_halt"]      # the TUI still sees it


def test_a_halt_adopted_from_a_sibling_is_one_line_not_a_second_alarm(tmp_path, caplog):
    a, b = Rig(tmp_path), Rig(tmp_path)
    a.guard.start()
    b.guard.start()
    a.guard.observe(rate("extra_usage"), REQUEST)
    caplog.clear()
    assert b.guard.check() is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("HALTED by another gateway sharing")
    assert b.notifier.calls == [] and b.alerts.events == []


OPS = st.lists(st.sampled_from(["trip", "resume", "fire_last", "fire_all", "tick"]), max_size=40)


@hsettings(max_examples=150, deadline=None)
@given(OPS)
def test_halt_resume_cooldown_races_stay_consistent(tmp_path_factory, ops):
    rig = Rig(tmp_path_factory.mktemp("race"))
    for op in ops:
        if op == "trip":
            rig.guard.observe(rate("extra_usage"), REQUEST)
        elif op == "resume":
            rig.guard.clear("manual")
        elif op == "fire_last" and rig.timers.timers:
            rig.timers.last.fire()
        elif op == "fire_all":
            for timer in list(rig.timers.timers):
                timer.fire()
        else:
            rig.clock.advance(900)
        halt = rig.guard.check()
        on_disk = os.path.exists(rig.file.path)
        assert on_disk == (halt is not None)
        if halt is not None:
            assert json.loads(open(rig.file.path).read())["halts"][0]["since"] == halt.since
            assert rig.guard._timers[None] is not None and not rig.guard._timers[None].cancelled
    events = [name for name, _ in rig.drain_events()]
    # Halts and resumes alternate, starting with a halt.
    for i, name in enumerate(events):
        assert name == ("overage_halt" if i % 2 == 0 else "overage_resume")
