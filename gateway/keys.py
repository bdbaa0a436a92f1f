"""Issuer keys: OIDC discovery and JWKS fetching, validation, and a per-issuer cache.

The cache follows two rules. Fail closed on tokens, degrade gracefully on keys: the last good key set keeps
serving (up to `keys_max_age`) while the issuer is unreachable, and an empty or invalid set is never cached.
And an attacker must not be able to turn token requests into upstream traffic: an unknown `kid` causes at most
one refresh per issuer per cooldown, concurrent requests share one fetch, and a stale but usable key set is
refreshed in the background instead of in a request's path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import Key, import_key
from joserfc.jws import JWSRegistry

from .config import Issuer
from .errors import InvalidToken, IssuerUnavailable

if TYPE_CHECKING:
    from .shared import SharedKeys

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048
# Issuers publish a handful of keys (current, next, previous); a set of thousands is an attack on our CPU.
MAX_KEYS = 100
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# After a failed fetch, wait this long before the next one that a TTL expiry would cause, so a down issuer is
# not asked again on every request. Unknown-kid refreshes have their own, longer cooldown.
FAILURE_BACKOFF = 5.0

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
    if issuer.ca_bundle is not None:
        # Added to, not instead of, the system CAs.
        context.load_verify_locations(cafile=str(issuer.ca_bundle))
    return context


@dataclass(slots=True)
class _State:
    key_set: KeySet | None = None
    kid_refresh_at: float | None = None
    failed_at: float | None = None
    inflight: asyncio.Task[KeySet | None] | None = None
    last_error: str | None = None


class Keys:
    def __init__(
        self,
        issuers: Mapping[str, Issuer],
        *,
        clock: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
        ttl: float = 300,
        cooldown: float = 60,
        max_age: float = 24 * 3600,
        timeout: float = 5.0,
        max_bytes: int = 256 * 1024,
        shared: SharedKeys | None = None,
        on_fetch: Callable[[str, str], None] | None = None,
        on_lookup: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.shared = shared
        # Observers for metrics: (issuer, "ok"|"error") per upstream fetch; the cache level that had a key.
        self.on_fetch = on_fetch or (lambda issuer, outcome: None)
        self.on_lookup = on_lookup or (lambda level: None)
        self.ttl = ttl
        self.cooldown = cooldown
        self.max_age = max_age
        self._transport = transport
        self._fetchers: dict[str, Fetcher] = {}
        self._states: dict[str, _State] = {}
        self._algorithms: dict[str, tuple[str, ...]] = {}
        self._retired: list[Fetcher] = []
        self.reconfigure(issuers, timeout=timeout, max_bytes=max_bytes)

    def reconfigure(self, issuers: Mapping[str, Issuer], *, timeout: float, max_bytes: int) -> None:
        """Adopt a new set of issuers; an issuer whose fetching is unchanged keeps its cached keys."""
        fetchers: dict[str, Fetcher] = {}
        states: dict[str, _State] = {}
        for name, issuer in issuers.items():
            old = self._fetchers.get(name)
            if (
                old is not None
                and (old.issuer.url, old.issuer.ca_bundle, old.issuer.algorithms)
                == (issuer.url, issuer.ca_bundle, issuer.algorithms)
                and (old.timeout, old.max_bytes) == (timeout, max_bytes)
            ):
                fetchers[name], states[name] = old, self._states[name]
            else:
                fetchers[name] = Fetcher(issuer, transport=self._transport, timeout=timeout, max_bytes=max_bytes)
                states[name] = _State()
        # Clients of dropped fetchers may still serve a request in flight; they are closed with the app.
        self._retired += [f for name, f in self._fetchers.items() if fetchers.get(name) is not f]
        self._fetchers, self._states = fetchers, states
        self._algorithms = {name: issuer.algorithms for name, issuer in issuers.items()}

    def state(self, issuer: str) -> _State:
        return self._states[issuer]

    async def key(self, issuer: str, kid: str) -> Key:
        state = self._states.get(issuer)
        if state is None:
            # Only when a reload removed the issuer while this request was under way.
            raise self._unavailable(issuer)
        cached = state.key_set
        key_set = await self._usable(issuer, state)
        key = key_set.keys.get(kid)
        if key is not None:
            self.on_lookup("memory" if key_set is cached else key_set.source)
            return key
        now = self.clock()
        if state.inflight is not None:
            key_set = await self._wait(issuer, state, "kid")
        elif state.kid_refresh_at is None or now - state.kid_refresh_at >= self.cooldown:
            # Started here, counted whether or not the fetch succeeds: a flood of random kids gets one fetch.
            state.kid_refresh_at = now
            key_set = await self._wait(issuer, state, "kid")
        key = key_set.keys.get(kid)
        if key is None:
            raise InvalidToken(
                f"the issuer's key set has no key {kid!r}; if the issuer rotated keys just now, retry in "
                f"{int(self.cooldown)} s"
            )
        self.on_lookup("memory" if key_set is cached else key_set.source)
        return key

    async def _usable(self, issuer: str, state: _State) -> KeySet:
        key_set = state.key_set
        now = self.clock()
        if key_set is None or now - key_set.fetched_at >= self.max_age:
            if state.failed_at is not None and now - state.failed_at < FAILURE_BACKOFF and state.inflight is None:
                raise self._unavailable(issuer)
            return await self._wait(issuer, state, "load")
        backing_off = state.failed_at is not None and now - state.failed_at < FAILURE_BACKOFF
        if now - key_set.fetched_at >= self.ttl and state.inflight is None and not backing_off:
            self._start(issuer, state, "ttl")
        return key_set

    def _start(self, issuer: str, state: _State, reason: str) -> asyncio.Task[KeySet | None]:
        if state.inflight is None:
            task = asyncio.create_task(self._fetch(issuer, state, reason), name=f"keys:{issuer}")
            state.inflight = task
            task.add_done_callback(lambda _: setattr(state, "inflight", None))
        return state.inflight

    async def _wait(self, issuer: str, state: _State, reason: str) -> KeySet:
        # shield: a client that disconnects must not cancel the fetch other requests are waiting on.
        key_set = await asyncio.shield(self._start(issuer, state, reason))
        if key_set is None:
            raise self._unavailable(issuer)
        return key_set

    @staticmethod
    def _unavailable(issuer: str) -> IssuerUnavailable:
        return IssuerUnavailable(
            f"the keys of issuer {issuer!r} cannot be fetched right now and none are cached; retry shortly"
        )

    async def _upstream(self, issuer: str) -> KeySet:
        try:
            key_set = await self._fetchers[issuer].fetch(self.clock)
        except FetchError:
            self.on_fetch(issuer, "error")
            raise
        self.on_fetch(issuer, "ok")
        return key_set

    async def _fetch(self, issuer: str, state: _State, reason: str) -> KeySet | None:
        """Returns the best key set after a fetch: the new one, the last good one if still usable, or None.

        `reason` is what asked for it: "load" (nothing usable cached), "ttl" (a background refresh) or "kid"
        (an unknown key id); with shared state, only "kid" refreshes are subject to the shared cooldown.
        """
        try:
            if self.shared is None:
                key_set = await self._upstream(issuer)
            else:
                key_set = await self.shared.refresh(
                    issuer, self._algorithms[issuer], state.key_set, reason, lambda: self._upstream(issuer)
                )
        except FetchError as e:
            state.failed_at = self.clock()
            state.last_error = str(e)
            log.warning("keys of issuer %s could not be fetched: %s", issuer, e)
            previous = state.key_set
            if previous is not None and self.clock() - previous.fetched_at < self.max_age:
                return previous
            return None
        state.failed_at = None
        state.last_error = None
        if key_set is not state.key_set:
            for dropped in key_set.dropped:
                log.warning("keys of issuer %s: dropped %s", issuer, dropped)
        state.key_set = key_set
        return key_set

    async def settle(self) -> None:
        """Wait for fetches under way (for tests and shutdown)."""
        tasks = [s.inflight for s in self._states.values() if s.inflight is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for state in self._states.values():
            if state.inflight is not None:
                state.inflight.cancel()
        await self.settle()
        for fetcher in [*self._fetchers.values(), *self._retired]:
            await fetcher.aclose()
