"""Plain-text renderings of gateway status for the terminal (`dario status`).

Pure functions from the `/status` JSON to text: no I/O, no colour codes. The JSON holds
text from clients and the upstream (model names, claims, account labels), so every line
of the result goes through `inert.terminal`: it cannot move a cursor, set a title or
fail to encode.
"""

import shlex
import time

from . import guardtext, inert


def duration(seconds):
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def start_command(port):
    """The command that starts a gateway on `port`, as this user runs dario: the resume
    command of `guardtext.resume_command` with `proxy` for `resume`."""
    words = shlex.split(guardtext.resume_command(port))
    words[words.index("resume")] = "proxy"
    return " ".join(shlex.quote(word) for word in words)


def status_text(status, now=None, command=guardtext.DEFAULT_COMMAND):
    """`dario status` as text; `command` is the base resume command to suggest."""
    now_ms = int((time.time() if now is None else now) * 1000)
    guard = status["guard"]
    cfg = guard["config"]
    lines = [
        f"dario {status['version']} on {status['bind']} -> {status['upstream']}",
        f"config:   {status['configPath']} ({status['configSource']})",
        f"uptime:   {duration(status['uptimeS'])}",
    ]
    if guard["state"] == "halted":
        halt = guard["halt"]
        scope = f" (account {halt['account']})" if halt.get("account") else ""
        run = guardtext.halt_command(halt, command)
        lines.append(f"guard:    HALTED{scope} since {guardtext.iso(halt['since'])} "
                     f"({duration((now_ms - halt['since']) / 1000)} ago)")
        lines.append(f"  cause:  {guardtext.cause(halt)}")
        if halt.get("cooldownUntil"):
            left = (halt["cooldownUntil"] - now_ms) / 1000
            lines.append(f"  resume: automatically at {guardtext.iso(halt['cooldownUntil'])} "
                         f"(in {duration(left)}), or now with `{run}`")
        else:
            lines.append(f"  resume: run `{run}` (automatic resume is off)")
    elif not cfg["enabled"]:
        lines.append("guard:    off")
    else:
        cooldown = f"cooldown {duration(cfg['cooldownMs'] / 1000)}" if cfg["cooldownMs"] else "manual resume"
        lines.append(f"guard:    normal ({cfg['behavior']}, {cooldown})")
    for text, _level in guardtext.extra_usage_lines(status.get("extraUsage"),
                                                    (guard.get("guards") or {}).get("extraUsage")):
        lines.append(f"  {text}")
    outcomes = ", ".join(f"{name} {count}" for name, count in status["outcomes"].items() if count)
    lines.append(f"requests: {status['requests']}" + (f" ({outcomes})" if outcomes else ""))
    claims = status.get("lastClaims") or []
    if claims:
        lines.append("last claims: " + ", ".join(f"{c['claim']} ({c['bucket']})" for c in claims[-5:]))
    lines += rate_limit_lines(status.get("lastRate"), now_ms)
    return "\n".join(inert.terminal(line) for line in lines)


def _reset(text, now_ms):
    """A reset header's value (epoch seconds) as "resets <ISO> (in 3h 05m)"; other text as it is."""
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        return f"resets {text}" if isinstance(text, str) and text else ""
    stamp = guardtext.iso(seconds * 1000)
    if stamp == "?":
        return f"resets {text}"
    left = seconds - now_ms / 1000
    return f"resets {stamp} " + (f"(in {duration(left)})" if left > 0 else "(passed)")


def _percent(value):
    return f"{value:.0%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def rate_limit_lines(rate, now_ms):
    """The latest reading of every rate-limit window, and of extra usage, as lines."""
    rate = rate if isinstance(rate, dict) else {}
    windows = rate.get("windows") if isinstance(rate.get("windows"), dict) else {}
    lines = []
    if windows:
        lines.append("rate-limit windows (latest reading):")
        width = max(len(str(name)) for name in windows)
        for name, fields in windows.items():
            fields = fields if isinstance(fields, dict) else {}
            parts = [f"{_percent(fields.get('utilization')):>4}"]
            if fields.get("status"):
                parts.append(str(fields["status"]))
            if fields.get("surpassedThreshold") is not None:
                parts.append(f"over {_percent(fields['surpassedThreshold'])}")
            reset = _reset(fields.get("reset"), now_ms)
            if reset:
                parts.append(reset)
            lines.append(f"  {str(name):<{width}}  " + ", ".join(parts))
    overage = []
    if rate.get("overageUtil") is not None:
        overage.append(_percent(rate["overageUtil"]))
    if rate.get("overageStatus"):
        overage.append(f"status {rate['overageStatus']}")
    if rate.get("overageInUse"):
        overage.append("in use")
    if rate.get("overageDisabledReason"):
        overage.append(f"disabled: {rate['overageDisabledReason']}")
    reset = _reset(rate.get("overageReset"), now_ms)
    if reset:
        overage.append(reset)
    if overage:
        lines.append("extra usage: " + ", ".join(overage))
    return lines
