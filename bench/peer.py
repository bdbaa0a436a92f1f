"""The peer: the minimal token exchange the gateway is measured against (issue 12's baseline).

    python -m bench.peer --issuer URL --ca-bundle PEM --audience pypi --port N [--redis-url redis://...]

Written the way a small service would be, with the libraries the gateway started from: Starlette under uvicorn
(uvloop, httptools, no access log: the gateway's own settings), joserfc for both signatures. It does only this,
per request: parse the JSON body; verify the RS256 signature on the issuer's key set, fetched once at startup
and cached; check `exp` and `aud`; spend the `jti` in an in-process set (or, with --redis-url, with one
`SET NX`); mint an ES256 token. No issuer routing, no claim rules, no publishers, no rate limits, no metrics,
no audit line: everything the gateway does beyond this is what the gateway/peer ratio prices.
"""

from __future__ import annotations

import argparse
import json
import secrets
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import redis.asyncio as aioredis
import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from joserfc.jwt import JWTClaimsRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["Peer", "fetch_keys", "main"]

TTL = 900
LEEWAY = 60


def fetch_keys(issuer: str, ca_bundle: str) -> KeySet:
    """The issuer's key set, through its discovery document, once: the peer never refreshes it."""
    context = ssl.create_default_context(cafile=ca_bundle)
    with httpx.Client(verify=context, timeout=10) as client:
        discovery = client.get(f"{issuer}/.well-known/openid-configuration").raise_for_status().json()
        return KeySet.import_key_set(client.get(discovery["jwks_uri"]).raise_for_status().json())


class Peer:
    def __init__(self, keys: KeySet, *, audience: str, url: str, redis: aioredis.Redis | None = None) -> None:
        self.keys = keys
        self.url = url
        self.redis = redis
        self.spent: set[str] = set()
        self.claims = JWTClaimsRegistry(
            leeway=LEEWAY, aud={"essential": True, "value": audience}, exp={"essential": True}
        )
        self.signing = ECKey.generate_key("P-256", auto_kid=True)
        self.header = {"alg": "ES256", "kid": self.signing.kid, "typ": "JWT"}

    def app(self) -> Starlette:
        routes = [Route("/_/oidc/mint-token", self.mint, methods=["POST"]), Route("/livez", self.livez)]
        return Starlette(routes=routes)

    async def livez(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def mint(self, request: Request) -> Response:
        try:
            token = json.loads(await request.body())["token"]
            verified = jwt.decode(token, self.keys, algorithms=["RS256"])
            self.claims.validate(verified.claims)
            jti = verified.claims["jti"]
        except (ValueError, KeyError, TypeError, JoseError) as e:
            return _refused("invalid-token", str(e))
        if not isinstance(jti, str) or not await self.spend(jti, int(verified.claims["exp"])):
            return _refused("invalid-reuse-token", "the token was used already")
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": "pypi",
            "sub": verified.claims.get("sub"),
            "iat": now,
            "exp": now + TTL,
            "jti": secrets.token_urlsafe(16),
        }
        minted = jwt.encode(self.header, claims, self.signing, algorithms=["ES256"])
        return JSONResponse({"success": True, "token": minted, "expires": now + TTL})

    async def spend(self, jti: str, exp: int) -> bool:
        if self.redis is not None:
            return bool(await self.redis.set(f"peer:jti:{jti}", b"1", nx=True, exat=exp + LEEWAY))
        if jti in self.spent:
            return False
        self.spent.add(jti)
        return True


def _refused(code: str, description: str) -> Response:
    body: dict[str, Any] = {"message": "Token request failed", "errors": [{"code": code, "description": description}]}
    return JSONResponse(body, status_code=422)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--issuer", required=True, help="the issuer's URL (its discovery document names the JWKS)")
    parser.add_argument("--ca-bundle", required=True, help="PEM file the issuer's certificate is checked against")
    parser.add_argument("--audience", default="pypi")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", help="spend jtis in this Redis (one SET NX) instead of in memory")
    args = parser.parse_args(argv)
    redis = None if args.redis_url is None else aioredis.Redis.from_url(args.redis_url)
    peer = Peer(
        fetch_keys(args.issuer, args.ca_bundle),
        audience=args.audience,
        url=f"http://127.0.0.1:{args.port}",
        redis=redis,
    )
    uvicorn.run(
        peer.app(),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
