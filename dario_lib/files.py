"""Atomic file writes: the one way dario replaces a file it owns.

Bytes go to a temp file in the same folder, are fsynced, get their mode, and then
`os.replace` swaps them in, so a reader (or a crash) never sees half a file. The folder
is created with `folder_mode` when missing. Raises OSError; leaves no temp file behind.
"""

import os
import tempfile


def write_atomic(path, data, mode=0o600, folder_mode=0o700):
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=folder_mode, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dario-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
