"""Desktop notifications for guard events: a terminal BEL, then the platform's toast.

Best effort and fire-and-forget: the program is started from a short-lived named
daemon thread (so a slow fork never blocks a request thread), detached, with its
output discarded, and any failure (a missing program above all) is silent.

Injection-proof by construction: text is passed as separate arguments (osascript reads
it through `on run argv`) or through environment variables (PowerShell), never spliced
into a script, and no shell is ever involved. The text goes through
`inert.notification`: one line without control characters, quotes, backticks, `$` or
backslashes, capped; for notify-send, which reads its body as markup, `&`, `<` and `>`
are escaped too, so a model name cannot become a link.

Secrets stay home: every program dario starts (the toast programs here, `notifyCommand`
in alerts.py) gets `child_env()`, the environment without dario's secrets.
"""

import logging
import os
import subprocess
import sys
import threading
import urllib.parse

from . import inert

log = logging.getLogger(__name__)

MAX_TEXT = 200
# Variables that hold dario's secrets: the gateway's key, the upstream key, the team
# store's password and the upstream proxy URL (which may carry credentials).
SECRET_VARIABLES = ("DARIO_API_KEY", "DARIO_UPSTREAM_API_KEY", "DARIO_STORE_PASSWORD", "DARIO_UPSTREAM_PROXY")
# A secret this long is also looked for inside other values (a URL with ?key=...);
# shorter ones only as a whole value, so a secret like "1" cannot empty the environment.
MIN_CONTAINED_SECRET = 8


def child_env(environ=None, secrets=()):
    """The environment for a program dario starts: its own, minus dario's secrets.

    Drops the SECRET_VARIABLES and every variable whose value is one of those secrets
    (or one of `secrets`, values dario got elsewhere, e.g. from its config file), or
    contains one at least MIN_CONTAINED_SECRET characters long.
    """
    environ = os.environ if environ is None else environ
    values = {environ.get(name) for name in SECRET_VARIABLES} | set(secrets)
    values = {value for value in values if value}
    long_values = [value for value in values if len(value) >= MIN_CONTAINED_SECRET]
    return {name: value for name, value in environ.items()
            if name not in SECRET_VARIABLES and value not in values
            and not any(secret in value for secret in long_values)}


def secrets_of(settings):
    """The secret values `settings` holds, for `child_env(secrets=...)`: the keys, the
    store's password, and proxy and store URLs that carry credentials (with the password
    alone too), wherever they were read from (environment, flag or config file)."""
    store = getattr(settings, "store", None)
    values = [getattr(settings, "api_key", None), getattr(settings, "upstream_api_key", None),
              getattr(store, "password", None)]
    for url in (getattr(settings, "upstream_proxy", None), getattr(store, "url", None)):
        try:
            parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        except ValueError:
            parts = None
        if parts is not None and (parts.username or parts.password):
            values += [url, parts.password]
    return tuple(value for value in values if isinstance(value, str) and value)


def clean(text):
    """One line of notification text for any platform (see `inert.notification`)."""
    return inert.notification(text, MAX_TEXT)


def command_for(platform, title, message):
    """(argv, extra env) that shows a notification on `platform`, or (None, None)."""
    raw_message = message
    title, message = clean(title), clean(message)
    if platform == "darwin":
        script = ("on run argv", "display notification (item 2 of argv) with title (item 1 of argv)",
                  "end run")
        argv = ["osascript"]
        for line in script:
            argv += ["-e", line]
        return argv + [title, message], None
    if platform.startswith("win"):
        script = ("Import-Module BurntToast -ErrorAction Stop; "
                  "New-BurntToastNotification -Text $env:DARIO_NOTIFY_TITLE, $env:DARIO_NOTIFY_MESSAGE")
        argv = ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", script]
        return argv, {"DARIO_NOTIFY_TITLE": title, "DARIO_NOTIFY_MESSAGE": message}
    if platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        # The body is markup to notify-send (<b>, <a href>): escaped. The summary is plain
        # text by the notification spec, so escaping it would show "&amp;".
        return ["notify-send", "--", title, inert.notification(raw_message, MAX_TEXT, markup=True)], None
    return None, None


class Notifier:
    """Rings the bell and shows a toast. `spawn` is injectable for tests; `secrets` are
    secret values beyond the environment's (see `child_env`)."""

    def __init__(self, os_notify=True, platform=sys.platform, spawn=subprocess.Popen, stream=None, secrets=()):
        self.os_notify = os_notify
        self.platform = platform
        self._spawn = spawn
        self._stream = stream
        self._secrets = tuple(secrets)

    def bell(self):
        stream = self._stream or sys.stderr
        try:
            stream.write("\a")
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass    # no terminal to ring (closed or detached stderr): nothing else to do

    def notify(self, title, message):
        """Never blocks, never raises."""
        self.bell()
        if not self.os_notify:
            return
        argv, extra_env = command_for(self.platform, title, message)
        if argv is None:
            return
        thread = threading.Thread(target=self._run, args=(argv, extra_env),
                                  name="dario-notify", daemon=True)
        thread.start()

    def _run(self, argv, extra_env):
        env = child_env(secrets=self._secrets)
        env.update(extra_env or {})
        try:
            proc = self._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, close_fds=True,
                               start_new_session=sys.platform != "win32")
            proc.wait(timeout=30)       # reap it, so no zombie is left behind
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            log.debug("desktop notification via %s failed: %s", argv[0], err)
