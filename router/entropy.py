"""Uncertainty of a search query, measured from the engine's top-k logprobs.

The router asks whether the model "knows" what it is about to search for. The signal is the
Shannon entropy of the next-token distribution at every position of the query inside
`<search>...</search>`. Engines return only the top-k candidates, so the entropy is bounded
rather than known: with leftover mass r = 1 - sum(p_i) over the k known candidates,

    H_k + r * (-ln r)  <=  H  <=  H_k + r * ln((V - k) / r)

(H_k = -sum p_i ln p_i). The lower bound puts all leftover mass on one unseen token, the upper
bound spreads it uniformly over the V - k unseen tokens. Both are reported; the point estimate
between them is chosen by `estimator` (see ESTIMATORS; bench/entropy_estimators.py measured them
against the full-vocabulary entropy, docs/benchmarks.md "entropy-estimators"):

- "lower": the lower bound (needs no V; badly low when much mass is left over),
- "midpoint": the mean of the two bounds,
- "power_tail": the unseen ranks continue the known distribution as a power law
  p_j = p_m (j/m)^-a from the last known rank m, with the exponent a chosen so that ranks
  m+1..V hold exactly the leftover mass r; the tail's entropy then has a closed form.
- "gaussian_tail" (default): the V logits are modelled as draws from a normal distribution
  N(mu, sigma^2), so p = exp(z)/Z. The last known candidate (rank m, probability p_m) sits at
  the normal quantile 1 - (m - 1/2)/V; the spread sigma is chosen so that the logits below the
  rank-m cut (quantile 1 - m/V) hold exactly the leftover mass r relative to p_m. The tail's
  mass and entropy are closed-form Gaussian integrals (a log-normal sum). Measured unbiased on
  the default model; the power law overestimates (real tails fall faster than a power law).

"midpoint" and the tail models need V and fall back to "lower" without it. Every estimate is
clamped into [lower, upper].

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
from functools import lru_cache
from statistics import NormalDist
from typing import Final, Literal

from router.engine.base import TokenLogprobs

# Below this leftover mass the known candidates are the whole distribution (float noise in
# the engine's log-softmax leaves ~1e-7 even when every token is returned).
EXACT_LEFTOVER: Final = 1e-6

# Aggregates a policy may read from a QueryEntropy.
AGGREGATES: Final[tuple[str, ...]] = ("mean", "max", "min_prob", "ssrl")

Estimator = Literal["lower", "midpoint", "power_tail", "gaussian_tail"]
ESTIMATORS: Final[tuple[Estimator, ...]] = ("lower", "midpoint", "power_tail", "gaussian_tail")
# Chosen by measurement (bench/entropy_estimators.py): see docs/benchmarks.md.
DEFAULT_ESTIMATOR: Final[Estimator] = "gaussian_tail"

TokenKind = Literal["exact", "topk_lower_bound", "topk_midpoint", "topk_power_tail", "topk_gaussian_tail"]
QueryKind = Literal[
    "exact", "topk_lower_bound", "topk_midpoint", "topk_power_tail", "topk_gaussian_tail", "empty"
]
_KIND: Final[dict[str, TokenKind]] = {
    "lower": "topk_lower_bound",
    "midpoint": "topk_midpoint",
    "power_tail": "topk_power_tail",
    "gaussian_tail": "topk_gaussian_tail",
}

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

    # Point estimate (of the estimator named by `kind`; exact when `kind` is "exact").
    value: float
    lower: float
    # None when the vocabulary size is unknown.
    upper: float | None
    # Probability mass not covered by the known candidates (clamped to >= 0).
    leftover_mass: float
    # Probability of the token the engine actually sampled.
    sampled_prob: float
    # "exact" when the known candidates cover the distribution (leftover <= EXACT_LEFTOVER),
    # else "topk_<estimator>".
    kind: TokenKind


def _candidate_probs(position: TokenLogprobs) -> list[float]:
    """Probabilities of the known candidates: the engine's top-k plus the sampled token.

    vLLM adds the sampled token to the top-k itself; other engines may not, and a sampled
    token outside the top-k is real information about the distribution, so merge it once.
    """
    logprobs = dict(position.top)
    logprobs.setdefault(position.token_id, position.logprob)
    return [_prob(lp) for lp in logprobs.values()]


def _ranked_probs(position: TokenLogprobs) -> list[float]:
    """The top-k proper, descending: the probabilities of ranks 1..m, which the tail models
    continue. A sampled token the engine added beyond the top-k is left out (its rank is
    unknown; the tail model covers it). Without `sampled_rank`, a sampled token holding the
    smallest probability is left out: if it really was rank m, the tail then starts one rank
    earlier, which is just as consistent."""
    top = {tid: _prob(lp) for tid, lp in position.top.items()}
    sampled = top.get(position.token_id)
    if sampled is not None and len(top) >= 3:
        others = len(top) - 1
        if position.sampled_rank is not None:
            extra = position.sampled_rank > others
        else:
            extra = sampled <= min(p for tid, p in top.items() if tid != position.token_id)
        if extra:
            del top[position.token_id]
    return sorted((p for p in top.values() if p > 0.0), reverse=True)


def check_estimator(name: str) -> Estimator:
    """Return `name` if it is one of ESTIMATORS, else raise ValueError naming the choices."""
    for estimator in ESTIMATORS:
        if name == estimator:
            return estimator
    raise ValueError(f"unknown entropy estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")


def _power_sums(a: float, lo: float, hi: float) -> tuple[float, float]:
    """(integral of x^-a, integral of x^-a ln x) over [lo, hi]: the midpoint-rule sums over
    the integer ranks lo + 1/2 .. hi - 1/2."""
    ln_lo, ln_hi = math.log(lo), math.log(hi)
    b = 1.0 - a
    if abs(b) < 1e-9:
        return ln_hi - ln_lo, (ln_hi * ln_hi - ln_lo * ln_lo) / 2.0
    # x^b computed as exp(b ln x): b may be strongly negative (steep tails).
    e_lo, e_hi = math.exp(b * ln_lo), math.exp(b * ln_hi)
    s0 = (e_hi - e_lo) / b
    s1 = (e_hi * (ln_hi / b - 1.0 / (b * b))) - (e_lo * (ln_lo / b - 1.0 / (b * b)))
    return s0, s1


def _tail_entropy(p_last: float, rank: int, leftover: float, vocab_size: int) -> float | None:
    """Entropy of the unseen ranks rank+1..V under a power-law continuation (see the module
    docstring), or None when the tail cannot hold the leftover without exceeding p_last (the
    uniform spread, i.e. the upper bound, is then the best guess)."""
    unseen = vocab_size - rank
    if unseen <= 0 or p_last <= 0.0 or leftover <= 0.0:
        return None
    if p_last * unseen <= leftover:
        return None
    lo, hi = rank + 0.5, vocab_size + 0.5
    # Tail mass for exponent a: p_last * rank^a * S0(a); decreasing in a. Bisect on a.
    log_target = math.log(leftover / p_last)
    ln_rank = math.log(rank)

    def log_mass(a: float) -> float:
        s0, _ = _power_sums(a, lo, hi)
        return a * ln_rank + math.log(s0)

    a_lo, a_hi = 0.0, 1.0
    while log_mass(a_hi) > log_target and a_hi < 256.0:
        a_lo, a_hi = a_hi, a_hi * 2.0
    for _ in range(40):
        mid = (a_lo + a_hi) / 2.0
        if log_mass(mid) > log_target:
            a_lo = mid
        else:
            a_hi = mid
        if a_hi - a_lo < 1e-7:
            break
    a = (a_lo + a_hi) / 2.0
    s0, s1 = _power_sums(a, lo, hi)
    # q_j = c j^-a with sum r: c = r / S0; H = -sum q ln q = -r ln c + a c S1.
    c = leftover / s0
    return -leftover * math.log(c) + a * c * s1


_NORMAL = NormalDist()
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@lru_cache(maxsize=256)
def _normal_cut(rank: int, vocab_size: int) -> tuple[float, float]:
    """(z of the rank-`rank` logit, z of the cut below it) as standard-normal quantiles."""
    z_rank = _NORMAL.inv_cdf(1.0 - (rank - 0.5) / vocab_size)
    cut = _NORMAL.inv_cdf(1.0 - rank / vocab_size)
    return z_rank, cut


def _log_normal_cdf(x: float) -> float:
    """ln Phi(x), accurate far into the lower tail (erfc keeps precision there)."""
    value = 0.5 * math.erfc(-x / _SQRT2)
    return math.log(value) if value > 0.0 else -math.inf


def _gaussian_tail_entropy(p_last: float, rank: int, leftover: float, vocab_size: int) -> float | None:
    """Entropy of the unseen tokens when the logits are normal (see the module docstring).

    In units of sigma, a logit z contributes p(z) = p_last * exp(s (z - z_rank)) and the V
    logits have density V phi(z); the tokens below `cut` then hold
    V p_last exp(s^2/2 - s z_rank) Phi(cut - s). s is solved (bisection) so that equals the
    leftover r. With q(z) = c exp(s z):  H_tail = -r ln c - s r (s - phi(x)/Phi(x)), x = cut - s.
    None when no spread fits (the tail would need tokens more likely than p_last).
    """
    if vocab_size <= rank or p_last <= 0.0 or leftover <= 0.0:
        return None
    z_rank, cut = _normal_cut(rank, vocab_size)
    log_v = math.log(vocab_size)
    target = math.log(leftover / p_last)

    def log_mass(s: float) -> float:
        return log_v + s * s / 2.0 - s * z_rank + _log_normal_cdf(cut - s)

    lo, hi = 1e-3, 64.0
    if log_mass(lo) < target:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2.0
        if log_mass(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    s = (lo + hi) / 2.0
    x = cut - s
    log_cdf = _log_normal_cdf(x)
    if log_cdf == -math.inf:
        return None
    log_c = math.log(leftover) - log_v - s * s / 2.0 - log_cdf
    mills = math.exp(-x * x / 2.0 - _LOG_SQRT_2PI - log_cdf)
    return -leftover * log_c - s * leftover * (s - mills)


def token_entropy(
    position: TokenLogprobs, vocab_size: int | None = None, estimator: str = DEFAULT_ESTIMATOR
) -> TokenEntropy:
    """Bounds on, and an estimate of, the Shannon entropy (nats) at `position`.

    `vocab_size` (the model's V) enables the upper bound and the estimators that need it
    ("midpoint", "tail"); without it they fall back to the lower bound. An empty `top` is
    allowed: the sampled token is then the only known candidate and the bounds are wide.
    """
    name = check_estimator(estimator)
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

    exact = leftover <= EXACT_LEFTOVER
    value = lower
    if not exact and upper is not None and vocab_size is not None:
        if name == "midpoint":
            value = (lower + upper) / 2.0
        elif name in ("power_tail", "gaussian_tail"):
            ranked = _ranked_probs(position)
            ranked_leftover = max(0.0, 1.0 - math.fsum(ranked))
            tail_model = _tail_entropy if name == "power_tail" else _gaussian_tail_entropy
            tail = (
                tail_model(ranked[-1], len(ranked), ranked_leftover, vocab_size)
                if ranked and ranked_leftover > 0.0
                else None
            )
            if tail is None:
                value = upper
            else:
                h_ranked = math.fsum(_plogp(p) for p in ranked)
                value = min(max(h_ranked + tail, lower), upper)

    return TokenEntropy(
        value=value,
        lower=lower,
        upper=upper,
        leftover_mass=leftover,
        sampled_prob=_prob(position.logprob),
        kind="exact" if exact else _KIND[name if vocab_size is not None else "lower"],
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
    # "exact" when every position was exact, "empty" for a query with no tokens, else
    # "topk_<estimator>" (the estimator that made `mean`, `max` and `per_token`).
    kind: QueryKind
    per_token: tuple[float, ...] = ()
    # Per-token lower / upper bounds (upper None where the vocabulary size is unknown); the
    # bounds of `mean` and `max` follow from them (see `bounds`).
    per_token_lower: tuple[float, ...] = ()
    per_token_upper: tuple[float, ...] | None = None

    def bounds(self) -> dict[str, tuple[float, float | None]]:
        """(lower, upper) of the mean and max aggregates: the true value lies between."""
        if not self.per_token_lower:
            return {"mean": (self.mean, self.mean), "max": (self.max, self.max)}
        lows, highs = self.per_token_lower, self.per_token_upper
        n = len(lows)
        return {
            "mean": (math.fsum(lows) / n, None if highs is None else math.fsum(highs) / n),
            "max": (max(lows), None if highs is None else max(highs)),
        }

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
        """JSON-ready view for traces (floats rounded to 6 decimals).

        `mean` / `max` / `per_token` are the estimates (their estimator is `kind`); `lower` and
        `upper` bound the mean and max aggregates, `per_token_lower` / `per_token_upper` each
        token (upper values are null when the vocabulary size is unknown).
        """

        def r(v: float | None) -> float | None:
            return None if v is None else round(v, _ROUND)

        bounds = self.bounds()
        return {
            "mean": round(self.mean, _ROUND),
            "max": round(self.max, _ROUND),
            "min_prob": round(self.min_prob, _ROUND),
            "ssrl": round(self.ssrl, _ROUND),
            "tokens": self.tokens,
            "kind": self.kind,
            "lower": {name: r(lo) for name, (lo, _) in bounds.items()},
            "upper": {name: r(hi) for name, (_, hi) in bounds.items()},
            "per_token": [round(v, _ROUND) for v in self.per_token],
            "per_token_lower": [round(v, _ROUND) for v in self.per_token_lower],
            "per_token_upper": (
                None if self.per_token_upper is None else [round(v, _ROUND) for v in self.per_token_upper]
            ),
        }


EMPTY_QUERY_ENTROPY: Final = QueryEntropy(
    mean=0.0, max=0.0, min_prob=1.0, ssrl=0.0, tokens=0, kind="empty", per_token=()
)


def query_entropy(
    positions: Sequence[TokenLogprobs],
    vocab_size: int | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
) -> QueryEntropy:
    """Aggregate the uncertainty of a query's token positions.

    An empty query yields kind "empty" with neutral values (0 entropy, min_prob 1); the router
    handles empty queries itself rather than letting a policy read these numbers.
    """
    if not positions:
        return EMPTY_QUERY_ENTROPY
    entropies = [token_entropy(p, vocab_size, estimator) for p in positions]
    values = tuple(e.value for e in entropies)
    uppers = tuple(e.upper for e in entropies)
    n = len(values)
    kinds = {e.kind for e in entropies} - {"exact"}
    return QueryEntropy(
        mean=math.fsum(values) / n,
        max=max(values),
        min_prob=min(e.sampled_prob for e in entropies),
        ssrl=math.fsum(ssrl_sampled_term(p) for p in positions) / n,
        tokens=n,
        kind=kinds.pop() if kinds else "exact",
        per_token=values,
        per_token_lower=tuple(e.lower for e in entropies),
        per_token_upper=None if any(u is None for u in uppers) else tuple(u for u in uppers if u is not None),
    )
