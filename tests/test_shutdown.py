"""Graceful shutdown and multi-worker metrics, with real `gateway serve` processes (and nginx and Redis).

SIGTERM must turn /readyz 503 at once, keep serving for `drain_seconds`, then let the requests in flight finish
and exit 0; behind a load balancer that retries refused connections, no client sees a failed mint.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.mint import generate_key
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.processes import NGINX, GatewayProcess, Nginx, gateway_environ, nginx_proxy_conf, stop_all
from tests.redis_server import REDIS_SERVER, RedisServer

MINT = "/_/oidc/mint-token"


def audit(server: GatewayProcess) -> list[dict[str, Any]]:
    """The audit lines a server logged (log_format = "json")."""
    lines = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"logger":"gateway.audit"' in line:
            lines.append(json.loads(line))
    return lines


@pytest.fixture
def servers() -> Iterator[list[GatewayProcess]]:
    """Servers a test started; each is stopped afterwards if the test did not stop it."""
    started: list[GatewayProcess] = []
    yield started
    stop_all(started)


@pytest.fixture
def signing_key(tmp_path: Path) -> str:
    """A signing key file shared by every replica, so they all publish the same JWKS."""
    path = tmp_path / "signing.jwk"
    path.write_text(json.dumps(generate_key().as_dict(private=True)))
    return str(path)


def mint_successes(metrics: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "gateway_mint_requests_total" and sample.labels["outcome"] == "success"
    )


async def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll `condition()` (state of another process or thread) until true, failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.01)


# One replica: drain, then finish what is in flight, then exit 0


async def test_sigterm_drains_then_finishes_in_flight_and_exits_0(
    tmp_path: Path,
    issuer: TestIssuer,
    other_issuer: TestIssuer,
    servers: list[GatewayProcess],
    signing_key: str,
) -> None:
    """After SIGTERM: /readyz 503 within 0.5 s, mints served through the drain, a slow one finished, exit 0."""
    drain = 1.0
    config = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer), "slow": gitlab_issuer(other_issuer)},
        (PUBLISHER, PUBLISHER | {"issuer": "slow"}),
        drain_seconds=drain,
        signing_key=signing_key,
        log_format="json",
    )
    server = GatewayProcess(config)
    servers.append(server)
    server.wait("/readyz")
    # The session's second issuer keeps its knobs between tests: set them here, put them back below.
    other_issuer.reset()
    try:
        async with (
            httpx.AsyncClient(base_url=server.base, timeout=15) as client,
            httpx.AsyncClient(base_url=server.base, timeout=15) as slow_client,
        ):
            assert (await client.post(MINT, json={"token": issuer.gitlab_token()})).status_code == 200

            # Discovery and JWKS each take 1.2 s: a mint for the cold "slow" issuer is in flight for ~2.4 s.
            other_issuer.delay = 1.2
            slow = asyncio.create_task(slow_client.post(MINT, json={"token": other_issuer.gitlab_token()}))
            await wait_for(lambda: other_issuer.discovery_count > 0, 10, "the slow mint to reach the issuer")

            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while (ready := await client.get("/readyz")).status_code == 200:
                assert time.monotonic() - signalled < 0.5, "/readyz still 200 half a second after SIGTERM"
            assert ready.status_code == 503 and "shutting down" in ready.json()["problems"]
            assert time.monotonic() - signalled < 0.5

            # Still serving during the drain: the load balancer may not have noticed yet.
            response = await client.post(MINT, json={"token": issuer.gitlab_token()})
            assert response.status_code == 200, response.text
            assert time.monotonic() - signalled < drain

            # After the drain the listener closes while the slow mint is still under way.
            while True:
                try:
                    async with httpx.AsyncClient(base_url=server.base, timeout=2) as fresh:
                        await fresh.get("/livez")
                except httpx.ConnectError:
                    break
                assert time.monotonic() - signalled < drain + 3, "still accepting connections after the drain"
                await asyncio.sleep(0.02)
            assert time.monotonic() - signalled >= drain * 0.9
            assert not slow.done(), "the slow mint finished before the listener closed; nothing was in flight"

            response = await slow
            assert response.status_code == 200, response.text
            assert response.json()["projects"] == ["sampleproject"]
    finally:
        other_issuer.reset()

    returncode = await asyncio.to_thread(server.process.wait, 10)
    assert returncode == 0, server.tail()
    assert time.monotonic() - signalled < drain + 5
    assert "Traceback" not in server.log.read_text(errors="replace"), server.tail()
    assert [line["outcome"] for line in audit(server)] == ["success"] * 3


# Three replicas behind nginx, under load, one terminated: no failed mint


# A replica that stopped listening refuses the connection, and one that closed an idle keepalive connection under
# nginx never read the request: both are safe to retry elsewhere, POST included. A mint is never half done by a 503
# either (nothing spent), so that is retried too.
RETRY = ("proxy_connect_timeout 1s;", "proxy_next_upstream error timeout http_503 non_idempotent;")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[Sequence[int]], str]]:
    """Start a real nginx in front of the given ports; returns its base URL."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    started: list[Nginx] = []

    def start(upstreams: Sequence[int]) -> str:
        conf = lambda prefix, port: nginx_proxy_conf(prefix, port, upstreams, location=RETRY)  # noqa: E731
        started.append(Nginx(tmp_path / "nginx", conf))
        return started[-1].wait().base

    yield start
    stop_all(started)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


MINTS = 500
CLIENTS = 30
TERMINATE_AFTER = 100
# Each client waits this long between mints: the load must last past the drain and the exit of the replica.
PACE = 0.15


async def test_sigterm_one_of_three_replicas_under_load_through_nginx_fails_no_mint(
    tmp_path: Path,
    issuer: TestIssuer,
    servers: list[GatewayProcess],
    signing_key: str,
    redis_server: RedisServer,
    nginx: Callable[[Sequence[int]], str],
) -> None:
    """500 mints by 30 clients through nginx to 3 replicas, one terminated midway: all 200, it exits 0."""
    config = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        (PUBLISHER,),
        redis_url=redis_server.url,
        signing_key=signing_key,
        drain_seconds=1,
        log_format="json",
    )
    servers.extend(GatewayProcess(config) for _ in range(3))
    for server in servers:
        server.wait("/readyz")
    base = nginx([server.port for server in servers])
    victim, survivors = servers[0], servers[1:]
    tokens = iter([issuer.gitlab_token() for _ in range(MINTS)])

    results: list[tuple[int | str, float]] = []
    halfway = asyncio.Event()

    async def client() -> None:
        # One connection per client, kept alive, as a CI runner's HTTP client would.
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            for token in tokens:
                try:
                    response = await http.post(MINT, json={"token": token})
                    outcome: int | str = response.status_code if response.status_code == 200 else response.text
                except httpx.HTTPError as e:
                    outcome = repr(e)
                results.append((outcome, time.monotonic()))
                if len(results) == TERMINATE_AFTER:
                    halfway.set()
                await asyncio.sleep(PACE)

    async def terminate() -> tuple[int, float, float]:
        await halfway.wait()
        signalled = time.time()
        victim.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(victim.process.wait, 15)
        return returncode, signalled, time.monotonic()

    async with asyncio.timeout(40):
        _, (returncode, signalled, exited_at) = await asyncio.gather(
            asyncio.gather(*(client() for _ in range(CLIENTS))), terminate()
        )

    failed = Counter(outcome for outcome, _ in results if outcome != 200)
    assert len(results) == MINTS
    assert not failed, f"{sum(failed.values())} of {MINTS} mints failed: {failed.most_common(3)}"
    assert returncode == 0, victim.tail()

    # The victim served its share, through the drain too (nginx does not read /readyz: it kept sending), until it
    # left; the survivors served everything after that.
    served = [line for line in audit(victim) if line["outcome"] == "success"]
    served_by_victim = len(served)
    late_in_drain = sum(1 for line in served if logged_at(line) > signalled + 0.5)
    assert late_in_drain >= 5, f"{late_in_drain} mints served 0.5 s into the drain: it stopped serving early"
    async with httpx.AsyncClient(timeout=10) as http:
        served_by_survivors = [mint_successes((await http.get(f"{s.base}/metrics")).text) for s in survivors]
    assert served_by_victim > 0 and all(served_by_survivors), (served_by_victim, served_by_survivors)
    assert served_by_victim + sum(served_by_survivors) == MINTS
    after_exit = sum(1 for _, at in results if at > exited_at)
    assert after_exit >= 50, f"only {after_exit} mints after the replica exited; the load ended too soon"
    assert "Traceback" not in victim.log.read_text(errors="replace"), victim.tail()


def logged_at(line: Mapping[str, Any]) -> float:
    """The Unix time of a JSON log line (its `time` field, UTC with milliseconds)."""
    return datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# Several workers: /metrics adds up all of them


def worker_mints(directory: Path) -> dict[str, float]:
    """Successful mints counted by each worker process, from prometheus-client's per-process files."""
    counts: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        counts[pid] = sum(
            sample.value
            for metric in MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
            for sample in metric.samples
            if sample.name == "gateway_mint_requests_total" and sample.labels.get("outcome") == "success"
        )
    return counts


async def test_metrics_of_two_workers_add_up(
    tmp_path: Path, issuer: TestIssuer, servers: list[GatewayProcess], signing_key: str, redis_server: RedisServer
) -> None:
    """With --workers 2, /metrics from any worker counts every mint made, both workers' included."""
    # Several workers need what replicas need: one Redis and one signing key (`gateway serve` refuses otherwise).
    config = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        (PUBLISHER,),
        signing_key=signing_key,
        redis_url=redis_server.url,
    )
    # `gateway serve` makes its metrics directory with mkdtemp: under this test's own TMPDIR, it can be found.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = GatewayProcess(config, workers=2, env=gateway_environ(TMPDIR=str(scratch)))
    servers.append(server)
    server.wait("/readyz")
    (directory,) = scratch.glob("gateway-metrics-*")

    made = 0
    # A fresh connection per mint, many at once: the kernel hands them to both workers. Bounded, in case not.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base, timeout=15, limits=no_keepalive) as client:
        for _ in range(10):
            batch = [issuer.gitlab_token() for _ in range(20)]
            responses = await asyncio.gather(*(client.post(MINT, json={"token": token}) for token in batch))
            assert [r.status_code for r in responses] == [200] * 20
            made += 20
            per_worker = worker_mints(directory)
            if len([n for n in per_worker.values() if n]) >= 2:
                break
        assert len([n for n in per_worker.values() if n]) == 2, per_worker
        assert sum(per_worker.values()) == made

        # Whichever worker answers /metrics, it reports the sum.
        for _ in range(6):
            assert mint_successes((await client.get("/metrics")).text) == made
