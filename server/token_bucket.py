"""Token-bucket arithmetic for the per-key rate limit, free of I/O.

One rule for both places a bucket lives: in process (`server.limits.RateLimitMiddleware`) and
in Redis, where `server.shared_state.TOKEN_BUCKET_LUA` is this function written in Lua (the
unit tests hold the two to the same answers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`per_minute` requests on average, `burst` of them at once."""

    per_minute: float
    burst: float

    @classmethod
    def of(cls, per_minute: float, burst: float | None = None) -> RateLimit:
        """The limit of `--rate-limit per_minute`: a burst of a tenth of a minute's worth
        (at least one request) unless given."""
        if not per_minute > 0:
            raise ValueError(f"a rate limit must be above 0 per minute, got {per_minute}")
        return cls(per_minute, burst if burst is not None else max(1.0, per_minute / 6.0))

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0

    @property
    def idle_ttl_s(self) -> int:
        """Seconds after which an untouched bucket is full again, so need not be kept."""
        return math.ceil(self.burst / self.per_second) + 1


def take(tokens: float | None, updated: float, now: float, limit: RateLimit) -> tuple[float, float]:
    """One request against a bucket holding `tokens` as of `updated` (None: a new, full one).

    Returns (tokens left as of `now`, wait): wait is 0 when a token was taken, else the
    seconds until one will be. A clock that went back refills nothing.
    """
    held = limit.burst if tokens is None else tokens
    held = min(limit.burst, held + max(0.0, now - updated) * limit.per_second)
    if held >= 1.0:
        return held - 1.0, 0.0
    return held, (1.0 - held) / limit.per_second
