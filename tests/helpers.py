"""Test kit: fake time, manual timers, a recording notifier, and real servers on port 0."""

import contextlib
import dataclasses
import json
import socket
import threading

from dario_lib import config
from dario_lib.server import GatewayServer


class FakeClock:
    """A clock (seconds) that moves only when told to."""

    def __init__(self, start=1_700_000_000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ManualTimer:
    """Shaped like threading.Timer; runs only when the test calls fire()."""

    def __init__(self, interval, function, args=(), kwargs=None):
        self.interval = interval
        self.function = function
        self.args = args
        self.kwargs = kwargs or {}
        self.started = False
        self.cancelled = False
        self.daemon = False
        self.name = None

    def start(self):
        self.started = True

    def cancel(self):
        self.cancelled = True

    def fire(self):
        """Run the callback, even if cancelled: a real Timer can fire after cancel()."""
        self.function(*self.args, **self.kwargs)


class TimerFactory:
    def __init__(self):
        self.timers = []

    def __call__(self, interval, function, args=(), kwargs=None):
        timer = ManualTimer(interval, function, args, kwargs)
        self.timers.append(timer)
        return timer

    @property
    def last(self):
        return self.timers[-1]


class RecordingNotifier:
    def __init__(self):
        self.calls = []

    def notify(self, title, message):
        self.calls.append((title, message))

    def bell(self):
        pass


def make_settings(home, upstream=None, flags=None, env=None, **replace):
    """Settings as the CLI would build them, with DARIO_HOME=home."""
    environ = {"DARIO_HOME": str(home)}
    environ.update(env or {})
    all_flags = {"port": "0"}
    if upstream is not None:
        all_flags["upstream.url"] = upstream
    all_flags.update(flags or {})
    settings = config.resolve(all_flags, environ)
    return dataclasses.replace(settings, **replace) if replace else settings


@contextlib.contextmanager
def running_gateway(settings, **kwargs):
    kwargs.setdefault("notifier", RecordingNotifier())
    server = GatewayServer(settings, **kwargs).start(poll_interval=0.02)
    try:
        yield server
    finally:
        server.drain(timeout=2)


def raw_request(port, data, timeout=5.0, read_all=True):
    """Send raw bytes to 127.0.0.1:port; return everything read until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                chunks.append(piece)
                if not read_all:
                    break
        except socket.timeout:
            pass
        return b"".join(chunks)


def parse_response(raw):
    """(status, headers dict lowercased, body bytes) of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def sse_events(text):
    """[(event name or None, parsed data)] from an SSE text body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            payload = "\n".join(data)
            try:
                events.append((name, json.loads(payload)))
            except ValueError:
                events.append((name, payload))
    return events


def wait_until(predicate, timeout=5.0, interval=0.01):
    event = threading.Event()
    waited = 0.0
    while waited < timeout:
        if predicate():
            return True
        event.wait(interval)
        waited += interval
    return predicate()
