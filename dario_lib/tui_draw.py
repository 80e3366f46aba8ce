"""Drawing primitives for the TUI: a clipped, colour-aware `Painter`, text helpers, the
tab bar and footer, and the overlays (help, record details).

Runs on the UI thread only. `Painter` is the one place that writes to curses: it clips
every write to the window and maps style names to colours or, without colours, to
bold/reverse, so no caller has to think about the terminal's size or abilities. Every
write goes through `clean`, i.e. `inert.terminal`: text from the gateway (model names,
claims, account labels, error bodies) cannot move the cursor or change colours.
"""

import curses
import datetime
import json
import time

from . import guardtext, inert
from .billing import NON_SUBSCRIPTION
from .report import duration

TABS = ("Status", "Config", "Analytics", "Hits")


class Painter:
    """Clipped, style-aware writes to one window."""

    def __init__(self, win, color, fancy):
        self.win = win
        self.color = color
        self.dot = " · " if fancy else " - "
        self.full, self.empty = ("█", "░") if fancy else ("#", ".")
        self.styles = _styles(color)

    @property
    def size(self):
        return self.win.getmaxyx()

    def put(self, y, x, text, style="normal"):
        """Write text at (y, x), clipped to the window; returns the column after it."""
        h, w = self.win.getmaxyx()
        if not 0 <= y < h or not 0 <= x < w:
            return x
        text = clean(text)[:w - x]
        if not text:
            return x
        try:
            self.win.addstr(y, x, text, self.styles.get(style, 0))
        except curses.error:
            # Writing the window's bottom-right cell moves the cursor past the end, which
            # curses reports as an error after the text is on screen.
            pass
        return x + len(text)

    def line(self, y, text, style="normal"):
        """A whole row in one style (the text padded to the window's width)."""
        width = self.size[1]
        return self.put(y, 0, text.ljust(width), style)

    def spans(self, y, x, parts):
        """Write [(text, style), ...] one after the other."""
        for text, style in parts:
            x = self.put(y, x, text, style)
        return x


def _styles(color):
    styles = {"normal": curses.A_NORMAL, "bold": curses.A_BOLD, "sel": curses.A_REVERSE,
              "tab": curses.A_REVERSE | curses.A_BOLD, "dim": curses.A_DIM}
    if not color:
        # No colours: the banner is reverse video and "bad" is bold; rows also carry
        # a "!" marker, so nothing depends on colour alone.
        styles.update(banner=curses.A_REVERSE | curses.A_BOLD, bad=curses.A_BOLD,
                      good=curses.A_NORMAL, warn=curses.A_BOLD, accent=curses.A_BOLD,
                      badsel=curses.A_REVERSE | curses.A_BOLD)
        return styles
    curses.start_color()
    background = curses.COLOR_BLACK
    try:
        curses.use_default_colors()
        background = -1
    except curses.error:
        pass                                # the terminal cannot keep its own background
    pairs = {"banner": (curses.COLOR_WHITE, curses.COLOR_RED), "bad": (curses.COLOR_RED, background),
             "good": (curses.COLOR_GREEN, background), "warn": (curses.COLOR_YELLOW, background),
             "accent": (curses.COLOR_CYAN, background), "badsel": (curses.COLOR_WHITE, curses.COLOR_RED)}
    for number, (name, (fg, bg)) in enumerate(pairs.items(), start=1):
        curses.init_pair(number, fg, bg)
        styles[name] = curses.color_pair(number)
    styles["banner"] |= curses.A_BOLD
    styles["bad"] |= curses.A_BOLD
    styles["badsel"] |= curses.A_BOLD | curses.A_REVERSE
    styles["accent"] |= curses.A_BOLD
    return styles


# -- text -------------------------------------------------------------------------

def clean(text):
    """Text safe to draw: controls shown as escapes (`inert.terminal`), so a model name
    cannot move the cursor; what is still unprintable after that (zero-width and format
    characters, unassigned code points) becomes "?", so columns stay where they are."""
    text = inert.terminal(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def compact(n):
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def percent(fraction):
    return "  -" if fraction is None else f"{fraction * 100:3.0f}%"


def clock_time(ms):
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def ago(ms, now):
    return f"{duration(now - ms / 1000)} ago"


def countdown(halt, now):
    """The live auto-resume line of a halt."""
    until = halt.get("cooldownUntil")
    if not until:
        return "automatic resume is off"
    left = until / 1000 - now
    if left <= 0:
        return "Auto-resume due now"
    return f"Auto-resume in {duration(left)}"


def bar(p, fraction, width):
    fraction = min(max(fraction or 0.0, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + p.full * filled + p.empty * (width - filled) + "]"


def fit(text, width):
    text = clean(text if text is not None else "-")
    return text if len(text) <= width else text[:max(0, width - 1)] + "~"


def value_text(value):
    if isinstance(value, str):
        return value
    return json.dumps(value)


# -- chrome -----------------------------------------------------------------------

def draw_tabs(p, active, view):
    h, w = p.size
    p.line(0, "", "normal")
    x = p.put(0, 0, " dario ", "bold")
    for index, name in enumerate(TABS):
        x = p.put(0, x + 1, f" {index + 1} {name} ", "tab" if index == active else "normal")
    if view.halted:
        right, style = " HALTED ", "banner"
    elif view.link == "up":
        right, style = f" :{view.port} ok ", "good"
    else:
        right, style = f" :{view.port} down ", "bad"
    right_x = w - len(right) - 7
    if right_x > x:
        p.put(0, right_x, right, style)
        p.put(0, w - 7, " ? help", "dim")


def draw_footer(p, view, now, hint):
    h, w = p.size
    notice = view.notice
    if view.link != "up":
        text, style = view.error or "connecting...", "bad"
    elif notice is not None and now - notice.at < 8:
        text, style = notice.text, notice.level if notice.level != "info" else "bold"
    else:
        text, style = f"connected to 127.0.0.1:{view.port}", "dim"
    p.line(h - 1, "", "normal")
    x = p.put(h - 1, 1, text, style)
    if x + len(hint) + 3 < w:
        p.put(h - 1, w - len(hint) - 1, hint, "dim")

# -- overlays ---------------------------------------------------------------------

def draw_box(p, lines, title, styles=None):
    """A framed box in the middle of the screen holding lines (clipped to fit)."""
    h, w = p.size
    inner_w = min(w - 4, max([len(title) + 2] + [len(line) for line in lines]) + 2)
    inner_h = min(h - 4, len(lines))
    top, left = max(1, (h - inner_h - 2) // 2), max(0, (w - inner_w - 2) // 2)
    p.put(top, left, "+" + f" {title} ".center(inner_w, "-") + "+", "bold")
    for row in range(inner_h):
        text = lines[row] if row < len(lines) else ""
        style = (styles or {}).get(row, "normal")
        p.put(top + 1 + row, left, "|", "bold")
        p.put(top + 1 + row, left + 1, (" " + fit(text, inner_w - 2)).ljust(inner_w), style)
        p.put(top + 1 + row, left + 1 + inner_w, "|", "bold")
    p.put(top + 1 + inner_h, left, "+" + "-" * inner_w + "+", "bold")
    return inner_h


HELP_LINES = [
    "Tab / Shift-Tab    next / previous tab",
    "1 2 3 4            Status, Config, Analytics, Hits",
    "r                  refresh now",
    "R                  resume the gateway after a halt (y confirms)",
    "q                  quit",
    "?                  this help (any key closes it)",
    "",
    "Config     the gateway's own config: Up/Down or j/k select, Enter",
    "           edits (booleans toggle), Esc cancels an edit, s saves and",
    "           applies through the gateway, r fetches it again",
    "Analytics  t shows per-model bars by requests or by tokens",
    "Hits       Up/Down or j/k select, Enter shows details,",
    "           Esc or Enter closes them, g jumps to the newest",
    "",
    "Rows marked ! were billed outside the subscription.",
]


def draw_help(p):
    draw_box(p, HELP_LINES, "keys")


def draw_confirm(p, view):
    """The question `R` asks before resuming."""
    if view.halted:
        first = f"Resume the gateway? Halted: {guardtext.title(view.halt)}."
    else:
        first = "Resume the gateway? (it is not halted now)"
    draw_box(p, [first, "New requests are forwarded upstream again.", "",
                 "y resumes; any other key cancels"], "resume", {0: "bold", 3: "bold"})


def iso_time(ms):
    """Epoch milliseconds as a local ISO 8601 time with its UTC offset."""
    return datetime.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


def _is_time(name, value):
    """A record field that holds epoch milliseconds (timestamp, since, ...At, ...Until)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and 1e12 <= value < 1e14
            and (name in ("timestamp", "since") or name.endswith(("At", "Until"))))


def detail_lines(record):
    """One line per field; times in ISO 8601 with the raw value after them."""
    return [f"{name:<18} {iso_time(value)} ({value})" if _is_time(name, value) else f"{name:<18} {value_text(value)}"
            for name, value in record.items()]


def draw_details(p, record, scroll):
    lines = detail_lines(record)
    bad = record.get("bucket") in NON_SUBSCRIPTION
    h, _ = p.size
    room = max(1, h - 4)
    scroll = min(scroll, max(0, len(lines) - room))
    shown = lines[scroll:scroll + room]
    styles = {i: "bad" for i, line in enumerate(shown) if bad and line.split(" ", 1)[0] in ("claim", "bucket")}
    draw_box(p, shown, f"record {record.get('id')}  (Esc/Enter closes, Up/Down scroll)", styles)
    return scroll
