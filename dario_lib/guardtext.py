"""How a halt is worded: the one place that turns guard state into text for people.

Every message about a halt or a warning is built here, from the *public* dicts the
gateway publishes, so the gateway itself and its clients (the TUI, `dario status`,
which get the same dicts as JSON) say the same thing:

- a halt is `Halt.public()`: {since, cooldownUntil, reason, request, account, detail};
- a warning is the `overage_warn` event: {timestamp, reason, request, detail}.

Functions (all pure, none raises on a malformed dict from a remote gateway):

- `reason_name(reason) -> str`: a short, generic name for a reason code
  ("billed outside the subscription", "spend budget exceeded"); for lists and legends.
- `title(item) -> str`: what happened, for one halt or warning ("billed as API usage",
  "5-hour utilization at 96% (halt at 95%)"). A dict with `since` is a halt, else a warning.
- `cause(item) -> str`: one sentence: the title, the request it came from, the signal.
- `resume_command(port, argv0=None, executable=None) -> str`: the base resume command
  as this user can run it (see its docstring); `halt_command(halt, command)` adds
  `--account=` for an account halt.
- `how_to_resume(halt, command) -> str`: "Run `...`, or wait for the automatic resume at ...".
- `blocked_response(halt, now_ms, command) -> (headers, body)`: the 503 a guarded request
  gets while halted (SPEC 6).
- `refusal_response(budget, spent, reserved) -> (headers, body)`: a budget's short,
  retryable hold-back (`budget` is `Budget.public()`); `cap_refusal_response(cap,
  spent, reserved)` the same for the extra-usage cap.
- `extra_usage_lines(extra, cap=None) -> [(text, level)]`: the cap's headroom ("extra
  usage $1.20 of $5.00 per 1d"), level "bad" at the cap, "warn" past warnAt, else
  "normal"; from `/status`'s `extraUsage` (or, without its figures, the configured cap).
- `halt_line`, `starting_halted_line`, `shared_halt_line`, `resume_line`, `warn_line`:
  the loud stderr lines (no "[dario]" prefix: logging adds it).
- `halt_notification(halt, command)`, `warn_notification(event) -> (title, message)`:
  desktop notification text.
- `iso(ms) -> str`: epoch milliseconds as ISO-8601 UTC.

Text from outside (claims, model names, account labels) is passed through as it is:
each sink makes it inert for itself (terminal, notification, JSON).
"""

import math
import os
import shlex
import sys
from datetime import datetime, timezone

from . import wire

# Reason codes, as the guard records them.
OVERAGE = "overage_detected"
UTILIZATION = "utilization_threshold"
STATUS_REJECTED = "status_rejected"
STATUS_WARNING = "status_warning"
BUDGET = "budget_exceeded"
BUDGET_WARNING = "budget_warning"
LEDGER = "budget_ledger_error"
CORRUPT = "state_file_corrupt"
STATE_LOST = "store_state_lost"
UNAVAILABLE = "store_unavailable"
EXTRA_CAP = "extra_usage_cap"
EXTRA_WARNING = "extra_usage_warning"

DEFAULT_PORT = 3456
DEFAULT_COMMAND = "dario resume"

REASON_NAMES = {
    OVERAGE: "billed outside the subscription",
    UTILIZATION: "utilization threshold crossed",
    STATUS_REJECTED: "unified rate-limit status rejected",
    STATUS_WARNING: "unified rate-limit status warning",
    BUDGET: "spend budget exceeded",
    BUDGET_WARNING: "spend budget nearly used",
    LEDGER: "spend ledger cannot be trusted",
    CORRUPT: "saved guard state unreadable",
    STATE_LOST: "the team's shared state was lost",
    UNAVAILABLE: "the team's store is unreachable",
    EXTRA_CAP: "extra-usage cap reached",
    EXTRA_WARNING: "extra-usage cap nearly used",
}
WINDOWS = {"util5h": "5-hour", "util7d": "7-day", "overageUtil": "overage"}


def iso(ms):
    """Epoch milliseconds as an ISO-8601 UTC string ("?" for something that is not a time)."""
    try:
        stamp = datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"
    return stamp.replace("+00:00", "Z")


# -- reading the public dicts defensively -----------------------------------------

def _dict(value):
    return value if isinstance(value, dict) else {}


def _text(value, default=""):
    return value if isinstance(value, str) and value else default


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _percent(value):
    number = _number(value)
    return "?%" if number is None else f"{number:.0%}"


def _usd(value):
    number = _number(value)
    return "$?" if number is None else f"${number:.2f}"


def _parts(item):
    item = _dict(item)
    return item, _text(item.get("reason"), OVERAGE), _dict(item.get("request")), _dict(item.get("detail"))


def _claim(request, detail):
    return _text(detail.get("claim")) or _text(request.get("claim"), "unknown")


# -- what happened ----------------------------------------------------------------

def reason_name(reason):
    """A short generic name for a reason code."""
    reason = _text(reason, OVERAGE)
    return REASON_NAMES.get(reason) or reason.replace("_", " ")


def billing_title(claim, signal=None):
    """What a billing signal means: "billed as API usage", "served from extra usage", ..."""
    if signal and not signal.startswith("representative-claim="):
        return "served from extra usage"
    if claim == "api":
        return "billed as API usage"
    if claim == "overage":
        return "billed to extra usage"
    return f"billed outside the subscription (claim '{claim}')"


def title(item):
    """What happened, in a few words, for a halt (has `since`) or a warning event."""
    item, reason, request, detail = _parts(item)
    halted = "since" in item
    if reason == OVERAGE:
        return billing_title(_claim(request, detail), _text(detail.get("signal")) or None)
    if reason == UTILIZATION:
        metric = _text(detail.get("metric"), "?")
        window = WINDOWS.get(metric, metric)
        limit = "halt" if halted else "warn"
        return f"{window} utilization at {_percent(detail.get('value'))} ({limit} at {_percent(detail.get('threshold'))})"
    if reason in (STATUS_REJECTED, STATUS_WARNING):
        window = _text(detail.get("window"))
        which = f"{window} rate-limit" if window else "unified rate-limit"
        return f"{which} status '{_text(detail.get('status'), '?')}'"
    if reason in (BUDGET, BUDGET_WARNING):
        account = detail.get("budgetAccount")
        whom = "all accounts" if account in ("*", None) else f"account {account}"
        text = (f"spent {_usd(detail.get('spentUsd'))} of the {_usd(detail.get('budgetUsd'))} budget "
                f"per {_text(detail.get('window'), '?')} for {whom}")
        if reason == BUDGET_WARNING:
            text += f" (warn at {_percent(detail.get('warnAt'))})"
        return text
    if reason in (EXTRA_CAP, EXTRA_WARNING):
        text = (f"extra usage {_usd(detail.get('spentUsd'))} of the {_usd(detail.get('capUsd'))} cap "
                f"per {_text(detail.get('window'), '?')}{_cap_whom(detail.get('capAccount'))}")
        if reason == EXTRA_WARNING:
            text += f" (warn at {_percent(detail.get('warnAt'))})"
        return text
    if reason == LEDGER:
        return "the spend ledger cannot be trusted"
    if reason == CORRUPT:
        return "the saved guard state is unreadable"
    if reason == STATE_LOST:
        return ("the team's Redis store came back empty: halts or spend may have been lost "
                "(enable AOF persistence)")
    return reason_name(reason)


def cause(item):
    """One sentence: what happened, to which request, and the evidence."""
    item, reason, request, detail = _parts(item)
    what = title(item)
    if reason == OVERAGE:
        model = _text(request.get("model"), "a request")
        signal = _text(detail.get("signal"))
        evidence = f"representative-claim '{_claim(request, detail)}'"
        if signal and not signal.startswith("representative-claim="):
            evidence = f"signal {signal}; {evidence}"
        return f"{model} (account {_text(request.get('account'), 'unknown')}) was {what} ({evidence})"
    if reason in (LEDGER, CORRUPT):
        error = _text(detail.get("error"))
        return f"{what} ({error})" if error else what
    model = _text(request.get("model"))
    return f"{what}, seen on a {model} response" if model else what


# -- how to resume ----------------------------------------------------------------

def resume_command(port, argv0=None, executable=None):
    """The command that resumes the gateway on `port`, as this user can type it.

    `argv0` (default `sys.argv[0]`) tells how dario was started: a path ending in
    `dario.py` is a checkout, run as `<python> <absolute path> resume`; anything else is
    the installed `dario` command. `<python>` is `python3`, unless `executable` (default
    `sys.executable`) is named otherwise without being a python3 (`python` on Windows,
    `pypy3`): any python3 runs the resume client, which needs only the standard library.
    `--port=N` is added whenever the port is not 3456.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    if os.path.basename(argv0 or "").endswith("dario.py"):
        name = os.path.basename(executable or "")
        if name.lower().endswith(".exe"):
            name = name[:-4]
        python = name if name and not name.startswith("python3") else "python3"
        words = [python, os.path.abspath(argv0), "resume"]
    else:
        words = ["dario", "resume"]
    if port != DEFAULT_PORT:
        words.append(f"--port={port}")
    return " ".join(shlex.quote(word) for word in words)


def halt_command(halt, command=DEFAULT_COMMAND):
    """`command` plus `--account=<label>` (shell-quoted) when the halt is one account's."""
    account = _dict(halt).get("account")
    if isinstance(account, str):
        return f"{command} --account={shlex.quote(account)}"
    return command


def how_to_resume(halt, command=DEFAULT_COMMAND):
    halt = _dict(halt)
    run = halt_command(halt, command)
    until = halt.get("cooldownUntil")
    if until is None:
        return f"Run `{run}` to continue (automatic resume is off)."
    return f"Run `{run}`, or wait for the automatic resume at {iso(until)}."


# -- the 503 and the budget hold-back ----------------------------------------------

def blocked_response(halt, now_ms, command=DEFAULT_COMMAND):
    """(headers, body) of the 503 a guarded request gets while `halt` holds."""
    item, reason, request, detail = _parts(halt)
    headers = {"x-should-retry": "false"}
    run = halt_command(item, command)
    if reason == OVERAGE:
        claim = _claim(request, detail)
        signal = _text(detail.get("signal")) or f"representative-claim={claim}"
        evidence = f"signal {signal}"
        if not signal.startswith("representative-claim="):
            evidence += f"; representative-claim '{claim}'"
        message = (f"dario halted to prevent API-rate bleed. A response was {title(item)} "
                   f"({evidence}): non-subscription billing instead of your subscription pool. ")
    else:
        message = f"dario halted ({reason}): {cause(item)}. "
    if reason == EXTRA_CAP:
        message += ("Answers were being served from extra usage (overageGuard.allowExtraUsage) and their "
                    "estimated cost reached the cap. ")
    until = _number(item.get("cooldownUntil"))
    if until is not None:
        after = {BUDGET: ", when enough spend has aged out of the budget's window",
                 EXTRA_CAP: ", when enough extra-usage spend has aged out of the cap's window"}.get(
                     reason, " for the cooldown to auto-clear")
        message += f"To resume: run `{run}` in another terminal, or wait until {iso(until)}{after}."
        headers["Retry-After"] = str(max(1, math.ceil((until - now_ms) / 1000)))
    else:
        message += f"To resume: run `{run}` in another terminal (automatic resume is off)."
    kind = "dario_overage_guard" if reason == OVERAGE else "dario_guard"
    body = wire.error_object(kind, message, reason=reason)
    return headers, body


def unavailable_response(host, retry_s):
    """(headers, body) of a guarded request held back while the team's store is
    unreachable: retryable (Retry-After, no x-should-retry: false)."""
    message = (f"dario cannot reach the team's Redis store ({host}) to check the team's halts and budgets, "
               "so it is holding this request back (store.failOpen is off). It reconnects on its own: "
               "retry shortly.")
    return {"Retry-After": str(retry_s)}, wire.error_object("dario_guard", message, reason=UNAVAILABLE)


def refusal_response(budget, spent, reserved):
    """(headers, body) of a budget's hold-back: retryable, so no x-should-retry: false."""
    budget = _dict(budget)
    account = budget.get("account")
    whom = "all accounts" if account in ("*", None) else account
    message = (f"dario is holding this request back: the {_usd(budget.get('usd'))} budget per "
               f"{_text(budget.get('window'), '?')} for {whom} is fully committed ({_usd(spent)} spent, "
               f"{_usd(reserved)} reserved by requests in flight). Retry when they finish, or raise the budget.")
    body = wire.error_object("dario_guard", message, reason=BUDGET)
    return {"Retry-After": "5"}, body


def _cap_whom(account):
    return " for all accounts" if account in ("*", None) else f" for account {account}"


def extra_usage_lines(extra, cap=None):
    """[(text, level)]: each extra-usage cap and its spend, for the TUI and `dario status`.

    `extra` is `/status`'s `extraUsage` ({usd, window, warnAt, scope, caps: [{account,
    spentUsd, reservedUsd, inExtraUsage}]}) or None; `cap` the configured one
    (`guards.extraUsage`), shown without figures when `extra` has none."""
    extra, cap = _dict(extra), _dict(cap)
    usd, window = extra.get("usd", cap.get("usd")), _text(extra.get("window", cap.get("window")), "?")
    if _number(usd) is None:
        return []
    caps = extra.get("caps") if isinstance(extra.get("caps"), list) else []
    caps = [item for item in caps if isinstance(item, dict)]
    if not caps:
        whom = " per account" if extra.get("scope") == "account" else ""
        spent = ", none spent" if extra else ""        # without the figures, say only the cap
        return [(f"extra usage cap {_usd(usd)} per {window}{whom}{spent}", "normal")]
    warn_at = _number(extra.get("warnAt"))
    lines = []
    for item in caps:
        spent = _number(item.get("spentUsd")) or 0.0
        account = item.get("account")
        text = f"extra usage {_usd(spent)} of {_usd(usd)} per {window}"
        if account not in ("*", None):
            text += f" for {account}"
        if _number(item.get("reservedUsd")):
            text += f" (+{_usd(item['reservedUsd'])} in flight)"
        if item.get("inExtraUsage") is True:
            text += ", in use"
        level = ("bad" if spent >= usd else
                 "warn" if warn_at is not None and spent >= usd * warn_at else "normal")
        lines.append((text, level))
    return lines


def cap_refusal_response(cap, spent, reserved):
    """(headers, body) of the extra-usage cap's hold-back: answers are served from extra
    usage and requests in flight already fill the cap. Retryable, as a budget's."""
    cap = _dict(cap)
    message = (f"dario is holding this request back: answers are being served from extra usage and the "
               f"{_usd(cap.get('usd'))} extra-usage cap per {_text(cap.get('window'), '?')}"
               f"{_cap_whom(cap.get('account'))} is fully committed ({_usd(spent)} spent, {_usd(reserved)} "
               "reserved by requests in flight). Retry when they finish, or raise overageGuard.allowExtraUsage.")
    body = wire.error_object("dario_guard", message, reason=EXTRA_CAP)
    return {"Retry-After": "5"}, body


# -- stderr lines -----------------------------------------------------------------

def _scope(halt):
    account = _dict(halt).get("account")
    return f" for account {account}" if isinstance(account, str) else ""


def halt_line(halt, command=DEFAULT_COMMAND):
    item, reason, _, _ = _parts(halt)
    name = "OVERAGE GUARD" if reason == OVERAGE else "GUARD"
    return (f"{name} HALTED{_scope(item)} at {iso(item.get('since'))} ({reason}): {cause(item)}. "
            f"New requests get 503. {how_to_resume(item, command)}")


def starting_halted_line(halt, command=DEFAULT_COMMAND):
    item = _dict(halt)
    return (f"STARTING HALTED{_scope(item)}: the halt saved at {iso(item.get('since'))} is still active "
            f"({cause(item)}). New requests get 503. {how_to_resume(item, command)}")


def shared_halt_line(halt, path, command=DEFAULT_COMMAND):
    item = _dict(halt)
    return (f"HALTED{_scope(item)} by another gateway sharing {path}: {cause(item)}. "
            f"New requests get 503. {how_to_resume(item, command)}")


def resume_line(halt, event):
    item, event = _dict(halt), _dict(event)
    return (f"RESUMED{_scope(item)} ({event.get('reason')}) at {iso(event.get('resumedAt'))} "
            f"after a halt since {iso(item.get('since'))}")


def warn_line(event):
    item, reason, request, _ = _parts(event)
    return (f"GUARD WARNING ({reason}): {title(item)} for {_text(request.get('model'), 'a request')} "
            f"(account {_text(request.get('account'), 'unknown')}); still forwarding")


# -- desktop notifications ----------------------------------------------------------

NOTIFICATION_CHARS = 200      # what the notifier keeps


def halt_notification(halt, command=DEFAULT_COMMAND):
    """(title, message). The notifier caps the text, so what happened is shortened first:
    the resume command at the end must survive whole."""
    item, reason, request, detail = _parts(halt)
    what = title(item)
    if reason == OVERAGE:
        what += f" ({_text(detail.get('signal')) or 'representative-claim=' + _claim(request, detail)})"
    tail = f". Resume: {halt_command(item, command)}"
    room = max(20, NOTIFICATION_CHARS - len(tail))
    if len(what) > room:
        what = what[:room - 3] + "..."
    return "dario halted", f"{what[:1].upper()}{what[1:]}{tail}"


def warn_notification(event):
    what = title(event)
    return "dario warning", f"{what[:1].upper()}{what[1:]}; still forwarding"
