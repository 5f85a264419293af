"""Routing policies: for each `<search>` the model writes, call the real search engine
("external") or let the model write the information itself ("internal").

Every policy reads one aggregate of the query's uncertainty (see `router.entropy`). The
per-request cap on external calls is enforced once, in `BasePolicy.decide`, so no policy can
forget it. Pure logic, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, Protocol, runtime_checkable

from router.entropy import QueryEntropy, check_aggregate

Route = Literal["external", "internal"]

POLICIES: Final[tuple[str, ...]] = ("threshold", "ssrl", "budget", "always", "never")
CAP_REACHED: Final = "external call cap reached"

# How each aggregate reads in a decision's reason.
_LABELS: Final[dict[str, str]] = {
    "mean": "mean entropy",
    "max": "max entropy",
    "min_prob": "min token prob",
    "ssrl": "ssrl value",
}


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    # Human-readable why, e.g. "mean entropy 1.234 > tau 0.800" (goes into traces).
    reason: str
    policy: str


@dataclass(frozen=True, slots=True)
class SearchContext:
    """What a policy may know when the model has just closed a `<search>` tag."""

    # 0-based number of this search within the trajectory.
    index: int
    entropy: QueryEntropy
    # Earlier searches of this trajectory, oldest first.
    previous: tuple[QueryEntropy, ...]
    # External calls already made in this trajectory.
    external_calls: int
    # Per-request cap on external calls; None = unlimited.
    max_external_calls: int | None


@runtime_checkable
class Policy(Protocol):
    name: str

    def decide(self, ctx: SearchContext) -> Decision: ...


def _check_tau(tau: float, aggregate: str) -> float:
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau}")
    if aggregate == "min_prob" and not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau is a probability for aggregate 'min_prob'; got {tau}")
    return tau


def exceeds(entropy: QueryEntropy, aggregate: str, tau: float) -> tuple[bool, str]:
    """Whether the query is more uncertain than `tau`, and the comparison as text.

    Entropies and the SSRL term are uncertain when ABOVE tau; min_prob (a probability) is
    uncertain when BELOW it, which keeps tau in the unit FLARE's thresholds are quoted in.
    """
    value = entropy.aggregate(aggregate)
    label = _LABELS[aggregate]
    if aggregate == "min_prob":
        hit = value < tau
        op = "<" if hit else ">="
    else:
        hit = value > tau
        op = ">" if hit else "<="
    return hit, f"{label} {value:.3f} {op} tau {tau:.3f}"


class BasePolicy:
    """Applies the external-call cap, then defers to `_decide`."""

    name: str = "base"

    def decide(self, ctx: SearchContext) -> Decision:
        if ctx.max_external_calls is not None and ctx.external_calls >= ctx.max_external_calls:
            return Decision("internal", CAP_REACHED, self.name)
        route, reason = self._decide(ctx)
        return Decision(route, reason, self.name)

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        raise NotImplementedError


class ThresholdPolicy(BasePolicy):
    """External whenever the query is more uncertain than a fixed tau."""

    name = "threshold"

    def __init__(self, tau: float, aggregate: str = "mean") -> None:
        self.aggregate = check_aggregate(aggregate)
        self.tau = _check_tau(tau, aggregate)

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        hit, text = exceeds(ctx.entropy, self.aggregate, self.tau)
        return ("external" if hit else "internal"), text


class SSRLPolicy(BasePolicy):
    """SSRL's released rule on a correct signal: the first search is external, a later one
    only when it is more uncertain than the search just before it.

    "First" means no previous search in `ctx.previous` (the rule needs that value anyway).
    """

    name = "ssrl"

    def __init__(self, aggregate: str = "mean") -> None:
        self.aggregate = check_aggregate(aggregate)

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        if not ctx.previous:
            return "external", "first search of the trajectory"
        current = ctx.entropy.uncertainty(self.aggregate)
        before = ctx.previous[-1].uncertainty(self.aggregate)
        label = f"{_LABELS[self.aggregate]} uncertainty"
        if current > before:
            return "external", f"{label} {current:.3f} > previous {before:.3f}"
        return "internal", f"{label} {current:.3f} <= previous {before:.3f}"


class BudgetPolicy(BasePolicy):
    """At most `budget` external calls per trajectory, spent on the most uncertain searches.

    Decisions are online (later searches are unknown), so "most uncertain" means: among the
    `budget` highest uncertainties seen so far in this trajectory, the current one included.
    Ties count in the current search's favour. An optional `tau` also requires the query to
    be more uncertain than tau (same direction rules as ThresholdPolicy).
    """

    name = "budget"

    def __init__(self, budget: int, aggregate: str = "mean", tau: float | None = None) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = budget
        self.aggregate = check_aggregate(aggregate)
        self.tau = None if tau is None else _check_tau(tau, aggregate)

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        left = self.budget - ctx.external_calls
        if left <= 0:
            return "internal", f"budget of {self.budget} external calls spent"
        current = ctx.entropy.uncertainty(self.aggregate)
        higher = sum(1 for q in ctx.previous if q.uncertainty(self.aggregate) > current)
        rank = higher + 1
        seen = len(ctx.previous) + 1
        ranked = f"{_LABELS[self.aggregate]} uncertainty {current:.3f} ranks {rank} of {seen}"
        if rank > self.budget:
            return "internal", f"{ranked}, budget {self.budget}"
        if self.tau is not None:
            hit, text = exceeds(ctx.entropy, self.aggregate, self.tau)
            if not hit:
                return "internal", text
        return "external", f"{ranked}, {left} of {self.budget} calls left"


class AlwaysPolicy(BasePolicy):
    """Every search external (Search-R1 / SSRL sim2real behaviour; the baseline)."""

    name = "always"

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        return "external", "policy always searches externally"


class NeverPolicy(BasePolicy):
    """Every search internal (pure self-search, as SSRL was trained)."""

    name = "never"

    def _decide(self, ctx: SearchContext) -> tuple[Route, str]:
        return "internal", "policy never searches externally"


def make_policy(name: str, *, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    """Build a policy from configuration values.

    `tau` is required by "threshold"; for "budget" it is an optional floor (pass None for a
    pure budget). Raises ValueError for an unknown name or aggregate, or a missing value.
    """
    if name not in POLICIES:
        choices = ", ".join(POLICIES)
        raise ValueError(f"unknown routing policy {name!r}; expected one of {choices}")
    check_aggregate(aggregate)
    if name == "threshold":
        if tau is None:
            raise ValueError("policy 'threshold' needs tau")
        return ThresholdPolicy(tau, aggregate)
    if name == "ssrl":
        return SSRLPolicy(aggregate)
    if name == "budget":
        if budget is None:
            raise ValueError("policy 'budget' needs budget (max external calls per trajectory)")
        return BudgetPolicy(budget, aggregate, tau)
    if name == "always":
        return AlwaysPolicy()
    return NeverPolicy()
