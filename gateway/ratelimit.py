"""Rate limits per client address (before a token is parsed) and per (issuer, repository) (after verification).

Each rate ("60/minute") is a sliding-window counter: a request is allowed while the count of the current fixed
window plus the previous window's count, weighted by how much of it still overlaps the sliding window, stays under
the rate. Two integers per subject and rate, so memory is bounded whatever the traffic, and a burst at a window
boundary cannot double the rate as it could with fixed windows.

The counters live in Redis when replicas share one (so a limit holds for the whole gateway): one Lua script per
request checks every rate of a subject and counts the request only if all allow it. All keys of one subject share
a hash tag, so the script touches one slot and runs on Redis Cluster too. Without Redis, or while it is
unreachable, the same counting happens in-process: rate limiting is not what keeps tokens safe, so it fails open,
while spending token ids fails closed (store.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from cachetools import TLRUCache
from redis.exceptions import NoScriptError, RedisError

from .config import Rate, Settings, parse_rates
from .errors import RateLimited
from .store import RedisStore, Store

__all__ = ["RateLimits", "rate_limits"]

log = logging.getLogger(__name__)

# KEYS: per rate, its current window's counter then its previous window's. ARGV: the time (ms), then per rate its
# amount and window (ms). Returns {0, 0} when the request is allowed (and counted), else how many ms until it would
# be and the 1-based index of the rate that refused it. Only GET and SET (with PX) inside, so a Redis ACL user needs
# nothing beyond what the store uses, plus EVALSHA and EVAL.
_HIT = """
local elapsed = {}
local counts = {}
local waits = {0, 0}
for i = 1, #KEYS / 2 do
    local amount = tonumber(ARGV[2 * i])
    local window = tonumber(ARGV[2 * i + 1])
    local now = tonumber(ARGV[1]) % window
    elapsed[i] = now
    local current = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
    counts[i] = current
    local previous = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    if previous * (window - now) / window + current + 1 > amount then
        local wait
        if current <= amount - 1 then
            wait = window - window * (amount - 1 - current) / previous - now
        else
            wait = window - now + window - window * (amount - 1) / current
        end
        if wait > waits[1] then waits = {math.ceil(wait), i} end
    end
end
if waits[1] > 0 then return waits end
for i = 1, #KEYS / 2 do
    local window = tonumber(ARGV[2 * i + 1])
    redis.call('SET', KEYS[2 * i - 1], counts[i] + 1, 'PX', 2 * window - elapsed[i])
end
return {0, 0}
"""
_HIT_SHA = hashlib.sha1(_HIT.encode()).hexdigest()  # noqa: S324 -- the name Redis gives the script, not security


def rate_limits(
    settings: Settings, store: Store | None = None, *, clock: Callable[[], float] = time.time
) -> RateLimits | None:
    """The limits `settings` ask for, counted in the Redis of `store` when it has one."""
    if settings.rate_limit_client is None and settings.rate_limit_repository is None:
        return None
    redis = store if isinstance(store, RedisStore) else None
    return RateLimits(
        client=settings.rate_limit_client,
        repository=settings.rate_limit_repository,
        redis=redis.client if redis is not None else None,
        prefix=redis.prefix if redis is not None else "gateway:",
        clock=clock,
    )


class RateLimits:
    # After Redis failed, count in-process for this long before asking it again: a hung Redis must not cost
    # every request a timeout, nor fill the log with one warning per request.
    BACKOFF = 5.0
    # While Redis stays down, one warning per this many seconds says so (each failed retry is still counted).
    WARN_EVERY = 30.0

    def __init__(
        self,
        *,
        client: str | None,
        repository: str | None,
        redis: Any = None,
        prefix: str = "gateway:",
        timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
        max_subjects: int = 100_000,
    ) -> None:
        self.client = parse_rates(client) if client else ()
        self.repository = parse_rates(repository) if repository else ()
        # A redis-py asyncio client (Redis or RedisCluster); the store owns and closes it.
        self.redis = redis
        self.prefix = prefix
        self.timeout = timeout
        self.clock = clock
        # Called on every failed Redis call (for metrics); the app sets it.
        self.on_error: Callable[[], None] = lambda: None
        self._failed_at = float("-inf")
        self._warned_at = float("-inf")
        # (subject, window) -> [window number, its count, the previous window's count]. Bounded: past the bound the
        # least recently expiring subjects are forgotten, which only ever lets more requests through.
        self._local: TLRUCache[tuple[str, int], list[int]] = TLRUCache(
            maxsize=max_subjects, ttu=lambda key, _value, now: now + 2 * key[1], timer=clock
        )

    async def hit_client(self, address: str) -> None:
        await self._hit(self.client, f"client\n{address}", what=f"requests from {address}")

    async def hit_repository(self, issuer_url: str, repository: str) -> None:
        # By the issuer's URL, like every other key: two issuers a config happens to name alike never share.
        subject = f"repository\n{issuer_url}\n{repository.lower()}"
        await self._hit(self.repository, subject, what=f"token exchanges for {repository!r}")

    async def _hit(self, rates: tuple[Rate, ...], subject: str, *, what: str) -> None:
        if not rates:
            return
        now = self.clock()
        refused = None
        if self.redis is not None and time.monotonic() - self._failed_at >= self.BACKOFF:
            try:
                async with asyncio.timeout(self.timeout * 2):
                    refused = await self._hit_redis(rates, subject, now)
            except (RedisError, OSError, TimeoutError) as e:
                self.on_error()
                self._failed_at = time.monotonic()
                if self._failed_at - self._warned_at >= self.WARN_EVERY:
                    self._warned_at = self._failed_at
                    log.warning(
                        "rate limits: Redis unreachable (%s); counting in-process, asking again every %g s",
                        str(e) or type(e).__name__,
                        self.BACKOFF,
                    )
                refused = self._hit_local(rates, subject, now)
        else:
            refused = self._hit_local(rates, subject, now)
        if refused is not None:
            rate, wait = refused
            raise RateLimited(f"too many {what} (limit {rate}); retry later", retry_after=max(1, math.ceil(wait)))

    async def _hit_redis(self, rates: tuple[Rate, ...], subject: str, now: float) -> tuple[Rate, float] | None:
        # One hash tag per subject: every key of the script in one Cluster slot. Hashed, so an address or a
        # repository path of any content becomes a fixed-size, inert key.
        tag = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        keys: list[str] = []
        args: list[int] = [int(now * 1000)]
        for rate in rates:
            number = int(now // rate.seconds)
            base = f"{self.prefix}rate:{{{tag}}}:{rate.seconds}:"
            keys += [f"{base}{number}", f"{base}{number - 1}"]
            args += [rate.amount, rate.seconds * 1000]
        try:
            wait, index = await self.redis.evalsha(_HIT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            # First use on this server (or after a restart or SCRIPT FLUSH): EVAL loads it for the next time.
            wait, index = await self.redis.eval(_HIT, len(keys), *keys, *args)
        return None if not wait else (rates[int(index) - 1], int(wait) / 1000)

    def _hit_local(self, rates: tuple[Rate, ...], subject: str, now: float) -> tuple[Rate, float] | None:
        counters = []
        refused: tuple[Rate, float] | None = None
        for rate in rates:
            number, elapsed = divmod(now, rate.seconds)
            counter = self._local.get((subject, rate.seconds))
            if counter is None or counter[0] < number - 1:
                counter = [int(number), 0, 0]
            elif counter[0] == number - 1:
                counter = [int(number), 0, counter[1]]
            counters.append(counter)
            wait = _wait(rate, counter[1], counter[2], elapsed)
            if wait > 0 and (refused is None or wait > refused[1]):
                refused = (rate, wait)
        if refused is None:
            # Counted only when every rate allows it, as in Redis: a refused request costs no budget.
            for rate, counter in zip(rates, counters, strict=True):
                counter[1] += 1
                self._local[(subject, rate.seconds)] = counter
        return refused


def _wait(rate: Rate, current: int, previous: int, elapsed: float) -> float:
    """Seconds until one more request fits the sliding window, if no other arrives (0: it fits now). As in _HIT."""
    window, amount = rate.seconds, rate.amount
    if previous * (window - elapsed) / window + current + 1 <= amount:
        return 0.0
    if current <= amount - 1:
        # The previous window's weight fades within this window.
        return window - window * (amount - 1 - current) / previous - elapsed
    # This window is full: wait for it to become the previous one and fade enough.
    return window - elapsed + window - window * (amount - 1) / current
