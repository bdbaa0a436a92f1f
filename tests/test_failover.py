"""Redis that fails over: replica acknowledgements, Sentinel promotion, Cluster, and what operators are told.

Every Redis here is a real process of the test's own: a primary with replicas (one of them frozen with SIGSTOP), a
Sentinel set (one primary, two replicas, three sentinels) whose primary is SIGKILLed, and a three-primary Cluster.
The gateways are full apps built from config files, driven over HTTP (httpx's ASGI transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme
from redis.asyncio import Redis as AsyncRedis

from gateway.metrics import Metrics
from gateway.store import RedisStore
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config
from tests.processes import GatewayProcess, free_port, gateway_command
from tests.redis_server import REDIS_CLI, REDIS_SERVER, ClusterSet, RedisServer, SentinelSet, wait_replicas

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are not installed"
)


def spent_keys(client: redis.Redis | redis.RedisCluster, gateway: Gateway) -> list[Any]:
    """The spent-jti keys `client` holds (for a Cluster, on every primary)."""
    store = gateway.exchange.store
    assert isinstance(store, RedisStore)
    pattern = f"{store.prefix}jti:*"
    if isinstance(client, redis.RedisCluster):
        return sorted(client.keys(pattern, target_nodes=redis.RedisCluster.PRIMARIES))
    return sorted(client.keys(pattern))


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary with one replica, in sync."""
    with RedisServer(options={"repl-diskless-sync-delay": "0"}) as primary:
        options = {"replicaof": f"127.0.0.1 {primary.port}", "repl-diskless-sync-delay": "0"}
        with RedisServer(options=options) as replica:
            wait_replicas(primary, 1)
            yield primary, replica


# Replica acknowledgements


async def test_spend_unacknowledged_by_a_frozen_replica_is_503_and_stays_retryable(
    make_gateway: Any, issuer: TestIssuer, primary_and_replica: tuple[RedisServer, RedisServer]
) -> None:
    """With redis_replica_acks = 1 and the replica frozen, a mint is 503 and undone; thawed, the same token mints
    once at another replica and is then spent."""
    primary, replica = primary_and_replica
    settings = {"redis_url": primary.url, "redis_replica_acks": 1, "redis_replica_ack_timeout": 1.0}
    a = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, **settings)
    b = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, **settings)
    token = issuer.gitlab_token()

    replica.pause()
    try:
        response = await a.mint(token)
        assert response.status_code == 503 and error_code(response) == "replay-store-unavailable"
        assert "not replicated to 1 Redis replica(s) within 1 s" in description(response)
        with primary.client() as inspect:
            assert spent_keys(inspect, a) == []
    finally:
        replica.resume()

    response = await b.mint(token)
    assert response.status_code == 200, response.text
    for gateway in (a, b):
        response = await gateway.mint(token)
        assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"


async def test_acknowledged_spend_is_on_the_replica_when_minted(
    make_gateway: Any, issuer: TestIssuer, primary_and_replica: tuple[RedisServer, RedisServer]
) -> None:
    """With redis_replica_acks = 1, every token minted has its spend on the replica already."""
    primary, replica = primary_and_replica
    # A generous timeout: this checks where the spends are, not how fast a loaded machine acknowledges them.
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)}, redis_url=primary.url, redis_replica_acks=1, redis_replica_ack_timeout=5
    )
    responses = await asyncio.gather(*(gateway.mint(issuer.gitlab_token()) for _ in range(20)))
    assert Counter(r.status_code for r in responses) == {200: 20}
    with primary.client() as on_primary, replica.client() as on_replica:
        assert len(spent_keys(on_replica, gateway)) == 20
        assert spent_keys(on_replica, gateway) == spent_keys(on_primary, gateway)


async def test_replica_acks_without_enough_replicas_refuse_every_spend(make_gateway: Any, issuer: TestIssuer) -> None:
    """redis_replica_acks = 2 with one replica: no token is ever minted, each answer is 503 (fail closed)."""
    with RedisServer(options={"repl-diskless-sync-delay": "0"}) as primary:
        options = {"replicaof": f"127.0.0.1 {primary.port}", "repl-diskless-sync-delay": "0"}
        with RedisServer(options=options):
            wait_replicas(primary, 1)
            gateway = await make_gateway(
                {"gitlab-com": gitlab_issuer(issuer)},
                redis_url=primary.url,
                redis_replica_acks=2,
                redis_replica_ack_timeout=0.05,
            )
            responses = await asyncio.gather(*(gateway.mint(issuer.gitlab_token()) for _ in range(5)))
            assert {(r.status_code, error_code(r)) for r in responses} == {(503, "replay-store-unavailable")}
            with primary.client() as inspect:
                assert spent_keys(inspect, gateway) == []


# Sentinel


async def until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    for _ in itertools.count():
        if condition():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def definitive(gateway: Gateway, token: str, attempts: int = 100) -> httpx.Response:
    """Mint `token`, retrying 503s (as the shipped nginx does) until the answer is not one."""
    for _ in range(attempts):
        response = await gateway.mint(token)
        if response.status_code != 503:
            return response
        await asyncio.sleep(0.1)
    return response


class Load:
    """Mints fresh tokens at a few replicas, each token twice at once (at two replicas), and records every answer
    per token, so a token minted twice anywhere in the run shows up."""

    def __init__(self, gateways: list[Gateway], issuer: TestIssuer) -> None:
        self.gateways = gateways
        self.issuer = issuer
        self.answers: list[tuple[float, str, int, str | None]] = []
        # When each token was first sent.
        self.sent: dict[str, float] = {}
        self.stopping = False

    async def mint(self, gateway: Gateway, token: str) -> httpx.Response:
        response = await gateway.mint(token)
        code = None if response.status_code == 200 else error_code(response)
        self.answers.append((time.monotonic(), token, response.status_code, code))
        return response

    async def worker(self, n: int) -> None:
        while not self.stopping:
            token = self.issuer.gitlab_token()
            self.sent[token] = time.monotonic()
            first, second = self.gateways[n % 2], self.gateways[(n + 1) % 2]
            answers = await asyncio.gather(self.mint(first, token), self.mint(second, token))
            if all(response.status_code == 503 for response in answers):
                await asyncio.sleep(0.02)  # as a client would back off: a failover is no reason to spin

    def minted(self, before: float = float("inf")) -> list[str]:
        return [token for at, token, status, _ in self.answers if status == 200 and at < before]

    def first_mint_after(self, moment: float) -> float | None:
        """When the first token sent after `moment` was minted (tokens sent before may have been spent before)."""
        return min(
            (at for at, token, status, _ in self.answers if status == 200 and self.sent[token] > moment),
            default=None,
        )

    def twice(self) -> list[str]:
        return [token for token, n in Counter(self.minted()).items() if n > 1]


# redis-py loses track of some of its connections under this churn (see the end of the test); whenever the garbage
# collector happens to find them during the test, their ResourceWarnings would fail it, not only at the end.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_sentinel_failover_loses_no_spend_and_mints_nothing_twice(make_gateway: Any, issuer: TestIssuer) -> None:
    """Primary SIGKILLed under load with redis_replica_acks = 1: tokens spent before stay spent, minting resumes
    within 15 s, and no token is minted twice over the whole run."""
    with SentinelSet(replicas=2, sentinels=3) as sentinels:
        settings = {"redis_url": sentinels.url, "redis_replica_acks": 1, "redis_replica_ack_timeout": 0.5}
        gateways = [await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, **settings) for _ in range(2)]
        load = Load(gateways, issuer)
        workers = [asyncio.create_task(load.worker(n)) for n in range(4)]
        try:
            await until(lambda: len(load.minted()) >= 40, "40 mints before the kill")
            # SIGKILL from the event loop's thread: no request can complete between the kill and `killed_at`.
            old = sentinels.kill_primary()
            killed_at = time.monotonic()
            promoted = await asyncio.to_thread(sentinels.wait_promoted, old)
            assert promoted is not old
            await until(lambda: load.first_mint_after(killed_at) is not None, "minting to resume", 30)
            resumed_at = load.first_mint_after(killed_at)
            assert resumed_at is not None
            # Keep minting a little after the failover, so double mints across it would show.
            resumed = len(load.minted())
            await until(lambda: len(load.minted()) >= resumed + 20, "20 mints after the failover")
        finally:
            load.stopping = True
            await asyncio.gather(*workers)

        assert resumed_at - killed_at < 15
        assert load.twice() == []
        before = load.minted(before=killed_at)
        assert len(before) >= 40
        # A loaded machine can make the sentinels fail over twice; ask once they agree, and ask again after a
        # 503 (the contract's "retry shortly"): only a definitive answer tells whether a spend survived.
        await asyncio.to_thread(sentinels.wait_stable)
        answers = [await definitive(gateways[i % 2], token) for i, token in enumerate(before)]
        assert {(r.status_code, error_code(r)) for r in answers} == {(422, "invalid-reuse-token")}
        # Whatever failed during the failover was a retryable 503 or the other half of a pair: never a 500.
        assert {code for *_, status, code in load.answers if status != 200} <= {
            "replay-store-unavailable",
            "invalid-reuse-token",
        }
        for gateway in gateways:
            await gateway.exchange.store.aclose()
        # Under this churn redis-py's Sentinel client loses track of a few of its own connections to the sentinels
        # (not the data nodes'), so closing it cannot close them; collect them here, where that is known, rather
        # than have their ResourceWarnings fail whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


async def test_sentinel_password_is_used_for_the_sentinels(make_gateway: Any, issuer: TestIssuer) -> None:
    """Sentinels that require a password are reached with redis_sentinel_password, and the data nodes without."""
    with SentinelSet(replicas=0, sentinels=1, sentinel_password="sentinel-secret") as sentinels:
        gateway = await make_gateway(
            {"gitlab-com": gitlab_issuer(issuer)}, redis_url=sentinels.url, redis_sentinel_password="sentinel-secret"
        )
        token = issuer.gitlab_token()
        assert (await gateway.mint(token)).status_code == 200
        response = await gateway.mint(token)
        assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"
        with sentinels.primary.client() as inspect:
            assert len(spent_keys(inspect, gateway)) == 1


# Cluster


@pytest.fixture(scope="module")
def _cluster() -> Iterator[ClusterSet]:
    with ClusterSet(primaries=3) as made:
        yield made


@pytest.fixture
def cluster(_cluster: ClusterSet) -> ClusterSet:
    """A three-primary Cluster (made once for this module), emptied for each test."""
    _cluster.flush()
    return _cluster


async def test_cluster_replicas_share_spends_across_every_shard(
    make_gateway: Any, issuer: TestIssuer, cluster: ClusterSet
) -> None:
    """Two gateways on a Cluster: 60 tokens minted at A (spends on all three primaries) are each refused at B."""
    a = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=cluster.url)
    b = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=cluster.url)
    batch = [issuer.gitlab_token() for _ in range(60)]
    # At once, so they go out in batched pipelines that span the shards.
    responses = await asyncio.gather(*(a.mint(token) for token in batch))
    assert Counter(r.status_code for r in responses) == {200: 60}
    responses = await asyncio.gather(*(b.mint(token) for token in batch))
    assert {(r.status_code, error_code(r)) for r in responses} == {(422, "invalid-reuse-token")}
    with cluster.client() as inspect:
        keys = spent_keys(inspect, a)
        assert len(keys) >= 60
        shards = {inspect.get_node_from_key(key).port for key in keys}
    assert shards == {server.port for server in cluster.servers}


async def test_cluster_replicas_share_key_sets_and_the_unknown_kid_cooldown(
    make_gateway: Any, issuer: TestIssuer, cluster: ClusterSet
) -> None:
    """Through a Cluster, B uses the key set A fetched, and an unknown kid at A then B refreshes keys once."""
    a = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=cluster.url)
    b = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=cluster.url)
    issuer.reset_counts()
    assert (await a.mint(issuer.gitlab_token())).status_code == 200
    assert (await b.mint(issuer.gitlab_token())).status_code == 200
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)

    unknown = issuer.add_key(publish=False)
    for gateway in (a, b):
        response = await gateway.mint(issuer.gitlab_token(kid=unknown))
        assert response.status_code == 422 and error_code(response) == "invalid-token"
    # One refresh (discovery and JWKS) for both replicas.
    assert (issuer.discovery_count, issuer.jwks_count) == (2, 2)


async def test_cluster_acks_are_the_shard_s_own(make_gateway: Any, issuer: TestIssuer, cluster: ClusterSet) -> None:
    """redis_replica_acks = 1 on a Cluster whose shards have no replicas: every spend is 503 and undone."""
    gateway = await make_gateway(
        {"gitlab-com": gitlab_issuer(issuer)},
        redis_url=cluster.url,
        redis_replica_acks=1,
        redis_replica_ack_timeout=0.05,
    )
    responses = await asyncio.gather(*(gateway.mint(issuer.gitlab_token()) for _ in range(6)))
    assert {(r.status_code, error_code(r)) for r in responses} == {(503, "replay-store-unavailable")}
    with cluster.client() as inspect:
        assert spent_keys(inspect, gateway) == []


async def test_cluster_carries_pins_and_revocations_and_their_cli(
    make_gateway: Any, issuer: TestIssuer, cluster: ClusterSet
) -> None:
    """Through a Cluster, a pin A records is held against B, and the real `pins list` and `revoke` CLI (which scan
    and write through the Cluster client) list that pin and revoke the repository at A and B."""
    issuers = {"gitlab-com": gitlab_issuer(issuer, pin_on_first_use=True)}
    a = await make_gateway(issuers, redis_url=cluster.url)
    b = await make_gateway(issuers, redis_url=cluster.url)
    assert (await a.mint(issuer.gitlab_token())).status_code == 200
    recreated = await b.mint(issuer.gitlab_token(project_id="70000001", job_project_id="70000001"))
    assert recreated.status_code == 422 and "changed identity" in description(recreated)

    path = a.exchange.settings.config_path
    assert path is not None
    listed = await asyncio.to_thread(gateway_command, path, "pins", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("issuer=gitlab-com repository=group/project "), listed.stdout
    revoked = await asyncio.to_thread(
        gateway_command, path, "revoke", "--issuer", "gitlab-com", "--repository", "group/project", "--reason", "drill"
    )
    assert revoked.returncode == 0, revoked.stderr
    for gateway in (a, b):
        gateway.exchange.state.invalidate()  # what each replica does by itself within a second
        refused = await gateway.mint(issuer.gitlab_token())
        assert refused.status_code == 422 and "drill" in description(refused)


# What operators are told


def warnings_about_redis(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Redis at" in r.getMessage()]


async def test_unreachable_redis_warns_once_naming_host_and_cause_and_counts_every_failure(
    make_gateway: Any, issuer: TestIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Readiness checks against a dead Redis each count in gateway_redis_errors_total, with one WARNING naming
    host, port and cause."""
    server = RedisServer()  # never started: its port refuses connections
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=server.url)
    caplog.set_level(logging.WARNING, logger="gateway.store")
    for _ in range(3):
        assert (await gateway.client.get("/readyz")).status_code == 503
    metrics = (await gateway.client.get("/metrics")).text
    assert "gateway_redis_errors_total 3.0" in metrics
    (warning,) = warnings_about_redis(caplog)
    assert f"Redis at 127.0.0.1:{server.port} is unreachable or failing: " in warning
    assert "refused" in warning.lower()
    server.close()


async def test_startup_warns_when_redis_is_unreachable(caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    """At startup, a Sentinel set whose sentinels are all down is reported as a WARNING naming the sentinels."""
    dead = RedisServer()
    store = RedisStore.from_url(f"redis+sentinel://127.0.0.1:{dead.port}/mymaster", clock=clock)
    errors = Metrics()
    store.on_error = lambda: errors.count(errors.redis_errors)
    caplog.set_level(logging.INFO, logger="gateway.store")
    store.startup()
    assert store._checking is not None
    await store._checking
    await store.aclose()
    (warning,) = warnings_about_redis(caplog)
    assert f"Redis at sentinels 127.0.0.1:{dead.port} (service 'mymaster') is unreachable or failing: " in warning
    dead.close()


@pytest.mark.parametrize(("options", "warned"), [({}, True), ({"appendonly": "yes"}, False), ({"save": "60 1"}, False)])
async def test_startup_warns_when_redis_persists_nothing(
    caplog: pytest.LogCaptureFixture, clock: FakeClock, options: dict[str, str], warned: bool
) -> None:
    """At startup, a Redis with neither AOF nor RDB persistence gets a WARNING; with either, none."""
    with RedisServer(options=options) as server:
        store = RedisStore.from_url(server.url, clock=clock)
        caplog.set_level(logging.INFO, logger="gateway.store")
        store.startup()
        assert store._checking is not None
        await store._checking
        await store.aclose()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        (warning,) = said
        assert warning.startswith(f'Redis at 127.0.0.1:{server.port} persists nothing (appendonly no, save "")')
    else:
        assert said == []


async def test_startup_says_persistence_could_not_be_checked_when_config_is_refused(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    """A Redis user without CONFIG (as on managed Redis) gets an INFO line saying persistence could not be
    checked, and no warning."""
    with RedisServer() as server:
        with server.client() as admin:
            admin.acl_setuser("gateway", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"])
        store = RedisStore.from_url(f"redis://gateway:pw@127.0.0.1:{server.port}/0", clock=clock)
        caplog.set_level(logging.INFO, logger="gateway.store")
        store.startup()
        assert store._checking is not None
        await store._checking
        await store.aclose()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"could not check whether Redis at 127.0.0.1:{server.port} persists spends" in m for m in infos)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_startup_warns_when_fewer_replicas_than_acks(caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    """At startup, redis_replica_acks above the primary's connected replicas is a WARNING saying spends will be 503."""
    with RedisServer(options={"appendonly": "yes"}) as server:
        store = RedisStore.from_url(server.url, clock=clock, replica_acks=1)
        caplog.set_level(logging.INFO, logger="gateway.store")
        store.startup()
        assert store._checking is not None
        await store._checking
        await store.aclose()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "has 0 replica(s) connected but redis_replica_acks is 1" in warning


# Rate limits count in the same Redis, whatever its kind


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
async def test_rate_limits_are_shared_through_sentinel_and_cluster(
    make_gateway: Any, issuer: TestIssuer, kind: str, request: pytest.FixtureRequest
) -> None:
    """Two gateways on a Sentinel or Cluster URL share one client rate limit: 3 requests at A, the 4th at B is 429."""
    with contextlib.ExitStack() as stack:
        if kind == "cluster":
            url = request.getfixturevalue("cluster").url
        else:
            url = stack.enter_context(SentinelSet(replicas=0, sentinels=1)).url
        a, b = [
            await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=url, rate_limit_client="3/minute")
            for _ in range(2)
        ]
        for _ in range(3):
            assert (await a.mint(issuer.gitlab_token())).status_code == 200
        response = await b.mint(issuer.gitlab_token())
        assert response.status_code == 429 and error_code(response) == "rate-limited"


# TLS to the data nodes


async def test_tls_sentinel_checks_the_announced_host_name(
    make_gateway: Any, issuer: TestIssuer, ca: trustme.CA
) -> None:
    """rediss+sentinel:// works when the primary's certificate names the host the sentinels announce, and fails
    closed (503) when it names another host, although the same CA signed it."""
    with SentinelSet(replicas=0, sentinels=1, tls=ca) as sentinels:
        gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=sentinels.url)
        token = issuer.gitlab_token()
        assert (await gateway.mint(token)).status_code == 200
        response = await gateway.mint(token)
        assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"

    with SentinelSet(replicas=0, sentinels=1, tls=ca, tls_names=("redis.example",)) as sentinels:
        gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=sentinels.url)
        response = await gateway.mint(issuer.gitlab_token())
        assert response.status_code == 503 and error_code(response) == "replay-store-unavailable"


async def test_tls_cluster_shares_spends(make_gateway: Any, issuer: TestIssuer, ca: trustme.CA) -> None:
    """rediss+cluster:// to a TLS-only Cluster: a token spent at one gateway is refused at the other."""
    with ClusterSet(primaries=3, tls=ca) as cluster:
        a, b = [await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, redis_url=cluster.url) for _ in range(2)]
        batch = [issuer.gitlab_token() for _ in range(10)]
        minted = [await a.mint(token) for token in batch]
        assert Counter(r.status_code for r in minted) == {200: 10}
        reused = [await b.mint(token) for token in batch]
        assert Counter(error_code(r) for r in reused) == {"invalid-reuse-token": 10}


async def test_repository_rate_limit_is_keyed_by_issuer_url(
    make_gateway: Any, issuer: TestIssuer, other_issuer: TestIssuer, cluster: ClusterSet
) -> None:
    """Two deployments on one Redis naming different issuers `gitlab-com` do not share a repository's count."""
    limit = {"redis_url": cluster.url, "rate_limit_repository": "2/minute"}
    first = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, **limit)
    second = await make_gateway({"gitlab-com": gitlab_issuer(other_issuer)}, **limit)
    for _ in range(2):
        assert (await first.mint(issuer.gitlab_token())).status_code == 200
    assert (await first.mint(issuer.gitlab_token())).status_code == 429
    assert (await second.mint(other_issuer.gitlab_token())).status_code == 200


# Reloads


async def test_reload_applies_replica_acks_and_sentinel_password(make_gateway: Any, issuer: TestIssuer) -> None:
    """A reload that sets redis_replica_acks and changes the sentinels' password applies both to the running
    gateway: spends then wait for a replica (none here: 503), and the sentinels are asked with the new password."""
    with SentinelSet(replicas=0, sentinels=1, sentinel_password="old-secret") as sentinels:
        settings: dict[str, Any] = {"redis_url": sentinels.url, "redis_sentinel_password": "old-secret"}
        gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, **settings)
        assert (await gateway.mint(issuer.gitlab_token())).status_code == 200

        sentinel = sentinels.sentinels[0]
        with redis.Redis(host="127.0.0.1", port=sentinel.port, password="old-secret") as admin:
            admin.execute_command("ACL", "SETUSER", "default", "resetpass", ">new-secret")
        assert gateway.exchange.settings.config_path is not None
        write_config(
            gateway.exchange.settings.config_path.parent,
            {"gitlab-com": gitlab_issuer(issuer)},
            [PUBLISHER],
            **settings | {"redis_sentinel_password": "new-secret", "redis_replica_acks": 1},
            redis_replica_ack_timeout=0.05,
        )
        assert await gateway.app.state.reloader.reload() is True
        # A new connection to the primary must ask the sentinel again, with the new password.
        store = gateway.exchange.store
        assert isinstance(store, RedisStore)
        assert isinstance(store.client, AsyncRedis)
        await store.client.connection_pool.disconnect()

        response = await gateway.mint(issuer.gitlab_token())
        assert response.status_code == 503 and "not replicated to 1 Redis replica(s)" in description(response)
        await store.aclose()


# `gateway serve`, as an operator runs it


def test_serve_on_sentinel_mints_once_and_warns_of_no_persistence(tmp_path: Path, issuer: TestIssuer) -> None:
    """A real `gateway serve` on a redis+sentinel:// URL mints a token once, refuses its reuse, and logs at startup
    that the Redis in use persists nothing, naming the sentinels."""
    with SentinelSet(replicas=1, sentinels=1) as sentinels:
        port = free_port()
        path = write_config(
            tmp_path,
            {"gitlab-com": gitlab_issuer(issuer)},
            [PUBLISHER],
            url=f"http://127.0.0.1:{port}",
            redis_url=sentinels.url,
            redis_replica_acks=1,
        )
        with GatewayProcess(path, port=port, log=tmp_path / "serve.log").wait("/readyz") as server:
            token = issuer.gitlab_token()
            with httpx.Client(base_url=server.base, timeout=10) as client:
                assert client.post("/_/oidc/mint-token", json={"token": token}).status_code == 200
                response = client.post("/_/oidc/mint-token", json={"token": token})
                assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"
        log = (tmp_path / "serve.log").read_text()
    sentinel = sentinels.sentinels[0].port
    assert f"Redis at sentinels 127.0.0.1:{sentinel} (service 'mymaster') persists nothing" in log


def test_serve_with_redis_down_warns_naming_host_and_cause(tmp_path: Path, issuer: TestIssuer) -> None:
    """A real `gateway serve` whose Redis is down logs at startup a WARNING naming host, port and cause, and is
    not ready."""
    dead = RedisServer()  # never started: its port refuses connections
    path = write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], redis_url=dead.url)
    with GatewayProcess(path, log=tmp_path / "serve.log").wait("/livez") as server:
        assert httpx.get(server.base + "/readyz", timeout=10).status_code == 503
    log = (tmp_path / "serve.log").read_text()
    assert f"Redis at 127.0.0.1:{dead.port} is unreachable or failing: " in log
    assert "(Connection refused)" in log
    dead.close()


async def test_startup_checks_every_cluster_primary(
    caplog: pytest.LogCaptureFixture, clock: FakeClock, cluster: ClusterSet
) -> None:
    """On a Cluster, the startup check looks at every primary and names each that persists nothing."""
    store = RedisStore.from_url(cluster.url, clock=clock)
    caplog.set_level(logging.INFO, logger="gateway.store")
    store.startup()
    assert store._checking is not None
    await store._checking
    await store.aclose()
    said = sorted(r.getMessage().split(" persists nothing")[0] for r in caplog.records if r.levelno == logging.WARNING)
    assert said == sorted(f"Redis at 127.0.0.1:{server.port}" for server in cluster.servers)
