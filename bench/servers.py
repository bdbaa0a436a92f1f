"""The processes under test and what they talk to: the HTTPS issuer, `gateway serve`, the peer, their configs."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from joserfc.jwk import RSAKey

from gateway.mint import generate_key
from gateway.testing import TestIssuer

from .tokens import public_jwk

__all__ = [
    "AUDIENCE",
    "ISSUER_NAME",
    "LIVEZ_PATH",
    "MINT_PATH",
    "port_is_free",
    "start_gateway",
    "start_issuer",
    "start_peer",
    "stop_process",
    "tail",
    "time_load",
    "warm_up",
    "write_config",
]

ISSUER_NAME = "gitlab-com"
AUDIENCE = "pypi"
MINT_PATH = "/_/oidc/mint-token"
LIVEZ_PATH = "/livez"
# The other publishers spread over this many groups (a publishers file of a real index spans many owners).
PUBLISHER_GROUPS = 1000
# Fresh processes the load is timed in; the best is reported (the others are the machine's noise).
LOAD_REPEAT = 3


class _PinnedIssuer(TestIssuer):
    """A TestIssuer on a chosen port: reused tokens name the old port in `iss`, so the issuer must be there again.

    TestIssuer always binds port 0 and has no port option; uvicorn serves on sockets handed to `serve()`, so the
    shim hands it one. It leans on TestIssuer's private `_serve`/`_server`; a `port=` argument on TestIssuer
    would make it unnecessary.
    """

    def __init__(self, port: int) -> None:
        super().__init__()
        self._pinned_port = port

    async def _serve(self) -> None:
        server = self._server
        assert server is not None
        sock = _bind(self._pinned_port)
        server.serve = functools.partial(server.serve, sockets=[sock])  # type: ignore[method-assign]
        await super()._serve()


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR, as uvicorn sets it: a port left in TIME_WAIT by the previous run is free to reuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def port_is_free(port: int) -> bool:
    try:
        _bind(port).close()
    except OSError:
        return False
    return True


def start_issuer(bench_key: RSAKey, port: int | None = None) -> TestIssuer:
    """Start a TestIssuer (its server runs in a thread of this process) that also publishes the bench key.

    The bench signs with its own key, published through the public `extra_jwks` knob, so that a tokens file
    signed in an earlier run stays verifiable: the issuer's own key is new every run.
    """
    issuer = TestIssuer() if port is None else _PinnedIssuer(port)
    issuer.extra_jwks = [public_jwk(bench_key)]
    return issuer.start()


def write_config(
    directory: Path, issuer: TestIssuer, *, gateway_port: int, redis_url: str | None, publishers: int
) -> Path:
    """Write issuers.toml, publishers.toml and a signing key as an operator would; return the issuers.toml path."""
    # Same document `gateway keygen --out` writes, with the same 0600 mode: it is a private key.
    key = generate_key("ES256")
    key_path = directory / "signing-key.json"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key.as_dict(private=True, kid=key.thumbprint()), f)

    gateway = [
        "[gateway]",
        f"audience = {json.dumps(AUDIENCE)}",
        f'url = "http://127.0.0.1:{gateway_port}"',
        'publishers = "publishers.toml"',
        'signing_key = "signing-key.json"',
    ]
    if redis_url is not None:
        gateway.append(f"redis_url = {json.dumps(redis_url)}")
    issuers = [
        f"[issuers.{ISSUER_NAME}]",
        f"url = {json.dumps(issuer.url)}",
        'kind = "gitlab"',
        f"ca_bundle = {json.dumps(str(issuer.ca_path))}",
    ]
    path = directory / "issuers.toml"
    path.write_text("\n".join([*gateway, "", *issuers]) + "\n")
    (directory / "publishers.toml").write_text(_publishers_toml(publishers))
    return path


@functools.cache
def _publishers_toml(count: int) -> str:
    """`count` publishers: the one the bench's tokens match (group/project) among `count - 1` others.

    The others are `group{i % 1000}/project{i}` with projects of their own: one repository each, as most are, so
    the index holds `count` keys and the bench's repository sits among them, in the middle of the file.
    """
    entries = [_publisher(f"group{i % PUBLISHER_GROUPS}/project{i}", f"project-{i}") for i in range(1, count)]
    entries.insert(len(entries) // 2, _publisher("group/project", "sampleproject"))
    return "\n".join(entries)


def _publisher(repository: str, project: str) -> str:
    return (
        "[[publisher]]\n"
        f"issuer = {json.dumps(ISSUER_NAME)}\n"
        f"repository = {json.dumps(repository)}\n"
        'workflow = ".gitlab-ci.yml"\n'
        f"projects = [{json.dumps(project)}]\n"
    )


# Runs in a fresh interpreter, so the time is what a starting gateway spends, imports aside.
_LOAD_SCRIPT = """
import sys, time
from gateway.config import load
from gateway.publishers import Publishers
started = time.perf_counter()
publishers = Publishers(load(sys.argv[1]).publishers)
print(time.perf_counter() - started, len(publishers))
"""


def time_load(config: Path, expected: int) -> list[float]:
    """Seconds `config.load` + building the Publishers index take, in each of LOAD_REPEAT fresh processes."""
    times = []
    for _ in range(LOAD_REPEAT):
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(config)],
            capture_output=True, text=True, env=_env(), cwd=config.parent,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"loading {config} failed:\n{done.stderr}")
        seconds, count = done.stdout.split()
        if int(count) != expected:
            raise SystemExit(f"{config} loaded {count} publishers, not {expected}")
        times.append(float(seconds))
    return times


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The run must be what the flags say: an inherited $GATEWAY_REDIS_URL would silently override the config.
    for name in [name for name in env if name.startswith("GATEWAY_")]:
        del env[name]
    # The bench runs from a checkout: `python -m bench.peer` must find the package wherever the cwd is.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    return env


def start_gateway(config: Path, *, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    """Run `gateway serve` exactly as an operator would, and wait until /livez answers."""
    command = [
        sys.executable, "-m", "gateway", "serve",
        "--config", str(config), "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    return _start(command, port=port, log=log, cwd=config.parent)


def start_peer(
    issuer: TestIssuer, *, port: int, redis_url: str | None, log: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Run bench/peer.py, the minimal exchange, on the same issuer, and wait until /livez answers."""
    command = [
        sys.executable, "-m", "bench.peer", "--issuer", issuer.url, "--ca-bundle", str(issuer.ca_path),
        "--audience", AUDIENCE, "--port", str(port),
    ]  # fmt: skip
    if redis_url is not None:
        command += ["--redis-url", redis_url]
    return _start(command, port=port, log=log, cwd=cwd)


def _start(command: Sequence[str], *, port: int, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=cwd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[2]} exited with {proc.returncode} during startup:\n{tail(log)}")
        livez = f"http://127.0.0.1:{port}{LIVEZ_PATH}"
        with contextlib.suppress(OSError), urllib.request.urlopen(livez, timeout=1) as response:
            if response.status == 200:
                return proc
        time.sleep(0.1)
    stop_process(proc)
    raise SystemExit(f"{command[2]} did not answer {LIVEZ_PATH} within 30 s:\n{tail(log)}")


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGINT) -> None:
    """Stop and reap; SIGINT is uvicorn's graceful shutdown (which also stops its worker processes)."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def warm_up(base: str, tokens: Sequence[str]) -> None:
    """Mint with tokens of its own, one connection each, so every worker has fetched the issuer's keys."""
    for token in tokens:
        request = urllib.request.Request(  # noqa: S310 -- an http URL this script built
            base + MINT_PATH,
            data=json.dumps({"token": token}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 -- as above
                status, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        if status != 200:
            raise SystemExit(f"warm-up mint failed with {status}: {body.decode(errors='replace')[:500]}")
