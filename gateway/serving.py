"""The HTTP protocol `gateway serve` runs uvicorn with: uvicorn's httptools protocol, one write per answer.

uvicorn writes a response's status line and headers as soon as the app starts the response, and its body as a
second write: two send() calls, two TCP segments, two wake-ups of the client for every mint. Here an answer's
first write (its head) is held, and leaves together with the next write, or when the answer is complete, or when
the connection closes or changes protocol, or at the latest at the end of the event loop's current pass (an app
that starts a response and then waits for something still has its head sent at once). Nothing else changes:
later writes go straight to the transport, so ordering, flow control and memory are uvicorn's own.

Every instruction here runs once or more per request (a mint costs ~1.4M instructions, the HTTP layer about a
tenth of that), so the code is written to be cheap: `python -m bench.callgrind server` counts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["OneWriteHttpToolsProtocol"]

# A keep-alive timer firing this close to its deadline closes the connection rather than being re-armed for the
# rest (timers have a millisecond's resolution on uvloop).
KEEP_ALIVE_SLACK = 0.01


class _OneWrite(asyncio.Transport):
    """A transport whose first write waits for the next one, so an answer's head and body leave as one write.

    Every method of a transport is spelled out (no `__getattr__`): a class with `__getattr__` makes each attribute
    lookup on its instances slower, and a miss (`is_closing`) raise and catch an AttributeError, ~10k
    instructions per request in all.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        # asyncio.Transport.__init__ is not called: get_extra_info is the real transport's.
        self._transport = transport
        self._loop = loop
        self._held: bytes | bytearray | memoryview | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = data
            # If nothing else sends it first (an app that waits between a response's start and its body, a
            # 100 Continue), it leaves after this pass of the event loop; flush() then has nothing left to do.
            self._loop.call_soon(self.flush)
        else:
            self._held = None
            self._transport.writelines((held, data))  # one send(), no copy on uvloop

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.flush()
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None  # abort() drops what is buffered, by definition
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (0 if self._held is None else len(self._held))

    # The rest is the real transport's.

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with answers in one write and a keep-alive timer that is not re-armed per request.

    uvicorn cancels its keep-alive timer when data arrives and arms a new one (`call_later`) after every answer:
    ~6k instructions per request. Here data arriving only marks the connection busy, an answer marks it idle
    since now, and one timer per connection checks when it fires: idle for `timeout_keep_alive` closes the
    connection as uvicorn would, idle for less re-arms it for the rest, busy leaves it to the next answer to arm.
    """

    _idle_since: float | None = None  # the loop's time when the last answer completed; None while a request is in

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Only writes go through the wrapper; FlowControl keeps the real transport (pause and resume reading).
        self.transport = _OneWrite(transport, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this when data arrives (and when an answer completes, before arming a new timer).
        self._idle_since = None

    def on_response_complete(self) -> None:
        # The answer's last write was just made: send it now, with its head if that is still held.
        self.transport.flush()  # type: ignore[attr-defined]
        if self.pipeline or self.transport.is_closing():
            # The next pipelined request starts, or the connection is going: uvicorn's own handling.
            super().on_response_complete()
            return
        self.server_state.total_requests += 1
        self.flow.resume_reading()  # reading may have been paused for a large body or a pipelined request
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return  # a request is in; its answer arms the timer again
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > KEEP_ALIVE_SLACK:
            self.timeout_keep_alive_task = self.loop.call_later(left, self.timeout_keep_alive_handler)
        else:
            super().timeout_keep_alive_handler()  # closes the connection
