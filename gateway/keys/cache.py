"""The per-issuer key cache of one process, in front of the replica-shared tier (shared.py) and the issuer.

The cache follows two rules. Fail closed on tokens, degrade gracefully on keys: the last good key set keeps
serving (up to `max_age`) while the issuer is unreachable, and an empty or invalid set is never cached.
And an attacker must not be able to turn token requests into upstream traffic: an unknown `kid` causes at most
one refresh per issuer per cooldown, concurrent requests share one fetch, and a stale but usable key set is
refreshed in the background instead of in a request's path.

A `Keys` never changes after it is built: a reload builds a new one (`rebuilt`) for the new issuers and policy,
which takes over the cached sets of issuers whose trust (URL, CA content, algorithms) and fetch limits are
unchanged, and starts empty for the others, so a changed CA bundle or a name re-pointed at another URL never
serves keys fetched under the old trust.

Issuers with a `jwks_file` (static.py) bypass all of it: their key set is the file config read, built anew with
every `Keys`, never fetched or shared, and an unknown kid is refused at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
from joserfc.jwk import Key

from ..errors import InvalidToken, IssuerUnavailable
from ..issuers import Issuer
from .fetch import Fetcher, FetchError, KeyPolicy, KeySet, trust_id
from .shared import Reason, SharedKeys
from .static import static_key_set

__all__ = ["FAILURE_BACKOFF", "Keys"]

log = logging.getLogger(__name__)

# After a failed fetch, wait this long before the next one that a TTL expiry would cause, so a down issuer is
# not asked again on every request. Unknown-kid refreshes have their own, longer cooldown.
FAILURE_BACKOFF = 5.0


@dataclass(slots=True)
class _State:
    key_set: KeySet | None = None
    kid_refresh_at: float | None = None
    failed_at: float | None = None
    inflight: asyncio.Task[KeySet | None] | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One issuer's fetcher and cached state; handed on by a reload that leaves its trust and limits alone."""

    trust: str
    fetcher: Fetcher
    state: _State = field(default_factory=_State)


@dataclass(slots=True)
class _Owned:
    """Everything built by any generation of the cache, so closing the newest closes what older ones left."""

    entries: list[_Entry] = field(default_factory=list)


class Keys:
    def __init__(
        self,
        issuers: Mapping[str, Issuer],
        policy: KeyPolicy,
        *,
        clock: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
        shared: SharedKeys | None = None,
        on_fetch: Callable[[str, str], None] | None = None,
        on_lookup: Callable[[str], None] | None = None,
        _previous: Keys | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.shared = shared
        # Observers for metrics: (issuer, "ok"|"error") per upstream fetch; the cache level that had a key.
        self.on_fetch = on_fetch or (lambda issuer, outcome: None)
        self.on_lookup = on_lookup or (lambda level: None)
        self._transport = transport
        self._owned: _Owned = _previous._owned if _previous is not None else _Owned()
        reusable = {} if _previous is None else {e.trust: e for e in _previous._entries.values()}
        if _previous is not None and (_previous.policy.timeout, _previous.policy.max_bytes) != (
            policy.timeout,
            policy.max_bytes,
        ):
            reusable = {}
        self._issuers = dict(issuers)
        self._entries: dict[str, _Entry] = {}
        # Issuers with a jwks_file: their keys as read by config, and no fetcher, no state, no shared tier.
        self._static: dict[str, KeySet] = {}
        for name, issuer in issuers.items():
            if issuer.jwks is not None:
                self._static[name] = key_set = static_key_set(issuer)
                for dropped in key_set.dropped:
                    log.warning("keys of issuer %s (jwks_file %s): dropped %s", name, issuer.jwks_file, dropped)
                continue
            trust = trust_id(issuer)
            entry = reusable.get(trust)
            if entry is None:
                fetcher = Fetcher(issuer, transport=transport, timeout=policy.timeout, max_bytes=policy.max_bytes)
                entry = _Entry(trust, fetcher)
                self._owned.entries.append(entry)
            self._entries[name] = entry

    def rebuilt(self, issuers: Mapping[str, Issuer], policy: KeyPolicy) -> Keys:
        """A cache for new issuers and policy, keeping what this one holds for issuers of unchanged trust.

        Nothing here changes: requests under way finish with this cache, and fetchers it no longer uses are
        closed with the app (they may still serve such a request).
        """
        return Keys(
            issuers,
            policy,
            clock=self.clock,
            transport=self._transport,
            shared=self.shared,
            on_fetch=self.on_fetch,
            on_lookup=self.on_lookup,
            _previous=self,
        )

    def state(self, issuer: str) -> _State:
        static = self._static.get(issuer)
        if static is not None:
            return _State(key_set=static)
        return self._entries[issuer].state

    async def key(self, issuer: str, kid: str) -> Key:
        static = self._static.get(issuer)
        if static is not None:
            return self._static_key(issuer, static, kid)
        entry = self._entries.get(issuer)
        if entry is None:
            raise self._unavailable(issuer)
        state = entry.state
        cached = state.key_set
        # Awaited only when the keys must be waited for: a coroutine per mint costs more than the check.
        key_set = self._fresh(issuer, state)
        if key_set is None:
            key_set = await self._load(issuer, state)
        key = key_set.keys.get(kid)
        if key is not None:
            self.on_lookup("memory" if key_set is cached else key_set.source)
            return key
        now = self.clock()
        if state.inflight is not None:
            key_set = await self._wait(issuer, state, "kid")
        elif state.kid_refresh_at is None or now - state.kid_refresh_at >= self.policy.cooldown:
            # Started here, counted whether or not the fetch succeeds: a flood of random kids gets one fetch.
            state.kid_refresh_at = now
            key_set = await self._wait(issuer, state, "kid")
        key = key_set.keys.get(kid)
        if key is None:
            raise InvalidToken(
                f"the issuer's key set has no key {kid!r}; if the issuer rotated keys just now, retry in "
                f"{int(self.policy.cooldown)} s"
            )
        self.on_lookup("memory" if key_set is cached else key_set.source)
        return key

    def _static_key(self, issuer: str, key_set: KeySet, kid: str) -> Key:
        key = key_set.keys.get(kid)
        if key is None:
            # Nothing to refresh: the file is all there is, so an unknown kid is refused at once, with no I/O.
            raise InvalidToken(
                f"issuer {issuer!r} has no key {kid!r} in its jwks_file; if the issuer rotated keys, its operator "
                "must update the file"
            )
        self.on_lookup(key_set.source)
        return key

    def _fresh(self, issuer: str, state: _State) -> KeySet | None:
        """The cached key set if it may still be used (a refresh started in the background when one is due), or
        None when the keys must be waited for (none yet, or older than max_age)."""
        key_set = state.key_set
        now = self.clock()
        if key_set is None or now - key_set.fetched_at >= self.policy.max_age:
            return None
        backing_off = state.failed_at is not None and now - state.failed_at < FAILURE_BACKOFF
        if now - key_set.fetched_at >= self.policy.ttl and state.inflight is None and not backing_off:
            self._start(issuer, state, "ttl")
        return key_set

    async def _load(self, issuer: str, state: _State) -> KeySet:
        """The key set when `_fresh` has none to give: waited for, unless the last fetch failed just now."""
        if state.failed_at is not None and self.clock() - state.failed_at < FAILURE_BACKOFF and state.inflight is None:
            raise self._unavailable(issuer)
        return await self._wait(issuer, state, "load")

    def _start(self, issuer: str, state: _State, reason: Reason) -> asyncio.Task[KeySet | None]:
        if state.inflight is None:
            task = asyncio.create_task(self._fetch(issuer, state, reason), name=f"keys:{issuer}")
            state.inflight = task
            task.add_done_callback(lambda _: setattr(state, "inflight", None))
        return state.inflight

    async def _wait(self, issuer: str, state: _State, reason: Reason) -> KeySet:
        # shield: a client that disconnects must not cancel the fetch other requests are waiting on.
        key_set = await asyncio.shield(self._start(issuer, state, reason))
        if key_set is None:
            raise self._unavailable(issuer)
        return key_set

    @staticmethod
    def _unavailable(issuer: str) -> IssuerUnavailable:
        return IssuerUnavailable(
            f"the keys of issuer {issuer!r} cannot be fetched right now and none are cached; retry shortly"
        )

    async def _upstream(self, issuer: str) -> KeySet:
        try:
            key_set = await self._entries[issuer].fetcher.fetch(self.clock)
        except FetchError:
            self.on_fetch(issuer, "error")
            raise
        self.on_fetch(issuer, "ok")
        return key_set

    async def _fetch(self, issuer: str, state: _State, reason: Reason) -> KeySet | None:
        """Returns the best key set after a fetch: the new one, the last good one if still usable, or None."""
        try:
            if self.shared is None:
                key_set = await self._upstream(issuer)
            else:
                key_set = await self.shared.refresh(
                    self._issuers[issuer], self.policy, state.key_set, reason, lambda: self._upstream(issuer)
                )
        except FetchError as e:
            state.failed_at = self.clock()
            state.last_error = str(e)
            log.warning("keys of issuer %s could not be fetched: %s", issuer, e)
            previous = state.key_set
            if previous is not None and self.clock() - previous.fetched_at < self.policy.max_age:
                return previous
            return None
        state.failed_at = None
        state.last_error = None
        if key_set is not state.key_set:
            for dropped in key_set.dropped:
                log.warning("keys of issuer %s: dropped %s", issuer, dropped)
        state.key_set = key_set
        return key_set

    async def settle(self) -> None:
        """Wait for fetches under way (for tests and shutdown)."""
        tasks = [e.state.inflight for e in self._owned.entries if e.state.inflight is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop fetches under way and close every fetcher any generation of this cache built."""
        for entry in self._owned.entries:
            if entry.state.inflight is not None:
                entry.state.inflight.cancel()
        await self.settle()
        for entry in self._owned.entries:
            await entry.fetcher.aclose()
