import math
import re

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
        "overageInUse": True, "resetAt": "1795541480", "fallbackPercent": 0.5,
        "fallback": None, "overageReset": None, "overageDisabledReason": None,
        "windows": {"5h": {"utilization": 0.91, "status": None, "reset": None, "surpassedThreshold": None},
                    "7d": {"utilization": 0.5, "status": None, "reset": None, "surpassedThreshold": None}}}


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
         "overage-status", "overage-in-use", "reset", "fallback-percentage", "fallback", "overage-reset",
         "overage-disabled-reason", "7d_oi-utilization", "7d_sonnet-status", "7d_opus-reset",
         "5h-surpassed-threshold", "X-status", "a" * 33 + "-status"]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.text(max_size=300)), max_size=12))
def test_parse_ratelimit_never_raises_and_bounds_values(pairs):
    rate = billing.parse_ratelimit(_headers(*pairs))
    for key in ("claim", "unifiedStatus", "overageStatus", "resetAt", "billingSignal", "fallback",
                "overageReset", "overageDisabledReason"):
        limit = 64 + len("representative-claim=") + 32
        assert rate[key] is None or (len(rate[key]) <= limit and rate[key].isprintable())
    for key in ("util5h", "util7d", "overageUtil", "fallbackPercent"):
        assert rate[key] is None or rate[key] == rate[key]          # never NaN
    assert len(rate["windows"]) <= billing.MAX_WINDOWS
    for name, fields in rate["windows"].items():
        assert re.fullmatch(billing.WINDOW_NAME, name) and name != "overage"
        assert set(fields) == {"utilization", "status", "reset", "surpassedThreshold"}
        for key in ("status", "reset"):
            assert fields[key] is None or (0 < len(fields[key]) <= 64 and fields[key].isprintable())
        for key in ("utilization", "surpassedThreshold"):
            assert fields[key] is None or math.isfinite(fields[key])
    assert rate["bucket"] in billing.BUCKETS
    # A signal and a non-subscription bucket always go together.
    assert (rate["billingSignal"] is not None) == (rate["bucket"] in billing.NON_SUBSCRIPTION)


# -- every window the API reports (issue 14) -------------------------------------------

def test_every_window_is_read_generically_and_sorted():
    rate = billing.parse_ratelimit(_headers(
        ("7d_oi-utilization", "0.4"), ("7d_oi-status", "allowed_warning"), ("7d_oi-reset", "1790000000"),
        ("7d_oi-surpassed-threshold", "0.25"), ("5h-utilization", "0.1"), ("5h-status", "allowed"),
        ("7d_sonnet-reset", "1791054000"), ("some-future_window-utilization", "1.5")))
    assert rate["windows"] == {
        "5h": {"utilization": 0.1, "status": "allowed", "reset": None, "surpassedThreshold": None},
        "7d_oi": {"utilization": 0.4, "status": "allowed_warning", "reset": "1790000000",
                  "surpassedThreshold": 0.25},
        "7d_sonnet": {"utilization": None, "status": None, "reset": "1791054000", "surpassedThreshold": None},
        "some-future_window": {"utilization": 1.5, "status": None, "reset": None, "surpassedThreshold": None},
    }
    assert list(rate["windows"]) == sorted(rate["windows"])
    assert rate["util5h"] == 0.1                                  # today's fields are kept


def test_window_names_are_lowercased_and_a_repeated_header_keeps_its_first_value():
    headers = Headers([("Anthropic-Ratelimit-Unified-7D_Opus-Utilization", "0.7"),
                       ("anthropic-ratelimit-unified-7d_opus-utilization", "0.1")])
    assert billing.parse_ratelimit(headers)["windows"]["7d_opus"]["utilization"] == 0.7


def test_the_other_unified_headers_are_not_windows():
    rate = billing.parse_ratelimit(_headers(
        ("representative-claim", "five_hour"), ("status", "allowed"), ("reset", "1"),
        ("overage-in-use", "false"), ("fallback-percentage", "0.5"), ("fallback", "available"),
        ("overage-disabled-reason", "out_of_credits"), ("upgrade-paths", "max"),
        ("overage-utilization", "0.3"), ("overage-status", "rejected"), ("overage-reset", "1790000000")))
    assert rate["windows"] == {}
    # overage is the extra-usage pool, read into its own fields (see billing.OVERAGE_WINDOW).
    assert (rate["overageUtil"], rate["overageStatus"], rate["overageReset"]) == (0.3, "rejected", "1790000000")
    assert rate["overageDisabledReason"] == "out_of_credits" and rate["fallback"] == "available"


@pytest.mark.parametrize("name", ["", "-x", "_x", "a" * 33, "7d.opus", "7d opus", "7d:opus", "\u212a"])
def test_a_window_name_that_is_not_a_safe_token_is_ignored(name):
    rate = billing.parse_ratelimit(_headers((f"{name}-utilization", "0.5")))
    assert rate["windows"] == {}


def test_at_most_max_windows_are_kept():
    pairs = [(f"w{n:02d}-utilization", "0.5") for n in range(billing.MAX_WINDOWS + 8)]
    windows = billing.parse_ratelimit(_headers(*pairs))["windows"]
    assert list(windows) == [f"w{n:02d}" for n in range(billing.MAX_WINDOWS)]


def test_hostile_window_values_are_bounded():
    rate = billing.parse_ratelimit(_headers(("7d_x-status", "r\x1b[2J" + "e" * 500), ("7d_x-reset", "nan"),
                                            ("7d_x-utilization", "inf"), ("7d_x-surpassed-threshold", "true")))
    fields = rate["windows"]["7d_x"]
    assert fields["status"] == "r[2J" + "e" * 59 and fields["reset"] == "nan"
    assert fields["utilization"] is None and fields["surpassedThreshold"] is None


@pytest.mark.parametrize("metric, value", [
    ("util5h", 0.91), ("util7d", 0.5), ("overageUtil", 0.02), ("overage", 0.02),
    ("5h", 0.91), ("7d", 0.5), ("7d_sonnet", 0.66), ("7d_opus", None), ("never_seen", None),
])
def test_utilization_by_config_name(metric, value):
    rate = billing.parse_ratelimit(_headers(
        ("5h-utilization", "0.91"), ("7d-utilization", "0.5"), ("overage-utilization", "0.02"),
        ("7d_sonnet-utilization", "0.66"), ("7d_opus-status", "allowed")))
    assert billing.utilization(rate, metric) == value


def test_utilization_of_a_rate_without_windows():
    assert billing.utilization({"util5h": 0.3}, "util5h") == 0.3
    assert billing.utilization({"util5h": 0.3}, "5h") is None
    assert billing.utilization({"windows": {"5h": None}}, "5h") is None


def test_statuses_name_the_unified_status_and_each_windows():
    rate = billing.parse_ratelimit(_headers(
        ("status", "allowed"), ("5h-status", "allowed"), ("7d_sonnet-status", "rejected"),
        ("7d_oi-utilization", "0.2"), ("overage-status", "rejected")))
    assert billing.statuses(rate) == [("unifiedStatus", "allowed"), ("status:5h", "allowed"),
                                      ("status:7d_sonnet", "rejected")]
    # The unified status is always there (None when absent), so a guard re-arms on it as before.
    assert billing.statuses(billing.parse_ratelimit(Headers())) == [("unifiedStatus", None)]
    assert billing.statuses({"unifiedStatus": "rejected"}) == [("unifiedStatus", "rejected")]


def test_of_several_non_subscription_claims_an_api_one_wins_over_overage():
    rate = billing.parse_ratelimit(_headers(("representative-claim", "overage, api")))
    assert rate["billingSignal"] == "representative-claim=api" and rate["bucket"] == billing.API
    rate = billing.parse_ratelimit(_headers(("representative-claim", "five_hour"), ("representative-claim", "overage")))
    assert rate["billingSignal"] == "representative-claim=overage" and rate["bucket"] == billing.EXTRA_USAGE
