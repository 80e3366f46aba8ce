"""One thread that enforces deadlines and notices clients that hung up.

Per-read socket timeouts cannot stop a client that sends one byte every few seconds,
and a relay thread blocked on a silent upstream cannot see its client leave. The
watchdog covers both, ticking every `interval` seconds over one `Slot` per client
connection:

- `slot.arm(seconds)` gives the connection a total deadline (request head, request
  body); past it the socket is shut down, which wakes the blocked reader with EOF.
  `slot.disarm()` lifts it.
- `slot.watch(on_gone)` polls the client socket while a request is with the upstream
  (waiting for its answer, then while the answer streams); when the peer has closed it,
  `on_gone()` runs once (the relay uses it to stop the upstream exchange).
  `slot.unwatch()` stops that. A hang-up is seen even when the client had already sent
  more bytes (a pipelined request): on Linux through POLLRDHUP, elsewhere by peeking.

A slot is registered once per connection, so arming and watching on the request path
are plain attribute writes, with no lock (each is one atomic store under the GIL; the
watchdog reads each field once per tick). Callbacks run on the watchdog thread and
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


_RDHUP = getattr(select, "POLLRDHUP", 0)
_GONE = select.POLLHUP | select.POLLERR | _RDHUP if hasattr(select, "poll") else 0


def _polled(socks, mask):
    """[(sock, events)] ready right now among `socks`, polled for `mask` (no waiting)."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        fd = sock.fileno()
        if fd >= 0:
            by_fd[fd] = sock
            poller.register(fd, mask)
    return [(by_fd[fd], events) for fd, events in poller.poll(0) if fd in by_fd]


def hung_up(socks):
    """The sockets whose peer has closed (or reset) the connection, data waiting or not."""
    if _RDHUP:
        return {sock for sock, events in _polled(socks, _RDHUP) if events & _GONE}
    return {sock for sock in readable(socks) if peer_closed(sock)}


def readable(socks):
    """The sockets with something to read (or a hang-up) right now."""
    if hasattr(select, "poll"):             # select() cannot take fds above FD_SETSIZE
        return {sock for sock, _ in _polled(socks, select.POLLIN)}
    try:
        ready, _, _ = select.select(socks, [], [], 0)
    except (OSError, ValueError):
        return set(socks)                   # a closed socket: let peer_closed decide
    return set(ready)


class Slot:
    """One client connection's deadline and hang-up watch."""

    __slots__ = ("sock", "deadline", "on_gone", "_clock")

    def __init__(self, sock, clock):
        self.sock = sock
        self.deadline = None
        self.on_gone = None
        self._clock = clock

    def arm(self, seconds):
        self.deadline = self._clock() + seconds

    def disarm(self):
        self.deadline = None

    def watch(self, on_gone):
        self.on_gone = on_gone

    def unwatch(self):
        self.on_gone = None


class Watchdog:
    def __init__(self, interval=0.25, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._slots = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dario-watchdog", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def register(self, sock):
        slot = Slot(sock, self._clock)
        with self._lock:
            self._slots.add(slot)
        return slot

    def unregister(self, slot):
        with self._lock:
            self._slots.discard(slot)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self):
        now = self._clock()
        with self._lock:
            slots = list(self._slots)
        watched = []
        for slot in slots:
            deadline = slot.deadline
            if deadline is not None and deadline <= now:
                slot.deadline = None
                log.debug("closing a connection that missed its deadline")
                try:
                    slot.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            on_gone = slot.on_gone
            if on_gone is not None:
                watched.append((slot, on_gone))
        if not watched:
            return
        gone = hung_up([slot.sock for slot, _ in watched])
        for slot, on_gone in watched:
            if slot.sock in gone and slot.on_gone is on_gone:
                slot.on_gone = None
                on_gone()
