"""Spend budgets: estimated cost per account and rolling window, reserved before sending.

A plain check-then-forward lets twenty simultaneous requests through a nearly spent
budget. So a generation request first *reserves* its worst-case cost (every byte of its
body as a token at the dearest input rate, plus `max_tokens` of output) under the lock,
and is refused while the budget's spend plus the reservations in flight already reach
the limit; afterwards the reservation is *settled* with the metered cost. Spend can thus
pass a budget by at most one request's reservation. Settled spend that crosses `warnAt`
or the limit trips the guard (reasons `budget_warning`, `budget_exceeded`), once per
crossing; a budget halt lifts when enough spend has aged out of the window.

Spend survives restarts in an append-only ledger, `$DARIO_HOME/spend-ledger.jsonl`, kept
compact by folding entries into one line per minute and account. A ledger that cannot be
read or written fails closed: the guard halts and says why.

Thread-safe: all state is behind one lock; ledger appends happen under it (short writes).
"""

import collections
import json
import logging
import os
import re
import threading
import time

from . import guard as guard_mod, pricing
from .files import write_atomic

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DEFAULT_MAX_TOKENS = 64_000       # the request names none: assume a long answer
COMPACT_EVERY = 5_000             # appended lines between compactions
LEDGER_REASON = "budget_ledger_error"
_MAX_TOKENS = re.compile(rb'"(?:max_tokens|max_completion_tokens|max_tokens_to_sample)"\s*:\s*(\d{1,9})')


class LedgerError(Exception):
    pass


def max_tokens_of(body, parsed=None):
    """The output cap a request asks for (its worst case), from the parsed JSON or the text."""
    if isinstance(parsed, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_tokens_to_sample"):
            value = parsed.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return DEFAULT_MAX_TOKENS
    found = _MAX_TOKENS.search(body or b"", 0, 65536)
    return int(found.group(1)) if found else DEFAULT_MAX_TOKENS


def worst_case_usd(model, body_len, max_tokens):
    (p_in, p_out, p_write, _read), _known = pricing.rates(model)
    return (body_len * max(p_in, p_write) + max_tokens * p_out) / 1_000_000


class Ledger:
    """One JSON line per settled cost: {"t": epoch ms, "account": label, "usd": amount}."""

    def __init__(self, path):
        self.path = path
        self.appended = 0

    def load(self):
        """[(t, account, usd)]. A torn last line (a crash mid-write) is skipped."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise LedgerError(f"cannot read {self.path}: {err.strerror or err}") from None
        lines = data.split(b"\n")
        if lines and lines[-1] and not data.endswith(b"\n"):
            lines.pop()
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                entries.append((int(item["t"]), str(item["account"]), float(item["usd"])))
            except (ValueError, KeyError, TypeError):
                raise LedgerError(f"{self.path} line {number} is not a ledger entry") from None
        return entries

    def append(self, t, account, usd):
        line = json.dumps({"t": t, "account": account, "usd": round(usd, 8)}) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise LedgerError(f"cannot append to {self.path}: {err.strerror or err}") from None
        self.appended += 1

    def rewrite(self, entries):
        lines = "".join(json.dumps({"t": t, "account": account, "usd": round(usd, 8)}) + "\n"
                        for t, account, usd in entries)
        try:
            write_atomic(self.path, lines.encode())
        except OSError as err:
            raise LedgerError(f"cannot rewrite {self.path}: {err.strerror or err}") from None
        self.appended = 0


class Refusal:
    """A request held back because reservations in flight already fill a budget."""

    def __init__(self, budget, spent, reserved):
        self.budget, self.spent, self.reserved = budget, spent, reserved

    def response(self):
        b = self.budget
        message = (f"dario is holding this request back: the ${b.usd:.2f} budget per {b.window} for "
                   f"{b.account} is fully committed (${self.spent:.2f} spent, ${self.reserved:.2f} "
                   "reserved by requests in flight). Retry when they finish, or raise the budget.")
        body = {"type": "error", "error": {"type": "dario_guard", "message": message,
                                           "reason": guard_mod.BUDGET}}
        return {"Retry-After": "5"}, body


class Budgets:
    def __init__(self, budgets, ledger, guard, clock=time.time):
        self.budgets = tuple(budgets)
        self._ledger = ledger
        self._guard = guard
        self._clock = clock
        self._lock = threading.Lock()
        self._minutes = collections.deque()      # [minute start ms, {account: usd}], oldest first
        self._reserved = {}                      # reservation id -> (account, usd)
        self._next = 0
        self._keep_ms = max((b.window_ms for b in self.budgets), default=0)

    @property
    def active(self):
        return bool(self.budgets)

    def _now(self):
        return int(self._clock() * 1000)

    def start(self):
        """Load the ledger (compacting it) and trip any budget already spent."""
        if not self.active:
            return
        try:
            entries = self._ledger.load()
            with self._lock:
                for t, account, usd in sorted(entries):
                    self._add_locked(t, account, usd)
                self._prune_locked(self._now())
                self._ledger.rewrite(self._folded_locked())
        except LedgerError as err:
            self._fail(str(err))
            return
        for budget in self.budgets:
            self._evaluate(budget, None if budget.account == "*" else budget.account, {})

    # -- the request path --------------------------------------------------------

    def reserve(self, account, model, body_len, max_tokens):
        """A reservation id, None (no budget applies), or a Refusal."""
        applicable = [b for b in self.budgets if b.account in ("*", account)]
        if not applicable:
            return None
        worst = worst_case_usd(model, body_len, max_tokens)
        with self._lock:
            now = self._now()
            for budget in applicable:
                spent = self._spent_locked(budget, now)
                reserved = sum(usd for acct, usd in self._reserved.values() if budget.account in ("*", acct))
                # Past the limit the guard's halt decides (and a person may have resumed it).
                if spent < budget.usd <= spent + reserved:
                    return Refusal(budget, spent, reserved)
            self._next += 1
            self._reserved[self._next] = (account, worst)
            return self._next

    def settle(self, reservation, account, usd, request):
        """Replace a reservation with the metered cost; trip the guard on a crossing."""
        if reservation is None:
            return
        with self._lock:
            self._reserved.pop(reservation, None)
            if usd > 0:
                now = self._now()
                self._add_locked(now, account, usd)
                self._prune_locked(now)
                try:
                    self._ledger.append(now, account, usd)
                    if self._ledger.appended >= COMPACT_EVERY:
                        self._ledger.rewrite(self._folded_locked())
                except LedgerError as err:
                    failure = str(err)
                else:
                    failure = None
        if usd > 0:
            if failure:
                self._fail(failure)
            for budget in self.budgets:
                if budget.account in ("*", account):
                    self._evaluate(budget, None if budget.account == "*" else account, request)

    def status(self):
        """Each budget with its current spend, for /status, /metrics and the TUI."""
        with self._lock:
            now = self._now()
            out = []
            for budget in self.budgets:
                spent = self._spent_locked(budget, now)
                reserved = sum(usd for acct, usd in self._reserved.values() if budget.account in ("*", acct))
                out.append(dict(budget.public(), spentUsd=round(spent, 6), reservedUsd=round(reserved, 6)))
            return out

    # -- internals ---------------------------------------------------------------

    def _evaluate(self, budget, account, request):
        with self._lock:
            now = self._now()
            spent = self._spent_locked(budget, now)
            roll = self._roll_time_locked(budget, now, spent)
        level = "halt" if spent >= budget.usd else "warn" if spent >= budget.usd * budget.warn_at else None
        detail = {"spentUsd": round(spent, 4), "budgetUsd": budget.usd, "window": budget.window,
                  "budgetAccount": budget.account, "warnAt": budget.warn_at}
        self._guard.cross(account, f"budget:{budget.account}:{budget.window}:{budget.usd}", level,
                          request, detail, guard_mod.BUDGET_WARNING, guard_mod.BUDGET, cooldown_until=roll)

    def _fail(self, why):
        log.error("the spend ledger failed (%s): halting, since budgets cannot be kept", why)
        self._guard.cross(None, "budget-ledger", "halt", {}, {"error": why[:200]}, LEDGER_REASON,
                          LEDGER_REASON)

    def _add_locked(self, t, account, usd):
        minute = t - t % MINUTE_MS
        if self._minutes and self._minutes[-1][0] == minute:
            bucket = self._minutes[-1][1]
        else:
            bucket = {}
            self._minutes.append([minute, bucket])
        bucket[account] = bucket.get(account, 0.0) + usd

    def _prune_locked(self, now):
        while self._minutes and self._minutes[0][0] + MINUTE_MS <= now - self._keep_ms:
            self._minutes.popleft()

    def _spent_locked(self, budget, now):
        since = now - budget.window_ms
        total = 0.0
        for minute, bucket in reversed(self._minutes):
            if minute + MINUTE_MS <= since:
                break
            total += sum(bucket.values()) if budget.account == "*" else bucket.get(budget.account, 0.0)
        return total

    def _roll_time_locked(self, budget, now, spent):
        """When spend will have aged out enough to be under the limit again (ms), or None."""
        if spent < budget.usd:
            return None
        since = now - budget.window_ms
        for minute, bucket in self._minutes:
            if minute + MINUTE_MS <= since:
                continue
            spent -= sum(bucket.values()) if budget.account == "*" else bucket.get(budget.account, 0.0)
            if spent < budget.usd:
                return minute + MINUTE_MS + budget.window_ms
        return None

    def _folded_locked(self):
        return [(minute, account, usd) for minute, bucket in self._minutes for account, usd in bucket.items()]
