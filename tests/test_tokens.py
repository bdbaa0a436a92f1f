"""Bad ID tokens posted to mint-token: each is refused with the contract's status and code, and says why.

Every token here is built for real: signed by the shared test issuer's key (or deliberately by another key or
none), so a case passes only because the gateway spotted the defect it names, not because the signature broke.
The codes follow CONTRACT section 4: a token that cannot be decoded (not a compact JWS, not strict UTF-8 JSON,
no trusted `iss`) is `invalid-payload`; header, algorithm, key, signature and claim failures are `invalid-token`.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from gateway.errors import InvalidPayload
from gateway.jose import _b64decode
from gateway.testing import DELETE, FakeClock, TestIssuer
from tests.conftest import Gateway, description, error_code

LEEWAY = 30  # the config default, which the `gateway` fixture keeps


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def claims(issuer: TestIssuer, now: int, **overrides: object) -> dict[str, Any]:
    """GitLab claims issued at `now`, then with `overrides` set (any JSON value) or removed (DELETE)."""
    out = issuer.gitlab_claims(now=now)
    for name, value in overrides.items():
        if value is DELETE:
            out.pop(name)
        else:
            out[name] = value
    return out


def header(issuer: TestIssuer, **members: object) -> dict[str, object]:
    return {"alg": "RS256", "kid": issuer.signing_kid, "typ": "JWT", **members}


def signed(issuer: TestIssuer, head: Mapping[str, object] | bytes, payload: Mapping[str, Any] | bytes) -> str:
    """Sign exactly these header and payload bytes with the issuer's real key (RS256)."""
    head_bytes = head if isinstance(head, bytes) else dumps(head)
    payload_bytes = payload if isinstance(payload, bytes) else dumps(payload)
    return issuer.sign_raw(head_bytes, payload_bytes)


def with_duplicate(payload: Mapping[str, Any], name: str, first: object) -> bytes:
    """`payload` as JSON with an extra, earlier `name` member: a last-wins parser sees only the genuine value."""
    return b"{" + dumps(name) + b":" + dumps(first) + b"," + dumps(payload)[1:]


def replace_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


def splice(token: str, index: int, text: str) -> str:
    """Overwrite one character of `token` with `text`."""
    return token[:index] + text + token[index:][1:]


def truncate(token: str) -> str:
    """Drop the last byte of the signature, keeping the segment valid base64url."""
    return replace_segment(token, 2, b64(b64decode(token.split(".")[2])[:-1]))


def flip_bit(token: str) -> str:
    signature = bytearray(b64decode(token.split(".")[2]))
    signature[len(signature) // 2] ^= 0x01
    return replace_segment(token, 2, b64(bytes(signature)))


def ec_signed(issuer: TestIssuer, now: int) -> str:
    # A genuine ES256 signature by a key of the attacker's, under the issuer's kid.
    key = ECKey.generate_key("P-256")
    return jws.serialize_compact(
        {"alg": "ES256", "kid": issuer.signing_kid, "typ": "JWT"}, dumps(claims(issuer, now)), key
    )


def rogue_signed(issuer: TestIssuer, now: int, *, embed: bool) -> str:
    """Signed by a key the issuer never published; the header names the published kid, or embeds the key."""
    rogue = issuer.add_key(publish=False)
    if embed:
        head = header(issuer, kid=rogue, jwk=dict(issuer.private_key(rogue).as_dict(private=False)))
    else:
        head = header(issuer)
    return issuer.sign_raw(dumps(head), dumps(claims(issuer, now)), kid=rogue)


def x5c_chain(issuer: TestIssuer) -> list[str]:
    pem = issuer.ca.cert_pem.bytes().decode()
    return ["".join(line for line in pem.splitlines() if not line.startswith("-----"))]


Make = Callable[[TestIssuer, int], str]


@dataclass(frozen=True, slots=True)
class Bad:
    make: Make
    code: str
    # A piece of the description that tells the client what to fix.
    fragment: str
    # Refused before the issuer's keys are needed: not one request reaches the issuer, even on a cold cache.
    no_io: bool = False


def case(id: str, make: Make, code: str, fragment: str, *, no_io: bool = False) -> Any:
    return pytest.param(Bad(make, code, fragment, no_io), id=id)


PAYLOAD, TOKEN = "invalid-payload", "invalid-token"

STRUCTURE = [
    case("two-segments", lambda i, n: i.gitlab_token().rsplit(".", 1)[0], PAYLOAD, "compact JWS", no_io=True),
    case("four-segments", lambda i, n: i.gitlab_token() + ".e30", PAYLOAD, "compact JWS", no_io=True),
    case(
        "empty-header-segment",
        lambda i, n: replace_segment(i.gitlab_token(), 0, ""),
        PAYLOAD,
        "compact JWS",
        no_io=True,
    ),
    case(
        "empty-payload-segment",
        lambda i, n: replace_segment(i.gitlab_token(), 1, ""),
        PAYLOAD,
        "compact JWS",
        no_io=True,
    ),
    # 256 signature bytes need 342 base64url characters, so standard base64 would pad them with "==".
    case("base64-padding", lambda i, n: i.gitlab_token() + "==", PAYLOAD, "compact JWS", no_io=True),
    case("base64-plus-char", lambda i, n: splice(i.gitlab_token(), -4, "+"), PAYLOAD, "compact JWS", no_io=True),
    case("base64-slash-char", lambda i, n: "/" + i.gitlab_token(), PAYLOAD, "compact JWS", no_io=True),
    case("space-inside", lambda i, n: i.gitlab_token().replace(".", ". ", 1), PAYLOAD, "compact JWS", no_io=True),
    # A letter outside ASCII (FULLWIDTH LATIN CAPITAL LETTER A), and a NUL: neither is base64url.
    case("non-ascii-letter", lambda i, n: splice(i.gitlab_token(), -4, "\uff21"), PAYLOAD, "compact JWS", no_io=True),
    case("nul-inside", lambda i, n: splice(i.gitlab_token(), 10, "\x00"), PAYLOAD, "compact JWS", no_io=True),
    # A byte outside the alphabet in the payload or the signature is found by the base64 decoder; it is still
    # said to be a malformed token, also when an earlier segment is broken in another way (its JSON here).
    case(
        "star-in-payload",
        lambda i, n: i.gitlab_token().replace(".", ".*", 1),
        PAYLOAD,
        "compact JWS",
        no_io=True,
    ),
    case(
        "tab-in-signature-after-bad-json",
        lambda i, n: replace_segment(i.gitlab_token(), 0, "ew") + "\tAA",
        PAYLOAD,
        "compact JWS",
        no_io=True,
    ),
    # A segment must be nothing but base64url, and a regex `$` also matches before one trailing newline. With a
    # 3072-bit key the signature needs no padding, so a lenient decoder would quietly drop the newline.
    case(
        "trailing-newline",
        lambda i, n: i.gitlab_token(kid=i.add_key(size=3072)) + "\n",
        PAYLOAD,
        "base64url",
        no_io=True,
    ),
    case("trailing-newline-2048", lambda i, n: i.gitlab_token() + "\n", PAYLOAD, "base64url", no_io=True),
    case(
        "signature-impossible-length",
        lambda i, n: replace_segment(i.gitlab_token(), 2, "A"),
        PAYLOAD,
        "signature",
        no_io=True,
    ),
    case("header-json-array", lambda i, n: signed(i, b'["RS256"]', claims(i, n)), PAYLOAD, "header", no_io=True),
    case("header-json-string", lambda i, n: signed(i, b'"RS256"', claims(i, n)), PAYLOAD, "header", no_io=True),
    case("header-not-json", lambda i, n: signed(i, b"alg=RS256", claims(i, n)), PAYLOAD, "header", no_io=True),
    case(
        "header-deeply-nested",
        lambda i, n: signed(i, b"[" * 5000 + b"]" * 5000, claims(i, n)),
        PAYLOAD,
        "header",
        no_io=True,
    ),
    case(
        "header-duplicate-kid",
        lambda i, n: signed(i, with_duplicate(header(i), "kid", "attacker-kid"), claims(i, n)),
        PAYLOAD,
        "duplicate",
        no_io=True,
    ),
    case(
        "header-duplicate-alg",
        lambda i, n: signed(i, with_duplicate(header(i), "alg", "none"), claims(i, n)),
        PAYLOAD,
        "duplicate",
        no_io=True,
    ),
    case(
        "payload-duplicate-iss",
        lambda i, n: signed(i, header(i), with_duplicate(claims(i, n), "iss", "https://attacker.example")),
        PAYLOAD,
        "duplicate",
        no_io=True,
    ),
    case(
        "payload-duplicate-aud",
        lambda i, n: signed(i, header(i), with_duplicate(claims(i, n), "aud", "another-index")),
        PAYLOAD,
        "duplicate",
        no_io=True,
    ),
    # json.loads(bytes) would auto-detect UTF-16; a JWS payload must be UTF-8.
    case(
        "payload-utf16",
        lambda i, n: signed(i, header(i), json.dumps(claims(i, n)).encode("utf-16")),
        PAYLOAD,
        "UTF-8",
        no_io=True,
    ),
    case(
        "payload-latin1",
        lambda i, n: signed(
            i, header(i), json.dumps(claims(i, n, user_login="j\u00f6rg"), ensure_ascii=False).encode("latin-1")
        ),
        PAYLOAD,
        "UTF-8",
        no_io=True,
    ),
    case(
        "payload-not-json",
        lambda i, n: signed(i, header(i), b"project_path=group/project"),
        PAYLOAD,
        "payload",
        no_io=True,
    ),
    case(
        "payload-json-array", lambda i, n: signed(i, header(i), dumps([claims(i, n)])), PAYLOAD, "payload", no_io=True
    ),
    # NaN and Infinity are not JSON at all (Python's json writes and reads them unless told not to).
    case(
        "exp-NaN",
        lambda i, n: signed(i, header(i), json.dumps(claims(i, n, exp=float("nan"))).encode()),
        PAYLOAD,
        "NaN",
        no_io=True,
    ),
    case(
        "exp-Infinity",
        lambda i, n: signed(i, header(i), json.dumps(claims(i, n, exp=float("inf"))).encode()),
        PAYLOAD,
        "Infinity",
        no_io=True,
    ),
    case(
        "iat-minus-Infinity",
        lambda i, n: signed(i, header(i), json.dumps(claims(i, n, iat=float("-inf"))).encode()),
        PAYLOAD,
        "Infinity",
        no_io=True,
    ),
    # Without `iss` there is no issuer to look up, so the token cannot be matched to the allow-list.
    case("missing-iss", lambda i, n: i.sign(claims(i, n, iss=DELETE)), PAYLOAD, "iss", no_io=True),
    case("iss-not-string", lambda i, n: i.sign(claims(i, n, iss=[i.url])), PAYLOAD, "iss", no_io=True),
    case("iss-empty", lambda i, n: i.sign(claims(i, n, iss="")), PAYLOAD, "iss", no_io=True),
    case("iss-trailing-slash", lambda i, n: i.sign(claims(i, n, iss=i.url + "/")), PAYLOAD, "not trusted", no_io=True),
    case(
        "iss-upper-case-scheme",
        lambda i, n: i.sign(claims(i, n, iss=i.url.replace("https", "HTTPS"))),
        PAYLOAD,
        "not trusted",
        no_io=True,
    ),
    # Same server, different spelling: the allow-list compares strings, never resolves them.
    case(
        "iss-other-spelling-of-host",
        lambda i, n: i.sign(claims(i, n, iss=i.url.replace("127.0.0.1", "localhost"))),
        PAYLOAD,
        "not trusted",
        no_io=True,
    ),
]

HEADER = [
    case("alg-none", lambda i, n: i.sign(claims(i, n), alg="none"), TOKEN, "'none'", no_io=True),
    case(
        "alg-None", lambda i, n: i.sign(claims(i, n), alg="none", header={"alg": "None"}), TOKEN, "'None'", no_io=True
    ),
    case(
        "alg-none-with-rs256-signature",
        lambda i, n: i.sign_raw(dumps(header(i, alg="none")), dumps(claims(i, n))),
        TOKEN,
        "'none'",
        no_io=True,
    ),
    # Classic key confusion: HMAC keyed with the RSA public key, which anyone can download.
    case(
        "hs256-keyed-with-public-pem",
        lambda i, n: i.sign(claims(i, n), alg="HS256", secret=i.public_pem()),
        TOKEN,
        "'HS256'",
        no_io=True,
    ),
    case("ps256-not-allowed", lambda i, n: i.sign(claims(i, n), alg="PS256"), TOKEN, "'PS256'", no_io=True),
    case("es256-not-allowed", ec_signed, TOKEN, "'ES256'", no_io=True),
    case("alg-not-string", lambda i, n: signed(i, header(i, alg=["RS256"]), claims(i, n)), TOKEN, "alg", no_io=True),
    case("alg-missing", lambda i, n: i.sign(claims(i, n), header={"alg": DELETE}), TOKEN, "alg", no_io=True),
    case("embedded-jwk", lambda i, n: rogue_signed(i, n, embed=True), TOKEN, "jwk", no_io=True),
    case(
        "jku", lambda i, n: i.sign(claims(i, n), header={"jku": "https://127.0.0.1:9/keys"}), TOKEN, "jku", no_io=True
    ),
    case(
        "x5u",
        lambda i, n: i.sign(claims(i, n), header={"x5u": "https://127.0.0.1:9/cert.pem"}),
        TOKEN,
        "x5u",
        no_io=True,
    ),
    case("x5c", lambda i, n: i.sign(claims(i, n), header={"x5c": x5c_chain(i)}), TOKEN, "x5c", no_io=True),
    case(
        "crit-list",
        lambda i, n: i.sign(claims(i, n), header={"crit": ["exp"], "exp": n + 60}),
        TOKEN,
        "crit",
        no_io=True,
    ),
    case("crit-not-list", lambda i, n: i.sign(claims(i, n), header={"crit": "exp"}), TOKEN, "crit", no_io=True),
    case("crit-empty-list", lambda i, n: i.sign(claims(i, n), header={"crit": []}), TOKEN, "crit", no_io=True),
    case(
        "b64-false", lambda i, n: i.sign(claims(i, n), header={"b64": False, "crit": ["b64"]}), TOKEN, "b64", no_io=True
    ),
    case("b64-false-alone", lambda i, n: i.sign(claims(i, n), header={"b64": False}), TOKEN, "b64", no_io=True),
    case("kid-missing", lambda i, n: i.sign(claims(i, n), header={"kid": DELETE}), TOKEN, "kid", no_io=True),
    case("kid-number", lambda i, n: i.sign(claims(i, n), header={"kid": 1}), TOKEN, "kid", no_io=True),
    case("kid-null", lambda i, n: signed(i, header(i, kid=None), claims(i, n)), TOKEN, "kid", no_io=True),
    case("kid-empty", lambda i, n: signed(i, header(i, kid=""), claims(i, n)), TOKEN, "kid", no_io=True),
    case("kid-control-chars", lambda i, n: i.sign(claims(i, n), header={"kid": "key\n1"}), TOKEN, "kid", no_io=True),
    case("kid-huge", lambda i, n: i.sign(claims(i, n), header={"kid": "k" * 5000}), TOKEN, "kid", no_io=True),
]

KEY_AND_SIGNATURE = [
    case("unknown-kid", lambda i, n: i.sign(claims(i, n), header={"kid": "no-such-key"}), TOKEN, "'no-such-key'"),
    case(
        "path-like-kid",
        lambda i, n: i.sign(claims(i, n), header={"kid": "../../etc/passwd"}),
        TOKEN,
        "'../../etc/passwd'",
    ),
    case("published-kid-but-other-key", lambda i, n: rogue_signed(i, n, embed=False), TOKEN, "signature"),
    case("rs256-empty-signature", lambda i, n: replace_segment(i.sign(claims(i, n)), 2, ""), TOKEN, "signature"),
    case("rs256-signature-bit-flipped", lambda i, n: flip_bit(i.sign(claims(i, n))), TOKEN, "signature"),
    case("rs256-signature-truncated", lambda i, n: truncate(i.sign(claims(i, n))), TOKEN, "signature"),
    case(
        "payload-swapped-after-signing",
        lambda i, n: replace_segment(i.sign(claims(i, n)), 1, b64(dumps(claims(i, n, project_path="group/other")))),
        TOKEN,
        "signature",
    ),
]

CLAIMS = [
    case("aud-wrong", lambda i, n: i.sign(claims(i, n, aud="testpypi")), TOKEN, "'testpypi'"),
    case("aud-case-differs", lambda i, n: i.sign(claims(i, n, aud="PyPI")), TOKEN, "'PyPI'"),
    case("aud-list-with-right-audience", lambda i, n: i.sign(claims(i, n, aud=["pypi"])), TOKEN, "aud"),
    case("aud-list-of-two", lambda i, n: i.sign(claims(i, n, aud=["pypi", "other"])), TOKEN, "aud"),
    case("aud-number", lambda i, n: i.sign(claims(i, n, aud=1)), TOKEN, "aud"),
    case("expired-beyond-leeway", lambda i, n: i.sign(claims(i, n - 600, exp=n - LEEWAY - 1)), TOKEN, "expired"),
    # exp is the first instant the token is no longer good (RFC 7519 4.1.4): exp + leeway itself is refused.
    case("expired-exactly-at-leeway", lambda i, n: i.sign(claims(i, n - 600, exp=n - LEEWAY)), TOKEN, "expired"),
    case("expired-long-ago", lambda i, n: i.sign(claims(i, n - 86400)), TOKEN, "expired"),
    case("nbf-beyond-leeway", lambda i, n: i.sign(claims(i, n, nbf=n + LEEWAY + 1)), TOKEN, "not valid before"),
    case("iat-beyond-leeway", lambda i, n: i.sign(claims(i, n, iat=n + LEEWAY + 1)), TOKEN, "future"),
    case("exp-string", lambda i, n: i.sign(claims(i, n, exp=str(n + 300))), TOKEN, "'exp'"),
    case("exp-bool", lambda i, n: i.sign(claims(i, n, exp=True)), TOKEN, "'exp'"),
    case("exp-list", lambda i, n: i.sign(claims(i, n, exp=[n + 300])), TOKEN, "'exp'"),
    # 1e400 is valid JSON that Python reads as float infinity: it must not make a token that never expires.
    case(
        "exp-overflows-to-infinity",
        lambda i, n: signed(i, header(i), dumps(claims(i, n, exp=0)).replace(b'"exp":0', b'"exp":1e400')),
        TOKEN,
        "'exp'",
    ),
    case("iat-string", lambda i, n: i.sign(claims(i, n, iat=str(n))), TOKEN, "'iat'"),
    case("nbf-string", lambda i, n: i.sign(claims(i, n, nbf=str(n))), TOKEN, "'nbf'"),
    case("missing-aud", lambda i, n: i.sign(claims(i, n, aud=DELETE)), TOKEN, "aud"),
    case("missing-exp", lambda i, n: i.sign(claims(i, n, exp=DELETE)), TOKEN, "exp"),
    case("missing-iat", lambda i, n: i.sign(claims(i, n, iat=DELETE)), TOKEN, "iat"),
    case("missing-jti", lambda i, n: i.sign(claims(i, n, jti=DELETE)), TOKEN, "jti"),
    case("null-exp", lambda i, n: i.sign(claims(i, n, exp=None)), TOKEN, "exp"),
    case("jti-empty", lambda i, n: i.sign(claims(i, n, jti="")), TOKEN, "jti"),
    case("jti-number", lambda i, n: i.sign(claims(i, n, jti=12345)), TOKEN, "jti"),
    case("sub-number", lambda i, n: i.sign(claims(i, n, sub=1)), TOKEN, "sub"),
    case("missing-project_path", lambda i, n: i.sign(claims(i, n, project_path=DELETE)), TOKEN, "project_path"),
    case("missing-namespace_id", lambda i, n: i.sign(claims(i, n, namespace_id=DELETE)), TOKEN, "namespace_id"),
    case("missing-pipeline_id", lambda i, n: i.sign(claims(i, n, pipeline_id=DELETE)), TOKEN, "pipeline_id"),
    case("missing-ref", lambda i, n: i.sign(claims(i, n, ref=DELETE)), TOKEN, "ref"),
    case(
        "missing-ci_config_ref_uri",
        lambda i, n: i.sign(claims(i, n, ci_config_ref_uri=DELETE)),
        TOKEN,
        "ci_config_ref_uri",
    ),
    case("project_path-number", lambda i, n: i.sign(claims(i, n, project_path=61254376)), TOKEN, "project_path"),
    case("namespace_id-number", lambda i, n: i.sign(claims(i, n, namespace_id=12885807)), TOKEN, "namespace_id"),
    case("project_id-number", lambda i, n: i.sign(claims(i, n, project_id=61254376)), TOKEN, "project_id"),
    case("ref_protected-bool", lambda i, n: i.sign(claims(i, n, ref_protected=True)), TOKEN, "ref_protected"),
    case(
        "ci_config_ref_uri-number", lambda i, n: i.sign(claims(i, n, ci_config_ref_uri=7)), TOKEN, "ci_config_ref_uri"
    ),
]


def assert_not_echoed(response: httpx.Response, token: str) -> None:
    """The response carries neither the token nor any of its segments (short ones could match by chance)."""
    assert token not in response.text
    for segment in token.split("."):
        if len(segment) >= 16:
            assert segment not in response.text


@pytest.mark.parametrize("bad", STRUCTURE + HEADER + KEY_AND_SIGNATURE + CLAIMS)
async def test_bad_token_is_refused_with_its_code(
    bad: Bad, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """Each bad token gets 422 with the contract's code and a description naming the defect, not the token."""
    token = bad.make(issuer, int(clock()))
    issuer.reset_counts()
    response = await gateway.mint(token)
    assert response.status_code == 422, response.text
    assert error_code(response) == bad.code, description(response)
    assert bad.fragment in description(response)
    assert_not_echoed(response, token)
    if bad.no_io:
        # The gateway was just built, so its key cache is cold: any key lookup would show up here.
        assert issuer.requests == []


ACCEPTED = [
    pytest.param(lambda i, n: i.sign(claims(i, n - 600, exp=n - LEEWAY + 1)), id="expired-within-leeway"),
    pytest.param(lambda i, n: i.sign(claims(i, n, nbf=n + LEEWAY)), id="nbf-within-leeway"),
    pytest.param(lambda i, n: i.sign(claims(i, n + LEEWAY)), id="iat-within-leeway"),
    pytest.param(lambda i, n: i.sign(claims(i, n, nbf=DELETE)), id="no-nbf"),
    pytest.param(lambda i, n: i.sign(claims(i, n, exp=n + 300.5, iat=n - 0.5)), id="fractional-times"),
    # Header members outside the banned set carry no key and change no processing rule.
    pytest.param(lambda i, n: i.sign(claims(i, n), header={"typ": DELETE}), id="no-typ"),
]


@pytest.mark.parametrize("make", ACCEPTED)
async def test_token_at_the_edge_is_accepted(
    make: Make, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """Times within the leeway, and optional members left out, still mint."""
    response = await gateway.mint(make(issuer, int(clock())))
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True


async def test_valid_token_expires_once_the_clock_passes_exp_and_leeway(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """The same kind of token mints before exp + leeway and is refused as expired after it, by the gateway's clock."""
    now = int(clock())
    first = issuer.sign(claims(issuer, now))
    assert (await gateway.mint(first)).status_code == 200
    later = issuer.sign(claims(issuer, now))  # exp = now + 300
    clock.advance(300 + LEEWAY + 1)
    response = await gateway.mint(later)
    assert response.status_code == 422
    assert error_code(response) == TOKEN
    assert "expired" in description(response)


async def test_untrusted_issuer_causes_no_network_io(
    gateway: Gateway, issuer: TestIssuer, other_issuer: TestIssuer
) -> None:
    """A genuine token from a real issuer that is not in the allow-list is refused without contacting anyone."""
    token = other_issuer.gitlab_token()
    before = len(other_issuer.requests)
    response = await gateway.mint(token)
    assert response.status_code == 422
    assert error_code(response) == PAYLOAD
    assert "not trusted" in description(response)
    assert_not_echoed(response, token)
    assert len(other_issuer.requests) == before
    assert issuer.requests == []


@pytest.mark.parametrize("member", ["jku", "x5u"])
async def test_key_url_header_is_never_fetched(
    member: str, gateway: Gateway, issuer: TestIssuer, other_issuer: TestIssuer, clock: FakeClock
) -> None:
    """A jku/x5u header pointing at a live key server is refused, and neither that server nor the issuer is asked."""
    # Warm the cache first, so that any request seen afterwards could only have been caused by the bad token.
    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    issuer.reset_counts()
    before = len(other_issuer.requests)
    # What an attacker would do: sign with their own key and point the header at their own live JWKS.
    url = f"{other_issuer.url}/oauth/discovery/keys"
    token = other_issuer.sign(claims(issuer, int(clock())), kid=other_issuer.signing_kid, header={member: url})
    response = await gateway.mint(token)
    assert response.status_code == 422
    assert error_code(response) == TOKEN
    assert member in description(response)
    assert len(other_issuer.requests) == before
    assert issuer.requests == []


async def test_exp_too_large_for_a_float_is_not_a_server_error(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A validly signed token whose integer exp overflows a float is answered by the contract, never with a 500."""
    now = int(clock())
    # 10**400 is a legal JSON number and a Python int; float(10**400) raises OverflowError.
    payload = dumps(claims(issuer, now, exp=0)).replace(b'"exp":0', b'"exp":1' + b"0" * 400)
    transport = httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://gateway.test") as client:
        response = await client.post("/_/oidc/mint-token", json={"token": signed(issuer, header(issuer), payload)})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert error_code(response) == TOKEN
        assert "exp" in description(response)


# --- what decides first: the issuer, then the header (Warehouse answers invalid-payload for both of these) -------

NO_ISSUER = [
    case(
        "no-iss-and-no-kid",
        lambda i, n: signed(i, {"alg": "RS256", "typ": "JWT"}, claims(i, n, iss=DELETE)),
        PAYLOAD,
        "'iss'",
        no_io=True,
    ),
    case(
        "empty-iss-and-no-kid",
        lambda i, n: signed(i, {"alg": "RS256", "typ": "JWT"}, claims(i, n, iss="")),
        PAYLOAD,
        "'iss'",
        no_io=True,
    ),
    case(
        "unknown-iss-and-no-kid",
        lambda i, n: signed(i, {"alg": "RS256", "typ": "JWT"}, claims(i, n, iss="https://gitlab.example")),
        PAYLOAD,
        "not trusted",
        no_io=True,
    ),
    case(
        "unknown-iss-and-no-alg",
        lambda i, n: signed(i, {"kid": i.signing_kid}, claims(i, n, iss="https://gitlab.example")),
        PAYLOAD,
        "not trusted",
        no_io=True,
    ),
    case(
        "unknown-iss-and-a-jku-header",
        lambda i, n: signed(i, header(i, jku="https://127.0.0.1:9/keys"), claims(i, n, iss="https://gitlab.example")),
        PAYLOAD,
        "not trusted",
        no_io=True,
    ),
    # The issuer is trusted, so the header rules decide.
    case(
        "trusted-iss-and-no-kid",
        lambda i, n: signed(i, {"alg": "RS256", "typ": "JWT"}, claims(i, n)),
        TOKEN,
        "kid",
        no_io=True,
    ),
]


@pytest.mark.parametrize("bad", NO_ISSUER)
async def test_the_issuer_is_judged_before_the_header(
    bad: Bad, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token with no or an untrusted `iss` is invalid-payload whatever its header lacks; a trusted one meets the
    header rules (invalid-token); neither reaches the issuer."""
    token = bad.make(issuer, int(clock()))
    issuer.reset_counts()
    response = await gateway.mint(token)
    assert response.status_code == 422, response.text
    assert error_code(response) == bad.code, description(response)
    assert bad.fragment in description(response)
    assert issuer.requests == []


# --- lone surrogates: JSON can escape them, but they are not text ---------------------------------------------------

SURROGATES = [
    pytest.param({"user_login": "alice\ud800"}, "'user_login'", id="high-surrogate-in-a-claim"),
    pytest.param({"user_login": "\udfff"}, "'user_login'", id="low-surrogate-alone"),
    pytest.param({"sub": "project_path:\ud83d"}, "'sub'", id="in-a-registered-claim"),
    pytest.param({"user_identities": [{"provider": "x\udc00"}]}, "'user_identities[0].provider'", id="nested"),
    pytest.param({"groups_direct": ["ok", "\ud800"]}, "'groups_direct[1]'", id="in-a-list"),
    pytest.param({"\ud800": "value"}, "'\\ud800'", id="in-a-claim-name"),
]


@pytest.mark.parametrize(("extra", "where"), SURROGATES)
async def test_a_lone_surrogate_in_any_claim_is_invalid_token(
    extra: dict[str, Any], where: str, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A claim string (or name) holding an unpaired surrogate escape, however deep, is refused invalid-token with
    the claim's path, and the same token without it mints."""
    good = claims(issuer, int(clock()))
    # json.dumps escapes surrogates as \ud800, which is how they arrive in a real token.
    response = await gateway.mint(signed(issuer, header(issuer), dumps(good | extra)))
    assert response.status_code == 422, response.text
    assert error_code(response) == TOKEN
    assert f"claim {where} holds an unpaired UTF-16 surrogate" in description(response)
    assert (await gateway.mint(signed(issuer, header(issuer), dumps(good)))).status_code == 200


async def test_a_surrogate_pair_is_text_and_mints(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """A properly paired surrogate escape (an emoji written as \\ud83d\\ude00) is ordinary text and mints."""
    payload = dumps(claims(issuer, int(clock()), user_login="smile-\U0001f600"))
    assert b"\\ud83d\\ude00" in payload
    response = await gateway.mint(signed(issuer, header(issuer), payload))
    assert response.status_code == 200, response.text


# --- times in descriptions ---------------------------------------------------------------------------------------

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        pytest.param(
            lambda i, n: i.sign(claims(i, n - 600, exp=n - LEEWAY - 1)),
            rf"token expired at {ISO} \(now {ISO}, leeway 30 s\)",
            id="exp",
        ),
        pytest.param(
            lambda i, n: i.sign(claims(i, n, nbf=n + LEEWAY + 1)),
            rf"token is not valid before {ISO} \(now {ISO}, leeway 30 s\)",
            id="nbf",
        ),
        pytest.param(
            lambda i, n: i.sign(claims(i, n, iat=n + LEEWAY + 1)),
            rf"token was issued in the future at {ISO} \(now {ISO}, leeway 30 s\)",
            id="iat",
        ),
    ],
)
async def test_times_in_descriptions_are_iso_8601_utc(
    make: Make, pattern: str, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """exp, nbf and iat refusals give the token's time and the gateway's as ISO 8601 UTC, not epoch seconds."""
    response = await gateway.mint(make(issuer, int(clock())))
    assert error_code(response) == TOKEN
    assert re.search(pattern, description(response)), description(response)


async def test_an_expiry_names_the_exact_instants(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """The expired description's two instants are the token's exp and the gateway clock's now, to the second."""
    now = int(clock())
    exp = now - LEEWAY - 61
    response = await gateway.mint(issuer.sign(claims(issuer, now - 600, exp=exp)))
    expected = (
        f"token expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(exp))} "
        f"(now {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(clock()))}, leeway 30 s)"
    )
    assert description(response).startswith(expected)


def test_segments_decode_exactly_as_the_stdlib_decodes_them() -> None:
    """peek decodes base64url with pybase64; for every length (one past a multiple of 4 included, which is no
    base64) and non-zero trailing bits, it gives the stdlib's bytes, or refuses where the stdlib raises."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = random.Random(12)  # noqa: S311 -- test inputs, seeded so a failure repeats
    for length in range(1, 70):
        for _ in range(40):
            segment = "".join(rng.choice(alphabet) for _ in range(length))
            try:
                expected: bytes | None = base64.urlsafe_b64decode(segment + "=" * (-length % 4))
            except binascii.Error:
                expected = None
            if expected is None:
                with pytest.raises(InvalidPayload):
                    _b64decode(segment.encode(), "payload")
            else:
                assert _b64decode(segment.encode(), "payload") == expected
