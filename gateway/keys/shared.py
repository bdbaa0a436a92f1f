"""Key sets shared by replicas through the store, so all replicas together behave like one cache.

Replicas keep their own in-process copy (cache.py); this module is what a replica does when that copy must be
filled or refreshed. It first looks at the set another replica published; if that will not do, it takes the
issuer's refresh lock and fetches upstream, or waits for the replica holding the lock and adopts its result.
So a cold start of many replicas under load costs the issuer one discovery and one JWKS fetch, and the
unknown-kid cooldown holds for all replicas together. If the store is unreachable, a replica fetches on its own:
keys degrade gracefully, while spending token ids (store.py) fails closed.

Every key is named by the issuer's trust id (fetch.trust_id: URL, CA content, algorithms), never by its config
name: two gateways on one Redis, or one gateway before and after a reload, may give one name to two issuers, and
neither may adopt the other's keys. A published set also carries its issuer's URL and is refused unless that is
ours and its jwks_uri is on our issuer's origin: the store is shared, not trusted blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ..issuers import Issuer
from ..store import SharedState, StoreUnavailable
from .fetch import FetchError, KeyPolicy, KeySet, parse_jwks, same_origin, trust_id

__all__ = ["Reason", "SharedKeys", "dump", "load", "names"]

POLL = 0.02

# What asked for a refresh: "load" (nothing usable cached), "ttl" (a background refresh) or "kid" (an unknown key
# id); only "kid" refreshes are subject to the shared cooldown.
Reason = Literal["load", "ttl", "kid"]


def names(issuer: Issuer) -> tuple[str, str, str]:
    """The store keys of an issuer's shared key set, its unknown-kid cooldown and its refresh lock."""
    ident = trust_id(issuer)
    return f"keys:{ident}", f"cooldown:{ident}", f"lock:{ident}"


def dump(issuer: Issuer, key_set: KeySet) -> bytes:
    document = {
        "issuer": issuer.url,
        "keys": list(key_set.jwks),
        "fetched_at": key_set.fetched_at,
        "jwks_uri": key_set.jwks_uri,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def load(raw: bytes, issuer: Issuer, now: float) -> KeySet | None:
    """A key set published by another replica, validated again as if just fetched; None if it will not do."""
    try:
        document: Any = json.loads(raw)
        published_by = document["issuer"]
        jwks_uri = document["jwks_uri"]
        fetched_at = float(document["fetched_at"])
        keys, _ = parse_jwks(document, issuer.algorithms)
    except (ValueError, TypeError, KeyError, FetchError):
        return None
    # The key names already differ per issuer; this catches a document written under the wrong name (a bug, or a
    # hand-made entry) before its keys verify a single token.
    if published_by != issuer.url or not isinstance(jwks_uri, str) or not same_origin(jwks_uri, issuer.url):
        return None
    if not keys or not math.isfinite(fetched_at):
        return None
    # A replica whose clock runs ahead must not make the set look fresh here for longer than it is.
    fetched_at = min(fetched_at, now)
    return KeySet(keys=keys, fetched_at=fetched_at, jwks_uri=jwks_uri, jwks=tuple(document["keys"]), source="redis")


class SharedKeys:
    """The replica-shared tier. Stateless but for the store and clock: the policy comes with each call, so a
    reload's new ttl, cooldown, max_age and timeout apply here at once, as they do to the in-process tier."""

    def __init__(self, state: SharedState, *, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    async def refresh(
        self,
        issuer: Issuer,
        policy: KeyPolicy,
        known: KeySet | None,
        reason: Reason,
        upstream: Callable[[], Awaitable[KeySet]],
    ) -> KeySet:
        """A key set newer than `known`: another replica's, or one fetched upstream under the issuer's lock."""
        try:
            return await self._refresh(issuer, policy, known, reason, upstream)
        except StoreUnavailable:
            return await upstream()

    async def _refresh(
        self,
        issuer: Issuer,
        policy: KeyPolicy,
        known: KeySet | None,
        reason: Reason,
        upstream: Callable[[], Awaitable[KeySet]],
    ) -> KeySet:
        keys_key, cooldown_key, lock_key = names(issuer)
        since = known.fetched_at if known is not None else float("-inf")
        if reason != "kid":
            shared = self._fresh(await self._read(keys_key, issuer), since, policy)
            if shared is not None:
                return shared
        token = await self.state.acquire(lock_key, policy.timeout + 1)
        if token is None:
            return await self._after_lock(issuer, policy, known, since, reason)
        try:
            if reason == "kid":
                # One unknown-kid refresh per issuer per cooldown across all replicas. Taken under the lock, so
                # a replica that loses it waits for the fetch the winner makes, then adopts its result.
                if await self.state.acquire(cooldown_key, policy.cooldown) is None:
                    return _newest(await self._read(keys_key, issuer), known)
            else:
                # The previous holder of the lock may have finished just before we took it.
                shared = self._fresh(await self._read(keys_key, issuer), since, policy)
                if shared is not None:
                    return shared
            key_set = await upstream()
            # Redis failing now must not cost the issuer a second fetch: the set is good, sharing it is a bonus.
            with contextlib.suppress(StoreUnavailable):
                await self.state.put(keys_key, dump(issuer, key_set), policy.max_age)
            return key_set
        finally:
            with contextlib.suppress(StoreUnavailable):  # else the lock expires by itself
                await self.state.release(lock_key, token)

    def _fresh(self, shared: KeySet | None, since: float, policy: KeyPolicy) -> KeySet | None:
        """The shared set if it is newer than ours and not yet due for a refresh itself."""
        if shared is not None and shared.fetched_at > since and self.clock() - shared.fetched_at < policy.ttl:
            return shared
        return None

    async def _after_lock(
        self, issuer: Issuer, policy: KeyPolicy, known: KeySet | None, since: float, reason: Reason
    ) -> KeySet:
        """Wait while another replica holds the refresh lock, then take what it published."""
        keys_key, _, lock_key = names(issuer)
        try:
            async with asyncio.timeout(policy.timeout + 1):
                while await self.state.get(lock_key) is not None:
                    shared = await self._read(keys_key, issuer)
                    if shared is not None and shared.fetched_at > since:
                        return shared
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise FetchError("timed out waiting for another replica's refresh of this issuer's keys") from None
        shared = await self._read(keys_key, issuer)
        if shared is not None and shared.fetched_at > since:
            return shared
        if reason == "kid":
            return _newest(shared, known)
        raise FetchError("another replica's refresh of this issuer's keys did not succeed")

    async def _read(self, key: str, issuer: Issuer) -> KeySet | None:
        raw = await self.state.get(key)
        return None if raw is None else load(raw, issuer, self.clock())


def _newest(*candidates: KeySet | None) -> KeySet:
    present = [c for c in candidates if c is not None]
    if not present:
        raise FetchError("no key set for this issuer is available from any replica")
    return max(present, key=lambda c: c.fetched_at)
