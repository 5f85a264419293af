"""What replicas share through Redis (`--redis-url`): per-key rate buckets and search budgets.

One connection serves every shared store (the search cache too). Each operation is one Lua
script, so a check and its update are atomic however many replicas race on a key, and the
rate bucket reads Redis's clock, so replicas whose clocks disagree still drain one bucket.

Redis is never a reason to fail a request: an operation that fails raises
`SharedStateUnavailable`, and the caller answers from its own process's state instead (fail
open: the limit holds per replica). After a failure Redis is left alone for `retry_after_s`,
so an outage costs a request nothing instead of a timeout; the first operation after that
tries again. The change is logged once each way and shown in the metrics
(`ssrl_shared_state_up`, `ssrl_shared_state_errors_total`, `ssrl_shared_state_local_total`)
and in `/health`.

Keys (the digest is the SHA-256 of the API key, never the key):
`ssrl:rate:v1:<digest hex>` (a hash: tokens, updated; expires once the bucket would be full)
and `ssrl:budget:v1:<digest hex>:<UTC day>` (a counter; expires two days after it starts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from server.metrics import HTTPMetrics
from server.token_bucket import RateLimit

logger = logging.getLogger(__name__)

T = TypeVar("T")

RATE_PREFIX = "ssrl:rate:v1:"
BUDGET_PREFIX = "ssrl:budget:v1:"
# Seconds without any Redis call after which /health pings it to refresh what it reports.
PROBE_AFTER_S = 5.0

# server.token_bucket.take in Lua. ARGV: tokens per second, burst, idle TTL (s), and a clock
# for tests only (replicas never pass it: Redis's own TIME is the one clock they share).
TOKEN_BUCKET_LUA = """
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = burst
  updated = now
end
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens), 'updated', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return string.format('%.6f', wait)
"""

# server.budget_ledger.verdict in Lua: count one search unless the day's limit is reached.
# ARGV: limit, TTL (s). Returns {1 allowed / 0 denied, searches counted}.
BUDGET_TAKE_LUA = """
local limit = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= limit then
  return {0, used}
end
used = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return {1, used}
"""

# Give back a counted search that cost no provider call; never below zero.
BUDGET_REFUND_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 0 then
  return redis.call('DECR', KEYS[1])
end
return 0
"""


class SharedStateUnavailable(Exception):
    """Redis did not answer, or is being left alone after failing: use local state."""


class LinkHealth:
    """Whether Redis works, from the outcomes of the calls made to it (no I/O of its own)."""

    def __init__(self, retry_after_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.up = True
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.last_contact: float | None = None

    def usable(self) -> bool:
        """Up, or down long enough that the next call should try again."""
        return self.up or self.clock() >= self.retry_at

    def succeeded(self) -> bool:
        """Record an answer; True when Redis was down until now."""
        recovered = not self.up
        self.up, self.down_since = True, None
        self.last_contact = self.clock()
        return recovered

    def failed(self) -> bool:
        """Record a failure; True when Redis was up until now."""
        now = self.clock()
        lost = self.up
        if lost:
            self.down_since = now
        self.up = False
        self.retry_at = now + self.retry_after_s
        return lost

    def due_for_probe(self) -> bool:
        now = self.clock()
        return self.usable() and (self.last_contact is None or now - self.last_contact >= PROBE_AFTER_S)


def connect_redis(url: str, timeout_s: float = 0.5) -> Any:
    """A `redis.asyncio` client for `url` that fails fast: short timeouts and no retries (a
    retried INCR could count twice; the caller falls back to local state instead)."""
    try:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise ValueError("--redis-url needs the redis package: pip install 'ssrl[redis]'") from exc
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


class SharedState:
    """The stores replicas share, over one Redis client, falling back when it fails."""

    def __init__(
        self, client: Any, metrics: HTTPMetrics | None = None, health: LinkHealth | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.health = health or LinkHealth()
        self._bucket = client.register_script(TOKEN_BUCKET_LUA)
        self._budget_take = client.register_script(BUDGET_TAKE_LUA)
        self._budget_refund = client.register_script(BUDGET_REFUND_LUA)
        if metrics is not None:
            metrics.shared_state_up.labels("redis").set(1)

    @classmethod
    def connect(cls, url: str, metrics: HTTPMetrics | None = None, timeout_s: float = 0.5) -> SharedState:
        return cls(connect_redis(url, timeout_s), metrics)

    async def _run(self, operation: str, work: Callable[[], Awaitable[T]]) -> T:
        if not self.health.usable():
            self._local(operation)
            raise SharedStateUnavailable(operation)
        try:
            result = await work()
        except Exception as exc:  # any Redis trouble: the caller uses its own state
            if self.health.failed():
                logger.warning(
                    "shared state: redis failed (%s during %s); rate limits and search budgets "
                    "are per replica until it answers again",
                    type(exc).__name__,
                    operation,
                )
                self._set_up(False)
            if self.metrics is not None:
                self.metrics.shared_state_errors.labels(operation).inc()
            self._local(operation)
            raise SharedStateUnavailable(operation) from exc
        if self.health.succeeded():
            logger.warning("shared state: redis answers again; rate limits and search budgets are shared")
            self._set_up(True)
        return result

    def _set_up(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.shared_state_up.labels("redis").set(1 if up else 0)

    def _local(self, operation: str) -> None:
        if self.metrics is not None and operation != "ping":
            self.metrics.shared_state_local.labels(operation).inc()

    async def take_token(self, client: bytes, limit: RateLimit, now: float | None = None) -> float:
        """One request against the key's shared bucket: 0, or the seconds to wait."""
        args: list[Any] = [repr(limit.per_second), repr(limit.burst), limit.idle_ttl_s]
        if now is not None:
            args.append(repr(now))
        raw = await self._run(
            "rate_limit", lambda: self._bucket(keys=[RATE_PREFIX + client.hex()], args=args)
        )
        return float(raw)

    async def take_search(self, client: bytes, day: str, limit: int, ttl_s: int) -> tuple[bool, int]:
        """Count one search in the key's day unless `limit` are counted: (allowed, counted)."""
        key = budget_key(client, day)
        allowed, used = await self._run("budget", lambda: self._budget_take(keys=[key], args=[limit, ttl_s]))
        return bool(int(allowed)), int(used)

    async def refund_search(self, client: bytes, day: str) -> None:
        key = budget_key(client, day)
        await self._run("budget", lambda: self._budget_refund(keys=[key], args=[]))

    async def searches_used(self, client: bytes, day: str) -> int:
        raw = await self._run("budget", lambda: self.client.get(budget_key(client, day)))
        return int(raw or 0)

    async def probe(self) -> dict[str, Any]:
        """What /health says of Redis, pinging it when nothing else has lately."""
        if self.health.due_for_probe():
            try:
                await self._run("ping", self.client.ping)
            except SharedStateUnavailable:
                pass
        if self.health.up:
            return {"redis": "up"}
        down_since = self.health.down_since
        since = round(self.health.clock() - down_since, 1) if down_since is not None else None
        return {
            "redis": "down",
            "down_for_s": since,
            "note": "rate limits and search budgets are per replica until Redis answers again",
        }

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # closing a broken connection must not fail shutdown
            logger.debug("shared state: closing redis failed: %s", type(exc).__name__)


def budget_key(client: bytes, day: str) -> str:
    return f"{BUDGET_PREFIX}{client.hex()}:{day}"
