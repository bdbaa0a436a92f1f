"""Throwaway Redis deployments on loopback ports: one server, a Sentinel-watched pair, a three-primary cluster.

Each is the bench's own, nothing persisted, flushed before every run, and stopped at the end: no jti spent by one
run is remembered by the next, so every run can reuse the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import redis

from gateway.testing import free_port

from .servers import stop_process, tail

__all__ = ["KINDS", "RedisStore", "start_store"]

KINDS = ("redis", "sentinel", "cluster")
SENTINEL_SERVICE = "bench"
# The cluster create and the sentinels' first look at the primary take a few seconds on a busy machine.
START_TIMEOUT = 30.0


@dataclasses.dataclass
class RedisStore:
    """A running Redis deployment: the URL the gateway is given, the data nodes to flush, every process to meter."""

    kind: str  # one of KINDS
    url: str
    # What the peer (plain redis-py, one SET NX) connects to: the primary, or None when it has no such mode.
    plain_url: str | None
    data_nodes: list[str]  # redis:// URLs of the primaries
    pids: list[int]
    version: str

    def flush(self) -> None:
        """Forget everything: the previous run's spent jtis (and cached key sets) with it."""
        for url in self.data_nodes:
            with redis.Redis.from_url(url, socket_timeout=5) as client:
                client.flushall()

    @property
    def description(self) -> str:
        shape = {
            "redis": "one server",
            "sentinel": "a primary, a replica and 3 sentinels",
            "cluster": "3 primaries, no replicas",
        }[self.kind]
        return f"Redis {self.version}, {shape}: {self.url}"


@contextlib.contextmanager
def start_store(kind: str, directory: Path) -> Iterator[RedisStore]:
    """Start the deployment `kind` names in `directory`, wait until it serves, stop it on the way out."""
    directory.mkdir()
    with contextlib.ExitStack() as stack:

        def server(name: str, *extra: str) -> tuple[int, int]:
            port = _cluster_port() if kind == "cluster" else free_port()
            proc = _redis_server(stack, directory, name, port, *extra)
            return port, proc

        if kind == "redis":
            port, pid = server("redis")
            url = _url(port)
            version = _wait(url, [pid])
            yield RedisStore(kind, url, url, [url], [pid], version)
        elif kind == "sentinel":
            primary, primary_pid = server("primary")
            _, replica_pid = server("replica", "--replicaof", "127.0.0.1", str(primary))
            version = _wait(_url(primary), [primary_pid])
            _wait_until(lambda: _replicas(_url(primary)) >= 1, "the replica did not sync with the primary")
            sentinels, pids = [], [primary_pid, replica_pid]
            for index in range(3):
                port = free_port()
                conf = directory / f"sentinel-{index}.conf"
                # Sentinels rewrite their config file, so each needs its own, writable.
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 2\n"
                    f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 5000\n"
                )
                pids.append(_start(stack, directory, f"sentinel-{index}", ["redis-server", str(conf), "--sentinel"]))
                sentinels.append(port)
            for port in sentinels:
                _wait_until(functools.partial(_sentinel_knows, port), f"sentinel on {port} did not find the primary")
            hosts = ",".join(f"127.0.0.1:{port}" for port in sentinels)
            yield RedisStore(
                kind, f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}", _url(primary), [_url(primary)], pids, version
            )
        elif kind == "cluster":
            nodes = [
                server(f"node-{index}", "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{index}.conf")
                for index in range(3)
            ]
            version = _wait(_url(nodes[0][0]), [pid for _, pid in nodes])
            for port, _ in nodes[1:]:
                _wait(_url(port), [pid for _, pid in nodes])
            create = [
                "redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port, _ in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ]  # fmt: skip
            done = subprocess.run(create, capture_output=True, text=True, cwd=directory, timeout=START_TIMEOUT)
            if done.returncode != 0:
                raise SystemExit(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            for port, _ in nodes:
                _wait_until(functools.partial(_cluster_ok, port), f"cluster node {port} did not reach state ok")
            urls = [_url(port) for port, _ in nodes]
            hosts = ",".join(f"127.0.0.1:{port}" for port, _ in nodes)
            yield RedisStore(kind, f"redis+cluster://{hosts}", None, urls, [pid for _, pid in nodes], version)
        else:
            raise ValueError(f"unknown store {kind!r}")


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, so at most 55,535) is free too."""
    for _ in range(100):
        port = random.randrange(20_000, 55_535)  # noqa: S311 -- a port number, not a secret
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise SystemExit("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _redis_server(stack: contextlib.ExitStack, directory: Path, name: str, port: int, *extra: str) -> int:
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", *extra]
    return _start(stack, directory, name, command)


def _start(stack: contextlib.ExitStack, directory: Path, name: str, command: Sequence[str]) -> int:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        # cwd is the temp dir, so that nothing (cluster node files, sentinel rewrites) lands in the checkout.
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    # SIGTERM is redis-server's clean shutdown; with --save "" it writes nothing on the way out.
    stack.callback(stop_process, proc, signal.SIGTERM)
    stack.callback(lambda: None if proc.poll() in (None, 0) else print(f"{name}: {tail(log)}"))
    return proc.pid


def _wait(url: str, pids: Sequence[int]) -> str:
    """Wait until Redis at `url` answers, and return its version."""
    with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return str(client.info("server").get("redis_version", "?"))
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"Redis at {url} did not answer: {e}") from None
            time.sleep(0.1)


def _wait_until(ready: Callable[[], bool], problem: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(redis.RedisError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise SystemExit(problem)
        time.sleep(0.2)


def _replicas(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=1) as client:
        info = client.info("replication")
    return sum(1 for key, value in info.items() if key.startswith("slave") and value.get("state") == "online")


def _sentinel_knows(port: int) -> bool:
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
        master = client.execute_command("SENTINEL", "MASTER", SENTINEL_SERVICE)
        replicas = client.execute_command("SENTINEL", "REPLICAS", SENTINEL_SERVICE)
    return bool(master) and len(replicas) >= 1


def _cluster_ok(port: int) -> bool:
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
        info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text
