"""Files dario owns: atomic replacement, and a spare descriptor for writes that must land.

`write_atomic` is the one way dario replaces a file. Bytes go to a temp file in the same
folder, are fsynced, get their mode, and then `os.replace` swaps them in, so a reader
(or a crash) never sees half a file. The temp file comes from `mkstemp`, which creates
it with O_CREAT|O_EXCL|O_NOFOLLOW under a random name: a symlink planted in advance
makes it pick another name, never write through the link. `os.replace` renames over the
target itself (a symlink there is replaced, not followed). The folder is created with
`folder_mode` when missing. Raises OSError; leaves no temp file behind.

`Reserve` holds one spare descriptor so that the writes a halt depends on (the state
file, the spend ledger) still get a descriptor when the process has run out
(EMFILE/ENFILE): `reserve.retry(fn)` runs `fn`, and on that error frees the spare,
runs `fn` once more, then takes the spare back. Thread-safe.
"""

import errno
import os
import tempfile
import threading

_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def write_atomic(path, data, mode=0o600, folder_mode=0o700):
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=folder_mode, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dario-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):      # on the descriptor: no path to race for
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _sync_folder(folder)


def _sync_folder(folder):
    """Make the rename itself durable (a power cut must not bring back the old file).
    Best effort: some systems cannot open or fsync a folder."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                        # the data is written and renamed; only durability is weaker
    finally:
        os.close(fd)


class Reserve:
    """One spare descriptor, given up only so a must-land write can run at the limit.

    The spare is `os.devnull` opened read-only. Between freeing it and the retry another
    thread could take the number first; the server keeps its connection cap below the
    limit, so the reserve is the last line, not the only one.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._fd = None
        self._take()

    @property
    def held(self):
        return self._fd is not None

    def _take(self):
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._fd = None     # at the limit already: taken again after the next retry

    def retry(self, fn):
        """fn(), run once more with the spare freed if it fails for want of descriptors."""
        try:
            result = fn()
        except OSError as err:
            if err.errno not in _EXHAUSTED:
                raise
        else:
            if self._fd is None:
                with self._lock:
                    self._take()
            return result
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                return fn()
            finally:
                self._take()

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# Descriptors are a resource of the whole process, not of one server: however many
# gateways, state files and ledgers a process builds (tests build many), one spare is
# what it needs. So the spare lives here, taken when the first state file or ledger is
# built (at server start, before any client), and shared by all of them.
_process_reserve = None
_process_lock = threading.Lock()


def process_reserve():
    """The process-wide Reserve, taken on first use."""
    global _process_reserve
    with _process_lock:
        if _process_reserve is None:
            _process_reserve = Reserve()
        return _process_reserve
