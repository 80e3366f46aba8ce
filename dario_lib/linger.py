"""Closing client connections without losing the last answer, and without anyone waiting.

Closing a socket that still has unread input makes the kernel send a reset, which can
destroy the answer still in flight (an early 413, the over-cap 503). So a closing
connection first stops sending (`SHUT_WR`), then its input is read and thrown away until
the client closes too or `LINGER_S` passes, and only then is it closed.

`Lingerer` does that for many sockets at once on one named daemon thread with `poll()`,
so neither the accept loop nor a connection's thread ever waits on a client that keeps
sending or stays silent. It holds at most `max_sockets` (each is a file descriptor);
past that a socket is closed at once: a lost answer beats running out of descriptors.

Thread-safe: `add` may be called from any thread.
"""

import logging
import select
import socket
import threading
import time

log = logging.getLogger(__name__)

LINGER_S = 1.0
MAX_SOCKETS = 64
_TICK_S = 0.05


class Lingerer:
    def __init__(self, linger_s=LINGER_S, max_sockets=MAX_SOCKETS, clock=time.monotonic):
        self.linger_s = linger_s
        self.max_sockets = max_sockets
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._new = []
        self._count = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="dario-linger", daemon=True)
        self._thread.start()

    def add(self, sock):
        """Stop sending on `sock`, drain its input for a moment, then close it. Never blocks."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            _close(sock)
            return
        with self._cond:
            if self._stopped or self._count >= self.max_sockets:
                full = True
            else:
                full = False
                self._count += 1
                self._new.append((sock, self._clock() + self.linger_s))
                self._cond.notify()
        if full:
            _close(sock)

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2)

    def _run(self):
        held = {}                               # fd -> (sock, deadline)
        poller = select.poll() if hasattr(select, "poll") else None
        while True:
            with self._cond:
                if not held and not self._new and not self._stopped:
                    self._cond.wait()
                new, self._new = self._new, []
                stopped = self._stopped
            for sock, deadline in new:
                held[sock.fileno()] = (sock, deadline)
                if poller is not None:
                    poller.register(sock.fileno(), select.POLLIN)
            if stopped:
                for sock, _ in held.values():
                    _close(sock)
                with self._cond:
                    self._count = 0
                return
            ready = self._ready(poller, held)
            now = self._clock()
            done = [fd for fd, (sock, deadline) in held.items()
                    if deadline <= now or (fd in ready and _drained(sock))]
            for fd in done:
                sock, _ = held.pop(fd)
                if poller is not None:
                    poller.unregister(fd)
                _close(sock)
            if done:
                with self._cond:
                    self._count -= len(done)

    @staticmethod
    def _ready(poller, held):
        if not held:
            return set()
        if poller is not None:
            return {fd for fd, _ in poller.poll(_TICK_S * 1000)}
        socks = [sock for sock, _ in held.values()]
        try:
            ready, _, _ = select.select(socks, [], [], _TICK_S)
        except (OSError, ValueError):
            return set(held)
        return {sock.fileno() for sock in ready}


def _drained(sock):
    """Read what is waiting; True once the client has closed (or reset) its side."""
    try:
        for _ in range(16):
            if not sock.recv(65536):
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return False


def _close(sock):
    try:
        sock.close()
    except OSError:
        log.debug("closing a lingering socket failed", exc_info=True)
