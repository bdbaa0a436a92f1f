"""Replicated state behind one interface: spending token ids (and, with Redis, sharing keys).

`MemoryStore` serves one process; the Redis store (for replicas) implements the same methods. The app is
handed one of them by `create_app` and never knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from cachetools import TLRUCache, TTLCache
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import ReplayStoreUnavailable

T = TypeVar("T")


def jti_key(issuer_url: str, jti: str) -> str:
    # Hashed (issuer and jti together) so an attacker-chosen jti of any length or content becomes a fixed-size,
    # inert key, and no URL lands in Redis key names.
    digest = hashlib.sha256(f"{issuer_url}\n{jti}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"jti:{digest}"


class SharedState(Protocol):
    """What replicas need to share key sets: plain values with expiry, and locks owned by a token."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...

    async def acquire(self, key: str, ttl: float) -> str | None: ...

    async def release(self, key: str, token: str) -> None: ...


class Store(Protocol):
    # Set when the store is shared by replicas; the key cache then coordinates through it.
    shared: SharedState | None
    # Called on every failed call to a shared store (for metrics); the app sets it.
    on_error: Callable[[], None]

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
        self.on_error: Callable[[], None] = lambda: None

    def spent(self, key: str) -> bool:
        return key in self._spent

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
    """Shared state for replicas. Every call has a deadline, so a hung Redis cannot hang a request.

    A spend that times out may still be carried out when Redis wakes up, although the client was told its token
    was refused. So each spend writes a random attempt id, and an attempt that ended in an error is *unresolved*:
    the same replica lets a retry take its place at once, and a background task deletes it (only if it is still
    that attempt) once Redis answers again, so a retry at any replica succeeds. No minted token ever stems from
    an unresolved attempt, so neither opens a replay.

    With the opt-in fallback, the in-process store decides while Redis does not answer; it also remembers every
    spend Redis confirmed (so a replica never accepts its own tokens twice across an outage), and what it spent
    alone is written to Redis once Redis answers (so other replicas learn of it). Replays across replicas remain
    possible only while Redis is actually down: the price of choosing availability.
    """

    # Deletes the key only if it still holds our value: a lock that expired and was taken by another replica
    # must not be released by the first owner, nor a later spend undone.
    _DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    # SET NX, except that one of this replica's unresolved attempts (ARGV[3..]) may be replaced.
    _SPEND_OVER = """
        local held = redis.call('get', KEYS[1])
        if held then
            local replaceable = false
            for i = 3, #ARGV do if held == ARGV[i] then replaceable = true end end
            if not replaceable then return 0 end
        end
        redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
        return 1
    """

    def __init__(
        self,
        client: Redis,
        *,
        clock: Callable[[], float],
        fallback: bool = False,
        timeout: float = 0.5,
        deadline: float = 3.0,
        prefix: str = "gateway:",
    ) -> None:
        self.client = client
        self.fallback = MemoryStore(clock) if fallback else None
        self.timeout = timeout
        self.deadline = deadline
        self.prefix = prefix
        # An observer for metrics, set by the app.
        self.on_error: Callable[[], None] = lambda: None
        self.shared: SharedState | None = self
        self._unresolved: TTLCache[str, tuple[str, ...]] = TTLCache(maxsize=100_000, ttl=24 * 3600, timer=clock)
        # Writes owed to Redis once it answers, in order: (key, attempt) -> None to delete the attempt if it is
        # still there (it was unresolved), or the expiry time to record it (the fallback spent it).
        self._undo: dict[tuple[str, str], float | None] = {}
        self._clock = clock
        self._undoing: asyncio.Task[None] | None = None
        self._batch: list[tuple[str, str, int, asyncio.Future[bool]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Callable[[], float],
        fallback: bool = False,
        timeout: float = 0.5,
        prefix: str = "gateway:",
    ) -> RedisStore:
        # A blocking pool queues a burst for free connections instead of failing it; queueing is local
        # congestion, not an outage, so it may take longer than one Redis round trip (the call's deadline).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=100,
            timeout=2.5,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            # One quick retry hides a dropped idle connection; more would stretch a request past its budget.
            retry=Retry(NoBackoff(), retries=1),
        )
        return cls(Redis(connection_pool=pool), clock=clock, fallback=fallback, timeout=timeout, prefix=prefix)

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.deadline):
                return await command
        except (RedisError, OSError, TimeoutError) as e:
            self.on_error()
            raise StoreUnavailable(str(e) or type(e).__name__) from None

    async def spend(self, key: str, ttl: float) -> bool:
        name = self.prefix + key
        attempt = secrets.token_hex(8)
        millis = max(1, int(ttl * 1000))
        if self.fallback is not None and self.fallback.spent(key):
            return False
        earlier = self._unresolved.get(key, ())
        try:
            if earlier:
                won = await self._call(self.client.eval(self._SPEND_OVER, 1, name, attempt, millis, *earlier))
            else:
                won = await self._batched(name, attempt, millis)
        except StoreUnavailable:
            if self.fallback is None:
                self._unresolve(name, attempt)
                raise ReplayStoreUnavailable(
                    "the shared replay store did not answer, so the token could not be spent safely; retry shortly"
                ) from None
            # The fallback decides, and Redis is told once it answers (SET NX: a no-op if the attempt landed).
            self._owe(name, attempt, self._clock() + ttl)
            return await self.fallback.spend(key, ttl)
        if earlier:
            self._unresolved.pop(key, None)
        if won and self.fallback is not None:
            with contextlib.suppress(ReplayStoreUnavailable):  # a full fallback only forgets its mirror
                await self.fallback.spend(key, ttl)
        return bool(won)

    async def _batched(self, name: str, attempt: str, millis: int) -> bool:
        """SET NX PX, sent with every other spend of this event-loop tick in one pipeline.

        Under load many requests spend at once; one round trip for all of them instead of one each takes a
        quarter off a mint's CPU in Redis mode (bench/). The pipeline is not a transaction: each SET stands alone,
        and if the batch fails, every spend in it is unresolved, exactly as a lone one would be.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._batch.append((name, attempt, millis, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.create_task(self._send(batch), name="redis:spend")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, str, int, asyncio.Future[bool]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, attempt, millis, _ in batch:
            # execute_command, not set(): redis-py's set() copies its arguments through a decorator on every call.
            pipe.execute_command("SET", name, attempt, "PX", millis, "NX")
        try:
            results: list[Any] = await self._call(pipe.execute(raise_on_error=False))
        except StoreUnavailable as e:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(e)))
            return
        for (name, attempt, _, future), result in zip(batch, results, strict=True):
            if future.done():
                # Its request went away (the client disconnected): no token was minted for this spend, so it is
                # unresolved like a failed one, for the client's retry.
                if result is True:
                    self._unresolve(name, attempt)
                continue
            if isinstance(result, Exception):
                self.on_error()
                future.set_exception(StoreUnavailable(str(result)))
            else:
                future.set_result(bool(result))

    def _unresolve(self, name: str, attempt: str) -> None:
        key = name.removeprefix(self.prefix)
        self._unresolved[key] = (*self._unresolved.get(key, ()), attempt)[-8:]
        self._owe(name, attempt, None)

    def _owe(self, name: str, attempt: str, expires: float | None) -> None:
        self._undo[(name, attempt)] = expires
        self._start_undoing()

    def _start_undoing(self) -> None:
        if self._undoing is None or self._undoing.done():
            self._undoing = asyncio.create_task(self._undo_unresolved(), name="redis:undo")

    async def _undo_unresolved(self) -> None:
        """Once Redis answers again, settle what is owed: delete unresolved attempts (if still theirs), and record
        the spends the fallback made alone."""
        while self._undo:
            (name, attempt), expires = next(iter(self._undo.items()))
            try:
                if expires is None:
                    await self._call(self.client.eval(self._DELETE_IF, 1, name, attempt))
                elif expires > self._clock():
                    millis = max(1, int((expires - self._clock()) * 1000))
                    await self._call(self.client.set(name, attempt, nx=True, px=millis))
            except StoreUnavailable:
                await asyncio.sleep(self.timeout)
                continue
            del self._undo[(name, attempt)]

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
        await self._call(self.client.eval(self._DELETE_IF, 1, self.prefix + key, token))

    async def aclose(self) -> None:
        if self._sending:
            await asyncio.wait(self._sending, timeout=self.deadline)
        if self._undoing is not None:
            self._undoing.cancel()
            # wait(), not await: awaiting the cancelled task would re-raise its CancelledError in the caller.
            await asyncio.wait([self._undoing], timeout=1)
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


class StoreUnavailable(Exception):
    """Redis could not be reached within the timeout."""
