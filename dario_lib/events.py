"""Fan-out of live events (records, guard events) to `/analytics/stream` subscribers.

Each subscriber owns a bounded queue. `publish` never blocks: a subscriber whose queue
is full (it stopped reading) is dropped on the spot, so a slow client can never slow a
request thread. Subscribers are capped; `subscribe` raises `TooManySubscribers` past
the cap.

Thread-safe: any thread may publish; each subscription is read by one thread.
"""

import queue
import threading

MAX_SUBSCRIBERS = 64
QUEUE_SIZE = 1024


class TooManySubscribers(Exception):
    pass


class Subscription:
    """One subscriber's queue. `get` returns (name, data), or None once closed."""

    _CLOSED = object()

    def __init__(self, bus, size):
        self._bus = bus
        self._queue = queue.Queue(size)
        self.closed = False

    def get(self, timeout):
        """Next event, or `Subscription.TIMEOUT` after `timeout` s, or None when closed.

        A closed subscription (dropped for being slow, or shut down) ends at once,
        without delivering what is still queued.
        """
        if self.closed:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None if self.closed else self.TIMEOUT
        return None if item is self._CLOSED or self.closed else item

    TIMEOUT = ("timeout", None)

    def _offer(self, item):
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def _wake_closed(self):
        self.closed = True
        try:
            self._queue.put_nowait(self._CLOSED)
        except queue.Full:
            # A full queue wakes its reader anyway; it sees `closed` after draining.
            pass

    def close(self):
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, max_subscribers=MAX_SUBSCRIBERS, queue_size=QUEUE_SIZE):
        self._lock = threading.Lock()
        self._subs = []
        self._max = max_subscribers
        self._queue_size = queue_size
        self.dropped = 0

    def subscribe(self):
        with self._lock:
            if len(self._subs) >= self._max:
                raise TooManySubscribers()
            sub = Subscription(self, self._queue_size)
            self._subs.append(sub)
            return sub

    def unsubscribe(self, sub):
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
        sub._wake_closed()

    def publish(self, name, data):
        """Offer (name, data) to every subscriber; drop the ones that are full."""
        item = (name, data)
        with self._lock:
            subs = list(self._subs)
        stale = [sub for sub in subs if not sub._offer(item)]
        for sub in stale:
            with self._lock:
                self.dropped += 1
            self.unsubscribe(sub)

    def close_all(self):
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub._wake_closed()

    @property
    def count(self):
        with self._lock:
            return len(self._subs)
