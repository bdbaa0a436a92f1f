"""Verify an upload token that this gateway minted, for an index that checks tokens itself.

An index can take the gateway's tokens natively instead of sitting behind the `/legacy/` upload proxy: it fetches
the gateway's public keys from `<gateway url>/.well-known/jwks.json` (cache them for the `Cache-Control` max-age,
and fetch again when a token names a `kid` the cached set lacks: the gateway publishes its previous key next to the
current one during a rotation), verifies the token given as the `__token__` password, and uploads only to the
projects the token names::

    import httpx
    from gateway.verify import InvalidUploadToken, check_project, verify_upload_token

    GATEWAY = "https://gateway.example.org"   # [gateway] url: the `iss` of every minted token
    AUDIENCE = "pypi"                         # [gateway] audience: the `aud` of every minted token
    jwks = httpx.get(f"{GATEWAY}/.well-known/jwks.json", follow_redirects=False).raise_for_status().json()

    def authorize(password: str, project: str) -> dict:
        try:
            claims = verify_upload_token(password, jwks, issuer=GATEWAY, audience=AUDIENCE, leeway=30)
            check_project(claims, project)
        except InvalidUploadToken as e:
            raise Forbidden(e.description)    # your index's 403; the description says what is wrong
        return claims                         # claims["sub"], claims["identity"]: who published, for the audit log

`verify_upload_token` accepts only what the gateway mints: a compact JWS whose header names a `kid` found in the
key set, signed with that key's own algorithm (ES256 with a P-256 key, or Ed25519 under RFC 9864's name with an
Ed25519 key; `none`, HMAC and every other algorithm are refused, whatever the header asks for); `iss` equal to the
gateway url, `aud` equal to the audience (one string, not a list); `exp`, `iat` and `jti` present and `nbf` when
present, each checked with `leeway` seconds of clock skew; and a `projects` list of strings. Tokens are parsed
strictly: duplicate JSON members, non-UTF-8 JSON and headers that carry or point at keys (`jwk`, `jku`, `x5u`,
`x5c`) or change processing (`crit`, `b64`) are refused. A minted token may be used for several uploads until it
expires (as a PyPI API token can), so there is no jti to spend here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key

from .errors import GatewayError
from .jose import Verifier, check_header, peek
from .publishers import normalize_project

__all__ = ["ALGORITHMS", "InvalidUploadToken", "check_project", "verify_upload_token"]

# The algorithm each kind of key the gateway can hold signs with; a key's `alg` must say the same.
ALGORITHMS: Mapping[tuple[str, str], str] = {("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "Ed25519"}


class InvalidUploadToken(Exception):
    """The token must not authorize an upload; `description` says why, without echoing the token."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def verify_upload_token(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    leeway: int = 30,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify a gateway-minted upload token against the gateway's JWKS and return its claims.

    `jwks` is the JSON document served at `<issuer>/.well-known/jwks.json`; `issuer` and `audience` are the
    gateway's `[gateway] url` and `audience`; `now` (seconds since the epoch) replaces the system clock, for
    tests. Raises `InvalidUploadToken` for every token that must be refused.
    """
    try:
        unverified = peek(token)
        check_header(unverified)
    except GatewayError as e:
        raise InvalidUploadToken(e.description) from None
    key, algorithm = _key_for(jwks, unverified.kid)
    if unverified.alg != algorithm:
        # Decided by the key, never by the token: a header cannot talk a key into another algorithm.
        raise InvalidUploadToken(
            f"token algorithm {unverified.alg!r} does not match key {unverified.kid!r}, which signs {algorithm}"
        )
    verifier = Verifier(
        issuer_url=issuer,
        audience=audience,
        algorithms=(algorithm,),
        leeway=leeway,
        clock=time.time if now is None else (lambda: now),
    )
    try:
        claims = dict(verifier.verify(unverified, key))
    except GatewayError as e:
        raise InvalidUploadToken(e.description) from None
    projects = claims.get("projects")
    if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
        raise InvalidUploadToken("token has no 'projects' list of strings, so it authorizes no upload")
    return claims


def check_project(claims: Mapping[str, Any], project: str) -> None:
    """Refuse an upload of `project` unless a verified token's `projects` name it (compared PEP 503-normalized)."""
    allowed = [str(p) for p in claims.get("projects", ())]
    if normalize_project(project) not in {normalize_project(p) for p in allowed}:
        raise InvalidUploadToken(
            f"this upload token may not upload to project {project!r}; it allows: {', '.join(allowed) or 'none'}"
        )


def _key_for(jwks: Mapping[str, Any], kid: str) -> tuple[Key, str]:
    """The public key named `kid` in the key set, and the one algorithm it signs with."""
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise InvalidUploadToken("the gateway's key set has no 'keys' list")
    matches = [entry for entry in entries if isinstance(entry, Mapping) and entry.get("kid") == kid]
    if not matches:
        raise InvalidUploadToken(f"token key {kid!r} is not one of the gateway's signing keys")
    if len(matches) > 1:
        raise InvalidUploadToken(f"the gateway's key set lists key {kid!r} more than once")
    entry = matches[0]
    algorithm = ALGORITHMS.get((str(entry.get("kty")), str(entry.get("crv"))))
    if algorithm is None or entry.get("alg", algorithm) != algorithm or "d" in entry:
        # Symmetric (`oct`), RSA, other curves, private or mislabelled keys: none is a key this gateway signs with.
        raise InvalidUploadToken(f"key {kid!r} is not a public ES256 (P-256) or Ed25519 signing key")
    try:
        key = JWKRegistry.import_key(dict(entry))
    except (JoseError, ValueError, TypeError):
        raise InvalidUploadToken(f"key {kid!r} in the gateway's key set is malformed") from None
    return key, algorithm
