"""The HTTP protocol of `gateway serve`: uvicorn's httptools protocol with each answer leaving in one write.

The protocol's own tests run real uvicorn servers (in a thread, on asyncio's loop and on uvloop, as `gateway serve`
does) and talk raw HTTP/1.1 to them over loopback sockets: keep-alive, pipelining, bodies in pieces, 100 Continue,
Connection: close, the keep-alive timeout, streams, and what reaches the wire when.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send

from gateway.serving import OneWriteHttpToolsProtocol, _OneWrite
from gateway.testing import free_port

# The _OneWrite wrapper alone: how many writes reach the transport is what is tested, so the transport records them.


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


async def test_head_and_body_leave_as_one_write() -> None:
    """An answer's head waits for its body; the two reach the transport as a single write, in order."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []
    one.write(b"{}")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    assert len(transport.writes) == 1


async def test_a_lone_head_leaves_after_the_pass() -> None:
    """A head with no body written in the same pass of the event loop is not held any longer than that."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    one.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]


async def test_close_writes_what_is_held_first() -> None:
    """A close in the same pass (uvicorn's 400 answers, Connection: close) sends the held bytes before closing."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    one.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    one.close()
    assert (transport.writes, transport.closed) == ([b"HTTP/1.1 400 Bad Request\r\n\r\n"], True)
    await asyncio.sleep(0)
    assert len(transport.writes) == 1


async def test_never_more_than_one_write_is_held() -> None:
    """A stream's chunks are never held back more than one write or one pass of the event loop."""
    transport = RecordingTransport()
    one = _OneWrite(transport, asyncio.get_running_loop())
    for n in range(5):
        one.write(b"%d" % n)
    assert transport.writes == [b"01", b"23"]
    await asyncio.sleep(0)
    assert transport.writes == [b"01", b"23", b"4"]


# Real servers


BIG = 80 * 65536


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    body = b""
    more_body = True
    while more_body:
        message = await receive()
        body += message.get("body", b"")
        more_body = message.get("more_body", False)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for n in range(50):
            await send({"type": "http.response.body", "body": b"%05d" % n * 4000, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/big":
        # Far more than the socket buffers hold: the transport pauses writing until the client reads.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % BIG)]})
        for n in range(BIG // 65536):
            await send({"type": "http.response.body", "body": bytes([n]) * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow-body":
        # The head must not wait for a body that comes later.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"late"})
        return
    if path == "/slow":
        await asyncio.sleep(1.5)
    answer = b"%s %s %d %s" % (scope["method"].encode(), path.encode(), len(body), body[:20])
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def running(asgi: Any, loop: str, **options: Any) -> Iterator[int]:
    """uvicorn with the gateway's protocol in a thread, on `loop` ("asyncio" or "uvloop"); yields its port."""
    port = free_port()
    config = uvicorn.Config(
        asgi, host="127.0.0.1", port=port, http=OneWriteHttpToolsProtocol, log_config=None, lifespan="off", **options
    )
    server = uvicorn.Server(config)
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    def run() -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


Serve = Callable[..., contextlib.AbstractContextManager[int]]


@pytest.fixture(params=["asyncio", "uvloop"])
def serve(request: pytest.FixtureRequest) -> Serve:
    """Starts the test app (or another) under uvicorn with the gateway's protocol, on both event loops."""
    return lambda asgi=app, **options: running(asgi, request.param, **options)


@pytest.fixture
def port(serve: Serve) -> Iterator[int]:
    with serve() as port:
        yield port


class Connection:
    """A raw HTTP/1.1 client connection that reads answers as they come, byte for byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {self.buffer!r}")
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, *, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        head = self.read_until(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
        if head_only:
            body = b""
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while size := int(self.read_until(b"\r\n")[:-2], 16):
                body += self.read_exactly(size)
                self.read_exactly(2)
            self.read_exactly(2)
        else:
            body = self.read_exactly(int(headers.get(b"content-length", b"0")))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection (EOF) with nothing more sent."""
        return not self.buffer and not self._fill()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[[int], Connection]]:
    opened: list[Connection] = []

    def connect(port: int) -> Connection:
        opened.append(Connection(port))
        return opened[-1]

    yield connect
    for connection in opened:
        connection.close()


def request(method: str, path: str, body: bytes = b"", *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_keep_alive_head_and_stream(port: int, connect: Callable[[int], Connection]) -> None:
    """Answers on one kept-alive connection, a HEAD, and a 1 MB chunked stream arrive whole and in order."""
    client = connect(port)
    for n in range(3):
        client.send(request("POST", "/", b"body %d" % n))
        status, headers, body = client.response()
        assert (status, headers[b"content-type"], body) == (200, b"text/plain", b"POST / 6 body %d" % n)
        assert headers[b"date"].endswith(b" GMT")
    client.send(request("HEAD", "/"))
    status, headers, body = client.response(head_only=True)
    assert (status, headers[b"content-length"], body) == (200, b"9", b"")
    client.send(request("GET", "/stream"))
    assert client.response()[2] == b"".join(b"%05d" % n * 4000 for n in range(50))


def test_answer_is_one_segment(port: int, connect: Callable[[int], Connection]) -> None:
    """The head and the body of an answer reach the client together (one write, so one segment on loopback)."""
    client = connect(port)
    for _ in range(5):
        client.send(request("POST", "/", b"x"))
        first = client.sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nPOST / 1 x"), first


def test_a_slow_reader_gets_a_large_answer_whole(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    client.send(request("GET", "/big") + request("GET", "/"))
    time.sleep(0.5)
    assert client.response()[2] == b"".join(bytes([n]) * 65536 for n in range(BIG // 65536))
    assert client.response()[2] == b"GET / 0 "


def test_pipelined_requests_are_answered_in_order(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    client.send(b"".join(request("POST", f"/{n}", b"%d" % n) for n in range(5)))
    for n in range(5):
        assert client.response()[2] == b"POST /%d 1 %d" % (n, n)


def test_body_in_several_pieces(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    body = b"0123456789" * 30_000  # past uvicorn's 64 KiB high-water mark: reading pauses and resumes
    client.send(request("PUT", "/pieces", body)[: -len(body)])
    for start in range(0, len(body), 70_000):
        client.send(body[start : start + 70_000])
        time.sleep(0.02)
    assert client.response()[2] == b"PUT /pieces 300000 01234567890123456789"


def test_expect_100_continue(port: int, connect: Callable[[int], Connection]) -> None:
    """The interim 100 Continue is sent when the app asks for the body, not held back waiting for the answer."""
    client = connect(port)
    client.send(request("POST", "/", b"", "Expect: 100-continue").replace(b"Length: 0", b"Length: 5"))
    assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    assert client.response()[2] == b"POST / 5 hello"


def test_head_is_not_held_for_a_late_body(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    client.send(request("GET", "/slow-body"))
    started = time.monotonic()
    head = client.read_until(b"\r\n\r\n")
    assert time.monotonic() - started < 0.4 and head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.read_exactly(4) == b"late"


def test_connection_close(port: int, connect: Callable[[int], Connection]) -> None:
    """Connection: close, from the client or from the app, is answered and then the server closes."""
    client = connect(port)
    client.send(request("GET", "/", b"", "Connection: close"))
    status, headers, body = client.response()
    assert (status, headers[b"connection"], body) == (200, b"close", b"GET / 0 ")
    assert client.closed_by_server()
    client = connect(port)
    client.send(request("GET", "/close"))
    assert client.response()[1][b"connection"] == b"close"
    assert client.closed_by_server()


def test_http_1_0_closes(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    client.send(b"GET /old HTTP/1.0\r\n\r\n")
    assert client.response()[2] == b"GET /old 0 "
    assert client.closed_by_server()


def test_bad_request_is_answered_400_and_closed(port: int, connect: Callable[[int], Connection]) -> None:
    client = connect(port)
    client.send(b"NOT HTTP AT ALL\r\n\r\n")
    assert client.response()[0] == 400
    assert client.closed_by_server()


def closed_after(client: Connection) -> float:
    """Seconds until the server closes the connection."""
    started = time.monotonic()
    assert client.closed_by_server()
    return time.monotonic() - started


def test_keep_alive_timeout_closes_an_idle_connection(serve: Serve, connect: Callable[[int], Connection]) -> None:
    with serve(timeout_keep_alive=1) as port:
        client = connect(port)
        client.send(request("GET", "/"))
        client.response()
        assert 0.8 < closed_after(client) < 1.5


def test_keep_alive_timeout_counts_from_the_last_answer(serve: Serve, connect: Callable[[int], Connection]) -> None:
    """A connection in use for longer than the timeout stays open; it closes a timeout after its last answer."""
    with serve(timeout_keep_alive=1) as port:
        client = connect(port)
        for _ in range(6):
            client.send(request("GET", "/"))
            client.response()
            time.sleep(0.4)
        assert 0.4 < closed_after(client) < 1.1  # 0.6 s of the 1 s were slept above


def test_keep_alive_timeout_does_not_cut_a_slow_answer(serve: Serve, connect: Callable[[int], Connection]) -> None:
    """A request that takes longer than the timeout is answered; the timeout then counts from its answer."""
    with serve(timeout_keep_alive=1) as port:
        client = connect(port)
        client.send(request("GET", "/"))
        client.response()
        time.sleep(0.5)
        client.send(request("GET", "/slow"))  # answered 1.5 s later: past the first answer's deadline
        assert client.response()[2] == b"GET /slow 0 "
        assert 0.8 < closed_after(client) < 1.5
