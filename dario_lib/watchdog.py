"""One thread that enforces deadlines and notices clients that hung up.

Per-read socket timeouts cannot stop a client that sends one byte every few seconds,
and a relay thread blocked on a silent upstream cannot see its client leave. The
watchdog covers both, ticking every `interval` seconds:

- `arm(sock, seconds)` gives a socket a total deadline (request head, request body);
  past it the socket is shut down, which wakes the blocked reader with EOF.
- `watch(client_sock, on_gone)` polls a streaming client's socket; when the peer has
  closed it, `on_gone()` runs (the relay uses it to close the upstream response).

Thread-safe: registrations are under a lock; callbacks run on the watchdog thread and
must be quick and never raise.
"""

import logging
import select
import socket
import threading
import time

log = logging.getLogger(__name__)


def peer_closed(sock):
    """True when the peer has closed or reset the connection (data waiting is not closed)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


def _readable(socks):
    """The sockets with something to read (or a hang-up) right now."""
    if hasattr(select, "poll"):             # select() cannot take fds above FD_SETSIZE
        poller = select.poll()
        by_fd = {}
        for sock in socks:
            fd = sock.fileno()
            if fd >= 0:
                by_fd[fd] = sock
                poller.register(fd, select.POLLIN)
        return {by_fd[fd] for fd, _ in poller.poll(0) if fd in by_fd}
    try:
        readable, _, _ = select.select(socks, [], [], 0)
    except (OSError, ValueError):
        return set(socks)                   # a closed socket: let peer_closed decide
    return set(readable)


class Watchdog:
    def __init__(self, interval=0.25, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines = {}          # token -> (sock, deadline)
        self._watched = {}            # token -> (sock, on_gone)
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dario-watchdog", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _token(self):
        self._next += 1
        return self._next

    def arm(self, sock, seconds):
        with self._lock:
            token = self._token()
            self._deadlines[token] = (sock, self._clock() + seconds)
            return token

    def disarm(self, token):
        with self._lock:
            self._deadlines.pop(token, None)

    def watch(self, sock, on_gone):
        with self._lock:
            token = self._token()
            self._watched[token] = (sock, on_gone)
            return token

    def unwatch(self, token):
        with self._lock:
            self._watched.pop(token, None)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self):
        now = self._clock()
        with self._lock:
            expired = [(t, s) for t, (s, d) in self._deadlines.items() if d <= now]
            for token, _ in expired:
                del self._deadlines[token]
            watched = list(self._watched.items())
        for _, sock in expired:
            log.debug("closing a connection that missed its deadline")
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not watched:
            return
        readable = _readable([sock for _, (sock, _) in watched])
        for token, (sock, on_gone) in watched:
            if sock in readable and peer_closed(sock):
                with self._lock:
                    gone = self._watched.pop(token, None)
                if gone is not None:
                    on_gone()
