"""The TUI's four tabs (Status, Config, Analytics, Hits), drawn from a `tui_feed.View`.

Runs on the UI thread only and only reads: the View, the clock value it is handed and
the UI state the caller passes in. Every write goes through `tui_draw.Painter`. A halt is
worded by `guardtext`, as everywhere else.
"""

import re
import textwrap
import time

from . import billing, config, guardtext
from .report import duration, start_command
from .tui_draw import (ago, bar, clean, clock_time, compact, countdown, fit, percent, value_text)

NON_SUBSCRIPTION = billing.NON_SUBSCRIPTION


# -- Status -----------------------------------------------------------------------

def halt_origin(halt, own=None):
    """Which gateway tripped a team halt (the halt's `gateway`, on a shared store), or None."""
    gateway = halt.get("gateway")
    if not gateway:
        return None
    return "this gateway" if gateway == own else f"gateway {gateway} (another gateway on the shared store)"


def draw_halt_block(p, y, halt, now, command, own=None):
    """The red block of a halt; `command` is the base resume command to suggest; `own` is
    this gateway's id on a shared store, if it has one."""
    request = halt.get("request") or {}
    since = halt.get("since") or 0
    scope = f" for account {halt['account']}" if halt.get("account") else ""
    p.line(y, f" HALTED{scope}  {guardtext.title(halt)}{p.dot}{ago(since, now)} (since {clock_time(since)})",
           "banner")
    cause = textwrap.wrap(clean(guardtext.cause(halt)), max(20, p.size[1] - 14))[:2] or [""]
    rows = [
        ("request", p.dot.join(clean(v) for v in (request.get("model") or "unknown model",
                                                  f"account {request.get('account')}",
                                                  request.get("path") or "") if v), "normal"),
        *[("cause" if i == 0 else "", line, "bad") for i, line in enumerate(cause)],
        *([("origin", halt_origin(halt, own), "normal")] if halt_origin(halt, own) else []),
        ("resume", countdown(halt, now) + (f" (at {clock_time(halt['cooldownUntil'])})"
                                            if halt.get("cooldownUntil") else ""), "bold"),
        ("", f"R resume{p.dot}r refresh{p.dot}or run `{guardtext.halt_command(halt, command)}`", "normal"),
    ]
    for offset, (label, text, style) in enumerate(rows, start=1):
        p.put(y + offset, 3, label)
        p.put(y + offset, 13, text, style)
    return y + len(rows) + 1


def _halt_count(guard):
    trips, halts = guard.get("trips"), guard.get("halts")
    if isinstance(trips, dict):
        return sum(v for v in trips.values() if isinstance(v, int))
    return halts if isinstance(halts, int) else 0


def draw_status(p, top, view, now):
    y = top
    status = view.status
    if status is None:
        # Wrapped: what to do (a 401 names the variable to set) comes after the address.
        text = clean(view.error or f"connecting to the gateway on 127.0.0.1:{view.port} ...")
        lines = textwrap.wrap(text, max(10, p.size[1] - 2))[:4] or [""]
        for line in lines:
            p.put(y, 1, line, "bad" if view.link != "connecting" else "bold")
            y += 1
        p.put(y, 3, f"Start one with `{start_command(view.port)}`." if view.link == "down" else "")
        if view.updated_at is not None:
            p.put(y + 1, 3, f"last seen {duration(now - view.updated_at)} ago", "dim")
        return
    guard = status.get("guard") or {}
    cfg = guard.get("config") or {}
    own = (status.get("store") or {}).get("gateway")
    if view.halt:
        y = draw_halt_block(p, y, view.halt, now, guardtext.resume_command(view.port), own)
        others = [h for h in guard.get("halts") or [] if isinstance(h, dict)
                  and (h.get("since"), h.get("account")) != (view.halt.get("since"), view.halt.get("account"))]
        if others:
            p.put(y, 3, "also halted: " + ", ".join(f"{h.get('account') or 'gateway'} ({guardtext.title(h)})"
                                                      for h in others), "bad")
            y += 1
    else:
        p.spans(y, 1, [("Guard      ", "bold"), ("normal", "good") if cfg.get("enabled") else ("off", "warn")])
        cooldown = cfg.get("cooldownMs") or 0
        rows = [("mode", "enabled" if cfg.get("enabled") else "off: nothing is detected"),
                ("behavior", cfg.get("behavior")),
                ("cooldown", f"{duration(cooldown / 1000)} (then automatic resume)" if cooldown
                 else "0 (manual resume only)"),
                ("notify", "on" if cfg.get("notifyOs") else "off"),
                ("history", f"{_halt_count(guard)} halt(s), {guard.get('warnings', 0)} warning(s) since start")]
        scope = (guard.get("guards") or {}).get("scope")
        if scope:
            rows.insert(2, ("scope", "each account halts on its own" if scope == "account" else "the whole gateway"))
        for offset, (label, text) in enumerate(rows, start=1):
            p.put(y + offset, 3, label)
            p.put(y + offset, 13, str(text))
        y += len(rows) + 1
    headroom = guard_headroom(status)
    if headroom:
        p.put(y + 1, 1, "Guards", "bold")
        for offset, (text, style) in enumerate(headroom):
            p.put(y + 1 + offset, 13, text, style)
        y += len(headroom) + 1
    disabled = (status.get("lastRate") or {}).get("overageDisabledReason")
    if disabled:
        # The API says extra usage is off for this account, and why (out_of_credits, ...).
        p.put(y + 1, 1, "Overage", "bold")
        p.put(y + 1, 13, f"extra usage disabled by the API: {disabled}", "warn")
        y += 2
    y += 1
    p.spans(y, 1, [("Gateway    ", "bold"), (f"dario {status.get('version')}{p.dot}{status.get('bind')} -> "
                                            f"{status.get('upstream')}", "normal")])
    p.put(y + 1, 3, "uptime")
    p.put(y + 1, 13, f"{duration(status.get('uptimeS') or 0)}{p.dot}auth {status.get('auth', '-')}")
    p.put(y + 2, 3, "config")
    p.put(y + 2, 13, f"{status.get('configSource')}: {status.get('configPath')}",
          "warn" if status.get("configSource") == "invalid" else "normal")
    y += 4
    outcomes = status.get("outcomes") or {}
    counts = p.dot.join(f"{name} {count}" for name, count in outcomes.items() if count)
    p.spans(y, 1, [("Requests   ", "bold"), (f"{status.get('requests', 0)} total", "normal"),
                   (f"{p.dot}{counts}" if counts else "", "normal"),
                   (f"{p.dot}in flight {status.get('inFlight', 0)}", "dim")])
    runs = []                                   # last claims, repeats folded: five_hour x4
    for item in status.get("lastClaims") or []:
        if runs and runs[-1][0] == item.get("claim"):
            runs[-1][2] += 1
        else:
            runs.append([item.get("claim"), item.get("bucket") in NON_SUBSCRIPTION, 1])
    if runs:
        x = p.put(y + 1, 3, "claims     ")
        for claim, bad, count in runs[-6:]:
            x = p.put(y + 1, x, f"{claim}{'!' if bad else ''}{f' x{count}' if count > 1 else ''}  ",
                      "bad" if bad else "normal")

def guard_headroom(status):
    """[(text, style)]: each configured trip-wire and how close it is, e.g. "util5h 72% of 95% halt"."""
    guards = (status.get("guard") or {}).get("guards") or {}
    rate = status.get("lastRate") or {}
    lines = []
    for metric, levels in sorted((guards.get("utilization") or {}).items()):
        value = rate.get(metric)
        limits = ", ".join(f"{level} {levels[level]:.0%}" for level in ("warn", "halt") if level in levels)
        shown = f"{value:.0%}" if isinstance(value, (int, float)) else "not seen yet"
        over = isinstance(value, (int, float)) and any(value >= v for v in levels.values())
        lines.append((f"{metric} {shown} ({limits})", "bad" if over else "normal"))
    statuses = guards.get("unifiedStatus") or {}
    if statuses:
        current = rate.get("unifiedStatus") or "not seen yet"
        limits = "; ".join(f"{level} on {', '.join(names)}" for level, names in sorted(statuses.items()))
        lines.append((f"status {current} ({limits})", "bad" if current in statuses.get("halt", ()) else "normal"))
    for budget in status.get("budgets") or []:
        spent, usd = budget.get("spentUsd", 0), budget.get("usd", 0)
        style = "bad" if spent >= usd else "warn" if spent >= usd * budget.get("warnAt", 0.8) else "normal"
        lines.append((f"${spent:.2f} of ${usd:.2f} per {budget.get('window')} for {budget.get('account')}",
                      style))
    for text, level in guardtext.extra_usage_lines(status.get("extraUsage"), guards.get("extraUsage")):
        lines.append((text, level))
    return lines


# -- Config -----------------------------------------------------------------------

def draw_config(p, top, editor, port):
    h, w = p.size
    state = editor.state
    if state is None:
        p.spans(top, 1, [("Config ", "bold"), ("of the gateway on 127.0.0.1:" + str(port), "normal")])
        lines = [(line, "bad") for line in textwrap.wrap(clean(editor.error or "waiting for the gateway ..."),
                                                          max(10, w - 4))[:3]]
        lines += [("", "normal"), ("This tab edits the running gateway's own config and applies it.", "dim"),
                  ("With no gateway, `dario config set KEY VALUE` edits $DARIO_HOME/config.json.", "dim")]
        if editor.message:
            lines += [("", "normal"), editor.message]
        for offset, (line, style) in enumerate(lines, start=2):
            p.put(top + offset, 3, line, style)
        return
    source = state.get("source")
    p.spans(top, 1, [("Config ", "bold"), (f"({source}) ", "warn" if source == "invalid" else "normal"),
                     (str(state.get("path")), "normal")])
    y = top + 1
    if source == "invalid":
        p.put(y, 1, "not valid JSON: saving is disabled until it is fixed", "bad")
        y += 1
    footer_rows = 5
    rows = h - 1 - y - footer_rows
    names = [key.name for key in config.SCHEMA]
    first = min(max(0, editor.selected - rows + 1), max(0, len(names) - rows))
    for row, name in enumerate(names[first:first + max(rows, 0)]):
        index = first + row
        pending = name in editor.pending
        mark = "*" if pending else " "
        text = (f"{'>' if index == editor.selected else ' '}{mark}{name:<34}"
                f"{value_text(editor.value(name))}{editor.origin(name)}")
        style = "sel" if index == editor.selected else ("warn" if pending else "normal")
        p.put(y + row, 1, text.ljust(w - 2) if index == editor.selected else text, style)
    y = h - 1 - footer_rows
    key = config.SCHEMA_BY_NAME[names[editor.selected]]
    p.put(y, 1, f"{key.name}: {key.doc}", "dim")
    p.put(y + 1, 1, f"allowed: {getattr(key.kind, 'allowed', '')}", "dim")
    if editor.prompt is not None:
        p.put(y + 2, 1, f"{key.name} = ", "bold")
        x = 1 + len(key.name) + 3
        shown = editor.prompt.text[-max(1, w - x - 2):]
        p.put(y + 2, x, shown, "dim" if editor.prompt.fresh else "normal")
        p.put(y + 2, x + len(shown), " ", "sel")          # the cursor
        message = (editor.prompt.error, "bad") if editor.prompt.error else (
            "typing replaces the value, Backspace edits it; Enter applies, Esc cancels", "dim")
    else:
        pending = len(editor.pending)
        p.put(y + 2, 1, f"{pending} unsaved change(s): s saves and applies them" if pending else "", "warn")
        message = editor.message
    if message:
        for offset, text in enumerate(textwrap.wrap(message[0], max(10, w - 2))[:2]):
            p.put(y + 3 + offset, 1, text, message[1])


# -- Analytics --------------------------------------------------------------------

LABEL = 11                      # "Burn rate  ": the label column of the Analytics rows


def non_subscription(analytics):
    """(requests, estimated USD) billed outside the subscription, all time."""
    total = analytics.get("allTime") or {}
    count = total.get("nonSubscriptionRequests")
    if count is None:           # a gateway from before the field: count the buckets
        buckets = total.get("billingBucketBreakdown") or {}
        count = sum(n for bucket, n in buckets.items() if bucket in NON_SUBSCRIPTION)
    return count, total.get("nonSubscriptionCostUsd")


def usd(amount, digits=4):
    return f"${amount or 0:.{digits}f}"


def windows_seen(view):
    """[(label, utilization, status, reset)] per rate-limit window: from /status
    `lastRate.windows` when the gateway reports them, else the 5h and 7d readings."""
    rate = (view.status or {}).get("lastRate") or {}
    windows = rate.get("windows")
    if isinstance(windows, dict) and windows:
        return [(name, fields.get("utilization"), fields.get("status"), fields.get("reset"))
                for name, fields in sorted(windows.items()) if isinstance(fields, dict)]
    util = (view.analytics or {}).get("utilization") or {}
    return [("5h", util.get("util5h", rate.get("util5h")), None, None),
            ("7d", util.get("util7d", rate.get("util7d")), None, None)]


def reset_text(reset, now):
    """A window's reset (epoch seconds, as the header gives it) as a local time."""
    try:
        at = float(reset)
    except (TypeError, ValueError):
        return clean(reset) if reset else ""
    if at > 1e12:
        at /= 1000                  # milliseconds
    if not 0 < at < 1e11:
        return ""
    return time.strftime("%H:%M" if at - now < 86_400 else "%a %H:%M", time.localtime(at))


def analytics_rows(p, data):
    """[(label, text)] of the summary rows (draw_analytics fits each to the width)."""
    hour, total = data.get("lastHour") or {}, data.get("allTime") or {}
    burn = data.get("burnRate") or {}
    full_in = burn.get("util5hFullInMinutes")
    avg = total.get("avgLatencyMs")
    rows = [
        ("Traffic", f"last hour {hour.get('requests', 0)}{p.dot}all time {total.get('requests', 0)}"
                    f"{p.dot}errors {(total.get('errorRate') or 0) * 100:.1f}%"
                    f"{p.dot}avg {'-' if avg is None else f'{avg:.0f}'} ms"),
        ("Tokens", f"in {compact(total.get('inputTokens'))}{p.dot}out {compact(total.get('outputTokens'))}"
                   f"{p.dot}cache read {compact(total.get('cacheReadTokens'))}"
                   f"{p.dot}cache write {compact(total.get('cacheCreateTokens'))}"),
        ("Cost", f"est. {usd(hour.get('estimatedCostUsd'))} last hour{p.dot}"
                 f"{usd(total.get('estimatedCostUsd'))} all time"),
    ]
    if total.get("unmeteredRequests"):
        # Billed answers whose usage could not be read, charged their worst case.
        rows.append(("Unmetered", f"{total['unmeteredRequests']} billed without readable usage, "
                                  f"charged {usd(total.get('unmeteredCostUsd'))} (worst case)"))
    rows += [
        ("Burn rate", f"{compact(burn.get('tokensPerMinute'))} tok/min{p.dot}{usd(burn.get('costPerHourUsd'), 2)}/h"
                      + (f"{p.dot}5h window full in ~{full_in:.0f} min" if full_in is not None else "")),
        ("Billing", billing_text(total)),
    ]
    return rows


def billing_text(total):
    """e.g. "97.5% subscription: 123.0k (3.0k fallback), 3 outside, 453 unknown"."""
    buckets = total.get("billingBucketBreakdown") or {}
    sub, fallback = buckets.get(billing.SUBSCRIPTION, 0), buckets.get(billing.SUBSCRIPTION_FALLBACK, 0)
    outside = sum(n for bucket, n in buckets.items() if bucket in NON_SUBSCRIPTION)
    unknown = buckets.get(billing.UNKNOWN, 0)
    pct = total.get("subscriptionPercent")
    text = "no claims yet" if pct is None else f"{pct}% subscription: {compact(sub + fallback)}"
    if fallback:
        text += f" ({compact(fallback)} fallback)"
    if outside:
        text += f", {compact(outside)} outside"
    if unknown:
        text += f", {compact(unknown)} unknown"
    return text


def draw_analytics(p, top, view, by_tokens, now):
    h, w = p.size
    data = view.analytics
    if data is None:
        p.put(top, 1, "no analytics yet" + ("" if view.link == "up" else f" ({view.error})"), "dim")
        return
    room = max(10, w - 2 - LABEL)
    rows = analytics_rows(p, data)
    for offset, (label, text) in enumerate(rows):
        p.spans(top + offset, 1, [(f"{label:<{LABEL}}", "bold"), (fit(text, room), "normal")])
    y = top + len(rows) + 1
    width = max(5, min(30, w - 56))
    p.put(y, 1, "Utilization", "bold")
    y += 1
    for label, value, status, reset in windows_seen(view)[:max(1, h - y - 8)]:
        tail = "" if status in (None, "allowed") else f" {status}"
        when = reset_text(reset, now)
        tail += f"  resets {when}" if when else ""
        style = "bad" if status == "rejected" else "normal" if status in (None, "allowed") else "warn"
        p.put(y, 3, f"{fit(label, 9):<10}{bar(p, value, width)} {percent(value)}"
                    + fit(tail, max(0, w - 3 - 10 - width - 7)), style)
        y += 1
    overage = ((view.status or {}).get("lastRate") or {}).get("overageUtil")
    if overage is None:
        overage = (data.get("utilization") or {}).get("overageUtil")
    count, cost = non_subscription(data)
    extra = f"  {count} non-subscription, est. {usd(cost, 2)}" if count else ""
    p.put(y, 3, f"{'Overage':<10}{bar(p, overage, width)} {percent(overage)}"
                + fit(extra, max(0, w - 3 - 10 - width - 7)), "bad" if overage or count else "normal")
    y += 2
    per_model = data.get("perModel") or {}
    p.put(y, 1, f"Per model (by {'tokens' if by_tokens else 'requests'}; t switches)", "bold")

    def amount(entry):
        return (entry.get("inputTokens", 0) + entry.get("outputTokens", 0)) if by_tokens else entry.get("requests", 0)
    ranked = sorted(per_model.items(), key=lambda item: -amount(item[1]))
    top_amount = max([amount(e) for _, e in ranked] + [1])
    name_width = max(10, min(28, w - width - 20))
    for offset, (model, entry) in enumerate(ranked[:max(0, h - 2 - y - 1)], start=1):
        p.put(y + offset, 3, f"{fit(model, name_width):<{name_width}} {bar(p, amount(entry) / top_amount, width)}"
                             f" {compact(amount(entry))}")

# -- Hits -------------------------------------------------------------------------

BUCKET_SHORT = {"subscription": "sub", "subscription_fallback": "sub-fb", "extra_usage": "EXTRA",
                "api": "API", "other": "OTHER", "unknown": "-"}
PATH_SHORT = {"/v1/messages": "msg", "/v1/messages/count_tokens": "count", "/v1/complete": "compl",
              "/v1/chat/completions": "chat", "/v1/models": "models"}


def hit_columns(width):
    """(title, width) per column; the model column takes what the others leave (up to
    24), then wide screens give claims, accounts and models more room. 80 columns fit."""
    fixed = [("TIME", 8), ("PATH", 6), ("MODEL", 0), ("ACCOUNT", 10), ("ST", 6), ("TOKENS", 9),
             ("CLAIM", 9), ("BUCKET", 6), ("LAT", 5)]
    spare = width - 2 - sum(n for _, n in fixed) - (len(fixed) - 1)
    model = max(8, min(spare, 24))
    claim = min(max(0, spare - model), 12)
    account = min(max(0, spare - model - claim), 6)
    model += min(max(0, spare - model - claim - account), 16)
    grow = {"MODEL": model, "CLAIM": 9 + claim, "ACCOUNT": 10 + account}
    return [(title, grow.get(title, n)) for title, n in fixed]


def latency_text(ms):
    """At most five characters: 850ms, 12.3s, 600s."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s" if ms < 99_950 else f"{ms / 1000:.0f}s"


def path_text(path):
    if not path:
        return "-"
    if path in PATH_SHORT:
        return PATH_SHORT[path]
    return "model" if path.startswith("/v1/models/") else path


def model_text(model, width):
    """A model name that fits: whole when it can be, else without the `claude-` prefix and
    the date suffix (claude-opus-4-5-20251101 -> opus-4-5), else cut."""
    text = clean(model or "-")
    if len(text) > width:
        text = re.sub(r"-(\d{8}|latest)$", "", re.sub(r"^claude-", "", text))
    return fit(text, width)


def account_text(account, width):
    text = clean(account or "-")
    return text[4:] if len(text) > width and text.startswith("key:") else text


def status_text(record):
    if record.get("outcome") == "halted":
        return "halted"
    return str(record.get("status") or "-")


def hit_cells(record, columns):
    widths = dict(columns)
    tokens = f"{compact(record.get('inputTokens'))}/{compact(record.get('outputTokens'))}"
    return [clock_time(record.get("timestamp") or 0), path_text(record.get("path")),
            model_text(record.get("model"), widths["MODEL"]), account_text(record.get("account"), widths["ACCOUNT"]),
            status_text(record), tokens, record.get("claim"),
            BUCKET_SHORT.get(record.get("bucket"), record.get("bucket")), latency_text(record.get("latencyMs"))]


def draw_hits(p, top, view, selected, now):
    h, w = p.size
    y = top
    if view.halt:
        halt = view.halt
        request = halt.get("request") or {}
        p.line(y, f" HALTED {ago(halt.get('since') or 0, now)}{p.dot}{guardtext.title(halt)}{p.dot}"
                  f"{request.get('model')}", "banner")
        p.line(y + 1, f" {countdown(halt, now)}{p.dot}R resume", "banner")
        y += 2
    columns = hit_columns(w)
    p.put(y, 2, " ".join(f"{title:<{n}}" for title, n in columns), "bold")
    y += 1
    rows = view.hits
    if not rows:
        p.put(y, 2, "no requests yet: they appear here as they complete", "dim")
        return
    visible = max(1, h - 1 - y)
    first = min(max(0, selected - visible + 1), max(0, len(rows) - visible))
    for row, record in enumerate(rows[first:first + visible]):
        index = first + row
        bad = record.get("bucket") in NON_SUBSCRIPTION
        text = " ".join(f"{fit(cell, n):<{n}}" for cell, (_, n) in zip(hit_cells(record, columns), columns))
        style = ("badsel" if bad else "sel") if index == selected else ("bad" if bad else "normal")
        p.put(y + row, 0, ("!" if bad else " ") + " " + text, style)
