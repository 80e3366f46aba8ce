"""Where the gateway spends its time under load: py-spy samples, summed per function.

`record(pid, seconds, path)` starts `py-spy record --format raw` (collapsed stacks,
one "frame;frame;... count" line per distinct stack) against a running process and
returns the child; `top_functions(path)` reads that file back and ranks functions by
self samples (the frame on top of the stack) and by total samples (anywhere on it),
and sums self samples per package (dario_lib, requests, urllib3, http.client, ...).
py-spy is optional (`pip install py-spy`); `find()` returns None without it.
"""

import collections
import re
import shutil
import subprocess

_LINE = re.compile(r"^(.*) (\d+)$")


def find():
    return shutil.which("py-spy")


def record(binary, pid, seconds, path, rate=250, gil=True):
    """Start sampling `pid` for `seconds` into `path`; the caller waits on the Popen.

    With `gil`, only the thread holding the GIL is sampled: for a CPython server that
    is bound by its one interpreter lock, that shows what uses the scarce resource.
    """
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
         "--format", "raw", "--output", path, "--nonblocking"] + (["--gil"] if gil else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _parse(path):
    """Yield (frames, count) per line of a raw py-spy file; frames are 'func (file:line)'."""
    with open(path) as f:
        for line in f:
            found = _LINE.match(line.strip())
            if found:
                yield found.group(1).split(";")[1:], int(found.group(2))   # drop the thread name


def _file(frame):
    return frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]


def _short(frame):
    """'handle (dario_lib/relay.py:123)' -> 'handle (relay.py)': a function, not a line."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({_file(frame).rsplit('/', 1)[-1]})" if where else frame


def package(file):
    """Who owns a source file: 'dario_lib', 'requests', 'urllib3', 'http.client', 'email', ..."""
    module = file[:-3] if file.endswith(".py") else file
    parts = module.strip("<>").split("/")
    if parts[0] == "http" and len(parts) > 1:
        return "http." + parts[1]
    return parts[0]


_PLUMBING_FILES = ("threading.py", "socketserver.py")
_PLUMBING_FUNCS = ("BaseHTTPRequestHandler.handle ", "GatewayServer.process_request_thread ")


def _plumbing(frame):
    """Thread and server start-up frames, on every request's stack: no information."""
    return _file(frame).endswith(_PLUMBING_FILES) or frame.startswith(_PLUMBING_FUNCS)


def top_functions(path, limit=15):
    """Rank what the samples in a raw py-spy file were doing.

    Returns {"samples", "self": [(function, %)], "total": [(function, %)],
    "packages": [(package, % of self samples)]}; total leaves out the thread and
    server plumbing that is on every request's stack.
    """
    selfs, totals, packages, samples = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for frames, count in _parse(path):
        if not frames:
            continue
        samples += count
        selfs[_short(frames[-1])] += count
        packages[package(_file(frames[-1]))] += count
        for name in {_short(frame) for frame in frames if not _plumbing(frame)}:
            totals[name] += count
    if not samples:
        return {"samples": 0, "self": [], "total": [], "packages": []}

    def pct(counter):
        return [(name, round(100 * n / samples, 1)) for name, n in counter.most_common(limit)]

    return {"samples": samples, "self": pct(selfs), "total": pct(totals), "packages": pct(packages)}
