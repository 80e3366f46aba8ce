"""One guard for a team of gateways: the guard and the budgets kept in the Redis store.

With `store.url = redis://…` every gateway on the same Redis and `store.namespace` shares
one guard. `TeamGuard` keeps `guard.Guard`'s promises and interface (admit, observe,
cross, halts, clear, start, close) with the state in Redis (`redis_store.py` has the
store's own guarantees); `team_budgets.TeamBudgets` does the same for `budgets.Budgets`.

- `admit()` asks the store once per guarded request, right before its upstream send:
  the team's halts and the budget reservation in one round trip (`gate`). Redis runs
  one script at a time, so a request whose gate runs after any gateway wrote a halt is
  blocked, and spend passes a budget by at most one reservation across the team.
- `observe()` and `cross()` write halts and threshold crossings through the store's
  scripts: a halt is set once, a crossing fires on the one gateway that saw it rise.
- A mirror of the team's halts (`_halts`) is kept from what the store answers and from
  the other gateways' events. It says what this gateway has already announced (halts
  are told apart by id), runs the cooldown timers (of all the gateways' timers, the
  store lets one clear a halt), and is this gateway's own view while Redis is down.
- Telling people: the gateway that made an event logs it, notifies and sends it to the
  alert channels; every other gateway hears it (store events, or finds it in Redis),
  relays it on its own event bus with the `gateway` that made it, logs it and rings its
  bell and desktop notification (each may be a person's machine), but sends no alert:
  alert channels fire once per team event.
- Time: halts are stamped on Redis's clock (this gateway's clock plus the offset the
  store's last answer showed), so a cooldown ends at the same instant on every host.
- The extra-usage cap (`overageGuard.allowExtraUsage`) is kept in Redis like a budget:
  each gate passes the cap of the request's halt key (`BudgetRef.cap`), which Redis holds
  only while that key is in extra usage (written by `observe` when an answer's mode
  differs from what the last gate said); a ticket's `TeamSettle` settles the budgets
  through TeamBudgets and the cap's hold and extra-usage cost through the store, then
  records the cap's level (warn, halt) like a budget's. While Redis is down the cap
  cannot be kept: an answer served from extra usage then halts, as without a cap.
- Redis unreachable or slower than `store.timeoutMs`: guarded requests get a retryable
  503 `store_unavailable` (fail closed), or with `store.failOpen` go out on this
  gateway's own view of the halts. A halt this gateway makes meanwhile holds here and
  is written to Redis as soon as it answers; a resume cannot be applied (503). A sync
  thread (every SYNC_S) re-reads the team's halts, writes the pending ones, and notices
  Redis coming back, or coming back empty (`store_state_lost`), without traffic.

Threading: every public method may be called from any thread. The mirror is behind
Guard's lock, held for microseconds; store calls happen outside it. `_sync` orders the
calls that read or remove halts (halts(), clear, cooldown) with their mirror updates,
so a resume made here is never mistaken for one made elsewhere. The store's event
thread calls `_on_event`; `start()` starts the sync thread and `close()` joins it.
"""

import collections
import logging
import threading
from types import MappingProxyType

from . import guardtext, statefile, wire
from .budgets import EXTRA_METRIC, Ticket, cap_detail
from .guard import ALL, GO, OVERAGE, Guard, Halt, Verdict, _billing_signal, _run, extra_usage_mode
from .redis_store import ALL as STORE_ALL, MICRO, STATE_LOST, BudgetRef, Reserve, StoreUnavailable, new_id

log = logging.getLogger(__name__)

SYNC_S = 2.0                    # how often the sync thread re-reads the team's halts
FAIL_OPEN_LINE_S = 60           # the loud line while failing open, at most this often
UNAVAILABLE_RETRY_S = 5
RANK = {None: 0, "warn": 1, "halt": 2}
_TEXT = 200                     # longest id, gateway or label taken from Redis


def _text(value, default=None):
    return value[:_TEXT] if isinstance(value, str) and value else default


def _key_of(data):
    """The halt key a halt dict is kept under: its account label, or None (the team)."""
    return _text(data.get("account"))


def _time(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= statefile.MAX_TIME_MS:
        return None
    return value


class TeamGuard(Guard):
    def __init__(self, config, store, *, fail_open=False, sync_s=SYNC_S, **kwargs):
        """`store` is a redis_store.RedisStore; the other arguments are Guard's (no state
        file: the store replaces it)."""
        super().__init__(config, state_file=None, **kwargs)
        self.store = store
        self.gateway_id = store.gateway_id
        self.fail_open = fail_open
        self._sync_s = sync_s
        self._offset_ms = 0             # Redis's clock minus this gateway's, as last seen
        self._unwritten = set()         # keys of halts made here while Redis was unreachable
        self._gone = collections.deque(maxlen=256)   # ids of halts resumed lately: never mirrored again
        self._proposed = collections.deque(maxlen=256)   # ids of halts this gateway offered the store
        self._sync = threading.Lock()
        self._down = False
        self._open_line_at = None       # clock seconds of the last fail-open line
        self._stop = threading.Event()
        self._thread = None
        self._cap_rows = []             # the extra-usage cap's last status read from Redis

    def _now_ms(self):
        return int(self._clock() * 1000) + self._offset_ms

    def _learn_time(self, now_ms):
        if isinstance(now_ms, int):
            self._offset_ms = now_ms - int(self._clock() * 1000)

    # -- the request path --------------------------------------------------------

    def admit(self, account=None, budgets=None, worst_usd=0.0):
        """As Guard.admit, in one round trip to the store (see the module docstring)."""
        if self._unwritten and not self._down:
            self._write_pending()
        reserve = None
        refs = budgets.refs(account) if budgets is not None and budgets.active else ()
        cap = self._cap_ref(account)
        if refs or cap is not None:
            reserve = Reserve(new_id(), worst_usd, refs + ((cap,) if cap is not None else ()))
        try:
            gate = self.store.gate(account, reserve)
        except StoreUnavailable:
            return self._unavailable(account, budgets, worst_usd)
        self._learn_time(gate.now_ms)
        if self._down:
            self._back()
        if cap is not None and gate.extra_mode is not None:
            with self._lock:
                self._extra[cap.crossing[0]] = gate.extra_mode
        ticket = None
        if gate.reserved or cap is not None:
            # With a cap every request settles: its answer may turn out to be extra usage.
            settler = TeamSettle(self, budgets if gate.reserved else None, cap, gate.cap_held)
            ticket = Ticket(settler, reserve.id, worst_usd, gate.cap_held)
        if gate.halts or gate.cleared or self._unwritten:
            halt = self._learn_gate(gate, account)
            if halt is not None:
                if ticket is not None:
                    ticket.settle(account, 0.0, {})       # held by a halt only this gateway knows yet
                return Verdict(self.blocked_response(halt))
        if gate.refusal is not None:
            return self._refused(budgets, gate.refusal)
        return Verdict(None, ticket) if ticket is not None else GO

    def _unavailable(self, account, budgets, worst_usd):
        self._note_down()
        if not self.fail_open:
            return Verdict(guardtext.unavailable_response(self.store.host, UNAVAILABLE_RETRY_S))
        with self._lock:
            halt = self._halts.get(None) or (self._halts.get(account) if account is not None else None)
            now = self._clock()
            say = self._open_line_at is None or now - self._open_line_at >= FAIL_OPEN_LINE_S
            if say:
                self._open_line_at = now
        if say:
            log.warning("FAIL OPEN: the Redis store at %s is unavailable; guarded requests are forwarded on "
                        "this gateway's own view of the halts (store.failOpen), without the team's budgets",
                        self.store.host)
        if halt is not None:
            return Verdict(self.blocked_response(halt))
        counted = budgets is not None and budgets.active and bool(budgets.refs(account))
        cap = self._cap_ref(account)
        if counted or cap is not None:
            # No reservation: its cost is settled when the store answers again (the store
            # keeps failed settles and retries them).
            return Verdict(None, Ticket(TeamSettle(self, budgets if counted else None, cap, False), None, worst_usd))
        return GO

    def _refused(self, budgets, refusal):
        if refusal.budget.extra:
            if refusal.spent_micro >= refusal.budget.limit_micro:
                halt = self._record_cap(refusal.budget, None, {})       # records the crossing: halts
                if halt is not None:
                    return Verdict(self.blocked_response(halt))
            cap = self.config.allow_extra_usage
            public = dict(cap.public() if cap is not None else {}, account=refusal.budget.account)
            return Verdict(guardtext.cap_refusal_response(public, refusal.spent_micro / MICRO,
                                                          refusal.reserved_micro / MICRO))
        if refusal.spent_micro >= refusal.budget.limit_micro:
            # Spend is past the limit but the crossing is not recorded yet (the settle that
            # crossed is still on its way): record it here, which halts the team.
            halt = budgets.crossed(refusal.budget)
            if halt is not None:
                return Verdict(self.blocked_response(halt))
        return Verdict(budgets.refusal_response(refusal))

    def _learn_gate(self, gate, account):
        """Mirror what a gate answered; the halt that blocks `account`, or None."""
        actions, blocking = [], None
        with self._lock:
            for data in gate.cleared:
                self._resumed_locked(self._resume_event(data, "cooldown", gate.now_ms), True, actions)
            for data in gate.halts:
                if isinstance(data, dict):
                    blocking = blocking or self._learn_locked(data, "remote", actions)
            if blocking is None:
                # A halt made here while Redis was unreachable, not written yet.
                for key in (None, account):
                    if key in self._unwritten:
                        blocking = self._halts[key]
                        break
        _run(actions)
        return blocking

    def observe(self, rate, request):
        """As Guard.observe: halts and crossings go through the store (one round trip each)."""
        config = self.config
        signal = _billing_signal(rate)
        overage = config.enabled and signal is not None
        key = self._key(request.get("account"))
        cap = self._cap_ref(request.get("account"))
        # While Redis is down the cap cannot be kept: extra usage halts, as without a cap.
        mode = extra_usage_mode(rate) if cap is not None and not self._down else None
        if mode is not None:
            self._extra_mode(cap, mode)
            if mode:
                overage = False             # under the cap: the settle counts it
        crossings = self._crossings(rate)
        if not overage and not crossings:
            return None
        halt = None
        if overage:
            detail = {"claim": rate.get("claim"), "signal": signal}
            if config.behavior == "warn":
                self._warn(OVERAGE, request, detail)
            else:
                # Always asked (set if absent): the mirror may not know of a resume yet.
                halt = self._put(key, OVERAGE, request, detail)
        if crossings:
            halt = self.record([(key, *crossing, None) for crossing in crossings], request) or halt
        return halt

    # -- the extra-usage cap --------------------------------------------------------

    def _cap_ref(self, account):
        """The extra-usage cap of this account's halt key, as the store keeps it, or None."""
        cap = self.extra_usage_cap
        return None if cap is None else BudgetRef.cap(cap, self._key(account), EXTRA_METRIC)

    def _extra_mode(self, cap, mode):
        """Tell the team this key's answers are (or are no longer) served from extra usage;
        a round trip only when the last gate said otherwise."""
        key = cap.crossing[0]
        with self._lock:
            if self._extra.get(key, False) == mode:
                return
        try:
            previous = self.store.extra_mode(cap, mode)
        except StoreUnavailable as err:
            log.debug("extra-usage mode not recorded: %s", err)
            return
        with self._lock:
            self._extra[key] = mode
        if previous != mode:
            whom = "all traffic" if key is None else f"account {key}"
            if mode:
                config = self.config.allow_extra_usage
                log.warning("EXTRA USAGE: answers for %s are served from extra usage; the team goes on up to "
                            "the cap (overageGuard.allowExtraUsage: $%.2f per %s)", whom, config.usd, config.window)
            else:
                log.info("answers for %s come from the subscription again", whom)

    def settle_cap(self, cap, reservation, account, usd, request):
        """Settle a request's part of the extra-usage cap (see TeamSettle); trip on a crossing."""
        try:
            spend = self.store.settle_cap(reservation, account, usd, cap)
        except StoreUnavailable as err:
            log.debug("cap settle deferred (the store retries it): %s", err)
            return
        if usd > 0:
            self._record_cap(cap, spend, request)

    def _record_cap(self, cap, spend, request):
        """Record the cap's level (`spend`: its Spend, None: read it now); the Halt made, or None."""
        config = self.config.allow_extra_usage
        if config is None:
            return None
        if spend is None:
            try:
                spend = self.store.spent([cap])[cap.id]
            except StoreUnavailable:
                return None
        spent = spend.spent_micro
        level = ("halt" if spent >= cap.limit_micro else
                 "warn" if spent >= cap.limit_micro * config.warn_at else None)
        detail = cap_detail(config.budget(cap.account), spent / MICRO)
        return self.record([(*cap.crossing, level, guardtext.EXTRA_WARNING, guardtext.EXTRA_CAP, detail,
                             spend.roll_ms)], request)

    def extra_usage_status(self, budgets=None):
        """The team's extra-usage cap and its spend (as Guard.extra_usage_status), the last
        seen while Redis is down; None without a cap."""
        cap = self.extra_usage_cap
        if cap is None:
            return None
        account_scope = self.config.scope == "account"
        try:
            rows = self.store.cap_status(cap.window_ms, account_scope)
        except StoreUnavailable:
            with self._lock:
                rows = list(self._cap_rows)
        else:
            with self._lock:
                self._cap_rows = rows
        return dict(cap.public(), scope="account" if account_scope else "proxy",
                    caps=[{"account": label, "spentUsd": round(spent / MICRO, 6),
                           "reservedUsd": round(reserved / MICRO, 6), "inExtraUsage": mode}
                          for label, spent, reserved, mode in rows])

    def cross(self, account, metric, level, request, detail, warn_reason, halt_reason, cooldown_until=None):
        """A threshold trip from outside: fires on the one gateway that saw it rise."""
        return self.record([(self._key(account), metric, level, warn_reason, halt_reason, detail,
                             cooldown_until)], request)

    def record(self, crossings, request):
        """Record threshold levels in one round trip and fire the ones that rose (once per
        team: the store returns each previous level atomically). `crossings`: (key, metric,
        level, warn reason, halt reason, detail, cooldown_until or None). Every level is
        written, "under" too: a level left standing would keep the next crossing from
        firing, and a budget's level is what the gate trusts past the limit. Returns the
        Halt made, or None."""
        items = [(key, metric, level, self._template(key, halt_reason, request, detail, until)
                  if level == "halt" else None)
                 for key, metric, level, _, halt_reason, detail, until in crossings]
        try:
            results = self.store.crosses(items)
        except StoreUnavailable:
            results = None              # this gateway's own crossings, for now
        halt = None
        for n, (key, metric, level, warn_reason, _, detail, _) in enumerate(crossings):
            with self._lock:
                previous = self._levels.get((key, metric))
                if level is None:
                    self._levels.pop((key, metric), None)
                else:
                    self._levels[(key, metric)] = level
            created = None
            if results is not None:
                previous, created = results[n]
            if RANK[level] <= RANK.get(previous, 0):
                continue                # once per crossing
            if level == "warn":
                self._warn(warn_reason, request, detail)
            elif results is None:
                halt = self._halt_here(items[n][3]) or halt
            elif created is not None:
                actions = []
                with self._lock:
                    halt = self._learn_locked(created, "made", actions)
                _run(actions)
        return halt

    def _put(self, key, reason, request, detail):
        template = self._template(key, reason, request, detail)
        try:
            created, current = self.store.put_halt(key, template)
        except StoreUnavailable:
            return self._halt_here(template)
        actions = []
        with self._lock:
            halt = self._learn_locked(current, "made" if created else "remote", actions)
        _run(actions)
        return halt if created else None

    def _template(self, key, reason, request, detail, cooldown_until=None):
        """A new halt's dict (Halt.public() plus id and gateway), stamped on Redis's clock."""
        since = self._now_ms()
        if cooldown_until is None and self.config.cooldown_ms > 0:
            cooldown_until = since + self.config.cooldown_ms
        halt_id = new_id()
        with self._lock:
            self._proposed.append(halt_id)
        return {"since": since, "cooldownUntil": cooldown_until, "reason": reason, "request": dict(request),
                "account": key, "detail": dict(detail or {}), "id": halt_id, "gateway": self.gateway_id}

    def _halt_here(self, template):
        """Redis is unreachable: the halt holds on this gateway until it can be written."""
        actions = []
        with self._lock:
            key = template["account"]
            if key in self._halts:
                return None
            halt = self._mirror_locked(self._halt_of(template))
            self._unwritten.add(key)
            self.trips[halt.reason] = self.trips.get(halt.reason, 0) + 1
            self._publish("overage_halt", halt.public())
            actions.append(lambda: self._announce_halt(halt))
            actions.append(lambda: log.error(
                "the Redis store at %s is unavailable: this halt holds on this gateway only, until it can "
                "be written there (tried again with every request and every %ss)", self.store.host, self._sync_s))
        _run(actions)
        return halt

    def _write_pending(self):
        """Write the halts made while Redis was unreachable (a no-op while it still is)."""
        with self._lock:
            pending = [(key, self._halts[key]) for key in self._unwritten]
        for key, halt in pending:
            try:
                created, current = self.store.put_halt(key, halt.public())
            except StoreUnavailable:
                return
            actions = []
            with self._lock:
                if self._halts.get(key) is not halt:
                    continue            # resumed meanwhile
                self._unwritten.discard(key)
                if not created and current.get("id") != halt.id:
                    # The team had a halt for this key already: it takes this one's place.
                    self._forget_locked(key)
                    self._learn_locked(current, "remote", actions)
            _run(actions)
            if created:
                log.warning("the halt made while the Redis store was unavailable is now the team's")

    def _warn(self, reason, request, detail):
        event = {"timestamp": self._now_ms(), "reason": reason, "request": dict(request),
                 "detail": dict(detail or {}), "gateway": self.gateway_id}
        with self._lock:
            self.warnings += 1
            self._publish("overage_warn", event)
            notify = self._may_notify_locked(reason)
        self._announce_warn(event, notify)
        try:
            self.store.publish("overage_warn", event)
        except StoreUnavailable as err:
            log.debug("the warning was not sent to the other gateways: %s", err)

    # -- reading and resuming ----------------------------------------------------

    def halts(self):
        """Every team halt (immutable) as Redis has them; this gateway's view while it is down."""
        with self._sync:
            with self._lock:
                seen = self._generation
            try:
                found = self.store.halts()
            except StoreUnavailable:
                found = None
            if found is not None:
                self._reconcile(found, "remote", seen)
        with self._lock:
            return tuple(sorted(self._halts.values(), key=lambda h: (h.account is not None, h.since)))

    def clear(self, reason="manual", account=ALL):
        """Resume the team (all halts, or one account's). Returns (was_halted, resumed_at_ms).
        Raises wire.HttpError 503 when Redis is unreachable: nothing was resumed."""
        actions = []
        with self._sync:
            try:
                removed, now = self.store.clear_halt(STORE_ALL if account is ALL else account, reason=reason)
            except StoreUnavailable as err:
                raise wire.HttpError(503, f"{err}; nothing was resumed: retry once it answers",
                                     headers={"Retry-After": str(UNAVAILABLE_RETRY_S)}) from None
            self._learn_time(now)
            with self._lock:
                for data in removed:
                    self._resumed_locked(self._resume_event(data, reason, now), True, actions)
                pending = [key for key in self._unwritten if account is ALL or key == account]
                for key in pending:
                    self._resumed_locked(self._resume_event(self._halts[key].public(), reason, now), True, actions)
        _run(actions)
        return bool(removed or pending), now

    def _on_cooldown(self, key, generation):
        """A cooldown timer fired: clear that halt in Redis, unless another gateway did."""
        with self._lock:
            halt = self._halts.get(key)
            if halt is None or halt.generation != generation:
                return
            local = key in self._unwritten
        actions = []
        with self._sync:
            if local:
                removed, now = [halt.public()], self._now_ms()     # never written: only here to clear
            else:
                try:
                    removed, now = self.store.clear_halt(key, expect_id=halt.id, reason="cooldown")
                except StoreUnavailable:
                    # Redis clears it at its next look (a gate), once; here it ends now, so
                    # a gateway failing open forwards again.
                    with self._lock:
                        if self._halts.get(key) is halt:
                            self._forget_locked(key)
                    return
            with self._lock:
                for data in removed:
                    self._resumed_locked(self._resume_event(data, "cooldown", now), True, actions)
        _run(actions)

    def start(self):
        """Listen to the other gateways, start the store's heartbeat and the sync thread,
        and adopt the team's halts (a gateway started while Redis is down says so)."""
        self.store.subscribe(self._on_event)
        self.store.start()
        self._sync_once("start")
        self._thread = threading.Thread(target=self._sync_loop, name="dario-team-sync", daemon=True)
        self._thread.start()

    def reconfigure(self, config):
        """New settings (config reload). The team's halts stay: one gateway's settings do
        not resume the others (`dario resume` does)."""
        with self._lock:
            self.config = config

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._unwritten:
            self._write_pending()
            if self._unwritten:
                log.error("the Redis store at %s is unavailable: %d halt(s) made by this gateway could not be "
                          "written there and end with it", self.store.host, len(self._unwritten))
        super().close()
        self.store.close()

    def status(self):
        """The store for /status: kind, namespace, host (no credentials), up, round trip."""
        return dict(self.store.status(), failOpen=self.fail_open)

    # -- keeping in step with the team -------------------------------------------

    def _sync_loop(self):
        while not self._stop.wait(self._sync_s):
            try:
                self._sync_once("remote")
            except Exception:       # the loop must outlive a bug; say so loudly
                log.exception("the team store sync failed; retrying in %ss", self._sync_s)

    def _sync_once(self, how):
        """Check the marker (lost state), write pending halts, re-read every halt."""
        try:
            gate = self.store.gate(None)
            self._learn_time(gate.now_ms)
            if gate.state_lost or gate.cleared:
                self._learn_gate(gate, None)
            if self._unwritten:
                self._write_pending()
            with self._sync:
                with self._lock:
                    seen = self._generation
                self._reconcile(self.store.halts(), how, seen)
        except StoreUnavailable:
            self._note_down()
            return
        if self._down:
            self._back()

    def _reconcile(self, found, how, seen):
        """Make the mirror what Redis held (events may have been missed). `seen`: the
        generation before Redis was read; halts mirrored since are newer than the read."""
        actions = []
        with self._lock:
            present = set()
            for data in found.values():
                if isinstance(data, dict):
                    present.add(_key_of(data))
                    self._learn_locked(data, how, actions)
            for key in [k for k, h in self._halts.items()
                        if k not in present and k not in self._unwritten and h.generation <= seen]:
                event = dict(self._resume_event(self._halts[key].public(), "external", self._now_ms()), gateway=None)
                self._resumed_locked(event, False, actions)
        _run(actions)

    def _on_event(self, message):
        """An event of another gateway (the store's event thread)."""
        kind, data, origin = message.get("type"), message.get("data"), _text(message.get("gateway"))
        if not isinstance(data, dict):
            return
        actions = []
        with self._lock:
            if kind == "overage_halt":
                self._learn_locked(data, "remote", actions)
            elif kind == "overage_resume":
                self._resumed_locked(dict(data, gateway=origin), False, actions)
            elif kind == "overage_warn":
                event = dict(data, gateway=origin)
                self._publish("overage_warn", event)
                reason = event.get("reason")
                notify = self._may_notify_locked(reason if reason in guardtext.REASON_NAMES else "other")
                actions.append(lambda: self._told_warn(event, notify))
        _run(actions)

    def _note_down(self):
        with self._lock:
            if self._down:
                return
            self._down = True
            self._open_line_at = self._clock()
        if self.fail_open:
            log.warning("FAIL OPEN: the Redis store at %s is unavailable; guarded requests are forwarded on "
                        "this gateway's own view of the halts (store.failOpen) until it answers", self.store.host)
        else:
            log.warning("STORE UNAVAILABLE: guarded requests get 503 (store_unavailable) until the Redis store "
                        "at %s answers (store.failOpen is off)", self.store.host)

    def _back(self):
        with self._lock:
            if not self._down:
                return
            self._down = False
            self._open_line_at = None
        log.warning("the Redis store at %s answers again: guarded requests go through the team's guard",
                    self.store.host)

    # -- the mirror (all called with the lock held) ------------------------------

    def _learn_locked(self, data, how, actions):
        """Mirror a team halt; tell people once per halt id. `how`: "made" (this gateway
        made it: log, notify, alert), "remote" (log, notify) or "start" (one line). A
        halt this gateway made counts as made whichever way it is learnt first (a gate on
        another request thread may see it before the call that wrote it returns).
        Returns the Halt now mirrored for its key."""
        key, halt_id = _key_of(data), _text(data.get("id"))
        if halt_id in self._proposed or (data.get("reason") == STATE_LOST and data.get("gateway") == self.gateway_id):
            how = "made"
        current = self._halts.get(key)
        if current is not None and current.id == halt_id:
            return current
        if halt_id in self._gone:
            # Resumed since it was read (a gate or a read raced the resume): it still
            # blocks the request that read it, but is no longer the team's.
            return self._halt_of(data)
        if current is not None:
            if key in self._unwritten:
                self._forget_locked(key)    # never written: the team's halt takes its place
            else:
                self._resumed_locked(self._resume_event(current.public(), "replaced", self._now_ms()), False,
                                     actions)
        halt = self._mirror_locked(self._halt_of(data))
        self._publish("overage_halt", halt.public())
        if how == "made":
            self.trips[halt.reason] = self.trips.get(halt.reason, 0) + 1
            actions.append(lambda: self._announce_halt(halt))
        elif how == "remote":
            actions.append(lambda: self._told_halt(halt))
        else:
            actions.append(lambda: log.warning("%s", guardtext.starting_halted_line(halt.public(),
                                                                                     self.resume_command)))
        return halt

    def _halt_of(self, data):
        """A Halt from a halt dict (read defensively: anyone with access to Redis wrote it)."""
        self._generation += 1
        since = _time(data.get("since"))
        since = self._now_ms() if since is None else since
        until = _time(data.get("cooldownUntil"))
        if until is not None and not 0 <= until - since <= statefile.MAX_COOLDOWN_MS:
            until = None                # nonsense: only a person resumes it
        request, detail = data.get("request"), data.get("detail")
        return Halt(since, until, _text(data.get("reason"), OVERAGE)[:64], _frozen(request), self._generation,
                    _key_of(data), _frozen(detail), _text(data.get("id"), new_id()), _text(data.get("gateway"), "?"))

    def _mirror_locked(self, halt):
        self._halts[halt.account] = halt
        if halt.cooldown_until is not None:
            self._start_timer_locked(halt)
        return halt

    def _forget_locked(self, key):
        self._halts.pop(key, None)
        self._unwritten.discard(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _resume_event(self, removed, reason, resumed_at):
        return {"reason": reason, "previousSince": removed.get("since"), "resumedAt": resumed_at,
                "account": _key_of(removed), "previousReason": removed.get("reason"),
                "id": _text(removed.get("id")), "gateway": self.gateway_id}

    def _resumed_locked(self, event, made, actions):
        """A team halt was removed (`event`: its resume event). Forget it, relay the event,
        and tell people if this gateway made it or knew the halt."""
        key = _text(event.get("account"))
        current = self._halts.get(key)
        halt_id = _text(event.get("id"))
        known = current is not None and current.id == halt_id
        if known:
            self._forget_locked(key)
        if halt_id is not None:
            self._gone.append(halt_id)
        self._publish("overage_resume", event)
        if known or made:
            public = current.public() if known else {"since": event.get("previousSince"), "account": key,
                                                     "reason": event.get("previousReason")}
            actions.append(lambda: self._told_resume(public, event, made))

    # -- telling people ----------------------------------------------------------

    def _told_halt(self, halt):
        public = halt.public()
        where = (f"the team store {self.store.host} (namespace {self.store.namespace}); "
                 f"made by gateway {halt.gateway}")
        log.warning("%s", guardtext.shared_halt_line(public, where, self.resume_command))
        if self._notifier is not None:
            self._notifier.notify(*guardtext.halt_notification(public, self.resume_command))

    def _told_resume(self, public, event, made):
        line = guardtext.resume_line(public, event)
        if made:
            log.warning("%s", line)
            self._alert("resume", event)
        else:
            log.warning("%s, on gateway %s", line, event.get("gateway") or "?")

    def _told_warn(self, event, notify):
        log.warning("%s (on gateway %s)", guardtext.warn_line(event), event.get("gateway"))
        if notify and self._notifier is not None:
            self._notifier.notify(*guardtext.warn_notification(event))


def _frozen(value):
    return MappingProxyType(dict(value) if isinstance(value, dict) else {})


class TeamSettle:
    """What a team ticket settles with (budgets.Ticket calls `settle`): the budgets'
    reservation through team_budgets.TeamBudgets, and the request's part of the
    extra-usage cap (its hold, and its cost when the answer was served from extra usage)
    through the store. Two round trips at most; each keeps its own promise (the cap's
    hold stays until its own settle)."""

    def __init__(self, guard, budgets, cap, held):
        self.guard, self.budgets, self.cap, self.held = guard, budgets, cap, held

    def settle(self, reservation, account, usd, request, extra=False):
        if self.budgets is not None:
            self.budgets.settle(reservation, account, usd, request)
        if self.cap is not None and (self.held or (extra and usd > 0)):
            self.guard.settle_cap(self.cap, reservation, account, usd if extra else 0.0, request)
