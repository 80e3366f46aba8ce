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

from .helpers import FakeClock, RecordingNotifier, make_settings, running_gateway, wait_until  # noqa: E402

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


def flat(screen):
    """The screen's words joined by single spaces: a wrapped message reads as one line."""
    return " ".join(screen.split())


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


def test_capital_r_asks_first_then_resumes_the_gateway(gateway, home, tui):
    trip(gateway)
    pane = tui(gateway.port, home)
    pane.wait_for("billed to extra usage")
    pane.send("R")
    pane.wait_for("y resumes; any other key cancels")
    pane.send("n")
    pane.wait_for(lambda s: "resume cancelled" in s and "y resumes" not in s)
    assert guard_state(gateway.port) == "halted"
    pane.send("R")
    pane.wait_for("y resumes; any other key cancels")
    pane.send("y")
    assert wait_until(lambda: guard_state(gateway.port) == "normal", timeout=5)
    # The outcome: the answer to R, or the resume event the stream brought first.
    pane.wait_for(lambda s: "HALTED" not in s and "Guard      normal" in s
                  and ("resumed at" in s or "guard back to normal (manual)" in s))
    assert post(gateway.port).status_code == 200


def _select(pane, name):
    pane.send("Home", *["Down"] * [key.name for key in config.SCHEMA].index(name))
    pane.wait_for(f"> {name} ")


@pytest.fixture
def applying(sim, tmp_path):
    """A gateway with a DARIO_HOME of its own that applies config changes as `dario proxy`
    does; the TUI in these tests runs with another DARIO_HOME."""
    home = tmp_path / "gateway-home"
    home.mkdir()
    secret = "http://user:hunter2@127.0.0.1:3128"
    (home / "config.json").write_text(json.dumps(
        {"custom": {"keep": True}, "overageGuard": {"cooldownMs": 60000}, "upstream": {"proxy": secret}}, indent=2))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        gateway.resolver = lambda: make_settings(home, sim.url)
        gateway.home = home
        yield gateway


def test_config_tab_edits_and_applies_the_gateways_own_config(applying, home, tui):
    path = applying.home / "config.json"
    before = path.read_bytes()
    pane = tui(applying.port, home, width=160, height=44)       # `home`: the TUI's own DARIO_HOME
    pane.wait_for("1 Status")
    pane.send("2")
    screen = pane.wait_for(f"Config (file) {path}")
    assert re.search(r"overageGuard.cooldownMs\s+60000\n", screen)
    assert re.search(r"overageGuard.behavior\s+halt  \(default\)", screen)
    assert "http://***:***@127.0.0.1:3128" in screen and "hunter2" not in screen

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
    _select(pane, "upstream.proxy")
    pane.send("Enter", "Enter")                         # the masked value, untouched: no change
    pane.wait_for("upstream.proxy unchanged")
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
    _select(pane, "maxRecords")
    pane.send("Enter")
    pane.type("50")
    pane.send("Enter")
    pane.wait_for("3 unsaved change(s)")
    assert path.read_bytes() == before                  # nothing is written before `s`
    pane.send("s")
    screen = pane.wait_for(lambda s: "and applied; maxRecords: the gateway applies at its next restart" in flat(s))
    assert f"saved to {path}" in flat(screen) and "Traceback" not in screen
    assert json.loads(path.read_text()) == {
        "custom": {"keep": True}, "upstream": {"proxy": "http://user:hunter2@127.0.0.1:3128"}, "maxRecords": 50,
        "overageGuard": {"cooldownMs": 60000, "behavior": "warn", "notifyOs": False}}
    assert path.stat().st_mode & 0o777 == 0o600
    assert applying.guard.config.behavior == "warn" and applying.guard.config.notify_os is False
    assert not (home / "config.json").exists()          # the TUI's own home is untouched
    screen = pane.wait_for(lambda s: re.search(r"maxRecords\s+10000  \(saved: applies at restart\)", s))
    assert re.search(r"overageGuard.behavior\s+warn\n", screen)


def test_config_tab_without_a_gateway_says_what_to_do(home, tui):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pane = tui(port, home)
    pane.wait_for("no gateway running")
    pane.send("2")
    screen = pane.wait_for("This tab edits the running gateway's own config")
    assert "dario config set KEY VALUE" in screen
    pane.send("Enter")
    pane.wait_for("nothing to edit: no gateway running")
    assert EXIT_MARK not in pane.screen()


def test_hits_marks_the_overage_row_in_red_and_shows_its_details(gateway, home, tui):
    post(gateway.port)
    pane = tui(gateway.port, home)
    pane.wait_for("1 Status")
    pane.send("4")
    pane.wait_for("five_hour")
    trip(gateway)
    assert post(gateway.port).status_code == 503        # newest row: the halted request
    # Wait for the halted request's row itself: in 80 columns the model loses its
    # `claude-` prefix, the path is short, and the status says `halted`.
    screen = pane.wait_for(lambda s: "HALTED" in s and re.search(r"\d\d:\d\d:\d\d msg\s+opus-4-5\s+\S+\s+halted ", s),
                           escapes=True)
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
    # Times in ISO 8601 with the offset, the raw value after them.
    assert re.search(r"timestamp\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \(\d{13}\)", details)
    pane.send("Escape")
    pane.wait_for(lambda s: "extra_usage" not in s and "EXTRA" in s)


def test_the_tui_survives_the_gateway_going_away_and_coming_back(sim, home, tui):
    server = GatewayServer(make_settings(home, sim.url), notifier=RecordingNotifier()).start(poll_interval=0.02)
    port, servers = server.port, [server]
    try:
        post(port, {"x-sim-model": "old-mdl"})
        pane = tui(port, home)
        pane.wait_for(f":{port} ok")
        pane.send("4")
        pane.wait_for("old-mdl")
        pane.send("1")
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
        pane.send("4")
        # A new gateway (its uptime went back): the old one's rows are gone.
        pane.wait_for(lambda s: "old-mdl" not in s and "no requests yet" in s)
        post(port, {"x-sim-model": "new-mdl"})
        pane.wait_for("new-mdl")
        pane.send("1")
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


def test_analytics_draws_each_window_the_api_reports_and_status_says_why_extra_usage_is_off(gateway, home, tui):
    windows = {"7d_sonnet": {"utilization": "0.5", "status": "allowed_warning", "reset": "1790000000"},
               "overage": {"disabled-reason": "out_of_credits"}}
    assert post(gateway.port, {"x-sim-claim": "api"}).status_code == 200        # billed outside the subscription
    requests.post(f"http://127.0.0.1:{gateway.port}/admin/resume", json={}, timeout=5)
    assert post(gateway.port, {"x-sim-windows": json.dumps(windows), "x-sim-util5h": "0.42"}).status_code == 200
    pane = tui(gateway.port, home)
    pane.wait_for("extra usage disabled by the API: out_of_credits")
    pane.send("3")
    screen = pane.wait_for(lambda s: "7d_sonnet" in s and "Per model" in s)
    bars = {line.split()[0]: line for line in screen.splitlines() if "[" in line and "]" in line}
    assert {"5h", "7d", "7d_sonnet", "Overage"} <= set(bars), screen
    assert "42%" in bars["5h"] and "50% allowed_warning" in bars["7d_sonnet"] and "resets" in bars["7d_sonnet"]
    assert re.search(r"1 non-subscription, est\. \$\d+\.\d\d$", bars["Overage"].rstrip())
    assert all(len(line) <= 80 for line in screen.splitlines())


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


def config_state(source="file", **effective):
    """An /admin/config answer as the gateway gives it."""
    values = {key.name: config.public_value(key.name, key.default) for key in config.SCHEMA}
    values["overageGuard.subscriptionClaims"] = []
    values.update({name.replace("__", "."): value for name, value in effective.items()})
    return {"path": "/gw/config.json", "source": source, "file": {},
            "effective": values, "sources": {key.name: "default" for key in config.SCHEMA}, "pending": []}


class Sent:
    """What the editor hands the feed: (seq, changes)."""

    def __init__(self):
        self.calls = []

    def __call__(self, changes):
        self.calls.append(changes)
        return len(self.calls)


def editor_view(state=None, error=None, saved=None):
    from dario_lib.tui_feed import View
    return View(port=9, link="up", config=state, config_error=error, saved=saved)


def select(editor, name):
    editor.selected = [key.name for key in config.SCHEMA].index(name)


def test_config_editor_saves_through_the_feed_and_reports_the_outcome():
    from dario_lib.tui_feed import Saved
    send = Sent()
    editor = ConfigEditor(send)
    editor.sync(editor_view(None, "no gateway running on 127.0.0.1:9"))
    editor.edit()
    assert editor.message == ("nothing to edit: no gateway running on 127.0.0.1:9", "bad")
    state = config_state(**{"upstream__proxy": "http://***:***@127.0.0.1:3128"})
    editor.sync(editor_view(state))
    select(editor, "overageGuard.notifyOs")
    editor.edit()                                       # toggles
    select(editor, "upstream.proxy")
    editor.edit()
    assert editor.prompt.text == "http://***:***@127.0.0.1:3128"
    editor.submit()                                     # untouched: the masked value is not sent back
    assert editor.message == ("upstream.proxy unchanged", "normal")
    editor.edit()
    editor.prompt.text = "http://u:secret@127.0.0.1:3128"
    editor.submit()
    assert editor.value("upstream.proxy") == "http://***:***@127.0.0.1:3128"    # shown masked
    assert "secret" not in editor.message[0]
    editor.save()
    assert send.calls == [{"overageGuard.notifyOs": False, "upstream.proxy": "http://u:secret@127.0.0.1:3128"}]
    assert editor.message == ("saving through the gateway...", "normal")
    editor.save()
    assert editor.message[0] == "still saving the last changes..." and len(send.calls) == 1
    editor.sync(editor_view(state, saved=Saved(1, False, "not saved: HTTP 400: invalid value")))
    assert editor.message == ("not saved: HTTP 400: invalid value", "bad") and len(editor.pending) == 2
    editor.save()
    answer = dict(config_state(**{"overageGuard__notifyOs": False}), pending=[], overridden={
        "overageGuard.notifyOs": "env"})
    editor.sync(editor_view(state, saved=Saved(2, True, answer=answer)))
    assert editor.pending == {}
    assert editor.message == ("saved to /gw/config.json and applied; overageGuard.notifyOs stays as its "
                              "environment sets it", "warn")


def test_config_editor_will_not_save_over_invalid_json():
    send = Sent()
    editor = ConfigEditor(send)
    editor.sync(editor_view(config_state(source="invalid")))
    select(editor, "overageGuard.notifyOs")
    editor.edit()
    assert editor.pending == {"overageGuard.notifyOs": False}
    editor.save()
    assert "not valid JSON" in editor.message[0] and send.calls == []


def test_feed_clears_the_rows_of_a_gateway_that_restarted():
    clock = FakeClock()
    feed = Feed(NoClient(), clock=clock)
    for n in (1, 2, 3):
        feed.add_event("record", record(n))
    feed.add_event("record", record(1, ts=1_700_000_100_000))     # ids start over: a new gateway
    assert [r["timestamp"] for r in feed.view().hits] == [1_700_000_100_001]
    feed.add_event("record", record(2, ts=1_700_000_100_000))
    assert [r["id"] for r in feed.view().hits] == [2, 1]


def test_feed_clears_old_rows_when_the_uptime_says_a_new_gateway_started():
    clock = FakeClock(1_700_000_000.0)
    feed = Feed(NoClient(), clock=clock)
    feed.set_status({"uptimeS": 500.0})
    feed.add_event("record", record(7, ts=1_699_999_990_000))
    feed.set_status({"uptimeS": 500.3})                     # the same gateway
    assert len(feed.view().hits) == 1
    clock.advance(60)
    feed.add_event("record", record(8, ts=1_700_000_059_000))  # made by the new gateway...
    feed.set_status({"uptimeS": 2.0})                       # ...which started 2 s ago
    assert [r["id"] for r in feed.view().hits] == [8]
    assert "restarted" in feed.view().notice.text


class Window:
    """A curses window stand-in: a grid of characters, for drawing without a terminal."""

    def __init__(self, height=24, width=80):
        self.height, self.width = height, width
        self.erase()

    def getmaxyx(self):
        return self.height, self.width

    def erase(self):
        self.cells = [[" "] * self.width for _ in range(self.height)]

    def addstr(self, y, x, text, attr=0):
        for offset, ch in enumerate(text):
            if x + offset < self.width:
                self.cells[y][x + offset] = ch

    def text(self):
        return "\n".join("".join(row).rstrip() for row in self.cells)


def painter(height=24, width=80):
    """A Painter on a Window that also notes every write it had to cut at the edge."""
    from dario_lib.tui_draw import Painter, clean

    class Recording(Painter):
        cut = []

        def put(self, y, x, text, style="normal"):
            if len(clean(text).rstrip()) > self.size[1] - x:
                self.cut.append(text)
            return super().put(y, x, text, style)

    import curses
    curses.setupterm("xterm", 1)        # curses constants need a terminal description only
    return Recording(Window(height, width), False, True)


BUSY_ANALYTICS = {
    "generatedAt": 1_700_000_000_000,
    "lastHour": {"requests": 12345, "estimatedCostUsd": 1234.5678},
    "allTime": {"requests": 123456, "errorRate": 0.1234, "avgLatencyMs": 12345.6, "inputTokens": 123_456_789,
                "outputTokens": 98_765_432, "cacheReadTokens": 555_555_555, "cacheCreateTokens": 44_444_444,
                "estimatedCostUsd": 12345.6789, "unmeteredRequests": 12, "unmeteredCostUsd": 34.5678,
                "subscriptionPercent": 97.5, "nonSubscriptionRequests": 3, "nonSubscriptionCostUsd": 1.2345,
                "billingBucketBreakdown": {"subscription": 120000, "subscription_fallback": 3000, "extra_usage": 1,
                                           "api": 1, "other": 1, "unknown": 453}},
    "perModel": {"claude-opus-4-5-20251101": {"requests": 10}, "claude-haiku-4-5": {"requests": 3}},
    "utilization": {"util5h": 0.42, "util7d": 0.12, "overageUtil": 0.05},
    "burnRate": {"tokensPerMinute": 123456.7, "costPerHourUsd": 123.45, "util5hFullInMinutes": 42.0},
}


def test_analytics_fits_80_columns_with_a_bar_per_window_and_the_overage_cost():
    from dario_lib.tui_feed import View
    from dario_lib.tui_tabs import draw_analytics
    windows = {"5h": {"utilization": 0.42, "status": "allowed", "reset": "1700003600"},
               "7d": {"utilization": 0.12, "status": "allowed_warning", "reset": "1700500000"},
               "7d_sonnet": {"utilization": 0.9, "status": "rejected", "reset": None}}
    view = View(port=9, link="up", analytics=BUSY_ANALYTICS,
                status={"lastRate": {"windows": windows, "overageUtil": 0.05}})
    p = painter()
    draw_analytics(p, 2, view, False, 1_700_000_000.0)
    screen = p.win.text()
    assert p.cut == [] and not re.search(r"~$", screen.split("Per model")[0], re.M), screen
    assert "Unmetered  12 billed without readable usage, charged $34.5678 (worst case)" in screen
    assert "5h window full in ~42 min" in screen
    bars = {line.split()[0]: line for line in screen.splitlines() if "[" in line}
    assert set(bars) >= {"5h", "7d", "7d_sonnet", "Overage"}
    assert "42%" in bars["5h"] and "resets" in bars["5h"]
    assert "allowed_warning" in bars["7d"] and "rejected" in bars["7d_sonnet"]
    assert bars["Overage"].rstrip().endswith("5%  3 non-subscription, est. $1.23")
    # Without windows in /status (an older gateway): the 5h and 7d readings.
    p = painter()
    draw_analytics(p, 2, View(port=9, link="up", analytics=BUSY_ANALYTICS, status={}), False, 1_700_000_000.0)
    assert [line.split()[0] for line in p.win.text().splitlines() if "[" in line][:3] == ["5h", "7d", "Overage"]


def test_status_says_which_gateway_tripped_a_team_halt_and_why_extra_usage_is_off():
    from dario_lib.tui_feed import View
    from dario_lib.tui_tabs import draw_status
    halt = {"since": 1_700_000_000_000, "cooldownUntil": None, "reason": "overage_detected", "account": None,
            "gateway": "build-box:3456", "request": {"claim": "overage", "model": "m", "account": "a"}}
    status = {"guard": {"halt": halt, "halts": [halt], "config": {}}, "store": {"gateway": "laptop:3456"},
              "lastRate": {"overageDisabledReason": "out_of_credits"}, "version": "x", "bind": "127.0.0.1:9"}
    p = painter(30, 120)
    draw_status(p, 2, View(port=9, link="up", status=status, halt=halt), 1_700_000_100.0)
    screen = p.win.text()
    assert "origin    gateway build-box:3456 (another gateway on the shared store)" in screen
    assert "extra usage disabled by the API: out_of_credits" in screen
    status["store"]["gateway"] = "build-box:3456"
    p = painter(30, 120)
    draw_status(p, 2, View(port=9, link="up", status=status, halt=halt), 1_700_000_100.0)
    assert "origin    this gateway" in p.win.text()


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
