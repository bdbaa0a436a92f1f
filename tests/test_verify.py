"""gateway.verify: what an index that verifies minted tokens itself accepts and refuses.

Valid tokens are minted by the gateway's real `Signer`; bad ones are built by signing exactly the bytes a case
needs, with the gateway's key where the case is about claims, so each refusal is for the defect it names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import ECKey, Key

from gateway.identity import Identity
from gateway.mint import Signer, generate_key
from gateway.verify import InvalidUploadToken, check_project, verify_upload_token

ISSUER = "https://gateway.test"
AUDIENCE = "pypi"
NOW = 1_750_000_000
TTL = 900
IDENTITY = Identity(issuer="gitlab-com", issuer_url="https://gitlab.com", kind="gitlab", repository="group/project")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def mint(signer: Signer, *, now: int = NOW, projects: tuple[str, ...] = ("sampleproject",)) -> str:
    return signer.mint(identity=IDENTITY, projects=projects, issuer=ISSUER, audience=AUDIENCE, ttl=TTL, now=now).token


def minted_claims(**overrides: object) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "gitlab-com:group/project",
        "projects": ["sampleproject"],
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + TTL,
        "jti": "b0c1d2e3f4a5b6c7",
        "identity": IDENTITY.as_dict(),
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


def signed(key: Key, payload: Mapping[str, Any] | bytes, **header: object) -> str:
    """Sign exactly this payload with `key` (ES256), under the key's kid unless the header says otherwise."""
    protected = {"alg": "ES256", "kid": key.thumbprint(), "typ": "JWT", **header}
    body = payload if isinstance(payload, bytes) else dumps(payload)
    return jws.serialize_compact(protected, body, key, algorithms=["ES256"])


def unsigned(key: Key, **header: object) -> str:
    protected = {"alg": "none", "kid": key.thumbprint(), "typ": "JWT", **header}
    return f"{b64(dumps(protected))}.{b64(dumps(minted_claims()))}."


def hmac_with_public_key(key: Key) -> str:
    # The classic algorithm confusion: HS256 keyed with the public key, which anyone can fetch from the JWKS.
    protected = {"alg": "HS256", "kid": key.thumbprint(), "typ": "JWT"}
    signing_input = f"{b64(dumps(protected))}.{b64(dumps(minted_claims()))}".encode()
    secret = json.dumps(key.as_dict(private=False)).encode()
    return f"{signing_input.decode()}.{b64(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def duplicate_aud(key: Key) -> bytes:
    # A first-wins parser would read the forged audience, a last-wins parser the genuine one.
    return b'{"aud":"other",' + dumps(minted_claims())[1:]


@pytest.fixture
def key() -> Key:
    return generate_key("ES256")


@pytest.fixture
def signer(key: Key) -> Signer:
    return Signer(key)


def verify(token: str, jwks: Mapping[str, Any], *, now: float = NOW, leeway: int = 30) -> dict[str, Any]:
    return verify_upload_token(token, jwks, issuer=ISSUER, audience=AUDIENCE, leeway=leeway, now=now)


def test_minted_token_verifies_and_returns_its_claims(signer: Signer) -> None:
    """A token the gateway minted verifies against its JWKS, and the claims come back whole."""
    claims = verify(mint(signer), signer.jwks)
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == "gitlab-com:group/project"
    assert claims["projects"] == ["sampleproject"]
    assert claims["identity"]["repository"] == "group/project"
    assert claims["exp"] == NOW + TTL


def test_ed25519_token_verifies() -> None:
    """A gateway signing with Ed25519 (RFC 9864's name) mints tokens that verify."""
    signer = Signer(generate_key("Ed25519"))
    assert signer.jwks["keys"][0]["alg"] == "Ed25519"
    assert verify(mint(signer), signer.jwks)["projects"] == ["sampleproject"]


def test_previous_key_still_verifies_during_rotation(key: Key) -> None:
    """A token minted with the previous key verifies while the JWKS still lists that key next to the new one."""
    old_token = mint(Signer(key))
    rotated = Signer(generate_key("ES256"), previous=[key])
    assert verify(old_token, rotated.jwks)["sub"] == "gitlab-com:group/project"
    with pytest.raises(InvalidUploadToken, match="not one of the gateway's signing keys"):
        verify(old_token, Signer(generate_key("ES256")).jwks)


@pytest.mark.parametrize(
    ("now", "leeway"),
    [
        pytest.param(NOW + TTL + 29, 30, id="just-before-exp-plus-leeway"),
        pytest.param(NOW - 30, 30, id="nbf-and-iat-minus-leeway"),
    ],
)
def test_token_at_the_edge_of_the_leeway_is_accepted(signer: Signer, now: int, leeway: int) -> None:
    """Clock skew within the leeway, on either side of the token's lifetime, is tolerated."""
    assert verify(mint(signer), signer.jwks, now=now, leeway=leeway)["jti"]


Make = Callable[[Key, Signer], str]


def foreign(key: Key, signer: Signer) -> str:
    # A different gateway's key, under this gateway's kid: the signature is genuine but by the wrong key.
    return signed(ECKey.generate_key("P-256"), minted_claims(), kid=key.thumbprint())


BAD: list[Any] = [
    pytest.param(lambda k, s: mint(s, now=NOW - TTL - 30), "expired", id="expired-by-the-leeway"),
    pytest.param(lambda k, s: signed(k, minted_claims(iat=NOW + 60)), "issued in the future", id="iat-in-the-future"),
    pytest.param(lambda k, s: signed(k, minted_claims(nbf=NOW + 60)), "not valid before", id="nbf-in-the-future"),
    pytest.param(lambda k, s: signed(k, minted_claims(iss="https://other.test")), "'iss'", id="wrong-issuer"),
    pytest.param(lambda k, s: signed(k, minted_claims(aud="testpypi")), "'aud' is 'testpypi'", id="wrong-audience"),
    pytest.param(lambda k, s: signed(k, minted_claims(aud=[AUDIENCE])), "single string", id="audience-list"),
    pytest.param(lambda k, s: signed(k, minted_claims(exp=None)), "exp", id="no-exp"),
    pytest.param(lambda k, s: signed(k, minted_claims(jti=None)), "jti", id="no-jti"),
    pytest.param(lambda k, s: signed(k, minted_claims(projects=None)), "'projects' list", id="no-projects"),
    pytest.param(lambda k, s: signed(k, minted_claims(projects="sampleproject")), "'projects'", id="projects-str"),
    pytest.param(lambda k, s: signed(k, minted_claims(projects=[1])), "'projects' list", id="projects-not-str"),
    pytest.param(lambda k, s: signed(k, duplicate_aud(k)), "duplicate", id="duplicate-claim"),
    pytest.param(foreign, "signature does not verify", id="foreign-signed"),
    pytest.param(lambda k, s: unsigned(k), "'none' does not match", id="alg-none"),
    pytest.param(lambda k, s: hmac_with_public_key(k), "'HS256' does not match", id="hmac-with-public-key"),
    pytest.param(
        lambda k, s: signed(k, minted_claims(), kid="someone-else"), "not one of the gateway's", id="unknown-kid"
    ),
    pytest.param(lambda k, s: signed(k, minted_claims(), jwk=dict(k.as_dict(private=False))), "jwk", id="embedded-jwk"),
    pytest.param(lambda k, s: mint(s)[:-4] + "AAAA", "signature", id="tampered-signature"),
    pytest.param(lambda k, s: "not-a-token", "compact JWS", id="not-a-jws"),
]


@pytest.mark.parametrize(("make", "fragment"), BAD)
def test_bad_token_is_refused_with_a_reason(key: Key, signer: Signer, make: Make, fragment: str) -> None:
    """Each defect is refused with InvalidUploadToken whose description names it."""
    token = make(key, signer)
    with pytest.raises(InvalidUploadToken) as refused:
        verify(token, signer.jwks)
    assert fragment in refused.value.description
    assert token not in refused.value.description


def test_algorithm_comes_from_the_key_not_the_token() -> None:
    """An Ed25519 key verifies only Ed25519 tokens: a token claiming ES256 under its kid is refused."""
    ed = Signer(generate_key("Ed25519"))
    forged = signed(ECKey.generate_key("P-256"), minted_claims(), kid=ed.kid)
    with pytest.raises(InvalidUploadToken, match=r"'ES256' does not match key .* which signs Ed25519"):
        verify(forged, ed.jwks)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        pytest.param({"kty": "oct", "k": b64(b"secret"), "alg": "HS256"}, "not a public ES256", id="oct"),
        pytest.param({"alg": "RS256"}, "not a public ES256", id="mislabelled-alg"),
        pytest.param({"d": "private"}, "not a public ES256", id="private-member"),
        pytest.param({"x": "AAAA"}, "malformed", id="malformed"),
    ],
)
def test_unusable_key_in_the_set_is_refused(signer: Signer, entry: dict[str, Any], fragment: str) -> None:
    """A key set entry that is not a public ES256 or Ed25519 key verifies nothing, even under the right kid."""
    jwks = {"keys": [{**signer.jwks["keys"][0], **entry}]}
    with pytest.raises(InvalidUploadToken, match=fragment):
        verify(mint(signer), jwks)


def test_duplicate_kid_in_the_set_is_refused(signer: Signer) -> None:
    """A key set that lists one kid twice is ambiguous, so nothing under that kid verifies."""
    jwks = {"keys": signer.jwks["keys"] * 2}
    with pytest.raises(InvalidUploadToken, match="more than once"):
        verify(mint(signer), jwks)


@pytest.mark.parametrize("project", ["sampleproject", "SampleProject", "sample_project", "Sample-Project"])
def test_check_project_compares_normalized_names(project: str) -> None:
    """Project names are compared PEP 503-normalized, on both sides."""
    check_project({"projects": ["Sample.Project", "sampleproject"]}, project)


def test_check_project_refuses_others_and_lists_the_allowed() -> None:
    """A project outside `projects` is refused, naming it and the projects the token allows."""
    with pytest.raises(InvalidUploadToken) as refused:
        check_project({"projects": ["sampleproject", "sample-extras"]}, "requests")
    assert refused.value.description == (
        "this upload token may not upload to project 'requests'; it allows: sampleproject, sample-extras"
    )
