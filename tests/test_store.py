"""The replay store: spending token ids once, in-process and in a real Redis, including Redis failing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from gateway.errors import ReplayStoreUnavailable
from gateway.store import MemoryStore, RedisStore, jti_key
from gateway.testing import FakeClock
from tests.redis_server import REDIS_SERVER, RedisServer

T = TypeVar("T")

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

# RedisStore bounds every call by 3 x its timeout (0.5 s by default); a little slack for a loaded machine.
# Every Redis call has a deadline (RedisStore.deadline, 3 s); a request must answer within it plus scheduling.
BOUND = 3.5


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own, shared by the tests that leave it running."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server(module_redis: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis, emptied for each test (it is ours alone, so FLUSHALL is safe)."""
    with module_redis.client() as client:
        client.flushall()
    yield module_redis


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis for one test, which it may kill, restart or freeze."""
    # Closing kills it even if the test left it frozen.
    with RedisServer() as server:
        yield server


@pytest.fixture
async def make_store(clock: FakeClock) -> AsyncIterator[Callable[..., RedisStore]]:
    """Build RedisStores the way the app does (`from_url`), closed at teardown."""
    made: list[RedisStore] = []

    def make(url: str, *, fallback: bool = False) -> RedisStore:
        made.append(RedisStore.from_url(url, clock=clock, fallback=fallback))
        return made[-1]

    yield make
    for store in made:
        await store.aclose()


async def timed(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    """The outcome of `call` (value or exception) and how long it took in wall time."""
    started = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as e:
        result = e
    return result, time.monotonic() - started


# In-process store


async def test_memory_spend_is_true_once(clock: FakeClock) -> None:
    """The first spend of a key wins and every later one within the ttl loses."""
    store = MemoryStore(clock)
    assert await store.spend("jti:a", 60) is True
    assert await store.spend("jti:a", 60) is False
    assert await store.spend("jti:b", 60) is True


async def test_memory_spend_expires_after_ttl(clock: FakeClock) -> None:
    """A spent key is remembered until its ttl has passed on the injected clock, and not after."""
    store = MemoryStore(clock)
    assert await store.spend("jti:a", 10) is True
    clock.advance(9.9)
    assert await store.spend("jti:a", 10) is False
    clock.advance(0.2)
    assert await store.spend("jti:a", 10) is True


async def test_memory_respend_outlives_its_earlier_expiry(clock: FakeClock) -> None:
    """A key spent again after it expired keeps its new expiry when its first one comes due: the first spend's
    expiry, still queued, must not forget the second spend."""
    store = MemoryStore(clock)
    assert await store.spend("jti:a", 10) is True
    clock.advance(10.5)
    assert await store.spend("jti:a", 100) is True
    clock.advance(5)
    assert await store.spend("jti:b", 100) is True  # expires what is due, the first spend of jti:a among them
    assert store.spent("jti:a")
    assert await store.spend("jti:a", 100) is False
    clock.advance(96)
    assert not store.spent("jti:a")
    assert await store.spend("jti:a", 100) is True


async def test_memory_full_store_fails_closed(clock: FakeClock) -> None:
    """A full store refuses new keys with replay-store-unavailable rather than evicting a live one."""
    store = MemoryStore(clock, maxsize=2)
    assert await store.spend("jti:a", 60) is True
    assert await store.spend("jti:b", 60) is True
    with pytest.raises(ReplayStoreUnavailable) as refused:
        await store.spend("jti:c", 60)
    assert refused.value.status == 503
    assert refused.value.code == "replay-store-unavailable"
    # Nothing was evicted to make room: both live keys are still spent.
    assert await store.spend("jti:a", 60) is False
    assert await store.spend("jti:b", 60) is False
    # Once they expire, the room is there again.
    clock.advance(61)
    assert await store.spend("jti:c", 60) is True


# Redis store against a real redis-server


async def test_redis_spend_once_across_clients(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """Two clients of one Redis (two replicas) let exactly one spend of a key win, also when racing."""
    a, b = make_store(redis_server.url), make_store(redis_server.url)
    assert await a.spend("jti:one", 60) is True
    assert await b.spend("jti:one", 60) is False
    assert await a.spend("jti:one", 60) is False

    racing = await asyncio.gather(*(store.spend("jti:race", 60) for _ in range(20) for store in (a, b)))
    assert racing.count(True) == 1


async def test_redis_spends_of_one_tick_share_a_round_trip(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """Concurrent spends go to Redis as one pipeline, and each keeps its own answer (one key twice: one wins)."""
    store = make_store(redis_server.url)
    with redis_server.client() as client:
        client.config_resetstat()
        before = client.info("stats")["total_connections_received"]
        keys = [f"jti:{n}" for n in range(50)] + ["jti:twice", "jti:twice"]
        outcomes = await asyncio.gather(*(store.spend(key, 60) for key in keys))
        after = client.info("stats")["total_connections_received"]
        sets = client.info("commandstats")["cmdstat_set"]["calls"]
    assert outcomes[:50] == [True] * 50
    assert sorted(outcomes[50:]) == [False, True]
    assert sets == 52
    # One connection for all 52: sent one by one, concurrent spends would each have taken one from the pool.
    assert after - before == 1


async def test_redis_key_lives_at_least_the_ttl_asked(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """The spent key's expiry in Redis covers the whole ttl asked, to the millisecond, not rounded down."""
    store = make_store(redis_server.url)
    asked = 12.3456
    await store.spend("jti:ttl", asked)
    with redis_server.client() as inspect:
        pttl = inspect.pttl("gateway:jti:ttl")
    # PTTL counts down in real time from the moment of the SET; a second is far more than this test takes.
    assert asked * 1000 - 1000 < pttl <= asked * 1000


async def test_redis_keys_hash_the_jti(redis_server: RedisServer, make_store: Callable[..., RedisStore]) -> None:
    """Redis keys carry a fixed-size hash of issuer and jti, never the attacker-chosen jti itself."""
    store = make_store(redis_server.url)
    jtis = ["plain-jti-0123", "x" * 10_000, "sp ace\r\nSET evil 1\r\n", "\u2603-snow-\ud800-lone-surrogate"]
    for jti in jtis:
        assert await store.spend(jti_key("https://gitlab.example", jti), 60) is True
    with redis_server.client() as inspect:
        keys = [key.decode() for key in inspect.scan_iter(count=1000)]
    assert len(keys) == len(jtis)
    for key in keys:
        prefix, _, digest = key.rpartition(":")
        assert prefix == "gateway:jti"
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
    for jti in jtis:
        assert not any(jti[:12] in key for key in keys)


async def test_redis_lock_belongs_to_its_owner(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """A lock is held by one client at a time and only its token releases it."""
    a, b = make_store(redis_server.url), make_store(redis_server.url)
    token = await a.acquire("lock:gitlab-com", 30)
    assert token is not None
    assert await b.acquire("lock:gitlab-com", 30) is None

    await b.release("lock:gitlab-com", "not-the-owners-token")
    assert await b.get("lock:gitlab-com") == token.encode()
    assert await b.acquire("lock:gitlab-com", 30) is None

    await a.release("lock:gitlab-com", token)
    assert await b.get("lock:gitlab-com") is None
    assert await b.acquire("lock:gitlab-com", 30) is not None


async def test_redis_lock_expires_and_old_owner_cannot_release_new_one(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """A lock whose holder vanished expires by itself, and the late holder's release leaves the next owner's lock."""
    a, b = make_store(redis_server.url), make_store(redis_server.url)
    old = await a.acquire("lock:gitlab-com", 0.05)
    assert old is not None
    # Redis expires keys on its own clock, which the FakeClock cannot advance: poll it, bounded.
    deadline = time.monotonic() + BOUND
    new = await b.acquire("lock:gitlab-com", 30)
    while new is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        new = await b.acquire("lock:gitlab-com", 30)
    assert new is not None, "the lock did not expire"

    await a.release("lock:gitlab-com", old)
    assert await b.get("lock:gitlab-com") == new.encode()


async def test_redis_put_and_get_round_trip_with_expiry(
    redis_server: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """Values put by one client are read as bytes by another, with the expiry asked for."""
    a, b = make_store(redis_server.url), make_store(redis_server.url)
    await a.put("keys:gitlab-com", b'{"keys":[]}', 3600)
    assert await b.get("keys:gitlab-com") == b'{"keys":[]}'
    assert await b.get("keys:nobody") is None
    with redis_server.client() as inspect:
        assert 3599_000 < inspect.pttl("gateway:keys:gitlab-com") <= 3600_000


# Redis failing


async def test_killed_redis_fails_closed_quickly(own_redis: RedisServer, make_store: Callable[..., RedisStore]) -> None:
    """With Redis dead, spending raises replay-store-unavailable within the bound and the store is not ready."""
    store = make_store(own_redis.url)
    assert await store.spend("jti:before", 60) is True
    assert await store.ready() is True

    own_redis.stop()
    outcome, took = await timed(store.spend("jti:during", 60))
    assert isinstance(outcome, ReplayStoreUnavailable)
    assert outcome.status == 503 and outcome.code == "replay-store-unavailable"
    assert "retry" in outcome.description
    assert took < BOUND
    ready, took = await timed(store.ready())
    assert ready is False and took < BOUND
    assert await store.reachable() is False


async def test_killed_redis_with_fallback_spends_in_process(
    own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """With the fallback opted into, a dead Redis leaves spending working in-process (once per key) and ready."""
    store = make_store(own_redis.url, fallback=True)
    own_redis.stop()
    assert await store.spend("jti:during", 60) is True
    assert await store.spend("jti:during", 60) is False
    assert await store.ready() is True
    # Ready thanks to the fallback, but an operator can still see that Redis itself is gone.
    assert await store.reachable() is False


async def test_restarted_redis_is_reconnected_by_the_same_client(
    own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """After Redis comes back on the same port, the client that saw it die reconnects by itself."""
    store = make_store(own_redis.url)
    assert await store.spend("jti:before", 60) is True
    own_redis.stop()
    with pytest.raises(ReplayStoreUnavailable):
        await store.spend("jti:during", 60)
    assert await store.ready() is False

    own_redis.start()
    assert await store.ready() is True
    assert await store.spend("jti:after", 60) is True
    assert await store.spend("jti:after", 60) is False


async def test_hung_redis_fails_within_the_bound(own_redis: RedisServer, make_store: Callable[..., RedisStore]) -> None:
    """A frozen Redis (accepting connections, answering nothing) makes spend and ready fail in bounded time."""
    store = make_store(own_redis.url)
    assert await store.spend("jti:before", 60) is True
    own_redis.pause()

    outcome, took = await timed(store.spend("jti:during", 60))
    assert isinstance(outcome, ReplayStoreUnavailable)
    assert took < BOUND
    ready, took = await timed(store.ready())
    assert ready is False and took < BOUND

    own_redis.resume()
    assert await store.spend("jti:after", 60) is True


async def test_hung_redis_many_concurrent_spends_all_bounded(
    own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """A burst larger than the connection pool against a frozen Redis still fails every spend within the bound."""
    store = make_store(own_redis.url)
    own_redis.pause()
    started = time.monotonic()
    outcomes = await asyncio.gather(*(store.spend(f"jti:{n}", 60) for n in range(100)), return_exceptions=True)
    assert all(isinstance(outcome, ReplayStoreUnavailable) for outcome in outcomes)
    assert time.monotonic() - started < BOUND


@pytest.mark.parametrize("spends", [1, 3], ids=["lone", "batched"])
async def test_redis_error_reply_refuses_the_spend_and_a_retry_may_win(
    spends: int, own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """Redis answering a spend with an error (out of memory here) fails it closed, whether the spend went alone (a
    plain command) or with others of its tick (a pipeline); once Redis takes writes again, the retry wins."""
    store = make_store(own_redis.url)
    assert await store.spend("jti:warm", 60) is True  # connected before the limit
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        keys = [f"jti:oom{n}" for n in range(spends)]
        outcomes = await asyncio.gather(*(store.spend(key, 60) for key in keys), return_exceptions=True)
        assert all(isinstance(outcome, ReplayStoreUnavailable) for outcome in outcomes), outcomes
        admin.config_set("maxmemory", "0")
    assert await asyncio.gather(*(store.spend(key, 60) for key in keys)) == [True] * spends


# Fallback spends across an outage (security review)


async def until_in_redis(server: RedisServer, store: RedisStore, key: str) -> int:
    """Wait (bounded, wall time: Redis recovering is an outside event) for `key` in Redis with the store owing
    nothing more; its remaining lifetime in ms."""
    with server.client() as inspect:
        for _ in range(250):
            pttl = inspect.pttl(store.prefix + key)
            # `_undo` is private, but nothing public says the owed writes are settled; without it a late
            # write could still change the key after the check.
            if pttl > 0 and not store._undo:
                return int(pttl)
            await asyncio.sleep(0.02)
    raise AssertionError(f"{key} did not reach Redis within 5 s of it answering again")


async def test_fallback_refuses_a_jti_spent_through_redis_before_it_died(
    own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """A jti this replica spent through Redis is still refused by it once Redis is gone and the fallback decides."""
    store = make_store(own_redis.url, fallback=True)
    assert await store.spend("jti:before", 60) is True
    own_redis.stop()
    assert await store.spend("jti:before", 60) is False
    assert await store.spend("jti:during", 60) is True  # the fallback is deciding, not refusing everything


async def test_jti_spent_through_the_fallback_is_refused_after_redis_returns(
    own_redis: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    """A jti spent through the fallback while Redis was down is refused by the same replica once Redis is back."""
    store = make_store(own_redis.url, fallback=True)
    own_redis.stop()
    assert await store.spend("jti:during", 60) is True
    own_redis.start()
    assert await store.reachable() is True
    assert await store.spend("jti:during", 60) is False


@pytest.mark.parametrize("outage", ["paused", "stopped"])
async def test_jti_spent_through_the_fallback_reaches_redis_for_other_replicas(
    own_redis: RedisServer, make_store: Callable[..., RedisStore], outage: str
) -> None:
    """A jti spent through the fallback during an outage is written to Redis once it answers, so others refuse it."""
    a, b = make_store(own_redis.url, fallback=True), make_store(own_redis.url, fallback=True)
    a.deadline = 0.5  # the hung call gives up sooner; it keeps the test fast and changes nothing else
    assert await a.spend("jti:warm", 60) is True  # a connection exists, so the hang is met mid-conversation
    own_redis.pause() if outage == "paused" else own_redis.stop()
    assert await a.spend("jti:outage", 60) is True
    own_redis.resume() if outage == "paused" else own_redis.start()
    pttl = await until_in_redis(own_redis, a, "jti:outage")
    assert 0 < pttl <= 60_000
    assert await b.spend("jti:outage", 60) is False
