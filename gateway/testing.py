"""A real HTTPS OIDC issuer that behaves like GitLab, for tests, benchmarks and demos."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import json
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trustme
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeyParameters, RSAKey
from joserfc.jws import JWSRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "DELETE",
    "FakeClock",
    "TestIssuer",
    "free_port",
    "oct_jwk",
    "weak_rsa_jwk",
]


class _Sentinel(enum.Enum):
    DELETE = "DELETE"

    def __repr__(self) -> str:
        return self.value


# An override set to DELETE removes the member instead of setting it.
DELETE: Final = _Sentinel.DELETE

DISCOVERY = "discovery"
JWKS = "jwks"

_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

# GitLab guesses a deployment tier from the environment name; first match wins.
_TIERS = [
    ("development", re.compile(r"dev|review|trunk", re.I)),
    ("testing", re.compile(r"test|tst|int|ac(ce)?pt|qa|qc|control|quality", re.I)),
    ("staging", re.compile(r"st(a)?g|mod(e)?l|pre|demo|non", re.I)),
    ("production", re.compile(r"pr(o)?d|live", re.I)),
]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _merge(base: dict[str, Any], overrides: Mapping[str, object]) -> dict[str, Any]:
    out = dict(base)
    for name, value in overrides.items():
        if value is DELETE:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def _tier(environment: str) -> str:
    for tier, pattern in _TIERS:
        if pattern.search(environment):
            return tier
    return "other"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rsa_key(size: int, kid: str | None) -> RSAKey:
    params: KeyParameters = {"use": "sig", "alg": "RS256"}
    if kid is not None:
        params["kid"] = kid
    # Undersized keys are a deliberate test fixture, not a mistake to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return RSAKey.generate_key(size, parameters=params, auto_kid=True)


def weak_rsa_jwk(bits: int = 1024, *, kid: str | None = None) -> dict[str, Any]:
    numbers = rsa.generate_private_key(65537, bits).public_key().public_numbers()

    def enc(n: int) -> str:
        return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big")).decode()

    return {
        "kty": "RSA",
        "kid": kid or f"weak-rsa-{bits}",
        "use": "sig",
        "alg": "RS256",
        "n": enc(numbers.n),
        "e": enc(numbers.e),
    }


def oct_jwk(secret: bytes | None = None, *, kid: str | None = None) -> dict[str, Any]:
    return {
        "kty": "oct",
        "kid": kid or "oct",
        "alg": "HS256",
        "k": _b64(secret or b"shared-secret-for-tests").decode(),
    }


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class TestIssuer:
    __test__ = False

    def __init__(self, path: str = "", *, ca: trustme.CA | None = None, key_size: int = 2048) -> None:
        path = path.rstrip("/")
        if path and not path.startswith("/"):
            path = "/" + path
        self.path = path
        self.ca = ca or trustme.CA()
        self.discovery_path = f"{path}/.well-known/openid-configuration"
        self.jwks_path = f"{path}/oauth/discovery/keys"

        self._lock = threading.Lock()
        self._keys: dict[str, RSAKey] = {}
        self._published: list[str] = []
        self.requests: list[str] = []
        self.signing_kid = self.add_key(size=key_size)

        self.reset()

        self._dir: Path | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halted = asyncio.Event()
        self._port: int | None = None
        self._app = Starlette(
            routes=[
                Route(self.discovery_path, self._discovery_endpoint),
                Route(self.jwks_path, self._jwks_endpoint),
            ]
        )

    def reset(self) -> None:
        # Misbehaviour knobs, read by the server thread on every request.
        self.discovery_overrides: dict[str, object] = {}
        self.discovery_override: object | None = None
        self.extra_jwks: list[dict[str, Any]] = []
        self.jwks_override: object | None = None
        self.status: int | None = None
        self.redirect_to: str | None = None
        self.oversize: int | None = None
        self.trickle: float | None = None
        self.delay: float = 0.0
        self.paths_misbehave: set[str] | None = None
        self.reset_counts()

    def start(self) -> TestIssuer:
        if self._thread is not None:
            raise RuntimeError("issuer already started")
        self._dir = Path(tempfile.mkdtemp(prefix="gateway-issuer-"))
        self.ca_path.write_bytes(self.ca.cert_pem.bytes())
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(self._dir / "key.pem"))
        (self._dir / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))

        config = uvicorn.Config(
            self._asgi,
            host="127.0.0.1",
            port=0,
            ssl_keyfile=self._dir / "key.pem",
            ssl_certfile=self._dir / "cert.pem",
            http="h11",
            ws="none",
            interface="asgi3",
            proxy_headers=False,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._halted = asyncio.Event()
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        thread.start()

        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                self._server = self._thread = None
                shutil.rmtree(self._dir, ignore_errors=True)
                raise RuntimeError("test issuer failed to start")
            time.sleep(0.005)
        self._port = server.servers[0].sockets[0].getsockname()[1]
        return self

    async def _serve(self) -> None:
        assert self._server is not None
        self._loop = asyncio.get_running_loop()
        await self._server.serve()

    def stop(self) -> None:
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None:
            return
        # Graceful shutdown waits for in-flight responses, so cut slow ones short first.
        if loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._halt)
        server.should_exit = True
        thread.join(timeout=10)
        self._server = self._thread = self._loop = None
        self._port = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if thread.is_alive():
            raise RuntimeError("test issuer did not stop")

    def _halt(self) -> None:
        assert self._server is not None
        # Abort before waking sleepers so that they find the client already gone.
        for conn in list(self._server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        self._halted.set()

    def __enter__(self) -> TestIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("issuer is not running")
        return self._port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}{self.path}"

    @property
    def ca_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("issuer is not running")
        return self._dir / "ca.pem"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    @property
    def discovery_count(self) -> int:
        with self._lock:
            return self.requests.count(self.discovery_path)

    @property
    def jwks_count(self) -> int:
        with self._lock:
            return self.requests.count(self.jwks_path)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def add_key(self, *, size: int = 2048, kid: str | None = None, publish: bool = True) -> str:
        key = _rsa_key(size, kid)
        new_kid = key.kid
        assert new_kid is not None
        with self._lock:
            if new_kid in self._keys:
                raise ValueError(f"duplicate kid {new_kid!r}")
            self._keys[new_kid] = key
            if publish:
                self._published.append(new_kid)
        return new_kid

    def rotate(self, *, size: int = 2048) -> str:
        self.signing_kid = self.add_key(size=size)
        return self.signing_kid

    def retire(self, kid: str) -> None:
        # The private key stays so tests can still sign with a retired key.
        with self._lock:
            self._published.remove(kid)

    def publish(self, kid: str) -> None:
        with self._lock:
            if kid not in self._keys:
                raise KeyError(kid)
            if kid not in self._published:
                self._published.append(kid)

    @property
    def kids(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    @property
    def published_kids(self) -> list[str]:
        with self._lock:
            return list(self._published)

    def private_key(self, kid: str | None = None) -> RSAKey:
        with self._lock:
            return self._keys[kid or self.signing_kid]

    def public_pem(self, kid: str | None = None) -> bytes:
        return self.private_key(kid).as_pem(private=False)

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = [dict(self._keys[kid].as_dict(private=False)) for kid in self._published]
        return {"keys": keys + list(self.extra_jwks)}

    def discovery(self) -> dict[str, Any]:
        url = self.url
        doc: dict[str, Any] = {
            "issuer": url,
            "authorization_endpoint": f"{url}/oauth/authorize",
            "token_endpoint": f"{url}/oauth/token",
            "userinfo_endpoint": f"{url}/oauth/userinfo",
            "jwks_uri": f"{url}/oauth/discovery/keys",
            "scopes_supported": ["openid"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        return _merge(doc, self.discovery_overrides)

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        kid: str | None = None,
        header: Mapping[str, object] | None = None,
        alg: str = "RS256",
        secret: bytes | None = None,
    ) -> str:
        kid = kid or self.signing_kid
        protected: dict[str, object] = {"alg": alg, "kid": kid, "typ": "JWT"}
        for name, value in (header or {}).items():
            if value is None or value is DELETE:
                protected.pop(name, None)
            else:
                protected[name] = value
        # Serialised by hand rather than via joserfc.jws so that tests can send headers
        # joserfc itself would refuse to produce (unknown crit, non-string kid, "none").
        return self.sign_raw(_json(protected), _json(claims), kid=kid, alg=alg, secret=secret)

    def sign_raw(
        self,
        header: bytes,
        payload: bytes,
        *,
        kid: str | None = None,
        alg: str = "RS256",
        secret: bytes | None = None,
    ) -> str:
        signing_input = _b64(header) + b"." + _b64(payload)
        if alg == "none":
            signature = b""
        elif alg in _HMAC:
            if secret is None:
                raise ValueError(f"{alg} needs secret=")
            signature = hmac.new(secret, signing_input, _HMAC[alg]).digest()
        else:
            model = JWSRegistry.algorithms.get(alg)
            if model is None or model.key_type != "RSA":
                raise ValueError(f"unsupported alg {alg!r}")
            signature = model.sign(signing_input, self.private_key(kid))
        return (signing_input + b"." + _b64(signature)).decode("ascii")

    def gitlab_claims(
        self,
        *,
        project_path: str | _Sentinel = "group/project",
        ref: str | _Sentinel = "main",
        ref_type: str | _Sentinel = "branch",
        workflow: str = ".gitlab-ci.yml",
        environment: str | None = None,
        now: int | None = None,
        **overrides: object,
    ) -> dict[str, Any]:
        project = project_path if isinstance(project_path, str) else "group/project"
        branch = ref if isinstance(ref, str) else "main"
        kind = ref_type if isinstance(ref_type, str) else "branch"
        namespace = project.rpartition("/")[0]
        ref_path = f"refs/{'tags' if kind == 'tag' else 'heads'}/{branch}"
        sha = "a3f1c9e07b52d48e6f0c2b9d17e4a85c3b6d0f92"
        now = int(time.time()) if now is None else now

        claims: dict[str, Any] = {
            "namespace_id": "12885807",
            "namespace_path": namespace,
            "project_id": "61254376",
            "project_path": project,
            "user_id": "4183920",
            "user_login": "alice",
            "user_email": "alice@example.com",
            "user_access_level": "maintainer",
            # GitLab 18.4+: the project the job runs in, which differs from project_*
            # only for merge request pipelines from forks.
            "job_project_id": "61254376",
            "job_project_path": project,
            "job_namespace_id": "12885807",
            "job_namespace_path": namespace,
            "pipeline_id": "1873420561",
            "pipeline_source": "push",
            "job_id": "10092837465",
            "ref": branch,
            "ref_type": kind,
            "ref_path": ref_path,
            "ref_protected": "true",
        }
        if environment is not None:
            claims |= {
                "environment": environment,
                "environment_protected": "false",
                "deployment_tier": _tier(environment),
                "environment_action": "start",
            }
        claims |= {
            "job_source": "push",
            "runner_id": 12270835,
            "runner_environment": "gitlab-hosted",
            "sha": sha,
            "project_visibility": "public",
            "ci_config_ref_uri": f"{self.host}{self.path}/{project}//{workflow}@{ref_path}",
            "ci_config_sha": sha,
            "jti": str(uuid.uuid4()),
            "iss": self.url,
            "iat": now,
            # GitLab backdates nbf by five seconds to absorb clock skew.
            "nbf": now - 5,
            "exp": now + 300,
            "sub": f"project_path:{project}:ref_type:{kind}:ref:{branch}",
            "aud": "pypi",
        }
        dropped = {"project_path": project_path, "ref": ref, "ref_type": ref_type}
        overrides = {**{k: DELETE for k, v in dropped.items() if v is DELETE}, **overrides}
        return _merge(claims, overrides)

    def gitlab_token(self, *, kid: str | None = None, **overrides: Any) -> str:
        return self.sign(self.gitlab_claims(**overrides), kid=kid)

    def github_claims(
        self,
        *,
        repository: str = "octo-org/sample-kit",
        ref: str = "refs/heads/main",
        workflow_file: str = "release.yml",
        environment: str | None = None,
        event_name: str = "push",
        now: int | None = None,
        **overrides: object,
    ) -> dict[str, Any]:
        """A GitHub Actions ID token's claims as github.com sends them, with `iss` set to this issuer.

        `workflow_file` is the file in .github/workflows/; the `workflow` claim is the display name.
        """
        sha = "5f3c2a9d8e7b6a1c0f4e3d2c1b0a9f8e7d6c5b4a"
        now = int(time.time()) if now is None else now
        workflow_ref = f"{repository}/.github/workflows/{workflow_file}@{ref}"
        pull_request = event_name in ("pull_request", "pull_request_target")
        # GitHub builds the default sub from the environment, else the pull request, else the ref.
        if environment is not None:
            sub = f"repo:{repository}:environment:{environment}"
        elif pull_request:
            sub = f"repo:{repository}:pull_request"
        else:
            sub = f"repo:{repository}:ref:{ref}"
        claims: dict[str, Any] = {
            "actor": "octocat",
            "actor_id": "583231",
            "aud": "pypi",
            # Empty strings, not absent, outside pull request events.
            "base_ref": "main" if pull_request else "",
            "check_run_id": "41872364510",
        }
        if environment is not None:
            claims |= {"environment": environment, "environment_node_id": "EN_kwDOK2fLcM8AAAABkL3xYg"}
        claims |= {
            "event_name": event_name,
            "exp": now + 300,
            "head_ref": "contributor-patch" if pull_request else "",
            "iat": now,
            "iss": self.url,
            # Without a reusable workflow, the job's workflow is the run's workflow.
            "job_workflow_ref": workflow_ref,
            "job_workflow_sha": sha,
            "jti": str(uuid.uuid4()),
            # GitHub backdates nbf by five minutes.
            "nbf": now - 300,
            "ref": ref,
            "ref_protected": "true",
            "ref_type": "tag" if ref.startswith("refs/tags/") else "branch",
            "repository": repository,
            "repository_id": "728105936",
            "repository_owner": repository.partition("/")[0],
            "repository_owner_id": "91482733",
            "repository_visibility": "public",
            "run_attempt": "1",
            "run_id": "12688012345",
            "run_number": "42",
            "runner_environment": "github-hosted",
            "sha": sha,
            "sub": sub,
            "workflow": "Release",
            "workflow_ref": workflow_ref,
            "workflow_sha": sha,
        }
        return _merge(claims, overrides)

    def github_token(self, *, kid: str | None = None, **overrides: Any) -> str:
        return self.sign(self.github_claims(**overrides), kid=kid)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            with self._lock:
                self.requests.append(scope["path"])
        await self._app(scope, receive, send)

    async def _discovery_endpoint(self, request: Request) -> Response:
        body = self.discovery_override
        return await self._respond(DISCOVERY, self.discovery() if body is None else body)

    async def _jwks_endpoint(self, request: Request) -> Response:
        body = self.jwks_override
        return await self._respond(JWKS, self.jwks() if body is None else body)

    async def _respond(self, name: str, doc: object) -> Response:
        # bytes and str go out untouched so tests can serve deliberately broken JSON.
        if isinstance(doc, bytes):
            body = doc
        elif isinstance(doc, str):
            body = doc.encode()
        else:
            body = _json(doc)
        only = self.paths_misbehave
        if only is not None and name not in only:
            return Response(body, media_type="application/json")

        if self.delay > 0:
            await self._nap(self.delay)
        status = self.status
        if self.redirect_to is not None:
            code = status if status is not None and 300 <= status < 400 else 302
            return Response(status_code=code, headers={"location": self.redirect_to})
        if self.oversize is not None and len(body) < self.oversize:
            body += b" " * (self.oversize - len(body))
        status = 200 if status is None else status
        if status in (204, 304) or status < 200:
            body = b""
        if self.trickle is not None:
            # Content-Length up front, so only the clock can stop a client from reading on.
            return StreamingResponse(
                self._drip(body, self.trickle),
                status_code=status,
                media_type="application/json",
                headers={"content-length": str(len(body))},
            )
        return Response(body, status_code=status, media_type="application/json")

    async def _drip(self, body: bytes, interval: float) -> AsyncIterator[bytes]:
        for i in range(len(body)):
            if await self._nap(interval):
                yield body[i:]
                return
            yield body[i : i + 1]

    async def _nap(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._halted.wait(), seconds)
        except TimeoutError:
            return False
        return True
