import json
import os
import stat

import pytest
from hypothesis import given, strategies as st

from dario_lib import config

# (setting, flag value, env name, env value, file value, default, Settings attribute path)
PRECEDENCE = [
    ("port", "4001", "DARIO_PORT", "4002", {"port": 4003}, 3456, ("port",), (4001, 4002, 4003)),
    ("host", "127.0.0.2", "DARIO_HOST", "127.0.0.3", {"host": "127.0.0.4"}, "127.0.0.1", ("host",),
     ("127.0.0.2", "127.0.0.3", "127.0.0.4")),
    ("upstream.url", "http://127.0.0.1:1", "DARIO_UPSTREAM", "http://127.0.0.1:2",
     {"upstream": {"url": "http://127.0.0.1:3"}}, "https://api.anthropic.com", ("upstream",),
     ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")),
    ("logFile", "/tmp/a.log", "DARIO_LOG_FILE", "/tmp/b.log", {"logFile": "/tmp/c.log"}, None,
     ("log_file",), ("/tmp/a.log", "/tmp/b.log", "/tmp/c.log")),
    ("overageGuard.enabled", False, "DARIO_OVERAGE_GUARD", "on", {"overageGuard": {"enabled": False}},
     True, ("guard", "enabled"), (False, True, False)),
    ("overageGuard.behavior", "warn", "DARIO_OVERAGE_BEHAVIOR", "halt",
     {"overageGuard": {"behavior": "warn"}}, "halt", ("guard", "behavior"), ("warn", "halt", "warn")),
    ("overageGuard.cooldownMs", "1000", "DARIO_OVERAGE_COOLDOWN", "2000",
     {"overageGuard": {"cooldownMs": 3000}}, 1800000, ("guard", "cooldown_ms"), (1000, 2000, 3000)),
    ("overageGuard.notifyOs", True, "DARIO_OVERAGE_NOTIFY", "off", {"overageGuard": {"notifyOs": True}},
     True, ("guard", "notify_os"), (True, False, True)),
    ("verbose", True, "DARIO_VERBOSE", "yes", {}, False, ("verbose",), (True, True, False)),
]


def attr(settings, path):
    for part in path:
        settings = getattr(settings, part)
    return settings


def write(home, obj):
    (home / "config.json").write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.mark.parametrize("name, flag, env_name, env_value, file_obj, default, path, expect", PRECEDENCE)
def test_flag_beats_env_beats_file_beats_default(tmp_path, name, flag, env_name, env_value, file_obj,
                                                   default, path, expect):
    env = {"DARIO_HOME": str(tmp_path)}
    assert attr(config.resolve({}, env), path) == default
    if file_obj:
        write(tmp_path, file_obj)
        resolved = config.resolve({}, env)
        assert attr(resolved, path) == expect[2]
        assert resolved.sources[name] == "file"
    env[env_name] = env_value
    assert attr(config.resolve({}, env), path) == expect[1]
    resolved = config.resolve({name: flag}, env)
    assert attr(resolved, path) == expect[0]
    assert resolved.sources[name] == "flag"


@pytest.mark.parametrize("env_name, value", [
    ("DARIO_PORT", "http"), ("DARIO_PORT", "70000"), ("DARIO_OVERAGE_BEHAVIOR", "nuke"),
    ("DARIO_OVERAGE_COOLDOWN", "-5"), ("DARIO_OVERAGE_GUARD", "maybe"), ("DARIO_OVERAGE_NOTIFY", "2"),
    ("DARIO_UPSTREAM", "http://example.com"), ("DARIO_UPSTREAM", "ftp://127.0.0.1"),
    ("DARIO_HOST", "no spaces allowed"), ("DARIO_VERBOSE", "loud"),
])
def test_invalid_env_value_names_setting_value_and_allowed(tmp_path, env_name, value):
    with pytest.raises(config.ConfigError) as err:
        config.resolve({}, {"DARIO_HOME": str(tmp_path), env_name: value})
    message = str(err.value)
    assert env_name in message and repr(value) in message and "allowed" in message


def test_invalid_flag_value_names_the_flag(tmp_path):
    with pytest.raises(config.ConfigError, match=r"'nuke' for --overage-behavior.*halt or warn"):
        config.resolve({"overageGuard.behavior": "nuke"}, {"DARIO_HOME": str(tmp_path)})


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("TRUE", True), ("On", True), ("yes", True),
    ("0", False), ("false", False), ("OFF", False), ("No", False)])
def test_env_booleans(tmp_path, text, expected):
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path), "DARIO_OVERAGE_GUARD": text})
    assert settings.guard.enabled is expected


def test_missing_file_is_defaults(tmp_path):
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert settings.config_source == "missing" and settings.warnings == ()


def test_invalid_json_is_defaults_with_one_warning(tmp_path):
    write(tmp_path, "{not json")
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert settings.config_source == "invalid"
    assert settings.port == 3456
    assert len(settings.warnings) == 1 and "config.json" in settings.warnings[0]
    write(tmp_path, "[1, 2]")
    assert config.resolve({}, {"DARIO_HOME": str(tmp_path)}).config_source == "invalid"


def test_wrong_types_dropped_with_warning_others_kept(tmp_path):
    write(tmp_path, {"port": "3457", "maxRecords": 50,
                     "overageGuard": {"behavior": "nuke", "cooldownMs": -1, "enabled": False},
                     "allowedHosts": ["Dario.Local"], "accounts": {"me": "A" * 64, "bad": "zz"}})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert settings.port == 3456 and settings.max_records == 50
    assert settings.guard.behavior == "halt" and settings.guard.cooldown_ms == 1800000
    assert settings.guard.enabled is False
    assert settings.allowed_hosts == ("dario.local",)
    assert dict(settings.accounts) == {}
    assert len(settings.warnings) == 4
    assert any("overageGuard.behavior" in w and "halt or warn" in w for w in settings.warnings)


def test_secrets_come_from_env_only_and_stay_out_of_repr(tmp_path):
    write(tmp_path, {"apiKey": "file-key"})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path), "DARIO_API_KEY": "gw-secret",
                                   "DARIO_UPSTREAM_API_KEY": "sk-up-secret"})
    assert settings.api_key == "gw-secret" and settings.upstream_api_key == "sk-up-secret"
    assert "gw-secret" not in repr(settings) and "sk-up-secret" not in repr(settings)


def test_save_is_atomic_private_and_keeps_unknown_keys(tmp_path):
    home = tmp_path / "new-home"
    path = home / "config.json"
    config.save_file(str(path), {"mystery": {"keep": 1}, "port": 4000})
    loaded = config.load_file(str(path))
    updated = config.with_value(loaded.raw, "overageGuard.cooldownMs", 5000)
    config.save_file(str(path), updated)
    saved = json.loads(path.read_text())
    assert saved == {"mystery": {"keep": 1}, "port": 4000, "overageGuard": {"cooldownMs": 5000}}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert [p.name for p in home.iterdir()] == ["config.json"]     # no temp files left


def test_parse_value_validates_like_the_gateway():
    assert config.parse_value("overageGuard.cooldownMs", "60000") == 60000
    assert config.parse_value("allowedHosts", '["a.local"]') == ("a.local",)
    with pytest.raises(config.ConfigError, match="halt or warn"):
        config.parse_value("overageGuard.behavior", "nuke")
    with pytest.raises(config.ConfigError, match="from 0"):
        config.parse_value("overageGuard.cooldownMs", "-1")
    with pytest.raises(config.ConfigError, match="unknown config key"):
        config.parse_value("nope", "1")


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
KEYS = st.sampled_from([k.name for k in config.SCHEMA] + ["upstream", "overageGuard", "other"])


@given(st.dictionaries(KEYS, JSONISH, max_size=8))
def test_sanitize_keeps_only_valid_values(raw):
    nested = {}
    for name, value in raw.items():
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[leaf] = value
    values, warnings = config.sanitize(nested)
    for name, value in values.items():
        key = config.SCHEMA_BY_NAME[name]
        assert key.kind.check(config._plain(value, key.kind)) == value
    config.resolve({}, {"DARIO_HOME": "/nonexistent"}, config.FileConfig("x", "file", nested, values))


# -- guards.utilization: any rate-limit window (issue 14) ------------------------------

def test_utilization_thresholds_accept_any_window_name(tmp_path):
    write(tmp_path, {"guards": {"utilization": {"7d_sonnet": {"warn": 0.8, "halt": 0.95}, "util5h": {"halt": 0.9},
                                                "5h": {"warn": 0.5}, "overage": {"halt": 0.1},
                                                "some-future_window2": {"warn": 0.7}}}})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert settings.warnings == ()
    assert dict(settings.guard.utilization) == {"7d_sonnet": (0.8, 0.95), "util5h": (None, 0.9), "5h": (0.5, None),
                                                "overage": (None, 0.1), "some-future_window2": (0.7, None)}
    assert settings.guard.guards()["utilization"]["7d_sonnet"] == {"warn": 0.8, "halt": 0.95}
    assert config.parse_value("guards.utilization", '{"7d_oi": {"halt": 1}}') == {"7d_oi": (None, 1)}


@pytest.mark.parametrize("name", ["7D_sonnet", "7d sonnet", "7d.opus", "_7d", "-7d", "", "a" * 33, "status:5h",
                                  "Util5h"])
def test_utilization_thresholds_refuse_a_name_no_window_can_have(tmp_path, name):
    write(tmp_path, {"guards": {"utilization": {name: {"halt": 0.9}}}})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert dict(settings.guard.utilization) == {}
    assert len(settings.warnings) == 1
    assert "guards.utilization" in settings.warnings[0] and "window name such as 5h, 7d" in settings.warnings[0]
    with pytest.raises(config.ConfigError, match="util5h, util7d, overageUtil or a rate-limit window name"):
        config.parse_value("guards.utilization", json.dumps({name: {"halt": 0.9}}))


# -- overageGuard.allowExtraUsage: capped extra usage (issue 14) -------------------------

def test_allow_extra_usage_is_a_cap_validated_like_a_budget(tmp_path):
    assert config.resolve({}, {"DARIO_HOME": str(tmp_path)}).guard.allow_extra_usage is None
    write(tmp_path, {"overageGuard": {"allowExtraUsage": {"usd": 5}}})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    cap = settings.guard.allow_extra_usage
    assert (cap.usd, cap.window, cap.window_ms, cap.warn_at) == (5.0, "1d", 86_400_000, 0.8)
    assert settings.guard.guards()["extraUsage"] == {"usd": 5.0, "window": "1d", "warnAt": 0.8}
    assert cap.budget("key:a") == config.Budget("key:a", 5.0, "1d", 86_400_000, 0.8, extra=True)
    parsed = config.parse_value("overageGuard.allowExtraUsage", '{"usd": 0.5, "window": "90d", "warnAt": 1}')
    assert parsed.public() == {"usd": 0.5, "window": "90d", "warnAt": 1.0}
    assert config.parse_value("overageGuard.allowExtraUsage", "null") is None
    # Saved as the config file writes it, and read back the same.
    raw = config.with_value({}, "overageGuard.allowExtraUsage", parsed)
    assert raw == {"overageGuard": {"allowExtraUsage": {"usd": 0.5, "window": "90d", "warnAt": 1.0}}}
    assert config.with_value(raw, "overageGuard.allowExtraUsage", None) == {"overageGuard": {}}


@pytest.mark.parametrize("value", [{"usd": 0}, {"usd": -1}, {"usd": 1_000_001}, {"usd": True}, {"usd": "5"},
                                   {}, {"usd": 5, "window": "91d"}, {"usd": 5, "window": "0d"},
                                   {"usd": 5, "window": "1w"}, {"usd": 5, "warnAt": 1.5},
                                   {"usd": 5, "warnAt": -0.1}, {"usd": 5, "account": "*"}, [5], 5, "5", True])
def test_allow_extra_usage_refuses_what_is_not_a_cap(tmp_path, value):
    write(tmp_path, {"overageGuard": {"allowExtraUsage": value}})
    settings = config.resolve({}, {"DARIO_HOME": str(tmp_path)})
    assert settings.guard.allow_extra_usage is None
    assert len(settings.warnings) == 1 and "overageGuard.allowExtraUsage" in settings.warnings[0]
    with pytest.raises(config.ConfigError, match="usd above 0 up to 1000000"):
        config.parse_value("overageGuard.allowExtraUsage", json.dumps(value))
