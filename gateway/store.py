"""Replicated state behind one interface: spending token ids (and, with Redis, sharing keys).

`MemoryStore` serves one process; the Redis store (for replicas) implements the same methods. The app is
handed one of them by `create_app` and never knows which.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from cachetools import TLRUCache
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import ReplayStoreUnavailable

T = TypeVar("T")


def jti_key(issuer: str, jti: str) -> str:
    # Hashed so an attacker-chosen jti of any length or content becomes a fixed-size, inert key.
    return f"jti:{issuer}:{hashlib.sha256(jti.encode('utf-8', 'surrogatepass')).hexdigest()}"


class SharedState(Protocol):
    """What replicas need to share key sets: plain values with expiry, and locks owned by a token."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...

    async def acquire(self, key: str, ttl: float) -> str | None: ...

    async def release(self, key: str, token: str) -> None: ...


class Store(Protocol):
    # Set when the store is shared by replicas; the key cache then coordinates through it.
    shared: SharedState | None

    async def spend(self, key: str, ttl: float) -> bool:
        """Mark `key` spent for `ttl` seconds; True for the first caller only, atomically."""

    async def ready(self) -> bool:
        """Whether this replica can serve mints (a fallback that keeps it serving counts as ready)."""

    async def aclose(self) -> None: ...


class MemoryStore:
    # One million live token ids at once; past that, spending fails closed rather than evicting a live id,
    # which would let that token be replayed.
    def __init__(self, clock: Callable[[], float], maxsize: int = 1_000_000) -> None:
        self._spent: TLRUCache[str, float] = TLRUCache(
            maxsize=maxsize, ttu=lambda _key, expires, _now: expires, timer=clock
        )
        self._clock = clock
        self.shared: SharedState | None = None

    async def spend(self, key: str, ttl: float) -> bool:
        # No await between the check and the write: on one event loop this is atomic.
        if key in self._spent:
            return False
        self._spent.expire()
        if self._spent.currsize >= self._spent.maxsize:
            raise ReplayStoreUnavailable("the replay store is full; retry shortly")
        self._spent[key] = self._clock() + ttl
        return True

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class RedisStore:
    """Shared state for replicas. Every call is bounded by `timeout`, so a hung Redis cannot hang a request."""

    # Deletes the lock only if it still holds our token: a lock that expired and was taken by another replica
    # must not be released by the first owner.
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(
        self,
        client: Redis,
        *,
        clock: Callable[[], float],
        fallback: bool = False,
        timeout: float = 0.5,
        prefix: str = "gateway:",
    ) -> None:
        self.client = client
        self.fallback = MemoryStore(clock) if fallback else None
        self.timeout = timeout
        self.prefix = prefix
        self.failures = 0
        self.shared: SharedState | None = self

    @classmethod
    def from_url(
        cls, url: str, *, clock: Callable[[], float], fallback: bool = False, timeout: float = 0.5
    ) -> RedisStore:
        # A blocking pool queues requests for a free connection (up to `timeout`) instead of failing them
        # when a burst needs more connections than the pool holds.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            # One quick retry hides a dropped idle connection; more would stretch a request past its budget.
            retry=Retry(NoBackoff(), retries=1),
        )
        return cls(Redis(connection_pool=pool), clock=clock, fallback=fallback, timeout=timeout)

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout * 3):
                return await command
        except (RedisError, OSError, TimeoutError) as e:
            self.failures += 1
            raise StoreUnavailable(str(e) or type(e).__name__) from None

    async def spend(self, key: str, ttl: float) -> bool:
        try:
            result = await self._call(self.client.set(self.prefix + key, b"1", nx=True, px=max(1, int(ttl * 1000))))
        except StoreUnavailable:
            if self.fallback is not None:
                return await self.fallback.spend(key, ttl)
            raise ReplayStoreUnavailable(
                "the shared replay store is unreachable, so the token cannot be spent safely; it was not "
                "spent, retry shortly"
            ) from None
        return result is True

    async def ready(self) -> bool:
        return await self.reachable() or self.fallback is not None

    async def reachable(self) -> bool:
        try:
            return bool(await self._call(self.client.ping()))
        except StoreUnavailable:
            return False

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self.client.get(self.prefix + key))
        return value.encode() if isinstance(value, str) else value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(self.client.set(self.prefix + key, value, px=max(1, int(ttl * 1000))))

    async def acquire(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        won = await self._call(self.client.set(self.prefix + key, token, nx=True, px=max(1, int(ttl * 1000))))
        return token if won else None

    async def release(self, key: str, token: str) -> None:
        await self._call(self.client.eval(self._RELEASE, 1, self.prefix + key, token))

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


class StoreUnavailable(Exception):
    """Redis could not be reached within the timeout."""
