import pytest
from hypothesis import given, strategies as st

from dario_lib import billing


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


def _headers(**values):
    table = {billing.HEADER_PREFIX + k.replace("_", "-"): v for k, v in values.items()}
    return table.get


def test_parse_ratelimit_reads_every_header():
    rate = billing.parse_ratelimit(_headers(**{
        "representative_claim": "overage", "status": "allowed_warning", "5h_utilization": "0.91",
        "7d_utilization": "0.5", "overage_utilization": "0.02", "overage_status": "allowed",
        "overage_in_use": "true", "reset": "1795541480", "fallback_percentage": "0.5"}))
    assert rate == {
        "claim": "overage", "bucket": "extra_usage", "unifiedStatus": "allowed_warning",
        "util5h": 0.91, "util7d": 0.5, "overageUtil": 0.02, "overageStatus": "allowed",
        "overageInUse": True, "resetAt": "1795541480", "fallbackPercent": 0.5}


def test_absent_headers_are_unknown_and_none():
    rate = billing.parse_ratelimit(lambda name: None)
    assert rate["claim"] == "unknown" and rate["bucket"] == "unknown"
    assert rate["util5h"] is None and rate["overageInUse"] is None


@given(st.dictionaries(
    st.sampled_from(["representative-claim", "status", "5h-utilization", "7d-utilization",
                     "overage-utilization", "overage-status", "overage-in-use", "reset",
                     "fallback-percentage"]),
    st.text(max_size=300)))
def test_parse_ratelimit_never_raises_and_bounds_values(values):
    rate = billing.parse_ratelimit(lambda name: values.get(name[len(billing.HEADER_PREFIX):]))
    for key in ("claim", "unifiedStatus", "overageStatus", "resetAt"):
        assert rate[key] is None or (len(rate[key]) <= 64 and rate[key].isprintable())
    for key in ("util5h", "util7d", "overageUtil", "fallbackPercent"):
        assert rate[key] is None or rate[key] == rate[key]          # never NaN
    assert rate["bucket"] in billing.BUCKETS
