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
read, written or trusted fails closed: the guard halts (`budget_ledger_error`) and says
why. Trusted means every entry is {"t": epoch ms, "account": label, "usd": amount} with
a finite, non-negative amount (never NaN, a string, or a negative credit), and the file
is a regular file, not a symlink (it is opened with O_NOFOLLOW).

A request whose `max_tokens` is absurd (not an integer from 0 to 10,000,000) is a
`BadRequest` (a 400 for the client), so its worst case is always a finite number.

A reservation granted is a `Ticket`: it remembers the budgets object that granted it
(a config reload may replace the gateway's) and the worst case it held, and settles
there. `team.TeamBudgets` keeps the same promises in the Redis store.

The extra-usage cap (`overageGuard.allowExtraUsage`, read from the guard's settings) is
kept by the same machinery, as a budget (`config.Budget` with `extra`) that counts only
the cost of answers served from extra usage: per account label in `account` scope, of
all traffic in `proxy` scope. A request reserves its worst case against the cap only
while the guard says its account's last answer was served from extra usage (`capped`);
it settles with `extra` saying whether its own answer was (if not, the cap's share is
0, its cost still counts for budgets). Ledger entries of extra usage carry
`"extra": true`. Past the cap, a capped request is refused until the guard records the
crossing (`Refusal.past`: the guard then halts, `extra_usage_cap`); once recorded, the
guard's halt decides, as for a budget. With a cap configured every guarded request gets
a reservation, so an answer that turns out to be extra usage is counted.

Thread-safe: all state is behind one lock; ledger appends happen under it (short writes).
"""

import collections
import errno
import json
import logging
import math
import os
import re
import stat
import threading
import time
from typing import NamedTuple

from . import files, guardtext, pricing
from .guardtext import EXTRA_CAP, EXTRA_WARNING

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DEFAULT_MAX_TOKENS = 64_000       # the request names none: assume a long answer
MAX_TOKENS_LIMIT = 10_000_000     # far above any model's output cap; beyond it a request is refused
MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_tokens_to_sample")
COMPACT_EVERY = 5_000             # appended lines between compactions
LEDGER_REASON = "budget_ledger_error"
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_ENTRY_USD = 1e9
MAX_ACCOUNT_CHARS = 200
EXTRA_METRIC = "extra_usage"      # the guard's name for the extra-usage cap's crossing
# The whole number token, however long: a 400-digit value must be seen, not its first digits.
_MAX_TOKENS = re.compile(rb'"(?:max_tokens|max_completion_tokens|max_tokens_to_sample)"\s*:\s*(-?[0-9][0-9.eE+\-]*)')
_DIGITS = re.compile(rb"[0-9]+")
# Append and read without following a symlink, and without waiting on a FIFO;
# O_CLOEXEC keeps the descriptor out of notification and alert children.
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class LedgerError(Exception):
    pass


class BadRequest(ValueError):
    """A request dario must refuse with 400 invalid_request_error; `message` says why."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


def _bad_max_tokens(key):
    return BadRequest(f"{key} must be an integer from 0 to {MAX_TOKENS_LIMIT}")


def _tokens(key, value):
    """A max_tokens value as an int in range, None if it is not a number, else BadRequest."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None                 # not a number: the upstream refuses it, nothing is generated
    if isinstance(value, float):
        if not value.is_integer():  # 1.5, NaN, and 1e400 (parsed as infinity)
            raise _bad_max_tokens(key)
        value = int(value)
    if not 0 <= value <= MAX_TOKENS_LIMIT:
        raise _bad_max_tokens(key)
    return value


def _token_text(key, raw):
    """The same check on the number's text (bodies too big to parse whole)."""
    if _DIGITS.fullmatch(raw):
        if len(raw) > len(str(MAX_TOKENS_LIMIT)):
            raise _bad_max_tokens(key)
        return _tokens(key, int(raw))
    try:
        return _tokens(key, float(raw))
    except ValueError:              # "1-2", "1e": not a number at all
        raise _bad_max_tokens(key) from None


def max_tokens_of(body, parsed=None):
    """The output cap a request asks for (its worst case), from the parsed JSON or the text.

    With several of the keys present, the largest counts. Raises BadRequest when one is a
    number that is not an integer from 0 to MAX_TOKENS_LIMIT.
    """
    found = []
    if isinstance(parsed, dict):
        for key in MAX_TOKEN_KEYS:
            value = _tokens(key, parsed.get(key))
            if value is not None:
                found.append(value)
    else:
        for match in _MAX_TOKENS.finditer(body or b"", 0, 65536):
            key = match.group(0)[1:].split(b'"', 1)[0].decode("ascii")
            value = _token_text(key, match.group(1))
            if value is not None:
                found.append(value)
    return max(found) if found else DEFAULT_MAX_TOKENS


def worst_case_usd(model, body_len, max_tokens):
    """The most a request can cost: every body byte a token at the dearest input rate, plus
    `max_tokens` of output. Never raises; inputs out of range are clamped."""
    (p_in, p_out, p_write, _read), _known = pricing.rates(model if isinstance(model, str) else None)
    body_len = _clamp(body_len, 1 << 40)
    max_tokens = _clamp(max_tokens, MAX_TOKENS_LIMIT)
    return (body_len * max(p_in, p_write) + max_tokens * p_out) / 1_000_000


def _clamp(value, high):
    """An int from 0 to `high`; anything that is not a finite number counts as `high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return high if value is not None else 0
    if isinstance(value, float) and not math.isfinite(value):
        return high
    return min(max(int(value), 0), high)


def valid_usd(usd):
    """Is this an amount the ledger may hold: a finite number from 0 to MAX_ENTRY_USD?"""
    return (isinstance(usd, (int, float)) and not isinstance(usd, bool) and math.isfinite(usd)
            and 0 <= usd <= MAX_ENTRY_USD)


def _entry(item):
    """(t, account, usd, extra) of one parsed ledger line, or None when it is not a trusted entry."""
    if not isinstance(item, dict):
        return None
    t, account, usd, extra = item.get("t"), item.get("account"), item.get("usd"), item.get("extra", False)
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TIME_MS:
        return None
    if not isinstance(account, str) or not 0 < len(account) <= MAX_ACCOUNT_CHARS:
        return None
    if not valid_usd(usd) or not isinstance(extra, bool):
        return None
    return t, account, float(usd), extra


def _line(t, account, usd, extra=False):
    entry = {"t": t, "account": account, "usd": round(usd, 8)}
    if extra:
        entry["extra"] = True
    return json.dumps(entry) + "\n"


class Ledger:
    """One JSON line per settled cost: {"t": epoch ms, "account": label, "usd": amount},
    plus "extra": true for the cost of an answer served from extra usage.

    Opens go through a descriptor `Reserve` (files.process_reserve() by default), so an
    append still lands when the process is at its open-file limit.
    """

    def __init__(self, path, reserve=None):
        self.path = path
        self.appended = 0
        self._reserve = reserve if reserve is not None else files.process_reserve()

    def _open(self, flags):
        fd = self._reserve.retry(lambda: os.open(self.path, flags | _OPEN_FLAGS, 0o600))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError:
            os.close(fd)
            raise
        return fd

    def load(self):
        """[(t, account, usd)] of every entry; `entries()` also says which were extra usage."""
        return [entry[:3] for entry in self.entries()]

    def entries(self):
        """[(t, account, usd, extra)]. A torn last line (a crash mid-write) is skipped; any other
        line that is not a trusted entry raises LedgerError."""
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise LedgerError(f"cannot read {self.path}: {_why(err)}") from None
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise LedgerError(f"cannot read {self.path}: {_why(err)}") from None
        lines = data.split(b"\n")
        if lines and lines[-1] and not data.endswith(b"\n"):
            lines.pop()
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = _entry(json.loads(line))
            except (ValueError, RecursionError):
                entry = None
            if entry is None:
                raise LedgerError(f"{self.path} line {number} is not a ledger entry "
                                  "(t: epoch ms, account: a label, usd: a finite amount >= 0, "
                                  "extra: true or false if present)")
            entries.append(entry)
        return entries

    def append(self, t, account, usd, extra=False):
        if not valid_usd(usd):
            raise LedgerError(f"refusing to record a cost of {usd!r} in {self.path}")
        line = _line(t, account, usd, extra)
        try:
            fd = self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise LedgerError(f"cannot append to {self.path}: {_why(err)}") from None
        self.appended += 1

    def rewrite(self, entries):
        """Replace the file with `entries`: (t, account, usd) or (t, account, usd, extra)."""
        entries = list(entries)
        if not all(valid_usd(entry[2]) for entry in entries):
            raise LedgerError(f"refusing to compact {self.path}: a total is not a finite amount")
        lines = "".join(_line(*entry) for entry in entries)
        try:
            self._reserve.retry(lambda: files.write_atomic(self.path, lines.encode()))
        except OSError as err:
            raise LedgerError(f"cannot rewrite {self.path}: {_why(err)}") from None
        self.appended = 0


def crossing_metric(budget):
    """The name under which the guard records a budget's threshold crossing."""
    if budget.extra:
        return EXTRA_METRIC         # one cap per halt key: the key tells the accounts apart
    return f"budget:{budget.account}:{budget.window}:{budget.usd}"


def budget_detail(budget, spent):
    """The `detail` of a budget's (or the extra-usage cap's) warning or halt."""
    if budget.extra:
        return cap_detail(budget, spent)
    return {"spentUsd": round(spent, 4), "budgetUsd": budget.usd, "window": budget.window,
            "budgetAccount": budget.account, "warnAt": budget.warn_at}


def cap_detail(cap, spent):
    """The `detail` of the extra-usage cap's warning or halt (`cap`: its Budget)."""
    return {"spentUsd": round(spent, 4), "capUsd": cap.usd, "window": cap.window,
            "capAccount": cap.account, "warnAt": cap.warn_at}


def reasons(budget):
    """(warn reason, halt reason) of a budget's crossings."""
    return (EXTRA_WARNING, EXTRA_CAP) if budget.extra else (guardtext.BUDGET_WARNING, guardtext.BUDGET)


def budget_level(budget, spent):
    """"halt" at or past the limit, "warn" at or past warnAt, else None."""
    return "halt" if spent >= budget.usd else "warn" if spent >= budget.usd * budget.warn_at else None


def _why(err):
    if err.errno == errno.ELOOP:
        return "it is a symlink; dario only uses a regular file there"
    return err.strerror or str(err)


class Ticket(NamedTuple):
    """A request's budget reservation: settle it once, with the request's metered cost."""
    budgets: object             # what granted it: Budgets (or team's settler), settle(id, account, usd, request, extra)
    id: object                  # its reservation id there
    worst_usd: float            # what it held: the request's worst case
    capped: bool = False        # it holds its worst case against the extra-usage cap too

    def settle(self, account, usd, request, extra=False):
        """`extra`: the answer was served from extra usage (its cost counts against the cap)."""
        if not valid_usd(usd):
            # A cost that is not a finite amount >= 0 means metering went wrong: charge
            # the reservation (the worst case), never zero, and never record NaN.
            log.warning("a request's cost came out as %r; charging its reservation ($%.4f)", usd, self.worst_usd)
            usd = self.worst_usd
        self.budgets.settle(self.id, account, usd, request, extra=extra)


class Refusal:
    """A request held back because reservations in flight already fill a budget (or the
    extra-usage cap). `past`: the cap's spend is past its limit and the guard has not
    recorded that crossing yet (the guard records it, which halts, instead)."""

    def __init__(self, budget, spent, reserved, past=False):
        self.budget, self.spent, self.reserved, self.past = budget, spent, reserved, past

    def response(self):
        """(headers, body): retryable, with Retry-After: 5 (guardtext words it)."""
        if self.budget.extra:
            return guardtext.cap_refusal_response(self.budget.public(), self.spent, self.reserved)
        return guardtext.refusal_response(self.budget.public(), self.spent, self.reserved)


class Budgets:
    def __init__(self, budgets, ledger, guard, clock=time.time):
        self.budgets = tuple(budgets)
        self._ledger = ledger
        self._guard = guard
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded = False
        # [minute start ms, {account: usd}, {account: usd of extra usage}], oldest first;
        # a budget counts both, the extra-usage cap only the second.
        self._minutes = collections.deque()
        self._reserved = {}                      # reservation id -> (account, usd, held against the cap)
        self._next = 0

    @property
    def active(self):
        """Does any request need a reservation: a budget, or the extra-usage cap (whose
        answers must be counted even when nothing is held against it)?"""
        return bool(self.budgets) or self._cap() is not None

    def _cap(self):
        """The extra-usage cap as the guard applies it now (a reload may change it), or None."""
        return self._guard.extra_usage_cap

    def _cap_for(self, account):
        cap = self._cap()
        return None if cap is None else cap.budget(self._guard.cap_account(account))

    def _keep_ms(self):
        cap = self._cap()
        return max([b.window_ms for b in self.budgets] + [cap.window_ms if cap else 0])

    def _now(self):
        return int(self._clock() * 1000)

    def start(self):
        """Load the ledger (compacting it) and trip any budget, or cap, already spent. Runs
        once; a cap that appears on a reload loads it from the first request that needs it."""
        if not self.active:
            return
        with self._load_lock:           # a request that needs the ledger waits for it
            if self._loaded:
                return
            try:
                entries = self._ledger.entries()
                with self._lock:
                    for entry in sorted(entries):
                        self._add_locked(*entry)
                    self._prune_locked(self._now())
                    self._ledger.rewrite(self._folded_locked())
            except LedgerError as err:
                failure = str(err)
            else:
                failure = None
            self._loaded = True
        if failure is not None:
            self._fail(failure)
            return
        for budget in self.budgets:
            self._evaluate(budget, None if budget.account == "*" else budget.account, {})
        if self._cap() is not None:
            with self._lock:
                accounts = {account for _, _, extra in self._minutes for account in extra}
            keys = {self._guard.cap_account(account) for account in accounts}
            for account in sorted(keys):
                cap = self._cap_for(None if account == "*" else account)
                if cap is not None:
                    self._evaluate(cap, None if account == "*" else account, {})

    # -- the request path --------------------------------------------------------

    def reserve(self, account, worst, capped=False):
        """Hold `worst` (a request's worst-case cost, worst_case_usd()) against every budget
        of this account, and against the extra-usage cap when `capped` (the guard says the
        account's last answer was served from extra usage): a reservation id, None (nothing
        applies), or a Refusal."""
        if not self._loaded:
            self.start()
        applicable = [b for b in self.budgets if b.account in ("*", account)]
        cap = self._cap_for(account)
        if not applicable and cap is None:
            return None
        if capped and cap is not None:
            applicable.append(cap)
            # Read before this lock: the guard's lock is never taken inside it.
            recorded = self._guard.level(account, EXTRA_METRIC)
        with self._lock:
            now = self._now()
            for budget in applicable:
                spent = self._spent_locked(budget, now)
                reserved = self._reserved_locked(budget)
                # Past the limit the guard's halt decides (and a person may have resumed it).
                if spent < budget.usd <= spent + reserved:
                    return Refusal(budget, spent, reserved)
                if budget.extra and spent >= budget.usd and recorded != "halt":
                    # Past the cap, and the guard has not recorded it (the settle that crossed
                    # is on its way, or extra usage came back after the subscription served).
                    return Refusal(budget, spent, reserved, past=True)
            self._next += 1
            self._reserved[self._next] = (account, worst, bool(capped and cap is not None))
            return self._next

    def crossed(self, refusal):
        """Record the crossing of a budget (or cap) a Refusal found past its limit; the Halt
        made, or None."""
        budget = refusal.budget
        return self._evaluate(budget, None if budget.account == "*" else budget.account, {})

    def settle(self, reservation, account, usd, request, extra=False):
        """Replace a reservation with the metered cost; trip the guard on a crossing.
        `extra`: the answer was served from extra usage (its cost counts against the cap)."""
        if reservation is None:
            return
        with self._lock:
            _, held, _ = self._reserved.pop(reservation, (account, 0.0, False))
            if not valid_usd(usd):
                # A cost that is not a finite amount >= 0 means metering went wrong: charge
                # the reservation (the worst case), never zero, and never write NaN.
                log.warning("a request's cost came out as %r; charging its reservation ($%.4f)", usd, held)
                usd = held
            if usd > 0:
                now = self._now()
                self._add_locked(now, account, usd, extra)
                self._prune_locked(now)
                try:
                    self._ledger.append(now, account, usd, extra)
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
            cap = self._cap_for(account) if extra else None
            if cap is not None:
                self._evaluate(cap, None if cap.account == "*" else account, request)

    def status(self):
        """Each budget with its current spend, for /status, /metrics and the TUI."""
        with self._lock:
            now = self._now()
            out = []
            for budget in self.budgets:
                spent = self._spent_locked(budget, now)
                reserved = self._reserved_locked(budget)
                out.append(dict(budget.public(), spentUsd=round(spent, 6), reservedUsd=round(reserved, 6)))
            return out

    def extra_usage_status(self):
        """The extra-usage cap and its spend, or None when there is none: {usd, window,
        warnAt, scope, caps: [{account ("*": all traffic), spentUsd, reservedUsd,
        inExtraUsage}]}: one cap in `proxy` scope, one per account seen in `account` scope."""
        cap = self._cap()
        if cap is None:
            return None
        if not self._loaded:
            self.start()
        account_scope = self._guard.config.scope == "account"
        with self._lock:
            now = self._now()
            if account_scope:
                since = now - cap.window_ms
                labels = {a for minute, _, extra in self._minutes if minute + MINUTE_MS > since for a in extra}
                labels |= {a for a, _, held in self._reserved.values() if held}
            else:
                labels = {"*"}
            figures = []
            for label in sorted(labels):
                budget = cap.budget(label)
                figures.append((label, self._spent_locked(budget, now), self._reserved_locked(budget)))
        return dict(cap.public(), scope="account" if account_scope else "proxy",
                    caps=[{"account": label, "spentUsd": round(spent, 6), "reservedUsd": round(reserved, 6),
                           "inExtraUsage": self._guard.in_extra_usage(None if label == "*" else label)}
                          for label, spent, reserved in figures])

    # -- internals ---------------------------------------------------------------

    def _evaluate(self, budget, account, request):
        """Tell the guard this budget's level; the Halt it made, or None."""
        with self._lock:
            now = self._now()
            spent = self._spent_locked(budget, now)
            roll = self._roll_time_locked(budget, now, spent)
        level, detail = budget_level(budget, spent), budget_detail(budget, spent)
        warn_reason, halt_reason = reasons(budget)
        return self._guard.cross(account, crossing_metric(budget), level, request, detail, warn_reason,
                                 halt_reason, cooldown_until=roll)

    def _fail(self, why):
        log.error("the spend ledger failed (%s): halting, since budgets cannot be kept", why)
        self._guard.cross(None, "budget-ledger", "halt", {}, {"error": why[:200]}, LEDGER_REASON,
                          LEDGER_REASON)

    def _add_locked(self, t, account, usd, extra=False):
        minute = t - t % MINUTE_MS
        if self._minutes and self._minutes[-1][0] == minute:
            entry = self._minutes[-1]
        else:
            entry = [minute, {}, {}]
            self._minutes.append(entry)
        bucket = entry[2] if extra else entry[1]
        bucket[account] = bucket.get(account, 0.0) + usd

    def _prune_locked(self, now):
        keep_ms = self._keep_ms()
        while self._minutes and self._minutes[0][0] + MINUTE_MS <= now - keep_ms:
            self._minutes.popleft()

    @staticmethod
    def _amount(budget, entry):
        """What one minute adds to this budget: the cap counts extra usage only."""
        total = 0.0
        for bucket in (entry[2],) if budget.extra else (entry[1], entry[2]):
            total += sum(bucket.values()) if budget.account == "*" else bucket.get(budget.account, 0.0)
        return total

    def _reserved_locked(self, budget):
        if budget.extra:
            return sum(usd for acct, usd, held in self._reserved.values()
                       if held and budget.account in ("*", acct))
        return sum(usd for acct, usd, _ in self._reserved.values() if budget.account in ("*", acct))

    def _spent_locked(self, budget, now):
        since = now - budget.window_ms
        total = 0.0
        for entry in reversed(self._minutes):
            if entry[0] + MINUTE_MS <= since:
                break
            total += self._amount(budget, entry)
        return total

    def _roll_time_locked(self, budget, now, spent):
        """When spend will have aged out enough to be under the limit again (ms), or None."""
        if spent < budget.usd:
            return None
        since = now - budget.window_ms
        for entry in self._minutes:
            if entry[0] + MINUTE_MS <= since:
                continue
            spent -= self._amount(budget, entry)
            if spent < budget.usd:
                return entry[0] + MINUTE_MS + budget.window_ms
        return None

    def _folded_locked(self):
        return [(minute, account, usd, extra) for minute, plain, extras in self._minutes
                for extra, bucket in ((False, plain), (True, extras)) for account, usd in bucket.items()]
