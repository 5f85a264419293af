"""Routing policies: for each `<search>` the model writes, call the real search engine
("external") or let the model write the information itself ("internal").

Every policy reads one aggregate of the query's uncertainty (see `router.entropy`). The
per-request cap on external calls is enforced once, in `BasePolicy.decide`, so no policy can
forget it. Pure logic, no I/O.

Policies are found by name in one registry: the built-ins in `BUILTIN` (their names are the
`PolicyName` literal), then the entry point group `ssrl.policies`, through which a
third-party package adds one (name = the policy, value = a `PolicyFactory`, e.g.
`mypkg.policy:factory`), as search backends are added through `ssrl.search_backends`.
`make_policy` builds one; `known_policies()` lists them all.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args, runtime_checkable

from router.entropy import QueryEntropy, check_aggregate

Route = Literal["external", "internal"]
# The built-in policies' names; everything that lists them derives from this.
PolicyName = Literal["threshold", "ssrl", "budget", "always", "never"]
POLICIES: Final[tuple[str, ...]] = get_args(PolicyName)
ENTRY_POINT_GROUP: Final = "ssrl.policies"
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


class PolicyFactory(Protocol):
    """Builds a policy from the configured values; ValueError when one is missing or wrong.

    `tau` is the threshold (None when not configured), `aggregate` an already checked
    aggregate name, `budget` the external calls allowed per trajectory (None: not set)."""

    def __call__(self, *, tau: float | None, aggregate: str, budget: int | None) -> Policy: ...


def _threshold(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    if tau is None:
        raise ValueError("policy 'threshold' needs tau")
    return ThresholdPolicy(tau, aggregate)


def _ssrl(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    return SSRLPolicy(aggregate)


def _budget(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    # tau is an optional floor here: pass None for a pure budget.
    if budget is None:
        raise ValueError("policy 'budget' needs budget (max external calls per trajectory)")
    return BudgetPolicy(budget, aggregate, tau)


def _always(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    return AlwaysPolicy()


def _never(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    return NeverPolicy()


BUILTIN: Final[dict[str, PolicyFactory]] = {
    "threshold": _threshold,
    "ssrl": _ssrl,
    "budget": _budget,
    "always": _always,
    "never": _never,
}
assert tuple(BUILTIN) == POLICIES, "BUILTIN and PolicyName must name the same policies"


@functools.cache
def entry_point_policies() -> dict[str, importlib.metadata.EntryPoint]:
    """Third-party policies by name, not yet loaded (loading imports their package); read
    once per process (`entry_point_policies.cache_clear()` to read again)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_policies() -> tuple[str, ...]:
    """Every policy name: the built-ins in order, then the entry points' sorted."""
    extra = sorted(set(entry_point_policies()) - set(BUILTIN))
    return (*POLICIES, *extra)


def make_policy(name: str, *, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    """Build a policy from configuration values: built-in first, then `ssrl.policies`.

    `tau` is required by "threshold"; for "budget" it is an optional floor (pass None for a
    pure budget). Raises ValueError for an unknown name or aggregate, or a missing value.
    """
    factory: PolicyFactory | None = BUILTIN.get(name)
    if factory is None:
        entry_point = entry_point_policies().get(name)
        if entry_point is None:
            choices = ", ".join(known_policies())
            raise ValueError(f"unknown routing policy {name!r}; expected one of {choices}")
        factory = entry_point.load()
    check_aggregate(aggregate)
    policy = factory(tau=tau, aggregate=aggregate, budget=budget)
    if not isinstance(policy, Policy):
        raise TypeError(f"policy factory for {name!r} did not return a Policy")
    return policy
