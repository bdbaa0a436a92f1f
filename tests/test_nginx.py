"""End to end: three `gateway serve` processes behind a real nginx, sharing one Redis, in front of the test issuer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.mint import generate_key
from gateway.testing import TestIssuer, free_port
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.redis_server import REDIS_SERVER, RedisServer

NGINX = shutil.which("nginx")

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

REPLICAS = 3
STARTUP = 30.0


def wait_until_answering(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: process exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not answer within {STARTUP:g} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def nginx_conf(prefix: Path, port: int, upstreams: list[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would hand its workers to `nobody`, who cannot enter pytest's private tmp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
{temp}
    upstream gateway {{
        # Round robin, the default: consecutive requests go to consecutive replicas.
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


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
    # The config file is the whole truth here, not whatever GATEWAY_* the environment running the tests has.
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    ports = [free_port() for _ in range(REPLICAS)]
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for port in ports:
            log = tmp_path / f"gateway-{port}.log"
            with log.open("wb") as out:
                command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
                process = subprocess.Popen(
                    [*command, "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env
                )
            processes.append((process, log))
        for port, (process, log) in zip(ports, processes, strict=True):
            wait_until_answering(f"http://127.0.0.1:{port}/readyz", process, log)
        yield ports
    finally:
        for process, _ in processes:
            stop(process)


@pytest.fixture
def nginx(tmp_path: Path, backends: list[int]) -> Iterator[str]:
    """A real nginx round-robining over the backends; its base URL."""
    assert NGINX is not None
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, backends))
    log = prefix / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/livez", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


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
