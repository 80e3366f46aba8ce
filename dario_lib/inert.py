"""Untrusted text made inert, one helper per sink.

A model name, a claim, an account label, an error message, a session or request id: text
that came from a client or the upstream must not be able to act on the place it is
written to. Each sink has its own rule and one helper here, used everywhere that sink is
written:

- `terminal(text, limit=None)`: terminal and log lines (stderr, `dario status`,
  `dario resume`, the TUI). Control characters are shown, never sent: C0 controls
  (CR, LF and TAB included), DEL, C1 controls (U+0080-U+009F), the bidirectional
  overrides and isolates, and the line and paragraph separators become visible escapes
  (ESC is the four characters `\\x1b`, U+202E is `\\u202e`). With its introducer shown
  as text, an escape sequence (CSI, OSC, ...) is only printable characters: the
  terminal displays the whole of it and acts on none of it. Lone surrogates become
  U+FFFD, so the result always encodes to UTF-8.
- `notification(text, limit=200, markup=False)`: the text of a desktop toast. One tidy
  line (whitespace runs become a space, other controls `?`), without quotes, backticks,
  `$` or backslashes (notify-send expands backslash escapes), capped; with `markup`,
  `&`, `<` and `>` escaped, since notify-send reads its body as markup (`<a href>`).
- `prom_label(value)`: a label value in the Prometheus text format: backslash, double
  quote and line feed escaped as that format says, lone surrogates replaced.
- `json_safe(value)`: a JSON-able value whose strings hold no lone surrogates, for
  receivers with a strict JSON parser (`json.dumps` writes a lone surrogate as the
  escape `\\ud800`, which strict parsers reject). JSON needs nothing else: it escapes
  itself.

Every helper takes any value (non-strings through `str()`) and never raises on a `str`,
lone surrogates included; `terminal` leaves its own output unchanged, so text filtered
twice reads the same. Pure functions: safe from any thread.
"""

import re

REPLACEMENT = "\ufffd"

# C0, DEL, C1; the Arabic letter mark, LRM/RLM, the line and paragraph separators, the
# bidi embeddings/overrides (LRE RLE PDF LRO RLO) and isolates (LRI RLI FSI PDI).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_NOTIFY_STRIP = str.maketrans({ch: None for ch in "\"'`$\\"})
_MARKUP = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_PROM = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
TRUNCATED = "..."


def _text(value):
    return value if isinstance(value, str) else str(value)


def unicode_clean(text):
    """`text` with every lone surrogate replaced by U+FFFD: it encodes to UTF-8."""
    text = _text(text)
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(REPLACEMENT, text)


def _visible(match):
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def cap(text, limit):
    """`text` cut to at most `limit` characters, ending in "..." when it was cut."""
    if limit is None or len(text) <= limit:
        return text
    if limit <= len(TRUNCATED):
        return text[:limit]
    return text[:limit - len(TRUNCATED)] + TRUNCATED


def terminal(text, limit=None):
    """One line for a terminal or a log: controls shown as escapes, UTF-8 safe, capped."""
    text = unicode_clean(text)
    if _CONTROL.search(text) is not None:
        text = _CONTROL.sub(_visible, text)
    return cap(text, limit)


def notification(text, limit=200, markup=False):
    """The text of a desktop notification: one short line no program will interpret."""
    text = " ".join(unicode_clean(text).split())
    text = _CONTROL.sub("?", text).translate(_NOTIFY_STRIP)
    text = cap(text, limit)
    # Escaped after the cap, so the cap never cuts an entity in half.
    return text.translate(_MARKUP) if markup else text


def prom_label(value):
    """A label value for the Prometheus text format (the part between the quotes)."""
    return unicode_clean(value).translate(_PROM)


def json_safe(value):
    """`value` (dicts, lists, tuples, strings, numbers) with no lone surrogate in any string."""
    if isinstance(value, str):
        return unicode_clean(value)
    if isinstance(value, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
