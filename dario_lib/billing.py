"""Which billing pool a response was charged to, read from its rate-limit headers.

The upstream names the pool in `anthropic-ratelimit-unified-representative-claim`.
`classify()` maps that claim to a bucket with an allow-list: only claims known to be
billed to the subscription count as such, and any string we have never seen is `other`,
so a new billing mode halts the gateway instead of slipping through.

Pure functions, no state: safe from any thread.
"""

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


def parse_ratelimit(get_header, extra_subscription_claims=frozenset()):
    """Read the unified rate-limit headers through `get_header(name) -> str|None`.

    Returns the record fields they feed, `bucket` included. Values are bounded so a
    hostile upstream cannot blow up records or log lines.
    """
    def h(suffix):
        return get_header(HEADER_PREFIX + suffix)

    claim = _bounded(h("representative-claim"))
    return {
        "claim": claim if claim is not None else "unknown",
        "bucket": classify(claim, extra_subscription_claims),
        "unifiedStatus": _bounded(h("status")) or None,
        "util5h": _fraction(h("5h-utilization")),
        "util7d": _fraction(h("7d-utilization")),
        "overageUtil": _fraction(h("overage-utilization")),
        "overageStatus": _bounded(h("overage-status")) or None,
        "overageInUse": _bool(h("overage-in-use")),
        "resetAt": _bounded(h("reset")) or None,
        "fallbackPercent": _fraction(h("fallback-percentage")),
    }
