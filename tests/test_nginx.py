"""End to end: three `gateway serve` processes behind a real nginx, sharing one Redis, in front of the test issuer."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.mint import generate_key
from gateway.testing import TestIssuer
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.processes import NGINX, GatewayProcess, Nginx, nginx_proxy_conf, stop_all
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

REPLICAS = 3


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def backends(tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer) -> Iterator[list[int]]:
    """Three `gateway serve` processes with one config, one signing key and one Redis; their ports."""
    key = generate_key()
    (tmp_path / "signing.jwk").write_text(json.dumps(key.as_dict(private=True)))
    path = write_config(
        tmp_path,
        {"gitlab-com": gitlab_issuer(issuer)},
        (PUBLISHER,),
        redis_url=redis_server.url,
        signing_key="signing.jwk",
    )
    servers: list[GatewayProcess] = []
    try:
        servers.extend(GatewayProcess(path, args=("--log-level", "warning")) for _ in range(REPLICAS))
        for server in servers:
            server.wait("/readyz")
        yield [server.port for server in servers]
    finally:
        stop_all(servers)


@pytest.fixture
def nginx(tmp_path: Path, backends: list[int]) -> Iterator[str]:
    """A real nginx round-robining over the backends; its base URL."""
    with Nginx(tmp_path / "nginx", lambda prefix, port: nginx_proxy_conf(prefix, port, backends)).wait() as server:
        yield server.base


def successes(metrics: str) -> int:
    found = re.search(r'^gateway_mint_requests_total\{issuer="gitlab-com",outcome="success"\} (\S+)$', metrics, re.M)
    return int(float(found.group(1))) if found else 0


async def test_cold_replicas_behind_nginx_fetch_keys_once(nginx: str, backends: list[int], issuer: TestIssuer) -> None:
    """300 concurrent cold mints through nginx to three replicas all succeed with one discovery and one JWKS fetch."""
    issuer.reset_counts()
    tokens = [issuer.gitlab_token() for _ in range(300)]
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=nginx, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(
            *(client.post("/_/oidc/mint-token", json={"token": token}) for token in tokens)
        )
        problems = [r.text for r in responses if r.status_code != 200]
        assert not problems, f"{len(problems)} of 300 failed, e.g. {problems[:3]}"
        assert (issuer.discovery_count, issuer.jwks_count) == (1, 1)

        # Every replica took its share, and all publish the same keys.
        per_backend = [successes((await client.get(f"http://127.0.0.1:{port}/metrics")).text) for port in backends]
        assert sum(per_backend) == 300 and all(per_backend), per_backend
        published = [(await client.get(f"http://127.0.0.1:{port}/.well-known/jwks.json")).json() for port in backends]
        assert published[0] == published[1] == published[2]

        # And one Redis spends for all: a token minted through nginx is refused at every replica directly.
        for port in backends:
            response = await client.post(f"http://127.0.0.1:{port}/_/oidc/mint-token", json={"token": tokens[0]})
            assert response.status_code == 422
            assert response.json()["errors"][0]["code"] == "invalid-reuse-token"
