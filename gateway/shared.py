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
import math
from collections.abc import Awaitable, Callable
from typing import Any

from .keys import FetchError, KeySet, parse_jwks
from .store import SharedState, StoreUnavailable

POLL = 0.02


def dump(key_set: KeySet) -> bytes:
    document = {"keys": list(key_set.jwks), "fetched_at": key_set.fetched_at, "jwks_uri": key_set.jwks_uri}
    return json.dumps(document, separators=(",", ":")).encode()


def load(raw: bytes, algorithms: tuple[str, ...], now: float) -> KeySet | None:
    """A key set published by another replica, validated again: the store is shared, not trusted blindly."""
    try:
        document: Any = json.loads(raw)
        keys, _ = parse_jwks(document, algorithms)
        fetched_at = float(document["fetched_at"])
        jwks_uri = str(document["jwks_uri"])
    except (ValueError, TypeError, KeyError, FetchError):
        return None
    if not keys or not math.isfinite(fetched_at):
        return None
    # A replica whose clock runs ahead must not make the set look fresh here for longer than it is.
    fetched_at = min(fetched_at, now)
    return KeySet(keys=keys, fetched_at=fetched_at, jwks_uri=jwks_uri, jwks=tuple(document["keys"]), source="redis")


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
        if reason != "kid":
            shared = self._fresh(await self._read(issuer, algorithms), since)
            if shared is not None:
                return shared
        lock = f"lock:{issuer}"
        token = await self.state.acquire(lock, self.timeout + 1)
        if token is None:
            return await self._after_lock(issuer, algorithms, known, since, reason)
        try:
            if reason == "kid":
                # One unknown-kid refresh per issuer per cooldown across all replicas. Taken under the lock, so
                # a replica that loses it waits for the fetch the winner makes, then adopts its result.
                if await self.state.acquire(f"cooldown:{issuer}", self.cooldown) is None:
                    return _newest(await self._read(issuer, algorithms), known)
            else:
                # The previous holder of the lock may have finished just before we took it.
                shared = self._fresh(await self._read(issuer, algorithms), since)
                if shared is not None:
                    return shared
            key_set = await upstream()
            # Redis failing now must not cost the issuer a second fetch: the set is good, sharing it is a bonus.
            with contextlib.suppress(StoreUnavailable):
                await self.state.put(f"keys:{issuer}", dump(key_set), self.max_age)
            return key_set
        finally:
            with contextlib.suppress(StoreUnavailable):  # else the lock expires by itself
                await self.state.release(lock, token)

    def _fresh(self, shared: KeySet | None, since: float) -> KeySet | None:
        """The shared set if it is newer than ours and not yet due for a refresh itself."""
        if shared is not None and shared.fetched_at > since and self.clock() - shared.fetched_at < self.ttl:
            return shared
        return None

    async def _after_lock(
        self, issuer: str, algorithms: tuple[str, ...], known: KeySet | None, since: float, reason: str
    ) -> KeySet:
        """Wait while another replica holds the refresh lock, then take what it published."""
        try:
            async with asyncio.timeout(self.timeout + 1):
                while await self.state.get(f"lock:{issuer}") is not None:
                    shared = await self._read(issuer, algorithms)
                    if shared is not None and shared.fetched_at > since:
                        return shared
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise FetchError("timed out waiting for another replica's refresh of this issuer's keys") from None
        shared = await self._read(issuer, algorithms)
        if shared is not None and shared.fetched_at > since:
            return shared
        if reason == "kid":
            return _newest(shared, known)
        raise FetchError("another replica's refresh of this issuer's keys did not succeed")

    async def _read(self, issuer: str, algorithms: tuple[str, ...]) -> KeySet | None:
        raw = await self.state.get(f"keys:{issuer}")
        return None if raw is None else load(raw, algorithms, self.clock())


def _newest(*candidates: KeySet | None) -> KeySet:
    present = [c for c in candidates if c is not None]
    if not present:
        raise FetchError("no key set for this issuer is available from any replica")
    return max(present, key=lambda c: c.fetched_at)
