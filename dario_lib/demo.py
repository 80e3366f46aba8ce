"""`dario demo`: watch the overage guard trip and clear, offline, in a few seconds.

Starts the package's simulated upstream and a real gateway in front of it, both on
free loopback ports with a throwaway DARIO_HOME (the user's own config and halt state
are never touched), then narrates: normal traffic, the simulated account flipping to
overage, the halt, the 503 a client sees, and the resume.
"""

import shutil
import tempfile

import requests

from . import config
from .client import Client
from .server import GatewayServer
from .simulator import Simulator

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "Hello from the dario demo"}]}


def _say(text=""):
    print(text, flush=True)


def _send(base, session, label):
    resp = session.post(base + "/v1/messages", json=MESSAGE, headers={"x-api-key": "sk-demo"}, timeout=10)
    claim = resp.headers.get("anthropic-ratelimit-unified-representative-claim", "-")
    if resp.status_code == 200:
        usage = resp.json()["usage"]
        _say(f"  {label}: HTTP 200, claim {claim}, {usage['input_tokens']} in / "
             f"{usage['output_tokens']} out tokens")
    else:
        _say(f"  {label}: HTTP {resp.status_code}")
    return resp


def run():
    home = tempfile.mkdtemp(prefix="dario-demo-")
    sim = Simulator().start()
    settings = config.resolve({"port": "0", "upstream.url": sim.url, "overageGuard.notifyOs": False},
                              {"DARIO_HOME": home})
    gateway = GatewayServer(settings).start(poll_interval=0.1)
    base = gateway.url
    session = requests.Session()
    try:
        _say(f"dario demo: a simulated Anthropic API on {sim.url}, the gateway on {base}")
        _say(f"(throwaway DARIO_HOME {home}; your own config and state are untouched)\n")

        _say("1. Normal traffic, billed to the subscription (claim five_hour):")
        for i in range(3):
            _send(base, session, f"request {i + 1}")

        _say("\n2. The simulated account flips to overage billing. The next response says")
        _say("   representative-claim: overage. dario relays it in full and halts at once:")
        sim.set_defaults(claim="overage")
        _send(base, session, "request 4")
        sim.set_defaults(claim="five_hour")

        _say("\n3. Every new generation request is now refused without reaching upstream:")
        blocked = _send(base, session, "request 5")
        _say(f"     Retry-After: {blocked.headers.get('Retry-After')}   "
             f"x-should-retry: {blocked.headers.get('x-should-retry')}")
        _say(f"     {blocked.json()['error']['type']}: {blocked.json()['error']['message']}")
        _say(f"   Upstream saw {len(sim.requests)} requests: request 5 never left the gateway.")

        _say(f"\n4. Resume from any shell with `python dario.py resume --port={gateway.port}`")
        _say("   (or press R in the TUI, or wait for the cooldown). Resuming now:")
        result = Client(gateway.port).resume()
        _say(f"  [dario] Resumed at {result['resumedAt']}. Gateway returning to normal request handling.")
        _send(base, session, "request 6")
        _say("\nThat is the whole loop. Run `python dario.py proxy` to protect real traffic.")
        return 0
    finally:
        session.close()
        gateway.drain(timeout=2)
        sim.stop()
        shutil.rmtree(home, ignore_errors=True)


def cmd_demo(args):
    if args and args[0] in ("-h", "--help"):
        _say("usage: python dario.py demo   (runs offline; takes a few seconds)")
        return 0
    if args:
        from .cli import UsageError
        raise UsageError(f"unknown argument for `dario demo`: {args[0]}")
    return run()
