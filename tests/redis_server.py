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
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

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
        options: dict[str, str] | None = None,
        tls_names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.tls = tls
        # The names its TLS certificate is issued for.
        self.tls_names = tls_names
        self.unix = unix
        # Further redis-server options (replicaof, cluster-enabled, appendonly, ...), over the defaults.
        self.options = options or {}
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
            leaf = self.tls.issue_cert(*self.tls_names)
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
        return options | self.options

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
            context = ssl.create_default_context(cafile=str(self.ca_path))
            # Only whether it answers: a certificate for other names is some tests' point.
            context.check_hostname = False
            return context.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise

    def client(self) -> redis.Redis:
        """A plain synchronous client for inspecting the server from a test (not the code under test)."""
        # No host name check: some tests give a server a certificate for other names on purpose.
        return redis.Redis.from_url(self.url, socket_timeout=5, **({"ssl_check_hostname": False} if self.tls else {}))

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


REDIS_CLI = shutil.which("redis-cli")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _info(server: RedisServer, section: str) -> dict[str, Any]:
    try:
        with server.client() as client:
            return dict(client.info(section))
    except redis.RedisError:
        return {}


def wait_replicas(primary: RedisServer, replicas: int, timeout: float = 20.0) -> None:
    """Wait until `replicas` replicas are connected to `primary` and in sync."""

    def synced() -> bool:
        info = _info(primary, "replication")
        states = [value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
        return int(info.get("connected_slaves", 0)) >= replicas and all(s.get("state") == "online" for s in states)

    _wait_for(synced, f"{replicas} replica(s) of the primary on port {primary.port}", timeout)


class SentinelServer:
    """One `redis-server --sentinel` on 127.0.0.1, watching the service SERVICE, with failover timings cut to
    about a second (production keeps more: a slow network must not look like a dead primary). With `tls`, it
    speaks TLS to the data nodes (and plain TCP to clients)."""

    SERVICE = "mymaster"

    def __init__(
        self,
        primary_port: int,
        *,
        quorum: int = 2,
        password: str | None = None,
        down_after: int = 1000,
        tls: trustme.CA | None = None,
    ) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="gateway-sentinel-"))
        self.primary_port = primary_port
        self.quorum = quorum
        self.password = password
        # Milliseconds without an answer before a primary counts as down: shorter fails over sooner, but on a
        # loaded machine a busy (not dead) primary then gets failed over too.
        self.down_after = down_after
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SentinelServer:
        assert REDIS_SERVER is not None
        # Sentinel rewrites its config file as it learns the topology: a file of its own, in its own directory.
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {self.directory}",
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after}",
            f"sentinel failover-timeout {self.SERVICE} 2000",
            f"sentinel parallel-syncs {self.SERVICE} 2",
            *([f"requirepass {self.password}"] if self.password else []),
        ]
        if self.tls is not None:
            (self.directory / "ca.pem").write_bytes(self.tls.cert_pem.bytes())
            leaf = self.tls.issue_cert("127.0.0.1")
            leaf.private_key_pem.write_to_path(str(self.directory / "key.pem"))
            (self.directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            lines += [
                "tls-replication yes",
                f"tls-cert-file {self.directory / 'cert.pem'}",
                f"tls-key-file {self.directory / 'key.pem'}",
                f"tls-ca-cert-file {self.directory / 'ca.pem'}",
            ]
        conf = self.directory / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        log = (self.directory / "sentinel.log").open("ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait_for(lambda: self.master() is not None, f"sentinel on port {self.port}", timeout)
        return self

    def master(self) -> dict[str, Any] | None:
        """What this sentinel knows of the primary (None while it does not answer)."""
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1) as client:
                state: dict[str, Any] = client.sentinel_master(self.SERVICE)
                return state
        except redis.RedisError:
            return None

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


class _Deployment:
    """Several processes started together: a context manager that stops every one of them, also when starting
    them failed halfway."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelSet(_Deployment):
    """One primary, `replicas` replicas and `sentinels` sentinels on loopback: what Redis Sentinel looks like in
    production, in miniature. `url` is what an operator puts in `redis_url`.

    Use as a context manager (everything is killed on exit). `primary` is the server the sentinels currently
    name; `kill_primary()` SIGKILLs it, and `wait_promoted()` waits until the sentinels promoted a replica.
    """

    def __init__(
        self,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        sentinel_password: str | None = None,
        tls: trustme.CA | None = None,
        tls_names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        options = {"repl-diskless-sync-delay": "0", **({"tls-replication": "yes"} if tls else {})}
        self.servers = [RedisServer(tls=tls, tls_names=tls_names, options=options)]
        self.servers += [
            RedisServer(
                tls=tls, tls_names=tls_names, options=options | {"replicaof": f"127.0.0.1 {self.servers[0].port}"}
            )
            for _ in range(replicas)
        ]
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.sentinels = [
            SentinelServer(self.servers[0].port, quorum=sentinels // 2 + 1, password=sentinel_password, tls=tls)
            for _ in range(sentinels)
        ]

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        if self.tls is not None:
            return f"rediss+sentinel://{nodes}/{SentinelServer.SERVICE}/0?ssl_ca_certs={self.servers[0].ca_path}"
        return f"redis+sentinel://{nodes}/{SentinelServer.SERVICE}/0"

    @property
    def primary(self) -> RedisServer:
        for sentinel in self.sentinels:
            state = sentinel.master()
            if state is not None:
                return next(server for server in self.servers if server.port == int(state["port"]))
        raise RuntimeError("no sentinel answers")

    def start(self, timeout: float = 20.0) -> SentinelSet:
        for server in self.servers:
            server.start()
        wait_replicas(self.servers[0], len(self.servers) - 1, timeout)
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_stable(self.servers[0], timeout=timeout)
        return self

    def wait_stable(self, primary: RedisServer | None = None, timeout: float = 20.0) -> RedisServer:
        """Wait until every live sentinel names one primary (`primary`, if given), with no failover under way, and
        every live replica is connected to it; return it."""
        others = len(self.sentinels) - 1
        live = sum(1 for server in self.servers if server.process is not None) - 1
        agreed: list[RedisServer] = []

        def stable() -> bool:
            states = [sentinel.master() for sentinel in self.sentinels if sentinel.process is not None]
            if any(state is None for state in states):
                return False
            ports = {int(state["port"]) for state in states if state is not None}
            if len(ports) != 1 or (primary is not None and ports != {primary.port}):
                return False
            if any(
                state["flags"] != "master" or int(state["num-other-sentinels"]) != others
                for state in states
                if state is not None
            ):
                return False
            (port,) = ports
            server = next(s for s in self.servers if s.port == port)
            info = _info(server, "replication")
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < live:
                return False
            agreed[:] = [server]
            return True

        _wait_for(stable, "the sentinels to agree on one primary with its replicas", timeout)
        return agreed[0]

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (as a crash would) and return it."""
        old = self.primary
        old.stop()
        return old

    def wait_promoted(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until the sentinels have promoted a replica in place of `old`, and return it."""
        _wait_for(lambda: self._promoted(old) is not None, "a replica to be promoted", timeout)
        promoted = self._promoted(old)
        assert promoted is not None
        return promoted

    def _promoted(self, old: RedisServer) -> RedisServer | None:
        for sentinel in self.sentinels:
            state = sentinel.master()
            if state is None or int(state["port"]) == old.port:
                continue
            server = next(s for s in self.servers if s.port == int(state["port"]))
            if _info(server, "replication").get("role") == "master":
                return server
        return None

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a port, and free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class ClusterSet(_Deployment):
    """A Redis Cluster of `primaries` primaries (no replicas) on loopback ports, made with
    `redis-cli --cluster create`. `url` is what an operator puts in `redis_url`; a context manager."""

    def __init__(self, primaries: int = 3, *, tls: trustme.CA | None = None) -> None:
        self.tls = tls
        self.servers = [
            RedisServer(
                _cluster_port(),
                tls=tls,
                options={
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": "1000",
                    **({"tls-cluster": "yes", "tls-replication": "yes"} if tls else {}),
                },
            )
            for _ in range(primaries)
        ]

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        if self.tls is not None:
            return f"rediss+cluster://{nodes}?ssl_ca_certs={self.servers[0].ca_path}"
        return f"redis+cluster://{nodes}"

    def start(self, timeout: float = 30.0) -> ClusterSet:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not installed")
        for server in self.servers:
            server.start()
        subprocess.run(
            [
                REDIS_CLI,
                *(["--tls", "--cacert", str(self.servers[0].ca_path)] if self.tls else []),
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        _wait_for(
            lambda: all(self._cluster_info(s).get("cluster_state") == "ok" for s in self.servers),
            "the cluster to be ok",
            timeout,
        )
        return self

    @staticmethod
    def _cluster_info(server: RedisServer) -> dict[str, Any]:
        try:
            with server.client() as client:
                text = client.execute_command("CLUSTER", "INFO").decode()
        except redis.RedisError:
            return {}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def flush(self) -> None:
        """Delete every key on every primary."""
        for server in self.servers:
            with server.client() as client:
                client.flushall()

    def client(self) -> redis.RedisCluster:
        """A synchronous cluster client for inspecting from a test (not the code under test)."""
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.servers[0].ca_path)} if self.tls else {}
        return redis.RedisCluster(host="127.0.0.1", port=self.servers[0].port, socket_timeout=5, **tls)

    def close(self) -> None:
        for server in self.servers:
            server.close()
