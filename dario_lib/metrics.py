"""`GET /metrics` in the Prometheus text format (version 0.0.4).

Series: requests and tokens by model, account, bucket and outcome; guard state and
trips by reason; spend by budget; extra-usage spend against its cap; the latest reading
of every rate-limit window the upstream reported (utilization, reset time, status) and
of extra usage; the relay latency and time-to-first-byte histograms.
Label values are the record's own (bounded in number by the record store) and go
through `inert.prom_label`: a model name from a request can neither break the format nor
(with a lone surrogate) keep the body from encoding to UTF-8.

`render` reads copies taken under the owners' locks: safe from any thread.
"""

from . import __version__, inert

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_KINDS = (("inputTokens", "input"), ("outputTokens", "output"),
               ("cacheReadTokens", "cache_read"), ("cacheCreateTokens", "cache_create"))


class Histogram:
    """Cumulative-bucket histogram; not locked itself (the record store's lock covers it)."""

    def __init__(self, bounds=LATENCY_BUCKETS_S):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds):
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1

    def copy(self):
        other = Histogram(self.bounds)
        other.counts, other.count, other.total = list(self.counts), self.count, self.total
        return other


def _labels(**labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{inert.prom_label(v)}"' for k, v in labels.items()) + "}"


def _number(value):
    if isinstance(value, float):
        return repr(round(value, 9))
    return str(value)


class _Out:
    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text):
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name, value, **labels):
        self.lines.append(f"{name}{_labels(**labels)} {_number(value)}")

    def histogram(self, name, hist):
        for bound, count in zip(hist.bounds, hist.counts):
            self.sample(name + "_bucket", count, le=_number(float(bound)))
        self.sample(name + "_bucket", hist.count, le="+Inf")
        self.sample(name + "_sum", round(hist.total, 6))
        self.sample(name + "_count", hist.count)


def _epoch_seconds(text):
    """A reset header's value as epoch seconds, or None when it is not a plain number."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 1e12 else None


def _rate_limits(out, rate):
    """The latest rate-limit readings (RecordStore.rate_copy()): one series per window."""
    windows = rate.get("windows") or {}
    if windows:
        out.family("dario_window_utilization", "gauge",
                   "Latest utilization of each rate-limit window the upstream reported (1 = full).")
        for name, fields in windows.items():
            if fields.get("utilization") is not None:
                out.sample("dario_window_utilization", fields["utilization"], window=name)
        out.family("dario_window_reset_timestamp_seconds", "gauge", "When each window resets (Unix time).")
        for name, fields in windows.items():
            reset = _epoch_seconds(fields.get("reset"))
            if reset is not None:
                out.sample("dario_window_reset_timestamp_seconds", reset, window=name)
        out.family("dario_window_surpassed_threshold", "gauge",
                   "The utilization threshold a window has surpassed, when the upstream says so.")
        for name, fields in windows.items():
            if fields.get("surpassedThreshold") is not None:
                out.sample("dario_window_surpassed_threshold", fields["surpassedThreshold"], window=name)
        out.family("dario_window_status", "gauge", "1 for each window's latest status (allowed, rejected, ...).")
        for name, fields in windows.items():
            if fields.get("status") is not None:
                out.sample("dario_window_status", 1, window=name, status=fields["status"])
    if rate.get("overageUtil") is not None:
        out.family("dario_overage_utilization", "gauge", "Latest utilization of extra usage.")
        out.sample("dario_overage_utilization", rate["overageUtil"])
    if rate.get("overageDisabledReason"):
        out.family("dario_overage_disabled", "gauge", "1 while the upstream says extra usage is disabled, and why.")
        out.sample("dario_overage_disabled", 1, reason=rate["overageDisabledReason"])


def render(server):
    out = _Out()
    series, latency, ttfb = server.store.metrics_copy()
    # Sorted by the labels' text: a label that is not a str (None, say) cannot make
    # the comparison raise.
    series = sorted(series.items(), key=lambda item: tuple(map(str, item[0])))
    guard = server.guard
    halts = guard.halts()

    out.family("dario_info", "gauge", "Build information.")
    out.sample("dario_info", 1, version=__version__)
    out.family("dario_requests_total", "counter", "Requests to forwarded routes.")
    for (model, account, bucket, outcome), values in series:
        out.sample("dario_requests_total", values["requests"], model=model, account=account,
                   bucket=bucket, outcome=outcome)
    out.family("dario_tokens_total", "counter", "Metered tokens.")
    for (model, account, bucket, outcome), values in series:
        for field, kind in TOKEN_KINDS:
            if values[field]:
                out.sample("dario_tokens_total", values[field], model=model, account=account,
                           bucket=bucket, outcome=outcome, kind=kind)
    out.family("dario_cost_usd_total", "counter", "Estimated cost in USD.")
    for (model, account, bucket, outcome), values in series:
        if values["costUsd"]:
            out.sample("dario_cost_usd_total", values["costUsd"], model=model, account=account,
                       bucket=bucket, outcome=outcome)
    out.family("dario_unmetered_cost_usd_total", "counter",
               "Of the cost, billed answers whose usage could not be read, charged their worst case.")
    for (model, account, bucket, outcome), values in series:
        if values.get("unmeteredCostUsd"):
            out.sample("dario_unmetered_cost_usd_total", values["unmeteredCostUsd"], model=model,
                       account=account, bucket=bucket, outcome=outcome)

    out.family("dario_guard_halted", "gauge", "1 while halted (account empty: the whole gateway).")
    out.sample("dario_guard_halted", 1 if any(h.account is None for h in halts) else 0, account="")
    for halt in halts:
        if halt.account is not None:
            out.sample("dario_guard_halted", 1, account=halt.account)
    out.family("dario_guard_trips_total", "counter", "Halts by reason since start.")
    for reason, count in sorted(guard.trips.items()):
        out.sample("dario_guard_trips_total", count, reason=reason)
    out.family("dario_guard_warnings_total", "counter", "Guard warnings since start.")
    out.sample("dario_guard_warnings_total", guard.warnings)

    budgets = server.budgets.status()
    if budgets:
        out.family("dario_spend_usd", "gauge", "Estimated spend in the budget's window.")
        for b in budgets:
            out.sample("dario_spend_usd", b["spentUsd"], account=b["account"], window=b["window"])
        out.family("dario_budget_usd", "gauge", "The budget's limit.")
        for b in budgets:
            out.sample("dario_budget_usd", b["usd"], account=b["account"], window=b["window"])

    extra_usage_series(out, server.guard.extra_usage_status(server.budgets))
    _rate_limits(out, server.store.rate_copy())

    out.family("dario_request_duration_seconds", "histogram", "Relay latency, request to last byte.")
    out.histogram("dario_request_duration_seconds", latency)
    out.family("dario_upstream_ttfb_seconds", "histogram", "Request arrival to upstream headers.")
    out.histogram("dario_upstream_ttfb_seconds", ttfb)
    out.family("dario_in_flight_requests", "gauge", "Forwarded requests in flight.")
    out.sample("dario_in_flight_requests", server.tracker.count)
    out.family("dario_open_connections", "gauge", "Open client connections.")
    out.sample("dario_open_connections", server.connections)
    store_series(out, server)
    return "\n".join(out.lines) + "\n"


def extra_usage_series(out, extra):
    """The extra-usage cap (`overageGuard.allowExtraUsage`): spend, holds in flight and
    the cap per account ("*": all traffic, proxy scope), labels as dario_spend_usd's."""
    if not extra:
        return
    caps = extra["caps"]
    out.family("dario_extra_usage_usd", "gauge",
               "Estimated cost of answers served from extra usage in the cap's window.")
    for cap in caps:
        out.sample("dario_extra_usage_usd", cap["spentUsd"], account=cap["account"], window=extra["window"])
    out.family("dario_extra_usage_reserved_usd", "gauge",
               "Worst cases held against the extra-usage cap by requests in flight.")
    for cap in caps:
        out.sample("dario_extra_usage_reserved_usd", cap["reservedUsd"], account=cap["account"],
                   window=extra["window"])
    out.family("dario_extra_usage_cap_usd", "gauge", "The extra-usage cap (overageGuard.allowExtraUsage.usd).")
    for cap in caps:
        out.sample("dario_extra_usage_cap_usd", extra["usd"], account=cap["account"], window=extra["window"])
    out.family("dario_extra_usage_active", "gauge", "1 while the last answer was served from extra usage.")
    for cap in caps:
        out.sample("dario_extra_usage_active", 1 if cap["inExtraUsage"] else 0, account=cap["account"])


def store_series(out, server):
    """The team's Redis store (`store.url = redis://…`): up, errors, round trips. None
    for the file store. Numbers are copies taken under the store's lock."""
    team = getattr(server, "team", None)
    if team is None:
        return
    numbers = team.metrics()
    out.family("dario_store_up", "gauge", "1 while the team's Redis store answers.")
    out.sample("dario_store_up", numbers["up"])
    out.family("dario_store_errors_total", "counter", "Calls to the Redis store that failed or timed out.")
    out.sample("dario_store_errors_total", numbers["errors"])
    out.family("dario_store_roundtrip_seconds", "histogram", "Round trips to the Redis store.")
    out.histogram("dario_store_roundtrip_seconds", numbers["roundtrip"])
