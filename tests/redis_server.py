"""A real, throwaway `redis-server` for tests that need to kill, restart or freeze Redis.

Not a test module: the test files build their fixtures on `RedisServer`. Each server listens on loopback on a port
of its own, persists nothing, and keeps that port across `stop()`/`start()`, so a client built once sees "the same
Redis" come back, as it would after a crash and restart in production.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from gateway.testing import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One `redis-server` process on 127.0.0.1, on a fixed free port, started and stopped at will."""

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        log = (self.directory / "redis.log").open("ab")
        # Nothing persisted and loopback only: the process and its memory are all there is.
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.directory),
            "protected-mode": "no",
        }
        args = [REDIS_SERVER] + [part for name, value in options.items() for part in (f"--{name}", value)]
        self.process = subprocess.Popen(args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.directory}/redis.log")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Kill the server outright (SIGKILL), as a crash would; the port is kept for `start()`."""
        process, self.process = self.process, None
        if process is None:
            return
        if self.paused:
            # A stopped process still dies from SIGKILL, but resume it so nothing is left frozen if it did not.
            process.send_signal(signal.SIGCONT)
            self.paused = False
        process.kill()
        process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are still accepted by the kernel but nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        """A plain synchronous client for inspecting the server from a test (not the code under test)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
