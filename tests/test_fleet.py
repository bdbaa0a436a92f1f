"""A fleet keeps every promise one process keeps: shared state keyed by what was verified, reloads whole or not at all.

Gateways are full apps built from their own config files and driven over HTTP; the Redis is a real `redis-server`
of each test's own (with an ACL user where the test says so); issuers are the real HTTPS test issuers. One FakeClock
drives every gateway of a test, so "later" is the same moment for all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MAX_LEEWAY, Issuer
from gateway.keys import shared
from gateway.keys.fetch import trust_id
from gateway.mint import generate_key
from gateway.reload import Reloader
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, Gateway, error_code, gitlab_issuer, write_config
from tests.processes import GatewayProcess
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

NAME = "gitlab-com"
TTL = 300  # the keys_ttl default


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def other(other_issuer: TestIssuer) -> Iterator[TestIssuer]:
    """The second issuer (another URL, same CA), with knobs and counters reset around each test."""
    other_issuer.reset()
    yield other_issuer
    other_issuer.reset()


def token(issuer: TestIssuer, clock: FakeClock, **claims: Any) -> str:
    """A fresh GitLab token (its own jti) of `issuer`, issued at the FakeClock's now."""
    return issuer.sign(issuer.gitlab_claims(now=int(clock()), **claims))


def forged(victim: TestIssuer, attacker: TestIssuer, clock: FakeClock) -> str:
    """A token that claims to come from `victim` (its `iss`, its claim shapes), signed with `attacker`'s key."""
    return attacker.sign(victim.gitlab_claims(now=int(clock())))


def directory_of(gateway: Gateway) -> Path:
    path = gateway.exchange.settings.config_path
    assert path is not None
    return path.parent


def reloader(gateway: Gateway) -> Reloader:
    return gateway.app.state.reloader  # type: ignore[no-any-return]


def reloads(text: str) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_config_reloads"
        for sample in family.samples
        if sample.name == "gateway_config_reloads_total"
    }


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-token"


# --- Two gateways on one Redis never accept each other's keys ---------------------------------------------------


@pytest.mark.parametrize("staging_prefix", ["gateway:", "staging:"], ids=["same-prefix", "own-prefix"])
async def test_a_gateway_never_adopts_keys_another_config_fetched_for_the_same_issuer_name(
    make_gateway: Any,
    issuer: TestIssuer,
    other: TestIssuer,
    redis_server: RedisServer,
    clock: FakeClock,
    staging_prefix: str,
) -> None:
    """After staging (gitlab-com = another URL) fetched its keys, a token with production's iss signed with staging's
    key is invalid-token at a warm replica of production (also after its TTL refresh) and at a cold one."""
    production = {NAME: gitlab_issuer(issuer)}
    warm = await make_gateway(production, redis_url=redis_server.url)
    assert (await warm.mint(token(issuer, clock))).status_code == 200

    staging = await make_gateway({NAME: gitlab_issuer(other)}, redis_url=redis_server.url, redis_prefix=staging_prefix)
    assert (await staging.mint(token(other, clock))).status_code == 200
    assert other.jwks_count == 1

    assert_invalid_token(await warm.mint(forged(issuer, other, clock)))

    # Past the TTL: staging publishes a newer set first, then production refreshes in the background.
    clock.advance(TTL + 1)
    assert (await staging.mint(token(other, clock))).status_code == 200
    await staging.exchange.keys.settle()
    assert (await warm.mint(token(issuer, clock))).status_code == 200
    await warm.exchange.keys.settle()
    key_set = warm.exchange.keys.state(NAME).key_set
    assert key_set is not None and key_set.jwks_uri == issuer.url + issuer.jwks_path
    assert_invalid_token(await warm.mint(forged(issuer, other, clock)))

    cold = await make_gateway(production, redis_url=redis_server.url)
    assert_invalid_token(await cold.mint(forged(issuer, other, clock)))
    assert (await cold.mint(token(issuer, clock))).status_code == 200


async def test_a_reload_re_pointing_a_name_never_mixes_the_two_issuers_keys(
    make_gateway: Any, issuer: TestIssuer, other: TestIssuer, redis_server: RedisServer, clock: FakeClock
) -> None:
    """A reload re-points gitlab-com at another URL on one replica: its old keys do not verify the new issuer's
    tokens, and the new issuer's keys it shares do not verify the old issuer's tokens at a warm or a cold replica."""
    first, second = [await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url) for _ in "12"]
    for replica in (first, second):
        assert (await replica.mint(token(issuer, clock))).status_code == 200

    write_config(directory_of(first), {NAME: gitlab_issuer(other)}, [PUBLISHER], redis_url=redis_server.url)
    assert await reloader(first).reload()
    # The re-pointed replica: the old issuer's keys are not the new issuer's.
    assert_invalid_token(await first.mint(forged(other, issuer, clock)))
    assert (await first.mint(token(other, clock))).status_code == 200  # fetched, and shared through Redis

    assert_invalid_token(await second.mint(forged(issuer, other, clock)))
    clock.advance(TTL + 1)
    assert (await first.mint(token(other, clock))).status_code == 200
    await first.exchange.keys.settle()
    assert (await second.mint(token(issuer, clock))).status_code == 200
    await second.exchange.keys.settle()
    assert_invalid_token(await second.mint(forged(issuer, other, clock)))

    cold = await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url)
    assert_invalid_token(await cold.mint(forged(issuer, other, clock)))


async def test_shared_key_set_is_named_by_trust_and_carries_its_issuer(
    make_gateway: Any, issuer: TestIssuer, redis_server: RedisServer, clock: FakeClock
) -> None:
    """The key set in Redis is under keys:<trust id> (no config name in any key) and says which issuer URL it is of."""
    gateway = await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url)
    assert (await gateway.mint(token(issuer, clock))).status_code == 200
    (issuer_record,) = gateway.exchange.settings.issuers.values()
    with redis_server.client() as inspect:
        names = sorted(key.decode() for key in inspect.scan_iter(match="*"))
        document = json.loads(inspect.get(f"gateway:keys:{trust_id(issuer_record)}") or b"{}")
    assert f"gateway:keys:{trust_id(issuer_record)}" in names
    assert not any(NAME in name for name in names), names
    assert document["issuer"] == issuer.url


async def test_a_key_set_stored_under_our_name_for_another_issuer_is_refused(
    make_gateway: Any, issuer: TestIssuer, other: TestIssuer, redis_server: RedisServer, clock: FakeClock
) -> None:
    """A set whose `issuer` is another URL, written under our issuer's key, is ignored: the cold replica fetches its
    own and the other issuer's key does not verify."""
    gateway = await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url)
    (ours,) = gateway.exchange.settings.issuers.values()
    planted = {
        "issuer": other.url,
        "keys": other.jwks()["keys"],
        "fetched_at": clock(),
        "jwks_uri": other.url + other.jwks_path,
    }
    with redis_server.client() as inspect:
        inspect.set(f"gateway:{shared.names(ours)[0]}", json.dumps(planted))
    assert_invalid_token(await gateway.mint(forged(issuer, other, clock)))
    assert issuer.jwks_count >= 1
    assert (await gateway.mint(token(issuer, clock))).status_code == 200


def as_issuer(issuer: TestIssuer, **extra: Any) -> Issuer:
    return Issuer(name=NAME, url=issuer.url, kind="gitlab", **extra)


def published(source: TestIssuer, **changes: Any) -> bytes:
    document = {
        "issuer": source.url,
        "keys": source.jwks()["keys"],
        "fetched_at": 1_000_000.0,
        "jwks_uri": source.url + source.jwks_path,
    }
    return json.dumps(document | changes).encode()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"issuer": "https://elsewhere.test"}, id="other-issuer"),
        pytest.param({"issuer": None}, id="no-issuer"),
        pytest.param({"jwks_uri": "https://elsewhere.test/keys"}, id="jwks-uri-off-origin"),
        pytest.param({"jwks_uri": 7}, id="jwks-uri-not-a-string"),
    ],
)
def test_published_set_of_another_issuer_or_origin_does_not_load(issuer: TestIssuer, changes: dict[str, Any]) -> None:
    """A shared set is refused unless its `issuer` is ours and its jwks_uri is on our issuer's origin."""
    assert shared.load(published(issuer), as_issuer(issuer), 1_000_001.0) is not None
    assert shared.load(published(issuer, **changes), as_issuer(issuer), 1_000_001.0) is None


def test_trust_id_follows_url_ca_content_and_algorithms_not_the_name(issuer: TestIssuer) -> None:
    """The trust id changes with the URL, the CA bundle content or the algorithms, and not with the config name."""
    base = as_issuer(issuer, ca_pem=b"ca one")
    assert trust_id(base) == trust_id(Issuer(name="renamed", url=issuer.url, kind="gitlab", ca_pem=b"ca one"))
    others = [
        as_issuer(issuer, ca_pem=b"ca two"),
        as_issuer(issuer),
        as_issuer(issuer, ca_pem=b"ca one", algorithms=("RS256", "PS256")),
        Issuer(name=NAME, url=issuer.url + "/other", kind="gitlab", ca_pem=b"ca one"),
    ]
    assert len({trust_id(base), *map(trust_id, others)}) == 1 + len(others)
    assert len(trust_id(base)) == 64


# --- A Redis ACL user per deployment, limited to its prefix ----------------------------------------------------------

# What the gateway needs (README, "Running a fleet"): keys, spends and locks (get, set, del, eval), rate limits
# (evalsha, or eval the first time, of a script calling get and set), and ping for /readyz.
ACL_COMMANDS = "+ping +get +set +del +eval +evalsha"


def acl_user(server: RedisServer, user: str, prefix: str) -> str:
    """Create `user` with access to `prefix`* only, and return a redis_url that logs in as it."""
    with server.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", f">{user}-secret", f"~{prefix}*", "resetchannels",
            "-@all", *ACL_COMMANDS.split(),
        )  # fmt: skip
    return f"redis://{user}:{user}-secret@127.0.0.1:{server.port}/0"


def redis_errors(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_redis_errors"
        for sample in family.samples
        if sample.name == "gateway_redis_errors_total"
    )


@pytest.mark.parametrize("prefix", ["gateway:", "staging:"])
async def test_gateway_works_under_an_acl_user_limited_to_its_prefix(
    make_gateway: Any, issuer: TestIssuer, redis_server: RedisServer, clock: FakeClock, prefix: str
) -> None:
    """Under an ACL user allowed only ~PREFIX* and the documented commands, replicas mint, share key sets (one fetch
    for a cold burst), spend each jti once and count rate limits, without a single Redis error."""
    url = acl_user(redis_server, "deploy", prefix)
    with redis.Redis.from_url(url, socket_timeout=5) as restricted, pytest.raises(redis.exceptions.NoPermissionError):
        restricted.get("elsewhere:x")  # the ACL is in force: nothing outside the prefix

    settings = {"redis_url": url, "redis_prefix": prefix, "rate_limit_client": "1000/minute"}
    a, b = [await make_gateway({NAME: gitlab_issuer(issuer)}, **settings) for _ in "ab"]
    await mint_and_share_under_acl(a, b, issuer, clock)
    with redis_server.client() as inspect:
        names = [key.decode() for key in inspect.scan_iter(match="*")]
    assert names and all(name.startswith(prefix) for name in names), names
    assert any(name.startswith(f"{prefix}rate:") for name in names), names


async def mint_and_share_under_acl(a: Gateway, b: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    tokens = [token(issuer, clock) for _ in range(10)]
    responses = [await replica.mint(t) for replica, t in zip([a, b] * 5, tokens, strict=True)]
    assert [r.status_code for r in responses] == [200] * 10
    assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)
    again = await b.mint(tokens[0])
    assert again.status_code == 422 and error_code(again) == "invalid-reuse-token"
    for replica in (a, b):
        assert (await replica.client.get("/readyz")).status_code == 200
        assert redis_errors((await replica.client.get("/metrics")).text) == 0


# --- Reloads apply whole or are refused whole ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("replay_fallback", True),
        ("redis_prefix", "other:"),
        ("redis_url", None),  # filled in with a second Redis
    ],
)
async def test_a_reload_changing_a_restart_only_setting_is_refused_whole(
    make_gateway: Any,
    issuer: TestIssuer,
    redis_server: RedisServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    value: Any,
) -> None:
    """A reload changing redis_url, redis_prefix or replay_fallback changes nothing (not even the publishers it adds),
    logs the setting with "needs a restart", and counts a failure."""
    gateway = await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url)
    release = PUBLISHER | {"repository": "group/release", "projects": ["release-project"]}
    with RedisServer() as second:
        settings = {"redis_url": redis_server.url, setting: second.url if value is None else value}
        write_config(directory_of(gateway), {NAME: gitlab_issuer(issuer)}, [PUBLISHER, release], **settings)
        with caplog.at_level(logging.ERROR, logger="gateway.reload"):
            assert await reloader(gateway).reload() is False
    assert f"{setting} needs a restart" in caplog.text
    assert getattr(gateway.exchange.settings, setting) == {"redis_url": redis_server.url}.get(
        setting, {"replay_fallback": False, "redis_prefix": "gateway:"}.get(setting)
    )
    refused = await gateway.mint(token(issuer, clock, project_path="group/release"))
    assert error_code(refused) == "invalid-publisher"
    assert reloads((await gateway.client.get("/metrics")).text) == {"failure": 1.0}


async def test_a_reload_raising_leeway_does_not_reopen_a_spent_token(
    make_gateway: Any, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token spent under leeway 0 and expired since stays spent after a reload raises leeway to MAX_LEEWAY."""
    gateway = await make_gateway({NAME: gitlab_issuer(issuer)}, leeway=0)
    now = int(clock())
    spent = issuer.sign(issuer.gitlab_claims(now=now, exp=now + 60))
    assert (await gateway.mint(spent)).status_code == 200
    clock.advance(120)  # expired: under leeway 0 the old bound (exp + leeway + 1) has passed as well
    write_config(directory_of(gateway), {NAME: gitlab_issuer(issuer)}, [PUBLISHER], leeway=MAX_LEEWAY)
    assert await reloader(gateway).reload()
    again = await gateway.mint(spent)
    assert again.status_code == 422 and error_code(again) == "invalid-reuse-token"


def own_ca_bundle(directory: Path, issuer: TestIssuer) -> Path:
    """A copy of the issuer's CA in the config's directory, for the test to rewrite."""
    bundle = directory / "issuer-ca.pem"
    shutil.copyfile(issuer.ca_path, bundle)
    return bundle


async def test_a_reload_with_new_ca_bundle_content_drops_the_old_trust(
    make_gateway: Any, issuer: TestIssuer, redis_server: RedisServer, clock: FakeClock, tmp_path: Path
) -> None:
    """When the CA bundle file's content changes (same path), a reload rebuilds the fetcher and drops the cached
    keys: with the issuer's CA removed, the keys cannot be had (503), neither from memory nor from Redis."""
    bundle = own_ca_bundle(tmp_path, issuer)
    issuers = {NAME: {"url": issuer.url, "kind": "gitlab", "ca_bundle": str(bundle)}}
    gateway = await make_gateway(issuers, redis_url=redis_server.url)
    assert (await gateway.mint(token(issuer, clock))).status_code == 200

    bundle.write_bytes(trustme.CA().cert_pem.bytes())  # the issuer's CA is gone, another one trusted instead
    write_config(directory_of(gateway), issuers, [PUBLISHER], redis_url=redis_server.url)
    assert await reloader(gateway).reload()
    response = await gateway.mint(token(issuer, clock))
    assert response.status_code == 503 and error_code(response) == "issuer-unavailable"
    assert "CERTIFICATE_VERIFY_FAILED" in (gateway.exchange.keys.state(NAME).last_error or "")

    shutil.copyfile(issuer.ca_path, bundle)  # and trusted again
    assert await reloader(gateway).reload()
    clock.advance(10)  # past the failure backoff
    assert (await gateway.mint(token(issuer, clock))).status_code == 200


async def test_a_reload_applies_key_cache_settings_to_the_shared_tier_too(
    make_gateway: Any, issuer: TestIssuer, redis_server: RedisServer, clock: FakeClock
) -> None:
    """After a reload lowers keys_ttl, a set in Redis older than the new ttl is not adopted as fresh: the replica
    fetches upstream once, and the other replica then adopts that newer set without a fetch of its own."""
    a, b = [await make_gateway({NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url) for _ in "ab"]
    for replica in (a, b):
        assert (await replica.mint(token(issuer, clock))).status_code == 200
    issuer.reset_counts()
    for replica in (a, b):
        write_config(directory_of(replica), {NAME: gitlab_issuer(issuer)}, [PUBLISHER], redis_url=redis_server.url,
                     keys_ttl=10)  # fmt: skip
        assert await reloader(replica).reload()
        assert replica.exchange.keys.policy.ttl == 10

    clock.advance(11)
    for replica in (a, b):
        assert (await replica.mint(token(issuer, clock))).status_code == 200
        await replica.exchange.keys.settle()
    assert issuer.jwks_count == 1
    for replica in (a, b):
        key_set = replica.exchange.keys.state(NAME).key_set
        assert key_set is not None and clock() - key_set.fetched_at < 10


# --- End to end: `gateway serve` processes on one Redis -----------------------------------------------------------


async def post(base: str, raw: str) -> httpx.Response:
    # A fresh connection per request: with --workers, the kernel hands each to either worker.
    async with httpx.AsyncClient(base_url=base, timeout=15) as client:
        return await client.post("/_/oidc/mint-token", json={"token": raw})


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait (bounded) for something another process does; there is no event to wait on across processes."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def config_in(directory: Path, issuers: dict[str, Any], **gateway: Any) -> Path:
    directory.mkdir()
    return write_config(directory, issuers, [PUBLISHER], **gateway)


async def test_served_gateways_of_two_configs_on_one_redis_never_accept_each_others_keys(
    tmp_path: Path, issuer: TestIssuer, other: TestIssuer, redis_server: RedisServer
) -> None:
    """Real processes: production and staging name different URLs gitlab-com on one Redis (keys_ttl 1 s, so both
    refresh through Redis); a token with production's iss signed with staging's key is invalid-token at a warm
    production replica after the refreshes and at a production replica started afterwards."""
    settings = {"redis_url": redis_server.url, "keys_ttl": 1}
    production = config_in(tmp_path / "production", {NAME: gitlab_issuer(issuer)}, **settings)
    staging = config_in(tmp_path / "staging", {NAME: gitlab_issuer(other)}, **settings)
    with GatewayProcess(production).wait("/readyz") as warm, GatewayProcess(staging).wait("/readyz") as stage:
        assert (await post(warm.base, issuer.gitlab_token())).status_code == 200
        assert (await post(stage.base, other.gitlab_token())).status_code == 200
        assert_invalid_token(await post(warm.base, forged_now(issuer, other)))

        # Past keys_ttl on the real clock: staging refreshes (and publishes) first, then production.
        fetched = other.jwks_count
        await asyncio.sleep(1.1)
        assert (await post(stage.base, other.gitlab_token())).status_code == 200
        await until(lambda: other.jwks_count > fetched)
        fetched = issuer.jwks_count
        assert (await post(warm.base, issuer.gitlab_token())).status_code == 200
        await until(lambda: issuer.jwks_count > fetched)
        assert_invalid_token(await post(warm.base, forged_now(issuer, other)))

        with GatewayProcess(production).wait("/readyz") as cold:
            assert_invalid_token(await post(cold.base, forged_now(issuer, other)))
            assert (await post(cold.base, issuer.gitlab_token())).status_code == 200


def forged_now(victim: TestIssuer, attacker: TestIssuer) -> str:
    """As `forged`, on the real clock (for real processes)."""
    return attacker.sign(victim.gitlab_claims())


async def test_two_served_workers_on_redis_mint_each_token_once(
    tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """`gateway serve --workers 2` with redis_url and signing_key: 8 concurrent requests with one token, on fresh
    connections spread over both workers, mint exactly once, for each of 3 tokens."""
    signing = tmp_path / "signing.jwk"
    signing.write_text(json.dumps(generate_key().as_dict(private=True)))
    config = config_in(
        tmp_path / "config", {NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url, signing_key=str(signing)
    )
    with GatewayProcess(config, workers=2).wait("/readyz") as server:
        for _ in range(3):
            raw = issuer.gitlab_token()
            responses = await asyncio.gather(*(post(server.base, raw) for _ in range(8)))
            assert sorted(r.status_code for r in responses) == [200] + [422] * 7
            assert {error_code(r) for r in responses if r.status_code == 422} == {"invalid-reuse-token"}


async def test_sighup_changing_a_restart_only_setting_is_refused_by_a_running_server(
    tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    """Real process: SIGHUP after replay_fallback and a new publisher were written refuses both, logs
    "replay_fallback needs a restart" and counts one failed reload; the server keeps minting with the old config."""
    release = PUBLISHER | {"repository": "group/release", "projects": ["release-project"]}
    directory = tmp_path / "config"
    config = config_in(directory, {NAME: gitlab_issuer(issuer)}, redis_url=redis_server.url, reload_interval=0)
    with GatewayProcess(config).wait("/readyz") as server:
        write_config(
            directory, {NAME: gitlab_issuer(issuer)}, [PUBLISHER, release], redis_url=redis_server.url,
            reload_interval=0, replay_fallback=True,
        )  # fmt: skip
        server.process.send_signal(signal.SIGHUP)
        async with httpx.AsyncClient(base_url=server.base, timeout=15) as client:
            async with asyncio.timeout(10):
                while reloads((await client.get("/metrics")).text).get("failure", 0) < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert reloads((await client.get("/metrics")).text) == {"failure": 1.0}
        # Log lines reach the file up to 50 ms after they are logged (the log writer batches them).
        async with asyncio.timeout(5):
            while "replay_fallback needs a restart" not in server.log.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        refused = await post(server.base, issuer.gitlab_token(project_path="group/release"))
        assert error_code(refused) == "invalid-publisher"
        assert (await post(server.base, issuer.gitlab_token())).status_code == 200
