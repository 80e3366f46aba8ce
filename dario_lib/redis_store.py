"""The Redis store: halts, budgets, threshold crossings and events shared by a team of
gateways (`store.url = redis://…`). The file store (`guard-state.json`, the spend
ledger) stays the default for one host.

What it guarantees (the scripts are in `redis_lua.py`, each one atomic on the server):
- A halt written with `put_halt` blocks every later `gate()` of every gateway on this
  namespace. A halt is set only if none is there; clearing can name the halt's id, so a
  late cooldown timer of one gateway cannot clear a newer halt. A halt whose
  `cooldownUntil` has passed is cleared by whichever gateway looks first (its timer, or
  the next `gate`, which returns it in `cleared` so that gateway announces it), once,
  with one resume event.
- `gate()` checks the halts and, when asked, reserves a request's worst-case cost, in
  ONE round trip: refused when a budget's spend is under its limit but spend plus the
  reservations in flight reach it, as one gateway does today. So across any number of
  gateways spend passes a budget by at most one reservation. Windows use Redis's clock.
- Reservations expire `reservationTtlS` after the last heartbeat (`start()` runs one
  that refreshes this store's in-flight ids every ttl/3), so a gateway that dies cannot
  hold room forever. Settling is idempotent per reservation id (remembered an hour);
  settling after expiry still counts the cost, once. A settle that fails (Redis down)
  is kept and retried by the heartbeat until it lands.
- The extra-usage cap (`overageGuard.allowExtraUsage`) is a budget of its own scope
  (`BudgetRef.extra`): `gate()` holds a request's worst case against it (as a separate
  hold, "<id>#x") only while the cap's scope is in extra usage (`extra_mode()`, written
  when an answer says so), and `settle_cap()` releases that hold and counts the cost
  of an answer served from extra usage. Same guarantees as a budget's.
- `cross()` records a threshold level and returns the previous one atomically: only
  the gateway that saw the upward crossing fires. `crosses()` records several (all a
  response or a settle saw) in the same single round trip.
- Lost state: each gateway remembers the namespace's marker (in memory and in the file
  `marker_path`). When `gate()` finds it gone or replaced by an unknown one, Redis lost
  its state; the same script writes a gateway-wide halt with reason `store_state_lost`
  (no cooldown) and the detecting call reports `state_lost`. Resuming it is clearing
  that halt, from any gateway; the new marker is already in place.

Failure: every call is bounded by `store.timeoutMs` (socket connect and read timeouts,
and the wait for a pooled connection). Unreachable, slow or refusing: `StoreUnavailable`,
whose message names the host but never credentials. Nothing is retried inside a call;
the next call reconnects. Lines at WARNING say when the store goes down and comes back.

Threading: every public method may be called from any thread at once. redis-py's
connection pool is thread-safe (each call borrows its own connection); this module's
own counters, marker and in-flight ids are behind one lock. `subscribe()` runs one
named daemon thread, `start()` another; `close()` stops and joins both.

`redis` (the PyPI package) is imported only when a store is built.
"""

import hashlib
import inspect
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from . import redis_lua
from .files import write_atomic
from .metrics import Histogram

log = logging.getLogger(__name__)

STATE_LOST = "store_state_lost"
UNAVAILABLE = "store_unavailable"
ALL = object()                                  # clear_halt(): every halt
MICRO = 1_000_000
SETTLED_MEMORY_MS = 3_600_000                   # a settle retried within this adds nothing
MAX_PENDING_SETTLES = 10_000
POOL_SIZE = 64
ROUNDTRIP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PING_EVERY_S = 5.0                              # the event listener's liveness check
INSTALL_HINT = "pip install 'redis>=5.0' (or, installing dario itself, pip install '.[redis]')"
CAP_SUFFIX = "#x"                               # the extra-usage cap's hold: "<reservation id>#x"


class StoreUnavailable(Exception):
    """Redis did not answer in time, or refused. The message holds no credentials."""


class MissingDependency(RuntimeError):
    """The `redis` package is not installed; the message says how to install it."""


def to_micro(usd, up=False):
    """USD as integer micro-dollars: rounded to nearest, or up (a worst case)."""
    scaled = round(usd * MICRO, 6)              # 0.1 * 1e6 is 100000.00000000001
    return int(math.ceil(scaled)) if up else int(round(scaled))


class BudgetRef(NamedTuple):
    """A budget as the store sees it: `account` is a label or "*" (all traffic).

    `crossing` is the (halt key, metric) under which the guard records this budget's
    threshold crossing with `cross()`; with it, `gate()` also refuses while spend is past
    the limit but that crossing (and so its halt) is not recorded yet.
    """
    id: str
    account: str
    limit_micro: int
    window_ms: int
    crossing: tuple = None
    extra: bool = False     # the extra-usage cap: counts only answers served from extra usage

    @classmethod
    def of(cls, budget, key=None):
        """From config.Budget; `key` is the halt key its crossing uses (None: the team)."""
        name = f"{budget.account}:{budget.window}:{budget.usd}"
        return cls(name, budget.account, to_micro(budget.usd), budget.window_ms, (key, f"budget:{name}"))

    @classmethod
    def cap(cls, cap, key=None, metric="extra_usage"):
        """The extra-usage cap (config.ExtraUsageCap) of halt key `key` (None: all traffic,
        else an account label); its crossing is (key, metric)."""
        account = "*" if key is None else key
        return cls(f"extra:{account}", account, to_micro(cap.usd), cap.window_ms, (key, metric), True)

    @property
    def scope(self):
        """Its series in Redis: "*", "a:<label>", or those with "x:" for the cap."""
        return ("x:" if self.extra else "") + ("*" if self.account == "*" else "a:" + self.account)


class Spend(NamedTuple):
    spent_micro: int
    reserved_micro: int
    roll_ms: int            # when spend will have aged under the limit; None while under it


@dataclass(frozen=True)
class Reserve:
    """What `gate()` should reserve: a request's worst case against its budgets."""
    id: str
    usd: float
    budgets: tuple          # BudgetRef (or plain tuples of its four fields)


@dataclass(frozen=True)
class Refusal:
    budget: BudgetRef
    spent_micro: int
    reserved_micro: int


@dataclass(frozen=True)
class Gate:
    halts: tuple            # halt dicts (Halt.public() shape plus id, gateway) blocking the request
    state_lost: bool        # this call found Redis's state lost and wrote the halt for it
    reserved: bool          # the reservation is held (settle it)
    refusal: Refusal        # or None
    now_ms: int             # Redis's clock
    cleared: tuple = ()     # halts whose cooldown had passed, cleared by this call (announce them)
    cap_held: bool = False  # the extra-usage cap's hold is held too (settle_cap it)
    extra_mode: bool = None  # the cap's scope is in extra usage (None: no cap was asked)


def new_id():
    return uuid.uuid4().hex


def default_gateway_id():
    """Readable where it came from (host, pid), unique across restarts."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def describe(url):
    """The store's address for people: scheme, host, port and db; never credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}" + (f"?{parts.query}" if parts.query.startswith("db=") else "")
    db = parts.path.strip("/") or "0"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{parts.port or 6379}/{db}"


class _Script:
    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


SCRIPTS = {name: _Script(getattr(redis_lua, name.upper()))
           for name in ("gate", "settle", "spent", "refresh", "put_halt", "clear_halt", "cross",
                        "cap_settle", "extra_mode", "cap_status")}


class RedisStore:
    kind = "redis"

    def __init__(self, config, *, marker_path=None, gateway_id=None):
        """`config` is config.StoreConfig (url, namespace, password, timeout_ms,
        reservation_ttl_s). `marker_path`: the file that remembers the namespace's marker
        across restarts (None: memory only)."""
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise MissingDependency(f"the Redis store needs the redis package: {INSTALL_HINT}") from None
        self._redis = redis
        self.namespace = config.namespace
        self.host = describe(config.url)
        self.gateway_id = gateway_id or default_gateway_id()
        self.timeout_ms = config.timeout_ms
        self.ttl_ms = config.reservation_ttl_s * 1000
        self.clock_offset_ms = 0            # tests only: moves the scripts' "now" forward
        self._prefix = config.namespace + ":"
        self._channel = self._prefix + "events"
        self._secrets = [s for s in (config.password, _url_password(config.url)) if s]
        timeout = config.timeout_ms / 1000
        # Every wait bounded by the timeout (connect, each read, a free pooled connection);
        # no retries inside a call (its bound would multiply); RESP2 and no client-info
        # commands, so a new connection costs no extra round trips.
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout, timeout=timeout,
                       max_connections=POOL_SIZE, retry=Retry(NoBackoff(), 0), protocol=2,
                       decode_responses=True, **_no_client_info(redis))
        if config.password and not _url_password(config.url):
            options["password"] = config.password
        self._pool = redis.BlockingConnectionPool.from_url(config.url, **options)
        self._client = redis.Redis(connection_pool=self._pool)
        self._marker_path = marker_path
        self._lock = threading.Lock()
        self._known = self._read_marker()
        self._up = None
        self._down_since = None
        self._errors = 0
        self._roundtrip_ms = None
        self._histogram = Histogram(ROUNDTRIP_BUCKETS_S)
        self._in_flight = set()             # reservation ids this gateway holds
        self._pending = []                  # settles that failed: (id, account, micro, cap BudgetRef or None)
        self._stop = threading.Event()
        self._threads = []

    # -- the request path --------------------------------------------------------

    def gate(self, account, reserve=None):
        """The halts blocking this account's request and, when `reserve` is given and no
        halt blocks, its reservation; one round trip. Raises StoreUnavailable."""
        args = [self._known or "", account or "", "", 0, self.ttl_ms]
        budgets = ()
        if reserve is not None:
            budgets = tuple(BudgetRef(*b) for b in reserve.budgets if b[1] in ("*", account))
            args[2:4] = [reserve.id, to_micro(reserve.usd, up=True)]
            for budget in budgets:
                args += _budget_args(budget)
        (lost, now, marker, status, refused, spent, held, held_plain, held_cap, mode, n_cleared,
         *halts) = self._run("gate", args)
        self._adopt(marker, lost)
        if held_plain or held_cap:
            with self._lock:
                if held_plain:
                    self._in_flight.add(reserve.id)
                if held_cap:
                    self._in_flight.add(reserve.id + CAP_SUFFIX)
        refusal = Refusal(budgets[refused - 1], spent, held) if status == "refused" else None
        cleared = tuple(json.loads(h) for h in halts[:n_cleared])
        return Gate(tuple(json.loads(h) for h in halts[n_cleared:]), bool(lost), bool(held_plain), refusal,
                    now, cleared, bool(held_cap), None if mode == -1 else bool(mode))

    def settle(self, reservation_id, account, usd, budgets=()):
        """Replace a reservation with the metered cost; idempotent per id (None: a cost
        without a reservation). Returns {budget id: Spend} for `budgets` after settling.
        On StoreUnavailable the settle is kept and retried by the heartbeat."""
        reservation_id = reservation_id or new_id()
        micro = max(0, to_micro(usd))
        with self._lock:
            self._in_flight.discard(reservation_id)
        try:
            return self._settle(reservation_id, account, micro, budgets)
        except StoreUnavailable:
            self._keep((reservation_id, account, micro, None))
            raise

    def settle_cap(self, reservation_id, account, usd, cap):
        """Release the extra-usage cap's hold of a reservation (if it had one) and count
        `usd`, the cost of an answer served from extra usage (0 when it was not), against
        the cap; idempotent per id. Returns the cap's Spend after settling. On
        StoreUnavailable the settle is kept and retried by the heartbeat."""
        hold_id = (reservation_id or new_id()) + CAP_SUFFIX
        micro = max(0, to_micro(usd))
        with self._lock:
            self._in_flight.discard(hold_id)
        try:
            return self._settle(hold_id, account, micro, (), cap)
        except StoreUnavailable:
            self._keep((hold_id, account, micro, cap))
            raise

    def _keep(self, entry):
        with self._lock:
            if len(self._pending) < MAX_PENDING_SETTLES:
                self._pending.append(entry)
                return
        log.error("dropping a settle of %d micro-USD: %d are already waiting for Redis", entry[2], MAX_PENDING_SETTLES)

    def _settle(self, reservation_id, account, micro, budgets, cap=None):
        """SETTLE (budgets), or CAP_SETTLE with `cap`: then the cap's Spend."""
        if cap is not None:
            cap = BudgetRef(*cap)
            args = [reservation_id, account, micro, SETTLED_MEMORY_MS, *_budget_args(cap)]
            _counted, _held, _now, *numbers = self._run("cap_settle", args)
            return _spends((cap,), numbers)[cap.id]
        budgets = tuple(BudgetRef(*b) for b in budgets)
        args = [reservation_id, account, micro, SETTLED_MEMORY_MS]
        for budget in budgets:
            args += _budget_args(budget)
        _counted, _held, _now, *numbers = self._run("settle", args)
        return _spends(budgets, numbers)

    def extra_mode(self, cap, on):
        """Record whether the cap's scope (`cap`: its BudgetRef) is in extra usage: its
        last answer was served from it (True) or from the subscription (False). Returns
        the previous mode. Back on the subscription, a recorded "halt" crossing of the cap
        becomes "warn" (redis_lua.EXTRA_MODE says why)."""
        cap = BudgetRef(*cap)
        field = _crossing_field(*cap.crossing) if cap.crossing else ""
        return self._run("extra_mode", [cap.scope, "1" if on else "0", field]) == "1"

    def cap_status(self, window_ms, every_account):
        """[(account label or "*", spent micro, reserved micro, in extra usage)] of the
        extra-usage cap: every account seen (`every_account`, account scope) or all
        traffic together."""
        _now, *flat = self._run("cap_status", [window_ms, "account" if every_account else "proxy"])
        out = []
        for i in range(0, len(flat), 4):
            scope = flat[i][2:]                         # "x:*" or "x:a:<label>"
            out.append(("*" if scope == "*" else scope[2:], flat[i + 1], flat[i + 2], bool(flat[i + 3])))
        return out

    def spent(self, budgets):
        """{budget id: Spend} now: spend in each window and reservations in flight."""
        budgets = tuple(BudgetRef(*b) for b in budgets)
        args = []
        for budget in budgets:
            args += _budget_args(budget)
        _now, *numbers = self._run("spent", args)
        return _spends(budgets, numbers)

    def refresh(self, ids):
        """Extend these reservations by the ttl; returns the ids no longer held."""
        ids = list(ids)
        if not ids:
            return []
        return self._run("refresh", [self.ttl_ms] + ids)

    # -- halts, crossings, events --------------------------------------------------

    def put_halt(self, key, halt):
        """Set the halt for `key` (None or "*": the whole team; else an account label)
        unless one is there. `halt` is Halt.public()'s dict; `id` and `gateway` are
        added. Returns (created, the halt in place). Publishes the halt when created."""
        halt = dict(halt, id=halt.get("id") or new_id(), gateway=self.gateway_id)
        _created, current = self._run("put_halt", [_halt_key(key), json.dumps(halt)])
        current = json.loads(current)
        return current.get("id") == halt["id"], current     # by id: a retried call still knows

    def clear_halt(self, key=ALL, expect_id=None, reason="manual"):
        """Remove the halt for `key` (ALL: every halt), only the one with `expect_id` when
        given. Returns (removed halts, Redis time ms); publishes one resume per removal."""
        now, *removed = self._run("clear_halt", ["" if key is ALL else _halt_key(key), expect_id or "", reason])
        return [json.loads(h) for h in removed], now

    def halts(self):
        """{key: halt dict} of every halt ("*" for the whole team)."""
        found = self._call(lambda: self._client.hgetall(self._prefix + "halts"))
        return {key: json.loads(value) for key, value in found.items()}

    def cross(self, key, metric, level, halt=None):
        """Record `level` ("warn", "halt" or None) for (key, metric) and return
        (previous level, the halt set or None). The caller fires only on an upward
        change, so one gateway fires per crossing. With `halt` (Halt.public()'s dict) and
        a rise to "halt", the same script sets it under `key` unless a halt is there."""
        return self.crosses([(key, metric, level, halt)])[0]

    def crosses(self, items):
        """`cross()` for several (key, metric, level, halt) at once, in one round trip:
        [(previous level, the halt set or None)], in order."""
        args = []
        for key, metric, level, halt in items:
            halt_json = ""
            if halt is not None:
                halt_json = json.dumps(dict(halt, id=halt.get("id") or new_id(), gateway=self.gateway_id))
            args += [_crossing_field(key, metric), level or "", _halt_key(key), halt_json]
        if not args:
            return []
        flat = self._run("cross", args)
        return [(flat[i], json.loads(flat[i + 1]) if flat[i + 1] else None) for i in range(0, len(flat), 2)]

    def publish(self, kind, data):
        """Send an event (e.g. "overage_warn") to the other gateways."""
        message = json.dumps({"gateway": self.gateway_id, "type": kind, "data": data})
        self._call(lambda: self._client.publish(self._channel, message))

    def subscribe(self, callback):
        """Call callback({gateway, type, data}) for each event of another gateway, from a
        named daemon thread that reconnects on failure until close()."""
        self._spawn("dario-store-events", self._listen, callback)

    def start(self):
        """Start the heartbeat: refresh in-flight reservations every ttl/3 and retry
        failed settles."""
        self._spawn("dario-store-heartbeat", self._heartbeat)

    def close(self):
        """Stop the threads, try the settles still waiting once, and disconnect."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            while pending:
                self._replay(pending[0])
                pending.pop(0)
        except StoreUnavailable:
            log.warning("%d settled costs could not reach the Redis store at %s; they are not counted",
                        len(pending), self.host)
        self._pool.disconnect()

    # -- status --------------------------------------------------------------------

    def check(self):
        """One round trip (a PING): is the store up? Never raises."""
        try:
            self._call(self._client.ping)
            return True
        except StoreUnavailable:
            return False

    def status(self):
        with self._lock:
            return {"kind": self.kind, "namespace": self.namespace, "host": self.host,
                    "gateway": self.gateway_id, "up": self._up,
                    "roundtripMs": None if self._roundtrip_ms is None else round(self._roundtrip_ms, 3),
                    "errors": self._errors, "pendingSettles": len(self._pending)}

    def metrics(self):
        """Numbers for /metrics: up (0/1), errors (counter), roundtrip (metrics.Histogram, seconds)."""
        with self._lock:
            return {"up": 1 if self._up else 0, "errors": self._errors, "roundtrip": self._histogram.copy()}

    # -- internals -----------------------------------------------------------------

    def _run(self, name, args):
        script = SCRIPTS[name]
        argv = [self._prefix, self.clock_offset_ms, self.gateway_id, *args]
        noscript = self._redis.exceptions.NoScriptError

        def call():
            try:
                return self._client.evalsha(script.sha, 0, *argv)
            except noscript:             # a restarted or flushed Redis forgot the script
                return self._client.eval(script.source, 0, *argv)
        return self._call(call)

    def _call(self, fn):
        started = time.monotonic()
        try:
            result = fn()
        except (self._redis.RedisError, OSError) as err:
            raise self._failed(err) from None
        elapsed = time.monotonic() - started
        with self._lock:
            self._roundtrip_ms = elapsed * 1000
            self._histogram.observe(elapsed)
            was_down, self._up = self._up is False, True
            down_for = time.monotonic() - self._down_since if was_down else 0
        if was_down:
            log.warning("STORE BACK: the Redis store at %s answers again (down %.1f s)", self.host, down_for)
        return result

    def _failed(self, err):
        """Count a failure, say so once when the store goes down; the exception to raise."""
        redis = self._redis
        if isinstance(err, redis.TimeoutError):
            why = f"no answer within {self.timeout_ms} ms"
        elif isinstance(err, redis.AuthenticationError):
            why = "authentication failed (check DARIO_STORE_PASSWORD or the URL's user)"
        else:
            why = self._scrub(str(err) or type(err).__name__)[:200]
        with self._lock:
            self._errors += 1
            went_down, self._up = self._up is not False, False
            if went_down:
                self._down_since = time.monotonic()
        if went_down:
            log.warning("STORE DOWN: the Redis store at %s is unavailable (%s)", self.host, why)
        return StoreUnavailable(f"the Redis store at {self.host} is unavailable: {why}")

    def _scrub(self, text):
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _adopt(self, marker, lost):
        with self._lock:
            if marker == self._known:
                return
            previous, self._known = self._known, marker
        if lost:
            log.error("STORE STATE LOST: the Redis store at %s (namespace %s) came back without the "
                      "state this gateway knew; the team is halted (%s) until someone resumes",
                      self.host, self.namespace, STATE_LOST)
        elif previous:
            log.warning("the Redis store's marker changed; a loss of its state was already "
                        "recorded by another gateway")
        self._save_marker(marker)

    def _read_marker(self):
        if self._marker_path is None:
            return None
        try:
            with open(self._marker_path, encoding="utf-8") as fh:
                saved = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("cannot read the store marker %s (%s): a loss of Redis's state while this "
                        "gateway was down would go unnoticed", self._marker_path, err)
            return None
        if (isinstance(saved, dict) and saved.get("namespace") == self.namespace
                and saved.get("host") == self.host and isinstance(saved.get("marker"), str)):
            return saved["marker"]
        return None                 # another store: its marker says nothing about this one

    def _save_marker(self, marker):
        if self._marker_path is None:
            return
        data = {"namespace": self.namespace, "host": self.host, "marker": marker}
        try:
            write_atomic(self._marker_path, json.dumps(data).encode())
        except OSError as err:
            log.warning("cannot save the store marker to %s (%s): a loss of Redis's state while "
                        "this gateway is down would go unnoticed", self._marker_path, err.strerror or err)

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _heartbeat(self):
        while not self._stop.wait(self.ttl_ms / 3000):
            with self._lock:
                ids, pending, self._pending = list(self._in_flight), self._pending, []
            try:
                lost = self.refresh(ids)
                if lost:
                    log.warning("%d budget reservations of this gateway expired in Redis before they "
                                "were settled; their costs still count when they are", len(lost))
                    with self._lock:
                        self._in_flight.difference_update(lost)
                while pending:
                    self._replay(pending[0])
                    pending.pop(0)
            except StoreUnavailable as err:
                log.debug("heartbeat: %s", err)
            if pending:
                with self._lock:
                    self._pending[:0] = pending

    def _replay(self, entry):
        """Retry a settle kept while Redis was unavailable."""
        hold_id, account, micro, cap = entry
        self._settle(hold_id, account, micro, (), cap)

    def _listen(self, callback):
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._channel)
                backoff = 0.1
                heard = pinged = time.monotonic()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    clock = time.monotonic()
                    if message is not None:
                        heard = clock
                        if message["type"] == "message":
                            self._deliver(callback, message["data"])
                    if clock - pinged >= PING_EVERY_S:
                        pubsub.ping()
                        pinged = clock
                    if clock - heard > 3 * PING_EVERY_S:
                        raise self._redis.ConnectionError("no answer to pings")
            except (self._redis.RedisError, OSError) as err:
                log.debug("store events: %s; reconnecting", self._scrub(str(err)))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except (self._redis.RedisError, OSError) as err:
                    log.debug("store events: closing: %s", self._scrub(str(err)))

    def _deliver(self, callback, data):
        try:
            event = json.loads(data)
        except ValueError:
            log.debug("store events: ignoring a message that is not JSON")
            return
        if not isinstance(event, dict) or event.get("gateway") == self.gateway_id:
            return
        try:
            callback(event)
        except Exception:           # the listener must outlive a bad callback; say so loudly
            log.exception("store event callback failed")


def _no_client_info(redis):
    """Connection options that skip CLIENT SETINFO (newer redis-py: driver_info=None)."""
    params = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    return {"driver_info": None} if "driver_info" in params else {"lib_name": None, "lib_version": None}


def _halt_key(key):
    return "*" if key is None else key


def _crossing_field(key, metric):
    return json.dumps([_halt_key(key), metric])


def _budget_args(budget):
    field = _crossing_field(*budget.crossing) if budget.crossing else ""
    return [budget.scope, budget.window_ms, budget.limit_micro, field]


def _spends(budgets, numbers):
    return {budget.id: Spend(numbers[3 * i], numbers[3 * i + 1], numbers[3 * i + 2] or None)
            for i, budget in enumerate(budgets)}


def _url_password(url):
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def open_store(config, *, marker_path=None, gateway_id=None):
    """The store `config` (config.StoreConfig) names: None for the file store, else a
    RedisStore. Raises MissingDependency when the redis package is not installed."""
    if config.url == "file":
        return None
    return RedisStore(config, marker_path=marker_path, gateway_id=gateway_id)
