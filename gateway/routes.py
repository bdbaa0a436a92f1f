"""HTTP endpoints, and the one place where errors become responses."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import GatewayError, InvalidPayload, PayloadTooLarge
from .exchange import Exchange
from .jose import StrictJSONError, strict_loads
from .metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger(__name__)


def error_response(error: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if hasattr(error, "retry_after") else None
    body = {"message": "Token request failed", "errors": [{"code": error.code, "description": error.description}]}
    return JSONResponse(body, status_code=error.status, headers=headers)


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


def token_from(body: bytes) -> str:
    try:
        payload = strict_loads(body)
    except StrictJSONError as e:
        raise InvalidPayload(f'body must be JSON {{"token": "<ID token>"}} ({e})') from None
    if not isinstance(payload, dict) or set(payload) != {"token"} or not isinstance(payload["token"], str):
        raise InvalidPayload('body must be exactly {"token": "<ID token>"}')
    return payload["token"]


class Endpoints:
    def __init__(self, exchange: Exchange, metrics: Metrics) -> None:
        self.exchange = exchange
        self.metrics = metrics
        self.settings = exchange.settings
        self.shutting_down = False
        url = self.settings.url
        self._discovery = {
            "issuer": url,
            "jwks_uri": f"{url}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [exchange.signer.algorithm],
            "claims_supported": ["iss", "aud", "sub", "projects", "iat", "nbf", "exp", "jti", "identity"],
        }

    def routes(self) -> list[Route]:
        return [
            Route("/_/oidc/audience", self.audience, methods=["GET"]),
            Route("/_/oidc/mint-token", self.mint_token, methods=["POST"]),
            Route("/.well-known/openid-configuration", self.discovery, methods=["GET"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]

    async def audience(self, request: Request) -> Response:
        return JSONResponse({"audience": self.settings.audience})

    async def mint_token(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            token = token_from(await read_body(request, self.settings.max_body))
            exchanged = await self.exchange.exchange(token)
        except GatewayError as e:
            # Failures before an issuer is known (bad body, untrusted issuer) are counted under "-".
            self.metrics.mints.labels(e.issuer or "-", e.code).inc()
            self.metrics.latency.observe(time.perf_counter() - started)
            log.info("mint refused: %s: %s", e.code, e.description)
            return error_response(e)
        issuer = exchanged.verified.issuer.name
        self.metrics.mints.labels(issuer, "success").inc()
        self.metrics.latency.observe(time.perf_counter() - started)
        body: dict[str, Any] = {
            "success": True,
            "token": exchanged.minted.token,
            "expires": exchanged.minted.expires,
            "projects": list(exchanged.match.projects),
        }
        return JSONResponse(body)

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(self._discovery, headers={"Cache-Control": "public, max-age=300"})

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.exchange.signer.jwks, headers={"Cache-Control": "public, max-age=300"})

    async def livez(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = []
        if self.shutting_down:
            problems.append("shutting down")
        if not await self.exchange.store.ready():
            problems.append("shared store unreachable")
        if problems:
            return JSONResponse({"status": "unready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)
