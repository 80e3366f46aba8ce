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
    outcomes = ", ".join(f"{name} {count}" for name, count in status["outcomes"].items() if count)
    lines.append(f"requests: {status['requests']}" + (f" ({outcomes})" if outcomes else ""))
    claims = status.get("lastClaims") or []
    if claims:
        lines.append("last claims: " + ", ".join(f"{c['claim']} ({c['bucket']})" for c in claims[-5:]))
    return "\n".join(inert.terminal(line) for line in lines)
