"""The ID tokens the benchmark sends: signed ahead of time, in a process pool, kept in a file for reuse.

Signing is ~4x the cost of verifying, so signing inside a run would measure the client, not the server.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import RSAKey

from gateway.testing import TestIssuer

__all__ = ["TokenFile", "TokenSigner", "new_bench_key", "public_jwk", "reuse_problem", "sign_tokens", "token_claims"]

# Tokens outlive the run by this much so a --tokens-file can be reused for a working day.
TOKEN_LIFETIME = 12 * 3600
# Signing chunks: big enough that pickling overhead is noise, small enough to spread over the processes.
SIGN_CHUNK = 2000


def new_bench_key() -> RSAKey:
    # 2048 bits: the gateway refuses weaker RSA keys, and it is what GitLab uses, so verify cost is realistic.
    return RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)


def public_jwk(key: RSAKey) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": key.kid, "alg": "RS256", "use": "sig"}


def token_claims(issuer: TestIssuer, now: int) -> dict[str, Any]:
    # A full GitLab claim set from TestIssuer, valid long enough for the tokens file to be reused.
    return issuer.gitlab_claims(now=now, exp=now + TOKEN_LIFETIME)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenSigner:
    """Signs copies of one claim set that differ only in `jti`; one per signing process."""

    def __init__(self, pem: bytes, kid: str) -> None:
        key = load_pem_private_key(pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self._key = key
        # Same header shape TestIssuer.sign produces, and GitLab sends.
        self._header = _b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())

    @classmethod
    def of(cls, key: RSAKey) -> TokenSigner:
        assert key.kid is not None
        return cls(key.as_pem(private=True), key.kid)

    def sign(self, claims: dict[str, Any], count: int) -> list[str]:
        tokens = []
        for _ in range(count):
            # A fresh uuid4 jti per token, as GitLab does: the servers spend each jti once.
            payload = {**claims, "jti": str(uuid.uuid4())}
            signing_input = f"{self._header}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
            signature = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
            tokens.append(f"{signing_input}.{_b64(signature)}")
        return tokens


# Set once per signing process by the pool initializer, so the key is parsed once, not once per chunk.
_worker_signer: TokenSigner | None = None


def _init_worker(pem: bytes, kid: str) -> None:
    global _worker_signer
    _worker_signer = TokenSigner(pem, kid)


def _sign_chunk(claims: dict[str, Any], count: int) -> list[str]:
    assert _worker_signer is not None
    return _worker_signer.sign(claims, count)


def sign_tokens(key: RSAKey, claims: dict[str, Any], count: int, processes: int) -> list[str]:
    """Sign `count` distinct tokens across `processes` processes (RSA signing is CPU-bound and holds the GIL)."""
    pem = key.as_pem(private=True)
    assert key.kid is not None
    chunks = [min(SIGN_CHUNK, count - start) for start in range(0, count, SIGN_CHUNK)]
    if processes <= 1 or len(chunks) == 1:
        return TokenSigner(pem, key.kid).sign(claims, count)
    # spawn, not fork: this process runs the issuer's server thread, and forking a threaded process can
    # copy a held lock into the child.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=processes, mp_context=context, initializer=_init_worker, initargs=(pem, key.kid)
    ) as pool:
        return [token for batch in pool.map(_sign_chunk, [claims] * len(chunks), chunks) for token in batch]


@dataclasses.dataclass
class TokenFile:
    """A tokens file and its sidecar: the signing key and issuer port a later run needs to reuse the tokens."""

    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def load_meta(self) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if self.path.exists() and meta.get("format") == 2 else None

    def save(self, tokens: Sequence[str], key: RSAKey, port: int, expires: int) -> None:
        self.path.write_text("\n".join(tokens) + "\n")
        meta = {"format": 2, "count": len(tokens), "issuer_port": port, "expires": expires, "key": key.as_dict(True)}
        # 0600: the sidecar holds a private key (a throwaway one, but still).
        fd = os.open(self.meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)


def reuse_problem(meta: dict[str, Any] | None, *, needed: int, seconds: float) -> str | None:
    """Why a tokens file cannot be reused for a benchmark of `seconds`, or None if it can.

    Every store the bench spends in is its own and fresh (a new process, or a Redis flushed before each run),
    so tokens spent by an earlier benchmark are never replays: only expiry and count matter.
    """
    if meta is None:
        return "no tokens file with a readable .meta.json sidecar yet"
    if meta["expires"] < time.time() + seconds + 300:
        return "its tokens expire too soon"
    if meta["count"] < needed:
        return f"it holds {meta['count']} tokens and this run needs {needed}"
    return None
