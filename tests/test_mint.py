"""The signer's ES256 signature in JWS form: r || s cut from OpenSSL's DER, as `decode_dss_signature` reads it."""

from __future__ import annotations

import random

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from joserfc import jws
from joserfc.jwk import ECKey

from gateway.identity import Identity
from gateway.mint import Signer, generate_key, raw_p256_signature

# The order of P-256's group: r and s lie in [1, N - 1].
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _library(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_real_signatures_read_as_the_library_reads_them() -> None:
    """3,000 signatures by OpenSSL: every length of r and s it produced (31 to 33 bytes in DER) reads the same."""
    private = ec.generate_private_key(ec.SECP256R1())
    lengths = set()
    for i in range(3000):
        der = private.sign(i.to_bytes(4, "big"), ec.ECDSA(hashes.SHA256()))
        lengths.add((der[3], der[5 + der[3]]))
        assert raw_p256_signature(der) == _library(der), der.hex()
    # Both a leading zero (33) and a top bit clear (32) occurred for r and for s, so both cuts were taken.
    assert {33, 32} <= {r for r, _ in lengths} and {33, 32} <= {s for _, s in lengths}


def test_every_integer_width_reads_as_the_library_reads_it() -> None:
    """r and s of every width from 1 byte to 33 (a small value, a set top bit, the group's bounds)."""
    rng = random.Random(7)  # noqa: S311 -- test values, reproducible; nothing secret
    values = [1, 2, 0x7F, 0x80, 0xFF, 0x100, 2**255 - 1, 2**255, N - 1]
    values += [rng.randrange(1, 2 ** (8 * width)) | 2 ** (8 * width - 1) for width in range(1, 33)]
    values += [rng.randrange(1, 2 ** (8 * width - 1)) for width in range(1, 33)]
    values = [v for v in values if 0 < v < N]
    for r in values:
        for s in (values[0], values[-1], r):
            der = encode_dss_signature(r, s)
            assert raw_p256_signature(der) == _library(der), (r, s)


def test_minted_tokens_verify_with_the_published_key() -> None:
    """200 minted ES256 tokens, each verified by joserfc with the key the signer publishes."""
    signer = Signer(generate_key("ES256"))
    public = ECKey.import_key(signer.jwks["keys"][0])
    identity = Identity("gitlab", "https://gitlab.example", "gitlab", "group/project", workflow=".gitlab-ci.yml")
    for i in range(200):
        minted = signer.mint(
            identity=identity, projects=["p"], issuer="https://gw", audience="pypi", ttl=900, now=1_800_000_000 + i
        )
        assert jws.deserialize_compact(minted.token, public, algorithms=["ES256"]).protected["alg"] == "ES256"
