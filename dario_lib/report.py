"""Plain-text renderings of gateway status for the terminal (`dario status`).

Pure functions from the `/status` JSON to text: no I/O, no colour codes.
"""

import time

from .guard import iso


def duration(seconds):
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def status_text(status, now=None):
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
        request = halt.get("request") or {}
        lines.append(f"guard:    HALTED since {iso(halt['since'])} ({duration((now_ms - halt['since']) / 1000)} ago)")
        lines.append(f"  cause:  representative-claim = {request.get('claim')} "
                     f"(model {request.get('model')}, account {request.get('account')})")
        if halt.get("cooldownUntil"):
            left = (halt["cooldownUntil"] - now_ms) / 1000
            lines.append(f"  resume: automatically at {iso(halt['cooldownUntil'])} (in {duration(left)}), "
                         "or now with `dario resume`")
        else:
            lines.append("  resume: run `dario resume` (automatic resume is off)")
    elif not cfg["enabled"]:
        lines.append("guard:    off")
    else:
        cooldown = f"cooldown {duration(cfg['cooldownMs'] / 1000)}" if cfg["cooldownMs"] else "manual resume"
        lines.append(f"guard:    normal ({cfg['behavior']}, {cooldown})")
    outcomes = ", ".join(f"{name} {count}" for name, count in status["outcomes"].items() if count)
    lines.append(f"requests: {status['requests']}" + (f" ({outcomes})" if outcomes else ""))
    claims = status.get("lastClaims") or []
    if claims:
        lines.append("last claims: " + ", ".join(f"{c['claim']} ({c['bucket']})" for c in claims[-5:]))
    return "\n".join(lines)
