"""`POST /legacy/`: twine's upload API in front of an index that knows nothing of trusted publishing.

The client authenticates with HTTP Basic, username `__token__` and a token this gateway minted as the password,
exactly as it would at PyPI. The token is verified (`gateway.verify`) from the header alone, before a byte of the
body is read. The body is then streamed into a spool file (memory up to `SPOOL_MEMORY`, disk beyond) while a
streaming multipart parser picks out `:action`, `name` and the file names, with the total capped at `[upstream]
max_upload`. Only when the whole upload is in hand, well-formed, and for one of the token's `projects` is it
streamed to the upstream index with the operator's credentials; a refused upload sends nothing upstream.

Twine shows the HTTP status and reason phrase of a refusal (`HTTPError: 403 Forbidden from <url>`), and the body
only with `--verbose`; uvicorn cannot set a custom reason phrase, so the reason is a one-line plain-text body
(and in the gateway's log). The upstream's answers, errors included, are passed back with their status and body.

The upstream index decides from the file names what it stores (pypiserver ignores the `name` field), so each
file's name must be an unambiguous distribution file name of the project in `name`, and the multipart body must
mean the same thing to any parser: see `_Form`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.types import Receive, Scope, Send

from .config import Upstream
from .exchange import Exchange
from .publishers import normalize_project
from .state import upload_refusal
from .verify import InvalidUploadToken, check_project, verify_upload_token

log = logging.getLogger(__name__)

# Bytes of an upload kept in memory before the spool moves to a temporary file.
SPOOL_MEMORY = 1024 * 1024
CHUNK = 64 * 1024
# An upstream's answer is a message for the uploader, not a download: anything longer is cut.
MAX_UPSTREAM_ANSWER = 64 * 1024
# Fields whose values decide where the upload goes; each may appear once, and their values are kept.
DECISIVE = frozenset({":action", "name"})
# The only parts that may carry files: the distribution and its detached signature, as twine sends them.
FILE_FIELDS = frozenset({"content", "gpg_signature"})
MAX_VALUE = 1024

# Exactly what twine (requests-toolbelt), urllib3 and reqwest send, and nothing a parser could read two ways:
# one boundary parameter; one name, one optional filename, both quoted and free of quotes, escapes and `*=`.
# Boundary characters exclude RFC 2045's tspecials (`( ) , / : = ?` among them): a parser that splits the header
# at "," would otherwise read another boundary than ours (bottle, in pypiserver, does) and see other parts.
_CONTENT_TYPE = re.compile(r"multipart/form-data;\s?boundary=(\"?)([0-9A-Za-z'+_.-]{1,70})\1")
_DISPOSITION = re.compile(r'form-data; ?name="([A-Za-z0-9_:.-]{1,100})"(?:; ?filename="([A-Za-z0-9_.+!-]{1,255})")?')
_PART_CONTENT_TYPE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,200}")
# Names the PEP 625 and wheel specs produce: the project part has no "-", so where it ends is never in doubt.
# (pypiserver reads "good-1.0-evil-2.0.tar.gz" as project "good"; a looser rule would read "good-1.0-evil".)
# Versions start with a digit, as pypiserver's own file-name rule assumes ("sampleproject-evil-1.0-..." would be
# project "sampleproject-evil" to it).
_SDIST = re.compile(r"([A-Za-z0-9_.]+)-([0-9][A-Za-z0-9_.+!]*)\.(?:tar\.gz|zip)")
_WHEEL = re.compile(
    r"([A-Za-z0-9_.]+)-([0-9][A-Za-z0-9_.+!]*)(?:-[0-9][A-Za-z0-9_.]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl"
)


class Refused(Exception):
    """An upload the gateway answers itself; `reason` is the one line twine shows with --verbose."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


@dataclass(slots=True)
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray | None = None


class _Form:
    """What a multipart upload says, read incrementally and strictly.

    Strict, because the upstream index parses the same bytes again with its own parser: a body that two parsers
    could split differently could hide a part from this one. So every part header must be one we understand,
    decisive fields appear once, and the boundary string must occur in the body exactly as often as this parser
    found delimiters (once per part, and the closing one); file content never contains it by chance, since
    clients choose random boundaries. Nothing but a CRLF may follow the closing delimiter.
    """

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"--" + boundary
        self.fields: dict[str, str] = {}
        self.files: list[tuple[str, str]] = []
        self.parts = 0
        self.delimiters = 0
        self.ended = False
        self._seen: set[str] = set()
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._close = self.delimiter + b"--"
        self._carry = b""
        self._tail = b""
        self._error: Refused | None = None
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=4,
            max_header_size=1024,
        )

    def feed(self, chunk: bytes) -> None:
        self._count_delimiters(chunk)
        self._tail = (self._tail + chunk)[-len(self._close) - 2 :]
        try:
            # After the closing delimiter the parser discards what it is given; finish() refuses that epilogue.
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise Refused(400, f"the upload is not a well-formed multipart/form-data body ({e})") from None
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        if not self.ended:
            raise Refused(400, "the upload ended before its closing multipart boundary")
        if not (self._tail.endswith(self._close) or self._tail.endswith(self._close + b"\r\n")):
            raise Refused(400, "the upload has data after its closing multipart boundary")
        if self.delimiters != self.parts + 1:
            raise Refused(400, "the multipart boundary string occurs where no part begins; the upload is ambiguous")

    def _count_delimiters(self, chunk: bytes) -> None:
        # The carry is one byte shorter than the delimiter, so each match found here includes a new byte.
        window = self._carry + chunk
        start = window.find(self.delimiter)
        while start != -1:
            self.delimiters += 1
            start = window.find(self.delimiter, start + 1)
        self._carry = window[-(len(self.delimiter) - 1) :]

    def _fail(self, reason: str) -> None:
        # Callbacks cannot raise through the parser cleanly; remember the first problem and stop feeding it.
        if self._error is None:
            self._error = Refused(400, reason)

    def _part_begin(self) -> None:
        self.parts += 1
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = bytes(self._header_name).decode("latin-1").lower()
        value = bytes(self._header_value).decode("latin-1")
        self._header_name.clear()
        self._header_value.clear()
        if name not in ("content-disposition", "content-type") or name in self._part.headers:
            self._fail(f"a part of the upload has an unexpected or repeated {name!r} header")
        self._part.headers[name] = value

    def _headers_finished(self) -> None:
        part = self._part
        disposition = _DISPOSITION.fullmatch(part.headers.get("content-disposition", ""))
        content_type = part.headers.get("content-type")
        if disposition is None or (content_type is not None and not _PART_CONTENT_TYPE.fullmatch(content_type)):
            self._fail('each part needs one Content-Disposition: form-data; name="..." (with a plain filename)')
            return
        part.name, part.filename = disposition.group(1), disposition.group(2)
        if part.name in DECISIVE | FILE_FIELDS:
            if part.name in self._seen:
                self._fail(f"the field {part.name!r} appears more than once")
            self._seen.add(part.name)
        if part.filename is not None:
            if part.name not in FILE_FIELDS:
                self._fail(f"only {', '.join(sorted(FILE_FIELDS))} may carry files, not {part.name!r}")
            self.files.append((part.name, part.filename))
        elif part.name in DECISIVE:
            part.value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        value = self._part.value
        if value is not None:
            value += data[start:end]
            if len(value) > MAX_VALUE:
                self._fail(f"the field {self._part.name!r} is longer than {MAX_VALUE} bytes")
                self._part.value = None

    def _part_end(self) -> None:
        part = self._part
        if part.value is None:
            return
        try:
            self.fields[part.name] = part.value.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"the field {part.name!r} is not UTF-8")

    def _end(self) -> None:
        self.ended = True


def distribution_project(filename: str) -> str | None:
    """The project a wheel or sdist file name belongs to, or None if the name is not unambiguous."""
    match = _WHEEL.fullmatch(filename) or _SDIST.fullmatch(filename)
    return normalize_project(match.group(1)) if match else None


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

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        claims: dict[str, Any] | None = None
        try:
            upstream = self.exchange.settings.upstream
            if upstream is None:
                raise Refused(404, "this gateway has no upload proxy configured ([upstream] in issuers.toml)")
            claims = self._authenticate(headers.get("authorization"))
            # An emergency revocation reaches upload tokens minted before it (gateway.state).
            refusal = await upload_refusal(self.exchange.state, claims)
            if refusal is not None:
                raise Refused(*refusal)
            boundary = self._boundary(headers)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > upstream.max_upload:
                raise Refused(413, f"the upload is larger than this gateway's limit of {upstream.max_upload} bytes")
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
                form = await self._receive(receive, spool, boundary, upstream.max_upload)
                if form is None:
                    return  # the client went away; nothing was forwarded
                project = self._authorize(claims, form)
                spool.seek(0)
                # The Content-Type the gateway parsed by, rebuilt, never the client's own bytes.
                content_type = "multipart/form-data; boundary=" + boundary.decode("ascii")
                await self._forward(send, upstream, spool, content_type, claims, project, form)
        except Refused as e:
            subject = claims.get("sub", "-") if claims else "-"
            log.info("upload refused (%d) for %s: %s", e.status, subject, e.reason)
            await _answer(send, e.status, (e.reason + "\n").encode(), "text/plain; charset=utf-8", e.headers)

    def _authenticate(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not credentials:
            raise Refused(
                401,
                "upload with username __token__ and a token from /_/oidc/mint-token as the password",
                {"WWW-Authenticate": 'Basic realm="gateway upload", charset="UTF-8"'},
            )
        try:
            username, colon, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII input (UnicodeDecodeError is one too)
            raise Refused(403, "the Authorization header is not valid HTTP Basic credentials") from None
        if username != "__token__" or not colon:
            raise Refused(403, "the username must be __token__, with the minted upload token as the password")
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
            raise Refused(403, f"invalid upload token: {e.description}") from None

    @staticmethod
    def _boundary(headers: Mapping[str, str]) -> bytes:
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise Refused(400, "the upload must not be content-encoded")
        match = _CONTENT_TYPE.fullmatch(headers.get("content-type", ""))
        if match is None:
            raise Refused(400, "the upload must be multipart/form-data with one boundary parameter, as twine sends")
        return match.group(2).encode("ascii")

    @staticmethod
    async def _receive(receive: Receive, spool: IO[bytes], boundary: bytes, limit: int) -> _Form | None:
        """Spool and parse the body; None if the client disconnected."""
        form = _Form(boundary)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                # Stop reading here: the rest of an oversized body is never buffered.
                raise Refused(413, f"the upload is larger than this gateway's limit of {limit} bytes")
            form.feed(chunk)
            # Synchronous, but a page-cache write of one ASGI chunk; a thread hop per chunk would cost more.
            spool.write(chunk)
            if not message.get("more_body", False):
                form.finish()
                return form

    @staticmethod
    def _authorize(claims: Mapping[str, Any], form: _Form) -> str:
        action = form.fields.get(":action")
        if action != "file_upload":
            raise Refused(400, f"only ':action' file_upload is supported (got {action!r})")
        project = form.fields.get("name")
        if not project:
            raise Refused(400, "the upload has no 'name' field naming its project")
        try:
            check_project(claims, project)
        except InvalidUploadToken as e:
            raise Refused(403, e.description) from None
        files = dict(form.files)
        if "content" not in files:
            raise Refused(400, "the upload has no 'content' file")
        for name, filename in form.files:
            distribution = filename.removesuffix(".asc") if name == "gpg_signature" else filename
            if name == "gpg_signature" and distribution != files["content"]:
                raise Refused(400, f"the signature {filename!r} is not for {files['content']!r}")
            owner = distribution_project(distribution)
            if owner is None:
                raise Refused(
                    400,
                    f"{distribution!r} is not a wheel or sdist file name as the packaging specs define them "
                    "(the project part normalized, with '_' for '-'; sdists as .tar.gz or .zip)",
                )
            if owner != normalize_project(project):
                raise Refused(400, f"the file {distribution!r} is not a distribution of project {project!r}")
        return project

    async def _forward(
        self,
        send: Send,
        upstream: Upstream,
        spool: IO[bytes],
        content_type: str,
        claims: Mapping[str, Any],
        project: str,
        form: _Form,
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
        files = ", ".join(filename for _, filename in form.files)
        try:
            response = await self.client.send(request, stream=True)
            try:
                answer = await _read_capped(response, MAX_UPSTREAM_ANSWER)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            log.warning("upload of %s for %s: the upstream index timed out", files, claims.get("sub"))
            raise Refused(504, f"the upstream index did not answer within {upstream.timeout:g} s") from None
        except httpx.HTTPError as e:
            log.warning("upload of %s for %s: the upstream index failed: %r", files, claims.get("sub"), e)
            raise Refused(502, "the upstream index could not be reached") from None
        status = response.status_code
        if 300 <= status < 400:
            # Never passed on: twine would report the upstream's address, and a redirect is a config problem.
            log.warning(
                "upstream answered an upload with a redirect (%d); set [upstream] url to the upload URL", status
            )
            raise Refused(
                502, f"the upstream index answered with a redirect ({status}), which the gateway does not follow"
            )
        if status in (401, 403):
            log.warning(
                "upstream refused the gateway's credentials (%d): check [upstream] username and password", status
            )
        log.info("upload of %s (project %s) for %s: upstream answered %d", files, project, claims.get("sub"), status)
        content_type = response.headers.get("content-type", "text/plain; charset=utf-8")
        if not _PART_CONTENT_TYPE.fullmatch(content_type):
            content_type = "application/octet-stream"  # the upstream's own header, not sane ASCII: not passed on
        await _answer(send, status, answer, content_type, {})


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


async def _answer(send: Send, status: int, body: bytes, content_type: str, headers: Mapping[str, str]) -> None:
    raw = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
