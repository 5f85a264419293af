"""Each API key's daily budget of external searches (`--search-budget-per-day`, `--keys-file`).

Counted in Redis when `--redis-url` is set, so that every replica spends from one count; in
process otherwise, and, while Redis is out, in each replica's own ledger (which mirrors what
this replica counted in Redis, so it goes on from its own share of the day rather than from
zero). A search is counted before it is sent and given back when it cost no provider call
(a cache hit). Past the budget the self-search loop fills the information itself (trace:
`fallback: "budget"`) and the retrieval routes answer 429; the request never fails for it.

Without API keys a client is its address, as for the rate limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from server.budget_ledger import BudgetLedger, BudgetVerdict, window_at
from server.errors import APIError
from server.key_overrides import KeyOverrides
from server.metrics import HTTPMetrics
from server.shared_state import SharedState, SharedStateUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Spent:
    """One counted search, so that a refund goes back to the day and store it came from."""

    day: str
    shared: bool


class SearchBudget:
    def __init__(
        self,
        default_per_day: int | None,
        overrides: KeyOverrides | None = None,
        shared: SharedState | None = None,
        metrics: HTTPMetrics | None = None,
        clock: Callable[[], float] = time.time,
        ledger: BudgetLedger | None = None,
    ) -> None:
        self.default_per_day = default_per_day
        self.overrides = overrides or KeyOverrides()
        self.shared = shared
        self.metrics = metrics
        self.clock = clock
        self.ledger = ledger or BudgetLedger()
        # Keys already logged as out of budget today: one line per key and day per replica.
        self._told: LRUCache[tuple[bytes, str], bool] = LRUCache(maxsize=10_000)

    @classmethod
    def configured(
        cls,
        default_per_day: int | None,
        overrides: KeyOverrides,
        shared: SharedState | None,
        metrics: HTTPMetrics | None,
    ) -> SearchBudget | None:
        """The budget when any key has one (a default, or an override), else None."""
        if default_per_day is None and all(o.budget_or(None) is None for o in overrides.by_digest.values()):
            return None
        return cls(default_per_day, overrides, shared, metrics)

    def limit_for(self, client: bytes) -> int | None:
        return self.overrides.get(client).budget_or(self.default_per_day)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.search_budget.labels(result).inc()

    async def take(self, client: bytes) -> tuple[BudgetVerdict, Spent | None]:
        """Count one search for `client` if its budget allows: the verdict, and what to hand
        `refund` should the search cost nothing (None when it was denied or is unlimited)."""
        limit = self.limit_for(client)
        if limit is None:
            return BudgetVerdict(True, 0, -1), None
        window = window_at(self.clock())
        result: BudgetVerdict | None = None
        shared = False
        if self.shared is not None:
            try:
                allowed, used = await self.shared.take_search(client, window.day, limit, window.ttl_s)
                result, shared = BudgetVerdict(allowed, used, limit), True
                if allowed:
                    self.ledger.count(client, window.day)
            except SharedStateUnavailable:
                pass
        if result is None:
            result = self.ledger.take(client, window.day, limit)
        if not result.allowed:
            self._count("denied")
            if (client, window.day) not in self._told:
                self._told[(client, window.day)] = True
                logger.warning(
                    "search budget: key %s has spent its %d external searches of %s (UTC); its "
                    "searches are self-filled until midnight UTC",
                    self.overrides.label(client),
                    limit,
                    window.day,
                )
            return result, None
        self._count("spent")
        logger.debug(
            "search budget: key %s, %d of %d searches on %s",
            self.overrides.label(client),
            result.used,
            limit,
            window.day,
        )
        return result, Spent(window.day, shared)

    async def refund(self, client: bytes, spent: Spent) -> None:
        self._count("refunded")
        self.ledger.refund(client, spent.day)
        if spent.shared and self.shared is not None:
            try:
                await self.shared.refund_search(client, spent.day)
            except SharedStateUnavailable:
                pass  # over-counted by one: the safe side of a budget

    async def usage(self, client: bytes) -> dict[str, Any]:
        """The key's own figures for today, for `GET /v1/search_budget`."""
        now = self.clock()
        window = window_at(now)
        limit = self.limit_for(client)
        used, shared = self.ledger.used(client, window.day), False
        if self.shared is not None:
            try:
                used, shared = await self.shared.searches_used(client, window.day), True
            except SharedStateUnavailable:
                pass
        return {
            "object": "search_budget",
            "name": self.overrides.get(client).name,
            "limit": limit,
            "used": used,
            "remaining": None if limit is None else max(0, limit - used),
            "day": window.day,
            "resets_at": window.resets_at,
            "shared": shared,
        }

    def allowance(self, client: bytes) -> KeyAllowance | None:
        """What one request's loop asks before each external search; None when unlimited."""
        if self.limit_for(client) is None:
            return None
        return KeyAllowance(self, client)

    async def spend_or_429(self, client: bytes, searches: int) -> list[Spent]:
        """Count `searches` for a retrieval request, all or none: past the budget, a 429 (the
        retrieval routes have no model to fill in for them)."""
        taken: list[Spent] = []
        for _ in range(searches):
            verdict, spent = await self.take(client)
            if not verdict.allowed:
                for earlier in taken:
                    await self.refund(client, earlier)
                window = window_at(self.clock())
                raise APIError(
                    429,
                    f"This API key has spent its search budget of {verdict.limit} searches for "
                    f"{window.day} (UTC); it resets at midnight UTC.",
                    code="search_budget_exceeded",
                    headers={"Retry-After": str(window.seconds_left(self.clock()))},
                )
            if spent is not None:
                taken.append(spent)
        return taken


@dataclass
class KeyAllowance:
    """One request's view of its key's budget (router.search.allowance.SearchAllowance)."""

    budget: SearchBudget
    client: bytes
    _spent: list[Spent] = field(default_factory=list)

    async def take(self) -> bool:
        verdict, spent = await self.budget.take(self.client)
        if spent is not None:
            self._spent.append(spent)
        return verdict.allowed

    async def refund(self) -> None:
        if self._spent:
            await self.budget.refund(self.client, self._spent.pop())
