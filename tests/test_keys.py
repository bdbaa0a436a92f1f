"""Issuer keys (CONTRACT section 5 rules 2-4): discovery, JWKS validation, and the per-issuer cache.

Everything runs against the real HTTPS TestIssuer. Most tests drive the app over HTTP; `parse_jwks` and `Fetcher`
are used directly where a table of key documents or one refusal reads more clearly. Cache time is the injected
FakeClock; only the fetch deadline and the isolation and background-refresh tests measure wall time, with generous
bounds, because there a real socket is slow on purpose. The refusal reason an operator sees is the keys module's
log line, so upstream-failure tests read it from `caplog` to prove the refusal happened for the named reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, OKPKey, RSAKey

from gateway.config import Issuer
from gateway.keys.cache import FAILURE_BACKOFF
from gateway.keys.fetch import Fetcher, FetchError, KeySet, parse_jwks
from gateway.testing import DELETE, FakeClock, TestIssuer, oct_jwk, weak_rsa_jwk
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer

ISSUER = "gitlab-com"
KiB = 1024
TTL = 300  # the config defaults, which the `gateway` fixture keeps
COOLDOWN = 60

MakeGateway = Callable[..., Any]


@pytest.fixture
def other(other_issuer: TestIssuer) -> Iterator[TestIssuer]:
    """The second issuer with knobs and counters reset around each test (the conftest fixture is session-wide)."""
    other_issuer.reset()
    yield other_issuer
    other_issuer.reset()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """The keys module's log so far: where a refused fetch says why."""
    caplog.set_level(logging.WARNING, logger="gateway.keys")

    def text() -> str:
        return "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("gateway.keys"))

    return text


def mint_token(issuer: TestIssuer, clock: FakeClock, *, kid: str | None = None) -> str:
    """A fresh GitLab token (its own jti) issued at the FakeClock's now, so it stays valid after clock.advance."""
    return issuer.sign(issuer.gitlab_claims(now=int(clock())), kid=kid)


def assert_ok(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True


def assert_unavailable(response: httpx.Response, issuer: str = ISSUER) -> None:
    assert response.status_code == 503, response.text
    assert error_code(response) == "issuer-unavailable"
    assert issuer in description(response)
    assert "retry" in description(response)


def assert_invalid_token(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-token"
    assert fragment in description(response)


def cached(gateway: Gateway, issuer: str = ISSUER) -> KeySet | None:
    return gateway.exchange.keys.state(issuer).key_set


def counts(issuer: TestIssuer) -> tuple[int, int]:
    return issuer.discovery_count, issuer.jwks_count


async def until(condition: Callable[[], bool]) -> None:
    """Wait for an outside event (a request reaching the issuer's thread); not a stand-in for the clock."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the issuer did not see the expected request within 5 s")


async def warm(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """One successful mint, so the key set is cached; then the issuer's counters start from zero."""
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    issuer.reset_counts()


# --- Key documents ------------------------------------------------------------------------------------------------


@functools.cache
def spare_rsa() -> RSAKey:
    """A 2048-bit RSA key of no issuer, generated once: the raw material for good and bad JWKs."""
    return RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)


def public(kid: object, **members: object) -> dict[str, Any]:
    """The spare key's public JWK under `kid`, with `kid` and `members` set or (DELETE) removed."""
    out: dict[str, Any] = dict(spare_rsa().as_dict(private=False))
    for name, value in ({"kid": kid} | members).items():
        if value is DELETE:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def ec_jwk(kid: str, curve: str = "P-256", **members: object) -> dict[str, Any]:
    return dict(ECKey.generate_key(curve, parameters={"kid": kid, "use": "sig"}).as_dict(private=False)) | members


# Each entry: a JWK the gateway must drop for an issuer allowing RS256 only, and a fragment of the logged reason.
BAD_KEYS: list[tuple[str, Callable[[], object], str]] = [
    ("weak-rsa-1024", lambda: weak_rsa_jwk(1024, kid="weak"), "1024 bits is weaker than 2048"),
    ("weak-rsa-2047", lambda: weak_rsa_jwk(2047, kid="weak-2047"), "2047 bits is weaker than 2048"),
    ("oct", lambda: oct_jwk(kid="oct"), "symmetric (oct)"),
    ("oct-without-secret", lambda: {"kty": "oct", "kid": "oct-bare", "alg": "HS256"}, "symmetric (oct)"),
    ("private-rsa", lambda: dict(spare_rsa().as_dict(private=True)) | {"kid": "private"}, "private key members"),
    ("private-member-d-only", lambda: public("d-only", d="AQAB"), "private key members"),
    ("use-enc", lambda: public("enc", use="enc"), "use is 'enc'"),
    ("alg-not-allowed", lambda: public("rs512", alg="RS512"), "alg 'RS512' is not among RS256"),
    ("alg-hmac", lambda: public("hs256", alg="HS256"), "alg 'HS256' is not among RS256"),
    ("alg-none", lambda: public("none", alg="none"), "alg 'none' is not among RS256"),
    ("no-kid", lambda: public(DELETE), "has no kid"),
    ("empty-kid", lambda: public(""), "has no kid"),
    ("kid-not-a-string", lambda: public(7), "has no kid"),
    ("not-an-object", lambda: "RSA", "not a JSON object"),
    ("null", lambda: None, "not a JSON object"),
    ("missing-exponent", lambda: public("no-e", e=DELETE), "malformed"),
    ("exponent-not-a-string", lambda: public("e-int", e=65537), "malformed"),
    ("modulus-not-base64", lambda: public("bad-n", n="!!!!"), "weaker than 2048"),
    ("missing-kty", lambda: public("no-kty", kty=DELETE), "malformed"),
    ("unknown-kty", lambda: public("xyz", kty="XYZ"), "malformed"),
    ("ec-key-for-rs256", lambda: ec_jwk("ec"), "does not fit the algorithms RS256"),
]


def bad_keys() -> list[object]:
    return [make() for _, make, _ in BAD_KEYS]


@pytest.mark.parametrize(("make", "reason"), [pytest.param(m, r, id=i) for i, m, r in BAD_KEYS])
def test_parse_jwks_drops_bad_key(make: Callable[[], object], reason: str) -> None:
    """Each unacceptable JWK is dropped from the set with a reason that names its defect."""
    keys, dropped = parse_jwks({"keys": [make()]}, ("RS256",))
    assert keys == {}
    assert len(dropped) == 1
    assert reason in dropped[0]


def test_parse_jwks_keeps_the_good_key_among_junk() -> None:
    """A good RSA key survives next to one of every bad kind, and each bad one is reported."""
    keys, dropped = parse_jwks({"keys": [*bad_keys(), public("good")]}, ("RS256",))
    assert list(keys) == ["good"]
    assert isinstance(keys["good"], RSAKey)
    assert len(dropped) == len(BAD_KEYS)


@pytest.mark.parametrize(
    ("document", "kept"),
    [
        pytest.param(lambda: [public("a"), public("a")], [], id="same-key-twice"),
        pytest.param(lambda: [public("a"), ec_jwk("a", alg="ES256")], [], id="two-keys-one-kid"),
        pytest.param(lambda: [public("a"), public("a"), public("a")], [], id="three-times"),
        pytest.param(lambda: [public("a"), public("b"), public("a")], ["b"], id="other-kid-kept"),
    ],
)
def test_parse_jwks_drops_every_key_of_a_duplicated_kid(document: Callable[[], list[object]], kept: list[str]) -> None:
    """Two keys under one kid make the choice ambiguous, so all keys with that kid are dropped."""
    keys, dropped = parse_jwks({"keys": document()}, ("RS256", "ES256"))
    assert sorted(keys) == kept
    assert any("duplicate kid" in reason for reason in dropped)


@pytest.mark.parametrize(
    "document",
    [
        pytest.param([], id="list"),
        pytest.param({}, id="no-keys"),
        pytest.param({"keys": None}, id="keys-null"),
        pytest.param({"keys": {"kid": "a"}}, id="keys-object"),
        pytest.param("keys", id="string"),
    ],
)
def test_parse_jwks_refuses_a_document_without_a_keys_list(document: object) -> None:
    """A JWKS that is not an object with a `keys` list is refused as a whole."""
    with pytest.raises(FetchError, match="'keys' list"):
        parse_jwks(document, ("RS256",))


@pytest.mark.parametrize(
    ("jwk", "algorithms"),
    [
        pytest.param(lambda: ec_jwk("k", alg="ES256"), ("RS256", "ES256"), id="es256"),
        pytest.param(lambda: ec_jwk("k", "P-384"), ("ES384",), id="es384-no-alg"),
        pytest.param(
            lambda: dict(OKPKey.generate_key("Ed25519", parameters={"kid": "k"}).as_dict(private=False)),
            ("Ed25519",),
            id="ed25519",
        ),
        pytest.param(lambda: public("k", alg="PS256"), ("PS256",), id="rsa-pss"),
    ],
)
def test_parse_jwks_accepts_keys_for_the_issuers_listed_algorithms(
    jwk: Callable[[], dict[str, Any]], algorithms: tuple[str, ...]
) -> None:
    """An asymmetric key that fits an algorithm the issuer lists is kept."""
    keys, dropped = parse_jwks({"keys": [jwk()]}, algorithms)
    assert list(keys) == ["k"]
    assert dropped == []


@pytest.mark.parametrize(
    ("jwk", "algorithms"),
    [
        pytest.param(lambda: ec_jwk("k"), ("RS256",), id="ec-for-rs256"),
        pytest.param(lambda: public("k", alg=DELETE), ("ES256",), id="rsa-for-es256"),
        # The fit check compares curves too: ES256 needs P-256 (RFC 7518 section 3.4), and X25519 is a
        # key-agreement key that no signature algorithm can use.
        pytest.param(lambda: ec_jwk("k", "P-384"), ("ES256",), id="p384-for-es256"),
        pytest.param(
            lambda: dict(OKPKey.generate_key("X25519", parameters={"kid": "k"}).as_dict(private=False)),
            ("Ed25519",),
            id="x25519-for-ed25519",
        ),
    ],
)
def test_parse_jwks_drops_keys_unfit_for_the_issuers_algorithms(
    jwk: Callable[[], dict[str, Any]], algorithms: tuple[str, ...]
) -> None:
    """A key that cannot verify any algorithm the issuer lists is dropped rather than cached."""
    keys, dropped = parse_jwks({"keys": [jwk()]}, algorithms)
    assert keys == {}
    assert len(dropped) == 1


# --- Discovery (rule 2) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claimed",
    [
        pytest.param(lambda i, o: i.url + "/", id="trailing-slash"),
        pytest.param(lambda i, o: i.url.replace("https://", "HTTPS://"), id="scheme-case"),
        pytest.param(lambda i, o: i.url.replace("127.0.0.1", "localhost"), id="other-host-name"),
        pytest.param(lambda i, o: o.url, id="another-issuer"),
        pytest.param(lambda i, o: DELETE, id="missing"),
        pytest.param(lambda i, o: [i.url], id="list"),
    ],
)
async def test_discovery_issuer_must_equal_the_configured_url(
    gateway: Gateway,
    issuer: TestIssuer,
    other: TestIssuer,
    clock: FakeClock,
    logs: Callable[[], str],
    claimed: Callable[[TestIssuer, TestIssuer], object],
) -> None:
    """A discovery document whose `issuer` is not exactly the configured url gives 503 and caches nothing."""
    issuer.discovery_overrides = {"issuer": claimed(issuer, other)}
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert "does not equal the configured" in logs()
    assert issuer.jwks_count == 0
    assert cached(gateway) is None


@pytest.mark.parametrize(
    ("jwks_uri", "reason"),
    [
        # localhost is in the issuer's certificate and on the same server: only the origin check can stop it.
        pytest.param(lambda i, o: f"https://localhost:{i.port}{i.jwks_path}", "not on the issuer's origin", id="host"),
        pytest.param(lambda i, o: f"https://{o.host}{o.jwks_path}", "not on the issuer's origin", id="port"),
        pytest.param(lambda i, o: f"http://{i.host}{i.jwks_path}", "not an https URL", id="http-scheme"),
        pytest.param(lambda i, o: i.jwks_path, "not an https URL", id="relative"),
        pytest.param(lambda i, o: f"//{i.host}{i.jwks_path}", "not an https URL", id="scheme-relative"),
        pytest.param(lambda i, o: f"https://{i.host} {i.jwks_path}", "not on the issuer's origin", id="bad-port"),
        pytest.param(lambda i, o: DELETE, "not an https URL", id="missing"),
        pytest.param(lambda i, o: 443, "not an https URL", id="not-a-string"),
    ],
)
async def test_jwks_uri_off_the_issuers_origin_is_refused(
    gateway: Gateway,
    issuer: TestIssuer,
    other: TestIssuer,
    clock: FakeClock,
    logs: Callable[[], str],
    jwks_uri: Callable[[TestIssuer, TestIssuer], object],
    reason: str,
) -> None:
    """A `jwks_uri` on another host, port or scheme is refused before any request is sent to it."""
    # The other origin serves this issuer's genuine keys, so fetching from it would have succeeded.
    other.jwks_override = issuer.jwks()
    issuer.discovery_overrides = {"jwks_uri": jwks_uri(issuer, other)}
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert reason in logs()
    assert issuer.jwks_count == 0
    assert other.requests == []
    assert cached(gateway) is None


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("document", ["discovery", "jwks"])
async def test_redirects_are_not_followed(
    gateway: Gateway,
    issuer: TestIssuer,
    other: TestIssuer,
    clock: FakeClock,
    logs: Callable[[], str],
    document: str,
    status: int,
) -> None:
    """A redirect on discovery or JWKS is refused, and its target never hears from the gateway."""
    # The target serves this issuer's genuine documents, so following the redirect would have succeeded.
    other.discovery_override = issuer.discovery()
    other.jwks_override = issuer.jwks()
    path = other.discovery_path if document == "discovery" else other.jwks_path
    issuer.redirect_to = f"https://{other.host}{path}"
    issuer.status = status
    issuer.paths_misbehave = {document}
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert f"redirects ({status})" in logs()
    assert other.requests == []
    assert cached(gateway) is None


@pytest.mark.parametrize(
    ("gateway_table", "document", "size", "refused"),
    [
        pytest.param({}, "discovery", 256 * KiB + 1, True, id="discovery-over-default-cap"),
        pytest.param({}, "jwks", 256 * KiB + 1, True, id="jwks-over-default-cap"),
        pytest.param({}, "jwks", 256 * KiB, False, id="jwks-at-default-cap"),
        pytest.param({"fetch_max_bytes": 2 * KiB}, "discovery", 2 * KiB + 1, True, id="discovery-over-configured-cap"),
        pytest.param({"fetch_max_bytes": 2 * KiB}, "jwks", 2 * KiB + 1, True, id="jwks-over-configured-cap"),
        pytest.param({"fetch_max_bytes": 2 * KiB}, "discovery", 2 * KiB, False, id="discovery-at-configured-cap"),
    ],
)
async def test_oversized_documents_are_refused(
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    clock: FakeClock,
    logs: Callable[[], str],
    gateway_table: dict[str, Any],
    document: str,
    size: int,
    refused: bool,
) -> None:
    """A discovery or JWKS body larger than the cap (default 256 KiB, or `fetch_max_bytes`) is refused."""
    gateway = await make_gateway({ISSUER: gitlab_issuer(issuer)}, **gateway_table)
    # Padding with trailing whitespace keeps the document valid JSON: only its size can be wrong.
    issuer.oversize = size
    issuer.paths_misbehave = {document}
    response = await gateway.mint(mint_token(issuer, clock))
    if refused:
        assert_unavailable(response)
        cap = gateway_table.get("fetch_max_bytes", 256 * KiB)
        assert f"is larger than {cap} bytes" in logs()
        assert cached(gateway) is None
    else:
        assert_ok(response)


async def test_body_without_content_length_is_cut_off_at_the_cap() -> None:
    """A chunked body with no declared length is refused once the cap is passed, without reading it all."""
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(1024):
            produced += 1
            yield b" " * KiB

    # A mock transport: the TestIssuer always declares Content-Length, and this is the undeclared case.
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": "https://issuer.test", "jwks_uri": "https://issuer.test/keys"})
        return httpx.Response(200, content=endless())

    fetcher = Fetcher(
        Issuer(name="direct", url="https://issuer.test", kind="gitlab"),
        transport=httpx.MockTransport(handler),
        timeout=5.0,
        max_bytes=4 * KiB,
    )
    try:
        with pytest.raises(FetchError, match="larger than 4096 bytes"):
            await fetcher.fetch(time.time)
    finally:
        await fetcher.aclose()
    assert produced < 16


@pytest.mark.parametrize("document", ["discovery", "jwks"])
async def test_trickling_upstream_is_cut_off_by_the_overall_deadline(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock, logs: Callable[[], str], document: str
) -> None:
    """An issuer that sends a byte at a time, each within the read timeout, is cut off by `fetch_timeout`."""
    gateway = await make_gateway({ISSUER: gitlab_issuer(issuer)}, fetch_timeout=0.5)
    # 10 ms a byte: no single read ever waits long, but the whole document would take several seconds.
    issuer.trickle = 0.01
    issuer.paths_misbehave = {document}
    started = time.monotonic()
    response = await gateway.mint(mint_token(issuer, clock))
    elapsed = time.monotonic() - started
    assert_unavailable(response)
    assert "took longer than 0.5 s" in logs()
    assert elapsed < 2.0


@pytest.mark.parametrize(
    ("knobs", "reason"),
    [
        pytest.param({"status": 500, "paths_misbehave": {"discovery"}}, "answered HTTP 500", id="discovery-500"),
        pytest.param({"status": 500, "paths_misbehave": {"jwks"}}, "answered HTTP 500", id="jwks-500"),
        pytest.param({"status": 404, "paths_misbehave": {"discovery"}}, "answered HTTP 404", id="discovery-404"),
        pytest.param({"status": 204, "paths_misbehave": {"jwks"}}, "answered HTTP 204", id="jwks-204"),
        pytest.param({"discovery_override": b"<html>sign in</html>"}, "is not valid JSON", id="discovery-html"),
        pytest.param({"discovery_override": ["issuer"]}, "not a JSON object", id="discovery-not-object"),
        pytest.param({"jwks_override": b'{"keys": ['}, "is not valid JSON", id="jwks-truncated"),
        pytest.param({"jwks_override": b"\xc3\x28"}, "is not valid JSON", id="jwks-not-utf8"),
        pytest.param({"jwks_override": b"[" * 100_000}, "is not valid JSON", id="jwks-nested-too-deep"),
        pytest.param({"jwks_override": ["keys"]}, "'keys' list", id="jwks-not-object"),
        pytest.param({"jwks_override": {"keys": {}}}, "'keys' list", id="jwks-keys-not-a-list"),
        pytest.param({"jwks_override": {"keys": []}}, "the set is empty", id="jwks-empty"),
    ],
)
async def test_upstream_failure_without_cached_keys_is_503(
    gateway: Gateway,
    issuer: TestIssuer,
    clock: FakeClock,
    logs: Callable[[], str],
    knobs: dict[str, object],
    reason: str,
) -> None:
    """An error status or an unusable document from the issuer, with nothing cached, gives 503 issuer-unavailable."""
    for name, value in knobs.items():
        setattr(issuer, name, value)
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert reason in logs()
    assert cached(gateway) is None


# --- JWKS validation end to end (rule 3) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "jwks",
    [
        pytest.param(lambda: {"keys": []}, id="empty"),
        pytest.param(lambda: {"keys": bad_keys()}, id="only-bad-keys"),
    ],
)
async def test_set_without_usable_key_is_refused_and_never_cached(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock, jwks: Callable[[], object]
) -> None:
    """A JWKS with no usable key gives 503 and is not cached, so the fixed set is fetched on a later request."""
    issuer.jwks_override = jwks()
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert cached(gateway) is None
    # Were the useless set cached, this request would be answered from it (422, no such key) instead of 503.
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert cached(gateway) is None
    issuer.jwks_override = None
    clock.advance(FAILURE_BACKOFF + 1)
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    assert issuer.jwks_count == 2


async def test_good_key_serves_next_to_junk(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """The issuer's good key verifies tokens while every bad key published beside it is dropped."""
    issuer.extra_jwks = bad_keys()  # type: ignore[assignment]
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    key_set = cached(gateway)
    assert key_set is not None
    assert list(key_set.keys) == [issuer.signing_kid]
    assert len(key_set.dropped) == len(BAD_KEYS)


def _weak(issuer: TestIssuer) -> str:
    return issuer.add_key(size=1024)


def _published_as(issuer: TestIssuer, shape: Callable[[dict[str, Any], dict[str, Any]], list[object]]) -> str:
    """A real key of the issuer's, unpublished, whose JWK is published as `shape(public, private)` instead."""
    kid = issuer.add_key(publish=False)
    key = issuer.private_key(kid)
    issuer.extra_jwks = shape(dict(key.as_dict(private=False)), dict(key.as_dict(private=True)))  # type: ignore[assignment]
    return kid


@pytest.mark.parametrize(
    "publish",
    [
        pytest.param(_weak, id="weak-rsa-1024"),
        pytest.param(lambda i: _published_as(i, lambda pub, priv: [pub | {"use": "enc"}]), id="use-enc"),
        pytest.param(lambda i: _published_as(i, lambda pub, priv: [pub | {"alg": "RS512"}]), id="alg-not-allowed"),
        pytest.param(lambda i: _published_as(i, lambda pub, priv: [priv]), id="private-members"),
        pytest.param(lambda i: _published_as(i, lambda pub, priv: [pub, pub]), id="duplicate-kid"),
        pytest.param(
            lambda i: _published_as(i, lambda pub, priv: [pub, public(pub["kid"])]), id="duplicate-kid-other-key"
        ),
    ],
)
async def test_token_signed_by_a_dropped_key_is_refused(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock, publish: Callable[[TestIssuer], str]
) -> None:
    """A correctly signed token whose published key is unacceptable is refused as invalid-token; good keys work."""
    kid = publish(issuer)
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    assert_invalid_token(await gateway.mint(mint_token(issuer, clock, kid=kid)), repr(kid))


# --- Single flight ------------------------------------------------------------------------------------------------


async def test_concurrent_mints_on_a_cold_cache_share_one_fetch(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """100 concurrent mints on a cold cache cause exactly one discovery and one JWKS fetch, and all succeed."""
    # A slow discovery keeps the fetch in flight while every request arrives.
    issuer.delay = 0.2
    issuer.paths_misbehave = {"discovery"}
    tokens = [mint_token(issuer, clock) for _ in range(100)]
    responses = await asyncio.gather(*(gateway.mint(token) for token in tokens))
    assert [r.status_code for r in responses] == [200] * 100
    assert counts(issuer) == (1, 1)


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """Cancelling one of two requests waiting on a fetch leaves the other to succeed from that same fetch."""
    issuer.delay = 0.3
    issuer.paths_misbehave = {"discovery"}
    first = asyncio.create_task(gateway.mint(mint_token(issuer, clock)))
    second = asyncio.create_task(gateway.mint(mint_token(issuer, clock)))
    await until(lambda: issuer.discovery_count == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert_ok(await second)
    assert counts(issuer) == (1, 1)


async def test_fetch_outlives_its_only_waiter_and_is_cached(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A client that disconnects while its fetch runs does not waste it: the result is cached for the next one."""
    issuer.delay = 0.3
    issuer.paths_misbehave = {"discovery"}
    waiter = asyncio.create_task(gateway.mint(mint_token(issuer, clock)))
    await until(lambda: issuer.discovery_count == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await gateway.exchange.keys.settle()
    assert cached(gateway) is not None
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    assert counts(issuer) == (1, 1)


async def test_slow_issuer_does_not_delay_another_issuer(
    make_gateway: MakeGateway, issuer: TestIssuer, other: TestIssuer, clock: FakeClock
) -> None:
    """While one issuer's fetch hangs, a cold mint for another issuer completes at its own pace."""
    gateway = await make_gateway(
        {ISSUER: gitlab_issuer(issuer), "self-hosted": gitlab_issuer(other)},
        (PUBLISHER, PUBLISHER | {"issuer": "self-hosted"}),
    )
    other.delay = 3
    slow = asyncio.create_task(gateway.mint(mint_token(other, clock)))
    try:
        await until(lambda: other.discovery_count == 1)
        started = time.monotonic()
        response = await gateway.mint(mint_token(issuer, clock))
        elapsed = time.monotonic() - started
        assert_ok(response)
        assert elapsed < 1.5
        assert not slow.done()
    finally:
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow


# --- Unknown kid and its cooldown (rule 4) ------------------------------------------------------------------------


async def test_unknown_kid_refreshes_at_most_once_per_cooldown(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """An unknown kid causes one refresh; another within the cooldown causes none; after it, one more."""
    await warm(gateway, issuer, clock)
    assert_invalid_token(await gateway.mint(mint_token(issuer, clock, kid=issuer.add_key(publish=False))), "no key")
    assert counts(issuer) == (1, 1)

    clock.advance(COOLDOWN - 1)
    response = await gateway.mint(mint_token(issuer, clock, kid=issuer.add_key(publish=False)))
    assert_invalid_token(response, f"retry in {COOLDOWN} s")
    assert counts(issuer) == (1, 1)

    clock.advance(2)
    assert_invalid_token(await gateway.mint(mint_token(issuer, clock, kid=issuer.add_key(publish=False))), "no key")
    assert counts(issuer) == (2, 2)


async def test_flood_of_random_kids_causes_one_refresh(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """Twenty concurrent tokens with distinct made-up kids share one refresh and are all refused."""
    await warm(gateway, issuer, clock)
    issuer.delay = 0.2
    issuer.paths_misbehave = {"discovery"}
    # Signed by the real key but naming kids that exist nowhere, as an attacker probing for refreshes would.
    tokens = [issuer.sign(issuer.gitlab_claims(now=int(clock())), header={"kid": f"made-up-{n}"}) for n in range(20)]
    responses = await asyncio.gather(*(gateway.mint(token) for token in tokens))
    assert {(r.status_code, error_code(r)) for r in responses} == {(422, "invalid-token")}
    assert counts(issuer) == (1, 1)


async def test_failed_kid_refresh_still_starts_the_cooldown(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A kid refresh that fails upstream counts toward the cooldown, so no second fetch follows within it."""
    await warm(gateway, issuer, clock)
    issuer.status = 500
    new_kid = issuer.rotate()
    # The last good set still answers, so this is an unknown key rather than an unavailable issuer.
    assert_invalid_token(await gateway.mint(mint_token(issuer, clock, kid=new_kid)), "no key")
    assert counts(issuer) == (1, 0)

    issuer.status = None
    assert_invalid_token(await gateway.mint(mint_token(issuer, clock, kid=new_kid)), f"retry in {COOLDOWN} s")
    assert counts(issuer) == (1, 0)

    clock.advance(COOLDOWN + 1)
    assert_ok(await gateway.mint(mint_token(issuer, clock, kid=new_kid)))
    assert counts(issuer) == (2, 1)


async def test_key_rotated_in_right_after_start_up_is_picked_up(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """The first fetch does not start the kid cooldown: a key rotated in just after it works on its first token."""
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    new_kid = issuer.rotate()
    assert_ok(await gateway.mint(mint_token(issuer, clock, kid=new_kid)))
    assert counts(issuer) == (2, 2)


async def test_ttl_refresh_does_not_start_the_kid_cooldown(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A background refresh on TTL expiry leaves the kid cooldown unstarted, so a key rotated in after it works."""
    await warm(gateway, issuer, clock)
    clock.advance(TTL + 1)
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    await gateway.exchange.keys.settle()
    assert counts(issuer) == (1, 1)

    new_kid = issuer.rotate()
    assert_ok(await gateway.mint(mint_token(issuer, clock, kid=new_kid)))
    assert counts(issuer) == (2, 2)


# --- TTL and maximum age (rule 4) ---------------------------------------------------------------------------------


async def test_ttl_expiry_serves_from_cache_and_refreshes_in_the_background(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """After keys_ttl, requests are answered from the cached set at once while one background refresh runs."""
    await warm(gateway, issuer, clock)
    old_kid = issuer.signing_kid
    new_kid = issuer.rotate()
    # A slow issuer: a request that waited for the refresh would take at least this long.
    issuer.delay = 1.5
    issuer.paths_misbehave = {"discovery"}
    clock.advance(TTL + 1)

    started = time.monotonic()
    first = await gateway.mint(mint_token(issuer, clock, kid=old_kid))
    second = await gateway.mint(mint_token(issuer, clock, kid=old_kid))
    elapsed = time.monotonic() - started
    assert_ok(first)
    assert_ok(second)
    assert elapsed < 0.75

    await gateway.exchange.keys.settle()
    assert counts(issuer) == (1, 1)
    # The refreshed set replaced the cached one: the rotated-in key needs no further fetch.
    assert_ok(await gateway.mint(mint_token(issuer, clock, kid=new_kid)))
    assert counts(issuer) == (1, 1)


@pytest.mark.parametrize("max_age", [pytest.param(None, id="default-24h"), pytest.param(3600, id="configured-1h")])
async def test_last_good_keys_serve_through_upstream_failure_until_max_age(
    make_gateway: MakeGateway, issuer: TestIssuer, clock: FakeClock, max_age: int | None
) -> None:
    """While the issuer fails, the last good set keeps serving up to keys_max_age; after that the answer is 503."""
    gateway = await make_gateway({ISSUER: gitlab_issuer(issuer)}, keys_max_age=max_age)
    limit = max_age or 24 * 3600
    fetched = clock()
    await warm(gateway, issuer, clock)
    issuer.status = 500

    clock.advance(TTL + 1)
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    await gateway.exchange.keys.settle()
    assert issuer.discovery_count == 1  # the background refresh was tried, and failed

    clock.now = fetched + limit - 2
    assert_ok(await gateway.mint(mint_token(issuer, clock)))
    await gateway.exchange.keys.settle()

    clock.now = fetched + limit + 1
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    # Past the failure backoff a new fetch is tried; its failure must not bring the too-old set back.
    issuer.reset_counts()
    clock.advance(FAILURE_BACKOFF + 1)
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert issuer.discovery_count == 1

    # And once the issuer is back, the gateway recovers on its own.
    issuer.status = None
    clock.advance(FAILURE_BACKOFF + 1)
    assert_ok(await gateway.mint(mint_token(issuer, clock)))


# --- Hostile documents (security review) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "jwks_uri",
    [
        pytest.param(lambda i: "https://[::1/keys", id="unclosed-ipv6"),
        pytest.param(lambda i: f"{i.url}/keys\x01", id="control-character"),
        pytest.param(lambda i: f"{i.url}/" + "a" * 2049, id="over-2048-chars"),
        pytest.param(lambda i: f"{i.url}/" + "a" * 70_000, id="over-httpx-url-limit"),
    ],
)
async def test_malformed_jwks_uri_is_issuer_unavailable_with_backoff(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock, jwks_uri: Callable[[TestIssuer], str]
) -> None:
    """A malformed `jwks_uri` is a failed fetch (503, nothing requested from it), retried only after the backoff."""
    issuer.discovery_overrides = {"jwks_uri": jwks_uri(issuer)}
    for _ in range(3):
        assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert counts(issuer) == (1, 0)
    assert issuer.requests == [issuer.discovery_path]
    assert cached(gateway) is None
    clock.advance(FAILURE_BACKOFF + 1)
    assert_unavailable(await gateway.mint(mint_token(issuer, clock)))
    assert counts(issuer) == (2, 0)


def test_parse_jwks_refuses_more_than_100_entries() -> None:
    """A JWKS of more than 100 entries is refused as a whole, however good its keys; 100 are parsed."""
    keys, _ = parse_jwks({"keys": [public(f"k{n}") for n in range(100)]}, ("RS256",))
    assert len(keys) == 100
    with pytest.raises(FetchError, match="more than 100"):
        parse_jwks({"keys": [public(f"k{n}") for n in range(101)]}, ("RS256",))


@pytest.mark.parametrize("document", ["discovery", "jwks"])
async def test_compressed_answer_is_refused(document: str) -> None:
    """A discovery or JWKS answer with `Content-Encoding: gzip` is a failed fetch: it could inflate past the cap."""
    seen: list[str | None] = []

    # A mock transport: the TestIssuer never compresses, and this is an answer it cannot send.
    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding"))
        discovery = request.url.path == "/.well-known/openid-configuration"
        body = (
            {"issuer": "https://issuer.test", "jwks_uri": "https://issuer.test/keys"}
            if discovery
            else {"keys": [public("k")]}
        )
        compressed = document == ("discovery" if discovery else "jwks")
        if compressed:
            return httpx.Response(
                200, content=gzip.compress(json.dumps(body).encode()), headers={"Content-Encoding": "gzip"}
            )
        return httpx.Response(200, json=body)

    fetcher = Fetcher(
        Issuer(name="direct", url="https://issuer.test", kind="gitlab"),
        transport=httpx.MockTransport(handler),
        timeout=5.0,
        max_bytes=256 * KiB,
    )
    try:
        with pytest.raises(FetchError, match="Content-Encoding"):
            await fetcher.fetch(time.time)
    finally:
        await fetcher.aclose()
    assert seen and all(value == "identity" for value in seen)
