"""The gateway's own signing keys and the upload tokens it mints."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, Key, OKPKey

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


@dataclass(frozen=True, slots=True)
class Minted:
    token: str
    expires: int
    jti: str


class Signer:
    def __init__(self, key: Key, previous: Sequence[Key] = ()) -> None:
        self.key = key
        self.algorithm = algorithm_of(key)
        # RFC 7638 thumbprint: replicas with the same key agree on its kid without coordination.
        self.kid = key.thumbprint()
        registry = jws.JWSRegistry(algorithms=[self.algorithm])
        self._signer = registry.get_alg(self.algorithm)
        self._signer.check_key(key)
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
        issued = int(now)
        expires = issued + ttl
        jti = str(uuid.uuid4())
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
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        signing_input = self._header + b"." + _b64(payload)
        signature = self._signer.sign(signing_input, self.key)
        token = (signing_input + b"." + _b64(signature)).decode("ascii")
        return Minted(token=token, expires=expires, jti=jti)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")
