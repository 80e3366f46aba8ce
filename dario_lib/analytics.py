"""The `/analytics` report: windows, breakdowns, utilization trend and burn rate.

Built from a `RecordStore`'s snapshot (last hour) and its running totals (all time;
the cost billed outside the subscription, and of extra usage, from its per-series
counters); `extraUsage` is the extra-usage cap's spend in its rolling window, as the
guard keeps it (`Guard.extra_usage_status`), when the caller passes it.
Pure computation over copies: safe from any thread, never blocks request threads for
longer than the copy takes.
"""

import time

from . import billing
from .records import add_to_totals, new_totals

HOUR_MS = 3_600_000
TREND_STEP_MS = 300_000
# The util5h prediction: a straight-line fit that earns a number only when it says
# something (see _minutes_to_full).
FIT_MIN_SAMPLES = 3
FIT_MIN_SPAN_MS = 60_000         # readings spread over at least a minute
FIT_MIN_R2 = 0.6                 # the line explains most of the movement
FIT_MIN_RISE = 0.005             # it rose by half a percentage point or more over the span
FIT_MAX_MINUTES = 300            # the 5h window resets before anything later than this
RESET_DROP = 0.05                # a fall this large is the window resetting: start over


def _window(totals, non_subscription_cost, extra_usage_cost):
    requests = totals["requests"]
    buckets = totals["buckets"]
    claimed = requests - buckets.get(billing.UNKNOWN, 0)
    subscription = buckets.get(billing.SUBSCRIPTION, 0) + buckets.get(billing.SUBSCRIPTION_FALLBACK, 0)
    return {
        "requests": requests,
        "inputTokens": totals["inputTokens"],
        "outputTokens": totals["outputTokens"],
        "cacheReadTokens": totals["cacheReadTokens"],
        "cacheCreateTokens": totals["cacheCreateTokens"],
        "estimatedCostUsd": round(totals["costUsd"], 4),
        # Of that, billed answers whose usage could not be read, charged their worst case.
        "unmeteredRequests": totals["unmeteredRequests"],
        "unmeteredCostUsd": round(totals["unmeteredCostUsd"], 4),
        "avgLatencyMs": round(totals["latencyMsSum"] / requests, 1) if requests else None,
        "errorRate": round(totals["errors"] / requests, 4) if requests else 0.0,
        "claimBreakdown": dict(totals["claims"]),
        "billingBucketBreakdown": dict(buckets),
        "subscriptionPercent": round(100.0 * subscription / claimed, 1) if claimed else None,
        # Answers billed outside the subscription (extra usage, API, other) and their cost.
        "nonSubscriptionRequests": sum(buckets.get(b, 0) for b in billing.NON_SUBSCRIPTION),
        "nonSubscriptionCostUsd": round(non_subscription_cost, 4),
        # Of those, answers served from extra usage (what overageGuard.allowExtraUsage caps).
        "extraUsageRequests": buckets.get(billing.EXTRA_USAGE, 0),
        "extraUsageCostUsd": round(extra_usage_cost, 4),
    }


def _keyed(table):
    return {key: {"requests": t["requests"], "inputTokens": t["inputTokens"],
                  "outputTokens": t["outputTokens"], "cacheReadTokens": t["cacheReadTokens"],
                  "cacheCreateTokens": t["cacheCreateTokens"],
                  "estimatedCostUsd": round(t["costUsd"], 4)}
            for key, t in table.items()}


def _trend(recent, now_ms):
    """Twelve 5-minute buckets over the last hour, oldest first."""
    start = now_ms - HOUR_MS
    slots = [{"start": start + i * TREND_STEP_MS, "requests": 0, "util5h": None,
              "util7d": None, "overageUtil": None} for i in range(HOUR_MS // TREND_STEP_MS)]
    for record in recent:
        index = min(int((record["timestamp"] - start) // TREND_STEP_MS), len(slots) - 1)
        if index < 0:
            continue
        slot = slots[index]
        slot["requests"] += 1
        for key in ("util5h", "util7d", "overageUtil"):
            if record.get(key) is not None:
                slot[key] = record[key]        # records are in time order: keep the latest
    return slots


def _minutes_to_full(samples):
    """When a least-squares line through [(ms, util5h)] reaches 1.0, in minutes from the
    latest reading, or None when the readings do not support a prediction: too few or
    too close together, flat or falling, too noisy to fit a line (R² below FIT_MIN_R2),
    already full, or further away than the window's own reset."""
    for i in range(len(samples) - 1, 0, -1):
        if samples[i][1] < samples[i - 1][1] - RESET_DROP:
            samples = samples[i:]           # the window reset: earlier readings say nothing
            break
    n = len(samples)
    if n < FIT_MIN_SAMPLES or samples[-1][0] - samples[0][0] < FIT_MIN_SPAN_MS:
        return None
    mean_t = sum(t for t, _ in samples) / n
    mean_u = sum(u for _, u in samples) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    var_u = sum((u - mean_u) ** 2 for _, u in samples)
    if not var_t or not var_u:
        return None
    cov = sum((t - mean_t) * (u - mean_u) for t, u in samples)
    slope = cov / var_t
    r2 = cov * cov / (var_t * var_u)
    latest = samples[-1][1]
    if (slope <= 0 or r2 < FIT_MIN_R2 or slope * (samples[-1][0] - samples[0][0]) < FIT_MIN_RISE
            or latest >= 1.0):
        return None
    minutes = (1.0 - latest) / slope / 60_000
    return round(minutes, 1) if minutes <= FIT_MAX_MINUTES else None


def _burn_rate(recent, now_ms):
    """Token and cost rate over the last 15 minutes, and when util5h would hit 100%."""
    since = now_ms - 900_000
    window = [r for r in recent if r["timestamp"] >= since]
    tokens = sum((r.get("inputTokens") or 0) + (r.get("outputTokens") or 0) for r in window)
    cost = sum(r.get("costUsd") or 0.0 for r in window)
    samples = [(r["timestamp"], r["util5h"]) for r in recent if r.get("util5h") is not None]
    return {"tokensPerMinute": round(tokens / 15, 1), "costPerHourUsd": round(cost * 4, 4),
            "util5hFullInMinutes": _minutes_to_full(samples)}


def _cost(records, buckets):
    return sum(r.get("costUsd") or 0.0 for r in records if r.get("bucket") in buckets)


def report(store, clock=time.time, extra_usage=None):
    """The report; `extra_usage`: Guard.extra_usage_status() (None: no cap configured)."""
    now_ms = int(clock() * 1000)
    recent = [r for r in store.snapshot() if r["timestamp"] >= now_ms - HOUR_MS]
    hour = new_totals()
    for record in recent:
        add_to_totals(hour, record)
    all_time, per_model, per_account = store.totals_copy()
    series, _, _ = store.metrics_copy()
    all_time_cost = sum(c["costUsd"] for (_, _, bucket, _), c in series.items() if bucket in billing.NON_SUBSCRIPTION)
    all_time_extra = sum(c["costUsd"] for (_, _, bucket, _), c in series.items() if bucket == billing.EXTRA_USAGE)
    latest = next((r for r in reversed(recent) if r.get("util5h") is not None), None)
    return {
        "generatedAt": now_ms,
        "lastHour": _window(hour, _cost(recent, billing.NON_SUBSCRIPTION), _cost(recent, (billing.EXTRA_USAGE,))),
        "allTime": _window(all_time, all_time_cost, all_time_extra),
        "extraUsage": extra_usage,
        "perModel": _keyed(per_model),
        "perAccount": _keyed(per_account),
        "utilization": {key: (latest or {}).get(key) for key in ("util5h", "util7d", "overageUtil")},
        "utilizationTrend": _trend(recent, now_ms),
        "burnRate": _burn_rate(recent, now_ms),
    }
