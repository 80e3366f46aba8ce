"""Which billing pool a response was charged to, read from its rate-limit headers.

The upstream names the pool in `anthropic-ratelimit-unified-representative-claim`.
`classify()` maps that claim to a bucket with an allow-list: only claims known to be
billed to the subscription count as such, and any string we have never seen is `other`,
so a new billing mode halts the gateway instead of slipping through.

`parse_ratelimit()` also looks past the claim for every other sign of extra billing
(`overage-in-use`, a rejected status with overage allowed) and names the first one it
finds in `billingSignal`: that, not the bucket, is what the guard trips on.

It also reads every rate-limit window the upstream reports, by the shape of the header
name (`anthropic-ratelimit-unified-<window>-<field>`), so windows it has never heard of
(`7d_oi`, ...) are kept too. `utilization()` and `statuses()` are how the guard reads a
window's numbers by the names the config uses.

Pure functions, no state: safe from any thread.
"""

import functools
import re

SUBSCRIPTION = "subscription"
SUBSCRIPTION_FALLBACK = "subscription_fallback"
EXTRA_USAGE = "extra_usage"
API = "api"
UNKNOWN = "unknown"
OTHER = "other"

BUCKETS = (SUBSCRIPTION, SUBSCRIPTION_FALLBACK, EXTRA_USAGE, API, UNKNOWN, OTHER)

SUBSCRIPTION_CLAIMS = frozenset({
    "five_hour",
    "seven_day",
    "seven_day_opus",
    "seven_day_sonnet",
    "five_hour_overage_included",
    "seven_day_overage_included",
})
FALLBACK_CLAIMS = frozenset({"five_hour_fallback", "seven_day_fallback"})

# Buckets billed outside the subscription pool: these are what the guard reacts to.
NON_SUBSCRIPTION = frozenset({EXTRA_USAGE, API, OTHER})

HEADER_PREFIX = "anthropic-ratelimit-unified-"

# Per-window headers: `<prefix><window>-<field>`. A window name is lowercase letters,
# digits, `_` and `-`, at most 32 characters. None of the other unified headers
# (`representative-claim`, `overage-in-use`, `fallback-percentage`,
# `overage-disabled-reason`, ...) ends in `-<field>`, so none is read as a window.
WINDOW_FIELDS = {"utilization": "utilization", "status": "status", "reset": "reset",
                 "surpassed-threshold": "surpassedThreshold"}
WINDOW_NAME = r"[a-z0-9][a-z0-9_-]{0,31}"
_WINDOW_HEADER = re.compile(f"({WINDOW_NAME})-({'|'.join(WINDOW_FIELDS)})")     # a suffix after the prefix
_PREFIX_LEN = len(HEADER_PREFIX)
MAX_WINDOWS = 32            # a hostile upstream cannot grow a record past this
# `overage` is shaped like a window (`overage-utilization`, `-status`, `-reset`) but is
# the extra-usage pool, not a limit on the subscription: its status reads "rejected"
# whenever extra usage is off. So it is kept out of `windows` (a guard on window
# statuses would otherwise halt every account without extra usage) and read into the
# record's `overage*` fields instead.
OVERAGE_WINDOW = "overage"

# Config names of the utilization readings kept since before windows were generic.
UTIL_FIELDS = {"util5h": "util5h", "util7d": "util7d", "overageUtil": "overageUtil",
               OVERAGE_WINDOW: "overageUtil"}


def classify(claim, extra_subscription_claims=frozenset()):
    """Return the billing bucket for a representative-claim value (None = absent).

    A header that is present but says "unknown", or is empty, is `other`: only a
    missing header is `unknown`, the one bucket that never trips the guard.
    """
    if claim is None:
        return UNKNOWN
    if claim in SUBSCRIPTION_CLAIMS or claim in extra_subscription_claims:
        return SUBSCRIPTION
    if claim in FALLBACK_CLAIMS:
        return SUBSCRIPTION_FALLBACK
    if claim == "overage":
        return EXTRA_USAGE
    if claim == "api":
        return API
    return OTHER


def _fraction(value):
    """A utilization header as a float, or None when absent or not a finite number."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return number


def _bool(value):
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    return None


def _bounded(value, limit=64):
    """Header text kept in records: stripped, capped, printable."""
    if value is None:
        return None
    value = value.strip()[:limit]
    if value.isprintable():
        return value
    return "".join(ch for ch in value if ch.isprintable())


def unified(headers):
    """{suffix (lowercased): [values, in order]} of a response's unified rate-limit headers,
    read off the headers' own lowercased index (on the hot path: no copy, no lower())."""
    # Names in the index are lowercased ASCII (a non-ASCII name is kept as it came, so it
    # can never pass for one of these).
    return {name[_PREFIX_LEN:]: values for name, values in headers.by_name()
            if name.startswith(HEADER_PREFIX) and len(name) > _PREFIX_LEN}


def _values(found, suffix):
    """Every value of a unified header, a comma-separated value counting as several."""
    raw = found.get(suffix)
    if not raw:
        return []
    if len(raw) == 1 and "," not in raw[0]:
        value = raw[0].strip()
        return [value] if value else [""]      # present and empty still counts (see below)
    values = [part.strip() for value in raw for part in value.split(",")]
    # Empty list elements are ignored (RFC 9110 5.6.1), but a header that is present
    # and empty still counts: as a claim, that is `other`, which trips.
    return [v for v in values if v] or ([""] if raw else [])


def parse_ratelimit(headers, extra_subscription_claims=frozenset()):
    """Read the unified rate-limit headers of a response (see `_parse`).

    Answers in a row usually carry the very same rate-limit headers, so the result is
    remembered for the last few distinct sets (keyed by the headers' exact text): a hit
    costs a dict copy instead of a parse, on every forwarded request. The copy is the
    caller's; its `windows` dict is shared with other results and must not be changed.
    """
    found = unified(headers)
    key = (tuple((suffix, tuple(values)) for suffix, values in found.items()), extra_subscription_claims)
    try:
        return dict(_parse_cached(key, found))
    except TypeError:                   # unhashable: never from a Headers object
        return dict(_parse(found, extra_subscription_claims))


def _parse_cached(key, found):
    cached = _PARSED.get(key)
    if cached is None:
        cached = _parse(found, key[1])
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()             # rare (values changing all the time); safe from any thread
        _PARSED[key] = cached
    return cached


_PARSED = {}                # parse_ratelimit's memory: (header text, claims) -> result
_PARSED_MAX = 64


def _parse(found, extra_subscription_claims):
    """Read the unified rate-limit headers (`unified()`'s dict) of a response.

    `headers` has `.get(name)` and `.get_all(name) -> list | None`, case-insensitive
    (`headers.Headers`). Returns the record fields they feed, including `billingSignal`:
    the first sign that the response was billed outside the subscription, or None.

    - any representative-claim value outside the subscription and fallback lists
      (every value of a repeated header counts): `representative-claim=<claim>`;
    - `overage-in-use: true`: `overage-in-use=true`;
    - `status: rejected` with `overage-status: allowed|allowed_warning`:
      `status=rejected+overage-status=<that>` (Claude Code's own test for an answer
      served from extra usage).

    `overage-utilization` alone never signals (it can read 1 while overage is not in
    use), nor does a response without unified headers. `claim` is the claim that
    signalled, else the first one; `bucket` is that claim's, or `extra_usage` for the
    other two signals. Values kept are bounded so a hostile upstream cannot blow up
    records or log lines; claims are classified before bounding, so trimming a
    claim can never make it look like a subscription one.
    """
    def h(suffix):
        values = found.get(suffix)
        return values[0] if values else None

    claims = _values(found, "representative-claim")
    claim = claims[0] if claims else None
    bucket, signal = classify(claim, extra_subscription_claims), None
    # Of several non-subscription claims, one billed outside extra usage (api, unknown)
    # wins over `overage`: a cap on extra usage must never let an API-billed answer pass.
    tripping = [(value, b) for value, b in ((v, classify(v, extra_subscription_claims)) for v in claims)
                if b in NON_SUBSCRIPTION]
    if tripping:
        claim, bucket = next((t for t in tripping if t[1] != EXTRA_USAGE), tripping[0])
        signal = f"representative-claim={_bounded(claim)}"
    in_use = [_bool(v) for v in _values(found, "overage-in-use")]
    statuses = {v.lower() for v in _values(found, "status")}
    overage_statuses = {v.lower() for v in _values(found, "overage-status")}
    if signal is None and True in in_use:
        signal, bucket = "overage-in-use=true", EXTRA_USAGE
    if signal is None and "rejected" in statuses:
        allowed = [s for s in ("allowed", "allowed_warning") if s in overage_statuses]
        if allowed:
            signal, bucket = f"status=rejected+overage-status={allowed[0]}", EXTRA_USAGE
    claim = _bounded(claim)
    windows = parse_windows(found)
    return {
        "claim": claim if claim is not None else "unknown",
        "bucket": bucket,
        "billingSignal": signal,
        "unifiedStatus": _bounded(h("status")) or None,
        "util5h": _fraction(h("5h-utilization")),
        "util7d": _fraction(h("7d-utilization")),
        "overageUtil": _fraction(h("overage-utilization")),
        "overageStatus": _bounded(h("overage-status")) or None,
        "overageInUse": True if True in in_use else False if False in in_use else None,
        "resetAt": _bounded(h("reset")) or None,
        "fallbackPercent": _fraction(h("fallback-percentage")),
        "fallback": _bounded(h("fallback")) or None,
        "overageReset": _bounded(h("overage-reset")) or None,
        "overageDisabledReason": _bounded(h("overage-disabled-reason")) or None,
        "windows": windows,
    }


def parse_windows(found):
    """Every rate-limit window among the unified headers (`unified()`'s dict): {name:
    {utilization, status, reset, surpassedThreshold}}, sorted by name, each field None
    when its header is absent.

    Names are lowercased; at most MAX_WINDOWS windows (the first in header order), and a
    header repeated keeps its first value, as the other unified headers do. `overage` is
    not a window here (see OVERAGE_WINDOW).
    """
    windows = {}
    for suffix, values in found.items():
        parts = _window_field(suffix)
        if parts is None:
            continue
        window, header_field = parts
        if window == OVERAGE_WINDOW or (window not in windows and len(windows) >= MAX_WINDOWS):
            continue
        fields = windows.setdefault(window, dict.fromkeys(WINDOW_FIELDS.values()))
        key = WINDOW_FIELDS[header_field]
        if fields[key] is None:
            number = key in ("utilization", "surpassedThreshold")
            fields[key] = _fraction(values[0]) if number else _bounded(values[0]) or None
    return dict(sorted(windows.items()))


@functools.lru_cache(maxsize=256)          # the few suffixes real answers carry, parsed once
def _window_field(suffix):
    """(window, field) for a unified header suffix such as `7d_sonnet-utilization`, or None."""
    match = _WINDOW_HEADER.fullmatch(suffix)
    return match.groups() if match else None


def utilization(rate, metric):
    """The utilization reading a config name refers to, or None when the rate lacks it.

    `metric` is one of today's record fields (`util5h`, `util7d`, `overageUtil`),
    `overage` (the same as `overageUtil`), or any window name (`5h`, `7d_sonnet`).
    """
    if metric in UTIL_FIELDS:
        return rate.get(UTIL_FIELDS[metric])
    window = (rate.get("windows") or {}).get(metric)
    return window.get("utilization") if isinstance(window, dict) else None


def statuses(rate):
    """[(metric, status)]: the unified status as ("unifiedStatus", status), always first
    (None when absent), then each window's as (f"status:{window}", status) for the
    windows that report one. `guards.unifiedStatus` applies to each of them; the metric
    names the crossing, so each window warns or halts once per crossing on its own.
    """
    pairs = [("unifiedStatus", rate.get("unifiedStatus"))]
    for window, fields in (rate.get("windows") or {}).items():
        if isinstance(fields, dict) and fields.get("status") is not None:
            pairs.append((f"status:{window}", fields["status"]))
    return pairs
