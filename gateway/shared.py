"""Key sets shared by replicas through the store, so all replicas together behave like one cache.

Replicas keep their own in-process copy (keys.py); this module is what a replica does when that copy must be
filled or refreshed. It first looks at the set another replica published; if that will not do, it takes the
issuer's refresh lock and fetches upstream, or waits for the replica holding the lock and adopts its result.
So a cold start of many replicas under load costs the issuer one discovery and one JWKS fetch, and the
unknown-kid cooldown holds for all replicas together. If the store is unreachable, a replica fetches on its own:
keys degrade gracefully, while spending token ids (store.py) fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from .keys import FetchError, KeySet, parse_jwks
from .store import SharedState, StoreUnavailable

POLL = 0.02


def dump(key_set: KeySet) -> bytes:
    document = {"keys": list(key_set.jwks), "fetched_at": key_set.fetched_at, "jwks_uri": key_set.jwks_uri}
    return json.dumps(document, separators=(",", ":")).encode()


def load(raw: bytes, algorithms: tuple[str, ...]) -> KeySet | None:
    """A key set published by another replica, validated again: the store is shared, not trusted blindly."""
    try:
        document: Any = json.loads(raw)
        keys, _ = parse_jwks(document, algorithms)
        fetched_at = float(document["fetched_at"])
        jwks_uri = str(document["jwks_uri"])
    except (ValueError, TypeError, KeyError, FetchError):
        return None
    if not keys:
        return None
    return KeySet(keys=keys, fetched_at=fetched_at, jwks_uri=jwks_uri, jwks=tuple(document["keys"]))


class SharedKeys:
    def __init__(
        self,
        state: SharedState,
        *,
        clock: Callable[[], float],
        ttl: float,
        cooldown: float,
        max_age: float,
        timeout: float,
    ) -> None:
        self.state = state
        self.clock = clock
        self.ttl = ttl
        self.cooldown = cooldown
        self.max_age = max_age
        self.timeout = timeout

    async def refresh(
        self,
        issuer: str,
        algorithms: tuple[str, ...],
        known: KeySet | None,
        reason: str,
        upstream: Callable[[], Awaitable[KeySet]],
    ) -> KeySet:
        """A key set newer than `known`: another replica's, or one fetched upstream under the issuer's lock."""
        try:
            return await self._refresh(issuer, algorithms, known, reason, upstream)
        except StoreUnavailable:
            return await upstream()

    async def _refresh(
        self,
        issuer: str,
        algorithms: tuple[str, ...],
        known: KeySet | None,
        reason: str,
        upstream: Callable[[], Awaitable[KeySet]],
    ) -> KeySet:
        since = known.fetched_at if known is not None else float("-inf")
        if reason == "kid":
            # One unknown-kid refresh per issuer per cooldown across all replicas. A replica that loses the race
            # adopts whatever the winner fetched instead of asking the issuer again.
            if await self.state.acquire(f"cooldown:{issuer}", self.cooldown) is None:
                return await self._adopt_after_lock(issuer, algorithms, known)
        else:
            shared = await self._read(issuer, algorithms)
            if shared is not None and shared.fetched_at > since and self.clock() - shared.fetched_at < self.ttl:
                return shared
        lock = f"lock:{issuer}"
        token = await self.state.acquire(lock, self.timeout + 1)
        if token is None:
            return await self._adopt_after_lock(issuer, algorithms, known, newer_than=since)
        try:
            key_set = await upstream()
            await self.state.put(f"keys:{issuer}", dump(key_set), self.max_age)
            return key_set
        finally:
            with contextlib.suppress(StoreUnavailable):  # else the lock expires by itself
                await self.state.release(lock, token)

    async def _adopt_after_lock(
        self,
        issuer: str,
        algorithms: tuple[str, ...],
        known: KeySet | None,
        newer_than: float | None = None,
    ) -> KeySet:
        """Wait while another replica holds the refresh lock, then take the newest shared set."""
        try:
            async with asyncio.timeout(self.timeout + 1):
                while await self.state.get(f"lock:{issuer}") is not None:
                    if newer_than is not None:
                        shared = await self._read(issuer, algorithms)
                        if shared is not None and shared.fetched_at > newer_than:
                            return shared
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise FetchError("timed out waiting for another replica's refresh of this issuer's keys") from None
        shared = await self._read(issuer, algorithms)
        if newer_than is None:
            candidates = [s for s in (shared, known) if s is not None]
            if candidates:
                return max(candidates, key=lambda s: s.fetched_at)
        elif shared is not None and shared.fetched_at > newer_than:
            return shared
        raise FetchError("another replica's refresh of this issuer's keys did not succeed")

    async def _read(self, issuer: str, algorithms: tuple[str, ...]) -> KeySet | None:
        raw = await self.state.get(f"keys:{issuer}")
        return None if raw is None else load(raw, algorithms)
