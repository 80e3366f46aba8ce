"""The guard: halt on the first response billed outside the subscription, and on the
other trip-wires (utilization thresholds, unified status, spend budgets).

A small state machine behind one lock. Each halt is keyed by what it stops: `None` for
the whole gateway (scope `proxy`, the default) or an account label (scope `account`).

- `admit(account, budgets, worst_usd)` runs right before a guarded request's upstream
  send: the halt that blocks it (`check`), else its budget reservation, as a `Verdict`
  (the 503 to answer instead, or the `budgets.Ticket` to settle). `observe()` runs when
  a response's headers arrive and decides. Both take the same lock, so a request that
  checked before a halt goes out and none that checks after it does; the upstream send
  itself happens outside the lock. (`team.TeamGuard` keeps the same promises for a team
  of gateways sharing a Redis store.)
- The overage trip fires once per halt (while halted, more overage responses are only
  recorded). Threshold trips (utilization, unified status, budgets) fire once per
  crossing: they re-arm only after the value drops back below the threshold.
- Halts are saved to `guard-state.json` (restarts keep them; gateways sharing a
  `DARIO_HOME` share them) and clear on `clear()` or when their cooldown timer fires.
  Every halt gets a new generation, so a late timer from an earlier halt (a `Timer` can
  fire after `cancel()`) cannot clear a newer one.
- The overage trip fires on the response's billing signal (`billingSignal`, see
  billing.parse_ratelimit), named in the halt's `detail.signal`.
- Capped extra usage (`overageGuard.allowExtraUsage`, only while the guard halts): an
  answer served from extra usage (`served_from_extra_usage`) does not halt; it puts its
  halt key (the account in `account` scope, everyone in `proxy` scope) "in extra usage"
  until an answer comes from the subscription again. While in extra usage, `admit()`
  asks the budgets to reserve each request's worst case against the cap too, and the
  settled costs of extra-usage answers trip the cap like a budget (`extra_usage_warning`
  at warnAt, `extra_usage_cap` at the cap, with the roll time as cooldown). A resume
  lets extra usage go on past the cap (the crossing stays recorded, as a budget's)
  until an answer comes from the subscription: that re-arms the cap, so the next
  extra-usage request past it halts again. Other signals (`api`, unknown claims) halt
  at once, as without a cap.
- Events go to the bus under the lock (so they keep their order); loud log lines,
  desktop notifications and alert channels run after the lock is released. Their words
  come from guardtext; a halt adopted from the state file is not announced again.

Time is injected (`clock` in seconds, `timer_factory` shaped like `threading.Timer`).
Thread-safe: every public method may be called from any thread.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from . import billing, guardtext
from .budgets import EXTRA_METRIC, Refusal, Ticket
from .guardtext import iso
from .statefile import ABSENT, CORRUPT

log = logging.getLogger(__name__)

BLOCKED_PATHS = frozenset({"/v1/messages", "/v1/complete", "/v1/chat/completions"})
WARN_NOTIFY_INTERVAL_S = 60
OVERAGE = guardtext.OVERAGE
UTILIZATION = guardtext.UTILIZATION
STATUS_REJECTED = guardtext.STATUS_REJECTED
STATUS_WARNING = guardtext.STATUS_WARNING
BUDGET = guardtext.BUDGET
BUDGET_WARNING = guardtext.BUDGET_WARNING
EXTRA_CAP = guardtext.EXTRA_CAP
CORRUPT_REASON = guardtext.CORRUPT
# Halts the overage guard itself makes: cleared when it no longer halts (disabled, warn mode).
OVERAGE_REASONS = frozenset({OVERAGE, EXTRA_CAP})
ALL = object()          # clear(): every halt
_UNREAD = object()       # _sync_locked(): the caller took no signature


@dataclass(frozen=True)
class Halt:
    since: int                        # epoch ms
    cooldown_until: int               # epoch ms, or None: manual resume only
    reason: str
    request: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    generation: int = 0
    account: str = None               # None: the whole gateway
    detail: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    id: str = None                    # a team's halt (Redis store): its id ...
    gateway: str = None               # ... and the gateway that made it

    def public(self):
        public = {"since": self.since, "cooldownUntil": self.cooldown_until, "reason": self.reason,
                  "request": dict(self.request), "account": self.account, "detail": dict(self.detail)}
        if self.id is not None:
            public["id"], public["gateway"] = self.id, self.gateway
        return public


class Verdict(NamedTuple):
    """What `admit()` says to a guarded request about to be sent."""
    response: tuple = None      # (headers, body) of the 503 it gets instead; None: send it
    ticket: Ticket = None       # the budget reservation it holds: settle it with its cost


GO = Verdict()


class Guard:
    def __init__(self, config, *, bus=None, notifier=None, alerts=None, state_file=None,
                 clock=time.time, timer_factory=threading.Timer, resume_command=guardtext.DEFAULT_COMMAND):
        self.config = config
        # The command, as the user can type it, that every message tells them to run
        # (guardtext.resume_command(port)); an account halt's messages add --account.
        self.resume_command = resume_command
        self._bus = bus
        self._notifier = notifier
        self._alerts = alerts
        self._file = state_file
        self._clock = clock
        self._timer_factory = timer_factory
        self._lock = threading.Lock()
        self._halts = {}                 # key (None or account) -> Halt
        self._timers = {}                # key -> Timer
        self._levels = {}                # (key, metric) -> "warn" | "halt": crossings seen
        self._extra = {}                 # key -> True while its last answer was served from extra usage
        self._generation = 0
        self._file_sig = None
        self._last_warn_notify = {}      # reason -> clock seconds
        self.trips = {}                  # reason -> halts so far
        self.warnings = 0

    @property
    def halting(self):
        """Does the overage trip halt (rather than warn or nothing)?"""
        return self.config.enabled and self.config.behavior == "halt"

    @property
    def extra_usage_cap(self):
        """The extra-usage cap in force (config.ExtraUsageCap), or None: without one, or
        when the guard does not halt, an extra-usage answer is treated as any overage."""
        return self.config.allow_extra_usage if self.halting else None

    def _now_ms(self):
        return int(self._clock() * 1000)

    def _key(self, account):
        return account if self.config.scope == "account" else None

    def cap_account(self, account):
        """Whose extra usage the cap counts for this account's request: its label in
        `account` scope, "*" (all traffic) in `proxy` scope."""
        key = self._key(account)
        return "*" if key is None else key

    def in_extra_usage(self, account=None):
        """Was the last answer for this account's halt key served from extra usage?"""
        with self._lock:
            return self._extra.get(self._key(account), False)

    def level(self, account, metric):
        """The threshold level recorded for (this account's halt key, metric), or None."""
        with self._lock:
            return self._levels.get((self._key(account), metric))

    # -- the request path --------------------------------------------------------

    def admit(self, account=None, budgets=None, worst_usd=0.0):
        """The Verdict for a guarded request about to be sent: the halt that blocks it,
        else (given `budgets`) the reservation of its worst-case cost (against the
        extra-usage cap too while in extra usage), or a refusal."""
        halt = self.check(account)
        if halt is not None:
            return Verdict(self.blocked_response(halt))
        if budgets is None or not budgets.active:
            return GO
        capped = self.extra_usage_cap is not None and self.in_extra_usage(account)
        held = budgets.reserve(account, worst_usd, capped=capped)
        if held is None:
            return GO
        if isinstance(held, Refusal):
            if held.past:
                halt = budgets.crossed(held) or self.check(account)
                if halt is not None:
                    return Verdict(self.blocked_response(halt))
            return Verdict(held.response())
        return Verdict(None, Ticket(budgets, held, worst_usd, capped))

    def check(self, account=None):
        """The halt blocking this account's request, or None. Called right before sending."""
        actions = []
        # The stat is a system call: take it before the lock, so the lock is held for
        # microseconds and request threads do not queue behind one another's syscalls.
        sig = self._file.signature() if self._file is not None else None
        with self._lock:
            self._sync_locked(actions, sig)
            halt = self._halts.get(None) or (self._halts.get(account) if account is not None else None)
        _run(actions)
        return halt

    def observe(self, rate, request):
        """A response's headers arrived: trip on what its rate-limit headers say.

        `rate` is `billing.parse_ratelimit()`'s dict; `request` holds {timestamp, model,
        account, claim, path, requestId}. Returns a new Halt if this response made one.
        """
        config = self.config
        signal = _billing_signal(rate)
        overage = config.enabled and signal is not None
        mode = extra_usage_mode(rate) if self.extra_usage_cap is not None else None
        if mode:
            overage = False             # served from extra usage, under the cap: the budgets count it
        crossings = self._crossings(rate)
        if not overage and not crossings and mode is None:
            return None
        key = self._key(request.get("account"))
        actions, halt = [], None
        with self._lock:
            self._sync_locked(actions)
            if mode is not None:
                self._extra_mode_locked(key, mode, actions)
            if overage:
                detail = {"claim": rate.get("claim"), "signal": signal}
                if config.behavior == "warn":
                    self._warn_locked(OVERAGE, request, detail, actions)
                elif key not in self._halts:
                    halt = self._halt_locked(OVERAGE, request, actions, key=key, detail=detail)
            for metric, level, warn_reason, halt_reason, detail in crossings:
                halt = self._cross_locked(key, metric, level, warn_reason, halt_reason, request,
                                          detail, actions) or halt
        _run(actions)
        return halt

    def _crossings(self, rate):
        """[(metric, level, warn reason, halt reason, detail)] of the threshold trips
        configured, as this response's rate-limit headers set them (level None: under)."""
        config = self.config
        out = []
        if config.utilization:
            for metric, (warn, stop) in config.utilization.items():
                value = billing.utilization(rate, metric)       # any window, by its config name
                if value is not None:
                    level = "halt" if stop is not None and value >= stop else \
                        "warn" if warn is not None and value >= warn else None
                    detail = {"metric": metric, "value": value, "threshold": stop if level == "halt" else warn}
                    out.append((metric, level, UTILIZATION, UTILIZATION, detail))
        if any(config.unified_status.values()):
            for metric, status in billing.statuses(rate):     # the unified status, then each window's
                level = ("halt" if status in config.unified_status["halt"] else
                         "warn" if status in config.unified_status["warn"] else None)
                detail = {"status": status}
                if metric.startswith("status:"):
                    detail["window"] = metric[len("status:"):]
                out.append((metric, level, STATUS_WARNING, STATUS_REJECTED, detail))
        return out

    def _extra_mode_locked(self, key, mode, actions):
        """This key's answers are (mode True) or are no longer (False) served from extra usage."""
        if self._extra.get(key, False) == mode:
            return
        self._extra[key] = mode
        cap = self.config.allow_extra_usage
        whom = "all traffic" if key is None else f"account {key}"
        if mode:
            actions.append(lambda: log.warning(
                "EXTRA USAGE: answers for %s are served from extra usage; dario goes on up to the cap "
                "(overageGuard.allowExtraUsage: $%.2f per %s)", whom, cap.usd, cap.window))
            return
        # Back on the subscription: re-arm the cap, so that going back into extra usage while
        # the window's spend is still at the cap halts again, even after a resume.
        if self._levels.get((key, EXTRA_METRIC)) == "halt":
            self._levels[(key, EXTRA_METRIC)] = "warn"
        actions.append(lambda: log.info("answers for %s come from the subscription again", whom))

    def cross(self, account, metric, level, request, detail, warn_reason, halt_reason, cooldown_until=None):
        """A threshold trip from outside (budgets): fire on an upward crossing of `level`."""
        actions = []
        with self._lock:
            halt = self._cross_locked(self._key(account), metric, level, warn_reason, halt_reason,
                                      request, detail, actions, cooldown_until)
        _run(actions)
        return halt

    def _cross_locked(self, key, metric, level, warn_reason, halt_reason, request, detail, actions,
                      cooldown_until=None):
        rank = {None: 0, "warn": 1, "halt": 2}
        previous = self._levels.get((key, metric))
        if level is None:
            self._levels.pop((key, metric), None)
            return None
        self._levels[(key, metric)] = level
        if rank[level] <= rank[previous]:
            return None                     # once per crossing
        if level == "warn":
            self._warn_locked(warn_reason, request, detail, actions)
            return None
        if key in self._halts:
            return None
        return self._halt_locked(halt_reason, request, actions, key=key, detail=detail,
                                 cooldown_until=cooldown_until)

    # -- reading and resuming ----------------------------------------------------

    def halts(self):
        """Every current halt (immutable), after noticing changes by sibling gateways."""
        actions = []
        with self._lock:
            self._sync_locked(actions)
            halts = tuple(sorted(self._halts.values(), key=lambda h: (h.account is not None, h.since)))
        _run(actions)
        return halts

    def snapshot(self):
        """The gateway-wide halt, else the oldest account halt, else None."""
        halts = self.halts()
        return halts[0] if halts else None

    def clear(self, reason="manual", account=ALL):
        """Back to normal (all halts, or one account's). Returns (was_halted, resumed_at_ms)."""
        actions = []
        with self._lock:
            self._sync_locked(actions)
            resumed_at = self._now_ms()
            keys = list(self._halts) if account is ALL else [k for k in (account,) if k in self._halts]
            for key in keys:
                self._clear_locked(key, reason, actions, resumed_at)
            if keys:
                self._save_locked(actions)
        _run(actions)
        return bool(keys), resumed_at

    def start(self):
        """Pick up halts saved by an earlier run (or a sibling gateway)."""
        if self._file is None:
            return
        actions = []
        with self._lock:
            status, data = self._file.read()
            self._file_sig = self._file.signature()
            if status == CORRUPT:
                self._fail_closed_locked(data, actions)
            elif status != ABSENT:
                kept = [h for h in data if self._honoured(h, actions)]
                for saved in kept:
                    until = saved.get("cooldownUntil")
                    if until is not None and until <= self._now_ms():
                        actions.append(lambda s=saved: log.warning(
                            "the saved halt from %s expired at %s; cleared as cooldown",
                            iso(s["since"]), iso(s["cooldownUntil"])))
                        continue
                    halt = self._adopt_locked(saved, actions)
                    actions.append(lambda h=halt: log.warning(
                        "%s", guardtext.starting_halted_line(h.public(), self.resume_command)))
                if len(self._halts) != len(data):
                    self._save_locked(actions)
        _run(actions)

    def _honoured(self, saved, actions):
        """Keep a saved halt only if the current settings would have made it."""
        if saved.get("reason", OVERAGE) not in OVERAGE_REASONS or self.halting:
            return True
        mode = "disabled" if not self.config.enabled else "in warn mode"
        actions.append(lambda: log.warning(
            "a saved halt was found in %s and cleared because the overage guard is %s",
            self._file.path, mode))
        return False

    def reconfigure(self, config):
        """New settings (config reload). An overage halt they would not make is cleared."""
        actions = []
        with self._lock:
            self.config = config
            if not self.halting:
                stale = [k for k, h in self._halts.items() if h.reason in OVERAGE_REASONS]
                for key in stale:
                    self._clear_locked(key, "config", actions)
                if stale:
                    self._save_locked(actions)
        _run(actions)

    def close(self):
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    # -- transitions (all called with the lock held) -----------------------------

    def _halt_locked(self, reason, request, actions, key=None, detail=None, since=None,
                     cooldown_until=None, persist=True, announce=True):
        """Record a halt. `announce`: the loud line, bell, notification and alert (a halt
        adopted from the state file was announced when it was made; its adopter says so
        in one line of its own)."""
        self._generation += 1
        since = self._now_ms() if since is None else since
        if persist and cooldown_until is None and self.config.cooldown_ms > 0:
            cooldown_until = since + self.config.cooldown_ms
        halt = Halt(since, cooldown_until, reason, MappingProxyType(dict(request)), self._generation,
                    key, MappingProxyType(dict(detail or {})))
        self._halts[key] = halt
        self.trips[reason] = self.trips.get(reason, 0) + 1
        if halt.cooldown_until is not None:
            self._start_timer_locked(halt)
        if persist:
            self._save_locked(actions)
        self._publish("overage_halt", halt.public())
        if announce:
            actions.append(lambda: self._announce_halt(halt))
        return halt

    def _adopt_locked(self, data, actions):
        """Take over a halt read from the state file (restart or sibling gateway)."""
        request = data.get("request") if isinstance(data.get("request"), dict) else {}
        detail = data.get("detail") if isinstance(data.get("detail"), dict) else {}
        account = data.get("account") if isinstance(data.get("account"), str) else None
        return self._halt_locked(str(data.get("reason", OVERAGE))[:64], request, actions, key=account,
                                 detail=detail, since=data["since"],
                                 cooldown_until=data.get("cooldownUntil"), persist=False, announce=False)

    def _fail_closed_locked(self, detail, actions):
        # No cooldown for a state we cannot read: only a person should clear it. This is
        # a new alarm (nobody announced it yet), so it is announced like any halt.
        self._halt_locked(CORRUPT_REASON, {}, actions, persist=False,
                          detail={"error": f"{self._file.path}: {detail}"[:300]})

    def _clear_locked(self, key, reason, actions, resumed_at=None):
        halt = self._halts.pop(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        resumed_at = self._now_ms() if resumed_at is None else resumed_at
        event = {"reason": reason, "previousSince": halt.since, "resumedAt": resumed_at,
                 "account": halt.account, "previousReason": halt.reason}
        self._publish("overage_resume", event)
        actions.append(lambda: self._announce_resume(halt, event))

    def _warn_locked(self, reason, request, detail, actions):
        self.warnings += 1
        event = {"timestamp": self._now_ms(), "reason": reason, "request": dict(request),
                 "detail": dict(detail or {})}
        self._publish("overage_warn", event)
        notify = self._may_notify_locked(reason)
        actions.append(lambda: self._announce_warn(event, notify))

    def _may_notify_locked(self, reason):
        """Desktop notifications of warnings: at most one a minute per reason."""
        now = self._clock()
        last = self._last_warn_notify.get(reason)
        if last is not None and now - last < WARN_NOTIFY_INTERVAL_S:
            return False
        self._last_warn_notify[reason] = now
        return True

    def _start_timer_locked(self, halt):
        old = self._timers.pop(halt.account, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, (halt.cooldown_until - self._now_ms()) / 1000)
        timer = self._timer_factory(delay, self._on_cooldown, args=(halt.account, halt.generation))
        timer.daemon = True        # a Timer inherits the daemon flag of its creator; be explicit
        timer.name = f"dario-cooldown-{halt.generation}"
        self._timers[halt.account] = timer
        timer.start()

    def _on_cooldown(self, key, generation):
        actions = []
        with self._lock:
            self._sync_locked(actions)
            halt = self._halts.get(key)
            if halt is not None and halt.generation == generation:
                self._timers.pop(key, None)
                self._clear_locked(key, "cooldown", actions)
                self._save_locked(actions)
        _run(actions)

    # -- the shared state file ---------------------------------------------------

    def _sync_locked(self, actions, sig=_UNREAD):
        """Follow a change of guard-state.json made by a sibling gateway.

        `sig` is the file's signature when the caller already took it (outside the lock).
        """
        if self._file is None:
            return
        if sig is _UNREAD:                  # (None is a signature too: no file)
            sig = self._file.signature()
        if sig == self._file_sig:
            return
        self._file_sig = sig
        status, data = self._file.read()
        if status == CORRUPT:
            if self._halts.get(None) is None or self._halts[None].reason != CORRUPT_REASON:
                if None in self._halts:
                    self._clear_locked(None, "replaced", actions)
                self._fail_closed_locked(data, actions)
            return
        saved = {} if status == ABSENT else {h.get("account"): h for h in data}
        for key in [k for k in self._halts if k not in saved]:
            self._clear_locked(key, "external", actions)
        now = self._now_ms()
        for key, data in saved.items():
            current = self._halts.get(key)
            if current is not None and current.since == data["since"]:
                continue
            if data.get("reason", OVERAGE) in OVERAGE_REASONS and not self.halting:
                continue
            until = data.get("cooldownUntil")
            if until is not None and until <= now:
                if current is not None:
                    self._clear_locked(key, "cooldown", actions)
                continue
            if current is not None:
                self._clear_locked(key, "replaced", actions)
            halt = self._adopt_locked(data, actions)
            actions.append(lambda h=halt: log.warning(
                "%s", guardtext.shared_halt_line(h.public(), self._file.path, self.resume_command)))

    def _save_locked(self, actions):
        if self._file is None:
            return
        try:
            if self._halts:
                self._file_sig = self._file.write([h.public() for h in self._halts.values()])
            else:
                self._file_sig = self._file.remove()
        except OSError as err:
            why = err.strerror or str(err)     # `err` is unbound once the except block ends
            if self._halts:
                actions.append(lambda: log.error(
                    "COULD NOT SAVE THE HALT to %s (%s): it holds in memory only and will not "
                    "survive a restart", self._file.path, why))
            else:
                actions.append(lambda: log.error(
                    "could not remove %s (%s): a restart would start halted again; delete it by hand",
                    self._file.path, why))

    def _publish(self, name, data):
        if self._bus is not None:
            self._bus.publish(name, data)

    # -- telling people ----------------------------------------------------------

    def _alert(self, kind, event):
        if self._alerts is not None:
            self._alerts.send(dict(event, event=kind))

    def _announce_halt(self, halt):
        public = halt.public()
        log.warning("%s", guardtext.halt_line(public, self.resume_command))
        if self._notifier is not None:
            self._notifier.notify(*guardtext.halt_notification(public, self.resume_command))
        self._alert("halt", dict(public, resumeCommand=guardtext.halt_command(public, self.resume_command)))

    def _announce_resume(self, halt, event):
        log.warning("%s", guardtext.resume_line(halt.public(), event))
        self._alert("resume", event)

    def _announce_warn(self, event, notify):
        log.warning("%s", guardtext.warn_line(event))
        if notify and self._notifier is not None:
            self._notifier.notify(*guardtext.warn_notification(event))
        self._alert("warn", event)

    def extra_usage_status(self, budgets):
        """The extra-usage cap and its spend (budgets.Budgets.extra_usage_status), or None
        without a cap; for /status, /analytics and /metrics."""
        if self.extra_usage_cap is None or budgets is None:
            return None
        return budgets.extra_usage_status()

    def blocked_response(self, halt, now_ms=None):
        """(headers, body) of the 503 a guarded request gets while `halt` holds."""
        now_ms = self._now_ms() if now_ms is None else now_ms
        return guardtext.blocked_response(halt.public(), now_ms, self.resume_command)


def _run(actions):
    for action in actions:
        action()


def served_from_extra_usage(rate):
    """Was this answer (a parse_ratelimit dict, or a record made from one) served from
    extra usage, by one of the signals that mean it (claim `overage`, `overage-in-use:
    true`, `status: rejected` with overage allowed), and by nothing worse (`api`, an
    unknown claim)?"""
    return _billing_signal(rate) is not None and rate.get("bucket") == billing.EXTRA_USAGE


def extra_usage_mode(rate):
    """True: served from extra usage; False: from the subscription; None: it does not say
    (no claim header, or billed otherwise)."""
    if served_from_extra_usage(rate):
        return True
    if _billing_signal(rate) is None and rate.get("bucket") in (billing.SUBSCRIPTION, billing.SUBSCRIPTION_FALLBACK):
        return False
    return None


def _billing_signal(rate):
    """What the overage trip fires on: parse_ratelimit's `billingSignal`. A rate dict
    made without it (an older caller) falls back to the claim's bucket."""
    if "billingSignal" in rate:
        return rate["billingSignal"]
    if rate.get("bucket") in billing.NON_SUBSCRIPTION:
        return f"representative-claim={rate.get('claim')}"
    return None
