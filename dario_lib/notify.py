"""Desktop notifications for guard events: a terminal BEL, then the platform's toast.

Best effort and fire-and-forget: the program is started from a short-lived named
daemon thread (so a slow fork never blocks a request thread), detached, with its
output discarded, and any failure (a missing program above all) is silent.

Injection-proof by construction: text is passed as separate arguments (osascript reads
it through `on run argv`) or through environment variables (PowerShell), never spliced
into a script, and no shell is ever involved. The text is also stripped of quotes,
backticks, `$`, backslashes and newlines and capped, so a toast stays one tidy line.
"""

import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

MAX_TEXT = 200
_STRIP = str.maketrans({ch: None for ch in "\"'`$\\"})


def clean(text):
    text = " ".join(str(text).replace("\r", " ").replace("\n", " ").split())
    return text.translate(_STRIP)[:MAX_TEXT]


def command_for(platform, title, message):
    """(argv, extra env) that shows a notification on `platform`, or (None, None)."""
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
        return ["notify-send", "--", title, message], None
    return None, None


class Notifier:
    """Rings the bell and shows a toast. `spawn` is injectable for tests."""

    def __init__(self, os_notify=True, platform=sys.platform, spawn=subprocess.Popen, stream=None):
        self.os_notify = os_notify
        self.platform = platform
        self._spawn = spawn
        self._stream = stream

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
        env = None
        if extra_env:
            env = dict(os.environ)
            env.update(extra_env)
        try:
            proc = self._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, close_fds=True,
                               start_new_session=sys.platform != "win32")
            proc.wait(timeout=30)       # reap it, so no zombie is left behind
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            log.debug("desktop notification via %s failed: %s", argv[0], err)
