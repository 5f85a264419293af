"""Uncertainty of a search query, measured from the engine's top-k logprobs.

The router asks whether the model "knows" what it is about to search for. The signal is the
Shannon entropy of the next-token distribution at every position of the query inside
`<search>...</search>`. Engines return only the top-k candidates, so the entropy is bounded
rather than known: with leftover mass r = 1 - sum(p_i) over the k known candidates,

    H_k + r * (-ln r)  <=  H  <=  H_k + r * ln((V - k) / r)

(H_k = -sum p_i ln p_i). The lower bound puts all leftover mass on one unseen token, the upper
bound spreads it uniformly over the V - k unseen tokens. The point estimate is the lower bound:
it needs no vocabulary size and equals H when the top-k covers the distribution.

SSRL's released code used a different number (`ssrl_sampled_term`): -p*log2(p) of the sampled
token's own probability. That is not an entropy (it is 0 both for a certain token and for a
very unlikely one); it is kept only so traces can compare against the paper's rule.

Pure functions, no I/O. All logs are natural (nats) except the SSRL term, which uses log2 as
the released code did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from router.engine.base import TokenLogprobs

# Below this leftover mass the known candidates are the whole distribution (float noise in
# the engine's log-softmax leaves ~1e-7 even when every token is returned).
EXACT_LEFTOVER: Final = 1e-6

# Aggregates a policy may read from a QueryEntropy.
AGGREGATES: Final[tuple[str, ...]] = ("mean", "max", "min_prob", "ssrl")

TokenKind = Literal["exact", "topk_lower_bound"]
QueryKind = Literal["exact", "topk_lower_bound", "empty"]

_ROUND = 6


def _prob(logprob: float) -> float:
    """exp(logprob) clamped to [0, 1]; -inf and NaN (no information) count as 0."""
    if math.isnan(logprob) or logprob == -math.inf:
        return 0.0
    if logprob >= 0.0:
        # A logprob slightly above 0 is float error on a certain token.
        return 1.0
    return math.exp(logprob)


def _plogp(p: float) -> float:
    """-p ln p with the limit 0 at p = 0 (and exactly 0 at p = 1)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log(p)


@dataclass(frozen=True, slots=True)
class TokenEntropy:
    """Entropy (nats) of the next-token distribution at one generated position."""

    # Point estimate; equals `lower` (see the module docstring for why).
    value: float
    lower: float
    # None when the vocabulary size is unknown.
    upper: float | None
    # Probability mass not covered by the known candidates (clamped to >= 0).
    leftover_mass: float
    # Probability of the token the engine actually sampled.
    sampled_prob: float
    # "exact" when the known candidates cover the distribution (leftover <= EXACT_LEFTOVER).
    kind: TokenKind


def _candidate_probs(position: TokenLogprobs) -> list[float]:
    """Probabilities of the known candidates: the engine's top-k plus the sampled token.

    vLLM adds the sampled token to the top-k itself; other engines may not, and a sampled
    token outside the top-k is real information about the distribution, so merge it once.
    """
    logprobs = dict(position.top)
    logprobs.setdefault(position.token_id, position.logprob)
    return [_prob(lp) for lp in logprobs.values()]


def token_entropy(position: TokenLogprobs, vocab_size: int | None = None) -> TokenEntropy:
    """Bounds on the Shannon entropy (nats) of the next-token distribution at `position`.

    `vocab_size` (the model's V) only enables the upper bound. An empty `top` is allowed: the
    sampled token is then the only known candidate and the bounds are correspondingly wide.
    """
    probs = _candidate_probs(position)
    h_known = math.fsum(_plogp(p) for p in probs)
    # Float error can push the sum a hair above 1; that means "no leftover", not negative mass.
    leftover = max(0.0, 1.0 - math.fsum(probs))
    lower = h_known + _plogp(leftover)

    upper: float | None = None
    if vocab_size is not None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if leftover > 0.0:
            # At least one unseen token must hold the leftover; max(.., 1) keeps upper >= lower
            # when an engine reports more candidates than the stated vocabulary.
            unseen = max(vocab_size - len(probs), 1)
            upper = h_known + leftover * math.log(unseen / leftover)
        else:
            upper = lower

    return TokenEntropy(
        value=lower,
        lower=lower,
        upper=upper,
        leftover_mass=leftover,
        sampled_prob=_prob(position.logprob),
        kind="exact" if leftover <= EXACT_LEFTOVER else "topk_lower_bound",
    )


def ssrl_sampled_term(position: TokenLogprobs) -> float:
    """SSRL's released per-token value: -p*log2(p) of the SAMPLED token's probability p.

    Not an entropy: it ignores every other candidate and is non-monotonic in p (maximal at
    p = 1/e, zero at both p -> 0 and p = 1). Kept only to reproduce the paper's rule.
    """
    p = _prob(position.logprob)
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p)


def check_aggregate(name: str) -> str:
    """Return `name` if it is one of AGGREGATES, else raise ValueError naming the choices."""
    if name not in AGGREGATES:
        choices = ", ".join(AGGREGATES)
        raise ValueError(f"unknown entropy aggregate {name!r}; expected one of {choices}")
    return name


@dataclass(frozen=True, slots=True)
class QueryEntropy:
    """Uncertainty of one search query, aggregated over its token positions."""

    # Mean and max of the per-token entropy point estimates (nats).
    mean: float
    max: float
    # Lowest sampled-token probability over the query (FLARE's trigger).
    min_prob: float
    # Mean of ssrl_sampled_term (SSRL's released value, for comparison only).
    ssrl: float
    tokens: int
    # "exact" when every position was exact, "empty" for a query with no tokens.
    kind: QueryKind
    per_token: tuple[float, ...] = ()

    def aggregate(self, name: str) -> float:
        """The raw value of aggregate `name` (see AGGREGATES)."""
        check_aggregate(name)
        value: float = getattr(self, name)
        return value

    def uncertainty(self, name: str) -> float:
        """Aggregate `name` oriented so that higher always means more uncertain.

        Entropies and the SSRL term already grow with uncertainty; a low sampled-token
        probability means uncertain, so min_prob is flipped to 1 - min_prob.
        """
        value = self.aggregate(name)
        return 1.0 - value if name == "min_prob" else value

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view for traces (floats rounded to 6 decimals)."""
        return {
            "mean": round(self.mean, _ROUND),
            "max": round(self.max, _ROUND),
            "min_prob": round(self.min_prob, _ROUND),
            "ssrl": round(self.ssrl, _ROUND),
            "tokens": self.tokens,
            "kind": self.kind,
            "per_token": [round(v, _ROUND) for v in self.per_token],
        }


EMPTY_QUERY_ENTROPY: Final = QueryEntropy(
    mean=0.0, max=0.0, min_prob=1.0, ssrl=0.0, tokens=0, kind="empty", per_token=()
)


def query_entropy(positions: Sequence[TokenLogprobs], vocab_size: int | None = None) -> QueryEntropy:
    """Aggregate the uncertainty of a query's token positions.

    An empty query yields kind "empty" with neutral values (0 entropy, min_prob 1); the router
    handles empty queries itself rather than letting a policy read these numbers.
    """
    if not positions:
        return EMPTY_QUERY_ENTROPY
    entropies = [token_entropy(p, vocab_size) for p in positions]
    values = tuple(e.value for e in entropies)
    n = len(values)
    return QueryEntropy(
        mean=math.fsum(values) / n,
        max=max(values),
        min_prob=min(e.sampled_prob for e in entropies),
        ssrl=math.fsum(ssrl_sampled_term(p) for p in positions) / n,
        tokens=n,
        kind="exact" if all(e.kind == "exact" for e in entropies) else "topk_lower_bound",
        per_token=values,
    )
