"""The value kinds of settings: what each setting accepts, checked and parsed.

Each kind checks a value already of the right JSON type (`check`) and parses one from
text (`parse`, for flags, env and `config set`). Both raise ValueError with the allowed
values, which `config` wraps with the setting's name. A kind whose values can hold a
credential says `secret = True` and can mask one for display (`masked`).

Pure classes and functions: safe from any thread.
"""

import ipaddress
import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import urlsplit

from . import billing, proxy


def is_loopback(host):
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



class Int:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer from {lo} to {hi}"

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        if not re.fullmatch(r"\s*-?\d+\s*", text):
            raise ValueError(self.allowed)
        return self.check(int(text))


class Number(Int):
    def __init__(self, lo, hi):
        super().__init__(lo, hi)
        self.allowed = f"a number from {lo} to {hi}"

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.lo <= value <= self.hi:
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        try:
            return self.check(float(text))
        except ValueError:
            raise ValueError(self.allowed) from None


class Bool:
    allowed = "true/false, on/off, yes/no or 1/0"
    TRUE = frozenset({"1", "true", "on", "yes"})
    FALSE = frozenset({"0", "false", "off", "no"})

    def check(self, value):
        if not isinstance(value, bool):
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        lowered = text.strip().lower()
        if lowered in self.TRUE:
            return True
        if lowered in self.FALSE:
            return False
        raise ValueError(self.allowed)


class Enum:
    def __init__(self, *choices):
        self.choices = choices
        self.allowed = " or ".join(choices)

    def check(self, value):
        if value not in self.choices:
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        return self.check(text.strip())


class Text:
    """A non-empty string; `nullable` also accepts JSON null (and "" from text)."""

    def __init__(self, nullable=False, pattern=None, allowed="a non-empty string"):
        self.nullable, self.pattern, self.allowed = nullable, pattern, allowed

    def check(self, value):
        if value is None and self.nullable:
            return None
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ValueError(self.allowed)
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        if text == "" and self.nullable:
            return None
        return self.check(text)


class Host(Text):
    def __init__(self):
        super().__init__(allowed="an IP address or host name")

    def check(self, value):
        value = super().check(value)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", value):
                raise ValueError(self.allowed) from None
        return value


class Url(Text):
    allowed_text = "an https:// URL (http:// only for a loopback host), without query or credentials"

    def __init__(self):
        super().__init__(allowed=self.allowed_text)

    def check(self, value):
        value = super().check(value)
        try:
            parts = urlsplit(value)
            hostname, _port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(self.allowed) from None
        if (parts.scheme not in ("http", "https") or not hostname or parts.query
                or parts.fragment or parts.username or parts.password):
            raise ValueError(self.allowed)
        if parts.scheme == "http" and not is_loopback(hostname):
            raise ValueError(self.allowed)
        return value.rstrip("/")


class ProxyUrl:
    """An http:// proxy URL, credentials allowed; "direct" (also "none" or "") for no proxy.

    `secret`: messages about a rejected value never quote it (it may hold a password);
    `masked` shows a valid one with its credentials as ***.
    """
    secret = True
    allowed = proxy.ALLOWED

    def check(self, value):
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(self.allowed)
        if value.strip().lower() in proxy.DIRECT:
            return "direct"
        proxy.parse_url(value)          # ValueError says what is allowed, never the value
        return value.strip()

    def parse(self, text):
        return None if text.strip() == "null" else self.check(text)

    def masked(self, value):
        return proxy.mask(value)


class StoreUrl:
    """Where halts and spend live: "file" ($DARIO_HOME) or a Redis URL.

    `secret`: the URL may hold a password, so messages about a rejected value never
    quote it; `masked` shows a valid one with its credentials as ***.
    """
    secret = True
    allowed = ("file, redis://[user:password@]host:port/db, rediss://[user:password@]host:port/db "
               "or unix:///path/to/redis.sock[?db=N]")

    def check(self, value):
        if not isinstance(value, str) or not value or re.search(r"[\s\x00-\x1f\x7f]", value):
            raise ValueError(self.allowed)
        if value == "file":
            return value
        try:
            parts = urlsplit(value)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(self.allowed) from None
        if parts.scheme in ("redis", "rediss"):
            ok = host and not parts.query and re.fullmatch(r"(/\d{0,5})?", parts.path)
        elif parts.scheme == "unix":
            ok = (not host and port is None and len(parts.path) > 1 and parts.path.startswith("/")
                  and (not parts.query or re.fullmatch(r"db=\d{1,5}", parts.query)))
        else:
            ok = False
        if not ok or parts.fragment:
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        return self.check(text.strip())

    def masked(self, value):
        scheme, sep, rest = value.partition("://")
        netloc, slash, tail = rest.partition("/")
        if not sep or "@" not in netloc:
            return value
        return f"{scheme}://***@{netloc.rpartition('@')[2]}{slash}{tail}"


class TextList:
    def __init__(self, lower=False):
        self.lower = lower
        self.allowed = "a list of non-empty strings"

    def check(self, value):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(self.allowed)
        return tuple(v.lower() for v in value) if self.lower else tuple(value)

    def parse(self, text):
        try:
            value = json.loads(text)
        except ValueError:
            value = [part.strip() for part in text.split(",") if part.strip()]
        return self.check(value)


class HashMap:
    allowed = 'an object mapping each alias to the sha256 hex of its credential'

    def check(self, value):
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v)
                for k, v in value.items()):
            raise ValueError(self.allowed)
        return MappingProxyType({k: v.lower() for k, v in value.items()})

    def parse(self, text):
        try:
            return self.check(json.loads(text))
        except ValueError:
            raise ValueError(self.allowed) from None


class Argv(TextList):
    """A command as an argument list (never a shell string); JSON null turns it off."""

    def __init__(self):
        super().__init__()
        self.allowed = 'a JSON list of strings, e.g. ["ntfy", "publish", "mytopic"], or null'

    def check(self, value):
        if value is None:
            return None
        if not value:
            raise ValueError(self.allowed)
        return super().check(value)

    def parse(self, text):
        if text.strip() in ("", "null"):
            return None
        try:
            return self.check(json.loads(text))
        except ValueError:
            raise ValueError(self.allowed) from None


class WebhookUrl(Text):
    def __init__(self):
        super().__init__(nullable=True, allowed="an http:// or https:// URL, or null")

    def check(self, value):
        value = super().check(value)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            hostname, _port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(self.allowed) from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise ValueError(self.allowed)
        return value

    def parse(self, text):
        return None if text.strip() in ("", "null") else self.check(text.strip())


class JsonKind:
    """A structured value: given as JSON text on the command line."""

    def parse(self, text):
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(self.allowed) from None
        return self.check(value)


UTIL_METRICS = ("util5h", "util7d", "overageUtil")


def _fraction(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


def _utilization_metric(name):
    """Today's three names, or any rate-limit window name the upstream may report
    (billing.WINDOW_NAME: `5h`, `7d_sonnet`, `overage`, one not seen yet)."""
    return isinstance(name, str) and (name in UTIL_METRICS or re.fullmatch(billing.WINDOW_NAME, name))


class Thresholds(JsonKind):
    allowed = ('an object like {"util5h": {"warn": 0.8, "halt": 0.95}} with fractions 0-1 '
               f'(warn <= halt), keyed by {", ".join(UTIL_METRICS)} or a rate-limit window name '
               'such as 5h, 7d, 7d_opus, 7d_sonnet (lowercase letters, digits, _ and -, up to 32)')

    def check(self, value):
        if not isinstance(value, dict) or not all(_utilization_metric(name) for name in value):
            raise ValueError(self.allowed)
        out = {}
        for metric, levels in value.items():
            if (not isinstance(levels, dict) or not levels or not set(levels) <= {"warn", "halt"}
                    or not all(_fraction(v) for v in levels.values())):
                raise ValueError(self.allowed)
            warn, halt = levels.get("warn"), levels.get("halt")
            if warn is not None and halt is not None and warn > halt:
                raise ValueError(self.allowed)
            out[metric] = (warn, halt)
        return MappingProxyType(out)

    def dump(self, value):
        return {metric: {k: v for k, v in (("warn", w), ("halt", h)) if v is not None}
                for metric, (w, h) in value.items()}


class StatusLevels(JsonKind):
    allowed = 'an object like {"warn": ["allowed_warning"], "halt": ["rejected"]}'

    def check(self, value):
        if (not isinstance(value, dict) or not set(value) <= {"warn", "halt"}
                or not all(isinstance(v, list) and all(isinstance(x, str) and x for x in v)
                           for v in value.values())):
            raise ValueError(self.allowed)
        return MappingProxyType({level: frozenset(value.get(level, ())) for level in ("warn", "halt")})

    def dump(self, value):
        return {level: sorted(names) for level, names in value.items() if names}


WINDOW_UNITS_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclass(frozen=True)
class Budget:
    account: str          # an account label, or "*" for all traffic together
    usd: float
    window: str           # e.g. "1d", "12h", "30m"
    window_ms: int
    warn_at: float = 0.8
    extra: bool = False   # the extra-usage cap (overageGuard.allowExtraUsage) as budgets.Budgets keeps it

    def public(self):
        return {"account": self.account, "usd": self.usd, "window": self.window, "warnAt": self.warn_at}


class Budgets(JsonKind):
    allowed = ('a list like [{"account": "*", "usd": 20, "window": "1d", "warnAt": 0.8}] '
               '(window: N followed by m, h or d; up to 90d)')

    def check(self, value):
        if not isinstance(value, list):
            raise ValueError(self.allowed)
        out = []
        for item in value:
            if not isinstance(item, dict) or not set(item) <= {"account", "usd", "window", "warnAt"}:
                raise ValueError(self.allowed)
            account = item.get("account", "*")
            limits = _spend_limit(item)
            if not isinstance(account, str) or not account or limits is None:
                raise ValueError(self.allowed)
            out.append(Budget(account, *limits))
        return tuple(out)

    def dump(self, value):
        return [budget.public() for budget in value]


def _spend_limit(item):
    """(usd, window, window_ms, warnAt) of a budget-like object, or None when one is not
    allowed: usd above 0 up to 1e6, a window of N minutes, hours or days up to 90d, warnAt 0-1."""
    usd, window, warn_at = item.get("usd"), item.get("window", "1d"), item.get("warnAt", 0.8)
    found = re.fullmatch(r"([1-9]\d{0,4})([mhd])", window) if isinstance(window, str) else None
    if (isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 < usd <= 1_000_000
            or not found or not _fraction(warn_at)):
        return None
    window_ms = int(found.group(1)) * WINDOW_UNITS_MS[found.group(2)]
    if window_ms > 90 * 86_400_000:
        return None
    return float(usd), window, window_ms, float(warn_at)


@dataclass(frozen=True)
class ExtraUsageCap:
    """`overageGuard.allowExtraUsage`: answers served from extra usage go on, without a
    halt, while their estimated cost in the rolling window stays under `usd`."""
    usd: float
    window: str           # e.g. "1d"
    window_ms: int
    warn_at: float = 0.8

    def public(self):
        return {"usd": self.usd, "window": self.window, "warnAt": self.warn_at}

    def budget(self, account="*"):
        """The cap as a Budget counting this account's extra usage ("*": everyone's)."""
        return Budget(account, self.usd, self.window, self.window_ms, self.warn_at, extra=True)


class ExtraUsage(JsonKind):
    allowed = ('an object like {"usd": 5, "window": "1d", "warnAt": 0.8} (usd above 0 up to 1000000; '
               'window: N followed by m, h or d, up to 90d; warnAt 0-1), or null: the first answer '
               'served from extra usage halts')

    def check(self, value):
        if value is None:
            return None
        limits = _spend_limit(value) if isinstance(value, dict) and set(value) <= {"usd", "window", "warnAt"} \
            else None
        if limits is None:
            raise ValueError(self.allowed)
        return ExtraUsageCap(*limits)

    def dump(self, value):
        return value.public()
