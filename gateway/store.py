"""Replicated state behind one interface: spending token ids (and, with Redis, sharing keys).

`MemoryStore` serves one process; the Redis store (for replicas) implements the same methods. The app is
handed one of them by `create_app` and never knows which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

from cachetools import TLRUCache

from .errors import ReplayStoreUnavailable


def jti_key(issuer: str, jti: str) -> str:
    # Hashed so an attacker-chosen jti of any length or content becomes a fixed-size, inert key.
    return f"jti:{issuer}:{hashlib.sha256(jti.encode('utf-8', 'surrogatepass')).hexdigest()}"


class Store(Protocol):
    async def spend(self, key: str, ttl: float) -> bool:
        """Mark `key` spent for `ttl` seconds; True for the first caller only, atomically."""

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryStore:
    # One million live token ids at once; past that, spending fails closed rather than evicting a live id,
    # which would let that token be replayed.
    def __init__(self, clock: Callable[[], float], maxsize: int = 1_000_000) -> None:
        self._spent: TLRUCache[str, float] = TLRUCache(
            maxsize=maxsize, ttu=lambda _key, expires, _now: expires, timer=clock
        )
        self._clock = clock

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
