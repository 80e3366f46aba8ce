"""Test kit: fake time, manual timers, a recording notifier, and real servers on port 0."""

import contextlib
import dataclasses
import itertools
import json
import re
import socket
import threading
import time

import requests

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


HAMMER_MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def hammer_until_halt(gateway, sim, clients=32, after_s=0.4, mixed=False):
    """`clients` threads hammer POST /v1/messages while one overage stream lands.

    Each request carries a unique x-req-id; a client notes the time just before sending,
    the trigger the time its response headers arrive. Returns the ids sent after that
    instant ("sent_after"), those of them that reached the simulator ("late": must be
    none), those answered 503 ("blocked_after"), and the total sent. With `mixed`, the
    clients alternate plain and streamed requests.
    """
    ids = itertools.count(1)
    sent, results, lock, stop = {}, {}, threading.Lock(), threading.Event()
    trigger_headers_at = []
    base = f"http://127.0.0.1:{gateway.port}/v1/messages"

    def client(n):
        session = requests.Session()
        stream = mixed and bool(n % 2)
        while not stop.is_set():
            rid = str(next(ids))
            with lock:
                sent[rid] = time.monotonic_ns()
            try:
                resp = session.post(base, json=dict(HAMMER_MESSAGE, stream=stream),
                                    headers={"x-api-key": "k", "x-req-id": rid}, timeout=10)
                assert resp.content is not None     # a stream is read to its end
                status = resp.status_code
            except requests.RequestException:
                status = None
            with lock:
                results[rid] = status
            stream = mixed and not stream
        session.close()

    def trigger():
        payload = json.dumps(dict(HAMMER_MESSAGE, stream=True)).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: k\r\n"
                          f"x-req-id: trigger\r\nx-sim-claim: overage\r\nx-sim-delay-ms: 50\r\n"
                          f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            trigger_headers_at.append(time.monotonic_ns())
            while sock.recv(65536):
                pass

    threads = [threading.Thread(target=client, args=(n,), name=f"hammer-{n}") for n in range(clients)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(results) > clients, timeout=10)
    trig = threading.Thread(target=trigger, name="hammer-trigger")
    trig.start()
    trig.join(10)
    time.sleep(after_s)                         # keep hammering while halted
    stop.set()
    for thread in threads:
        thread.join(15)
    reached = {req.header("x-req-id") for req in sim.requests}
    after = trigger_headers_at[0]
    sent_after = [rid for rid, t in sent.items() if t > after]
    return {"late": [rid for rid in sent_after if rid in reached],
            "blocked_after": [rid for rid in sent_after if results.get(rid) == 503],
            "sent_after": sent_after, "total": len(sent)}


class RawUpstream:
    """A raw HTTP/1.1 upstream on a free loopback port, for faults the simulator cannot make.

    Each connection is served on its own daemon thread. Every request (its head and its
    Content-Length body) is recorded in `requests` and handed to
    `answer(n, head, body, conn)`, n counting requests from 1 across connections;
    `answer` writes whatever it likes and returns True to keep the connection for the
    next request, False to close it. `closed` is set once a connection ends.
    """

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name="raw-upstream", daemon=True)

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="raw-upstream-conn", daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            conn.settimeout(30)
            while True:
                while b"\r\n\r\n" not in buf:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                head, _, buf = buf.partition(b"\r\n\r\n")
                found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                length = int(found.group(1)) if found else 0
                while len(buf) < length:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append((head, body))
                    n = len(self.requests)
                if not self.answer(n, head, body, conn):
                    return
        except OSError:
            return
        finally:
            conn.close()
            self.closed.set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._sock.close()


def json_answer(obj, headers=(), status="200 OK", keep_alive=True):
    """Raw bytes of a JSON answer with a Content-Length."""
    body = json.dumps(obj).encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def guard_events(sub, wait_s=0.2):
    """The guard events (halt, warn, resume) an /analytics/stream subscription holds now,
    as (name, data); records are skipped."""
    out = []
    while True:
        item = sub.get(wait_s)
        if item is None or item[0] == "timeout":
            return out
        if item[0] != "record":
            out.append(item)
