"""Settings: the config file, the environment and flags, resolved into one frozen object.

Every setting is described once in `SCHEMA`; the file sanitizer, `config get/set`, the
TUI's config tab and the flag/env parsers all validate through it. Precedence per
setting is flag > environment > config file > default. The file lives at
`$DARIO_HOME/config.json` (`~/.dario` by default) and is always written atomically
with unknown keys preserved.

Loading never raises for a bad file (defaults apply and a warning says why); a bad flag
or environment value raises `ConfigError`, which the CLI turns into exit status 2.
"""

import functools
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType

from .files import write_atomic
from .kinds import (Argv, Bool, Budgets, Enum, ExtraUsage, HashMap, Host, Int, Number, ProxyUrl,
                    StatusLevels, StoreUrl, Text, TextList, Thresholds, Url, WebhookUrl, is_loopback)
from .kinds import Budget, ExtraUsageCap  # noqa: F401  (config's API too: settings hold them)

DEFAULT_UPSTREAM = "https://api.anthropic.com"


class ConfigError(ValueError):
    """A value that is not allowed for a setting; the message names both."""


@dataclass(frozen=True)
class Key:
    name: str            # dotted path in config.json
    kind: object
    default: object
    doc: str
    env: str = None
    flag: str = None


SCHEMA = (
    Key("port", Int(0, 65535), 3456, "TCP port to listen on (0 picks a free one)",
        env="DARIO_PORT", flag="--port"),
    Key("host", Host(), "127.0.0.1", "address to bind; non-loopback needs DARIO_API_KEY",
        env="DARIO_HOST", flag="--host"),
    Key("upstream.url", Url(), DEFAULT_UPSTREAM, "upstream API base URL",
        env="DARIO_UPSTREAM", flag="--upstream"),
    Key("upstream.proxy", ProxyUrl(), None,
        "HTTP proxy to the upstream (overrides HTTPS_PROXY/NO_PROXY; direct: none)",
        env="DARIO_UPSTREAM_PROXY", flag="--upstream-proxy"),
    Key("upstream.caFile", Text(nullable=True, allowed="a path to a PEM file of CA certificates, or null"),
        None, "trust only these CA certificates for the upstream's TLS"),
    Key("logFile", Text(nullable=True), None, "append one JSON line per record to this file",
        env="DARIO_LOG_FILE", flag="--log-file"),
    Key("overageGuard.enabled", Bool(), True, "halt/warn on non-subscription billing",
        env="DARIO_OVERAGE_GUARD", flag="--overage-guard"),
    Key("overageGuard.behavior", Enum("halt", "warn"), "halt", "halt: answer 503 until resumed; warn: only tell",
        env="DARIO_OVERAGE_BEHAVIOR", flag="--overage-behavior"),
    Key("overageGuard.cooldownMs", Int(0, 30 * 86_400_000), 1_800_000,
        "automatic resume after this many ms (0: manual resume only)",
        env="DARIO_OVERAGE_COOLDOWN", flag="--overage-cooldown"),
    Key("overageGuard.notifyOs", Bool(), True, "desktop notification on halt and warn",
        env="DARIO_OVERAGE_NOTIFY", flag="--overage-notify"),
    Key("overageGuard.subscriptionClaims", TextList(), (), "extra claims to treat as subscription"),
    Key("overageGuard.scope", Enum("proxy", "account"), "proxy",
        "proxy: a trip halts all traffic; account: only the account whose traffic tripped"),
    Key("overageGuard.allowExtraUsage", ExtraUsage(), None,
        "let answers served from extra usage go on up to a cap: {usd, window, warnAt}; null: halt at the first"),
    Key("guards.utilization", Thresholds(), MappingProxyType({}),
        "warn/halt thresholds per utilization reading: util5h, util7d, overageUtil or any window name"),
    Key("guards.unifiedStatus", StatusLevels(), MappingProxyType({"warn": frozenset(), "halt": frozenset()}),
        "unified rate-limit status values that warn or halt"),
    Key("guards.budgets", Budgets(), (), "spend budgets in USD per account and window"),
    Key("notifyCommand", Argv(), None, "command run with each guard event as JSON on stdin"),
    Key("notifyWebhook", WebhookUrl(), None, "URL that receives each guard event as a JSON POST"),
    Key("maxBodyBytes", Int(1024, 1 << 30), 32 * 1024 * 1024, "largest request body accepted"),
    Key("maxHeadBytesInFlight", Int(1 << 20, 1 << 34), 64 * 1024 * 1024,
        "request head bytes held by all connections together (503 beyond)"),
    Key("maxBodyBytesInFlight", Int(1 << 20, 1 << 36), 256 * 1024 * 1024,
        "request body bytes held by all requests in flight together (503 beyond)"),
    Key("readTimeoutS", Number(1, 3600), 600, "seconds without a byte from upstream before 504"),
    Key("maxRecords", Int(10, 1_000_000), 10_000, "records kept in memory"),
    Key("allowedHosts", TextList(lower=True), (), "extra Host names accepted while bound to loopback"),
    Key("allowedOrigins", TextList(), (), "browser origins allowed to call the gateway"),
    Key("accounts", HashMap(), MappingProxyType({}), "alias -> sha256 hex of a credential"),
    Key("store.url", StoreUrl(), "file",
        "where halts and spend live: file ($DARIO_HOME, one host) or a Redis URL a team shares",
        env="DARIO_STORE", flag="--store"),
    Key("store.namespace", Text(pattern=r"[A-Za-z0-9_.:-]{1,64}",
                                allowed="1 to 64 characters from A-Z a-z 0-9 _ . : -"), "dario",
        "prefix of every Redis key: teams or environments sharing one Redis use different ones"),
    Key("store.failOpen", Bool(), False,
        "Redis unreachable: forward on this gateway's own guards (true) or answer 503 (false)"),
    Key("store.reservationTtlS", Int(1, 3600), 30,
        "seconds a budget reservation lives in Redis without a heartbeat from its gateway"),
    Key("store.timeoutMs", Int(10, 10_000), 250, "bound on each Redis call in ms; slower is unavailable"),
)
SCHEMA_BY_NAME = {key.name: key for key in SCHEMA}

# Not in the file: verbosity comes only from a flag or the environment.
VERBOSE = Key("verbose", Bool(), False, "debug logging", env="DARIO_VERBOSE", flag="--verbose")


def dario_home(env=os.environ):
    return env.get("DARIO_HOME") or os.path.join(os.path.expanduser("~"), ".dario")


def config_path(env=os.environ):
    return os.path.join(dario_home(env), "config.json")


# -- the file -----------------------------------------------------------------------

@dataclass(frozen=True)
class FileConfig:
    path: str
    source: str                  # "file", "missing" or "invalid"
    raw: dict                    # the parsed JSON object as found (unknown keys kept)
    values: dict                 # dotted name -> validated value, for keys that passed
    warnings: tuple = ()


def _lookup(raw, name):
    node = raw
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _quoted(kind, shown):
    """A rejected value as a message quotes it: never for a kind that may hold credentials."""
    return "(value hidden: it may hold credentials)" if getattr(kind, "secret", False) else shown


def public_value(name, value):
    """A setting's value as a user, an endpoint or the TUI may see it: credentials masked."""
    kind = SCHEMA_BY_NAME[name].kind
    if value is not None and hasattr(kind, "masked"):
        return kind.masked(value)
    return _plain(value, kind)


def sanitize(raw):
    """Validate a parsed config object: (values by dotted name, warnings for dropped keys)."""
    values, warnings = {}, []
    for key in SCHEMA:
        present, value = _lookup(raw, key.name)
        if not present:
            continue
        try:
            values[key.name] = key.kind.check(value)
        except ValueError as err:
            warnings.append(f"config {key.name}: {_quoted(key.kind, json.dumps(value)[:80])} is not allowed "
                            f"(expected {err}); using the default {json.dumps(_plain(key.default, key.kind))}")
    return values, warnings


def load_file(path):
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return FileConfig(path, "missing", {}, {})
    except (OSError, UnicodeDecodeError) as err:
        return FileConfig(path, "invalid", {}, {},
                          (f"cannot read config file {path}: {err}; using defaults",))
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as err:     # RecursionError: nesting deeper than the parser
        return FileConfig(path, "invalid", {}, {},
                          (f"config file {path} is not valid JSON ({err}); using defaults",))
    if not isinstance(raw, dict):
        return FileConfig(path, "invalid", {}, {},
                          (f"config file {path} must hold a JSON object; using defaults",))
    values, warnings = sanitize(raw)
    return FileConfig(path, "file", raw, values, tuple(warnings))


def _plain(value, kind=None):
    """A schema value as JSON-ready data (tuples and mapping proxies back to list/dict)."""
    if kind is not None and hasattr(kind, "dump") and value is not None:
        return kind.dump(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, MappingProxyType):
        return dict(value)
    return value


def parse_value(name, text):
    """Parse text for a config key, as `config set` does; raises ConfigError."""
    key = SCHEMA_BY_NAME.get(name)
    if key is None:
        raise ConfigError(f"unknown config key {name!r}; keys: {', '.join(SCHEMA_BY_NAME)}")
    try:
        return key.kind.parse(text)
    except ValueError as err:
        raise ConfigError(f"invalid value {_quoted(key.kind, repr(text))} for {name} (allowed: {err})") from None


def with_value(raw, name, value):
    """A copy of the raw config object with one dotted key set (None deletes it)."""
    out = json.loads(json.dumps(raw))
    node = out
    *parents, leaf = name.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if value is None:
        node.pop(leaf, None)
    else:
        key = SCHEMA_BY_NAME.get(name)
        node[leaf] = _plain(value, key.kind if key else None)
    return out


def save_file(path, raw):
    """Write the config atomically: folder 0700, file 0600, temp file then os.replace."""
    write_atomic(path, (json.dumps(raw, indent=2) + "\n").encode())


# -- resolution ---------------------------------------------------------------------

@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True
    behavior: str = "halt"
    cooldown_ms: int = 1_800_000
    notify_os: bool = True
    subscription_claims: frozenset = frozenset()
    scope: str = "proxy"
    utilization: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    unified_status: MappingProxyType = field(
        default_factory=lambda: MappingProxyType({"warn": frozenset(), "halt": frozenset()}))
    budgets: tuple = ()
    allow_extra_usage: ExtraUsageCap = None      # None: the first extra-usage answer halts

    def public(self):
        return {"enabled": self.enabled, "behavior": self.behavior,
                "cooldownMs": self.cooldown_ms, "notifyOs": self.notify_os}

    def guards(self):
        """The guards beyond overage, as configured (for /status and the TUI)."""
        return {"scope": self.scope,
                "utilization": Thresholds().dump(self.utilization),
                "unifiedStatus": StatusLevels().dump(self.unified_status),
                "budgets": [budget.public() for budget in self.budgets],
                "extraUsage": self.allow_extra_usage.public() if self.allow_extra_usage else None}


@dataclass(frozen=True)
class StoreConfig:
    """Where halts and spend are kept (`store.*`); the password also from DARIO_STORE_PASSWORD."""
    url: str = field(default="file", repr=False)          # may hold a password
    namespace: str = "dario"
    fail_open: bool = False
    reservation_ttl_s: int = 30
    timeout_ms: int = 250
    password: str = field(default=None, repr=False)       # DARIO_STORE_PASSWORD (env only)

    @property
    def kind(self):
        return "file" if self.url == "file" else "redis"

    def public(self):
        return {"kind": self.kind, "url": StoreUrl().masked(self.url), "namespace": self.namespace,
                "failOpen": self.fail_open, "reservationTtlS": self.reservation_ttl_s,
                "timeoutMs": self.timeout_ms}


@dataclass(frozen=True)
class Settings:
    home: str
    config_path: str
    config_source: str = "missing"
    port: int = 3456
    host: str = "127.0.0.1"
    upstream: str = DEFAULT_UPSTREAM
    log_file: str = None
    verbose: bool = False
    max_body_bytes: int = 32 * 1024 * 1024
    max_head_bytes_in_flight: int = 64 * 1024 * 1024
    max_body_bytes_in_flight: int = 256 * 1024 * 1024
    read_timeout_s: float = 600
    max_records: int = 10_000
    allowed_hosts: tuple = ()
    allowed_origins: tuple = ()
    accounts: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    guard: GuardConfig = GuardConfig()
    store: StoreConfig = StoreConfig()
    notify_command: tuple = None
    notify_webhook: str = None
    unsafe_no_auth: bool = False
    # Secrets come from the environment only and are kept out of repr().
    api_key: str = field(default=None, repr=False)
    upstream_api_key: str = field(default=None, repr=False)
    upstream_proxy: str = field(default=None, repr=False)      # may hold proxy credentials
    upstream_ca_file: str = None
    sources: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # setting -> flag/env/file/default
    warnings: tuple = ()

    @functools.cached_property      # asked on every request; ipaddress parsing is not free
    def bound_to_loopback(self):
        return is_loopback(self.host)


SETTING_FIELDS = {
    "port": "port", "host": "host", "upstream.url": "upstream", "logFile": "log_file",
    "upstream.proxy": "upstream_proxy", "upstream.caFile": "upstream_ca_file",
    "maxBodyBytes": "max_body_bytes", "readTimeoutS": "read_timeout_s",
    "maxHeadBytesInFlight": "max_head_bytes_in_flight", "maxBodyBytesInFlight": "max_body_bytes_in_flight",
    "maxRecords": "max_records", "allowedHosts": "allowed_hosts",
    "allowedOrigins": "allowed_origins", "accounts": "accounts",
    "notifyCommand": "notify_command", "notifyWebhook": "notify_webhook",
}
GUARD_FIELDS = {
    "overageGuard.enabled": "enabled", "overageGuard.behavior": "behavior",
    "overageGuard.cooldownMs": "cooldown_ms", "overageGuard.notifyOs": "notify_os",
    "overageGuard.subscriptionClaims": "subscription_claims",
    "overageGuard.scope": "scope", "overageGuard.allowExtraUsage": "allow_extra_usage",
    "guards.utilization": "utilization",
    "guards.unifiedStatus": "unified_status", "guards.budgets": "budgets",
}

STORE_FIELDS = {
    "store.url": "url", "store.namespace": "namespace", "store.failOpen": "fail_open",
    "store.reservationTtlS": "reservation_ttl_s", "store.timeoutMs": "timeout_ms",
}


def _pick(key, flags, env, file_values):
    """(value, source) for one setting; flag and env text is validated here."""
    if key.name in flags:
        value = flags[key.name]
        if isinstance(value, str):
            try:
                value = key.kind.parse(value)
            except ValueError as err:
                raise ConfigError(f"invalid value {_quoted(key.kind, repr(value))} for {key.flag} "
                                  f"(allowed: {err})") from None
        return value, "flag"
    if key.env and env.get(key.env, "") != "":
        text = env[key.env]
        try:
            return key.kind.parse(text), "env"
        except ValueError as err:
            raise ConfigError(f"invalid value {_quoted(key.kind, repr(text))} for {key.env} "
                              f"(allowed: {err})") from None
    if key.name in file_values:
        return file_values[key.name], "file"
    return key.default, "default"


def resolve(flags=None, env=os.environ, file_config=None):
    """Build Settings from flags (dotted name -> text or typed value), env and the file."""
    flags = flags or {}
    home = dario_home(env)
    if file_config is None:
        file_config = load_file(os.path.join(home, "config.json"))
    chosen, sources, guard, store = {}, {}, {}, {}
    for key in SCHEMA + (VERBOSE,):
        value, source = _pick(key, flags, env, file_config.values)
        sources[key.name] = source
        if key.name in GUARD_FIELDS:
            guard[GUARD_FIELDS[key.name]] = value
        elif key.name in STORE_FIELDS:
            store[STORE_FIELDS[key.name]] = value
        elif key.name == "verbose":
            chosen["verbose"] = value
        else:
            chosen[SETTING_FIELDS[key.name]] = value
    guard["subscription_claims"] = frozenset(guard["subscription_claims"])
    return Settings(
        home=home,
        config_path=file_config.path,
        config_source=file_config.source,
        guard=GuardConfig(**guard),
        store=StoreConfig(**store, password=env.get("DARIO_STORE_PASSWORD") or None),
        unsafe_no_auth=bool(flags.get("unsafeNoAuth", False)),
        api_key=env.get("DARIO_API_KEY") or None,
        upstream_api_key=env.get("DARIO_UPSTREAM_API_KEY") or None,
        sources=MappingProxyType(sources),
        warnings=file_config.warnings,
        **chosen,
    )


def client_port(flag=None, env=os.environ):
    """The port `resume`, `status` and the TUI talk to: --port > DARIO_PORT > config > 3456."""
    file_config = load_file(config_path(env))
    flags = {"port": flag} if flag is not None else {}
    port, _ = _pick(SCHEMA_BY_NAME["port"], flags, env, file_config.values)
    return port


def current_value(file_config, name):
    """The value a key has in the file, or its default: what `config get` shows."""
    key = SCHEMA_BY_NAME[name]
    return _plain(file_config.values.get(name, key.default), key.kind)
