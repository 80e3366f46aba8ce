"""The terminal UI (`python dario.py` on a terminal): a curses client of the running gateway.

Tabs Status, Config, Analytics and Hits over one `tui_feed.Feed`, which does all network
I/O on its own threads. Threading contract: everything in this module runs on the UI
thread. Each frame renders from `feed.view()`, a snapshot, so drawing never waits on the
network; keys that need the gateway (`R`, `r`, `s`) only ask the feed to act. `R` asks
for confirmation first (`y` resumes, any other key cancels).

The Config tab edits the gateway's own configuration through `GET/PUT /admin/config`
(the feed fetches and saves; values are validated here on entry with `config`, as
`dario config set` validates them, and again by the gateway), so `s` saves the file of
the gateway this TUI watches and applies it at once, whatever `$DARIO_HOME` this
process has. With no gateway there is nothing to edit: the tab says so.

Nothing is printed while curses owns the terminal; an error that stops the TUI is one
line on stderr after the terminal is restored. `curses` is imported only here and in
`tui_draw`; the `tui*` modules are imported only when the TUI starts.
"""

import curses
import json
import locale
import logging
import os
import sys
import time
from dataclasses import dataclass

from . import config, tui_draw, tui_tabs
from .client import Client
from .tui_feed import Feed, hit_key

log = logging.getLogger(__name__)

TICK_MS = 250                   # a frame at least this often: countdowns stay live
STATUS, CONFIG, ANALYTICS, HITS = range(4)
HINTS = {STATUS: "R resume  r refresh  q quit", CONFIG: "Enter edit  s save+apply  q quit",
         ANALYTICS: "t requests/tokens  q quit", HITS: "Enter details  g newest  q quit"}


@dataclass
class Prompt:
    text: str
    error: str = None
    fresh: bool = True          # still the value it opened with: typing replaces it
    initial: str = None          # the text it opened with (set from `text`)

    def __post_init__(self):
        if self.initial is None:
            self.initial = self.text


class ConfigEditor:
    """The Config tab's state: the gateway's config as last fetched (`state`, the
    /admin/config answer the View carries), edits not yet saved, the open prompt, and
    the save in flight. UI thread only; `send(changes) -> seq` hands a save to the feed."""

    def __init__(self, send=None):
        self.send = send
        self.selected = 0
        self.pending = {}           # dotted name -> validated value, until `s`
        self.prompt = None
        self.message = None         # (text, style) under the list
        self.state = None           # GET/PUT /admin/config answer, None while unknown
        self.error = None           # why there is no state
        self.saving = None          # seq of the save in flight
        self.sent = {}              # what it sent

    @property
    def name(self):
        return config.SCHEMA[self.selected].name

    def sync(self, view):
        """Take the latest config and save outcome from a View."""
        self.state, self.error = view.config, view.config_error
        saved = view.saved
        if self.saving is None or saved is None or saved.seq != self.saving:
            return
        self.saving = None
        if saved.ok:
            for name, value in self.sent.items():
                if name in self.pending and as_json(name, self.pending[name]) == as_json(name, value):
                    del self.pending[name]
            self.message = saved_text(saved.answer, list(self.sent))
        else:
            self.message = (saved.text, "bad")
        self.sent = {}

    def value(self, name):
        """The value shown for a setting (credentials masked): the edit, else the one in force."""
        if name in self.pending:
            return config.public_value(name, self.pending[name])
        return (self.state or {}).get("effective", {}).get(name)

    def origin(self, name):
        """Where the shown value comes from, when that is worth a note."""
        if name in self.pending or self.state is None:
            return ""
        notes = []
        source = (self.state.get("sources") or {}).get(name)
        if source in ("default", "flag", "env"):
            notes.append(source)
        if name in (self.state.get("pending") or ()):
            notes.append("saved: applies at restart")
        return f"  ({', '.join(notes)})" if notes else ""

    def move(self, delta):
        self.selected = min(max(self.selected + delta, 0), len(config.SCHEMA) - 1)
        self.message = None

    def edit(self):
        """Enter on a key: booleans toggle, everything else opens a prompt."""
        if self.state is None:
            self.message = ("nothing to edit: " + (self.error or "no gateway yet"), "bad")
            return
        value = self.value(self.name)
        if isinstance(value, bool):
            self._apply(self.name, not value)
        else:
            self.prompt = Prompt(edit_text(self.name, value))

    def submit(self):
        """Enter in the prompt: parse and validate now; a rejected value is not applied.
        An untouched prompt changes nothing (a masked credential stays what it was)."""
        if self.prompt.text == self.prompt.initial:
            self.prompt = None
            self.message = (f"{self.name} unchanged", "normal")
            return
        try:
            value = config.parse_value(self.name, self.prompt.text)
        except config.ConfigError as err:
            self.prompt.error = str(err)
            return
        self.prompt = None
        self._apply(self.name, value)

    def _apply(self, name, value):
        if as_json(name, value) == (self.state or {}).get("effective", {}).get(name):
            self.pending.pop(name, None)        # back to the value in force
        else:
            self.pending[name] = value
        self.message = (f"{name} = {tui_draw.value_text(config.public_value(name, value))}"
                        + (" (not saved yet: s saves and applies)" if self.pending else ""),
                        "warn" if self.pending else "normal")

    def save(self):
        if self.saving is not None:
            self.message = ("still saving the last changes...", "normal")
        elif not self.pending:
            self.message = ("nothing to save", "normal")
        elif self.state is None:
            self.message = ("cannot save: " + (self.error or "no gateway yet"), "bad")
        elif self.state.get("source") == "invalid":
            self.message = (f"not saving: {self.state.get('path')} is not valid JSON; fix or remove it first",
                            "bad")
        else:
            self.sent = dict(self.pending)
            self.saving = self.send({name: as_json(name, value) for name, value in self.sent.items()})
            self.message = ("saving through the gateway...", "normal")


def saved_text(answer, names):
    """(text, style) for a save the gateway took: where, and what is not in force yet."""
    text = f"saved to {answer.get('path')} and applied"
    style = "good"
    later = [name for name in names if name in (answer.get("pending") or ())]
    if later:
        text += f"; {', '.join(later)}: the gateway applies at its next restart"
        style = "warn"
    overridden = answer.get("overridden") or {}
    if overridden:
        text += "; " + ", ".join(f"{name} stays as its {'flag' if source == 'flag' else 'environment'} sets it"
                                 for name, source in overridden.items())
        style = "warn"
    return text, style


def as_json(name, value):
    """A parsed value as it would be written to the file (what `with_value` stores)."""
    node = config.with_value({}, name, value)
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def edit_text(name, value):
    """The text a prompt starts with: what parse_value() turns back into the value."""
    if isinstance(value, str):
        return value
    if value is None:
        # Text settings take "" for null, JSON-valued ones take "null".
        try:
            return "" if config.parse_value(name, "") is None else "null"
        except config.ConfigError:
            return "null"
    return json.dumps(value)


class App:
    def __init__(self, feed, clock=time.time):
        self.feed = feed
        self.clock = clock
        self.tab = STATUS
        self.editor = ConfigEditor(feed.save_config)
        self.help = False
        self.confirm = False        # `R` asked: the next key decides
        self.details = None         # (record, scroll) while the details view is open
        self.selected_hit = None    # key of the selected Hits row; None follows the newest
        self.by_tokens = False
        self.quit_armed = False
        self.done = False

    # -- keys ------------------------------------------------------------------------

    def on_key(self, key, view):
        """One key from get_wch(): a str for characters, an int for special keys."""
        if self.help:
            self.help = False
            return
        if self.confirm:
            self.confirm = False
            if key == "y":
                self.feed.resume()
                self.feed.notify("resuming...", "info")
            else:
                self.feed.notify("resume cancelled", "info")
            return
        if self.tab == CONFIG and self.editor.prompt is not None:
            self._prompt_key(key)
            return
        name = _key_name(key)
        if self.details is not None:
            self._details_key(name)
            return
        if name != "q":
            self.quit_armed = False
        if name == "q":
            if self.editor.pending and not self.quit_armed:
                self.quit_armed = True
                self._show(CONFIG)
                self.editor.message = ("unsaved changes: s saves them, q again quits without saving", "bad")
            else:
                self.done = True
        elif name == "?":
            self.help = True
        elif name in ("tab", "btab"):
            self._show((self.tab + (1 if name == "tab" else -1)) % len(tui_draw.TABS))
        elif name in ("1", "2", "3", "4"):
            self._show(int(name) - 1)
        elif name == "R":
            self.confirm = True
        elif name == "r":
            self.feed.refresh()
        elif self.tab == CONFIG:
            self._config_key(name)
        elif self.tab == ANALYTICS and name == "t":
            self.by_tokens = not self.by_tokens
        elif self.tab == HITS:
            self._hits_key(name, view)

    def _show(self, tab):
        self.tab = tab
        self.feed.watch_config(tab == CONFIG)

    def _config_key(self, name):
        moves = {"up": -1, "k": -1, "down": 1, "j": 1, "pgup": -10, "pgdn": 10, "home": -99, "end": 99}
        if name in moves:
            self.editor.move(moves[name])
        elif name == "enter":
            self.editor.edit()
        elif name == "s":
            self.editor.save()

    def _prompt_key(self, key):
        prompt = self.editor.prompt
        name = _key_name(key)
        if name == "enter":
            self.editor.submit()
        elif name == "esc":
            self.editor.prompt = None
            self.editor.message = ("edit cancelled", "normal")
        elif name == "backspace":
            prompt.text, prompt.error, prompt.fresh = prompt.text[:-1], None, False
        elif key == "\x15":                             # Ctrl-U
            prompt.text, prompt.error, prompt.fresh = "", None, False
        elif isinstance(key, str) and key.isprintable():
            prompt.text = key if prompt.fresh else prompt.text + key
            prompt.error, prompt.fresh = None, False

    def _hits_key(self, name, view):
        rows = view.hits
        index = self._hit_index(rows)
        if name in ("up", "k", "down", "j", "pgup", "pgdn"):
            step = {"up": -1, "k": -1, "down": 1, "j": 1, "pgup": -10, "pgdn": 10}[name]
            index = min(max(index + step, 0), max(0, len(rows) - 1))
            self.selected_hit = hit_key(rows[index]) if rows and index > 0 else None
        elif name in ("g", "home"):
            self.selected_hit = None
        elif name == "enter" and rows:
            self.details = (rows[index], 0)

    def _details_key(self, name):
        record, scroll = self.details
        if name in ("esc", "enter", "q"):
            self.details = None
        elif name in ("down", "j"):
            self.details = (record, scroll + 1)
        elif name in ("up", "k"):
            self.details = (record, max(0, scroll - 1))

    def _hit_index(self, rows):
        if self.selected_hit is None:
            return 0
        for index, record in enumerate(rows):
            if hit_key(record) == self.selected_hit:
                return index
        return 0

    # -- frames ----------------------------------------------------------------------

    def draw(self, p, view):
        now = self.clock()
        h, w = p.size
        p.win.erase()
        if h < 6 or w < 24:
            p.put(0, 0, "dario: window too small", "bold")
            if view.halted:
                p.put(1, 0, "HALTED", "banner")
            return
        self.editor.sync(view)
        tui_draw.draw_tabs(p, self.tab, view)
        try:
            self._draw_tab(p, view, now)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # A gateway of another version may send shapes this TUI does not expect:
            # say so on screen instead of dying.
            log.debug("cannot draw tab %s", self.tab, exc_info=True)
            p.put(2, 1, f"cannot show this tab: {err!r}", "bad")
        hint = HINTS[self.tab]
        tui_draw.draw_footer(p, view, now, hint)
        if self.details is not None:
            record, scroll = self.details
            self.details = (record, tui_draw.draw_details(p, record, scroll))
        if self.confirm:
            tui_draw.draw_confirm(p, view)
        if self.help:
            tui_draw.draw_help(p)

    def _draw_tab(self, p, view, now):
        if self.tab == STATUS:
            tui_tabs.draw_status(p, 2, view, now)
        elif self.tab == CONFIG:
            tui_tabs.draw_config(p, 2, self.editor, view.port)
        elif self.tab == ANALYTICS:
            tui_tabs.draw_analytics(p, 2, view, self.by_tokens, now)
        else:
            tui_tabs.draw_hits(p, 2, view, self._hit_index(view.hits), now)

    def run(self, stdscr, color):
        try:
            curses.curs_set(0)
        except curses.error:
            pass                                        # some terminals cannot hide it
        curses.set_escdelay(25)                         # Esc closes at once, not after 1 s
        stdscr.keypad(True)
        stdscr.timeout(TICK_MS)
        fancy = (locale.getpreferredencoding(False) or "").lower().replace("-", "") == "utf8"
        painter = tui_draw.Painter(stdscr, color, fancy)
        while not self.done:
            view = self.feed.view()
            self.draw(painter, view)
            stdscr.noutrefresh()
            curses.doupdate()
            try:
                key = stdscr.get_wch()
            except curses.error:
                continue                                # no key within the tick
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                stdscr.clear()
                continue
            self.on_key(key, view)


_NAMES = {"\n": "enter", "\r": "enter", "\t": "tab", "\x1b": "esc", "\x7f": "backspace", "\x08": "backspace",
          curses.KEY_ENTER: "enter", curses.KEY_BTAB: "btab", curses.KEY_UP: "up", curses.KEY_DOWN: "down",
          curses.KEY_PPAGE: "pgup", curses.KEY_NPAGE: "pgdn", curses.KEY_HOME: "home", curses.KEY_END: "end",
          curses.KEY_BACKSPACE: "backspace"}


def _key_name(key):
    return _NAMES.get(key, key if isinstance(key, str) else None)


def use_color(env=os.environ):
    """Colours unless NO_COLOR is set (https://no-color.org) or the terminal has none."""
    return not env.get("NO_COLOR") and curses.has_colors()


def terminal_problem():
    """Why this terminal cannot show the TUI (unknown TERM, no cursor motion), or None."""
    term = os.environ.get("TERM") or ""
    try:
        curses.setupterm(term or None, sys.stdout.fileno())
    except (curses.error, OSError, ValueError) as err:
        return f"cannot run the TUI on this terminal (TERM={term or 'unset'}): {err}"
    if not curses.tigetstr("cup"):
        return f"this terminal (TERM={term or 'unset'}) cannot move the cursor, so it cannot show the TUI"
    return None


def run_tui(port, api_key=None, clock=time.time):
    """Run the TUI against the gateway on port until `q`. Returns the exit status."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("[dario] the TUI needs a terminal; try `python dario.py status`", file=sys.stderr)
        return 1
    problem = terminal_problem()
    if problem:
        print(f"[dario] {problem}; try `python dario.py status` or `python dario.py help`", file=sys.stderr)
        return 1
    root = logging.getLogger()
    if not root.handlers:
        # Without a handler, logging's last resort writes warnings over the screen.
        root.addHandler(logging.NullHandler())
    try:
        locale.setlocale(locale.LC_ALL, "")     # curses needs it to draw non-ASCII text
    except locale.Error:
        pass                                    # a broken LANG: ASCII fallbacks are used
    feed = Feed(Client(port, api_key=api_key, timeout=3), clock=clock).start()
    app = App(feed, clock=clock)
    try:
        curses.wrapper(lambda stdscr: app.run(stdscr, use_color()))
    except KeyboardInterrupt:
        pass
    except curses.error as err:
        print(f"[dario] cannot run the TUI on this terminal (TERM={os.environ.get('TERM')}): {err}",
              file=sys.stderr)
        return 1
    except Exception as err:
        # curses.wrapper has restored the terminal; one line instead of a traceback.
        log.debug("the TUI stopped", exc_info=True)
        print(f"[dario] the TUI stopped on an internal error: {err!r}", file=sys.stderr)
        return 1
    finally:
        feed.stop()
    return 0


def main(argv=None):
    """`python -m dario_lib.tui [--port=N]`; port: --port > DARIO_PORT > config > 3456."""
    from .cli import Parser, UsageError
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser("dario")
    parser.add_argument("--port", dest="port")
    try:
        opts = parser.parse(argv)
        port = config.client_port(opts.port, os.environ)
    except (UsageError, config.ConfigError) as err:
        print(f"[dario] {err}.", file=sys.stderr)
        return 2
    if opts.help:
        print("usage: python dario.py [--port=N]   (the TUI; see `python dario.py help`)")
        return 0
    return run_tui(port)


if __name__ == "__main__":
    sys.exit(main())
