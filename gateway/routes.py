"""HTTP endpoints, and the one place where errors become responses."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._json import dumps_utf8
from .config import Settings
from .errors import (
    GatewayError,
    InternalError,
    InvalidPayload,
    PayloadTooLarge,
    UploadError,
    UploadUnauthenticated,
)
from .exchange import Attempt, Exchange, missing_token
from .jose import StrictJSONError, strict_loads
from .logs import audit
from .metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger(__name__)

MINT_PATH = "/_/oidc/mint-token"


def error_body(error: GatewayError) -> dict[str, Any]:
    return {"message": "Token request failed", "errors": [{"code": error.code, "description": error.description}]}


def error_headers(error: GatewayError) -> dict[str, str]:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, UploadUnauthenticated):
        headers["WWW-Authenticate"] = 'Basic realm="gateway upload", charset="UTF-8"'
    return headers


async def upload_error(send: Send, error: UploadError) -> None:
    """An upload refusal as twine shows it (with --verbose): the description, one line of plain text."""
    body = (error.description + "\n").encode("utf-8")
    raw_headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error_headers(error).items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return JSONResponse(error_body(exc), status_code=exc.status, headers=error_headers(exc))


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, refused past `limit` bytes whether or not a Content-Length says so; None on disconnect."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def client_address(scope: Scope, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not one. An untrusted peer's X-Forwarded-For is ignored: anyone can send one."""
    peer = scope.get("client")
    address: str | None = _unmapped(peer[0]) if peer else None
    if not trusted or not _within(address, trusted):
        return address
    forwarded = b",".join(value for name, value in scope["headers"] if name == b"x-forwarded-for")
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        hop = hop.strip()
        if not hop:
            continue
        if not _within(hop, trusted):
            return _unmapped(hop) if _is_ip(hop) else address
        address = _unmapped(hop)
    return address


def _within(address: str | None, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address or "")
    except ValueError:
        return False
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; they are still in the IPv4 networks configured.
    mapped = getattr(ip, "ipv4_mapped", None)
    return any((mapped or ip) in network for network in networks)


def _unmapped(address: str) -> str:
    """::ffff:a.b.c.d as a.b.c.d, so one client has one address (and one rate-limit budget)."""
    if ":" not in address:
        # IPv4 (or not an address at all): nothing to unmap, and ip_address would cost 2 us per mint to say so.
        return address
    try:
        mapped = getattr(ip_address(address), "ipv4_mapped", None)
    except ValueError:
        return address
    return str(mapped) if mapped else address


def _is_ip(address: str) -> bool:
    try:
        ip_address(address)
    except ValueError:
        return False
    return True


def token_from(body: bytes, audience: str) -> str:
    # The body every client sends, {"token": "<ID token>"} (with spaces, as Python's json writes it, or without),
    # read without strict_loads' stdlib path, which calls back into Python per object and scans the token twice.
    # orjson is strict in every other way; what it does not refuse is a duplicate member (it keeps the last). Its
    # length rules that out: no JSON string is shorter than its UTF-8, so one member takes at least the token's
    # length + 12 bytes ({"token":"…"}), and a second `"token":` member at least 10 more ("token":1,). (Counting
    # the quotes instead walks every byte.)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if type(parsed) is dict and len(parsed) == 1:
        token = parsed.get("token")
        if type(token) is str and token.isascii() and len(body) < len(token) + 22:
            return token
    try:
        payload = strict_loads(body)
    except StrictJSONError as e:
        raise InvalidPayload(f'body must be JSON {{"token": "<ID token>"}} ({e})') from None
    token = payload.get("token") if isinstance(payload, dict) and len(payload) == 1 else False
    if isinstance(token, str):
        return token
    if token is None and "token" in payload:
        # What a script sends when it read a missing token with `jq .token` or from an unset variable.
        raise InvalidPayload(missing_token(audience))
    raise InvalidPayload('body must be exactly {"token": "<ID token>"}')


class Endpoints:
    def __init__(self, exchange: Exchange, metrics: Metrics) -> None:
        self.exchange = exchange
        self.metrics = metrics
        self.shutting_down = False
        # The /legacy/ upload proxy (gateway.upload), set by create_app; it answers 404 without [upstream].
        self.upload: ASGIApp | None = None

    @property
    def settings(self) -> Settings:
        # Read through the exchange on every request, so a reload takes effect everywhere at once.
        return self.exchange.settings

    def routes(self) -> list[Route]:
        return [
            Route("/_/oidc/audience", self.audience, methods=["GET"]),
            Route(MINT_PATH, _Asgi(self.mint_token), methods=["POST"]),
            Route("/.well-known/openid-configuration", self.discovery, methods=["GET"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            *([Route("/legacy/", _Asgi(self.legacy_upload), methods=["POST"])] if self.upload is not None else []),
        ]

    async def audience(self, request: Request) -> Response:
        return JSONResponse({"audience": self.settings.audience})

    async def mint_token(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A plain ASGI endpoint: this is the hot path, and starlette's Request and Response objects cost a
        # quarter of what the HTTP layer spends on it.
        started = time.perf_counter()
        settings = self.settings
        attempt = Attempt()
        headers: dict[str, str] = {}
        try:
            attempt.client = client_address(scope, settings.trusted_proxies)
            if self.exchange.limits is not None:
                await self.exchange.limits.hit_client(attempt.client or "-")
            body = await read_body(scope, receive, settings.max_body)
            if body is None:
                return
            exchanged = await self.exchange.exchange(token_from(body, settings.audience), attempt)
        except GatewayError as e:
            outcome = e.code
            log.info("mint refused: %s: %s", e.code, e.description)
            status, answer, headers = e.status, error_body(e), error_headers(e)
        except Exception:
            # A bug, never the input's fault: the operator gets the traceback, the client the contract's shape,
            # and the attempt is audited and counted like any other. No token is handed out.
            log.exception("mint failed on an unexpected error (a bug); answered 500 internal-error")
            error = InternalError(
                "the gateway failed on this request because of an error of its own, not of the token; "
                "retry later, and tell the gateway's operator if it persists"
            )
            outcome, status, answer = error.code, error.status, error_body(error)
        else:
            outcome, status = "success", 200
            answer = {
                "success": True,
                "token": exchanged.minted.token,
                "expires": exchanged.minted.expires,
                "projects": list(exchanged.match.projects),
            }
        # Failures before an issuer is known (bad body, untrusted issuer) are counted under "-".
        self.metrics.mint(attempt.issuer or "-", outcome, time.perf_counter() - started)
        # A description, a token, an integer expiry and project names: no float.
        content = dumps_utf8(answer, floats=False)
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if headers:  # a refusal's Retry-After; a success has none, and skips the generator's frame
            raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        try:
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            # Once the answer is handed over (the audit line is formatted where it is logged), and whether or not
            # the client was still there to take it.
            audit(attempt, outcome)

    async def legacy_upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.upload is not None
        try:
            await self.upload(scope, receive, send)
        except UploadError as e:
            await upload_error(send, e)

    async def discovery(self, request: Request) -> Response:
        url = self.settings.url
        document = {
            "issuer": url,
            "jwks_uri": f"{url}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.exchange.signer.algorithm],
            "claims_supported": ["iss", "aud", "sub", "projects", "iat", "nbf", "exp", "jti", "identity"],
        }
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=300"})

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


class _Asgi:
    """Wraps a bound method so starlette's Route treats it as an ASGI app rather than a request handler."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
