"""Replicas sharing one Redis behave as one gateway: one key refresh, one spend per jti, one set of signing keys.

Each replica is a full app built from its own config files (with `redis_url`), driven over HTTP; the Redis is a
real `redis-server` of each test's own, which the test may kill, restart or freeze.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from joserfc import jwt
from joserfc.jwk import KeySet as JWKSet
from starlette.applications import Starlette

from gateway import config
from gateway.app import create_app
from gateway.config import MAX_LEEWAY, Issuer
from gateway.exchange import Exchange
from gateway.keys import shared
from gateway.mint import generate_key
from gateway.store import SharedState, jti_key
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, error_code, gitlab_issuer, write_config
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


class Replica:
    """One gateway replica: its own app and config, reached over HTTP."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.exchange: Exchange = app.state.exchange

    async def mint(self, token: str) -> httpx.Response:
        return await self.client.post("/_/oidc/mint-token", json={"token": token})

    async def ready(self) -> int:
        return (await self.client.get("/readyz")).status_code


MakeReplicas = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of this test's own (tests here kill, restart and freeze it)."""
    # Closing kills it even if the test left it frozen.
    with RedisServer() as server:
        yield server


@pytest.fixture
async def make_replicas(
    tmp_path: Path, clock: FakeClock, issuer: TestIssuer, redis_server: RedisServer
) -> AsyncIterator[MakeReplicas]:
    """Build `n` replicas trusting the test issuer, each from its own config files, all on the test's Redis."""
    made: list[Replica] = []

    async def make(n: int, *, redis_url: str | None = None, **gateway: Any) -> list[Replica]:
        replicas = []
        for _ in range(n):
            directory = tmp_path / f"replica-{len(made) + 1}"
            directory.mkdir()
            path = write_config(
                directory,
                {"gitlab-com": gitlab_issuer(issuer)},
                (PUBLISHER,),
                redis_url=redis_url or redis_server.url,
                **gateway,
            )
            app = create_app(config.load(path), clock=clock)
            # 300 requests in flight per replica: no client-side pool limit may queue them.
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="https://gateway.test", timeout=30
            )
            made.append(Replica(app, client))
            replicas.append(made[-1])
        return replicas

    yield make
    for replica in made:
        await replica.client.aclose()
        await replica.exchange.keys.aclose()
        await replica.exchange.store.aclose()


def tokens(issuer: TestIssuer, n: int, **claims: Any) -> list[str]:
    return [issuer.gitlab_token(**claims) for _ in range(n)]


async def warm(replicas: Sequence[Replica], issuer: TestIssuer) -> None:
    """One successful mint per replica, so each holds the key set in-process; then forget the fetch counts."""
    for replica in replicas:
        assert (await replica.mint(issuer.gitlab_token())).status_code == 200
    issuer.reset_counts()


def statuses(responses: Sequence[httpx.Response]) -> Counter[int]:
    return Counter(response.status_code for response in responses)


def failures(responses: Sequence[httpx.Response]) -> Counter[str]:
    """The distinct failures among `responses`, for assertion messages."""
    return Counter(response.text for response in responses if response.status_code != 200)


def command_calls(server: RedisServer, command: str) -> int:
    with server.client() as inspect:
        stats: dict[str, Any] = inspect.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# One key refresh for all replicas


async def test_cold_replicas_under_load_fetch_keys_once(make_replicas: MakeReplicas, issuer: TestIssuer) -> None:
    """3 cold replicas x 300 concurrent mints all succeed with one discovery and one JWKS fetch in total."""
    replicas = await make_replicas(3)
    batches = [tokens(issuer, 300) for _ in replicas]
    responses = await asyncio.gather(
        *(replica.mint(token) for replica, batch in zip(replicas, batches, strict=True) for token in batch)
    )
    assert statuses(responses) == {200: 900}, failures(responses)
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)


async def test_ttl_refresh_is_shared(make_replicas: MakeReplicas, issuer: TestIssuer, clock: FakeClock) -> None:
    """When the key set's ttl runs out, the replicas refresh it with one upstream fetch between them."""
    replicas = await make_replicas(3)
    await warm(replicas, issuer)
    clock.advance(301)
    for replica in replicas:
        # Still served from the in-process copy while the refresh runs in the background.
        assert (await replica.mint(issuer.gitlab_token())).status_code == 200
        await replica.exchange.keys.settle()
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)
    for replica in replicas:
        key_set = replica.exchange.keys.state("gitlab-com").key_set
        assert key_set is not None and clock() - key_set.fetched_at < 300


# One spend per jti for all replicas


async def test_token_spent_at_one_replica_is_reused_at_the_others(
    make_replicas: MakeReplicas, issuer: TestIssuer
) -> None:
    """A token minted at replica A is invalid-reuse-token at B and C."""
    a, b, c = await make_replicas(3)
    token = issuer.gitlab_token()
    assert (await a.mint(token)).status_code == 200
    for replica in (b, c, a):
        response = await replica.mint(token)
        assert response.status_code == 422
        assert error_code(response) == "invalid-reuse-token"


async def test_concurrent_replay_across_replicas_mints_once(make_replicas: MakeReplicas, issuer: TestIssuer) -> None:
    """16 concurrent requests with one token spread over three replicas: exactly one 200, the rest reuse errors."""
    replicas = await make_replicas(3)
    await warm(replicas, issuer)
    token = issuer.gitlab_token()
    responses = await asyncio.gather(*(replicas[n % 3].mint(token) for n in range(16)))
    assert statuses(responses) == {200: 1, 422: 15}
    assert {error_code(r) for r in responses if r.status_code == 422} == {"invalid-reuse-token"}


async def test_spent_jti_is_remembered_past_exp_and_the_largest_leeway(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer, clock: FakeClock
) -> None:
    """The jti's key in Redis, named by a hash of the jti, lives past exp plus MAX_LEEWAY, not just the leeway."""
    (replica,) = await make_replicas(1, leeway=30)
    claims = issuer.gitlab_claims()
    assert (await replica.mint(issuer.sign(claims))).status_code == 200
    with redis_server.client() as inspect:
        keys = [key.decode() for key in inspect.scan_iter(match="gateway:jti:*")]
        pttl = inspect.pttl(f"gateway:{jti_key(issuer.url, claims['jti'])}")
    assert keys == [f"gateway:{jti_key(issuer.url, claims['jti'])}"]
    assert claims["jti"] not in keys[0]
    assert pttl / 1000 > claims["exp"] + MAX_LEEWAY - clock()


# The unknown-kid cooldown and key rotation, shared


async def test_unknown_kid_cooldown_is_shared(make_replicas: MakeReplicas, issuer: TestIssuer) -> None:
    """An unknown kid refreshes keys once at replica A; the same kid at B and C within the cooldown fetches nothing."""
    a, b, c = await make_replicas(3)
    await warm((a, b, c), issuer)
    unknown = issuer.add_key(publish=False)

    response = await a.mint(issuer.gitlab_token(kid=unknown))
    assert response.status_code == 422 and error_code(response) == "invalid-token"
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)

    for replica in (b, c):
        response = await replica.mint(issuer.gitlab_token(kid=unknown))
        assert response.status_code == 422 and error_code(response) == "invalid-token"
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)
    # The replicas still serve known kids from their own copies.
    assert (await b.mint(issuer.gitlab_token())).status_code == 200


async def test_rotation_is_picked_up_by_every_replica_with_one_fetch(
    make_replicas: MakeReplicas, issuer: TestIssuer
) -> None:
    """A key rotated in after the first mints is accepted at every replica, for one JWKS fetch in total."""
    replicas = await make_replicas(3)
    await warm(replicas, issuer)
    issuer.rotate()
    for replica in replicas:
        response = await replica.mint(issuer.gitlab_token())
        assert response.status_code == 200, response.text
    assert issuer.jwks_count == 1


async def test_rotation_picked_up_concurrently_at_every_replica(
    make_replicas: MakeReplicas, issuer: TestIssuer
) -> None:
    """Tokens with a newly rotated kid arriving at all replicas at once all succeed, for one JWKS fetch in total."""
    replicas = await make_replicas(3)
    await warm(replicas, issuer)
    issuer.rotate()
    batches = [tokens(issuer, 20) for _ in replicas]
    responses = await asyncio.gather(
        *(replica.mint(token) for replica, batch in zip(replicas, batches, strict=True) for token in batch)
    )
    assert statuses(responses) == {200: 60}, failures(responses)
    assert issuer.jwks_count == 1


class HoldRefreshLock:
    """A replica's real shared state whose refresh-lock acquisition waits for `go` (at most 2 s).

    Not a mock: every call still reaches the real Redis. It only pins down an interleaving that real replicas hit
    by chance (another replica looking between this one's cooldown and lock acquisitions), which no real process
    can be made to hit every time.
    """

    def __init__(self, state: SharedState, go: asyncio.Event) -> None:
        self.state = state
        self.go = go
        self.reached = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        return await self.state.get(key)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self.state.put(key, value, ttl)

    async def acquire(self, key: str, ttl: float) -> str | None:
        if key.startswith("lock:"):
            self.reached.set()
            # Bounded, so an implementation in which the other replica never looks at the lock still proceeds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.go.wait()
        return await self.state.acquire(key, ttl)

    async def release(self, key: str, token: str) -> None:
        await self.state.release(key, token)


class SignalLockLook(HoldRefreshLock):
    """A replica's real shared state that sets `go` once it has looked at a refresh lock."""

    async def get(self, key: str) -> bytes | None:
        value = await self.state.get(key)
        if key.startswith("lock:"):
            self.go.set()
        return value

    async def acquire(self, key: str, ttl: float) -> str | None:
        return await self.state.acquire(key, ttl)


async def test_rotation_loser_of_cooldown_race_waits_for_winner(
    make_replicas: MakeReplicas, issuer: TestIssuer
) -> None:
    """A replica that loses the unknown-kid cooldown to another still gets the rotated key from that one's fetch."""
    a, b = await make_replicas(2)
    await warm((a, b), issuer)
    assert a.exchange.keys.shared is not None and b.exchange.keys.shared is not None
    go = asyncio.Event()
    held = a.exchange.keys.shared.state = HoldRefreshLock(a.exchange.keys.shared.state, go)
    b.exchange.keys.shared.state = SignalLockLook(b.exchange.keys.shared.state, go)
    issuer.rotate()

    # A takes the shared cooldown for the new kid and is about to take the refresh lock when B asks.
    at_a = asyncio.create_task(a.mint(issuer.gitlab_token()))
    async with asyncio.timeout(5):
        await held.reached.wait()
    at_b = await b.mint(issuer.gitlab_token())
    at_a_response = await at_a

    assert at_a_response.status_code == 200, at_a_response.text
    assert at_b.status_code == 200, at_b.text
    assert issuer.jwks_count == 1


# Two cache levels: a warm replica does not ask Redis for keys


async def test_warm_replica_does_not_read_keys_from_redis(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """50 mints at a warm replica cost Redis one SET each (the jti) and not a single GET."""
    (replica,) = await make_replicas(1)
    await warm((replica,), issuer)
    batch = tokens(issuer, 50)
    gets, sets = command_calls(redis_server, "get"), command_calls(redis_server, "set")
    for token in batch:
        assert (await replica.mint(token)).status_code == 200
    assert command_calls(redis_server, "get") - gets == 0
    assert command_calls(redis_server, "set") - sets == 50
    assert (issuer.discovery_count, issuer.jwks_count) == (0, 0)


# One set of signing keys


def write_key(path: Path, *, private: bool = True) -> Any:
    key = generate_key()
    path.write_text(json.dumps(key.as_dict(private=private)))
    return key


async def jwks_of(replica: Replica) -> dict[str, Any]:
    response = await replica.client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def test_replicas_with_one_signing_key_publish_identical_jwks(
    make_replicas: MakeReplicas, issuer: TestIssuer, tmp_path: Path
) -> None:
    """Replicas configured with the same signing_key publish the same JWKS, which verifies any replica's tokens."""
    key = write_key(tmp_path / "signing.jwk")
    replicas = await make_replicas(3, signing_key=str(tmp_path / "signing.jwk"))
    published = [await jwks_of(replica) for replica in replicas]
    assert published[0] == published[1] == published[2]
    assert [k["kid"] for k in published[0]["keys"]] == [key.thumbprint()]

    minted = (await replicas[0].mint(issuer.gitlab_token())).json()["token"]
    verified = jwt.decode(minted, JWKSet.import_key_set(published[2]), algorithms=["ES256"])
    assert verified.header["kid"] == key.thumbprint()
    assert verified.claims["sub"] == "gitlab-com:group/project"


async def test_signing_key_rotation_publishes_both_and_signs_with_new(
    make_replicas: MakeReplicas, issuer: TestIssuer, tmp_path: Path
) -> None:
    """With previous_signing_keys set, every replica publishes old and new keys and signs with the new one."""
    old = write_key(tmp_path / "old.jwk", private=False)
    new = write_key(tmp_path / "new.jwk")
    replicas = await make_replicas(
        2, signing_key=str(tmp_path / "new.jwk"), previous_signing_keys=[str(tmp_path / "old.jwk")]
    )
    published = [await jwks_of(replica) for replica in replicas]
    assert published[0] == published[1]
    assert [k["kid"] for k in published[0]["keys"]] == [new.thumbprint(), old.thumbprint()]
    assert all("d" not in k for k in published[0]["keys"])

    for replica in replicas:
        minted = (await replica.mint(issuer.gitlab_token())).json()["token"]
        verified = jwt.decode(minted, JWKSet.import_key_set(published[0]), algorithms=["ES256"])
        assert verified.header["kid"] == new.thumbprint()


# Redis down


async def test_redis_down_warm_replica_verifies_but_refuses_to_mint(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """With Redis dead, a warm replica still verifies tokens from its own keys but answers 503 to mints."""
    (replica,) = await make_replicas(1)
    await warm((replica,), issuer)
    redis_server.stop()

    response = await replica.mint(issuer.gitlab_token())
    assert response.status_code == 503
    assert error_code(response) == "replay-store-unavailable"
    assert "retry" in response.json()["errors"][0]["description"]
    # Verification still runs on the in-process keys: a bad signature is still a 422, not a 503.
    forged = issuer.gitlab_token()[:-8] + "AAAAAAAA"
    response = await replica.mint(forged)
    assert response.status_code == 422 and error_code(response) == "invalid-token"
    assert (issuer.discovery_count, issuer.jwks_count) == (0, 0)


async def test_readyz_follows_redis(make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer) -> None:
    """/readyz is 503 while Redis is down and 200 again once it is back, and a refused token then mints."""
    (replica,) = await make_replicas(1)
    await warm((replica,), issuer)
    assert await replica.ready() == 200

    redis_server.stop()
    assert await replica.ready() == 503
    refused = issuer.gitlab_token()
    assert (await replica.mint(refused)).status_code == 503

    redis_server.start()
    assert await replica.ready() == 200
    # Refused while Redis was dead means not spent: the same token is good once Redis is back, once.
    assert (await replica.mint(refused)).status_code == 200
    response = await replica.mint(refused)
    assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"


async def test_token_refused_while_redis_hung_is_usable_after(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """A token refused with 503 while Redis hangs is still unspent, so it mints once Redis resumes."""
    (replica,) = await make_replicas(1)
    await warm((replica,), issuer)
    redis_server.pause()
    token = issuer.gitlab_token()
    response = await replica.mint(token)
    # The refusal tells the client "it was not spent, retry shortly"; the retry below is what a CI job would do.
    assert response.status_code == 503 and error_code(response) == "replay-store-unavailable"

    redis_server.resume()
    assert await replica.ready() == 200
    response = await replica.mint(token)
    assert response.status_code == 200, response.text


async def test_redis_down_with_fallback_keeps_minting(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """With replay_fallback, a dead Redis leaves mints working, replay still caught in-process, and /readyz 200."""
    (replica,) = await make_replicas(1, replay_fallback=True)
    await warm((replica,), issuer)
    redis_server.stop()

    assert await replica.ready() == 200
    token = issuer.gitlab_token()
    assert (await replica.mint(token)).status_code == 200
    response = await replica.mint(token)
    assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"
    assert await replica.ready() == 200


@pytest.mark.parametrize(
    ("fallback", "status", "code"),
    [(False, 503, "replay-store-unavailable"), (True, 200, None)],
    ids=["fail-closed", "fallback"],
)
async def test_cold_replica_with_redis_down_fetches_keys_itself(
    make_replicas: MakeReplicas,
    issuer: TestIssuer,
    redis_server: RedisServer,
    fallback: bool,
    status: int,
    code: str | None,
) -> None:
    """A cold replica whose Redis is dead fetches keys on its own, once for a burst, and fails only the spend."""
    (replica,) = await make_replicas(1, replay_fallback=fallback)
    redis_server.stop()
    responses = await asyncio.gather(*(replica.mint(token) for token in tokens(issuer, 20)))
    assert statuses(responses) == {status: 20}
    if code is not None:
        assert {error_code(r) for r in responses} == {code}
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)


@pytest.mark.parametrize("kind", ["unix", "tls"])
async def test_replicas_share_redis_over_unix_socket_and_tls(
    make_replicas: MakeReplicas, issuer: TestIssuer, ca: trustme.CA, kind: str
) -> None:
    """`unix://` and `rediss://` redis_urls work: a token spent at one replica is reused at the other."""
    # The server listens only on the socket, or only speaks TLS, so nothing else could get through.
    with RedisServer(unix=kind == "unix", tls=ca if kind == "tls" else None) as server:
        a, b = await make_replicas(2, redis_url=server.url)
        token = issuer.gitlab_token()
        assert (await a.mint(token)).status_code == 200
        response = await b.mint(token)
        assert response.status_code == 422 and error_code(response) == "invalid-reuse-token"
        assert await b.ready() == 200
        with server.client() as inspect:
            assert len(list(inspect.scan_iter(match="gateway:jti:*"))) == 1


# --- Shared key sets that cannot be trusted blindly (security review) ---------------------------------------------


def shared_document(issuer: TestIssuer, fetched_at: float) -> bytes:
    """A key set as another replica publishes it in Redis (gateway.keys.shared.dump's shape), with `fetched_at` set."""
    document = {
        "issuer": issuer.url,
        "keys": issuer.jwks()["keys"],
        "fetched_at": fetched_at,
        "jwks_uri": issuer.url + issuer.jwks_path,
    }
    return json.dumps(document).encode()  # json writes nan and inf as NaN and Infinity, and reads them back


def as_issuer(issuer: TestIssuer) -> Issuer:
    return Issuer(name="gitlab-com", url=issuer.url, kind="gitlab")


@pytest.mark.parametrize(
    ("fetched_at", "seen_as"),
    [
        pytest.param(lambda now: now - 10, lambda now: now - 10, id="past-kept"),
        pytest.param(lambda now: now + 3600, lambda now: now, id="an-hour-ahead-clamped"),
        pytest.param(lambda now: 1e300, lambda now: now, id="1e300-clamped"),
    ],
)
def test_shared_set_from_a_clock_ahead_is_dated_no_later_than_now(
    issuer: TestIssuer, clock: FakeClock, fetched_at: Callable[[float], float], seen_as: Callable[[float], float]
) -> None:
    """A shared set's `fetched_at` is clamped to this replica's now: a fast clock elsewhere cannot stretch its TTL."""
    key_set = shared.load(shared_document(issuer, fetched_at(clock())), as_issuer(issuer), clock())
    assert key_set is not None and key_set.source == "redis"
    assert key_set.fetched_at == seen_as(clock())
    assert issuer.signing_kid in key_set.keys


@pytest.mark.parametrize("fetched_at", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_shared_set_with_a_non_finite_fetched_at_is_ignored(issuer: TestIssuer, fetched_at: float) -> None:
    """A shared set dated NaN or infinity is not adopted (it could never expire), so the replica fetches its own."""
    assert shared.load(shared_document(issuer, fetched_at), as_issuer(issuer), 1_000_000.0) is None


async def test_redis_failing_after_the_upstream_fetch_costs_no_second_fetch(
    make_replicas: MakeReplicas, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """If Redis stops answering while the lock holder fetches keys, the set it fetched is used: one fetch, not two."""
    (replica,) = await make_replicas(1, replay_fallback=True)
    replica.exchange.store.deadline = 0.3  # each hung Redis call gives up sooner; keeps the test fast
    # The JWKS answer is held back, so Redis can be frozen while the fetch is in flight (after lock and read).
    issuer.delay = 0.5
    issuer.paths_misbehave = {"jwks"}
    mint = asyncio.create_task(replica.mint(issuer.gitlab_token()))
    for _ in range(1000):  # wall time: waiting for the issuer's thread to see the request, not for the clock
        if issuer.jwks_count:
            break
        await asyncio.sleep(0.005)
    redis_server.pause()
    try:
        response = await mint
    finally:
        redis_server.resume()
    assert response.status_code == 200, response.text  # keys from the one fetch; the jti spent by the fallback
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)
