"""Rate limits per client address (before a token is parsed) and per (issuer, repository) (after verification).

The counting is the `limits` library's sliding-window counter, kept in Redis when replicas share one (so a limit
holds for the whole gateway) and in-process otherwise. Rate limiting is not what keeps tokens safe, so it fails
open to the in-process counters when Redis is unreachable, while spending token ids fails closed (store.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from .errors import RateLimited

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)


def rate_limits(settings: Settings, *, redis_url: str | None = None) -> RateLimits | None:
    """The limits `settings` ask for, counted in the Redis at `redis_url` (default: the settings' own)."""
    if settings.rate_limit_client is None and settings.rate_limit_repository is None:
        return None
    return RateLimits(
        client=settings.rate_limit_client,
        repository=settings.rate_limit_repository,
        redis_url=redis_url or settings.redis_url,
        prefix=settings.redis_prefix,
    )


class RateLimits:
    # After Redis failed, count in-process for this long before asking it again: a hung Redis must not cost
    # every request a timeout, nor fill the log with one warning per request.
    BACKOFF = 5.0

    def __init__(
        self,
        *,
        client: str | None,
        repository: str | None,
        redis_url: str | None = None,
        timeout: float = 0.5,
        prefix: str = "gateway:",
    ) -> None:
        self.client = tuple(parse_many(client)) if client else ()
        self.repository = tuple(parse_many(repository)) if repository else ()
        self.timeout = timeout
        # Called on every failed Redis call (for metrics); the app sets it.
        self.on_error: Callable[[], None] = lambda: None
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._storage: RedisStorage | None = None
        self._failed_at = float("-inf")
        if redis_url is not None and (self.client or self.repository):
            self._storage = RedisStorage(
                redis_url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=f"{prefix}limits",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
            self._shared = SlidingWindowCounterRateLimiter(self._storage)

    async def hit_client(self, address: str) -> None:
        await self._hit(self.client, "client", address, what=f"requests from {address}")

    async def hit_repository(self, issuer: str, repository: str) -> None:
        await self._hit(
            self.repository, "repository", issuer, repository.lower(), what=f"token exchanges for {repository!r}"
        )

    def _limiter(self) -> SlidingWindowCounterRateLimiter:
        if self._shared is not None and time.monotonic() - self._failed_at >= self.BACKOFF:
            return self._shared
        return self._local

    async def _hit(self, items: tuple[RateLimitItem, ...], *key: str, what: str) -> None:
        for item in items:
            limiter = self._limiter()
            try:
                async with asyncio.timeout(self.timeout * 2):
                    allowed = await limiter.hit(item, *key)
            except (StorageError, TimeoutError, OSError) as e:
                self.on_error()
                self._failed_at = time.monotonic()
                log.warning("rate limit store unreachable; counting in-process for %g s: %s", self.BACKOFF, e)
                limiter = self._local
                allowed = await limiter.hit(item, *key)
            if not allowed:
                raise RateLimited(
                    f"too many {what} (limit {item}); retry later",
                    retry_after=await self._retry_after(limiter, item, key),
                )

    async def _retry_after(
        self, limiter: SlidingWindowCounterRateLimiter, item: RateLimitItem, key: tuple[str, ...]
    ) -> int:
        try:
            async with asyncio.timeout(self.timeout * 2):
                stats = await limiter.get_window_stats(item, *key)
            return max(1, math.ceil(stats.reset_time - time.time()))
        except (StorageError, TimeoutError, OSError):
            self.on_error()
            return item.get_expiry()

    async def aclose(self) -> None:
        if self._storage is not None:
            # `limits` has no close of its own; its redis-py client is reached through the storage's bridge.
            client = getattr(getattr(self._storage, "bridge", None), "storage", None)
            if client is not None:
                await client.aclose()
