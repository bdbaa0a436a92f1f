"""The HTTP contract of mint-token and the gateway's other endpoints (CONTRACT section 4), driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from prometheus_client.parser import text_string_to_metric_families

from gateway import config, logs
from gateway.app import create_app
from gateway.errors import InvalidPayload
from gateway.jose import StrictJSONError, strict_loads
from gateway.routes import token_from
from gateway.store import MemoryStore
from gateway.testing import FakeClock, TestIssuer
from tests.conftest import PUBLISHER, Gateway, description, error_code, gitlab_issuer, write_config

MINT = "/_/oidc/mint-token"
GATEWAY_URL = "https://gateway.test"  # write_config's default [gateway] url
LIMIT = 16 * 1024  # the contract's default body limit


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of an EC or OKP public key, computed here rather than trusted from a library."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def assert_not_echoed(response: httpx.Response, token: str) -> None:
    assert token not in response.text
    assert token.split(".")[2] not in response.text


async def test_mint_returns_token_expiry_and_normalized_projects(
    make_gateway: Any, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A valid token gets 200 with exactly success, token, an integer expiry and the PEP 503-normalized projects."""
    publisher = PUBLISHER | {"projects": ["Sample_Project", "zope.Interface", "sample-project"]}
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, [publisher], token_ttl=600)
    response = await gateway.mint(issuer.gitlab_token())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"success", "token", "expires", "projects"}
    assert body["success"] is True
    assert type(body["expires"]) is int
    assert body["expires"] == int(clock()) + 600
    assert body["projects"] == ["sample-project", "zope-interface"]
    assert isinstance(body["token"], str) and body["token"].count(".") == 2


async def test_minted_token_verifies_with_the_published_jwks(
    make_gateway: Any, issuer: TestIssuer, clock: FakeClock
) -> None:
    """The minted token verifies with /.well-known/jwks.json and carries the contract's claims and identity."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, token_ttl=600)
    clock.advance(7.25)  # a fractional clock: minted times are still whole seconds
    body = (await gateway.mint(issuer.gitlab_token())).json()
    jwks = (await gateway.client.get("/.well-known/jwks.json")).json()

    decoded = jwt.decode(body["token"], KeySet.import_key_set(jwks), algorithms=["ES256"])
    [published] = jwks["keys"]
    assert not {"d", "p", "q", "k"} & set(published)
    assert decoded.header["alg"] == "ES256"
    assert decoded.header["kid"] == published["kid"] == thumbprint(published)

    claims = decoded.claims
    assert claims["iss"] == GATEWAY_URL
    assert claims["aud"] == "pypi"
    assert claims["sub"] == "gitlab-com:group/project"
    assert claims["projects"] == ["sampleproject"]
    assert claims["iat"] == claims["nbf"] == int(clock())
    assert claims["exp"] - claims["iat"] == 600
    assert claims["exp"] == body["expires"]
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["identity"] == {
        "issuer": "gitlab-com",
        "issuer_url": issuer.url,
        "kind": "gitlab",
        "repository": "group/project",
        "repository_id": "61254376",
        "owner": "group",
        "owner_id": "12885807",
        "workflow": ".gitlab-ci.yml",
        "ref": "main",
        "ref_path": "refs/heads/main",
        "ref_type": "branch",
        "sha": "a3f1c9e07b52d48e6f0c2b9d17e4a85c3b6d0f92",
        "environment": None,
        "trigger": "push",
        "run_id": "1873420561",
        "actor": "alice",
        "runner_environment": "gitlab-hosted",
        "visibility": "public",
        "protected_ref": True,
    }


async def test_each_mint_has_its_own_jti(gateway: Gateway, issuer: TestIssuer) -> None:
    """Two exchanges mint two tokens with different jti, so an index can spend each upload token once."""
    first = (await gateway.mint(issuer.gitlab_token())).json()["token"]
    second = (await gateway.mint(issuer.gitlab_token())).json()["token"]
    jtis = {json.loads(b64decode(token.split(".")[1]))["jti"] for token in (first, second)}
    assert len(jtis) == 2


async def test_audience_endpoint(gateway: Gateway) -> None:
    """GET /_/oidc/audience names the one audience CI jobs must request."""
    response = await gateway.client.get("/_/oidc/audience")
    assert response.status_code == 200
    assert response.json() == {"audience": "pypi"}


async def test_audience_endpoint_follows_config(make_gateway: Any, issuer: TestIssuer) -> None:
    """The audience endpoint reports the configured audience, not a built-in one."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, audience="testpypi")
    assert (await gateway.client.get("/_/oidc/audience")).json() == {"audience": "testpypi"}


async def test_openid_configuration(gateway: Gateway) -> None:
    """The discovery document names the gateway url as issuer and its JWKS under it."""
    response = await gateway.client.get("/.well-known/openid-configuration")
    assert response.status_code == 200
    document = response.json()
    assert document["issuer"] == GATEWAY_URL
    assert document["jwks_uri"] == f"{GATEWAY_URL}/.well-known/jwks.json"


async def test_livez_and_readyz(gateway: Gateway) -> None:
    """A gateway with an in-process store is live and ready."""
    assert (await gateway.client.get("/livez")).status_code == 200
    assert (await gateway.client.get("/readyz")).status_code == 200


def mint_counts(text: str) -> dict[str, float]:
    """Samples of the mint counter, by outcome (summed over issuers)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_mint_requests_total":
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0) + sample.value
    return counts


async def test_metrics_count_mints_by_outcome(gateway: Gateway, issuer: TestIssuer) -> None:
    """After one success and one refusal, /metrics (Prometheus text) counts one of each by outcome."""
    before = await gateway.client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    assert sum(mint_counts(before.text).values()) == 0

    assert (await gateway.mint(issuer.gitlab_token())).status_code == 200
    assert (await gateway.mint(issuer.gitlab_token(aud="testpypi"))).status_code == 422

    counts = mint_counts((await gateway.client.get("/metrics")).text)
    assert counts == {"success": 1.0, "invalid-token": 1.0}


# Bodies built around a real, valid token: refusing them must not depend on the token being bad.
BAD_BODIES: list[Any] = [
    pytest.param(lambda t: b"", id="empty"),
    pytest.param(lambda t: t.encode(), id="bare-token-not-json"),
    pytest.param(lambda t: b"token=" + t.encode(), id="form-encoded"),
    pytest.param(lambda t: json.dumps([t]).encode(), id="json-array"),
    pytest.param(lambda t: json.dumps(t).encode(), id="json-string"),
    pytest.param(lambda t: b"null", id="json-null"),
    pytest.param(lambda t: b"{}", id="empty-object"),
    pytest.param(lambda t: json.dumps({"token": t, "projects": ["x"]}).encode(), id="extra-key"),
    pytest.param(lambda t: json.dumps({"id_token": t}).encode(), id="wrong-key"),
    pytest.param(lambda t: b'{"id_token": null}', id="wrong-key-null"),
    pytest.param(lambda t: b"[null]", id="json-array-of-null"),
    pytest.param(lambda t: json.dumps({"token": [t]}).encode(), id="token-list"),
    pytest.param(lambda t: json.dumps({"token": {"jws": t}}).encode(), id="token-object"),
    pytest.param(lambda t: b'{"token": 1}', id="token-number"),
    pytest.param(lambda t: b'{"token": null}', id="token-null"),
    pytest.param(lambda t: b'{"token": true}', id="token-bool"),
    # A last-wins JSON parser would read the second, valid member.
    pytest.param(lambda t: b'{"token": "x", "token": "' + t.encode() + b'"}', id="duplicate-token"),
    pytest.param(lambda t: b'{"token": "' + t.encode() + b'", "token": "' + t.encode() + b'"}', id="duplicate-same"),
    pytest.param(lambda t: json.dumps({"token": t}).encode("utf-16"), id="utf-16"),
    pytest.param(lambda t: b'{"token": "' + t.encode() + b'\xff"}', id="non-utf8-byte"),
    pytest.param(lambda t: json.dumps({"token": t})[:-1].encode(), id="truncated"),
    pytest.param(lambda t: b'{"token": NaN}', id="nan"),
    pytest.param(lambda t: b"[" * 8000 + b"]" * 8000, id="deeply-nested"),
    pytest.param(lambda t: json.dumps({"token": ""}).encode(), id="token-empty-string"),
    pytest.param(lambda t: json.dumps({"token": " " + t}).encode(), id="token-leading-space"),
    # Exactly at the limit is allowed in, and then refused as not a token (not as too large).
    pytest.param(lambda t: b'{"token": "' + b"a" * (LIMIT - 13) + b'"}', id="at-the-limit"),
]


# Bodies that carry one token, written the ways clients and hand-written scripts write them.
GOOD_BODIES: list[Any] = [
    pytest.param(lambda t: json.dumps({"token": t}).encode(), id="python-json"),
    pytest.param(lambda t: json.dumps({"token": t}, separators=(",", ":")).encode(), id="compact"),
    pytest.param(lambda t: b'\n { "token" :\t"' + t.encode() + b'" }\r\n', id="whitespace"),
    pytest.param(lambda t: b'{"\\u0074oken": "' + t.encode() + b'"}', id="escaped-name"),
    pytest.param(lambda t: b'{"token": "' + t.replace(".", "\\u002e", 1).encode() + b'"}', id="escaped-dot"),
    pytest.param(lambda t: b'{"token": "' + t[:10].encode() + b'\\"' + t[10:].encode() + b'"}', id="escaped-quote"),
    pytest.param(lambda t: b'{"token":"' + t.encode() + b'"}' + b" " * 9, id="longest-single-member-quick-path"),
    pytest.param(lambda t: b'{"token":"' + t.encode() + b'"}' + b" " * 10, id="single-member-strict-path"),
    # The shortest body with a second member: one byte longer than the quick path's longest.
    pytest.param(lambda t: b'{"token":1,"token":"' + t.encode() + b'"}', id="shortest-duplicate"),
]


@pytest.mark.parametrize("make_body", [*GOOD_BODIES, *BAD_BODIES])
def test_body_reading_is_the_strict_parsers(make_body: Callable[[str], bytes], issuer: TestIssuer) -> None:
    """token_from's quick reading of the common body gives what the strict parser gives, refusals included."""
    token = issuer.gitlab_token()
    body = make_body(token)

    def strictly() -> str:
        try:
            payload = strict_loads(body)
        except StrictJSONError:
            raise InvalidPayload("not strict JSON") from None
        if not (isinstance(payload, dict) and len(payload) == 1 and isinstance(payload.get("token"), str)):
            raise InvalidPayload("not exactly one token")
        return payload["token"]  # type: ignore[no-any-return]

    try:
        expected: str | None = strictly()
    except InvalidPayload:
        expected = None
    if expected is None:
        with pytest.raises(InvalidPayload):
            token_from(body, "pypi")
    else:
        assert token_from(body, "pypi") == expected


@pytest.mark.parametrize("make_body", BAD_BODIES)
async def test_bad_body_is_invalid_payload(
    make_body: Callable[[str], bytes], gateway: Gateway, issuer: TestIssuer
) -> None:
    """A body that is not exactly {"token": "<JWS>"} gets 422 invalid-payload without echoing the token."""
    token = issuer.gitlab_token()
    body = make_body(token)
    assert len(body) <= LIMIT
    response = await gateway.client.post(MINT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-payload"
    assert description(response)
    assert_not_echoed(response, token)


async def test_body_over_the_limit_is_413(gateway: Gateway, issuer: TestIssuer) -> None:
    """A body one byte over 16 KiB (with Content-Length) gets 413 invalid-payload, even around a valid token."""
    token = issuer.gitlab_token()
    body = json.dumps({"token": token + "a" * (LIMIT + 1 - len(token) - 13)}).encode()
    assert len(body) == LIMIT + 1
    response = await gateway.client.post(MINT, content=body)
    assert response.status_code == 413
    assert error_code(response) == "invalid-payload"
    assert str(LIMIT) in description(response)
    assert_not_echoed(response, token)


async def test_body_limit_follows_config(make_gateway: Any, issuer: TestIssuer) -> None:
    """With max_body set, a valid token in a body over that limit gets 413."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, max_body=1024)
    token = issuer.gitlab_token()
    assert len(json.dumps({"token": token})) > 1024
    response = await gateway.mint(token)
    assert response.status_code == 413
    assert error_code(response) == "invalid-payload"


async def test_streamed_body_over_the_limit_is_413_without_reading_it_all(gateway: Gateway) -> None:
    """A chunked body with no Content-Length is cut off at the limit: 413, and the rest is never read."""
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'{"token": "'
        for _ in range(1024):  # 1 MiB in all
            pulled += 1
            yield b"a" * 1024

    response = await gateway.client.post(MINT, content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert error_code(response) == "invalid-payload"
    # 16 KiB is 16 chunks; a few more for buffering is fine, the whole mebibyte is not.
    assert pulled <= 32


async def test_get_on_mint_token_is_405(gateway: Gateway) -> None:
    """mint-token only accepts POST."""
    response = await gateway.client.get(MINT)
    assert response.status_code == 405
    assert "POST" in response.headers["allow"]


async def test_same_token_twice_is_reuse(gateway: Gateway, issuer: TestIssuer) -> None:
    """A token exchanged once is refused the second time with invalid-reuse-token."""
    token = issuer.gitlab_token()
    assert (await gateway.mint(token)).status_code == 200
    response = await gateway.mint(token)
    assert response.status_code == 422
    assert error_code(response) == "invalid-reuse-token"
    assert_not_echoed(response, token)


async def test_reuse_is_by_jti_not_by_token_string(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """A second, differently signed token that repeats a spent jti is refused as reuse."""
    claims = issuer.gitlab_claims(now=int(clock()))
    assert (await gateway.mint(issuer.sign(claims))).status_code == 200
    again = issuer.sign(claims | {"iat": claims["iat"] + 1})
    response = await gateway.mint(again)
    assert response.status_code == 422
    assert error_code(response) == "invalid-reuse-token"


async def test_concurrent_requests_with_one_token_mint_once(gateway: Gateway, issuer: TestIssuer) -> None:
    """Sixteen concurrent exchanges of one token on a cold cache: exactly one 200, fifteen invalid-reuse-token."""
    token = issuer.gitlab_token()
    responses = await asyncio.gather(*(gateway.mint(token) for _ in range(16)))
    assert sorted(r.status_code for r in responses) == [200] + [422] * 15
    assert sorted(error_code(r) for r in responses if r.status_code == 422) == ["invalid-reuse-token"] * 15
    assert issuer.jwks_count == 1  # the cold cache was filled once, not once per request


@pytest.mark.parametrize(
    ("refused", "code"),
    [
        pytest.param({"aud": "testpypi"}, "invalid-token", id="wrong-aud"),
        pytest.param({"exp": 1}, "invalid-token", id="expired"),
        pytest.param({"project_path": "group/other"}, "invalid-publisher", id="no-publisher"),
        pytest.param({"ci_config_ref_uri": None}, "invalid-publisher", id="config-from-elsewhere"),
    ],
)
async def test_refused_token_does_not_spend_its_jti(
    refused: dict[str, Any], code: str, gateway: Gateway, issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token refused before minting leaves its jti unspent: a good token with that jti still mints."""
    good = issuer.gitlab_claims(now=int(clock()))
    bad = issuer.gitlab_claims(now=int(clock()), **refused) | {"jti": good["jti"]}
    response = await gateway.mint(issuer.sign(bad))
    assert response.status_code == 422
    assert error_code(response) == code, description(response)
    assert (await gateway.mint(issuer.sign(good))).status_code == 200


async def test_unknown_issuer_does_not_spend_a_trusted_issuers_jti(
    gateway: Gateway, issuer: TestIssuer, other_issuer: TestIssuer, clock: FakeClock
) -> None:
    """A token from an untrusted issuer carrying a trusted token's jti cannot burn that jti."""
    claims = issuer.gitlab_claims(now=int(clock()))
    squatter = other_issuer.gitlab_claims(now=int(clock())) | {"jti": claims["jti"]}
    assert error_code(await gateway.mint(other_issuer.sign(squatter))) == "invalid-payload"
    assert (await gateway.mint(issuer.sign(claims))).status_code == 200


async def test_failures_never_contain_the_token(gateway: Gateway, issuer: TestIssuer, clock: FakeClock) -> None:
    """Across every kind of refusal (token, reuse, publisher), no response contains the token or its signature."""
    now = int(clock())
    spent = issuer.gitlab_token(now=now)
    assert (await gateway.mint(spent)).status_code == 200
    tokens = {
        "invalid-token": issuer.gitlab_token(now=now, aud="pypi-" + "x" * 40),
        "invalid-reuse-token": spent,
        "invalid-publisher": issuer.gitlab_token(now=now, project_path="group/other"),
        "invalid-payload": issuer.gitlab_token(now=now, iss=issuer.url + "/"),
    }
    for code, token in tokens.items():
        response = await gateway.mint(token)
        assert response.status_code == 422
        assert error_code(response) == code
        assert_not_echoed(response, token)


# --- claim values that no encoder takes, and bugs -----------------------------------------------------------------


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "gateway.audit"]


def signed_escaped(issuer: TestIssuer, claims: dict[str, Any]) -> str:
    """Signed with the claims as ASCII JSON, so a lone surrogate travels as the escape `\\ud800`, as in the wild."""
    head = {"alg": "RS256", "kid": issuer.signing_kid, "typ": "JWT"}
    return issuer.sign_raw(json.dumps(head).encode(), json.dumps(claims).encode())


async def test_a_lone_surrogate_claim_is_refused_before_the_jti_is_spent(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim holding `\\ud800` is 422 invalid-token with an audit line and its jti unspent: the same claims
    without it mint afterwards."""
    caplog.set_level(logging.INFO)
    good = issuer.gitlab_claims(now=int(clock()))
    response = await gateway.mint(signed_escaped(issuer, good | {"user_login": "alice\ud800"}))
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-token"
    assert "'user_login'" in description(response)
    assert [(line["outcome"], line["issuer"]) for line in audit_lines(caplog)] == [("invalid-token", "gitlab-com")]
    assert (await gateway.mint(signed_escaped(issuer, good))).status_code == 200


async def test_a_lone_surrogate_in_an_untrusted_iss_is_shown_escaped(
    gateway: Gateway, issuer: TestIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An `iss` holding `\ud800` is refused invalid-payload as untrusted; the description shows it as an escape,
    and the attempt is audited."""
    caplog.set_level(logging.INFO)
    claims = issuer.gitlab_claims(now=int(clock())) | {"iss": "https://gitlab.example\ud800"}
    response = await gateway.mint(signed_escaped(issuer, claims))
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-payload"
    assert "'https://gitlab.example\\ud800' is not trusted" in description(response)
    assert [line["outcome"] for line in audit_lines(caplog)] == ["invalid-payload"]


class BrokenStore(MemoryStore):
    """A replay store with a bug: spending raises what no store may raise. Injected through create_app because a
    bug cannot be produced from outside; everything else in the app is real."""

    async def spend(self, key: str, ttl: float) -> bool:
        raise RuntimeError("a bug in the store")


async def test_an_unexpected_exception_is_a_500_internal_error(
    tmp_path: Path, issuer: TestIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while minting answers 500 in the contract's error shape with code internal-error and no traceback,
    writes an audit line and the operator's traceback, counts the outcome, and hands out no token."""
    caplog.set_level(logging.INFO)
    settings = config.load(write_config(tmp_path, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER]))
    app = create_app(settings, clock=clock, store=BrokenStore(clock))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=GATEWAY_URL) as client:
        response = await client.post(MINT, json={"token": issuer.gitlab_token()})
        counts = mint_counts((await client.get("/metrics")).text)
    await app.state.exchange.keys.aclose()
    await app.state.upload.aclose()
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"message": "Token request failed", "errors": [body["errors"][0]]}
    assert body["errors"][0]["code"] == "internal-error"
    assert "not of the token" in body["errors"][0]["description"]
    assert "Traceback" not in response.text and "a bug in the store" not in response.text
    assert "token" not in body
    assert counts == {"internal-error": 1.0}
    assert [line["outcome"] for line in audit_lines(caplog)] == ["internal-error"]
    logged = [r for r in caplog.records if r.name == "gateway.routes" and r.levelno == logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "a bug in the store" in str(logged[0].exc_info[1])


NO_TOKEN = [
    pytest.param(b'{"token": ""}', id="empty-string"),
    pytest.param(b'{"token": "null"}', id="text-null"),
    pytest.param(b'{"token": "null\\n"}', id="text-null-and-newline"),
    pytest.param(b'{"token": " "}', id="blank"),
    pytest.param(b'{"token": null}', id="json-null"),
]


@pytest.mark.parametrize("body", NO_TOKEN)
async def test_a_missing_token_says_the_id_token_request_failed(
    body: bytes, make_gateway: Any, issuer: TestIssuer
) -> None:
    """An empty token, the text `null` or a JSON null is invalid-payload, saying the job's ID token request failed
    and how to check it (`id_tokens`, `python -m id AUDIENCE`) with this gateway's audience."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)}, audience="upload.example")
    response = await gateway.client.post(MINT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid-payload"
    text = description(response)
    assert "the job's ID token request failed" in text
    assert "`id_tokens:` with `aud: upload.example`" in text
    assert "`python -m id upload.example`" in text


async def test_control_characters_in_claims_never_reach_the_text_log_raw(
    make_gateway: Any, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the text log format, a claim value holding a newline, an ANSI escape or a line separator is logged
    escaped, so it cannot forge a log line."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer, runner_environments=["self-hosted"])})
    try:
        logs.configure("info", "text")
        forged = "gitlab-hosted\n2026-01-01 00:00:00 INFO gateway.audit: forged\x1b[2K\u2028"
        response = await gateway.mint(issuer.gitlab_token(runner_environment=forged))
    finally:
        for handler in root.handlers:
            handler.close()  # the log writer's thread writes what it holds, then stops
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert error_code(response) == "invalid-publisher"
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if "mint refused" in line]
    assert len(refused) == 1
    assert "forged" in refused[0]
    assert not any(line.startswith("2026-01-01 00:00:00 INFO gateway.audit: forged") for line in err.splitlines())
    assert "\x1b" not in err and "\u2028" not in err


def test_the_text_log_escapes_control_characters_in_any_message() -> None:
    """The text formatter writes a message's control characters, line separators, bidi overrides and lone
    surrogates as escapes, whatever interpolated them; a traceback keeps its lines."""
    formatter = logs.TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "gateway.test", logging.INFO, __file__, 1, "got %s", ("a\nb\r\x1b[31m\u2028\u202e\ud800",), None
    )
    assert formatter.format(record) == "INFO got a\\x0ab\\x0d\\x1b[31m\\u2028\\u202e\\ud800"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("gateway.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert formatter.format(failed).startswith("ERROR failed\nTraceback")
