"""The /legacy/ upload proxy: who may upload what, what reaches the upstream index, and what comes back.

The gateway runs from real config files with an [upstream] table and is driven over httpx's ASGI transport; its
tokens are minted for real at /_/oidc/mint-token from the test issuer's ID tokens. The upstream is a real HTTP
server on loopback that records every request it gets, so "nothing was forwarded" is observed, not assumed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from joserfc.jwk import Key
from starlette.types import Receive, Scope, Send

from gateway import config
from gateway.app import create_app
from gateway.mint import generate_key
from gateway.testing import FakeClock, TestIssuer, free_port
from tests.conftest import PUBLISHER, gitlab_issuer, write_config
from tests.test_multipart import BOUNDARY, CLOSE, CONTENT_TYPE, SDIST, fields, part, upload_body

OPERATOR = ("operator", "operator-secret")
TTL = 900
LEEWAY = 30


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeIndex:
    """A real HTTP server on loopback standing for the upstream index: records requests, answers as told."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self.answer = b"OK"
        self.answer_headers: dict[str, str] = {"content-type": "text/plain"}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        self.received.clear()
        self.status, self.answer = 200, b"OK"
        self.answer_headers = {"content-type": "text/plain"}

    async def record(self, scope: Scope, receive: Receive) -> Received:
        """Read the whole request and keep it in `received`."""
        assert scope["type"] == "http"
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        self.received.append(Received(scope["method"], scope["path"], headers, bytes(body)))
        return self.received[-1]

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.record(scope, receive)
        raw = [(name.encode(), value.encode()) for name, value in self.answer_headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.answer})

    def start(self) -> FakeIndex:
        server = self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=0,
                lifespan="off",
                log_config=None,
                log_level="warning",
                http="h11",
                interface="asgi3",
            )
        )
        self._thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "fake index failed to start"
            time.sleep(0.005)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/upload/"

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def _index() -> Iterator[FakeIndex]:
    index = FakeIndex().start()
    yield index
    index.stop()


@pytest.fixture
def index(_index: FakeIndex) -> Iterator[FakeIndex]:
    _index.reset()
    yield _index
    _index.reset()


class Proxy:
    """A gateway with [upstream] configured, over the ASGI transport."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchange = app.state.exchange
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gateway.test")

    async def mint(self, issuer: TestIssuer, **overrides: Any) -> str:
        response = await self.client.post("/_/oidc/mint-token", json={"token": issuer.gitlab_token(**overrides)})
        assert response.status_code == 200, response.text
        return response.json()["token"]  # type: ignore[no-any-return]

    async def upload(
        self,
        password: str | None,
        body: bytes | AsyncIterator[bytes],
        *,
        content_type: str = CONTENT_TYPE,
        username: str = "__token__",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = {"Content-Type": content_type, **(headers or {})}
        if password is not None:
            sent["Authorization"] = basic(username, password)
        return await self.client.post("/legacy/", content=body, headers=sent)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.app.state.upload.aclose()
        await self.exchange.keys.aclose()
        await self.exchange.store.aclose()


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(
    tmp_path: Path, clock: FakeClock, issuer: TestIssuer, index: FakeIndex
) -> AsyncIterator[MakeProxy]:
    made: list[Proxy] = []

    async def make(
        *,
        key: Key | None = None,
        previous: Sequence[Key] = (),
        url: str | None = None,
        max_upload: int | None = None,
        upstream: Sequence[str] = (),
    ) -> Proxy:
        directory = tmp_path / f"gateway-{len(made)}"
        directory.mkdir()
        keys = {"signing_key": write_key(directory / "key.json", key or generate_key())}
        if previous:
            keys["previous_signing_keys"] = [
                write_key(directory / f"previous-{n}.json", old, private=False) for n, old in enumerate(previous)
            ]
        path = write_config(directory, {"gitlab-com": gitlab_issuer(issuer)}, [PUBLISHER], **keys)
        table = [
            "[upstream]",
            f"url = {json.dumps(url or index.url)}",
            f'username = "{OPERATOR[0]}"',
            'password_env = "UPSTREAM_PASSWORD"',
        ]
        if max_upload is not None:
            table.append(f"max_upload = {max_upload}")
        table.extend(upstream)
        path.write_text(path.read_text() + "\n" + "\n".join(table) + "\n")
        settings = config.load(path, {**os.environ, "UPSTREAM_PASSWORD": OPERATOR[1]})
        made.append(Proxy(create_app(settings, clock=clock)))
        return made[-1]

    yield make
    for proxy in made:
        await proxy.aclose()


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


def write_key(path: Path, key: Key, *, private: bool = True) -> str:
    path.write_text(json.dumps(key.as_dict(private=private)))
    return path.name


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def payload(size: int) -> bytes:
    """Deterministic bytes that look random (so they never contain the boundary), `size` long."""
    blocks = (hashlib.sha256(n.to_bytes(8, "big")).digest() for n in range(size // 32 + 1))
    return b"".join(blocks)[:size]


async def chunks(data: bytes, size: int, pulled: list[int]) -> AsyncIterator[bytes]:
    """Yield `data` in pieces, recording how many bytes the server asked for."""
    for start in range(0, len(data), size):
        pulled.append(len(data[start : start + size]))
        yield data[start : start + size]


async def test_upload_is_forwarded_byte_for_byte_with_the_operators_credentials(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A valid upload reaches the upstream unchanged, under the operator's Basic credentials, never the token."""
    token = await proxy.mint(issuer)
    # Larger than the in-memory spool, so the body goes through a temporary file on its way.
    body = fields() + part("content", payload(1536 * 1024), filename=SDIST) + CLOSE
    index.answer = b"stored sampleproject-1.0.0.tar.gz"
    response = await proxy.upload(token, body)
    assert response.status_code == 200, response.text
    assert response.text == "stored sampleproject-1.0.0.tar.gz\n"
    [received] = index.received
    assert (received.method, received.path) == ("POST", "/upload/")
    assert received.body == body
    assert received.headers["content-type"] == CONTENT_TYPE
    assert received.headers["content-length"] == str(len(body))
    assert received.headers["authorization"] == basic(*OPERATOR)
    assert all(token not in value for value in received.headers.values())


async def test_wheel_with_its_signature_and_a_normalized_name_is_forwarded(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """Names are compared PEP 503-normalized, and a wheel goes up together with its detached signature."""
    token = await proxy.mint(issuer)
    # "Sample_Project" normalizes to sample-project, which the publisher's "sampleproject" is not ...
    wheel = "sample_project-1.0.0-py3-none-any.whl"
    body = (
        fields(name="Sample_Project")
        + part("content", b"wheel bytes", filename=wheel)
        + part("gpg_signature", b"signature", filename=wheel + ".asc")
        + CLOSE
    )
    refused = await proxy.upload(token, body)
    assert refused.status_code == 403
    assert "may not upload to project 'Sample_Project'" in refused.text
    # ... while "SampleProject" is the same project as "sampleproject".
    body = body.replace(b"Sample_Project", b"SampleProject").replace(b"sample_project", b"SampleProject")
    response = await proxy.upload(token, body)
    assert response.status_code == 200, response.text
    assert [received.body for received in index.received] == [body]


@pytest.mark.parametrize("size", [1, 7, len(BOUNDARY) + 1])
async def test_upload_in_small_pieces_is_read_the_same(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, size: int
) -> None:
    """Delimiters and headers split across receive() chunks are found: the upload goes through, and the same
    ambiguity is still caught."""
    token = await proxy.mint(issuer)
    body = upload_body(content=payload(3000))
    assert (await proxy.upload(token, chunks(body, size, []))).status_code == 200
    assert [received.body for received in index.received] == [body]
    ambiguous = upload_body(content=f"a\r\n--{BOUNDARY}X\r\nb".encode())
    response = await proxy.upload(token, chunks(ambiguous, size, []))
    assert response.status_code == 400
    assert "ambiguous" in response.text
    assert len(index.received) == 1


async def test_project_outside_the_token_is_refused_and_nothing_is_forwarded(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A token for sampleproject cannot upload another project; the refusal names both, and upstream sees nothing."""
    token = await proxy.mint(issuer)
    body = upload_body(name="requests", filename="requests-2.99.0.tar.gz", version="2.99.0")
    response = await proxy.upload(token, body)
    assert response.status_code == 403
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "this upload token may not upload to project 'requests'; it allows: sampleproject\n"
    assert index.received == []


async def token_of_another_gateway(proxy: Proxy, make_proxy: MakeProxy, issuer: TestIssuer) -> str:
    # Same url and audience, its own signing key: exactly what a second, unrelated gateway would mint.
    other = await make_proxy()
    return await other.mint(issuer)


async def unsigned(proxy: Proxy, make_proxy: MakeProxy, issuer: TestIssuer) -> str:
    genuine = await proxy.mint(issuer)
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": proxy.exchange.signer.kid}).encode())
    return header.rstrip(b"=").decode() + "." + genuine.split(".")[1] + "."


async def gitlab_id_token(proxy: Proxy, make_proxy: MakeProxy, issuer: TestIssuer) -> str:
    return issuer.gitlab_token()


async def tampered(proxy: Proxy, make_proxy: MakeProxy, issuer: TestIssuer) -> str:
    header, claims, signature = (await proxy.mint(issuer)).split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    decoded["projects"] = ["requests", "sampleproject"]
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def garbage(proxy: Proxy, make_proxy: MakeProxy, issuer: TestIssuer) -> str:
    return "pypi-AgEIcHlwaS5vcmcCJDk4"


BAD_TOKENS = [
    pytest.param(token_of_another_gateway, "is not one of the gateway's signing keys", id="signed-by-another-gateway"),
    pytest.param(unsigned, "'none' does not match", id="alg-none"),
    pytest.param(gitlab_id_token, "is not one of the gateway's signing keys", id="gitlab-id-token"),
    pytest.param(tampered, "signature does not verify", id="projects-edited"),
    pytest.param(garbage, "compact JWS", id="not-a-jwt"),
]


@pytest.mark.parametrize(("make", "fragment"), BAD_TOKENS)
async def test_bad_token_is_refused_and_nothing_is_forwarded(
    proxy: Proxy,
    make_proxy: MakeProxy,
    issuer: TestIssuer,
    index: FakeIndex,
    make: Callable[[Proxy, MakeProxy, TestIssuer], Awaitable[str]],
    fragment: str,
) -> None:
    """A password that is not a valid token of this gateway gets 403 with the reason, and upstream sees nothing."""
    token = await make(proxy, make_proxy, issuer)
    response = await proxy.upload(token, upload_body())
    assert response.status_code == 403
    assert response.text.startswith("invalid upload token: ")
    assert fragment in response.text
    assert token not in response.text
    assert index.received == []


async def test_expired_token_is_refused(proxy: Proxy, issuer: TestIssuer, index: FakeIndex, clock: FakeClock) -> None:
    """A minted token works until exp + leeway by the gateway's clock, and is refused as expired after it."""
    token = await proxy.mint(issuer)
    clock.advance(TTL + LEEWAY - 1)
    assert (await proxy.upload(token, upload_body())).status_code == 200
    clock.advance(2)
    response = await proxy.upload(token, upload_body())
    assert response.status_code == 403
    assert "expired" in response.text
    assert len(index.received) == 1


async def test_previous_signing_key_is_accepted_during_rotation(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """After a key rotation, tokens minted with the previous key upload while it is listed, and not once dropped."""
    old, new = generate_key(), generate_key()
    before = await make_proxy(key=old)
    token = await before.mint(issuer)
    rotating = await make_proxy(key=new, previous=[old])
    assert (await rotating.upload(token, upload_body())).status_code == 200
    rotated = await make_proxy(key=new)
    assert (await rotated.upload(token, upload_body())).status_code == 403
    assert len(index.received) == 1


@pytest.mark.parametrize(
    ("authorization", "status", "fragment"),
    [
        pytest.param(None, 401, "username __token__", id="none"),
        pytest.param("Bearer abc.def.ghi", 401, "username __token__", id="bearer"),
        pytest.param(basic("alice", "secret"), 403, "username must be __token__", id="wrong-username"),
        pytest.param("Basic not*base64", 403, "not valid HTTP Basic", id="bad-base64"),
        pytest.param("Basic " + base64.b64encode(b"__token__").decode(), 403, "__token__", id="no-password"),
    ],
)
async def test_missing_or_malformed_credentials_are_refused_before_the_body_is_read(
    proxy: Proxy, index: FakeIndex, authorization: str | None, status: int, fragment: str
) -> None:
    """Without usable Basic credentials the proxy answers from the headers alone: the body is never read."""
    pulled: list[int] = []
    headers = {"Authorization": authorization} if authorization else {}
    response = await proxy.upload(None, chunks(upload_body(), 64, pulled), headers=headers)
    assert response.status_code == status
    assert fragment in response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Basic ")
    assert pulled == []
    assert index.received == []


async def test_oversized_upload_is_refused_without_reading_it_all(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A body past max_upload gets 413 as soon as the limit is crossed; the rest is never read or forwarded."""
    limit = 64 * 1024
    proxy = await make_proxy(max_upload=limit)
    token = await proxy.mint(issuer)
    body = fields() + part("content", payload(3 * limit), filename=SDIST) + CLOSE
    pulled: list[int] = []
    response = await proxy.upload(token, chunks(body, 4096, pulled))
    assert response.status_code == 413
    assert f"limit of {limit} bytes" in response.text
    assert limit < sum(pulled) <= limit + 4096
    assert index.received == []


async def test_declared_oversized_upload_is_refused_before_reading(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A Content-Length over max_upload is refused before a byte of the body is read."""
    proxy = await make_proxy(max_upload=1024)
    token = await proxy.mint(issuer)
    body = upload_body(content=payload(2048))
    pulled: list[int] = []
    response = await proxy.upload(token, chunks(body, 512, pulled), headers={"Content-Length": str(len(body))})
    assert response.status_code == 413
    assert pulled == []
    assert index.received == []


BOTTLE_409 = (
    '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head><title>Error: 409 Conflict</title>'
    '<style type="text/css">html {background-color: #eee;}</style></head><body><h1>Error: 409 Conflict</h1>'
    "<p>Sorry, the requested URL <tt>&#039;{url}&#039;</tt> caused an error:</p>"
    "<pre>Package &#039;sampleproject-1.0.0.tar.gz&#039; already exists!\n</pre></body></html>"
)


@pytest.mark.parametrize(
    ("status", "content_type", "answer", "expected"),
    [
        pytest.param(
            409,
            "text/html; charset=UTF-8",
            BOTTLE_409,
            "the upstream index refused the upload (409): Package 'sampleproject-1.0.0.tar.gz' already exists!",
            id="409-bottle-page",
        ),
        pytest.param(
            400,
            "text/html",
            "<html><body><h1>Invalid distribution</h1><p>See {url}help and https://pypi.org/help/</p></body></html>",
            "the upstream index refused the upload (400): Invalid distribution See <the upstream index> and "
            "https://pypi.org/help/",
            id="400-html-with-urls",
        ),
        pytest.param(
            500,
            "text/plain",
            "Internal index error at {netloc}\r\n\tretry later",
            "the upstream index refused the upload (500): Internal index error at <the upstream index> retry later",
            id="500-text",
        ),
        pytest.param(503, "text/plain", "", "the upstream index refused the upload (503): (no reason)", id="503"),
    ],
)
async def test_upstream_refusal_is_passed_back_as_its_message(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, status: int, content_type: str, answer: str, expected: str
) -> None:
    """The upstream's status comes back with its message as one line of text: no HTML, no upstream address."""
    netloc = httpx.URL(index.url).netloc.decode()
    index.status, index.answer = status, answer.replace("{url}", index.url).replace("{netloc}", netloc).encode()
    index.answer_headers = {"content-type": content_type, "www-authenticate": 'Basic realm="pypi"'}
    response = await proxy.upload(await proxy.mint(issuer), upload_body())
    assert response.status_code == status
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == expected + "\n"
    assert netloc not in response.text and "127.0.0.1" not in response.text
    # The upstream's challenge is for the operator's credentials; passing it on would mislead the uploader.
    assert "www-authenticate" not in response.headers
    assert len(index.received) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_the_operators_credentials_is_a_bad_gateway(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream 401 or 403 is answered 502 saying the gateway's index credentials were refused (not the job's
    token); the upstream's page is not passed on, and the operator's log names the settings to fix."""
    index.status = status
    index.answer = f"<html><title>{status}</title><body>login failed at {index.url}</body></html>".encode()
    index.answer_headers = {"content-type": "text/html", "www-authenticate": 'Basic realm="pypi"'}
    response = await proxy.upload(await proxy.mint(issuer), upload_body())
    assert response.status_code == 502
    assert response.text == (
        f"the upstream index refused this gateway's index credentials ({status}); the upload token is fine, the "
        "gateway's operator must fix [upstream] username and password\n"
    )
    assert "www-authenticate" not in response.headers
    assert "check [upstream] username and password_env" in caplog.text
    assert len(index.received) == 1


async def test_upstream_redirect_is_not_followed_or_passed_on(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """An upstream redirect is reported as 502; the operator's credentials and the body go nowhere else."""
    index.status, index.answer = 301, b""
    index.answer_headers = {"location": "http://elsewhere.invalid/upload/"}
    response = await proxy.upload(await proxy.mint(issuer), upload_body())
    assert response.status_code == 502
    assert "redirect (301)" in response.text
    assert "location" not in response.headers
    assert len(index.received) == 1


async def test_unreachable_upstream_is_a_bad_gateway(make_proxy: MakeProxy, issuer: TestIssuer) -> None:
    """When the upstream index cannot be reached, the uploader gets 502 saying so."""
    proxy = await make_proxy(url=f"http://127.0.0.1:{free_port()}/")
    response = await proxy.upload(await proxy.mint(issuer), upload_body())
    assert response.status_code == 502
    assert response.text == "the upstream index could not be reached\n"


async def test_legacy_route_exists_only_with_an_upstream(gateway: Any) -> None:
    """A gateway without [upstream] has no upload endpoint."""
    response = await gateway.client.post("/legacy/", content=upload_body(), headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(upload_body(content=f"a\r\n--{BOUNDARY}X\r\nb".encode()), "ambiguous", id="ambiguous"),
        pytest.param(upload_body(version="6.1"), "not of the 'version' field's version", id="version-mismatch"),
        pytest.param(
            upload_body().replace(b"application/octet-stream", b"application/octet-stream; charset=utf-7"),
            "bare Content-Type",
            id="charset",
        ),
    ],
)
async def test_malformed_or_ambiguous_upload_is_refused_and_nothing_is_forwarded(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, body: bytes, fragment: str
) -> None:
    """A body the multipart reader refuses (tests/test_multipart.py has them all) gets 400 with the reason as
    plain text, and nothing reaches the upstream."""
    response = await proxy.upload(await proxy.mint(issuer), body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert fragment in response.text
    assert index.received == []


@pytest.mark.parametrize(
    ("content_type", "headers"),
    [
        pytest.param("application/json", {}, id="not-multipart"),
        pytest.param(f"multipart/form-data; boundary={BOUNDARY}; boundary=other", {}, id="two-boundaries"),
        pytest.param(CONTENT_TYPE, {"Content-Encoding": "gzip"}, id="content-encoded"),
    ],
)
async def test_upload_that_is_not_a_plain_multipart_form_is_refused(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, content_type: str, headers: dict[str, str]
) -> None:
    """Only an unencoded multipart/form-data body with one boundary is accepted, as every uploader sends it."""
    response = await proxy.upload(await proxy.mint(issuer), upload_body(), content_type=content_type, headers=headers)
    assert response.status_code == 400
    assert index.received == []


# --- Security review: what the upstream could read differently, and inputs that used to be a 500 ---------------


@pytest.mark.parametrize("special", list("(),/:=?"))
@pytest.mark.parametrize("quoted", [False, True], ids=["bare", "quoted"])
async def test_boundary_with_a_tspecial_is_refused_and_nothing_is_forwarded(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, special: str, quoted: bool
) -> None:
    """A boundary holding one of `( ) , / : = ?` (bottle splits `X,Y` at the comma) is refused with 400."""
    boundary = f"X{special}Y"
    body = upload_body().replace(BOUNDARY.encode(), boundary.encode())
    value = f'"{boundary}"' if quoted else boundary
    response = await proxy.upload(await proxy.mint(issuer), body, content_type=f"multipart/form-data; boundary={value}")
    assert response.status_code == 400, response.text
    assert "multipart/form-data with one boundary parameter" in response.text
    assert index.received == []


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param(f'multipart/form-data; boundary="{BOUNDARY}"', id="quoted"),
        pytest.param(f"multipart/form-data;boundary={BOUNDARY}", id="no-space"),
    ],
)
async def test_forwarded_content_type_is_rebuilt_by_the_gateway(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex, content_type: str
) -> None:
    """The upstream gets `multipart/form-data; boundary=<b>` rebuilt from the parsed boundary, not the client's."""
    response = await proxy.upload(await proxy.mint(issuer), upload_body(), content_type=content_type)
    assert response.status_code == 200, response.text
    assert [received.headers["content-type"] for received in index.received] == [CONTENT_TYPE]


async def test_non_ascii_basic_credentials_are_refused(proxy: Proxy, index: FakeIndex) -> None:
    """Basic credentials that are not ASCII get 403 saying so, not a 500."""
    response = await proxy.client.post(
        "/legacy/",
        content=upload_body(),
        headers={"Content-Type": CONTENT_TYPE, "Authorization": b"Basic \xc3\xa9\xc3\xa9"},
    )
    assert response.status_code == 403
    assert "not valid HTTP Basic credentials" in response.text
    assert index.received == []


async def test_upstream_answer_with_odd_bytes_comes_back_as_clean_text(
    proxy: Proxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """An upstream answer with a non-ASCII Content-Type, invalid UTF-8 and control characters comes back as
    printable plain text, not a 500 and not the raw bytes."""
    index.answer_headers = {"content-type": "text/plain; x=\u20ac"}
    index.answer = b"stored \xff\x1b[31m ok"
    response = await proxy.upload(await proxy.mint(issuer), upload_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "stored \ufffd?[31m ok\n"


async def test_upstream_added_by_a_reload_serves_legacy(
    make_gateway: Any, issuer: TestIssuer, index: FakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/legacy/ answers 404 without [upstream], and forwards uploads once a reload adds one."""
    gateway = await make_gateway({"gitlab-com": gitlab_issuer(issuer)})
    token = (await gateway.mint(issuer.gitlab_token())).json()["token"]
    headers = {"Content-Type": CONTENT_TYPE, "Authorization": basic("__token__", token)}
    assert (await gateway.client.post("/legacy/", content=upload_body(), headers=headers)).status_code == 404
    assert index.received == []

    path = gateway.exchange.settings.config_path
    monkeypatch.setenv("UPSTREAM_PASSWORD", OPERATOR[1])
    table = (
        f'[upstream]\nurl = {json.dumps(index.url)}\nusername = "{OPERATOR[0]}"\npassword_env = "UPSTREAM_PASSWORD"\n'
    )
    path.write_text(path.read_text() + "\n" + table)
    assert await gateway.app.state.reloader.reload()
    try:
        response = await gateway.client.post("/legacy/", content=upload_body(), headers=headers)
    finally:
        await gateway.app.state.upload.aclose()  # make_gateway's teardown does not close the upload client
    assert response.status_code == 200, response.text
    assert [received.headers["authorization"] for received in index.received] == [basic(*OPERATOR)]


# --- Capacity: uploads in progress, and where their bodies wait ----------------------------------------------------


class Held:
    """An upload body sent up to a point, then held until released: an upload in progress, for as long as needed."""

    def __init__(self, body: bytes, hold_at: int) -> None:
        self.body = body
        self.hold_at = hold_at
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body[: self.hold_at]
        self.reached.set()
        await self.release.wait()
        yield self.body[self.hold_at :]


async def test_uploads_past_max_concurrent_get_503_with_retry_after(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """With max_concurrent_uploads uploads in progress, one more is answered 503 with Retry-After before its body is
    read; the uploads in progress finish, and once one has, the next upload goes through."""
    proxy = await make_proxy(upstream=["max_concurrent_uploads = 2"])
    token = await proxy.mint(issuer)
    held = [Held(upload_body(), 100), Held(upload_body(), 100)]
    in_progress = [asyncio.create_task(proxy.upload(token, h.__aiter__())) for h in held]
    for h in held:
        await asyncio.wait_for(h.reached.wait(), 10)

    pulled: list[int] = []
    busy = await proxy.upload(token, chunks(upload_body(), 64, pulled))
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "10"
    assert busy.text == "too many uploads in progress at this gateway replica (its limit is 2); retry in 10 s\n"
    assert pulled == []

    for h in held:
        h.release.set()
    assert [r.status_code for r in await asyncio.gather(*in_progress)] == [200, 200]
    assert (await proxy.upload(token, upload_body())).status_code == 200
    assert len(index.received) == 3


async def test_reload_mid_upload_applies_to_the_next_upload_only(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that lowers max_concurrent_uploads and moves the url while an upload is in progress: that upload
    finishes to the index it started with, and the next one is counted against the new limit."""
    proxy = await make_proxy(upstream=["max_concurrent_uploads = 2"])
    token = await proxy.mint(issuer)
    held = Held(upload_body(), 100)
    in_progress = asyncio.create_task(proxy.upload(token, held.__aiter__()))
    await asyncio.wait_for(held.reached.wait(), 10)

    path = proxy.exchange.settings.config_path
    moved = index.url.replace("/upload/", "/moved/")
    text = path.read_text().replace(f"url = {json.dumps(index.url)}", f"url = {json.dumps(moved)}")
    path.write_text(text.replace("max_concurrent_uploads = 2", "max_concurrent_uploads = 1"))
    monkeypatch.setenv("UPSTREAM_PASSWORD", OPERATOR[1])
    assert await proxy.app.state.reloader.reload()
    busy = await proxy.upload(token, upload_body())
    assert busy.status_code == 503
    assert "(its limit is 1)" in busy.text

    held.release.set()
    assert (await in_progress).status_code == 200
    assert (await proxy.upload(token, upload_body())).status_code == 200
    assert [received.path for received in index.received] == ["/upload/", "/moved/"]


async def test_refused_uploads_free_their_slot(make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex) -> None:
    """An upload refused while in progress (malformed, too large, or its client gone) does not keep its slot."""
    proxy = await make_proxy(max_upload=4096, upstream=["max_concurrent_uploads = 1"])
    token = await proxy.mint(issuer)
    assert (await proxy.upload(token, upload_body(version="6.1"))).status_code == 400
    assert (await proxy.upload(token, upload_body(content=payload(8192)))).status_code == 413
    assert (await proxy.upload(token, upload_body())).status_code == 200
    assert proxy.app.state.upload.active == 0


async def test_client_gone_mid_upload_frees_its_slot_and_forwards_nothing(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex
) -> None:
    """A client that disconnects halfway through its body (as nginx does after client_body_timeout) gets nothing
    forwarded and leaves no upload slot taken."""
    proxy = await make_proxy(upstream=["max_concurrent_uploads = 1"])
    token = await proxy.mint(issuer)
    body = upload_body()
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": body[:100], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # Driven as the server would, because an HTTP client cannot send half a body and vanish through the ASGI
    # transport.
    headers = [(b"content-type", CONTENT_TYPE.encode()), (b"authorization", basic("__token__", token).encode())]
    scope = {"type": "http", "method": "POST", "path": "/legacy/", "headers": headers, "query_string": b""}
    await proxy.app.state.upload(scope, receive, send)
    assert sent == [] and messages == []
    assert proxy.app.state.upload.active == 0
    assert (await proxy.upload(token, body)).status_code == 200
    assert len(index.received) == 1


def open_files_under(directory: Path) -> list[str]:
    """Files this process has open whose path lies in `directory` (deleted temporary files included), from /proc."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see open files")
async def test_large_upload_is_spooled_in_spool_dir(
    make_proxy: MakeProxy, issuer: TestIssuer, index: FakeIndex, tmp_path: Path
) -> None:
    """An upload past the in-memory first MiB is spooled to a file in [upstream] spool_dir, closed afterwards."""
    spool = tmp_path / "spool"
    spool.mkdir()
    proxy = await make_proxy(upstream=[f"spool_dir = {json.dumps(str(spool))}"])
    token = await proxy.mint(issuer)
    body = upload_body(content=payload(1536 * 1024))
    held = Held(body, len(body) - 100)
    uploading = asyncio.create_task(proxy.upload(token, held.__aiter__()))
    await asyncio.wait_for(held.reached.wait(), 10)
    # The transport pulls the held part only when the proxy asks for more, after it spooled the first part.
    assert open_files_under(spool)
    held.release.set()
    assert (await uploading).status_code == 200
    assert [received.body for received in index.received] == [body]
    assert open_files_under(spool) == []


# --- [upstream] config ---------------------------------------------------------------------------------------------


def load_upstream(tmp_path: Path, lines: Sequence[str]) -> config.Upstream:
    path = write_config(tmp_path, {"gitlab-com": {"url": "https://gitlab.com", "kind": "gitlab"}}, [PUBLISHER])
    table = ["[upstream]", 'username = "operator"', 'password_env = "UPSTREAM_PASSWORD"', *lines]
    path.write_text(path.read_text() + "\n" + "\n".join(table) + "\n")
    upstream = config.load(path, {"UPSTREAM_PASSWORD": "secret"}).upstream
    assert upstream is not None
    return upstream


def upstream_problems(tmp_path: Path, lines: Sequence[str]) -> list[str]:
    with pytest.raises(config.ConfigError) as refused:
        load_upstream(tmp_path, lines)
    return list(refused.value.problems)


def test_upstream_defaults(tmp_path: Path) -> None:
    """Without the capacity keys: the system temporary directory, four uploads at a time, https required."""
    upstream = load_upstream(tmp_path, ['url = "https://index.example/legacy/"'])
    assert (upstream.spool_dir, upstream.max_concurrent_uploads, upstream.allow_http) == (None, 4, False)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://[::1]:8080/",
        "http://localhost/",
        "http://127.9.9.9/",
        "https://index.example/",
    ],
)
def test_https_or_loopback_upstream_needs_no_allow_http(tmp_path: Path, url: str) -> None:
    """https anywhere, and plain http to this host's loopback, are accepted as they are."""
    assert load_upstream(tmp_path, [f'url = "{url}"']).url == url


@pytest.mark.parametrize("url", ["http://pypiserver:8080/", "http://10.0.0.5/", "http://index.example/"])
def test_plain_http_to_another_host_is_a_config_error_unless_allowed(tmp_path: Path, url: str) -> None:
    """A plain-http url to a non-loopback host is refused (the index password would travel in clear), unless
    allow_http = true says the network is trusted."""
    problems = upstream_problems(tmp_path, [f'url = "{url}"'])
    assert any("[upstream] url" in p and "allow_http = true" in p and "in clear" in p for p in problems), problems
    assert load_upstream(tmp_path, [f'url = "{url}"', "allow_http = true"]).allow_http is True


def test_spool_dir_is_relative_to_the_config_and_must_be_a_writable_directory(tmp_path: Path) -> None:
    """spool_dir is read relative to issuers.toml; a missing directory is a config error naming it."""
    (tmp_path / "spool").mkdir()
    url = 'url = "https://index.example/"'
    assert load_upstream(tmp_path, [url, 'spool_dir = "spool"']).spool_dir == tmp_path / "spool"
    problems = upstream_problems(tmp_path, [url, 'spool_dir = "missing"'])
    assert problems == [f"issuers.toml: [upstream] spool_dir: {tmp_path / 'missing'} is not a writable directory"]


@pytest.mark.parametrize("value", ["0", "-1", "true", '"4"'])
def test_max_concurrent_uploads_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    """max_concurrent_uploads below 1 or not an integer is a config error."""
    problems = upstream_problems(tmp_path, ['url = "https://index.example/"', f"max_concurrent_uploads = {value}"])
    assert any("[upstream] max_concurrent_uploads" in p for p in problems), problems
