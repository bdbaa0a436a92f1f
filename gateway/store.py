"""Replicated state behind one interface: spending token ids (and, with Redis, sharing keys).

`MemoryStore` serves one process; the Redis store (for replicas) implements the same methods. The app is
handed one of them by `create_app` and never knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from cachetools import TTLCache
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import AskError, MovedError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from . import redisurl
from .errors import ReplayStoreUnavailable
from .redisclient import connect

log = logging.getLogger(__name__)

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

    def startup(self) -> None:
        """Start the store's checks of its backing server (in the background: they never delay serving)."""

    async def aclose(self) -> None: ...


class MemoryStore:
    """Spent keys in this process: a dict of expiry times, and a heap that finds the next to expire."""

    # One million live token ids at once; past that, spending fails closed rather than evicting a live id,
    # which would let that token be replayed.
    def __init__(self, clock: Callable[[], float], maxsize: int = 1_000_000) -> None:
        self._spent: dict[str, float] = {}
        # (expiry, key), one per spend: a key spent again after it expired has an older entry here too, which is
        # dropped when it comes up rather than searched for.
        self._expiries: list[tuple[float, str]] = []
        self._maxsize = maxsize
        self._clock = clock
        self.shared: SharedState | None = None
        self.on_error: Callable[[], None] = lambda: None

    def spent(self, key: str) -> bool:
        expires = self._spent.get(key)
        return expires is not None and self._clock() < expires

    async def spend(self, key: str, ttl: float) -> bool:
        # No await between the check and the write: on one event loop this is atomic.
        now = self._clock()
        expires = self._spent.get(key)
        if expires is not None and now < expires:
            return False
        self._expire(now)
        if len(self._spent) >= self._maxsize:
            raise ReplayStoreUnavailable("the replay store is full; retry shortly")
        self._spent[key] = now + ttl
        heapq.heappush(self._expiries, (now + ttl, key))
        return True

    def _expire(self, now: float) -> None:
        expiries, spent = self._expiries, self._spent
        while expiries and expiries[0][0] <= now:
            expires, key = heapq.heappop(expiries)
            if spent.get(key) == expires:
                del spent[key]

    async def ready(self) -> bool:
        return True

    def startup(self) -> None:
        return None

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

    With `replica_acks`, a spend counts only once that many replicas acknowledged it (WAIT), so a failover cannot
    forget the spend of a token that was minted; one not acknowledged in time is undone and answered 503.
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

    # At most one "Redis unreachable" warning per this many seconds while an outage lasts (each failure is
    # still counted in gateway_redis_errors_total).
    WARN_EVERY = 30.0

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        clock: Callable[[], float],
        fallback: bool = False,
        timeout: float = 0.5,
        deadline: float = 3.0,
        prefix: str = "gateway:",
        replica_acks: int = 0,
        replica_ack_timeout: float = 0.5,
        where: str = "Redis",
        closers: tuple[Callable[[], Awaitable[None]], ...] = (),
        sentinel: Sentinel | None = None,
    ) -> None:
        self.client = client
        self.fallback = MemoryStore(clock) if fallback else None
        self.timeout = timeout
        self.deadline = deadline
        self.prefix = prefix
        self.replica_acks = replica_acks
        self.replica_ack_timeout = replica_ack_timeout
        # Host names for logs (never a password).
        self.where = where
        # An observer for metrics, set by the app.
        self.on_error: Callable[[], None] = lambda: None
        self.shared: SharedState | None = self
        self._cluster = isinstance(client, RedisCluster)
        self._closers = closers
        self._sentinel = sentinel
        self._unresolved: TTLCache[str, tuple[str, ...]] = TTLCache(maxsize=100_000, ttl=24 * 3600, timer=clock)
        # Writes owed to Redis once it answers, in order: (key, attempt) -> None to delete the attempt if it is
        # still there (it was unresolved), or the expiry time to record it (the fallback spent it).
        self._undo: dict[tuple[str, str], float | None] = {}
        self._clock = clock
        self._undoing: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None
        self._batch: list[tuple[str, str, int, asyncio.Future[bool]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._warned_at = float("-inf")
        self._failing = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Callable[[], float],
        fallback: bool = False,
        timeout: float = 0.5,
        prefix: str = "gateway:",
        replica_acks: int = 0,
        replica_ack_timeout: float = 0.5,
        sentinel_password: str | None = None,
    ) -> RedisStore:
        """A store on the Redis `url` names: one server, a Sentinel-managed primary, or a Cluster (redisurl.py)."""
        target = redisurl.parse(url)
        connected = connect(target, timeout=timeout, sentinel_password=sentinel_password)
        return cls(
            connected.client,
            clock=clock,
            fallback=fallback,
            timeout=timeout,
            prefix=prefix,
            replica_acks=replica_acks,
            replica_ack_timeout=replica_ack_timeout,
            where=target.where(),
            closers=connected.closers,
            sentinel=connected.sentinel,
        )

    async def _call(self, command: Awaitable[T], *, longer: float = 0.0) -> T:
        try:
            async with asyncio.timeout(self.deadline + longer):
                result = await command
        except (RedisError, OSError, TimeoutError) as e:
            raise self._failed(e) from None
        if self._failing:
            self._failing = False
            log.info("Redis at %s answers again", self.where)
        return result

    def _failed(self, error: BaseException) -> StoreUnavailable:
        """Count a failed call, and warn (at most every WARN_EVERY seconds) naming where Redis is and why."""
        cause = _cause(error, self.deadline)
        self.on_error()
        self._failing = True
        now = time.monotonic()
        if now - self._warned_at >= self.WARN_EVERY:
            self._warned_at = now
            log.warning("Redis at %s is unreachable or failing: %s", self.where, cause)
        return StoreUnavailable(cause)

    async def spend(self, key: str, ttl: float) -> bool:
        name = self.prefix + key
        attempt = secrets.token_hex(8)
        millis = max(1, int(ttl * 1000))
        if self.fallback is not None and self.fallback.spent(key):
            return False
        earlier = self._unresolved.get(key, ())
        try:
            if self.replica_acks:
                won = await self._spend_replicated(name, attempt, millis, earlier)
            elif earlier:
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
        except NotReplicated:
            raise ReplayStoreUnavailable(
                f"the token's spend was not replicated to {self.replica_acks} Redis replica(s) within "
                f"{self.replica_ack_timeout:g} s, so it was undone and no token was minted (a failover could "
                "have forgotten it); retry shortly"
            ) from None
        if earlier:
            self._unresolved.pop(key, None)
        if won and self.fallback is not None:
            with contextlib.suppress(ReplayStoreUnavailable):  # a full fallback only forgets its mirror
                await self.fallback.spend(key, ttl)
        return bool(won)

    async def _spend_replicated(self, name: str, attempt: str, millis: int, earlier: tuple[str, ...]) -> bool:
        """The spend, then WAIT for `replica_acks` replicas, on one connection (WAIT counts the acknowledgements of
        that connection's writes); with a Cluster, on the node that owns the key's slot.

        A spend the replicas did not acknowledge in time is deleted again (if it is still this attempt) and raises
        NotReplicated: a primary that dies now could be replaced by a replica that never saw it, so nothing may be
        minted on it, and the token must stay spendable for the client's retry, at any replica.
        """
        wait_ms = max(1, int(self.replica_ack_timeout * 1000))
        if earlier:
            write: tuple[Any, ...] = ("EVAL", self._SPEND_OVER, 1, name, attempt, millis, *earlier)
        else:
            write = ("SET", name, attempt, "PX", millis, "NX")
        for _ in range(2):
            results = await self._call(self._write_and_wait(name, write, wait_ms), longer=self.replica_ack_timeout)
            written, acks = results
            if isinstance(written, (MovedError, AskError)) and isinstance(self.client, RedisCluster):
                # The slot moved (a failover or resharding): learn where, and try there once.
                await self._call(self.client.nodes_manager.move_slot(written))
                continue
            break
        if isinstance(written, Exception):
            raise self._failed(written)
        if not written:
            return False
        if isinstance(acks, int) and acks >= self.replica_acks:
            return True
        self.on_error()
        log.warning(
            "a spend at Redis %s was acknowledged by %s of the %d replicas required within %g s; undone, answered 503",
            self.where,
            acks if isinstance(acks, int) else f"none ({acks})",
            self.replica_acks,
            self.replica_ack_timeout,
        )
        try:
            await self._call(self.client.eval(self._DELETE_IF, 1, name, attempt))
        except StoreUnavailable:
            self._unresolve(name, attempt)
        else:
            # Still ours to replace at this replica, should the delete not reach a replica before a failover.
            key = name.removeprefix(self.prefix)
            self._unresolved[key] = (*self._unresolved.get(key, ()), attempt)[-8:]
        raise NotReplicated

    async def _write_and_wait(self, name: str, write: tuple[Any, ...], wait_ms: int) -> tuple[Any, Any]:
        """Send the write and WAIT together on one connection and read both replies (an error reply is returned,
        not raised). A pipeline would read WAIT's reply under the connection's socket timeout, which is shorter
        than the wait (and must stay short, to notice a hung Redis): each reply is read with its own deadline."""
        read_timeout = self.timeout + self.replica_ack_timeout
        commands = [write, ("WAIT", self.replica_acks, wait_ms)]
        release: Callable[[Any], Awaitable[None] | None]
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
            node = self.client.get_node_from_key(name)
            if node is None:
                raise RedisConnectionError(f"no Cluster node serves the slot of {name!r}")
            connection: Any = node.acquire_connection()
            release = node.release
        else:
            connection = await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            release = self.client.connection_pool.release
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            replies = [await _reply(connection, read_timeout) for _ in commands]
        except BaseException:
            # A reply may be left unread: the connection cannot be reused.
            await connection.disconnect()
            raise
        finally:
            released = release(connection)
            if released is not None:
                await released
        return replies[0], replies[1]

    def reconfigure(self, *, replica_acks: int, replica_ack_timeout: float, sentinel_password: str | None) -> None:
        """Apply the reloadable Redis settings to the running store (the rest of `redis_url` needs a restart)."""
        self.replica_acks = replica_acks
        self.replica_ack_timeout = replica_ack_timeout
        sentinel = self._sentinel
        if sentinel is not None and sentinel.sentinel_kwargs.get("password") != sentinel_password:
            # A client's connections keep the password they were made with: new clients, the old ones closed.
            sentinel.sentinel_kwargs["password"] = sentinel_password
            old, sentinel.sentinels = (
                sentinel.sentinels,
                [
                    Redis(
                        host=client.connection_pool.connection_kwargs["host"],
                        port=client.connection_pool.connection_kwargs["port"],
                        **sentinel.sentinel_kwargs,
                    )
                    for client in sentinel.sentinels
                ],
            )
            task = asyncio.get_running_loop().create_task(_close_all(old))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

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
        try:
            if len(batch) == 1:
                # A lone spend (a quiet moment) as a plain command: a pipeline of one costs twice the CPU. An error
                # reply fails it as a failed batch of one would.
                # execute_command, not set(): redis-py's set() copies its arguments through a decorator every call.
                name, attempt, millis, _ = batch[0]
                command = self.client.execute_command("SET", name, attempt, "PX", millis, "NX")
                results: list[Any] = [await self._call(command)]
            else:
                pipe = self.client.pipeline(transaction=False)
                for name, attempt, millis, _ in batch:
                    pipe.execute_command("SET", name, attempt, "PX", millis, "NX")
                results = await self._call(pipe.execute(raise_on_error=False))
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
                future.set_exception(self._failed(result))
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

    def startup(self) -> None:
        if self._checking is None:
            self._checking = asyncio.create_task(self._check_server(), name="redis:check")

    async def _check_server(self) -> None:
        """Say at startup what would cost spends in a failure: no persistence, or fewer replicas than acks need.

        An unreachable Redis is reported (and counted) like any failed call. Managed Redis services often refuse
        CONFIG; that is not an outage, so it is said once at INFO and not counted.
        """
        nodes: list[Any] = [None]  # None: the one server (or Sentinel's primary) the client talks to
        if isinstance(self.client, RedisCluster):
            try:
                await self._call(self.client.initialize())
            except StoreUnavailable:
                return
            nodes = self.client.get_primaries()
        for node in nodes:
            target = {"target_nodes": node} if node is not None else {}
            where = f"{node.host}:{node.port}" if node is not None else self.where
            try:
                async with asyncio.timeout(self.deadline):
                    appendonly = await self.client.config_get("appendonly", **target)
                    save = await self.client.config_get("save", **target)
            except ResponseError as e:
                log.info("could not check whether Redis at %s persists spends (CONFIG GET refused: %s)", where, e)
            except (RedisError, OSError, TimeoutError) as e:
                self._failed(e)
                return
            else:
                if appendonly.get("appendonly") != "yes" and not save.get("save"):
                    log.warning(
                        'Redis at %s persists nothing (appendonly no, save ""): a restart forgets every spent '
                        "token, which can then be exchanged again until it expires",
                        where,
                    )
            if not self.replica_acks:
                continue
            try:
                async with asyncio.timeout(self.deadline):
                    info = await self.client.info("replication", **target)
            except ResponseError as e:
                log.info("could not check how many replicas Redis at %s has (INFO refused: %s)", where, e)
                continue
            except (RedisError, OSError, TimeoutError) as e:
                self._failed(e)
                return
            replicas = int(info.get("connected_slaves", 0))
            if replicas < self.replica_acks:
                log.warning(
                    "Redis at %s has %d replica(s) connected but redis_replica_acks is %d: spends are answered "
                    "503 until enough replicas acknowledge them",
                    where,
                    replicas,
                    self.replica_acks,
                )

    async def aclose(self) -> None:
        if self._sending:
            await asyncio.wait(self._sending, timeout=self.deadline)
        for task in (self._undoing, self._checking):
            if task is not None:
                task.cancel()
                # wait(), not await: awaiting the cancelled task would re-raise its CancelledError in the caller.
                await asyncio.wait([task], timeout=1)
        await self.client.aclose()
        if isinstance(self.client, Redis):
            await self.client.connection_pool.disconnect()
        for close in self._closers:
            await close()


def _cause(error: BaseException, deadline: float) -> str:
    """What went wrong, for an operator: redis-py says "Error 111 connecting to ..." and leaves out what 111 is."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"no answer within {deadline:g} s"
    cause = str(error) or type(error).__name__
    inner: BaseException | None = error
    for _ in range(5):  # the chain redis-py leaves: its own error, then the socket's
        if inner is None:
            break
        if isinstance(inner, OSError) and inner.errno:
            return f"{cause} ({os.strerror(inner.errno)})"
        inner = inner.__cause__ or inner.__context__
    return cause


async def _close_all(clients: list[Redis]) -> None:
    for client in clients:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()


async def _reply(connection: Any, seconds: float) -> Any:
    try:
        return await connection.read_response(timeout=seconds)
    except ResponseError as e:  # an error reply (MOVED, NOREPLICAS, OOM, ...): the next reply is still there
        return e


class StoreUnavailable(Exception):
    """Redis could not be reached within the timeout."""


class NotReplicated(Exception):
    """A spend was not acknowledged by enough replicas in time, and was undone."""
