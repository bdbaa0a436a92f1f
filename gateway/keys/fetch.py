"""Fetching an issuer's keys: OIDC discovery and the JWKS, each document checked and capped.

Used by the key cache (cache.py), by the replica-shared tier to check a set another replica published (shared.py),
and by `gateway probe-issuer`, so a candidate issuer is judged by exactly the code that will fetch its keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import Key, import_key
from joserfc.jws import JWSRegistry

from ..issuers import Issuer

__all__ = [
    "MAX_KEYS",
    "MIN_RSA_BITS",
    "FetchError",
    "Fetcher",
    "KeyPolicy",
    "KeySet",
    "fits",
    "parse_jwks",
    "rsa_bits",
    "same_origin",
    "trust_id",
]

MIN_RSA_BITS = 2048
# Issuers publish a handful of keys (current, next, previous); a set of thousands is an attack on our CPU.
MAX_KEYS = 100
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class FetchError(Exception):
    """An issuer's discovery or key set could not be had; the message is for operators and logs."""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: Mapping[str, Key]
    fetched_at: float
    jwks_uri: str
    dropped: tuple[str, ...] = ()
    # The accepted keys as public JWKs, for sharing the set with other replicas.
    jwks: tuple[Mapping[str, Any], ...] = ()
    # Where this process got the set: "upstream" (fetched it) or "redis" (another replica did).
    source: str = "upstream"


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """How long key sets are kept and how they are fetched: the [gateway] settings both cache tiers follow."""

    ttl: float = 300
    cooldown: float = 60
    max_age: float = 24 * 3600
    timeout: float = 5.0
    max_bytes: int = 256 * 1024


def trust_id(issuer: Issuer) -> str:
    """A fixed-size name for what a key set fetched for `issuer` depends on: its URL, CA content and algorithms.

    Two issuers with one id would fetch the same documents over the same trust and accept the same keys, so they may
    share a key set; the config name is no part of it, since two gateways (or two reloads) can give one name to
    different issuers.
    """
    ca = hashlib.sha256(issuer.ca_pem).hexdigest() if issuer.ca_pem is not None else "system"
    identity = "\n".join([issuer.url, ca, ",".join(issuer.algorithms)])
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


def fits(key: Key, algorithms: tuple[str, ...]) -> bool:
    """Whether one of the algorithms can verify with this key: type and curve (P-384 is no ES256 key)."""
    for name in algorithms:
        try:
            JWSRegistry.algorithms[name].check_key(key)
        except (JoseError, KeyError):
            continue
        return True
    return False


def parse_jwks(document: Any, algorithms: tuple[str, ...]) -> tuple[dict[str, Key], list[str]]:
    """Validate a JWKS document; returns the usable keys by kid and a reason for each key dropped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError("JWKS is not an object with a 'keys' list")
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        raise FetchError(f"JWKS lists {len(entries)} keys; more than {MAX_KEYS} is not a key set anyone rotates")
    kids = [raw.get("kid") if isinstance(raw, dict) else None for raw in entries]
    counts = Counter(kid for kid in kids if isinstance(kid, str))
    keys: dict[str, Key] = {}
    dropped: list[str] = []
    for number, (raw, kid) in enumerate(zip(entries, kids, strict=True), start=1):
        name = f"key {kid!r}" if isinstance(kid, str) else f"key #{number}"
        if isinstance(kid, str) and counts[kid] > 1:
            # Two entries under one kid make the choice of key ambiguous; trust none of them.
            dropped.append(f"{name}: duplicate kid")
            continue
        key, reason = _import(raw, kid, algorithms)
        if key is None or not isinstance(kid, str):
            dropped.append(f"{name}: {reason}")
            continue
        keys[kid] = key
    return keys, dropped


def _import(raw: Any, kid: Any, algorithms: tuple[str, ...]) -> tuple[Key | None, str]:
    reason = _key_problem(raw, kid, algorithms)
    if reason is not None:
        return None, reason
    try:
        key = import_key(raw)
    except (JoseError, ValueError, TypeError, KeyError) as e:
        return None, f"malformed ({e})"
    if not fits(key, algorithms):
        return None, f"{raw['kty']} key does not fit the algorithms {', '.join(algorithms)}"
    return key, ""


def _key_problem(raw: Any, kid: Any, algorithms: tuple[str, ...]) -> str | None:
    if not isinstance(raw, dict):
        return "not a JSON object"
    if raw.get("kty") == "oct":
        return "symmetric (oct) keys are never accepted"
    if PRIVATE_MEMBERS & raw.keys():
        return "carries private key members"
    if not isinstance(kid, str) or not kid:
        return "has no kid"
    if raw.get("use", "sig") != "sig":
        return f"use is {raw.get('use')!r}, not 'sig'"
    if "alg" in raw and raw["alg"] not in algorithms:
        return f"alg {raw['alg']!r} is not among {', '.join(algorithms)}"
    if raw.get("kty") == "RSA":
        bits = rsa_bits(raw.get("n"))
        if bits < MIN_RSA_BITS:
            return f"RSA key of {bits} bits is weaker than {MIN_RSA_BITS}"
    return None


def rsa_bits(n: Any) -> int:
    # Measured before import: a weak modulus never reaches the crypto library.
    if not isinstance(n, str):
        return 0
    try:
        return int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4)), "big").bit_length()
    except (binascii.Error, ValueError):
        return 0


def same_origin(a: str, b: str) -> bool:
    try:
        pa, pb = urlsplit(a), urlsplit(b)
        return (pa.scheme, pa.hostname, pa.port or 443) == (pb.scheme, pb.hostname, pb.port or 443)
    except ValueError:
        return False


class Fetcher:
    """Discovery and JWKS for one issuer: no redirects, capped bodies, one deadline for the whole fetch."""

    def __init__(
        self,
        issuer: Issuer,
        *,
        transport: httpx.AsyncBaseTransport | None,
        timeout: float,
        max_bytes: int,
    ) -> None:
        self.issuer = issuer
        self.timeout = timeout
        self.max_bytes = max_bytes
        # trust_env=False: proxies and CA files from the environment must not silently change whom we trust.
        self.client = httpx.AsyncClient(
            transport=transport,
            verify=_ssl_context(issuer),
            follow_redirects=False,
            timeout=timeout,
            trust_env=False,
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "identity",
                "User-Agent": "gateway (trusted publishing)",
            },
        )

    async def fetch(self, clock: Callable[[], float]) -> KeySet:
        try:
            async with asyncio.timeout(self.timeout):
                discovery_url = self.issuer.url.rstrip("/") + "/.well-known/openid-configuration"
                discovery = await self.get_json(discovery_url)
                jwks_uri = self.check_discovery(discovery)
                jwks = await self.get_json(jwks_uri)
        except TimeoutError:
            raise FetchError(f"fetching discovery and keys took longer than {self.timeout:g} s") from None
        keys, dropped = parse_jwks(jwks, self.issuer.algorithms)
        if not keys:
            raise FetchError(f"no usable keys at {jwks_uri} ({'; '.join(dropped) or 'the set is empty'})")
        return KeySet(
            keys=keys,
            fetched_at=clock(),
            jwks_uri=jwks_uri,
            dropped=tuple(dropped),
            jwks=tuple(key.as_dict(private=False) for key in keys.values()),
        )

    def check_discovery(self, discovery: Any) -> str:
        if not isinstance(discovery, dict):
            raise FetchError("discovery document is not a JSON object")
        if discovery.get("issuer") != self.issuer.url:
            raise FetchError(
                f"discovery issuer {discovery.get('issuer')!r} does not equal the configured {self.issuer.url!r}"
            )
        jwks_uri = discovery.get("jwks_uri")
        try:
            https = isinstance(jwks_uri, str) and len(jwks_uri) <= 2048 and urlsplit(jwks_uri).scheme == "https"
        except ValueError:  # a malformed URL (bad IPv6 literal, ...) is as untrusted as a wrong one
            https = False
        if not https:
            raise FetchError(f"discovery jwks_uri {str(jwks_uri)[:200]!r} is not an https URL")
        assert isinstance(jwks_uri, str)
        if not same_origin(jwks_uri, self.issuer.url):
            raise FetchError(f"discovery jwks_uri {jwks_uri!r} is not on the issuer's origin")
        return jwks_uri

    async def get_json(self, url: str) -> Any:
        try:
            async with self.client.stream("GET", url) as response:
                if response.is_redirect:
                    raise FetchError(f"{url} redirects ({response.status_code}); redirects are not followed")
                if response.status_code != 200:
                    raise FetchError(f"{url} answered HTTP {response.status_code}")
                if response.headers.get("content-encoding", "identity").lower() != "identity":
                    # We asked for none: a compressed body could inflate far past the byte cap between checks.
                    raise FetchError(f"{url} answered with a Content-Encoding; only identity is accepted")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchError(f"{url} is larger than {self.max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FetchError(f"{url} is larger than {self.max_bytes} bytes")
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise FetchError(f"{url}: {type(e).__name__}: {e}") from None
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise FetchError(f"{url} is not valid JSON") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def _ssl_context(issuer: Issuer) -> ssl.SSLContext:
    context = ssl.create_default_context()
    # Added to, not instead of, the system CAs. The content the config read (and trust_id hashed) when there is
    # one, so the trust in use is exactly the trust named; the file only for a bare Issuer (probe-issuer).
    if issuer.ca_pem is not None:
        context.load_verify_locations(cadata=issuer.ca_pem.decode("ascii"))
    elif issuer.ca_bundle is not None:
        context.load_verify_locations(cafile=str(issuer.ca_bundle))
    return context
