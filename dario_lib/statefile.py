"""`$DARIO_HOME/guard-state.json`: the halt, saved so it survives restarts and is shared.

Written atomically (temp file in the same folder, fsync, `os.replace`) with mode 0600
and removed on resume. Gateways sharing a `DARIO_HOME` notice each other's changes by
the file's signature (mtime, size, inode), which is cheap enough to check before every
forwarded request.

The file is read without following a symlink (one there reads as corrupt, so the
guard fails closed), and reads and writes go through a descriptor `Reserve`
(files.process_reserve() by default): a halt is saved even when the process is out of
descriptors.

No locking here: the guard calls these under its own lock.
"""

import errno
import json
import os

from . import files

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_NONBLOCK", 0)

ABSENT, OK, CORRUPT = "absent", "ok", "corrupt"
MAX_TIME_MS = 253_402_300_799_999          # 9999-12-31T23:59:59.999Z: the last time iso() can show
MAX_COOLDOWN_MS = 366 * 86_400_000         # longer than any cooldown or budget window dario makes


class StateFile:
    def __init__(self, path, reserve=None):
        self.path = path
        self._reserve = reserve if reserve is not None else files.process_reserve()

    def signature(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self):
        """(ABSENT, None), (OK, [halt dicts]) or (CORRUPT, reason)."""
        try:
            fd = self._reserve.retry(lambda: os.open(self.path, _READ_FLAGS))
        except FileNotFoundError:
            return ABSENT, None
        except OSError as err:
            if err.errno == errno.ELOOP:
                return CORRUPT, "it is a symlink; dario only reads a regular file there"
            return CORRUPT, str(err)
        try:
            with open(fd, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as err:
            return CORRUPT, str(err)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:     # RecursionError: nesting deeper than the parser
            return CORRUPT, f"not valid JSON ({err})"
        if isinstance(data, dict) and "since" in data:
            data = {"halts": [data]}             # one halt, as written before account scopes
        halts = data.get("halts") if isinstance(data, dict) else None
        if not isinstance(halts, list):
            return CORRUPT, "not a saved halt"
        for halt in halts:
            if not isinstance(halt, dict) or isinstance(halt.get("since"), bool) \
                    or not isinstance(halt.get("since"), int):
                return CORRUPT, "not a saved halt"
            if not 0 <= halt["since"] <= MAX_TIME_MS:
                return CORRUPT, "since is out of range"
            until = halt.get("cooldownUntil")
            if until is not None and (isinstance(until, bool) or not isinstance(until, int)):
                return CORRUPT, "cooldownUntil is not a time"
            if until is not None and not 0 <= until - halt["since"] <= MAX_COOLDOWN_MS:
                # Also keeps threading.Timer under TIMEOUT_MAX (~292 years).
                return CORRUPT, "cooldownUntil is out of range"
            if halt.get("account") is not None and not isinstance(halt.get("account"), str):
                return CORRUPT, "account is not a label"
        return OK, halts

    def write(self, halts):
        """Save the halts atomically; returns the new signature. Raises OSError on failure."""
        data = json.dumps({"halts": halts}).encode()
        self._reserve.retry(lambda: files.write_atomic(self.path, data))
        return self.signature()

    def remove(self):
        """Delete the saved halt; returns the new signature (None). Raises OSError."""
        try:
            os.unlink(self.path)
        except (FileNotFoundError, NotADirectoryError):     # nothing there, or nowhere to be
            pass
        return self.signature()
