"""The HTTP protocol `gateway serve` runs uvicorn with: uvicorn's httptools protocol, one write per answer.

uvicorn writes a response's status line and headers as soon as the app starts the response, and its body as a
second write: two send() calls, two TCP segments, two wake-ups of the client for every mint. Here a connection's
writes wait until the end of the event loop's current pass and go out as one; the mint endpoint sends its
headers and body in that one pass. Nothing else changes: a connection closing, changing protocol, or holding more
than `FLUSH_BYTES` writes what it holds first, so ordering, flow control and memory are uvicorn's own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["OneWriteHttpToolsProtocol"]

# Past this, held writes go out at once: a streamed body never piles up here instead of in the transport's buffer.
FLUSH_BYTES = 64 * 1024


class _OneWrite:
    """A transport whose writes of one event-loop pass reach the real transport as one write."""

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held, self._held_bytes = [], 0
        if not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause_reading, abort, ...) is the real transport's.
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Only writes go through the wrapper; FlowControl keeps the real transport (pause and resume reading).
        self.transport = _OneWrite(transport, self.loop)  # type: ignore[assignment]
