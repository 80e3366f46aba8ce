"""The TUI's four tabs (Status, Config, Analytics, Hits), drawn from a `tui_feed.View`.

Runs on the UI thread only and only reads: the View, the clock value it is handed and
the UI state the caller passes in. Every write goes through `tui_draw.Painter`. A halt is
worded by `guardtext`, as everywhere else.
"""

import textwrap

from . import billing, config, guardtext
from .report import duration, start_command
from .tui_draw import (ago, bar, clean, clock_time, compact, countdown, fit, percent, value_text)

NON_SUBSCRIPTION = billing.NON_SUBSCRIPTION


# -- Status -----------------------------------------------------------------------

def draw_halt_block(p, y, halt, now, command):
    """The red block of a halt; `command` is the base resume command to suggest."""
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
    if view.halt:
        y = draw_halt_block(p, y, view.halt, now, guardtext.resume_command(view.port))
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
    return lines


# -- Config -----------------------------------------------------------------------

def draw_config(p, top, editor):
    h, w = p.size
    file_config = editor.file
    p.spans(top, 1, [("Config ", "bold"), (f"({file_config.source}) ", "warn" if file_config.source == "invalid"
                                           else "normal"), (editor.path, "normal")])
    y = top + 1
    if file_config.source == "invalid":
        p.put(y, 1, "not valid JSON: saving is disabled until it is fixed", "bad")
        y += 1
    footer_rows = 5
    rows = h - 1 - y - footer_rows
    names = [key.name for key in config.SCHEMA]
    first = min(max(0, editor.selected - rows + 1), max(0, len(names) - rows))
    for row, name in enumerate(names[first:first + max(rows, 0)]):
        index = first + row
        value = editor.value(name)
        pending = name in editor.pending
        mark = "*" if pending else " "
        origin = "" if pending or name in file_config.values else "  (default)"
        text = f"{'>' if index == editor.selected else ' '}{mark}{name:<34}{value_text(value)}{origin}"
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
        p.put(y + 2, 1, f"{pending} unsaved change(s): s saves" if pending else "", "warn")
        message = editor.message
    if message:
        for offset, text in enumerate(textwrap.wrap(message[0], max(10, w - 2))[:2]):
            p.put(y + 3 + offset, 1, text, message[1])


# -- Analytics --------------------------------------------------------------------

def non_subscription_count(analytics):
    buckets = (analytics.get("allTime") or {}).get("billingBucketBreakdown") or {}
    return sum(count for bucket, count in buckets.items() if bucket in NON_SUBSCRIPTION)


def draw_analytics(p, top, view, by_tokens):
    h, w = p.size
    data = view.analytics
    if data is None:
        p.put(top, 1, "no analytics yet" + ("" if view.link == "up" else f" ({view.error})"), "dim")
        return
    hour, total = data.get("lastHour") or {}, data.get("allTime") or {}
    burn = data.get("burnRate") or {}
    util = data.get("utilization") or {}
    full_in = burn.get("util5hFullInMinutes")
    sub_pct = total.get("subscriptionPercent")
    rows = [
        ("Traffic", f"last hour {hour.get('requests', 0)}{p.dot}all time {total.get('requests', 0)}"
                    f"{p.dot}errors {(total.get('errorRate') or 0) * 100:.1f}%"
                    f"{p.dot}avg {total.get('avgLatencyMs') or '-'} ms"),
        ("Tokens", f"in {compact(total.get('inputTokens'))}{p.dot}out {compact(total.get('outputTokens'))}"
                   f"{p.dot}cache read {compact(total.get('cacheReadTokens'))}"
                   f"{p.dot}cache write {compact(total.get('cacheCreateTokens'))}"),
        ("Cost", f"est. ${hour.get('estimatedCostUsd') or 0:.4f} last hour"
                 f"{p.dot}${total.get('estimatedCostUsd') or 0:.4f} all time"),
        ("Burn rate", f"{compact(burn.get('tokensPerMinute'))} tok/min{p.dot}${burn.get('costPerHourUsd') or 0:.2f}/h"
                      + (f"{p.dot}5h window full in ~{full_in:.0f} min" if full_in is not None else "")),
        ("Billing", ("-" if sub_pct is None else f"{sub_pct}% subscription") + p.dot +
                    ", ".join(f"{b} {n}" for b, n in (total.get("billingBucketBreakdown") or {}).items())),
    ]
    for offset, (label, text) in enumerate(rows):
        p.spans(top + offset, 1, [(f"{label:<11}", "bold"), (text, "normal")])
    y = top + len(rows) + 1
    width = max(5, min(40, w - 36))
    p.put(y, 1, "Utilization", "bold")
    for offset, (label, key) in enumerate((("5h", "util5h"), ("7d", "util7d")), start=1):
        p.put(y + offset, 3, f"{label:<10}{bar(p, util.get(key), width)} {percent(util.get(key))}")
    overage, extra = util.get("overageUtil"), non_subscription_count(data)
    red = bool(overage) or extra > 0
    p.put(y + 3, 3, f"{'Overage':<10}{bar(p, overage, width)} {percent(overage)}"
          + (f"  {extra} non-subscription!" if extra else ""), "bad" if red else "normal")
    y += 5
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
                "api": "API", "other": "OTHER", "unknown": "unknown"}


def hit_columns(width):
    """(title, width) per column; the model column takes what the others leave."""
    fixed = [("TIME", 8), ("MODEL", 0), ("ACCOUNT", 12), ("ST", 3), ("TOKENS", 9),
             ("CLAIM", 11), ("BUCKET", 7), ("LAT", 6)]
    spare = width - 2 - sum(n for _, n in fixed) - (len(fixed) - 1)
    model = max(6, min(spare, 30))
    claim = 11 + min(max(0, spare - model), 15)     # wide screens: long claims too
    return [(title, model if title == "MODEL" else claim if title == "CLAIM" else n) for title, n in fixed]


def latency_text(ms):
    if ms is None:
        return "-"
    return f"{ms:.0f}ms" if ms < 10_000 else f"{ms / 1000:.1f}s"


def hit_cells(record, now_ms=None):
    tokens = f"{compact(record.get('inputTokens'))}/{compact(record.get('outputTokens'))}"
    return [clock_time(record.get("timestamp") or 0), record.get("model") or "-", record.get("account"),
            str(record.get("status") or "-"), tokens, record.get("claim"),
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
        text = " ".join(f"{fit(cell, n):<{n}}" for cell, (_, n) in zip(hit_cells(record), columns))
        style = ("badsel" if bad else "sel") if index == selected else ("bad" if bad else "normal")
        p.put(y + row, 0, ("!" if bad else " ") + " " + text, style)
