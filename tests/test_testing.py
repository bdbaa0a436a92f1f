from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.testing import DELETE, TestIssuer


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# A private issuer per test: these tests rotate keys and flip knobs on it.
@pytest.fixture
def fresh(ca: trustme.CA) -> Iterator[TestIssuer]:
    with TestIssuer(path="/gitlab", ca=ca) as issuer:
        yield issuer


@pytest.fixture
def client(fresh: TestIssuer) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=str(fresh.ca_path))
    with httpx.Client(verify=context, timeout=5) as client:
        yield client


def test_serves_discovery_and_jwks_over_verified_https(fresh: TestIssuer, client: httpx.Client) -> None:
    """Discovery and JWKS are served over HTTPS that verifies against the issuer's CA file."""
    discovery = client.get(f"{fresh.url}/.well-known/openid-configuration").json()
    assert fresh.url == f"https://127.0.0.1:{fresh.port}/gitlab"
    assert discovery["issuer"] == fresh.url
    assert discovery["jwks_uri"] == f"{fresh.url}/oauth/discovery/keys"
    keys = client.get(discovery["jwks_uri"]).json()["keys"]
    assert [key["kid"] for key in keys] == [fresh.signing_kid]
    assert not {"d", "p", "q"} & set(keys[0])


def test_gitlab_token_verifies_against_published_jwks(fresh: TestIssuer, client: httpx.Client) -> None:
    """A GitLab-shaped token verifies with joserfc against the JWKS fetched from the server."""
    token = fresh.gitlab_token(project_path="acme/tools/widget", ref="v1.2", ref_type="tag")
    keys = KeySet.import_key_set(client.get(f"{fresh.url}/oauth/discovery/keys").json())
    decoded = jwt.decode(token, keys, algorithms=["RS256"])
    claims = decoded.claims
    assert decoded.header == {"alg": "RS256", "kid": fresh.signing_kid, "typ": "JWT"}
    assert claims["iss"] == fresh.url
    assert claims["namespace_path"] == "acme/tools"
    assert claims["ref_path"] == "refs/tags/v1.2"
    assert claims["sub"] == "project_path:acme/tools/widget:ref_type:tag:ref:v1.2"
    assert claims["ci_config_ref_uri"] == f"{fresh.host}/gitlab/acme/tools/widget//.gitlab-ci.yml@refs/tags/v1.2"
    assert "environment" not in claims


def test_claim_overrides_and_delete(fresh: TestIssuer) -> None:
    """Explicit overrides win over derived claims and DELETE removes a claim."""
    claims = fresh.gitlab_claims(now=1000, ref_path="refs/heads/other", user_email=DELETE, ref=DELETE)
    assert claims["ref_path"] == "refs/heads/other"
    assert "user_email" not in claims and "ref" not in claims
    assert (claims["iat"], claims["exp"]) == (1000, 1300)


def test_rotate_publishes_both_keys_until_retired(fresh: TestIssuer, client: httpx.Client) -> None:
    """After rotate() the JWKS carries old and new keys, and retire() drops the old one."""
    old = fresh.signing_kid
    new = fresh.rotate()
    assert fresh.signing_kid == new != old

    def published() -> list[str]:
        return [key["kid"] for key in client.get(f"{fresh.url}/oauth/discovery/keys").json()["keys"]]

    assert published() == [old, new]
    fresh.retire(old)
    assert published() == [new]


def test_sign_raw_signs_the_exact_segments(fresh: TestIssuer) -> None:
    """sign_raw keeps malformed header and payload bytes verbatim under a valid signature."""
    header = b'{"alg":"RS256","alg":"RS256","kid":"x"}'
    payload = '{"sub":"a","sub":"b"}'.encode("utf-16")
    token = fresh.sign_raw(header, payload)
    head, body, signature = token.split(".")
    assert (b64decode(head), b64decode(body)) == (header, payload)
    fresh.private_key().public_key.verify(
        b64decode(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )

    secret = fresh.public_pem()
    head, body, signature = fresh.sign_raw(header, payload, alg="HS256", secret=secret).split(".")
    expected = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert b64decode(signature) == expected
    assert fresh.sign_raw(header, payload, alg="none").endswith(".")


def test_requests_are_counted(fresh: TestIssuer, client: httpx.Client) -> None:
    """Each endpoint hit is recorded until reset_counts()."""
    client.get(f"{fresh.url}/.well-known/openid-configuration")
    client.get(f"{fresh.url}/oauth/discovery/keys")
    client.get(f"{fresh.url}/oauth/discovery/keys")
    assert (fresh.discovery_count, fresh.jwks_count) == (1, 2)
    fresh.reset_counts()
    assert fresh.requests == []


def test_redirect_knob_answers_302(fresh: TestIssuer, client: httpx.Client) -> None:
    """redirect_to makes the chosen endpoint answer 302 while the other stays normal."""
    fresh.redirect_to = "https://elsewhere.invalid/keys"
    fresh.paths_misbehave = {"jwks"}
    response = client.get(f"{fresh.url}/oauth/discovery/keys")
    assert response.status_code == 302
    assert response.headers["location"] == "https://elsewhere.invalid/keys"
    assert client.get(f"{fresh.url}/.well-known/openid-configuration").status_code == 200


def test_knobs_shape_the_response(fresh: TestIssuer, client: httpx.Client) -> None:
    """status, oversize and jwks_override change what the JWKS endpoint sends."""
    fresh.status = 500
    fresh.oversize = 10_000
    response = client.get(f"{fresh.url}/oauth/discovery/keys")
    assert response.status_code == 500
    assert len(response.content) == 10_000
    assert json.loads(response.content)["keys"]
    fresh.status = fresh.oversize = None
    fresh.jwks_override = "not json"
    assert client.get(f"{fresh.url}/oauth/discovery/keys").text == "not json"


def test_stop_frees_the_port(ca: trustme.CA) -> None:
    """stop() closes the listener so the port refuses connections and can be bound again."""
    issuer = TestIssuer(ca=ca).start()
    port = issuer.port
    with httpx.Client(verify=issuer.ssl_context()) as client:
        assert client.get(f"{issuer.url}/oauth/discovery/keys").status_code == 200
    issuer.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_stop_cuts_a_trickled_response_short(ca: trustme.CA) -> None:
    """stop() returns promptly even while a trickled response is still being streamed."""
    issuer = TestIssuer(ca=ca).start()
    issuer.trickle = 1.0
    errors: list[Exception] = []

    def fetch() -> None:
        try:
            httpx.get(f"{issuer.url}/oauth/discovery/keys", verify=issuer.ssl_context(), timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    deadline = time.monotonic() + 5
    while not issuer.jwks_count and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    issuer.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 1
    assert len(errors) == 1
