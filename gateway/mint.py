"""The gateway's own signing keys and the upload tokens it mints."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pybase64
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from joserfc.jwk import ECKey, Key, OKPKey

from ._json import dumps_utf8
from .identity import Identity

ALGORITHMS = ("ES256", "Ed25519")


def generate_key(algorithm: str = "ES256") -> Key:
    key: Key = ECKey.generate_key("P-256") if algorithm == "ES256" else OKPKey.generate_key("Ed25519")
    key.ensure_kid()
    return key


def algorithm_of(key: Key) -> str:
    # RFC 9864 names the fully specified EdDSA algorithm "Ed25519".
    return "Ed25519" if isinstance(key, OKPKey) else "ES256"


def public_jwk(key: Key) -> dict[str, Any]:
    public = key.as_dict(private=False)
    public.update({"kid": key.thumbprint(), "use": "sig", "alg": algorithm_of(key)})
    return public


class Minted(NamedTuple):
    token: str
    expires: int
    jti: str


class Unsigned(NamedTuple):
    """A token's encoded header and claims (the signing input), ready to sign: everything of minting that could
    fail on a claim value is done by the time one exists."""

    signing_input: bytes
    expires: int
    jti: str


class Signer:
    def __init__(self, key: Key, previous: Sequence[Key] = ()) -> None:
        self.key = key
        self.algorithm = algorithm_of(key)
        # RFC 7638 thumbprint: replicas with the same key agree on its kid without coordination.
        self.kid = key.thumbprint()
        self._sign = _signer(key)
        # The header never changes, so it is encoded once; each mint encodes and signs only the payload.
        header = json.dumps({"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}, separators=(",", ":"))
        self._header = _b64(header.encode())
        published = [public_jwk(key)]
        published += [public_jwk(old) for old in previous if old.thumbprint() != self.kid]
        self.jwks: dict[str, Any] = {"keys": published}

    def mint(
        self,
        *,
        identity: Identity,
        projects: Sequence[str],
        issuer: str,
        audience: str,
        ttl: int,
        now: float,
    ) -> Minted:
        return self.sign(
            self.prepare(identity=identity, projects=projects, issuer=issuer, audience=audience, ttl=ttl, now=now)
        )

    def prepare(
        self,
        *,
        identity: Identity,
        projects: Sequence[str],
        issuer: str,
        audience: str,
        ttl: int,
        now: float,
    ) -> Unsigned:
        """Build and encode the claims; `sign` then only signs. The exchange prepares before it spends a jti."""
        issued = int(now)
        expires = issued + ttl
        jti = secrets.token_urlsafe(16)
        claims = {
            "iss": issuer,
            "aud": audience,
            "sub": f"{identity.issuer}:{identity.repository}",
            "projects": list(projects),
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "jti": jti,
            "identity": identity.as_dict(),
        }
        # Strings, integers, booleans and None only (iat is truncated to an integer).
        payload = dumps_utf8(claims, floats=False)
        return Unsigned(signing_input=self._header + b"." + _b64(payload), expires=expires, jti=jti)

    def sign(self, unsigned: Unsigned) -> Minted:
        signature = self._sign(unsigned.signing_input)
        token = (unsigned.signing_input + b"." + _b64(signature)).decode("ascii")
        return Minted(token=token, expires=unsigned.expires, jti=unsigned.jti)


def _signer(key: Key) -> Callable[[bytes], bytes]:
    """A signing function for the key, straight on `cryptography`.

    Minting signs once per request with our own, already validated key, so the per-call key checks of a
    generic JWS library are pure overhead there (a fifth of a mint's signing time); verification of foreign
    tokens keeps going through joserfc.
    """
    private = key.private_key
    if isinstance(private, ec.EllipticCurvePrivateKey):
        # Hashed by hashlib and passed as Prehashed: the same SHA-256, without a cryptography Hash object per call.
        ecdsa = ec.ECDSA(Prehashed(hashes.SHA256()))
        sha256 = hashlib.sha256

        def sign_es256(message: bytes) -> bytes:
            return raw_p256_signature(private.sign(sha256(message).digest(), ecdsa))

        return sign_es256
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign
    raise ValueError("the signing key must be a private EC P-256 or Ed25519 key")


def raw_p256_signature(der: bytes) -> bytes:
    """r || s, each 32 bytes (the JWS form, RFC 7518 section 3.4), of the DER that OpenSSL signs P-256 with.

    The DER is SEQUENCE { INTEGER r, INTEGER s }: `30 L 02 Lr r 02 Ls s`, every length one byte (a P-256
    signature is at most 72 bytes), each integer minimal and positive, so 33 bytes when its top bit is set (a
    leading zero) and fewer than 32 when it is small. Cut by those lengths: a third of the cost of
    `decode_dss_signature` and two `int.to_bytes`, to which a test holds it.
    """
    r_end = 4 + der[3]
    return der[4:r_end][-32:].rjust(32, b"\0") + der[r_end + 2 :][-32:].rjust(32, b"\0")


def _b64(data: bytes) -> bytes:
    return pybase64.urlsafe_b64encode(data).rstrip(b"=")
