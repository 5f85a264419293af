"""What the loop asks before it spends an external search: a key's search budget.

The server decides who pays (an API key, counted per day, maybe across replicas through
Redis); the loop only asks. `take()` says whether one more external search may go out and,
when it may, counts it; `refund()` gives the unit back when the search turned out to cost
no provider call (a cache hit, or nothing sent). A denied search is self-filled, and its
trace record says `fallback: "budget"`. Never raises: a store that cannot answer lets the
search go (the server fails open for budgets).
"""

from __future__ import annotations

from typing import Final, Protocol

# The `fallback` of a search the policy sent out but the key's budget kept in.
BUDGET_FALLBACK: Final = "budget"
BUDGET_NOTE: Final = (
    "the API key's search budget is spent: searches the policy sent to the search backend "
    'were self-filled (fallback "budget")'
)


class SearchAllowance(Protocol):
    async def take(self) -> bool: ...

    async def refund(self) -> None: ...
