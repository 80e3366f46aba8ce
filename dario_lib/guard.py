"""The overage guard: halt on the first response billed outside the subscription.

A small state machine, `normal` or `halted`, behind one lock:

- `check()` runs right before a guarded request's upstream send and returns the halt,
  if any. `observe()` runs when a response's headers arrive and decides the halt. Both
  take the same lock, so a request that checked before the halt goes out and none that
  checks after it does; the upstream send itself happens outside the lock.
- A halt fires once, is saved to `guard-state.json` (so it survives restarts and is
  shared by gateways with the same `DARIO_HOME`), and clears on `clear()` or when its
  cooldown timer fires. Every halt gets a new generation, so a late timer from an
  earlier halt (a `Timer` can fire after `cancel()`) cannot clear a newer one.
- Events go to the bus under the lock (so they keep their order); loud log lines and
  desktop notifications run after the lock is released.

Time is injected (`clock` in seconds, `timer_factory` shaped like `threading.Timer`).
Thread-safe: every method may be called from any thread.
"""

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType

from . import billing
from .statefile import ABSENT, CORRUPT

log = logging.getLogger(__name__)

BLOCKED_PATHS = frozenset({"/v1/messages", "/v1/complete", "/v1/chat/completions"})
WARN_NOTIFY_INTERVAL_S = 60
CORRUPT_REASON = "state_file_corrupt"


def iso(ms):
    """Epoch milliseconds as an ISO-8601 UTC string."""
    stamp = datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass(frozen=True)
class Halt:
    since: int                        # epoch ms
    cooldown_until: int               # epoch ms, or None: manual resume only
    reason: str
    request: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    generation: int = 0

    def public(self):
        return {"since": self.since, "cooldownUntil": self.cooldown_until,
                "reason": self.reason, "request": dict(self.request)}


class Guard:
    def __init__(self, config, *, bus=None, notifier=None, state_file=None,
                 clock=time.time, timer_factory=threading.Timer):
        self.config = config
        self._bus = bus
        self._notifier = notifier
        self._file = state_file
        self._clock = clock
        self._timer_factory = timer_factory
        self._lock = threading.Lock()
        self._halt = None
        self._generation = 0
        self._timer = None
        self._file_sig = None
        self._last_warn_notify = None
        self.halts = 0
        self.warnings = 0

    @property
    def halting(self):
        return self.config.enabled and self.config.behavior == "halt"

    def _now_ms(self):
        return int(self._clock() * 1000)

    # -- the request path --------------------------------------------------------

    def check(self):
        """The current halt, or None. Called right before a guarded upstream send."""
        if not self.halting:
            return None
        actions = []
        with self._lock:
            self._sync_locked(actions)
            halt = self._halt
        _run(actions)
        return halt

    def observe(self, bucket, request):
        """A response's headers arrived with this billing bucket; trip if it is not ours.

        `request` holds {timestamp, model, account, claim, path, requestId}.
        Returns the new Halt when this response halted the gateway, else None.
        """
        if not self.config.enabled or bucket not in billing.NON_SUBSCRIPTION:
            return None
        actions = []
        with self._lock:
            if self.config.behavior == "warn":
                self._warn_locked(request, actions)
                halt = None
            else:
                self._sync_locked(actions)
                if self._halt is not None:
                    halt = None             # fires once; the record still shows the claim
                else:
                    halt = self._halt_locked("overage_detected", request, actions)
        _run(actions)
        return halt

    # -- reading and resuming ----------------------------------------------------

    def snapshot(self):
        """The current halt (immutable), after noticing changes by sibling gateways."""
        return self.check() if self.halting else None

    def clear(self, reason="manual"):
        """Back to normal. Returns (was_halted, resumed_at_ms); a no-op when not halted."""
        actions = []
        with self._lock:
            self._sync_locked(actions)
            was_halted = self._halt is not None
            resumed_at = self._now_ms()
            if was_halted:
                self._clear_locked(reason, actions, resumed_at)
        _run(actions)
        return was_halted, resumed_at

    def start(self):
        """Pick up a halt saved by an earlier run (or a sibling gateway)."""
        if self._file is None:
            return
        actions = []
        with self._lock:
            status, data = self._file.read()
            self._file_sig = self._file.signature()
            if status == ABSENT:
                pass
            elif not self.halting:
                mode = "disabled" if not self.config.enabled else "in warn mode"
                self._remove_file_locked()
                actions.append(lambda: log.warning(
                    "a saved halt was found in %s and cleared because the overage guard is %s",
                    self._file.path, mode))
            elif status == CORRUPT:
                self._fail_closed_locked(data, actions)
            elif data.get("cooldownUntil") is not None and data["cooldownUntil"] <= self._now_ms():
                self._remove_file_locked()
                actions.append(lambda: log.warning(
                    "the saved halt from %s expired at %s; cleared as cooldown",
                    iso(data["since"]), iso(data["cooldownUntil"])))
            else:
                halt = self._adopt_locked(data, actions)
                actions.append(lambda: log.warning(
                    "STARTING HALTED: a halt saved at %s is still active (%s). %s",
                    iso(halt.since), _cause(halt), _how_to_resume(halt)))
        _run(actions)

    def reconfigure(self, config):
        """New settings (config reload). A halt the new settings would not keep is cleared."""
        actions = []
        with self._lock:
            self.config = config
            if self._halt is not None and not self.halting:
                self._clear_locked("config", actions)
        _run(actions)

    def close(self):
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # -- transitions (all called with the lock held) -----------------------------

    def _halt_locked(self, reason, request, actions, since=None, cooldown_until=None, persist=True):
        self._generation += 1
        since = self._now_ms() if since is None else since
        if cooldown_until is None and self.config.cooldown_ms > 0 and persist:
            cooldown_until = since + self.config.cooldown_ms
        halt = Halt(since, cooldown_until, reason, MappingProxyType(dict(request)), self._generation)
        self._halt = halt
        self.halts += 1
        if halt.cooldown_until is not None:
            self._start_timer_locked(halt)
        if persist:
            self._save_locked(halt, actions)
        self._publish("overage_halt", halt.public())
        actions.append(lambda: self._announce_halt(halt))
        return halt

    def _adopt_locked(self, data, actions):
        """Take over a halt read from the state file (restart or sibling gateway)."""
        request = data.get("request") if isinstance(data.get("request"), dict) else {}
        return self._halt_locked(str(data.get("reason", "overage_detected"))[:64], request, actions,
                                 since=data["since"], cooldown_until=data.get("cooldownUntil"),
                                 persist=False)

    def _fail_closed_locked(self, detail, actions):
        halt = self._halt_locked(CORRUPT_REASON, {"detail": str(detail)[:200]}, actions,
                                 cooldown_until=None, persist=False)
        # No cooldown for a state we cannot read: only a person should clear it.
        actions.append(lambda: log.error(
            "the saved guard state %s is unreadable (%s); staying halted until `dario resume`",
            self._file.path, detail))
        return halt

    def _clear_locked(self, reason, actions, resumed_at=None):
        halt = self._halt
        self._halt = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._remove_file_locked(actions)
        resumed_at = self._now_ms() if resumed_at is None else resumed_at
        event = {"reason": reason, "previousSince": halt.since, "resumedAt": resumed_at}
        self._publish("overage_resume", event)
        actions.append(lambda: log.warning("RESUMED (%s) at %s after a halt since %s",
                                           reason, iso(resumed_at), iso(halt.since)))

    def _warn_locked(self, request, actions):
        self.warnings += 1
        now = self._clock()
        event = {"timestamp": self._now_ms(), "reason": "overage_detected", "request": dict(request)}
        self._publish("overage_warn", event)
        notify = self._last_warn_notify is None or now - self._last_warn_notify >= WARN_NOTIFY_INTERVAL_S
        if notify:
            self._last_warn_notify = now
        actions.append(lambda: self._announce_warn(request, notify))

    def _start_timer_locked(self, halt):
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, (halt.cooldown_until - self._now_ms()) / 1000)
        timer = self._timer_factory(delay, self._on_cooldown, args=(halt.generation,))
        timer.daemon = True        # a Timer inherits the daemon flag of its creator; be explicit
        timer.name = f"dario-cooldown-{halt.generation}"
        self._timer = timer
        timer.start()

    def _on_cooldown(self, generation):
        actions = []
        with self._lock:
            self._sync_locked(actions)
            if self._halt is not None and self._halt.generation == generation:
                self._timer = None
                self._clear_locked("cooldown", actions)
        _run(actions)

    # -- the shared state file ---------------------------------------------------

    def _sync_locked(self, actions):
        """Follow a change of guard-state.json made by a sibling gateway."""
        if self._file is None:
            return
        sig = self._file.signature()
        if sig == self._file_sig:
            return
        self._file_sig = sig
        status, data = self._file.read()
        if status == ABSENT:
            if self._halt is not None:
                self._clear_locked("external", actions)
        elif status == CORRUPT:
            if self._halt is None or self._halt.reason != CORRUPT_REASON:
                self._fail_closed_locked(data, actions)
        elif self._halt is None or self._halt.since != data["since"]:
            until = data.get("cooldownUntil")
            if until is None or until > self._now_ms():
                halt = self._adopt_locked(data, actions)
                actions.append(lambda: log.warning("halt shared by another gateway using %s",
                                                   self._file.path))
            elif self._halt is not None:
                self._clear_locked("cooldown", actions)

    def _save_locked(self, halt, actions):
        if self._file is None:
            return
        try:
            self._file_sig = self._file.write(halt.public())
        except OSError as err:
            why = err.strerror or str(err)     # `err` is unbound once the except block ends
            actions.append(lambda: log.error(
                "COULD NOT SAVE THE HALT to %s (%s): it holds in memory only and will not "
                "survive a restart", self._file.path, why))

    def _remove_file_locked(self, actions=None):
        if self._file is None:
            return
        try:
            self._file_sig = self._file.remove()
        except OSError as err:
            why = err.strerror or str(err)
            message = ("could not remove %s (%s): a restart would start halted again; "
                       "delete it by hand")
            if actions is None:
                log.error(message, self._file.path, why)
            else:
                actions.append(lambda: log.error(message, self._file.path, why))

    def _publish(self, name, data):
        if self._bus is not None:
            self._bus.publish(name, data)

    # -- telling people ----------------------------------------------------------

    def _announce_halt(self, halt):
        log.warning("OVERAGE GUARD HALTED at %s: %s. New requests get 503. %s",
                    iso(halt.since), _cause(halt), _how_to_resume(halt))
        if self._notifier is not None:
            self._notifier.notify("dario halted", f"{_cause(halt)}. Run dario resume to continue.")

    def _announce_warn(self, request, notify):
        log.warning("OVERAGE WARNING: %s (account %s) was billed as %r; still forwarding "
                    "(behavior: warn)", request.get("model"), request.get("account"),
                    request.get("claim"))
        if notify and self._notifier is not None:
            self._notifier.notify("dario warning",
                                  f"{request.get('model')} billed as {request.get('claim')}")


def _run(actions):
    for action in actions:
        action()


def _cause(halt):
    request = halt.request
    if halt.reason == CORRUPT_REASON:
        return f"the saved guard state could not be read ({request.get('detail')})"
    return (f"{request.get('model') or 'a request'} (account {request.get('account')}) "
            f"was billed as {request.get('claim')!r}, outside the subscription")


def _how_to_resume(halt):
    if halt.cooldown_until is None:
        return "Run `dario resume` to continue (automatic resume is off)."
    return f"Run `dario resume`, or wait for the automatic resume at {iso(halt.cooldown_until)}."


def blocked_response(halt, now_ms):
    """(headers, body) of the 503 a guarded request gets while halted."""
    headers = {"x-should-retry": "false"}
    if halt.reason == CORRUPT_REASON:
        message = ("dario halted because its saved guard state could not be read "
                   f"({halt.request.get('detail')}). To resume: run `dario resume` in another terminal.")
    else:
        message = ("dario halted to prevent API-rate bleed. A request was classified as "
                   f"'{halt.request.get('claim')}' (non-subscription billing) instead of your "
                   "subscription pool. ")
        if halt.cooldown_until is not None:
            message += (f"To resume: run `dario resume` in another terminal, or wait until "
                        f"{iso(halt.cooldown_until)} for the cooldown to auto-clear.")
        else:
            message += "To resume: run `dario resume` in another terminal (automatic resume is off)."
    if halt.cooldown_until is not None:
        headers["Retry-After"] = str(max(1, math.ceil((halt.cooldown_until - now_ms) / 1000)))
    body = {"type": "error", "error": {"type": "dario_overage_guard", "message": message}}
    return headers, body
