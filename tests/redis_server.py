"""A real, throwaway `redis-server` for tests that need to kill, restart or freeze Redis.

Not a test module: the test files build their fixtures on `RedisServer`. Each server listens on loopback on a port
of its own, persists nothing, and keeps that port across `stop()`/`start()`, so a client built once sees "the same
Redis" come back, as it would after a crash and restart in production.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import trustme

from gateway.testing import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One `redis-server` process on 127.0.0.1, on a fixed free port, started and stopped at will.

    With `tls`, it speaks only TLS (certificate from that CA); with `unix`, it listens only on a Unix socket.
    """

    def __init__(
        self,
        port: int | None = None,
        directory: Path | None = None,
        *,
        tls: trustme.CA | None = None,
        unix: bool = False,
    ) -> None:
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.tls = tls
        self.unix = unix
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def url(self) -> str:
        """The URL an operator would put in `redis_url` (redis-py syntax)."""
        if self.unix:
            return f"unix://{self.socket_path}?db=0"
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _options(self) -> dict[str, str]:
        # Nothing persisted and loopback only: the process and its memory are all there is.
        options = {"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
        options |= {"dir": str(self.directory), "protected-mode": "no"}
        if self.unix:
            options |= {"port": "0", "unixsocket": str(self.socket_path), "unixsocketperm": "700"}
        if self.tls is not None:
            self.ca_path.write_bytes(self.tls.cert_pem.bytes())
            leaf = self.tls.issue_cert("127.0.0.1", "localhost")
            leaf.private_key_pem.write_to_path(str(self.directory / "key.pem"))
            (self.directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            # TLS only: the plain port is off, so a client that is not speaking TLS cannot get through.
            options |= {
                "port": "0",
                "tls-port": str(self.port),
                "tls-cert-file": str(self.directory / "cert.pem"),
                "tls-key-file": str(self.directory / "key.pem"),
                "tls-ca-cert-file": str(self.ca_path),
                "tls-auth-clients": "no",
            }
        return options

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        log = (self.directory / "redis.log").open("ab")
        options = self._options()
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
            with self._connect() as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _connect(self) -> socket.socket:
        if self.unix:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                raw.settimeout(0.5)
                raw.connect(str(self.socket_path))
            except BaseException:
                raw.close()
                raise
            return raw
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if self.tls is None:
            return raw
        try:
            return ssl.create_default_context(cafile=str(self.ca_path)).wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise

    def client(self) -> redis.Redis:
        """A plain synchronous client for inspecting the server from a test (not the code under test)."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

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
