"""Alert channels that reach a headless server: `notifyCommand` and `notifyWebhook`.

Every guard event (halt, warn, resume) is handed to `send()`, which only queues it; one
named daemon thread delivers it, so a request thread never waits on a slow receiver.

- `notifyCommand` is an argument list (never a shell string) run with the event JSON on
  stdin, e.g. `["ntfy", "publish", "mytopic"]` or a mail script; exit status 0 is
  success. It runs with `notify.child_env()`: none of dario's secrets in its environment.
- `notifyWebhook` receives the event JSON by POST through its own `requests` session
  (not the upstream one), with a short timeout and a few retries; any 2xx is success.
  `requests` is imported only when the first webhook is posted: importing it (and
  certifi, charset_normalizer, idna) is most of what a gateway's start-up would cost.

The event JSON is ASCII and valid for a strict parser: lone surrogates that came in a
request (a model name, say) become U+FFFD first (`inert.json_safe`).

A failing channel is logged once (and again once it recovers), never raised. `deliver()`
runs both synchronously for `dario notify-test`.

Thread-safe: `send` may be called from any thread.
"""

import json
import logging
import queue
import subprocess
import threading
import time

from . import __version__, inert
from .notify import child_env

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 10
WEBHOOK_TIMEOUT_S = (3, 5)
WEBHOOK_ATTEMPTS = 3
QUEUE_SIZE = 256


class Alerts:
    def __init__(self, command=None, webhook=None, origin="dario", sleep=time.sleep, secrets=()):
        self.command = list(command) if command else None
        self._secrets = tuple(secrets)      # secret values beyond the environment's
        self.webhook = webhook
        self.origin = origin
        self._sleep = sleep
        self._queue = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._thread = None
        self._failing = set()
        self._session = None

    @property
    def configured(self):
        return bool(self.command or self.webhook)

    def send(self, event):
        """Queue an event for delivery; never blocks, never raises."""
        if not self.configured:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("alert queue full: dropped a %s event", event.get("event"))
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="dario-alerts", daemon=True)
                self._thread.start()

    def close(self, timeout=2.0):
        """Deliver what is queued (up to `timeout`), then stop the worker."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)

    def _work(self):
        while True:
            event = self._queue.get()
            if event is None:
                return
            self.deliver(event)

    def deliver(self, event):
        """Run every channel now: {channel: (ok, detail)}."""
        payload = json.dumps(inert.json_safe(dict(event, source=self.origin, version=__version__)),
                             ensure_ascii=True).encode()
        results = {}
        if self.command:
            results["command"] = self._run_command(payload)
        if self.webhook:
            results["webhook"] = self._post_webhook(payload)
        for channel, (ok, detail) in results.items():
            self._report(channel, ok, detail)
        return results

    def _run_command(self, payload):
        try:
            done = subprocess.run(self.command, input=payload, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=COMMAND_TIMEOUT_S, close_fds=True,
                                  env=child_env(secrets=self._secrets))
        except FileNotFoundError:
            return False, f"{self.command[0]}: command not found"
        except subprocess.TimeoutExpired:
            return False, f"{self.command[0]} did not finish in {COMMAND_TIMEOUT_S}s"
        except OSError as err:
            return False, f"{self.command[0]}: {err.strerror or err}"
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            return False, f"{self.command[0]} exited {done.returncode} {tail[0][:200]}".strip()
        return True, "exit 0"

    def _post_webhook(self, payload):
        import requests                 # lazy: see the module docstring
        if self._session is None:
            session = requests.Session()
            session.trust_env = False
            self._session = session
        detail = ""
        for attempt in range(WEBHOOK_ATTEMPTS):
            if attempt:
                self._sleep(0.5 * 2 ** (attempt - 1))
            try:
                resp = self._session.post(self.webhook, data=payload, timeout=WEBHOOK_TIMEOUT_S,
                                          headers={"Content-Type": "application/json"}, allow_redirects=False)
                resp.close()
            except requests.RequestException as err:
                detail = type(err).__name__
                continue
            if 200 <= resp.status_code < 300:
                return True, f"HTTP {resp.status_code}"
            detail = f"HTTP {resp.status_code}"
            if resp.status_code < 500 and resp.status_code != 429:
                break               # the receiver refuses this request; retrying will not help
        return False, detail

    def _report(self, channel, ok, detail):
        if ok and channel in self._failing:
            self._failing.discard(channel)
            log.info("alert channel %s works again (%s)", channel, detail)
        elif not ok and channel not in self._failing:
            self._failing.add(channel)
            log.error("alert channel %s failed (%s); further failures are not logged until it works",
                      channel, detail)
