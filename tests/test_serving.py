"""The HTTP protocol of `gateway serve`: uvicorn's httptools protocol with each answer leaving in one write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.serving import FLUSH_BYTES, OneWriteHttpToolsProtocol, _OneWrite
from gateway.testing import free_port


class RecordingTransport(asyncio.Transport):
    """Records what reaches the socket layer: a fake, because the number of write() calls is what is tested."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_writes_of_one_pass_leave_as_one() -> None:
    """Headers and body written in one event-loop pass reach the transport as a single write, in order."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    one.write(b"{}")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


async def test_close_writes_what_is_held_first() -> None:
    """A close in the same pass (uvicorn's 400 answers, Connection: close) sends the held bytes before closing."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    one.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    one.close()
    assert (transport.writes, transport.closed) == ([b"HTTP/1.1 400 Bad Request\r\n\r\n"], True)
    await asyncio.sleep(0)
    assert len(transport.writes) == 1


async def test_large_writes_are_not_held() -> None:
    """Past FLUSH_BYTES the held bytes go out at once, so a streamed body never piles up in the wrapper."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    for _ in range(4):
        one.write(b"x" * (FLUSH_BYTES // 2))
    assert [len(w) for w in transport.writes] == [FLUSH_BYTES, FLUSH_BYTES]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for n in range(50):
            await send({"type": "http.response.body", "body": b"%05d" % n * 4000, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """uvicorn with the gateway's protocol on a loopback port, stopped after the test."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=OneWriteHttpToolsProtocol, log_config=None)
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve())
    while not instance.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


async def test_real_server_answers_keep_alive_head_and_streams(server: str) -> None:
    """Over real sockets: answers on one kept-alive connection, a HEAD, and a 1 MB chunked stream arrive whole."""
    async with httpx.AsyncClient(base_url=server) as client:
        for _ in range(3):
            response = await client.get("/")
            assert (response.status_code, response.json()) == (200, {"ok": True})
        head = await client.head("/")
        assert (head.status_code, head.content) == (200, b"")
        stream = await client.get("/stream")
        assert stream.content == b"".join(b"%05d" % n * 4000 for n in range(50))
