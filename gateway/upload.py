"""`POST /legacy/`: twine's upload API in front of an index that knows nothing of trusted publishing.

The client authenticates with HTTP Basic, username `__token__` and a token this gateway minted as the password,
exactly as it would at PyPI. The token is verified (`gateway.verify`) from the header alone, before a byte of the
body is read. At most `[upstream] max_concurrent_uploads` uploads are in progress in this process; one more is
answered 503 with Retry-After, before its body is read. The body is then streamed into a spool file in
`[upstream] spool_dir` (memory up to `SPOOL_MEMORY`, disk beyond) while `gateway.multipart` reads it strictly,
with the total capped at `[upstream] max_upload`. Only when the whole upload is in hand, well-formed, and for one
of the token's `projects` is it streamed to the upstream index with the operator's credentials; a refused upload
sends nothing upstream.

Refusals are `UploadError`s (`gateway.errors`); `routes.py` answers them with a one-line plain-text body, because
twine shows the HTTP status and reason phrase (`HTTPError: 403 Forbidden from <url>`), and the body only with
`--verbose`; uvicorn cannot set a custom reason phrase. The upstream's answers come back with their status, and
as text: an HTML error page is reduced to its message, and the upstream's own address is never shown (the job
has no business with internal URLs). The upstream refusing the operator's credentials (401, 403) is answered 502:
the job's token is fine, the gateway's index login is not, and the operator's log says so.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from html.parser import HTMLParser
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
from starlette.types import Receive, Scope, Send

from .config import Upstream
from .errors import (
    NoUpstream,
    RevocationsUnavailable,
    UploadError,
    UploadForbidden,
    UploadsBusy,
    UploadTooLarge,
    UploadUnauthenticated,
    UpstreamCredentials,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)
from .exchange import Exchange
from .multipart import Form, Upload, boundary_of
from .state import upload_refusal
from .verify import InvalidUploadToken, check_project, verify_upload_token

__all__ = ["RETRY_AFTER", "UploadProxy", "upstream_text"]

log = logging.getLogger(__name__)

# Bytes of an upload kept in memory before the spool moves to a file in spool_dir.
SPOOL_MEMORY = 1024 * 1024
CHUNK = 64 * 1024
# An upstream's answer is a message for the uploader, not a download: anything longer is cut.
MAX_UPSTREAM_ANSWER = 64 * 1024
# What the uploader is shown of it, at most.
MAX_UPSTREAM_TEXT = 1000
# Seconds a client refused for too many uploads in progress is asked to wait.
RETRY_AFTER = 10
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")


class UploadProxy:
    """The ASGI app behind `POST /legacy/`; one httpx client to the upstream, closed by `aclose`."""

    def __init__(self, exchange: Exchange, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.exchange = exchange
        # No redirects: an upload re-sent to wherever a response points would carry the operator's credentials.
        # trust_env=False: proxies and CA files from the environment must not silently change whom we trust.
        self.client = httpx.AsyncClient(
            transport=transport,
            verify=ssl.create_default_context(),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": "gateway (trusted publishing upload proxy)"},
        )
        # Uploads in progress in this process (see [upstream] max_concurrent_uploads).
        self.active = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one upload; refusals are raised as `UploadError` for routes.py to answer."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        claims: dict[str, Any] | None = None
        try:
            upstream = self.exchange.settings.upstream
            if upstream is None:
                raise NoUpstream("this gateway has no upload proxy configured ([upstream] in issuers.toml)")
            claims = self._authenticate(headers.get("authorization"))
            # An emergency revocation reaches upload tokens minted before it (gateway.state).
            refusal = await upload_refusal(self.exchange.state, claims)
            if refusal is not None:
                status, reason = refusal
                raise UploadForbidden(reason) if status == 403 else RevocationsUnavailable(reason)
            boundary = boundary_of(headers.get("content-type", ""), headers.get("content-encoding", "identity"))
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > upstream.max_upload:
                raise UploadTooLarge(f"the upload is larger than this gateway's limit of {upstream.max_upload} bytes")
            # Counted rather than a semaphore: a reload may change the limit while uploads are in progress.
            if self.active >= upstream.max_concurrent_uploads:
                log.warning("upload refused: %d uploads in progress (max_concurrent_uploads)", self.active)
                raise UploadsBusy(
                    f"too many uploads in progress at this gateway replica (its limit is "
                    f"{upstream.max_concurrent_uploads}); retry in {RETRY_AFTER} s",
                    RETRY_AFTER,
                )
            self.active += 1
            try:
                await self._spool_and_forward(receive, send, upstream, boundary, claims)
            finally:
                self.active -= 1
        except UploadError as e:
            subject = claims.get("sub", "-") if claims else "-"
            log.info("upload refused (%d %s) for %s: %s", e.status, e.code, subject, e.description)
            raise

    async def _spool_and_forward(
        self, receive: Receive, send: Send, upstream: Upstream, boundary: bytes, claims: Mapping[str, Any]
    ) -> None:
        spool_dir = str(upstream.spool_dir) if upstream.spool_dir is not None else None
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=spool_dir) as spool:
            form = await self._receive(receive, spool, boundary, upstream.max_upload)
            if form is None:
                return  # the client went away; nothing was forwarded
            upload = form.upload()
            try:
                check_project(claims, upload.project)
            except InvalidUploadToken as e:
                raise UploadForbidden(e.description) from None
            # The Content-Type the gateway parsed by, rebuilt, never the client's own bytes.
            content_type = "multipart/form-data; boundary=" + boundary.decode("ascii")
            await self._forward(send, upstream, spool, content_type, claims, upload)

    def _authenticate(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not credentials:
            raise UploadUnauthenticated(
                "upload with username __token__ and a token from /_/oidc/mint-token as the password"
            )
        try:
            username, colon, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII input (UnicodeDecodeError is one too)
            raise UploadForbidden("the Authorization header is not valid HTTP Basic credentials") from None
        if username != "__token__" or not colon:
            raise UploadForbidden("the username must be __token__, with the minted upload token as the password")
        settings = self.exchange.settings
        try:
            return verify_upload_token(
                password,
                self.exchange.signer.jwks,
                issuer=settings.url,
                audience=settings.audience,
                leeway=settings.leeway,
                now=self.exchange.clock(),
            )
        except InvalidUploadToken as e:
            raise UploadForbidden(f"invalid upload token: {e.description}") from None

    @staticmethod
    async def _receive(receive: Receive, spool: IO[bytes], boundary: bytes, limit: int) -> Form | None:
        """Spool and parse the body; None if the client disconnected."""
        form = Form(boundary)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                # Stop reading here: the rest of an oversized body is never buffered.
                raise UploadTooLarge(f"the upload is larger than this gateway's limit of {limit} bytes")
            form.feed(chunk)
            # Synchronous, but a page-cache write of one ASGI chunk; a thread hop per chunk would cost more.
            spool.write(chunk)
            if not message.get("more_body", False):
                form.finish()
                return form

    async def _forward(
        self,
        send: Send,
        upstream: Upstream,
        spool: IO[bytes],
        content_type: str,
        claims: Mapping[str, Any],
        upload: Upload,
    ) -> None:
        size = spool.seek(0, 2)
        spool.seek(0)

        async def body() -> AsyncIterator[bytes]:
            while chunk := spool.read(CHUNK):
                yield chunk

        request = self.client.build_request(
            "POST",
            upstream.url,
            content=body(),
            # The Content-Type with the boundary the gateway parsed by: the bytes are forwarded unchanged. An explicit
            # Content-Length, because not every index accepts a chunked upload.
            headers={
                "Content-Type": content_type,
                "Content-Length": str(size),
                "Authorization": _basic(upstream.username, upstream.password),
            },
            timeout=upstream.timeout,
        )
        files = ", ".join(filename for _, filename in upload.files)
        subject = claims.get("sub")
        try:
            response = await self.client.send(request, stream=True)
            try:
                answer = await _read_capped(response, MAX_UPSTREAM_ANSWER)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            log.warning("upload of %s for %s: the upstream index timed out", files, subject)
            raise UpstreamTimeout(f"the upstream index did not answer within {upstream.timeout:g} s") from None
        except httpx.HTTPError as e:
            log.warning("upload of %s for %s: the upstream index failed: %r", files, subject, e)
            raise UpstreamError("the upstream index could not be reached") from None
        status = response.status_code
        log.info("upload of %s (project %s) for %s: upstream answered %d", files, upload.project, subject, status)
        if 300 <= status < 400:
            # Never passed on: twine would report the upstream's address, and a redirect is a config problem.
            log.warning(
                "upstream answered an upload with a redirect (%d); set [upstream] url to the upload URL", status
            )
            raise UpstreamError(
                f"the upstream index answered with a redirect ({status}), which the gateway does not follow"
            )
        if status in (401, 403):
            # The operator's login, not the job's token: a 403 passed on would send the job's owner hunting in the
            # wrong place.
            log.warning(
                "upstream refused the gateway's credentials (%d): check [upstream] username and password_env", status
            )
            raise UpstreamCredentials(
                f"the upstream index refused this gateway's index credentials ({status}); the upload token is "
                "fine, the gateway's operator must fix [upstream] username and password"
            )
        text = upstream_text(answer, response.headers.get("content-type", ""), upstream.url)
        if status >= 400:
            raise UpstreamRefused(status, f"the upstream index refused the upload ({status}): {text or '(no reason)'}")
        body_text = (text + "\n").encode() if text else b""
        raw = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body_text)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body_text})


def upstream_text(body: bytes, content_type: str, upstream_url: str) -> str:
    """What an index's answer says, as one line of text for the uploader: an HTML page reduced to its message (the
    `<pre>` of a bottle error page, else its text), whitespace collapsed, the index's own address left out."""
    text = body.decode("utf-8", "replace")
    if "html" in content_type.lower() or text.lstrip()[:1] == "<":
        page = _Text()
        page.feed(text)
        page.close()
        text = " ".join(page.pre) or " ".join(page.text)
    origin = urlsplit(upstream_url)
    host = (origin.hostname or "").lower()

    def scrub(match: re.Match[str]) -> str:
        try:
            internal = (urlsplit(match.group(0)).hostname or "").lower() == host
        except ValueError:
            internal = True
        return "<the upstream index>" if internal else match.group(0)

    text = _URL.sub(scrub, text)
    if origin.netloc:
        text = re.sub(re.escape(origin.netloc), "<the upstream index>", text, flags=re.IGNORECASE)
    text = " ".join(text.split())
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable[:MAX_UPSTREAM_TEXT]


class _Text(HTMLParser):
    """The visible text of an HTML page, and separately that of its `<pre>` elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.pre: list[str] = []
        self._skip = 0
        self._in_pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "title", "head"):
            self._skip += 1
        elif tag == "pre":
            self._in_pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "title", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag == "pre":
            self._in_pre = max(0, self._in_pre - 1)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._in_pre:
            self.pre.append(data)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)
