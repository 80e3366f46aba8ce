import pytest
from hypothesis import given, strategies as st

from dario_lib import billing
from dario_lib.headers import Headers


@pytest.mark.parametrize("claim, bucket", [
    ("five_hour", "subscription"),
    ("seven_day", "subscription"),
    ("seven_day_opus", "subscription"),
    ("seven_day_sonnet", "subscription"),
    ("five_hour_overage_included", "subscription"),
    ("seven_day_overage_included", "subscription"),
    ("five_hour_fallback", "subscription_fallback"),
    ("seven_day_fallback", "subscription_fallback"),
    ("overage", "extra_usage"),
    ("api", "api"),
    (None, "unknown"),
    ("unknown", "other"),
    ("", "other"),
    ("ten_hour", "other"),
    ("FIVE_HOUR", "other"),
])
def test_claim_to_bucket(claim, bucket):
    assert billing.classify(claim) == bucket


def test_configured_subscription_claims_are_subscription():
    assert billing.classify("twelve_hour") == "other"
    assert billing.classify("twelve_hour", frozenset({"twelve_hour"})) == "subscription"


KNOWN = billing.SUBSCRIPTION_CLAIMS | billing.FALLBACK_CLAIMS | {"overage", "api"}


@given(st.text(max_size=40).filter(lambda s: s not in KNOWN))
def test_any_new_claim_is_other_and_trips_the_guard(claim):
    bucket = billing.classify(claim)
    assert bucket == "other"
    assert bucket in billing.NON_SUBSCRIPTION


def _headers(*pairs, **values):
    """A Headers object with the unified headers: pairs as (suffix, value), repeats kept."""
    items = [(billing.HEADER_PREFIX + k.replace("_", "-"), v) for k, v in values.items()]
    items += [(billing.HEADER_PREFIX + k, v) for k, v in pairs]
    return Headers(items)


def test_parse_ratelimit_reads_every_header():
    rate = billing.parse_ratelimit(_headers(**{
        "representative_claim": "overage", "status": "allowed_warning", "5h_utilization": "0.91",
        "7d_utilization": "0.5", "overage_utilization": "0.02", "overage_status": "allowed",
        "overage_in_use": "true", "reset": "1795541480", "fallback_percentage": "0.5"}))
    assert rate == {
        "claim": "overage", "bucket": "extra_usage", "billingSignal": "representative-claim=overage",
        "unifiedStatus": "allowed_warning",
        "util5h": 0.91, "util7d": 0.5, "overageUtil": 0.02, "overageStatus": "allowed",
        "overageInUse": True, "resetAt": "1795541480", "fallbackPercent": 0.5}


def test_header_names_are_case_insensitive():
    headers = Headers([("Anthropic-Ratelimit-Unified-Representative-Claim", "api")])
    assert billing.parse_ratelimit(headers)["billingSignal"] == "representative-claim=api"


def test_absent_headers_are_unknown_and_none():
    rate = billing.parse_ratelimit(Headers())
    assert rate["claim"] == "unknown" and rate["bucket"] == "unknown"
    assert rate["util5h"] is None and rate["overageInUse"] is None and rate["billingSignal"] is None


# -- billing signals (issue 10 item 4) ------------------------------------------------

@pytest.mark.parametrize("pairs, signal, claim, bucket", [
    # a) any representative-claim value outside the subscription and fallback lists
    ([("representative-claim", "overage")], "representative-claim=overage", "overage", "extra_usage"),
    ([("representative-claim", "api")], "representative-claim=api", "api", "api"),
    ([("representative-claim", "ten_hour")], "representative-claim=ten_hour", "ten_hour", "other"),
    ([("representative-claim", "")], "representative-claim=", "", "other"),
    # ... every value of a repeated header counts, in any order
    ([("representative-claim", "five_hour"), ("representative-claim", "overage")],
     "representative-claim=overage", "overage", "extra_usage"),
    ([("representative-claim", "seven_day_fallback"), ("representative-claim", "api")],
     "representative-claim=api", "api", "api"),
    # ... and so does each part of a comma-separated value
    ([("representative-claim", "five_hour, overage")], "representative-claim=overage", "overage", "extra_usage"),
    # b) overage-in-use: true, even on a subscription claim
    ([("representative-claim", "five_hour"), ("overage-in-use", "true")],
     "overage-in-use=true", "five_hour", "extra_usage"),
    ([("overage-in-use", "TRUE")], "overage-in-use=true", "unknown", "extra_usage"),
    ([("overage-in-use", "false"), ("overage-in-use", "true")], "overage-in-use=true", "unknown", "extra_usage"),
    # c) a rejected status while overage is allowed: served from extra usage
    ([("representative-claim", "five_hour"), ("status", "rejected"), ("overage-status", "allowed")],
     "status=rejected+overage-status=allowed", "five_hour", "extra_usage"),
    ([("representative-claim", "seven_day"), ("status", "rejected"), ("overage-status", "allowed_warning")],
     "status=rejected+overage-status=allowed_warning", "seven_day", "extra_usage"),
])
def test_every_billing_signal_trips(pairs, signal, claim, bucket):
    rate = billing.parse_ratelimit(_headers(*pairs))
    assert (rate["billingSignal"], rate["claim"], rate["bucket"]) == (signal, claim, bucket)


@pytest.mark.parametrize("pairs", [
    [],                                                                   # a bare answer (or a 429)
    [("representative-claim", "five_hour")],
    [("representative-claim", "five_hour"), ("overage-in-use", "false")],
    [("representative-claim", "five_hour"), ("representative-claim", "seven_day_opus")],
    [("representative-claim", "five_hour_fallback")],
    [("representative-claim", "five_hour"), ("overage-utilization", "1.0")],     # utilization alone
    [("overage-utilization", "1")],
    [("representative-claim", "five_hour"), ("status", "rejected")],             # rejected, no overage
    [("representative-claim", "five_hour"), ("status", "rejected"), ("overage-status", "rejected")],
    [("representative-claim", "five_hour"), ("status", "allowed"), ("overage-status", "allowed")],
    [("representative-claim", "seven_day_overage_included"), ("overage-status", "allowed")],
])
def test_no_signal_no_trip(pairs):
    rate = billing.parse_ratelimit(_headers(*pairs))
    assert rate["billingSignal"] is None
    assert rate["bucket"] not in billing.NON_SUBSCRIPTION


def test_configured_subscription_claim_is_no_signal_but_overage_in_use_still_is():
    claims = frozenset({"twelve_hour"})
    assert billing.parse_ratelimit(_headers(("representative-claim", "twelve_hour")), claims)["billingSignal"] is None
    rate = billing.parse_ratelimit(_headers(("representative-claim", "twelve_hour"), ("overage-in-use", "true")), claims)
    assert rate["billingSignal"] == "overage-in-use=true"


def test_a_claim_is_classified_before_it_is_trimmed_for_the_record():
    # Stripping the NUL for the record must not turn this into a subscription claim.
    rate = billing.parse_ratelimit(_headers(("representative-claim", "five_hour\x00")))
    assert rate["billingSignal"] == "representative-claim=five_hour" and rate["bucket"] == "other"


NAMES = ["representative-claim", "status", "5h-utilization", "7d-utilization", "overage-utilization",
         "overage-status", "overage-in-use", "reset", "fallback-percentage"]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.text(max_size=300)), max_size=12))
def test_parse_ratelimit_never_raises_and_bounds_values(pairs):
    rate = billing.parse_ratelimit(_headers(*pairs))
    for key in ("claim", "unifiedStatus", "overageStatus", "resetAt", "billingSignal"):
        limit = 64 + len("representative-claim=") + 32
        assert rate[key] is None or (len(rate[key]) <= limit and rate[key].isprintable())
    for key in ("util5h", "util7d", "overageUtil", "fallbackPercent"):
        assert rate[key] is None or rate[key] == rate[key]          # never NaN
    assert rate["bucket"] in billing.BUCKETS
    # A signal and a non-subscription bucket always go together.
    assert (rate["billingSignal"] is not None) == (rate["bucket"] in billing.NON_SUBSCRIPTION)
