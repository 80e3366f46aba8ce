"""The request records: kept in memory, totalled, published live, appended to a log file.

A record is a plain dict (see SPEC section 5) built by the handler when a request to a
forwarded route completes. `RecordStore.add` numbers it, keeps the last `max_records`,
updates the all-time totals, publishes it on the event bus and appends it to the log
file. Publishing happens under the store's lock so subscribers see records in id order
and `subscribe_with_backlog` can hand out a gap-free, duplicate-free backlog.

Thread-safe: every mutation is under `self._lock`; readers get copies.
"""

import collections
import json
import logging
import threading

from . import billing, pricing
from .metrics import Histogram

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "upstream_error", "client_gone", "halted", "rejected")
MAX_KEYS = 1000   # distinct models/accounts tracked before lumping into "(other)"
# Rate-limit readings kept as their latest value seen (besides `windows`), for guard
# headroom, `dario status` and /metrics.
RATE_KEYS = ("util5h", "util7d", "overageUtil", "unifiedStatus", "overageStatus", "overageInUse",
             "overageReset", "resetAt", "fallback", "fallbackPercent")


def new_totals():
    return {"requests": 0, "inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0,
            "cacheCreateTokens": 0, "costUsd": 0.0, "latencyMsSum": 0, "errors": 0,
            "claims": {}, "buckets": {}, "unmeteredRequests": 0, "unmeteredCostUsd": 0.0}


def add_to_totals(totals, record):
    totals["requests"] += 1
    for key in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheCreateTokens"):
        totals[key] += record.get(key) or 0
    totals["costUsd"] += record.get("costUsd") or 0.0
    if record.get("usageEstimated"):
        # Billed answers whose usage could not be read: charged their worst case.
        totals["unmeteredRequests"] += 1
        totals["unmeteredCostUsd"] += record.get("costUsd") or 0.0
    totals["latencyMsSum"] += record.get("latencyMs") or 0
    if is_error(record):
        totals["errors"] += 1
    for field, name in (("claims", "claim"), ("buckets", "bucket")):
        counts = totals[field]
        key = record.get(name) or "unknown"
        if key in counts or len(counts) < MAX_KEYS:
            counts[key] = counts.get(key, 0) + 1


def is_error(record):
    return record.get("outcome") != "ok" or (record.get("status") or 0) >= 400


class RecordLog:
    """Appends JSON lines to `--log-file`. Failing to write is said once, never raised."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._fh = None
        self._failed = False

    def write(self, entry):
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            if self._failed:
                return
            try:
                if self._fh is None:
                    self._fh = open(self.path, "a", encoding="utf-8")
                self._fh.write(line)
                self._fh.flush()
            except OSError as err:
                self._failed = True
                log.error("cannot write log file %s (%s); records are kept in memory only",
                          self.path, err.strerror or err)

    def close(self):
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class RecordStore:
    def __init__(self, max_records=10_000, bus=None, log_file=None):
        self._lock = threading.Lock()
        self._records = collections.deque(maxlen=max_records)
        self._next_id = 1
        self._bus = bus
        self._log = RecordLog(log_file) if log_file else None
        self.totals = new_totals()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.per_model = {}
        self.per_account = {}
        self.last_claims = collections.deque(maxlen=10)
        self.last_rate = {}              # the latest rate-limit readings (_add_rate)
        self._merged_windows = None      # the windows dict last merged into last_rate
        self.series = {}                 # (model, account, bucket, outcome) -> counters, for /metrics
        self.latency = Histogram()
        self.ttfb = Histogram()

    def add(self, record):
        """Number, keep, total, publish and log one record; returns it."""
        usd, known = pricing.estimate(
            record.get("model"), record.get("inputTokens") or 0, record.get("outputTokens") or 0,
            record.get("cacheReadTokens") or 0, record.get("cacheCreateTokens") or 0)
        if record.get("usageEstimated"):
            # No usage could be read for a billed answer: the relay set its worst case.
            usd = max(usd, record.get("costUsd") or 0.0)
        record["costUsd"] = round(usd, 6)
        if not known:
            record["priceUnknown"] = True
        with self._lock:
            record["id"] = self._next_id
            self._next_id += 1
            self._records.append(record)
            add_to_totals(self.totals, record)
            self.outcomes[record["outcome"]] = self.outcomes.get(record["outcome"], 0) + 1
            self._add_keyed(self.per_model, record.get("model") or "unknown", record)
            self._add_keyed(self.per_account, record.get("account") or "anonymous", record)
            self._add_series(record)
            self._add_rate(record)
            if record.get("claim") not in (None, "unknown"):
                self.last_claims.append({"timestamp": record["timestamp"], "claim": record["claim"],
                                         "bucket": record.get("bucket")})
            if self._bus is not None:
                self._bus.publish("record", record)
        if self._log is not None:
            self._log.write(record)
        return record

    def _add_rate(self, record):
        """Fold a record's rate-limit readings into `last_rate`: the latest of each value
        seen, and of each window's fields, so a window some answers leave out (a
        model-family one, say) still shows its last reading. At most MAX_WINDOWS windows:
        a new one beyond that evicts the one updated longest ago."""
        rate = self.last_rate
        for key in RATE_KEYS:
            if record.get(key) is not None:
                rate[key] = record[key]
        if record.get("unifiedStatus") is not None or record.get("windows"):
            # An answer that carried unified headers speaks for the whole account: no
            # disabled reason in it means extra usage is no longer disabled for one.
            rate["overageDisabledReason"] = record.get("overageDisabledReason")
        source = record.get("windows")
        if not source or source is self._merged_windows:
            return                      # the very readings merged last time (billing remembers them)
        self._merged_windows = source
        windows = rate.setdefault("windows", {})
        for name, fields in source.items():
            if not isinstance(fields, dict):
                continue
            seen = windows.pop(name, None)
            if seen is None:
                if len(windows) >= billing.MAX_WINDOWS:
                    windows.pop(next(iter(windows)))
                seen = dict.fromkeys(billing.WINDOW_FIELDS.values())
            seen.update((k, v) for k, v in fields.items() if k in seen and v is not None)
            windows[name] = seen            # last in order: updated most recently

    def _rate_copy(self):
        """`last_rate` copied deep enough that a reader outside the lock sees no change."""
        copy = dict(self.last_rate)
        if "windows" in copy:
            copy["windows"] = {name: dict(fields) for name, fields in sorted(copy["windows"].items())}
        return copy

    def rate_copy(self):
        """The latest rate-limit readings (for /metrics), taken under the lock."""
        with self._lock:
            return self._rate_copy()

    def _add_series(self, record):
        key = (record.get("model") or "unknown", record.get("account") or "anonymous",
               record.get("bucket") or "unknown", record["outcome"])
        if key not in self.series and len(self.series) >= MAX_KEYS:
            key = ("(other)", "(other)", key[2], key[3])
        counters = self.series.setdefault(key, {"requests": 0, "inputTokens": 0, "outputTokens": 0,
                                                "cacheReadTokens": 0, "cacheCreateTokens": 0, "costUsd": 0.0,
                                                "unmeteredCostUsd": 0.0})
        counters["requests"] += 1
        for field in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheCreateTokens", "costUsd"):
            counters[field] += record.get(field) or 0
        if record.get("usageEstimated"):
            counters["unmeteredCostUsd"] += record.get("costUsd") or 0.0
        if record.get("latencyMs") is not None:
            self.latency.observe(record["latencyMs"] / 1000)
        if record.get("ttfbMs") is not None:
            self.ttfb.observe(record["ttfbMs"] / 1000)

    def metrics_copy(self):
        with self._lock:
            return ({key: dict(values) for key, values in self.series.items()},
                    self.latency.copy(), self.ttfb.copy())

    def _add_keyed(self, table, key, record):
        if key not in table and len(table) >= MAX_KEYS:
            key = "(other)"
        add_to_totals(table.setdefault(key, new_totals()), record)

    def set_log_file(self, path):
        """Switch the log file (config reload); records already written stay where they are."""
        old, self._log = self._log, RecordLog(path) if path else None
        if old is not None:
            old.close()

    def log_rejected(self, entry):
        """A request the gateway refused outside the forwarded routes: log file only."""
        if self._log is not None:
            self._log.write(entry)

    def snapshot(self, last=None):
        with self._lock:
            records = list(self._records)
        return records if last is None else records[-last:]

    def subscribe_with_backlog(self, bus, backlog=50):
        """Subscribe and take the last `backlog` records atomically: no gap, no repeat."""
        with self._lock:
            sub = bus.subscribe()
            return sub, list(self._records)[-backlog:]

    def summary(self):
        """Counters for /status and /health (copies, taken under the lock)."""
        with self._lock:
            return {
                "requests": self.totals["requests"],
                "outcomes": dict(self.outcomes),
                "lastClaims": list(self.last_claims),
                "lastRate": self._rate_copy(),
            }

    def totals_copy(self):
        with self._lock:
            return (json.loads(json.dumps(self.totals)), json.loads(json.dumps(self.per_model)),
                    json.loads(json.dumps(self.per_account)))

    def close(self):
        if self._log is not None:
            self._log.close()
