"""The Verifier's signature check: joserfc's key rules once per key and algorithm, RS* straight on `cryptography`.

Every signature here is made for real by joserfc and judged twice, by the gateway's Verifier and by joserfc's own
algorithm, which must agree on each; a key joserfc refuses for an algorithm is refused on every token, not only
the first; and a check made for one key object never judges a token for another.
"""

from __future__ import annotations

from typing import Any

import pytest
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from gateway.errors import InvalidToken
from gateway.jose import _MAX_CHECKS, Unverified, UnverifiedClaims, Verifier

ISSUER = "https://ci.example"
AUDIENCE = "pypi"
NOW = 1_800_000_000
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "Ed25519")


def _verifier(algorithms: tuple[str, ...] = ALGORITHMS) -> Verifier:
    return Verifier(issuer_url=ISSUER, audience=AUDIENCE, algorithms=algorithms, leeway=0, clock=lambda: NOW)


def _token(alg: str, signing_input: bytes, signature: bytes) -> Unverified:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 60, "iat": NOW, "jti": "j"}
    return Unverified({"alg": alg, "kid": "k"}, UnverifiedClaims(claims), signing_input, signature, True)


def _sign(alg: str, key: Key, message: bytes) -> bytes:
    return JWSRegistry(algorithms=[alg]).get_alg(alg).sign(message, key)  # type: ignore[no-any-return]


def _public(key: Key, **members: Any) -> Key:
    return type(key).import_key({**key.as_dict(private=False), **members})  # type: ignore[no-any-return]


def _joserfc_says(alg: str, key: Key, message: bytes, signature: bytes) -> bool:
    return bool(JWSRegistry(algorithms=[alg]).get_alg(alg).verify(message, signature, key))


def _gateway_says(verifier: Verifier, alg: str, key: Key, message: bytes, signature: bytes) -> bool:
    try:
        verifier.verify(_token(alg, message, signature), key)
    except InvalidToken:
        return False
    return True


_RSA = RSAKey.generate_key(2048)
_OTHER_RSA = RSAKey.generate_key(2048)
_KEYS: dict[str, tuple[Key, Key]] = {
    "RS256": (_RSA, _OTHER_RSA),
    "RS384": (_RSA, _OTHER_RSA),
    "RS512": (_RSA, _OTHER_RSA),
    "PS256": (_RSA, _OTHER_RSA),
    "ES256": (ECKey.generate_key("P-256"), ECKey.generate_key("P-256")),
    "Ed25519": (OKPKey.generate_key("Ed25519"), OKPKey.generate_key("Ed25519")),
}


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_the_verifier_agrees_with_joserfc_on_every_signature(alg: str) -> None:
    """Good, altered, truncated, empty, another key's and another hash's signatures: judged as joserfc judges them."""
    private, other = _KEYS[alg]
    key = _public(private)
    message = b"eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0"
    good = _sign(alg, private, message)
    sibling = {"RS256": "RS384", "RS384": "RS512", "RS512": "RS256"}.get(alg)
    cases = {
        "good": (message, good),
        "flipped bit": (message, good[:-1] + bytes([good[-1] ^ 1])),
        "truncated": (message, good[:-1]),
        "empty": (message, b""),
        "other message": (message + b"x", good),
        "other key": (message, _sign(alg, other, message)),
        **({"other hash": (message, _sign(sibling, private, message))} if sibling else {}),
    }
    verifier = _verifier()
    for _ in range(2):  # the second round runs on the check the first cached
        verdicts = {
            name: (_gateway_says(verifier, alg, key, m, s), _joserfc_says(alg, key, m, s))
            for name, (m, s) in cases.items()
        }
        assert verdicts["good"] == (True, True)
        assert all(ours == theirs for ours, theirs in verdicts.values()), verdicts
        assert [name for name, (ours, _) in verdicts.items() if ours] == ["good"]


@pytest.mark.parametrize(
    ("alg", "members"),
    [
        pytest.param("RS256", {"use": "enc"}, id="use-enc"),
        pytest.param("RS256", {"alg": "RS512"}, id="key-alg-is-another"),
        pytest.param("RS256", {"key_ops": ["encrypt"]}, id="key-ops-without-verify"),
        pytest.param("ES256", {"use": "enc"}, id="ec-use-enc"),
    ],
)
def test_a_key_joserfc_refuses_is_refused_on_every_token(alg: str, members: dict[str, Any]) -> None:
    """A refusal is not cached as an acceptance: the key is refused for the first token and every later one."""
    private = _KEYS[alg][0]
    message = b"a.b"
    signature = _sign(alg, private, message)
    verifier = _verifier()
    refused = _public(private, **members)
    for _ in range(3):
        with pytest.raises(InvalidToken, match="cannot verify"):
            verifier.verify(_token(alg, message, signature), refused)
    # The same key material without the member verifies: the refusal was about the member.
    assert _gateway_says(verifier, alg, _public(private), message, signature)


def test_a_key_accepted_for_one_algorithm_is_still_judged_for_another() -> None:
    """The check is per key *and* algorithm: an RSA key whose `alg` is RS256 verifies RS256, never RS512."""
    key = _public(_RSA, alg="RS256")
    message = b"a.b"
    verifier = _verifier()
    assert _gateway_says(verifier, "RS256", key, message, _sign("RS256", _RSA, message))
    with pytest.raises(InvalidToken, match="cannot verify a RS512"):
        verifier.verify(_token("RS512", message, _sign("RS512", _RSA, message)), key)


def test_a_check_belongs_to_its_key_object() -> None:
    """After a token verified with one key, a token signed by another verifies with its own key only."""
    verifier = _verifier()
    first, second = _public(_RSA), _public(_OTHER_RSA)
    message = b"a.b"
    by_second = _sign("RS256", _OTHER_RSA, message)
    assert _gateway_says(verifier, "RS256", first, message, _sign("RS256", _RSA, message))
    assert not _gateway_says(verifier, "RS256", first, message, by_second)
    assert _gateway_says(verifier, "RS256", second, message, by_second)


def test_checks_of_rotated_keys_are_not_kept_forever() -> None:
    """Every refresh brings new key objects; the checks the verifier keeps stay bounded, and right."""
    verifier = _verifier(("RS256",))
    message = b"a.b"
    signature = _sign("RS256", _RSA, message)
    for _ in range(_MAX_CHECKS * 2 + 3):
        assert _gateway_says(verifier, "RS256", _public(_RSA), message, signature)
        assert len(verifier._checks) <= _MAX_CHECKS
