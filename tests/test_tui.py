"""The TUI driven for real: a simulator, a gateway on port 0, and `dario_lib.tui` in tmux.

Each tmux test starts the TUI in its own tmux server (`-L`, no user config), types keys
with `send-keys` and polls `capture-pane` (with `-e` when colours matter) until the
screen says what it should. The pane runs `python -m dario_lib.tui; echo __EXIT__ $?`,
so a TUI that died shows up as the exit line instead of a silent empty pane.

A few fast tests of the TUI's pure parts (the feed's model, the config editor) run
without tmux.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("curses")

from dario_lib import config  # noqa: E402
from dario_lib.server import GatewayServer  # noqa: E402
from dario_lib.tui import ConfigEditor  # noqa: E402
from dario_lib.tui_draw import countdown  # noqa: E402
from dario_lib.tui_feed import Feed  # noqa: E402

from .helpers import FakeClock, RecordingNotifier, make_settings, wait_until  # noqa: E402

TMUX = shutil.which("tmux")
REPO = Path(__file__).resolve().parent.parent
MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
EXIT_MARK = "__EXIT__"
_sessions = itertools.count()


# -- driving tmux -----------------------------------------------------------------

class Pane:
    """One TUI running in a detached tmux session of its own tmux server."""

    def __init__(self, socket, name):
        self.socket, self.name = socket, name

    def tmux(self, *args):
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    def send(self, *keys):
        self.tmux("send-keys", "-t", self.name, *keys)

    def type(self, text):
        self.tmux("send-keys", "-t", self.name, "-l", "--", text)

    def resize(self, width, height):
        self.tmux("resize-window", "-t", self.name, "-x", str(width), "-y", str(height))

    def screen(self, escapes=False):
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", self.name)

    def wait_for(self, want, timeout=8.0, escapes=False):
        """The screen once `want` (text, or a predicate on the screen) holds; fails with it shown."""
        check = want if callable(want) else (lambda screen: want in screen)
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(escapes)
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {want!r}; the screen:\n{screen}")
            time.sleep(0.05)


@pytest.fixture
def tui():
    """start(port, home, env=None, width=80, height=24) -> Pane; every session is killed after."""
    if TMUX is None:
        pytest.skip("tmux is not installed: these tests drive the real TUI inside tmux")
    socket = f"dario-test-{os.getpid()}-{next(_sessions)}"

    def start(port, home, env=None, width=80, height=24):
        environ = {"DARIO_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})}
        command = " ".join(
            # COLUMNS/LINES would override the pane's size (ncurses may have exported them).
            ["env", "-u", "NO_COLOR", "-u", "DARIO_API_KEY", "-u", "DARIO_PORT", "-u", "COLUMNS", "-u", "LINES"]
            + [shlex.quote(f"{k}={v}") for k, v in environ.items()]
            + [shlex.quote(sys.executable), "-m", "dario_lib.tui", f"--port={port}"]
        ) + f"; echo {EXIT_MARK} $?; sleep 120"
        pane = Pane(socket, "tui")
        pane.tmux("-f", "/dev/null", "new-session", "-d", "-s", "tui", "-x", str(width), "-y", str(height),
                  "-c", str(REPO), command)
        return pane

    yield start
    subprocess.run([TMUX, "-L", socket, "kill-server"], capture_output=True, timeout=10)
    # A killed server leaves its socket file behind: remove it, so no run litters /tmp.
    folder = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
    (folder / socket).unlink(missing_ok=True)
    try:
        folder.rmdir()                          # only when nothing else uses it
    except OSError:
        pass


# -- the gateway side -------------------------------------------------------------

def post(port, headers=None):
    return requests.post(f"http://127.0.0.1:{port}/v1/messages", json=MESSAGE,
                         headers={"x-api-key": "k", **(headers or {})}, timeout=5)


def trip(gateway):
    """One response billed as overage: the gateway halts."""
    assert post(gateway.port, {"x-sim-claim": "overage"}).status_code == 200
    assert gateway.guard.snapshot() is not None


def guard_state(port):
    return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["guard"]


def countdown_of(screen):
    found = re.search(r"Auto-resume in (\d+[hms] \d+[hms]|\d+s)", screen)
    return found.group(1) if found else None


def sgr_params(line):
    """Every SGR parameter set on a captured line: [['0', '1'], ['31'], ...]."""
    return [params.split(";") for params in re.findall(r"\x1b\[([0-9;]*)m", line)]


def uses_colour(line, code):
    return any(code in params for params in sgr_params(line))


COLOUR_CODES = {str(n) for n in itertools.chain(range(30, 38), range(40, 48), range(90, 98), range(100, 108))}


# -- tmux tests -------------------------------------------------------------------

def test_status_shows_the_halt_with_a_live_countdown(gateway, home, tui):
    pane = tui(gateway.port, home)
    pane.wait_for("Guard      normal")
    trip(gateway)
    screen = pane.wait_for(lambda s: "HALTED" in s and "billed to extra usage" in s
                           and countdown_of(s) is not None)
    assert "claude-opus-4-5" in screen and "account key:" in screen
    assert "ago" in screen and "R resume" in screen and "r refresh" in screen
    first = countdown_of(screen)
    assert first.startswith("29m") or first == "30m 00s"
    pane.wait_for(lambda s: countdown_of(s) not in (None, first), timeout=4)
    # The banner is red: white on a red background.
    banner = next(line for line in pane.screen(escapes=True).splitlines() if " HALTED  " in line)
    assert uses_colour(banner, "41")


def test_capital_r_resumes_the_gateway(gateway, home, tui):
    trip(gateway)
    pane = tui(gateway.port, home)
    pane.wait_for("billed to extra usage")
    pane.send("R")
    assert wait_until(lambda: guard_state(gateway.port) == "normal", timeout=5)
    # The outcome: the answer to R, or the resume event the stream brought first.
    pane.wait_for(lambda s: "HALTED" not in s and "Guard      normal" in s
                  and ("resumed at" in s or "guard back to normal (manual)" in s))
    assert post(gateway.port).status_code == 200


def _select(pane, name):
    pane.send("Home", *["Down"] * [key.name for key in config.SCHEMA].index(name))
    pane.wait_for(f"> {name} ")


def test_config_tab_validates_on_entry_and_saves_atomically(gateway, home, tui):
    path = home / "config.json"
    path.write_text(json.dumps({"custom": {"keep": True}, "overageGuard": {"cooldownMs": 60000}}, indent=2))
    before = path.read_bytes()
    pane = tui(gateway.port, home)
    pane.wait_for("1 Status")
    pane.send("2")
    screen = pane.wait_for("Config (file)")
    assert re.search(r"overageGuard.cooldownMs\s+60000\n", screen)

    _select(pane, "overageGuard.behavior")
    pane.send("Enter")
    pane.type("nuke")
    pane.send("Enter")
    pane.wait_for("invalid value 'nuke' for overageGuard.behavior (allowed: halt or warn)")
    pane.send("Escape")
    _select(pane, "overageGuard.cooldownMs")
    pane.send("Enter")
    pane.type("-5")
    pane.send("Enter")
    pane.wait_for("invalid value '-5' for overageGuard.cooldownMs")
    pane.send("Escape")
    pane.send("s")
    pane.wait_for("nothing to save")
    assert path.read_bytes() == before

    _select(pane, "overageGuard.behavior")
    pane.send("Enter")
    pane.type("warn")
    pane.send("Enter")
    pane.wait_for("1 unsaved change(s)")
    _select(pane, "overageGuard.notifyOs")
    pane.send("Enter")                                  # a boolean toggles
    pane.wait_for("2 unsaved change(s)")
    assert path.read_bytes() == before                  # nothing is written before `s`
    pane.send("s")
    pane.wait_for("saved to")
    assert json.loads(path.read_text()) == {
        "custom": {"keep": True}, "overageGuard": {"cooldownMs": 60000, "behavior": "warn", "notifyOs": False}}
    assert path.stat().st_mode & 0o777 == 0o600
    screen = pane.wait_for("restart the gateway or send SIGHUP")
    assert "Traceback" not in screen


def test_hits_marks_the_overage_row_in_red_and_shows_its_details(gateway, home, tui):
    post(gateway.port)
    pane = tui(gateway.port, home)
    pane.wait_for("1 Status")
    pane.send("4")
    pane.wait_for("five_hour")
    trip(gateway)
    assert post(gateway.port).status_code == 503        # newest row: the halted request
    # Wait for the halted request's row itself: the footer's notice names the model too.
    screen = pane.wait_for(lambda s: "HALTED" in s and re.search(r"claude-opus-4-5\s+\S+\s+503 ", s), escapes=True)
    lines = screen.splitlines()
    row = next(line for line in lines if "overage" in line and "EXTRA" in line)
    assert re.sub(r"\x1b\[[0-9;]*m", "", row).startswith("!")
    assert uses_colour(row, "31")
    calm = next(line for line in lines if "five_hour" in line)
    assert not uses_colour(calm, "31") and not re.sub(r"\x1b\[[0-9;]*m", "", calm).startswith("!")
    # The pinned banner sits above the table.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", screen).splitlines()
    assert plain.index(next(line for line in plain if "HALTED" in line and "billed to extra usage" in line)) \
        < plain.index(next(line for line in plain if "TIME" in line and "MODEL" in line))
    pane.send("Down", "Enter")
    details = pane.wait_for("extra_usage")
    assert re.search(r"claim\s+overage", details) and re.search(r"account\s+key:", details)
    pane.send("Escape")
    pane.wait_for(lambda s: "extra_usage" not in s and "EXTRA" in s)


def test_the_tui_survives_the_gateway_going_away_and_coming_back(sim, home, tui):
    server = GatewayServer(make_settings(home, sim.url), notifier=RecordingNotifier()).start(poll_interval=0.02)
    port, servers = server.port, [server]
    try:
        pane = tui(port, home)
        pane.wait_for(f":{port} ok")
        server.drain(timeout=1)
        servers.remove(server)
        pane.wait_for(f"no gateway running on 127.0.0.1:{port}, retrying")
        pane.wait_for(f"Start one with `dario proxy --port={port}`.")
        time.sleep(1.5)                                 # a few retries later, still alive
        screen = pane.screen()
        assert f"no gateway running on 127.0.0.1:{port}, retrying" in screen
        assert EXIT_MARK not in screen and "Traceback" not in screen
        again = GatewayServer(make_settings(home, sim.url, flags={"port": str(port)}),
                              notifier=RecordingNotifier()).start(poll_interval=0.02)
        servers.append(again)
        pane.wait_for(f":{port} ok")
        pane.wait_for("Guard      normal")
    finally:
        for live in servers:
            live.drain(timeout=1)


def test_without_colours_in_80x24_and_through_resizes(gateway, home, tui):
    trip(gateway)
    pane = tui(gateway.port, home, env={"NO_COLOR": "1", "TERM": "xterm-mono"})
    screen = pane.wait_for("billed to extra usage", escapes=True)
    banner = next(line for line in screen.splitlines() if " HALTED  " in line)
    assert uses_colour(banner, "7")                     # reverse video instead of red
    for line in screen.splitlines():
        assert not any(set(params) & COLOUR_CODES for params in sgr_params(line)), line
    for tab in "234":
        pane.send(tab)
        pane.wait_for(lambda s: "HALTED" in s and EXIT_MARK not in s)
    pane.send("1")
    for width, height in ((60, 20), (30, 8), (12, 3), (100, 30), (80, 24)):
        pane.resize(width, height)
        time.sleep(0.3)                                 # a frame or two at this size
        assert EXIT_MARK not in pane.screen()
    screen = pane.wait_for("billed to extra usage")
    assert EXIT_MARK not in screen and "Traceback" not in screen
    pane.send("q")
    screen = pane.wait_for(f"{EXIT_MARK} 0")
    assert "billed to extra usage" not in screen        # the terminal is back to the shell


def test_tabs_help_and_quit(gateway, home, tui):
    pane = tui(gateway.port, home)
    pane.wait_for("Guard      normal")
    pane.send("?")
    pane.wait_for("Tab / Shift-Tab")
    pane.send("x")                                      # any key closes the help
    pane.wait_for(lambda s: "Tab / Shift-Tab" not in s)
    pane.send("Tab")
    pane.wait_for("Config (missing)")
    pane.send("Tab")
    pane.wait_for("Utilization")
    pane.send("BTab", "BTab")
    pane.wait_for("Guard      normal")
    pane.send("3")
    pane.wait_for("Per model")
    pane.send("q")
    pane.wait_for(f"{EXIT_MARK} 0")


def test_a_hostile_model_name_in_hits_is_shown_not_obeyed(gateway, home, tui):
    # JSON escapes: an ESC colour sequence, a C1 CSI and a right-to-left override.
    body = ('{"model": "m\\u001b[41mEVIL\\u009b\\u202eZ", "max_tokens": 8, '
            '"messages": [{"role": "user", "content": "hi"}]}')
    assert requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", data=body, timeout=5,
                         headers={"x-api-key": "k", "content-type": "application/json"}).status_code == 200
    shown = "m\\x1b[41mEVIL\\x9b\\u202eZ"
    pane = tui(gateway.port, home, width=160, height=30)
    pane.wait_for("1 Status")
    pane.send("4")
    pane.wait_for(shown)
    row = next(line for line in pane.screen(escapes=True).splitlines() if "EVIL" in line)
    assert not uses_colour(row, "41")
    pane.send("Enter")
    details = pane.wait_for(lambda s: "record " in s and re.search(r"model\s+" + re.escape(shown), s))
    assert EXIT_MARK not in details


def test_a_gateway_that_wants_a_key_says_which_variable_to_set(sim, home, tui):
    from .helpers import running_gateway
    with running_gateway(make_settings(home, sim.url, env={"DARIO_API_KEY": "gw-key"})) as gateway:
        pane = tui(gateway.port, home, width=160)
        screen = pane.wait_for(f"the gateway on 127.0.0.1:{gateway.port} answered HTTP 401")
        assert "set DARIO_API_KEY to the gateway's key; it is sent as x-dario-api-key" in screen
        assert "gw-key" not in screen


def test_a_terminal_without_cursor_motion_gets_one_line_not_a_mess(gateway, home, tui):
    pane = tui(gateway.port, home, env={"TERM": "dumb"})
    screen = pane.wait_for(f"{EXIT_MARK} 1")
    assert "cannot move the cursor" in screen and "Traceback" not in screen


# -- pure parts, no tmux ----------------------------------------------------------

class NoClient:
    port = 9


def record(n, ts=1_700_000_000_000, **fields):
    return {"id": n, "timestamp": ts + n, "model": "m", "bucket": "subscription", **fields}


def test_feed_keeps_hits_newest_first_without_repeats_and_bounded():
    feed = Feed(NoClient(), max_hits=3)
    for n in (1, 2, 3):
        feed.add_event("record", record(n))
    for n in (2, 3, 4):                                 # a reconnect repeats the backlog
        feed.add_event("record", record(n))
    assert [r["id"] for r in feed.view().hits] == [4, 3, 2]


def test_feed_tracks_halt_and_resume_events():
    clock = FakeClock()
    feed = Feed(NoClient(), clock=clock)
    halt = {"since": 1, "cooldownUntil": None, "reason": "overage_detected", "account": None,
            "request": {"claim": "overage", "model": "m"}}
    feed.add_event("overage_halt", halt)
    assert feed.view().halted and "new requests get 503" in feed.view().notice.text
    feed.add_event("overage_resume", {"reason": "manual", "previousSince": 1, "account": None, "resumedAt": 2})
    assert not feed.view().halted


def test_countdown_text():
    halt = {"since": 0, "cooldownUntil": 1_000_000_000_000 + 1_788_000}
    assert countdown(halt, 1_000_000_000) == "Auto-resume in 29m 48s"
    assert countdown(halt, 1_000_002_000) == "Auto-resume due now"
    assert countdown({"cooldownUntil": None}, 0) == "automatic resume is off"


def test_config_editor_refuses_to_save_over_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    editor = ConfigEditor(str(path))
    editor.selected = [key.name for key in config.SCHEMA].index("overageGuard.notifyOs")
    editor.edit()
    assert editor.pending == {"overageGuard.notifyOs": False}
    editor.save()
    assert "not valid JSON" in editor.message[0] and path.read_text() == "{not json"


def test_guard_headroom_lines():
    from dario_lib.tui_tabs import guard_headroom
    status = {"guard": {"guards": {"utilization": {"util5h": {"warn": 0.8, "halt": 0.95}},
                                   "unifiedStatus": {"halt": ["rejected"]}}},
              "lastRate": {"util5h": 0.72, "unifiedStatus": "allowed"},
              "budgets": [{"account": "*", "usd": 20.0, "window": "1d", "warnAt": 0.8, "spentUsd": 13.2}]}
    assert guard_headroom(status) == [("util5h 72% (warn 80%, halt 95%)", "normal"),
                                      ("status allowed (halt on rejected)", "normal"),
                                      ("$13.20 of $20.00 per 1d for *", "normal")]
    status["lastRate"]["util5h"] = 0.96
    assert guard_headroom(status)[0][1] == "bad"


def test_status_shows_each_guard_and_its_headroom(sim, home, tui):
    (home / "config.json").write_text(json.dumps({"guards": {
        "utilization": {"util5h": {"warn": 0.8, "halt": 0.95}},
        "budgets": [{"account": "*", "usd": 20, "window": "1d"}]}}))
    from .helpers import running_gateway
    with running_gateway(make_settings(home, sim.url)) as gateway:
        post(gateway.port, {"x-sim-util5h": "0.72"})
        pane = tui(gateway.port, home)
        screen = pane.wait_for("util5h 72% (warn 80%, halt 95%)")
        assert re.search(r"\$0\.\d\d of \$20\.00 per 1d for \*", screen)


def test_polling_a_gateway_that_is_down_waits_instead_of_spinning():
    from dario_lib.client import GatewayDown

    class DownClient:
        port = 9
        calls = 0

        def status(self):
            DownClient.calls += 1
            raise GatewayDown("refused")

        def analytics(self):
            raise GatewayDown("refused")

        def events(self, timeout=60):
            raise GatewayDown("refused")

    import threading

    class CountingEvent(threading.Event):
        waits = 0

        def wait(self, timeout=None):
            CountingEvent.waits += 1
            return super().wait(timeout)

    feed = Feed(DownClient(), status_every=0.2, backoff=(5.0, 5.0))
    feed._wake = CountingEvent()
    feed.start()
    time.sleep(1.0)
    feed.stop()
    assert 3 <= DownClient.calls <= 7            # about one try per 0.2 s
    assert CountingEvent.waits <= 10             # and the loop sleeps between them, never spins
