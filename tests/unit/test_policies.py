"""Routing policies over scripted sequences of query uncertainties."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from router.entropy import QueryEntropy
from router.policies import (
    CAP_REACHED,
    POLICIES,
    AlwaysPolicy,
    BudgetPolicy,
    Decision,
    NeverPolicy,
    Policy,
    SearchContext,
    SSRLPolicy,
    ThresholdPolicy,
    make_policy,
)


def qe(
    mean: float = 0.0, *, max_: float | None = None, min_prob: float = 1.0, ssrl: float = 0.0
) -> QueryEntropy:
    return QueryEntropy(
        mean=mean,
        max=mean if max_ is None else max_,
        min_prob=min_prob,
        ssrl=ssrl,
        tokens=3,
        kind="exact",
        per_token=(mean,) * 3,
    )


def run(policy: Policy, sequence: Sequence[QueryEntropy], cap: int | None = None) -> list[Decision]:
    """Drive a policy through one trajectory, as the router will: count external calls."""
    decisions: list[Decision] = []
    calls = 0
    for i, entropy in enumerate(sequence):
        ctx = SearchContext(
            index=i,
            entropy=entropy,
            previous=tuple(sequence[:i]),
            external_calls=calls,
            max_external_calls=cap,
        )
        d = policy.decide(ctx)
        decisions.append(d)
        calls += d.route == "external"
    return decisions


def routes(decisions: Sequence[Decision]) -> str:
    return "".join("E" if d.route == "external" else "I" for d in decisions)


def test_threshold_mean() -> None:
    p = ThresholdPolicy(0.8)
    ds = run(p, [qe(1.234), qe(0.8), qe(0.2), qe(0.81)])
    assert routes(ds) == "EIIE"
    assert ds[0] == Decision("external", "mean entropy 1.234 > tau 0.800", "threshold")
    assert ds[1].reason == "mean entropy 0.800 <= tau 0.800"


def test_threshold_max_and_ssrl() -> None:
    assert routes(run(ThresholdPolicy(1.0, "max"), [qe(0.1, max_=2.0), qe(0.5, max_=0.9)])) == "EI"
    assert routes(run(ThresholdPolicy(0.3, "ssrl"), [qe(ssrl=0.5), qe(ssrl=0.1)])) == "EI"


def test_threshold_min_prob_is_reversed() -> None:
    p = ThresholdPolicy(0.4, "min_prob")
    ds = run(p, [qe(min_prob=0.1), qe(min_prob=0.9), qe(min_prob=0.4)])
    assert routes(ds) == "EII"
    assert ds[0].reason == "min token prob 0.100 < tau 0.400"
    assert ds[1].reason == "min token prob 0.900 >= tau 0.400"


def test_threshold_rejects_bad_tau() -> None:
    with pytest.raises(ValueError, match="probability"):
        ThresholdPolicy(1.5, "min_prob")
    with pytest.raises(ValueError, match="finite"):
        ThresholdPolicy(float("nan"))
    with pytest.raises(ValueError, match="aggregate"):
        ThresholdPolicy(0.5, "median")


def test_ssrl_policy_compares_with_previous_search() -> None:
    ds = run(SSRLPolicy(), [qe(0.5), qe(0.4), qe(0.6), qe(0.6), qe(0.1), qe(0.2)])
    assert routes(ds) == "EIEIIE"
    assert ds[0].reason == "first search of the trajectory"
    assert ds[2].reason == "mean entropy uncertainty 0.600 > previous 0.400"


def test_ssrl_policy_min_prob_uses_uncertainty_direction() -> None:
    # Lower min_prob = more uncertain: 0.9 -> 0.5 is MORE uncertain, so external.
    ds = run(SSRLPolicy("min_prob"), [qe(min_prob=0.9), qe(min_prob=0.5), qe(min_prob=0.7)])
    assert routes(ds) == "EEI"


def test_budget_spends_on_highest_so_far() -> None:
    # Every search ranks within the budget until the budget is spent.
    ds = run(BudgetPolicy(2), [qe(1.0), qe(0.5), qe(2.0)])
    assert routes(ds) == "EEI"
    assert ds[1].reason == "mean entropy uncertainty 0.500 ranks 2 of 2, 1 of 2 calls left"
    assert ds[2].reason == "budget of 2 external calls spent"
    assert routes(run(BudgetPolicy(3), [qe(3.0), qe(2.5), qe(0.5), qe(0.4), qe(2.0)])) == "EEEII"
    assert routes(run(BudgetPolicy(1), [qe(1.0), qe(2.0)])) == "EI"


def test_budget_skips_searches_outside_the_top() -> None:
    # tau keeps the first two internal, so calls remain when a low third search ranks 3rd.
    ds = run(BudgetPolicy(2, tau=1.5), [qe(1.0), qe(1.2), qe(0.5), qe(1.6), qe(1.1), qe(9.0)])
    assert routes(ds) == "IIIEIE"
    assert ds[0].reason == "mean entropy 1.000 <= tau 1.500"
    assert ds[2].reason == "mean entropy uncertainty 0.500 ranks 3 of 3, budget 2"
    assert ds[4].reason == "mean entropy uncertainty 1.100 ranks 3 of 5, budget 2"


def test_budget_rank_ties_favour_the_current_search() -> None:
    policy = BudgetPolicy(2)
    previous = (qe(3.0), qe(2.0))
    below = SearchContext(2, qe(0.5), previous, external_calls=1, max_external_calls=None)
    assert policy.decide(below).route == "internal"
    tie = SearchContext(2, qe(2.0), previous, external_calls=1, max_external_calls=None)
    assert policy.decide(tie).route == "external"


def test_budget_zero_and_negative() -> None:
    assert routes(run(BudgetPolicy(0), [qe(9.0)])) == "I"
    with pytest.raises(ValueError):
        BudgetPolicy(-1)


def test_budget_min_prob_direction() -> None:
    ds = run(BudgetPolicy(1, "min_prob", tau=0.5), [qe(min_prob=0.8), qe(min_prob=0.2)])
    # 0.8 is rank 1 but not below tau 0.5; 0.2 is rank 1 and below tau.
    assert routes(ds) == "IE"


def test_always_and_never() -> None:
    seq = [qe(0.0), qe(5.0), qe(0.1)]
    assert routes(run(AlwaysPolicy(), seq)) == "EEE"
    assert routes(run(NeverPolicy(), seq)) == "III"


@pytest.mark.parametrize(
    "policy",
    [ThresholdPolicy(0.0), SSRLPolicy(), BudgetPolicy(10), AlwaysPolicy(), NeverPolicy()],
    ids=lambda p: p.name,
)
def test_cap_applies_to_every_policy(policy: Policy) -> None:
    seq = [qe(1.0), qe(2.0), qe(3.0), qe(4.0)]
    ds = run(policy, seq, cap=2)
    assert sum(d.route == "external" for d in ds) <= 2
    ctx = SearchContext(5, qe(9.0), (qe(1.0),), external_calls=2, max_external_calls=2)
    d = policy.decide(ctx)
    assert d == Decision("internal", CAP_REACHED, policy.name)
    assert isinstance(policy, Policy)


def test_cap_zero_blocks_everything() -> None:
    assert routes(run(AlwaysPolicy(), [qe(), qe()], cap=0)) == "II"


def test_always_with_cap_stops_at_cap() -> None:
    ds = run(AlwaysPolicy(), [qe(), qe(), qe()], cap=2)
    assert routes(ds) == "EEI"
    assert ds[2].reason == CAP_REACHED


def test_make_policy() -> None:
    assert POLICIES == ("threshold", "ssrl", "budget", "always", "never")
    t = make_policy("threshold", tau=0.5, aggregate="max", budget=None)
    assert isinstance(t, ThresholdPolicy) and t.tau == 0.5 and t.aggregate == "max"
    b = make_policy("budget", tau=None, aggregate="mean", budget=2)
    assert isinstance(b, BudgetPolicy) and b.budget == 2 and b.tau is None
    assert isinstance(make_policy("ssrl", tau=0.1, aggregate="ssrl", budget=None), SSRLPolicy)
    assert isinstance(make_policy("always", tau=0.1, aggregate="mean", budget=None), AlwaysPolicy)
    assert isinstance(make_policy("never", tau=0.1, aggregate="mean", budget=None), NeverPolicy)
    for name in POLICIES:
        assert make_policy(name, tau=0.5, aggregate="mean", budget=1).name == name


def test_make_policy_errors() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'sometimes'"):
        make_policy("sometimes", tau=0.5, aggregate="mean", budget=None)
    with pytest.raises(ValueError, match="unknown entropy aggregate 'median'"):
        make_policy("always", tau=0.5, aggregate="median", budget=None)
    with pytest.raises(ValueError, match="needs budget"):
        make_policy("budget", tau=0.5, aggregate="mean", budget=None)
    with pytest.raises(ValueError, match="needs tau"):
        make_policy("threshold", tau=None, aggregate="mean", budget=None)
    with pytest.raises(ValueError, match="probability"):
        make_policy("threshold", tau=2.0, aggregate="min_prob", budget=None)


# ----- one list of names, and policies from entry points -------------------------------------


def test_the_policy_names_are_declared_once() -> None:
    from typing import get_args

    from clients.models import Policy as WirePolicy
    from router.policies import BUILTIN, PolicyName
    from server.protocol import SelfSearchOptions

    assert POLICIES == get_args(PolicyName) == tuple(BUILTIN)
    # The client cannot import router/ (it installs alone): its wire type must agree.
    assert get_args(WirePolicy) == POLICIES
    schema = SelfSearchOptions.model_json_schema()["properties"]["policy"]["anyOf"][0]
    assert tuple(schema["enum"]) == POLICIES


class CoinPolicy(AlwaysPolicy):
    name = "coin"


def coin_factory(*, tau: float | None, aggregate: str, budget: int | None) -> Policy:
    return CoinPolicy()


def test_a_policy_from_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import router.policies
    from server.protocol import SelfSearchOptions

    point = importlib.metadata.EntryPoint(
        name="coin", value="tests.unit.test_policies:coin_factory", group="ssrl.policies"
    )
    monkeypatch.setattr(router.policies, "entry_point_policies", lambda: {"coin": point})
    assert router.policies.known_policies() == (*POLICIES, "coin")
    policy = make_policy("coin", tau=None, aggregate="mean", budget=None)
    assert policy.name == "coin"  # (loaded by the entry point, under its own module name)
    # The cap still applies: it lives in BasePolicy.decide.
    ctx = SearchContext(index=0, entropy=qe(), previous=(), external_calls=1, max_external_calls=1)
    assert policy.decide(ctx) == Decision("internal", CAP_REACHED, "coin")
    # A request may name it; an unknown name is still refused.
    assert SelfSearchOptions(policy="coin").policy == "coin"
    with pytest.raises(ValueError, match="unknown routing policy"):
        SelfSearchOptions(policy="dice")
