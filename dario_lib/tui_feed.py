"""What the TUI knows about the running gateway, fetched off the UI thread.

`Feed` talks to the gateway only through `client.Client`, on two named daemon threads:

- `dario-tui-poll` fetches `/status` every second, `/analytics` every two seconds (and
  `/admin/config` with it while the Config tab asks for it), and runs the actions the
  UI asks for (refresh now, resume, save config changes) in between;
- `dario-tui-events` follows `/analytics/stream` and reconnects with a growing backoff
  when the gateway goes away or ends the stream.

Threading contract: every field below is written under `self._lock`, and the UI thread
reads only `view()`, an immutable snapshot taken inside that lock. The JSON objects a
View holds are replaced wholesale and never mutated after they are stored, so sharing
them with the UI thread is safe. Nothing here blocks the UI: `refresh()` and `resume()`
only set a flag and wake the poll thread; `save_config()` hands its changes over the
same way and the outcome comes back in a later View (`saved`). `stop()` joins the poll thread; the events
thread can be stuck in a read when the UI quits, so it is a daemon and ends with the
process.

After a gateway restart the rows of the one before are cleared: the feed notices a
record id that goes back, or a `/status` uptime that puts the gateway's start later
than before.
"""

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

from . import guardtext
from .client import GatewayDown, GatewayError

log = logging.getLogger(__name__)

MAX_HITS = 500
STREAM_READ_TIMEOUT_S = 60      # the gateway sends a heartbeat every 25 s
RESTART_JITTER_S = 1.0          # uptime is rounded to 0.1 s and read over a network trip


@dataclass(frozen=True)
class Notice:
    text: str
    level: str                  # "info", "good", "warn" or "bad"
    at: float                   # clock() when it was posted


@dataclass(frozen=True)
class Saved:
    """The outcome of one `save_config()` (matched by `seq`)."""
    seq: int
    ok: bool
    text: str = None            # why it failed
    answer: dict = None         # the gateway's PUT /admin/config answer when it worked


@dataclass(frozen=True)
class View:
    """One consistent picture of the gateway for a frame of the UI."""
    port: int
    link: str                   # "connecting", "up", "down" or "error"
    error: str = None           # why the link is down or in error
    status: dict = None         # last /status (None while down)
    analytics: dict = None      # last /analytics (kept while down, for context)
    halt: dict = None           # the guard's halt, or None when normal
    hits: tuple = ()            # records, newest first
    notice: Notice = None
    updated_at: float = None    # clock() of the last good /status
    config: dict = None         # last /admin/config (None while unknown)
    config_error: str = None    # why there is none
    saved: Saved = None         # the latest save_config() outcome

    @property
    def halted(self):
        return self.halt is not None


def hit_key(record):
    # Ids restart when the gateway restarts; with the timestamp they stay unique.
    return record.get("id"), record.get("timestamp")


class Feed:
    def __init__(self, client, *, clock=time.time, status_every=1.0, analytics_every=2.0,
                 max_hits=MAX_HITS, backoff=(0.5, 5.0)):
        self.client = client
        self.clock = clock
        self.status_every = status_every
        self.analytics_every = analytics_every
        self.backoff = backoff
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._link, self._error = "connecting", None
        self._status = self._analytics = self._halt = self._notice = self._updated_at = None
        # Bumped by every guard event from the stream, so a /status answer that was
        # already on its way cannot undo a halt or resume the stream just reported.
        self._guard_seq = 0
        self._hits = collections.deque()
        self._hit_keys = set()
        self._max_hits = max_hits
        self._last_id = None            # the highest record id since the gateway started
        self._started = None            # time.monotonic() when the gateway started
        self._want_refresh = self._want_resume = False
        self._config = self._config_error = self._saved = None
        self._config_wanted = False
        self._save = None               # (seq, changes) waiting for the poll thread
        self._save_seq = 0
        self._threads = []

    # -- the UI side ---------------------------------------------------------------

    def start(self):
        for name, target in (("dario-tui-poll", self._poll_loop), ("dario-tui-events", self._event_loop)):
            thread = threading.Thread(target=self._watched, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout=1.0):
        """Stop both threads; waits for the poll thread only.

        The events thread is usually blocked reading the stream, which `Client.events()`
        gives no way to interrupt; waiting for it would make `q` take a second. It sees
        the stop flag after its next event or read timeout, and as a daemon it never
        holds the process open.
        """
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "dario-tui-poll":
                thread.join(timeout)

    def refresh(self):
        with self._lock:
            self._want_refresh = True
        self._wake.set()

    def resume(self):
        with self._lock:
            self._want_resume = True
        self._wake.set()

    def watch_config(self, on):
        """Fetch /admin/config with the analytics while `on` (the Config tab is shown)."""
        with self._lock:
            changed = on and not self._config_wanted
            self._config_wanted = on
        if changed:
            self.refresh()

    def save_config(self, changes):
        """Ask the gateway to save and apply {name: JSON value}; returns the seq that the
        View's `saved` will carry once the answer is in."""
        with self._lock:
            self._save_seq += 1
            self._save = (self._save_seq, dict(changes))
            seq = self._save_seq
        self._wake.set()
        return seq

    def view(self):
        with self._lock:
            return View(port=self.client.port, link=self._link, error=self._error,
                        status=self._status, analytics=self._analytics, halt=self._halt,
                        hits=tuple(self._hits), notice=self._notice,
                        updated_at=self._updated_at, config=self._config,
                        config_error=self._config_error, saved=self._saved)

    def notify(self, text, level="info"):
        with self._lock:
            self._notice = Notice(text, level, self.clock())

    # -- applying what the gateway said (called by the threads; tests call them too) --

    def set_down(self, error, link="down"):
        with self._lock:
            self._link, self._error, self._status = link, error, None
            self._config, self._config_error = None, error
            if link == "down":
                self._halt = None           # a stopped gateway holds no halt in memory

    def set_status(self, status, seq=None):
        with self._lock:
            self._link, self._error, self._status = "up", None, status
            self._updated_at = self.clock()
            if seq is None or seq == self._guard_seq:
                self._halt = (status.get("guard") or {}).get("halt")
            uptime = status.get("uptimeS")
            if isinstance(uptime, (int, float)) and not isinstance(uptime, bool):
                # When the gateway started, on this process's monotonic clock: a later start
                # than last time (past the jitter of rounding and of this answer's trip)
                # is a new gateway.
                started = time.monotonic() - uptime
                if self._started is not None and started > self._started + RESTART_JITTER_S:
                    # Keep only rows the new gateway made.
                    started_ms = (self.clock() - uptime - RESTART_JITTER_S) * 1000
                    self._drop_hits(lambda r: (r.get("timestamp") or 0) < started_ms)
                    self._notice = Notice("the gateway restarted: rows of the one before are cleared",
                                          "info", self.clock())
                if self._started is None or started > self._started + RESTART_JITTER_S:
                    self._started = started

    def set_config(self, answer, error=None):
        with self._lock:
            self._config, self._config_error = answer, error

    def set_saved(self, saved):
        with self._lock:
            self._saved = saved
            if saved.ok:
                self._config, self._config_error = saved.answer, None

    def set_analytics(self, analytics):
        with self._lock:
            self._analytics = analytics

    def add_event(self, name, data):
        with self._lock:
            if name == "record":
                self._add_hit(data)
                return
            self._guard_seq += 1
            self._want_refresh = True
            request = data.get("request") or {}
            if name == "overage_halt":
                if self._halt is None:
                    self._halt = data
                    self._notice = Notice(f"HALT: {guardtext.title(data)} ({request.get('model') or 'a request'}); "
                                          "new requests get 503", "bad", self.clock())
            elif name == "overage_resume":
                halt = self._halt
                if halt is not None and (halt.get("since"), halt.get("account")) == (
                        data.get("previousSince"), data.get("account")):
                    self._halt = None
                self._notice = Notice(f"guard back to normal ({data.get('reason')})", "good", self.clock())
            elif name == "overage_warn":
                self._notice = Notice(f"warning: {guardtext.title(data)} ({request.get('model') or 'a request'})",
                                      "warn", self.clock())
        # Several halts can be current (one per account): /status has the whole picture.
        self._wake.set()

    def _add_hit(self, record):
        key = hit_key(record)
        if key in self._hit_keys:           # the backlog repeats on every reconnect
            return
        number = record.get("id")
        if isinstance(number, int):
            if self._last_id is not None and number <= self._last_id:
                self._drop_hits(lambda r: True)     # ids start over: a new gateway
            self._last_id = number if self._last_id is None else max(number, self._last_id)
        if len(self._hits) >= self._max_hits:
            self._hit_keys.discard(hit_key(self._hits.pop()))
        self._hits.appendleft(record)
        self._hit_keys.add(key)

    def _drop_hits(self, old):
        """Forget the rows `old(record)` picks (under the lock)."""
        kept = [r for r in self._hits if not old(r)]
        self._hits = collections.deque(kept)
        self._hit_keys = {hit_key(r) for r in kept}
        ids = [r["id"] for r in kept if isinstance(r.get("id"), int)]
        self._last_id = max(ids) if ids else None

    # -- the threads ---------------------------------------------------------------

    def _watched(self, loop):
        # A bug in a loop must not print a traceback over the screen or kill the feed:
        # it is logged (to nowhere unless the caller set up logging), shown, and retried.
        while not self._stop.is_set():
            try:
                loop()
                return
            except Exception as err:
                log.debug("%s failed", threading.current_thread().name, exc_info=True)
                self.notify(f"internal error in {threading.current_thread().name}: {err!r}", "bad")
                self._stop.wait(1.0)

    def _poll_loop(self):
        next_status = next_analytics = 0.0
        while not self._stop.is_set():
            with self._lock:
                resume, refresh, save = self._want_resume, self._want_refresh, self._save
                self._want_resume = self._want_refresh = False
                self._save = None
            if resume:
                self._do_resume()
                refresh = True
            if save is not None:
                self._do_save(*save)
            now = time.monotonic()
            if refresh or now >= next_status:
                up = self._fetch_status()
                next_status = time.monotonic() + self.status_every
                if up and (refresh or now >= next_analytics):
                    self._fetch_analytics()
                    with self._lock:
                        wanted = self._config_wanted
                    if wanted:
                        self._fetch_config()
                    next_analytics = time.monotonic() + self.analytics_every
            # While the gateway is down analytics are not due: wait for the next status only
            # (a past next_analytics would make this a busy loop).
            due = min(next_status, next_analytics) if next_analytics > now else next_status
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()

    def _fetch_status(self):
        with self._lock:
            seq = self._guard_seq
        try:
            self.set_status(self.client.status(), seq)
            return True
        except GatewayDown:
            self.set_down(f"no gateway running on 127.0.0.1:{self.client.port}, retrying")
        except GatewayError as err:
            self.set_down(f"the gateway on 127.0.0.1:{self.client.port} answered HTTP {err.status}"
                          f"{key_hint(err.status, self.client.api_key)}: {_first_line(err.body)}", link="error")
        return False

    def _fetch_analytics(self):
        try:
            self.set_analytics(self.client.analytics())
        except (GatewayDown, GatewayError):
            pass                            # /status reports the link; old numbers stay shown

    def _fetch_config(self):
        where = f"the gateway on 127.0.0.1:{self.client.port}"
        try:
            self.set_config(self.client.config())
        except GatewayDown:
            self.set_config(None, f"no gateway running on 127.0.0.1:{self.client.port}")
        except GatewayError as err:
            if err.status in (404, 405):
                self.set_config(None, f"{where} cannot show or change its config over HTTP "
                                      f"(HTTP {err.status}: an older dario?)")
            else:
                self.set_config(None, f"{where} answered HTTP {err.status}"
                                      f"{key_hint(err.status, self.client.api_key)}: {error_message(err.body)}")

    def _do_save(self, seq, changes):
        try:
            answer = self.client.set_config(changes)
        except GatewayDown:
            self.set_saved(Saved(seq, False, f"not saved: no gateway running on 127.0.0.1:{self.client.port}"))
            return
        except GatewayError as err:
            self.set_saved(Saved(seq, False, f"not saved: HTTP {err.status}"
                                             f"{key_hint(err.status, self.client.api_key)}: "
                                             f"{error_message(err.body)}"))
            return
        self.set_saved(Saved(seq, True, answer=answer))

    def _do_resume(self):
        try:
            result = self.client.resume()
        except GatewayDown:
            self.notify(f"resume failed: no gateway running on 127.0.0.1:{self.client.port}", "bad")
            return
        except GatewayError as err:
            self.notify(f"resume failed: HTTP {err.status}{key_hint(err.status, self.client.api_key)}: "
                        f"{_first_line(err.body)}", "bad")
            return
        if result.get("wasHalted"):
            with self._lock:
                self._halt = None
                self._guard_seq += 1
            self.notify(f"resumed at {result.get('resumedAt')}; requests flow again", "good")
        else:
            self.notify("the gateway was not halted: nothing to resume", "info")

    def _event_loop(self):
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                for name, data in self.client.events(timeout=STREAM_READ_TIMEOUT_S):
                    delay = self.backoff[0]         # connected: start the backoff over
                    if self._stop.is_set():
                        return
                    self.add_event(name, data)
            except (GatewayDown, GatewayError) as err:
                log.debug("event stream: %s", err)
            self.refresh()                          # the gateway may be gone: check now
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff[1])


def key_hint(status, api_key):
    """What to do about a 401 (nothing for other statuses)."""
    if status != 401:
        return ""
    if api_key:
        return " (DARIO_API_KEY is set but refused: set it to the gateway's key, sent as x-dario-api-key)"
    return " (set DARIO_API_KEY to the gateway's key; it is sent as x-dario-api-key)"


def error_message(body, limit=300):
    """The message of the gateway's JSON error body (its first line when it has none)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return _first_line(body)
    return str(message)[:limit]


def _first_line(text, limit=120):
    return (text or "").strip().splitlines()[0][:limit] if (text or "").strip() else ""
