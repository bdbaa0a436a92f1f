"""The sliding-window rate limiter: the rate syntax, its counting in-process and in a real Redis, and its keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from gateway.config import Rate, parse_rates
from gateway.errors import RateLimited
from gateway.ratelimit import RateLimits
from gateway.testing import FakeClock, free_port
from tests.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

# A window boundary of every rate below, so the tests can say where in a window they are.
START = 1_800_000_000 - 1_800_000_000 % 3600


@pytest.mark.parametrize(
    ("text", "rates"),
    [
        ("60/minute", [(60, 60)]),
        ("10/second;100/hour", [(10, 1), (100, 3600)]),
        ("10 per second, 5/day", [(10, 1), (5, 86400)]),
        ("100/5 minutes", [(100, 300)]),
        (" 3 / Minutes ", [(3, 60)]),
        ("1/month;2/year", [(1, 30 * 86400), (2, 365 * 86400)]),
    ],
)
def test_parse_rates(text: str, rates: list[tuple[int, int]]) -> None:
    """Rates in the config syntax ('N/unit', 'N per unit', 'N/M units', several joined by ';' or ',') parse."""
    parsed = parse_rates(text)
    assert [(rate.amount, rate.seconds) for rate in parsed] == rates
    assert all(isinstance(rate, Rate) and str(rate) in text for rate in parsed)


@pytest.mark.parametrize("text", ["lots", "5 per fortnight", "0/minute", "5/0 minutes", "5/minute;", "-1/second", ""])
def test_parse_rates_refuses(text: str) -> None:
    """Anything else, a zero amount or window, or an empty rate between separators is a ValueError."""
    with pytest.raises(ValueError, match=r"is not a rate|at least 1"):
        parse_rates(text)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def limits(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[RateLimits]:
    """Rate limits of 3/minute per client and per repository, counted in-process or in a real Redis."""
    clock.now = START
    redis = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        redis = Redis.from_url(server.url)
    yield RateLimits(client="3/minute", repository="3/minute", redis=redis, prefix="test:", clock=clock)
    if redis is not None:
        await redis.aclose()


async def refused(limits: RateLimits, address: str = "192.0.2.1") -> int | None:
    """The Retry-After of a refused request, or None when it was allowed."""
    try:
        await limits.hit_client(address)
    except RateLimited as e:
        return e.retry_after
    return None


async def test_sliding_window(limits: RateLimits, clock: FakeClock) -> None:
    """3/minute: the 4th request of a window is refused until the window has faded enough, refusals cost nothing."""
    clock.advance(30)
    assert [await refused(limits) for _ in range(3)] == [None, None, None]
    # Full until it becomes the previous window and two thirds of it slid out: 30 s + 20 s from here.
    assert await refused(limits) == 50
    clock.advance(30)
    # A new window, but the sliding window still holds all of the previous one's 3 requests.
    assert await refused(limits) == 20
    clock.advance(19)
    assert await refused(limits) == 1
    clock.advance(1)
    # Now 3 * 40/60 = 2 weigh, so one more fits, and then none (the refusals above were not counted).
    assert await refused(limits) is None
    assert await refused(limits) == 20
    # Another client has a budget of its own.
    assert await refused(limits, "192.0.2.2") is None


async def test_window_forgotten_after_two(limits: RateLimits, clock: FakeClock) -> None:
    """Requests two windows back weigh nothing: a full window allows 3 again once it is not the previous one."""
    for _ in range(3):
        await limits.hit_client("192.0.2.1")
    clock.advance(120)
    assert [await refused(limits) for _ in range(4)] == [None, None, None, 60 - 0 + 20]


async def test_repository_budget_names_the_issuer_by_url(limits: RateLimits) -> None:
    """A repository's budget belongs to (issuer URL, repository case-folded): another issuer URL has its own."""
    for _ in range(3):
        await limits.hit_repository("https://gitlab.example", "Group/Project")
    with pytest.raises(RateLimited, match="token exchanges for 'group/project'"):
        await limits.hit_repository("https://gitlab.example", "group/project")
    await limits.hit_repository("https://gitlab.other.example", "group/project")


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
async def test_every_rate_must_allow(backend: str, request: pytest.FixtureRequest, clock: FakeClock) -> None:
    """With '2/second;3/minute' a request is counted only when both allow it, and the stricter wait is given."""
    clock.now = START
    redis = Redis.from_url(request.getfixturevalue("redis_server").url) if backend == "redis" else None
    limits = RateLimits(client="2/second;3/minute", repository=None, redis=redis, clock=clock)
    try:
        assert await refused(limits) is None
        assert await refused(limits) is None
        # The per-second rate refuses; the minute's budget is untouched by it.
        assert await refused(limits) == 2
        clock.advance(2)
        assert await refused(limits) is None
        with pytest.raises(RateLimited, match=r"limit 3/minute"):
            await limits.hit_client("192.0.2.1")
    finally:
        if redis is not None:
            await redis.aclose()


@needs_redis
async def test_redis_keys_share_one_slot_under_the_prefix(redis_server: RedisServer, clock: FakeClock) -> None:
    """All counters of one subject live under the store's prefix with one hash tag (one Cluster slot), and expire."""
    clock.now = START + 30
    redis = Redis.from_url(redis_server.url)
    try:
        limits = RateLimits(client="2/second;3/minute", repository=None, redis=redis, prefix="staging:", clock=clock)
        await limits.hit_client("2001:db8::1")
        clock.advance(1)
        await limits.hit_client("2001:db8::1")
        keys = [key.decode() for key in await redis.keys("*")]
        assert len(keys) == 3 and all(key.startswith("staging:rate:") for key in keys)
        assert len({key_slot(key.encode()) for key in keys}) == 1
        assert not any("2001" in key for key in keys)
        expiries = [await redis.pttl(key) for key in keys]
        assert all(0 < expiry <= 120_000 for expiry in expiries)
    finally:
        await redis.aclose()


@needs_redis
async def test_unreachable_redis_counts_in_process(redis_server: RedisServer, clock: FakeClock) -> None:
    """With Redis gone the limiter still counts (in-process), reports each failure, and never raises the error."""
    clock.now = START
    redis = Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    errors: list[None] = []
    try:
        limits = RateLimits(client="3/minute", repository=None, redis=redis, clock=clock)
        limits.on_error = lambda: errors.append(None)
        redis_server.stop()
        assert [await refused(limits) for _ in range(4)] == [None, None, None, 80]
        assert len(errors) == 1  # then the limiter stays in-process for its backoff instead of asking again
    finally:
        await redis.aclose()


@needs_redis
async def test_unreachable_redis_warns_once_per_interval(
    redis_server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failed Redis call is counted, but while Redis stays down one WARNING (with the cause) says so."""
    redis = Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    errors: list[None] = []
    try:
        limits = RateLimits(client="100/minute", repository=None, redis=redis, clock=clock)
        limits.BACKOFF = 0  # ask Redis on every request, so each one fails
        limits.on_error = lambda: errors.append(None)
        redis_server.stop()
        for _ in range(3):
            await limits.hit_client("192.0.2.1")
    finally:
        await redis.aclose()
    assert len(errors) == 3
    warnings = [r for r in caplog.records if r.name == "gateway.ratelimit" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "Redis unreachable" in warnings[0].getMessage() and "connect" in warnings[0].getMessage().lower()


class ClusterNode(RedisServer):
    """A one-node Redis Cluster: cluster mode on, every slot its own."""

    def _options(self) -> dict[str, str]:
        # The bus port, given explicitly: the default (port + 10000) does not exist for a free port above 55535.
        cluster = {"cluster-enabled": "yes", "cluster-port": str(free_port())}
        return super()._options() | cluster | {"cluster-config-file": str(self.directory / "nodes.conf")}


@needs_redis
async def test_counts_on_redis_cluster(clock: FakeClock) -> None:
    """On Redis Cluster (redis-py's cluster client, which refuses a script whose keys span slots) the limits hold."""
    clock.now = START
    with ClusterNode() as node, node.client() as admin:
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(500):  # the node takes its slots within milliseconds; bounded all the same
            if admin.execute_command("CLUSTER", "INFO").decode().startswith("cluster_state:ok"):
                break
            await asyncio.sleep(0.01)
        cluster = RedisCluster(host="127.0.0.1", port=node.port)
        try:
            limits = RateLimits(client="2/second;3/minute", repository="1/hour", redis=cluster, clock=clock)
            assert await refused(limits) is None
            assert await refused(limits) is None
            assert await refused(limits) == 2
            await limits.hit_repository("https://gitlab.example", "group/project")
            with pytest.raises(RateLimited):
                await limits.hit_repository("https://gitlab.example", "group/project")
            # Written are the current windows' counters: two for the client's rates, one for the repository's.
            assert len(await cluster.keys("*", target_nodes=RedisCluster.ALL_NODES)) == 3
        finally:
            await cluster.aclose()
