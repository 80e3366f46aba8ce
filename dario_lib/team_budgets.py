"""Spend budgets for a team of gateways, kept in the Redis store (`store.url = redis://…`).

`budgets.Budgets`' rules, for the team: a guarded request's worst case is reserved by
`team.TeamGuard.admit` in the same round trip as its halt check (the store's `gate`);
`TeamBudgets` settles it with the metered cost (idempotent; a settle Redis cannot take
now is kept by the store and retried), records each budget's level through the guard in
one round trip (so a warning or a halt fires on the one gateway whose settle crossed),
and reports the team's spend. Amounts are integer micro-dollars in Redis, compared as
such; windows run on Redis's clock.

Thread-safe: the last spend seen (what /status shows while Redis is down) is behind a
lock; store calls happen outside it.
"""

import logging
import threading

from . import guardtext
from .budgets import budget_detail
from .redis_store import MICRO, BudgetRef, StoreUnavailable

log = logging.getLogger(__name__)


class TeamBudgets:
    """The team's budgets; `guard` is the gateway's team.TeamGuard."""

    def __init__(self, budgets, store, guard):
        self.budgets = tuple(budgets)
        self._store = store
        self._guard = guard
        self._lock = threading.Lock()
        self._last = {}             # budget id -> Spend: what /status shows while Redis is down

    @property
    def active(self):
        return bool(self.budgets)

    def _ref(self, budget):
        key = None if budget.account == "*" else self._guard._key(budget.account)
        return BudgetRef.of(budget, key)

    def refs(self, account):
        """The BudgetRefs of every budget that counts this account's spend."""
        return tuple(self._ref(b) for b in self.budgets if b.account in ("*", account))

    def start(self):
        """Trip any budget already spent."""
        if not self.active:
            return
        refs = [self._ref(b) for b in self.budgets]
        try:
            spends = self._store.spent(refs)
        except StoreUnavailable:
            return
        self._evaluate(list(zip(self.budgets, refs)), spends, {})

    def settle(self, reservation, account, usd, request):
        """Replace a reservation with the metered cost (idempotent); trip on a crossing."""
        pairs = [(b, self._ref(b)) for b in self.budgets if b.account in ("*", account)]
        try:
            spends = self._store.settle(reservation, account, usd, [ref for _, ref in pairs])
        except StoreUnavailable as err:
            log.debug("settle deferred (the store retries it): %s", err)
            return
        self._evaluate(pairs, spends, request)

    def crossed(self, ref):
        """Record the crossing of a budget found past its limit; the Halt made, or None."""
        budget = self._budget(ref.id)
        try:
            spend = self._store.spent([ref])[ref.id]
        except StoreUnavailable:
            return None
        return None if budget is None else self._evaluate([(budget, ref)], {ref.id: spend}, {})

    def refusal_response(self, refusal):
        budget = self._budget(refusal.budget.id)
        public = budget.public() if budget is not None else {"account": refusal.budget.account}
        return guardtext.refusal_response(public, refusal.spent_micro / MICRO, refusal.reserved_micro / MICRO)

    def status(self):
        """Each budget with the team's spend, as Budgets.status(); the last seen while Redis is down."""
        if not self.active:
            return []
        refs = [self._ref(b) for b in self.budgets]
        try:
            spends = self._store.spent(refs)
            with self._lock:
                self._last.update(spends)
        except StoreUnavailable:
            with self._lock:
                spends = dict(self._last)
        out = []
        for budget, ref in zip(self.budgets, refs):
            spend = spends.get(ref.id)
            spent, reserved = (spend.spent_micro, spend.reserved_micro) if spend else (0, 0)
            out.append(dict(budget.public(), spentUsd=round(spent / MICRO, 6), reservedUsd=round(reserved / MICRO, 6)))
        return out

    def _budget(self, budget_id):
        for budget in self.budgets:
            if BudgetRef.of(budget).id == budget_id:
                return budget
        return None

    def _evaluate(self, pairs, spends, request):
        """Record each budget's level (one round trip); the Halt made, or None."""
        crossings = []
        with self._lock:
            self._last.update(spends)
        for budget, ref in pairs:
            spend = spends[ref.id]
            # Levels in micro-dollars, as the gate compares them (a float could disagree at the limit).
            spent = spend.spent_micro
            level = ("halt" if spent >= ref.limit_micro else
                     "warn" if spent >= ref.limit_micro * budget.warn_at else None)
            crossings.append((*ref.crossing, level, guardtext.BUDGET_WARNING,
                              guardtext.BUDGET, budget_detail(budget, spent / MICRO), spend.roll_ms))
        return self._guard.record(crossings, request) if crossings else None
