"""Is DARIO_HOME safe to trust? The check ssh's StrictModes makes, for dario's home.

Whoever can write `DARIO_HOME` or the files in it can un-halt the guard (delete
`guard-state.json`), erase spend (`spend-ledger.jsonl`) or make dario run a program of
their choosing on the next halt (`notifyCommand` in `config.json`). So `proxy` refuses
to start when the folder or one of those files

- is writable by group or others,
- is owned by someone other than the user dario runs as (root excepted), or
- (a file) is a symlink: dario writes its files in place, never through a link.

`problems()` returns one line per problem, naming the path and the command that fixes
it. Pure reads (lstat/stat), no state: safe from any thread. On systems without POSIX
owners and modes (Windows) there is nothing to check.
"""

import os
import shlex
import stat

try:
    import pwd
except ImportError:                 # Windows: no POSIX owners, nothing is checked
    pwd = None

FILES = ("config.json", "guard-state.json", "spend-ledger.jsonl", "store-marker.json")


def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:                # a uid with no name: chown takes the number too
        return str(uid)


def _writers(mode):
    return {0o022: "group and others", 0o020: "group", 0o002: "others"}[mode & 0o022]


def _check(path, st, euid, is_file):
    quoted = shlex.quote(path)
    if is_file and stat.S_ISLNK(st.st_mode):
        try:
            os.stat(path)
        except OSError:
            return [f"{path} is a symlink (to nothing): remove it with `rm {quoted}`"]
        return [f"{path} is a symlink: replace it with a regular copy of its target with "
                f"`cp -L {quoted} {shlex.quote(path + '.new')} && mv {shlex.quote(path + '.new')} {quoted}`"]
    found = []
    if st.st_uid not in (euid, 0):
        found.append(f"{path} is owned by {_user(st.st_uid)}, not by {_user(euid)} who runs dario: "
                     f"fix with `chown {shlex.quote(_user(euid))} {quoted}`")
    if st.st_mode & 0o022:
        found.append(f"{path} is writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}): "
                     f"fix with `chmod go-w {quoted}`")
    return found


def problems(home, euid=None):
    """Lines describing what makes `home` unsafe, with the fix for each; [] when safe."""
    if pwd is None or not hasattr(os, "geteuid"):
        return []
    euid = os.geteuid() if euid is None else euid
    try:
        st = os.stat(home)          # the home itself may be a symlink to a folder of the user's
    except OSError:
        return []                   # not there yet: dario creates it 0700
    found = _check(home, st, euid, is_file=False)
    for name in FILES:
        path = os.path.join(home, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        found += _check(path, st, euid, is_file=True)
    return found
