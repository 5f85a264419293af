"""Search-budget accounting, free of I/O: the day a search counts in, and a local ledger.

A key's budget is N external searches per UTC day (`--search-budget-per-day`, per-key
overrides in `--keys-file`). The day is a fixed window named by its date, so every replica
counts a search in the same window whatever its own clock says within a few seconds, and a
window's counter expires by itself a day after it ends. The `BudgetLedger` is the count
kept in process: the only one without Redis, and each replica's own when Redis is out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cachetools import LRUCache

DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    day: str  # "2025-01-31", UTC
    resets_at: int  # epoch seconds of the next UTC midnight

    def seconds_left(self, now: float) -> int:
        return max(1, int(self.resets_at - now))

    @property
    def ttl_s(self) -> int:
        """How long a counter of this window is kept: to its end, and a day more for
        replicas whose clocks are behind."""
        return DAY_S * 2


def window_at(now: float) -> BudgetWindow:
    """The UTC day `now` (epoch seconds) falls in."""
    start = int(now // DAY_S) * DAY_S
    return BudgetWindow(time.strftime("%Y-%m-%d", time.gmtime(start)), start + DAY_S)


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    allowed: bool
    used: int  # searches counted in the window, this one included when allowed
    limit: int


def verdict(used_before: int, limit: int) -> BudgetVerdict:
    """Whether one more search fits under `limit` when `used_before` are counted."""
    if used_before < limit:
        return BudgetVerdict(True, used_before + 1, limit)
    return BudgetVerdict(False, used_before, limit)


class BudgetLedger:
    """Searches counted per (key digest, day), in process; bounded like the rate buckets so
    that a flood of keys cannot grow memory without end."""

    def __init__(self, max_clients: int = 10_000) -> None:
        self._used: LRUCache[tuple[bytes, str], int] = LRUCache(maxsize=max_clients)

    def used(self, client: bytes, day: str) -> int:
        return self._used.get((client, day), 0)

    def take(self, client: bytes, day: str, limit: int) -> BudgetVerdict:
        result = verdict(self.used(client, day), limit)
        if result.allowed:
            self._used[(client, day)] = result.used
        return result

    def count(self, client: bytes, day: str) -> None:
        """Mirror a search another store allowed, so that this replica's own count is right
        should that store go away later in the day."""
        self._used[(client, day)] = self.used(client, day) + 1

    def refund(self, client: bytes, day: str) -> None:
        used = self.used(client, day)
        if used > 0:
            self._used[(client, day)] = used - 1
