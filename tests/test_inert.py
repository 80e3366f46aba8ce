"""inert: one helper per sink makes untrusted text harmless (socket-free; the sinks
themselves are driven for real in test_sinks.py)."""

import io
import json
import logging
import re

from hypothesis import given, strategies as st

from dario_lib import inert, notify
from dario_lib.cli import InertFormatter

# Any str, lone surrogates included (Hypothesis leaves them out unless asked).
ANY_TEXT = st.text(st.characters(blacklist_categories=()))
HOSTILE = ("claude-\x1b[31mred\x1b[0m \x1b]0;title\x07 \x9b2J \x1bP+q\x1b\\ a\rb\nc\td \x00\x7f"
           "\u202eevil\u2066\u2069 \u2028\ud800 \udfff end")
# What must never reach a terminal raw: C0, DEL, C1, bidi controls, line separators, surrogates.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


@given(ANY_TEXT)
def test_terminal_never_raises_and_leaves_nothing_raw(text):
    out = inert.terminal(text)
    assert RAW.search(out) is None
    out.encode("utf-8")
    assert inert.terminal(out) == out                   # filtering twice reads the same


def test_terminal_shows_what_it_replaced():
    out = inert.terminal(HOSTILE)
    assert out.startswith("claude-\\x1b[31mred\\x1b[0m \\x1b]0;title\\x07 \\x9b2J \\x1bP+q\\x1b\\ a\\rb\\nc\\td \\x00\\x7f")
    assert "\\u202eevil\\u2066\\u2069 \\u2028\ufffd \ufffd end" in out
    assert inert.terminal("plain ü 日本 😀 C:\\path") == "plain ü 日本 😀 C:\\path"
    assert inert.terminal(None) == "None" and inert.terminal(42) == "42"


def test_terminal_cap():
    assert inert.terminal("x" * 600, 500) == "x" * 497 + "..."
    assert len(inert.terminal("\x1b" * 600, 500)) == 500
    assert inert.terminal("short", 500) == "short"


@given(ANY_TEXT, st.booleans())
def test_notification_never_raises_and_is_one_plain_line(text, markup):
    out = inert.notification(text, 200, markup=markup)
    assert RAW.search(out) is None
    assert not set(out) & set("\"'`$\\")
    out.encode("utf-8")
    if markup:
        assert "<" not in out and ">" not in out
        assert re.sub(r"&(amp|lt|gt);", "", out).count("&") == 0
    else:
        assert len(out) <= 200


def test_notification_neutralises_markup_only_for_notify_send():
    link = '<a href="https://evil.example/">click</a> & <b>bold</b>\x1b[5m'
    assert inert.notification(link, markup=True) == "&lt;a href=https://evil.example/&gt;click&lt;/a&gt; &amp; " \
                                                    "&lt;b&gt;bold&lt;/b&gt;?[5m"
    argv, _ = notify.command_for("linux", "dario halted", link)
    assert argv[3] == inert.notification(link, markup=True)
    mac, _ = notify.command_for("darwin", "dario halted", link)
    assert mac[-1] == "<a href=https://evil.example/>click</a> & <b>bold</b>?[5m"    # osascript shows text


@given(ANY_TEXT)
def test_prom_label_round_trips_through_the_format_rules(text):
    out = inert.prom_label(text)
    out.encode("utf-8")
    assert "\n" not in out
    assert re.search(r'(?<!\\)(\\\\)*"', out) is None       # every quote is escaped
    unescaped = re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), out)
    assert unescaped == inert.unicode_clean(text)


def test_json_safe_gives_json_a_strict_parser_accepts():
    event = {"request": {"model": "claude-\ud800", "tags": ["\udfff", 1, None]}, "k\ud801": True}
    text = json.dumps(inert.json_safe(event))
    assert "\\ud8" not in text and "\\udf" not in text
    assert json.loads(text) == {"request": {"model": "claude-\ufffd", "tags": ["\ufffd", 1, None]}, "k\ufffd": True}


def test_log_formatter_makes_every_line_inert_and_keeps_the_prefix():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(InertFormatter())
    logger = logging.getLogger("dario.test_inert")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("HALTED: %s (account %s)", "claude-\x1b[31m\ud800", "team\nFAKE LINE")
        try:
            raise ValueError("bad model \x1b]0;pwned\x07")
        except ValueError:
            logger.exception("failed on %s", "\x9b")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert RAW.search(text.replace("\n", "")) is None
    lines = text.splitlines()
    assert lines[0] == "[dario] HALTED: claude-\\x1b[31m\ufffd (account team\\nFAKE LINE)"
    assert lines[1] == "[dario] failed on \\x9b"
    assert lines[2] == "Traceback (most recent call last):"         # a traceback keeps its lines
    assert lines[-1] == "ValueError: bad model \\x1b]0;pwned\\x07"


def test_child_env_drops_secrets_by_name_and_by_value():
    environ = {"PATH": "/usr/bin", "HOME": "/root", "DARIO_API_KEY": "gw-secret-123456",
               "DARIO_UPSTREAM_API_KEY": "sk-ant-up-999999", "DARIO_STORE_PASSWORD": "pw",
               "DARIO_UPSTREAM_PROXY": "http://u:p@proxy:3128", "HTTPS_PROXY": "http://u:p@proxy:3128",
               "COPY": "gw-secret-123456", "URL": "https://hook/?k=sk-ant-up-999999", "SHORT": "pw",
               "HAS_PW": "pwd-is-fine", "FROM_CONFIG": "cfg-secret-abcdef", "DARIO_HOME": "/h"}
    env = notify.child_env(environ, secrets=("cfg-secret-abcdef",))
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "HAS_PW": "pwd-is-fine", "DARIO_HOME": "/h"}
    assert notify.child_env({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_secrets_of_settings_covers_config_file_secrets():
    from types import SimpleNamespace
    settings = SimpleNamespace(api_key="gw", upstream_api_key=None, upstream_proxy="http://me:pp-secret@proxy:3128",
                               store=SimpleNamespace(password=None, url="redis://:st-secret@redis:6379/0"))
    assert set(notify.secrets_of(settings)) == {"gw", "http://me:pp-secret@proxy:3128", "pp-secret",
                                                 "redis://:st-secret@redis:6379/0", "st-secret"}
    direct = SimpleNamespace(api_key=None, upstream_api_key=None, upstream_proxy="direct",
                             store=SimpleNamespace(password=None, url="file"))
    assert notify.secrets_of(direct) == ()
    env = notify.child_env({"PATH": "/bin", "HTTPS_PROXY": "http://me:pp-secret@proxy:3128"},
                           secrets=notify.secrets_of(settings))
    assert env == {"PATH": "/bin"}
