"""`gateway demo`: the whole exchange on this machine, with no network and nothing to configure.

It starts a local HTTPS OIDC issuer that behaves like GitLab (gateway.testing.TestIssuer, with a throwaway CA),
serves a gateway that trusts it on a free loopback port (uvicorn, as `gateway serve` does), signs a GitLab-shaped
ID token, exchanges it at /_/oidc/mint-token as a CI job would, and verifies the minted token against the
gateway's published JWKS with `gateway.verify`, printing each step. Everything it made is removed on exit.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from . import config
from .app import create_app
from .mint import generate_key
from .testing import TestIssuer
from .verify import InvalidUploadToken, check_project, verify_upload_token

PROJECT = "sampleproject"
REPOSITORY = "group/project"


def main() -> int:
    """Run the demo; 0 when every step behaved as it should."""
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-demo-") as directory, TestIssuer() as issuer:
            return asyncio.run(_demo(Path(directory), issuer))
    except KeyboardInterrupt:
        return 130


def _step(number: int, text: str, detail: Any = None) -> None:
    print(f"[{number}/7] {text}")
    if detail is not None:
        body = detail if isinstance(detail, str) else json.dumps(detail, indent=2, ensure_ascii=False)
        print("\n".join("      " + line for line in body.splitlines()))
    sys.stdout.flush()


def _write_config(directory: Path, issuer: TestIssuer, url: str) -> Path:
    key = generate_key()
    (directory / "signing-key.json").write_text(json.dumps(key.as_dict(private=True)))
    (directory / "publishers.toml").write_text(
        "[[publisher]]\n"
        'issuer = "gitlab-com"\n'
        f'repository = "{REPOSITORY}"\n'
        'workflow = ".gitlab-ci.yml"\n'
        f'projects = ["{PROJECT}"]\n'
    )
    path = directory / "issuers.toml"
    path.write_text(
        "[gateway]\n"
        'audience = "pypi"\n'
        f'url = "{url}"\n'
        'publishers = "publishers.toml"\n'
        'signing_key = "signing-key.json"\n'
        "\n"
        "[issuers.gitlab-com]\n"
        f'url = "{issuer.url}"\n'
        'kind = "gitlab"\n'
        f"ca_bundle = {json.dumps(str(issuer.ca_path))}\n"
    )
    return path


async def _demo(directory: Path, issuer: TestIssuer) -> int:
    _step(1, f"test issuer (GitLab-shaped, HTTPS with a throwaway CA) at {issuer.url}")

    # Bound before the config is written, so the gateway's url (the minted tokens' iss) names the real port.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings = config.load(_write_config(directory, issuer, url))
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_config=None, log_level="warning", access_log=False)
    )
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if serving.done() or time.monotonic() > deadline:
                print("demo failed: the gateway did not start", file=sys.stderr)
                return 1
            await asyncio.sleep(0.01)
        _step(
            2,
            f"gateway serving at {url}, trusting the issuer as gitlab-com; "
            f"publisher {REPOSITORY} .gitlab-ci.yml -> {PROJECT}",
        )
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client:
            return await _exchange(client, issuer, url, settings.audience)
    finally:
        server.should_exit = True
        await serving
        listener.close()


async def _exchange(client: httpx.AsyncClient, issuer: TestIssuer, url: str, audience: str) -> int:
    claims = issuer.gitlab_claims(project_path=REPOSITORY)
    id_token = issuer.sign(claims)
    shown = ("iss", "aud", "project_path", "ref", "ref_path", "ci_config_ref_uri", "exp")
    _step(3, "signed a GitLab CI ID token (RS256) for the job; some of its claims:", {k: claims[k] for k in shown})

    response = await client.post("/_/oidc/mint-token", json={"token": id_token})
    if response.status_code != 200:
        print(f"demo failed: mint-token answered {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    minted = response.json()
    token: str = minted["token"]
    _step(
        4,
        f"POST /_/oidc/mint-token -> 200: an upload token for {minted['projects']}, expires {minted['expires']}",
        f"{token[:40]}...{token[-12:]} ({len(token)} characters)",
    )

    replay = await client.post("/_/oidc/mint-token", json={"token": id_token})
    code = replay.json()["errors"][0]["code"] if replay.status_code == 422 else None
    if code != "invalid-reuse-token":
        print(f"demo failed: a replayed ID token answered {replay.status_code}: {replay.text}", file=sys.stderr)
        return 1
    _step(5, f"the same ID token again -> {replay.status_code} {code} (each ID token mints once)")

    jwks = (await client.get("/.well-known/jwks.json")).json()
    kids = ", ".join(key["kid"] for key in jwks["keys"])
    try:
        verified = verify_upload_token(token, jwks, issuer=url, audience=audience)
        check_project(verified, PROJECT)
    except InvalidUploadToken as e:
        print(f"demo failed: the minted token does not verify: {e.description}", file=sys.stderr)
        return 1
    _step(6, f"verified the minted token with gateway.verify against /.well-known/jwks.json (kid {kids}):", verified)

    try:
        check_project(verified, "requests")
    except InvalidUploadToken as e:
        _step(7, f"and it authorizes {PROJECT} only: uploading 'requests' would be refused ({e.description})")
    else:
        print("demo failed: the token authorizes a project it should not", file=sys.stderr)
        return 1
    print("demo ok")
    return 0
