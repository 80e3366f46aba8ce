"""The gateway's bounds on what it holds: file descriptors and memory in flight.

- Descriptors: `raise_fd_limit()` lifts the soft RLIMIT_NOFILE to the hard limit at start
  (login shells and systemd often leave it at 1024), and `connection_cap()` keeps client
  connections below it with headroom (FD_HEADROOM) for the upstream pool, lingering
  closes, the state file, the ledger and notifications, so a halt can always be saved.
- Memory: an `Allowance` bounds the bytes held for all requests in flight together
  (request heads, request bodies); past it, a new request is refused (503) instead of
  held.

Thread-safe: an Allowance's counts are behind its lock; the rest are pure functions.
"""

import logging
import threading

try:
    import resource
except ImportError:                 # not on Windows
    resource = None

from .linger import MAX_SOCKETS as LINGER_SOCKETS

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024
UPSTREAM_POOL = 64
# Descriptors kept free of client connections: the idle upstream pool, lingering closes,
# and the rest (listener, stdio, state file, ledger, log file, notification pipes).
FD_HEADROOM = UPSTREAM_POOL + LINGER_SOCKETS + 64


def fd_limit():
    """The soft limit on open descriptors, or None where it cannot be read."""
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit():
    """Raise the soft descriptor limit to the hard one (login shells and systemd often
    leave it at 1024). Returns the soft limit in force afterwards."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:        # macOS caps it below an infinite hard limit
            log.debug("could not raise the descriptor limit: %s", err)
    return fd_limit()


def connection_cap(limit, wanted=MAX_CONNECTIONS):
    """How many client connections fit under a descriptor limit: each may hold two
    descriptors (the client's and one upstream socket), after FD_HEADROOM."""
    if limit is None:
        return wanted
    return max(1, min(wanted, (limit - FD_HEADROOM) // 2))


class Allowance:
    """A gateway-wide bound on bytes held for requests in flight (heads or bodies)."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n):
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n):
        with self._lock:
            self.used -= n
