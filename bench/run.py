"""Throughput benchmark: GET /livez and POST /_/oidc/mint-token on one gateway worker, with wrk as the client.

    /work/venv/bin/python bench/run.py [--duration 10] [--workers 1] [--mode both|memory|redis] [--redis auto|URL]
                                       [--publishers 10,100000]

By default it measures mint-token three times, side by side: with jtis spent in memory and 10 publishers in
publishers.toml, the same with 100,000 publishers, then with jtis spent in Redis and 10 publishers (a gateway
with `redis_url` set, against a redis-server the script starts and stops, or the --redis URL). It also times
loading each publishers count (config.load + the Publishers index) in a fresh process: the gateway's startup cost.
Everything is real: a TestIssuer serves discovery and JWKS over HTTPS, `gateway serve` runs as a subprocess
exactly as an operator starts it, and every mint carries a distinct RS256 ID token signed ahead of time (signing
is ~4x the cost of verifying, so signing inside the run would measure the client, not the gateway).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import RSAKey

from gateway.mint import generate_key
from gateway.testing import TestIssuer, free_port

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "mint.lua"
ISSUER_NAME = "gitlab-com"
AUDIENCE = "pypi"
# Issue 3: one worker, every check on, reaches these mints/s with jtis spent in memory, and in Redis.
TARGET_RATE = 5000
REDIS_TARGET_RATE = 4000
# Issue 4: 100,000 publishers load in under 2 s, and the benchmark mints with 10 and with 100,000 of them.
LOAD_TARGET_SECONDS = 2.0
LOAD_TARGET_PUBLISHERS = 100_000
DEFAULT_PUBLISHERS = (10, 100_000)
# Fresh processes the load is timed in; the best is reported (the others are the machine's noise).
LOAD_REPEAT = 3
# The other publishers spread over this many groups (a publishers file of a real index spans many owners).
PUBLISHER_GROUPS = 1000
# --redis auto: start a throwaway redis-server for the Redis mode.
AUTO = "auto"
# Tokens outlive the run by this much so a --tokens-file can be reused for a working day.
TOKEN_LIFETIME = 12 * 3600
# Signing chunks: big enough that pickling overhead is noise, small enough to spread over the processes.
SIGN_CHUNK = 2000
MINT_PATH = "/_/oidc/mint-token"
LIVEZ_PATH = "/livez"


# ----------------------------------------------------------------------------------------------------------
# The issuer


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
        sock = bind(self._pinned_port)
        server.serve = functools.partial(server.serve, sockets=[sock])  # type: ignore[method-assign]
        await super()._serve()


def bind(port: int) -> socket.socket:
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
        bind(port).close()
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


def public_jwk(key: RSAKey) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": key.kid, "alg": "RS256", "use": "sig"}


def new_bench_key() -> RSAKey:
    # 2048 bits: the gateway refuses weaker RSA keys, and it is what GitLab uses, so verify cost is realistic.
    return RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)


# ----------------------------------------------------------------------------------------------------------
# Configuration and the gateway process


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
    (directory / "publishers.toml").write_text(publishers_toml(publishers))
    return path


@functools.cache
def publishers_toml(count: int) -> str:
    """`count` publishers: the one the bench's tokens match (group/project) among `count - 1` others.

    The others are `group{i % 1000}/project{i}` with projects of their own: one repository each, as most are, so
    the index holds `count` keys and the bench's repository sits among them, in the middle of the file.
    """
    entries = [publisher_toml(f"group{i % PUBLISHER_GROUPS}/project{i}", f"project-{i}") for i in range(1, count)]
    entries.insert(len(entries) // 2, publisher_toml("group/project", "sampleproject"))
    return "\n".join(entries)


def publisher_toml(repository: str, project: str) -> str:
    return (
        "[[publisher]]\n"
        f"issuer = {json.dumps(ISSUER_NAME)}\n"
        f"repository = {json.dumps(repository)}\n"
        'workflow = ".gitlab-ci.yml"\n'
        f"projects = [{json.dumps(project)}]\n"
    )


# Runs in a fresh interpreter, so the time is what a starting gateway spends, imports aside.
LOAD_SCRIPT = """
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
            [sys.executable, "-c", LOAD_SCRIPT, str(config)],
            capture_output=True, text=True, env=gateway_env(), cwd=config.parent,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"loading {config} failed:\n{done.stderr}")
        seconds, count = done.stdout.split()
        if int(count) != expected:
            raise SystemExit(f"{config} loaded {count} publishers, not {expected}")
        times.append(float(seconds))
    return times


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    # The run must be what the flags say: an inherited $GATEWAY_REDIS_URL would silently override the config.
    env.pop("GATEWAY_REDIS_URL", None)
    env.pop("GATEWAY_CONFIG", None)
    return env


def start_gateway(config: Path, *, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    """Run `gateway serve` exactly as an operator would, and wait until /livez answers."""
    env = gateway_env()
    command = [
        sys.executable, "-m", "gateway", "serve",
        "--config", str(config), "--port", str(port), "--workers", str(workers), "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=config.parent)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode} during startup:\n{tail(log)}")
        livez = f"http://127.0.0.1:{port}{LIVEZ_PATH}"
        with contextlib.suppress(OSError), urllib.request.urlopen(livez, timeout=1) as response:
            if response.status == 200:
                return proc
        time.sleep(0.1)
    stop_gateway(proc)
    raise SystemExit(f"gateway did not answer {LIVEZ_PATH} within 30 s:\n{tail(log)}")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT is uvicorn's graceful shutdown, which also stops worker processes when --workers > 1.
    stop_process(proc, signal.SIGINT)


def stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# Modes and Redis


@dataclasses.dataclass(frozen=True)
class Mode:
    """One gateway to measure: where it spends jtis, how many publishers it loads, the mint rate it should reach."""

    name: str  # "memory" or "redis": the key in --json and, with the publishers, in profile file names
    where: str  # "in-process" or "Redis": where the jti is spent, as the table says it
    target: int
    publishers: int
    redis_url: str | None = None
    # The redis-server this script started, whose CPU is then measured too; None for a given --redis URL.
    redis_pid: int | None = None
    redis_version: str | None = None

    @property
    def label(self) -> str:
        return f"mint ({self.where})"

    @property
    def run(self) -> str:
        """This run, as the summary names it."""
        return f"{self.where} with {self.publishers:,} publishers"

    @property
    def key(self) -> str:
        """Names this run among the others: its directory, profile file and profile column."""
        return f"{self.name}-{self.publishers}"


def modes_for(args: argparse.Namespace, stack: contextlib.ExitStack, directory: Path) -> list[Mode]:
    """The runs --mode and --publishers ask for, in the order they run; starts a redis-server for --redis auto.

    In-process runs once per publishers count. Redis runs once, with the first count: what it adds per mint is a
    round trip whatever the count, and another 10 s run (and its tokens) would only say that again.
    """
    modes = []
    if args.mode != "redis":
        modes += [Mode("memory", "in-process", args.target, count) for count in args.publishers]
    if args.mode != "memory":
        if args.redis == AUTO:
            url, pid = stack.enter_context(redis_server(directory))
        else:
            url, pid = args.redis, None
        # For a given URL this is also the check that it answers, before any time goes into signing tokens.
        version = wait_for_redis(url, deadline=time.monotonic() + 2, died=lambda: None)
        modes.append(Mode("redis", "Redis", args.redis_target, args.publishers[0], url, pid, version))
    return modes


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port, nothing persisted; yields its URL and pid, then stops it.

    Its own server means its own keyspace: no jti from an earlier run is spent there, so tokens can be reused.
    """
    port = free_port()
    # Exactly the command the issue names; cwd is the temp dir so that nothing can land in the checkout.
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    log = directory / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    url = f"redis://127.0.0.1:{port}/0"
    try:

        def died() -> str | None:
            return None if proc.poll() is None else f"redis-server exited with {proc.returncode}:\n{tail(log)}"

        wait_for_redis(url, deadline=time.monotonic() + 10, died=died)
        yield url, proc.pid
    finally:
        # SIGTERM is redis-server's clean shutdown; with --save "" it writes nothing on the way out.
        stop_process(proc, signal.SIGTERM)


def wait_for_redis(url: str, *, deadline: float, died: Callable[[], str | None]) -> str:
    """Wait until Redis at `url` answers, and return its version; exit with the reason if not by `deadline`."""
    with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
        while True:
            try:
                return str(client.info("server").get("redis_version", "?"))
            except redis.RedisError as e:
                late = time.monotonic() > deadline
                problem = died() or (f"Redis at {url} did not answer: {e}" if late else None)
                if problem:
                    raise SystemExit(problem) from None
            time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------------
# Tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenSigner:
    """Signs copies of one claim set that differ only in `jti`; one per signing process."""

    def __init__(self, pem: bytes, kid: str) -> None:
        key = load_pem_private_key(pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self._key = key
        # Same header shape TestIssuer.sign produces, and GitLab sends.
        self._header = _b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())

    def sign(self, claims: dict[str, Any], count: int) -> list[str]:
        tokens = []
        for _ in range(count):
            # A fresh uuid4 jti per token, as GitLab does: the gateway spends each jti once.
            payload = {**claims, "jti": str(uuid.uuid4())}
            signing_input = f"{self._header}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
            signature = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
            tokens.append(f"{signing_input}.{_b64(signature)}")
        return tokens


# Set once per signing process by the pool initializer, so the key is parsed once, not once per chunk.
_worker_signer: TokenSigner | None = None


def _init_worker(pem: bytes, kid: str) -> None:
    global _worker_signer
    _worker_signer = TokenSigner(pem, kid)


def _sign_chunk(claims: dict[str, Any], count: int) -> list[str]:
    assert _worker_signer is not None
    return _worker_signer.sign(claims, count)


def token_claims(issuer: TestIssuer, now: int) -> dict[str, Any]:
    # A full GitLab claim set from TestIssuer, valid long enough for the tokens file to be reused.
    return issuer.gitlab_claims(now=now, exp=now + TOKEN_LIFETIME)


def sign_tokens(key: RSAKey, claims: dict[str, Any], count: int, processes: int) -> list[str]:
    """Sign `count` distinct tokens across `processes` processes (RSA signing is CPU-bound and holds the GIL)."""
    pem = key.as_pem(private=True)
    assert key.kid is not None
    chunks = [min(SIGN_CHUNK, count - start) for start in range(0, count, SIGN_CHUNK)]
    if processes <= 1 or len(chunks) == 1:
        return TokenSigner(pem, key.kid).sign(claims, count)
    # spawn, not fork: this process runs the issuer's server thread, and forking a threaded process can
    # copy a held lock into the child.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=processes, mp_context=context, initializer=_init_worker, initargs=(pem, key.kid)
    ) as pool:
        return [token for batch in pool.map(_sign_chunk, [claims] * len(chunks), chunks) for token in batch]


@dataclasses.dataclass
class TokenFile:
    """A tokens file and its sidecar: the signing key and issuer port a later run needs to reuse the tokens."""

    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def load_meta(self) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if self.path.exists() and meta.get("format") == 1 else None

    def save(self, tokens: Sequence[str], key: RSAKey, port: int, expires: int) -> None:
        self.path.write_text("\n".join(tokens) + "\n")
        meta = {
            "format": 1,
            "count": len(tokens),
            "issuer_port": port,
            "expires": expires,
            "key": key.as_dict(private=True),
            "redis_spent": [],
        }
        # 0600: the sidecar holds a private key (a throwaway one, but still).
        fd = os.open(self.meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)

    def mark_spent(self, redis_url: str) -> None:
        # Redis remembers spent jtis until the tokens expire, so the file is useless against that Redis now.
        meta = self.load_meta()
        if meta is not None:
            meta["redis_spent"] = sorted({*meta.get("redis_spent", []), redis_url})
            self.meta_path.write_text(json.dumps(meta))


def reuse_problem(meta: dict[str, Any] | None, *, needed: int, duration: float, redis_url: str | None) -> str | None:
    """Why a tokens file cannot be reused for this run, or None if it can."""
    if meta is None:
        return "no tokens file with a readable .meta.json sidecar yet"
    if meta["expires"] < time.time() + duration + 300:
        return "its tokens expire too soon"
    if meta["count"] < needed:
        return f"it holds {meta['count']} tokens and this run needs {needed}"
    if redis_url is not None and redis_url in meta.get("redis_spent", []):
        return f"its tokens were already spent in {redis_url} (they would all be replays: 422)"
    return None


# ----------------------------------------------------------------------------------------------------------
# wrk


@dataclasses.dataclass
class WrkResult:
    output: str
    returncode: int
    cpu_seconds: float
    wall_seconds: float


@dataclasses.dataclass
class WrkStats:
    requests_per_sec: float
    requests: int
    latency: dict[str, float]  # seconds: "avg" and percentiles "50", "75", "90", "99"
    socket_errors: dict[str, int]
    non_2xx_3xx: int
    lua: dict[str, Any]

    @property
    def non200(self) -> int:
        return int(self.lua.get("non200", self.non_2xx_3xx))

    @property
    def errors(self) -> int:
        return self.non200 + sum(self.socket_errors.values())


def run_wrk(url: str, *, duration: int, connections: int, threads: int, script_args: Sequence[str] = ()) -> WrkResult:
    command = [
        "wrk", f"--threads={threads}", f"--connections={connections}", f"--duration={duration}s",
        "--latency", "--timeout=5s", f"--script={LUA_SCRIPT}", url,
    ]  # fmt: skip
    if script_args:
        command += ["--", *script_args]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    # wait4 rather than wait: its rusage says how much of the 2 cores the client itself took.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return WrkResult(output, proc.returncode, usage.ru_utime + usage.ru_stime, time.monotonic() - started)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_LATENCY_ROW = re.compile(r"^\s+Latency\s+([\d.]+)(us|ms|s|m|h)\s", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS = re.compile(r"^\s+(\d+) requests in ", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_LUA = re.compile(r"^BENCH-LUA (\{.*\})$", re.M)


def parse_wrk(output: str) -> WrkStats:
    rate = _RATE.search(output)
    requests = _REQUESTS.search(output)
    if rate is None or requests is None:
        raise ValueError(f"unrecognised wrk output:\n{output}")
    latency = {p: float(v) * _UNITS[u] for p, v, u in _PERCENTILE.findall(output)}
    avg = _LATENCY_ROW.search(output)
    if avg:
        latency["avg"] = float(avg.group(1)) * _UNITS[avg.group(2)]
    socket_match = _SOCKET.search(output)
    socket_errors = dict(
        zip(("connect", "read", "write", "timeout"), map(int, socket_match.groups()), strict=True)
        if socket_match
        else {}
    )
    non_2xx = _NON_2XX.search(output)
    lua = _LUA.search(output)
    return WrkStats(
        requests_per_sec=float(rate.group(1)),
        requests=int(requests.group(1)),
        latency=latency,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        lua=json.loads(lua.group(1)) if lua else {},
    )


# ----------------------------------------------------------------------------------------------------------
# Measuring the gateway process


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's worker processes when --workers > 1)."""
    pids, index = [pid], 0
    while index < len(pids):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def patterns(table: Sequence[tuple[str, str]]) -> list[tuple[str, re.Pattern[str]]]:
    return [(label, re.compile(pattern)) for label, pattern in table]


# Where a mint's time goes, as py-spy names frames ("Class.method (path:line)"). Steps are inclusive: a sample
# counts towards every step on its stack, so nested steps (the RSA check inside Verifier.verify) both show.
PROFILE_STEPS = patterns(
    [
        ("Endpoints.mint_token (the whole handler)", r"^Endpoints\.mint_token \("),
        ("  read_body (the request's body)", r"^read_body \("),
        ("  token_from (strict JSON of the body)", r"^token_from \("),
        ("  Exchange.verify", r"^Exchange\.verify \("),
        ("    jose.peek (split, base64, strict JSON x2)", r"^peek \(gateway/jose"),
        ("    Keys.key (cache hit)", r"^Keys\.key \("),
        ("    Verifier.verify", r"^Verifier\.verify \("),
        ("      RSA signature (joserfc -> cryptography)", r"^_RSAAlgModel\.verify \("),
        ("      Verifier.check_claims (+ joserfc claims registry)", r"^Verifier\.check_claims \("),
        ("    GitLab claims -> Identity", r"\(gateway/issuers/gitlab\.py"),
        ("  Exchange.match (publishers)", r"^Exchange\.match \("),
        ("  jti_key + store.spend", r"^jti_key \(|^\w*Store\.spend \("),
        ("    secrets.token_hex (the spend's attempt id)", r"^RedisStore\.spend \(.*;token_hex \("),
        ("    RedisStore._call (asyncio.timeout + the command)", r"^RedisStore\._call \("),
        ("    redis-py, wherever it runs (pool, health check, pack, send, parse)", r"\(redis/"),
        ("  Signer.mint", r"^Signer\.mint \("),
        ("    ES256 signature (cryptography)", r"sign_es256 \("),
        ("    secrets.token_urlsafe jti", r"^Signer\.mint \(.*;token_urlsafe \("),
        ("    json.dumps of the claims", r"^Signer\.mint \(.*;dumps \(json/"),
        ("  json.dumps of the answer", r"^Endpoints\.mint_token \(.*;dumps \(json/"),
        ("  prometheus_client (counter + histogram)", r"\(prometheus_client/"),
        ("  logging", r"\(logging/"),
    ]
)

# Areas are exclusive: a sample goes to the first area found walking from the innermost frame outwards, so
# stdlib work is charged to JSON/base64 if it is that, else to whichever package called it.
PROFILE_AREAS = patterns(
    [
        ("RSA verify (cryptography)", r"^_RSAAlgModel\.verify \("),
        ("ES256 sign (cryptography)", r"sign_es256 \("),
        ("json encode/decode", r"\(json/"),
        ("base64", r"\(base64\.py"),
        ("prometheus_client", r"\(prometheus_client/"),
        ("logging", r"\(logging/"),
        ("joserfc (other)", r"\(joserfc/"),
        ("redis-py", r"\(redis/"),
        ("gateway code (and stdlib it calls)", r"\(gateway/"),
        ("starlette (middleware, routing, request/response)", r"\(starlette/"),
        ("uvicorn + httptools (parsing, socket writes)", r"\(uvicorn/"),
        ("event loop (uvloop/asyncio, socket reads)", r"\(asyncio/|uvloop"),
    ]
)


@dataclasses.dataclass
class Profile:
    """One mode's py-spy samples, tallied by step, area and innermost function."""

    total: int
    own: Counter[str]
    steps: Counter[str]
    areas: Counter[str]


def read_profile(path: Path) -> Profile:
    """Tally py-spy's raw (collapsed stack) output."""
    profile = Profile(0, Counter(), Counter(), Counter())
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        profile.total += count
        profile.own[frames[-1]] += count
        # A pattern may span two frames (mint;dumps), so steps also look at adjacent pairs.
        pairs = [f"{a};{b}" for a, b in itertools.pairwise(frames)]
        for label, pattern in PROFILE_STEPS:
            if any(pattern.search(frame) for frame in frames) or any(pattern.search(pair) for pair in pairs):
                profile.steps[label] += count
        innermost = (label for frame in reversed(frames) for label, p in PROFILE_AREAS if p.search(frame))
        profile.areas[next(innermost, "other")] += count
    return profile


def summarize_profiles(profiles: dict[str, tuple[Profile, float]], top: int = 15) -> str:
    """Steps, areas and top functions as microseconds of gateway CPU per mint, one column per run.

    `profiles` maps a run to its profile and the gateway CPU per mint measured meanwhile. py-spy samples only
    busy time, so a row's share of a run's samples times that CPU is what the row costs a mint. Each run after
    the first also gets a `+run` column, what it adds to the first: where 100,000 publishers or the Redis
    spend put their extra time per mint.
    """
    names = list(profiles)
    us_per_sample = {name: cpu * 1e6 / p.total if p.total else 0.0 for name, (p, cpu) in profiles.items()}
    headers = [*names, *(f"+{name}" for name in names[1:])]
    widths = [max(8, len(header) + 2) for header in headers]

    def row(counts: dict[str, int], label: str) -> str:
        values = [counts[name] * us_per_sample[name] for name in names]
        cells = [f"{v:.1f}" for v in values] + [f"{v - values[0]:+.1f}" for v in values[1:]]
        return "  " + "".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)) + f"  {label}"

    def section(title: str, labels: Sequence[str], counters: dict[str, Counter[str]]) -> list[str]:
        header = "".join(f"{name:>{width}}" for name, width in zip(headers, widths, strict=True))
        return ["", title, "  " + header] + [row({n: counters[n][label] for n in names}, label) for label in labels]

    samples = ", ".join(f"{name} {p.total}" for name, (p, _) in profiles.items())
    lines = [
        f"profile: samples of the busy gateway ({samples}; time idle in epoll is not sampled), in us of gateway CPU",
        "per mint: a row's share of the samples x the gw CPU/req above. Rows move by up to ~15 us between runs of the",
        "same code on a busy machine: read only differences larger than that.",
    ]
    steps = {n: p.steps for n, (p, _) in profiles.items()}
    lines += section("mint pipeline, inclusive:", [label for label, _ in PROFILE_STEPS], steps)
    areas = {n: p.areas for n, (p, _) in profiles.items()}
    lines += section("by area, exclusive:", rank([(areas[n], us_per_sample[n]) for n in names], None), areas)
    own = {n: p.own for n, (p, _) in profiles.items()}
    lines += section(f"top {top} functions by own time:", rank([(own[n], us_per_sample[n]) for n in names], top), own)
    return "\n".join(lines)


def rank(scaled: Sequence[tuple[Counter[str], float]], top: int | None) -> list[str]:
    """Labels by their largest cost (count x scale) in any mode, costliest first."""
    cost: dict[str, float] = {}
    for counter, scale in scaled:
        for label, count in counter.items():
            cost[label] = max(cost.get(label, 0.0), count * scale)
    return sorted(cost, key=cost.__getitem__, reverse=True)[:top]


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def machine_info() -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer": the version is what matters.
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "wrk": wrk_version.partition(" Copyright")[0].strip() or "wrk",
    }


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


@dataclasses.dataclass
class Run:
    stats: WrkStats
    wall_seconds: float
    gateway_cpu_seconds: float
    wrk_cpu_seconds: float
    # Our own redis-server's, when the run spends in it (the jti SET is its whole load); else None.
    redis_cpu_seconds: float | None
    # Everything else the machine ran meanwhile (other people's jobs, this script): the noise in the numbers.
    other_cpu_seconds: float

    @property
    def cpu_per_request(self) -> float:
        # Gateway CPU per answered request: much steadier than req/s when something else shares the machine.
        return self.gateway_cpu_seconds / self.stats.requests if self.stats.requests else 0.0


def machine_busy_seconds() -> float:
    # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...; busy is all but idle and iowait.
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure(
    base: str,
    path: str,
    gateway: subprocess.Popen[bytes],
    args: argparse.Namespace,
    script_args: Sequence[str] = (),
    redis_pid: int | None = None,
) -> Run:
    pids = process_tree(gateway.pid)
    redis_pids = [] if redis_pid is None else [redis_pid]
    gateway_before, redis_before, machine_before = cpu_seconds(pids), cpu_seconds(redis_pids), machine_busy_seconds()
    result = run_wrk(
        base + path, duration=args.duration, connections=args.connections, threads=args.threads, script_args=script_args
    )
    gateway_used, machine_used = cpu_seconds(pids) - gateway_before, machine_busy_seconds() - machine_before
    redis_used = cpu_seconds(redis_pids) - redis_before
    if result.returncode != 0:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.output}")
    if args.verbose:
        print(result.output)
    return Run(
        stats=parse_wrk(result.output),
        wall_seconds=result.wall_seconds,
        gateway_cpu_seconds=gateway_used,
        wrk_cpu_seconds=result.cpu_seconds,
        redis_cpu_seconds=None if redis_pid is None else redis_used,
        other_cpu_seconds=max(0.0, machine_used - gateway_used - redis_used - result.cpu_seconds),
    )


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


@dataclasses.dataclass
class Outcome:
    """What one run's gateway gave: its mint run, /livez run, py-spy stacks and config load times.

    /livez is measured on the first run's gateway only, and the load timed on the first with each publishers count.
    """

    mode: Mode
    mint: Run
    livez: Run | None
    profile: Path | None
    load: list[float] | None

    @property
    def failed(self) -> bool:
        runs = [self.mint] if self.livez is None else [self.livez, self.mint]
        return any(run.stats.errors for run in runs) or bool(self.mint.stats.lua.get("exhausted"))


def share(seconds: float | None, run: Run) -> str:
    return "-" if seconds is None else f"{seconds / run.wall_seconds:.0%}"


def report(
    info: dict[str, str], setup: dict[str, str], livez: Run, outcomes: Sequence[Outcome], args: argparse.Namespace
) -> str:
    lines = [
        "gateway benchmark",
        f"  machine   : {info['nproc']} CPUs ({info['cpu']}), {info['system']}, {info['python']}, {info['wrk']}",
        f"  load      : {info['load']} (1/5/15 min load average before the run)",
        *(f"  {name:<10}: {value}" for name, value in setup.items()),
        "",
        # CPU columns are shares of one core over the run; "other" is everything but the gateway, wrk and our
        # own redis-server.
        f"  {'':<19}{'publishers':>11}{'req/s':>8}{'p50':>10}{'p99':>10}{'non-200':>8}{'sockerr':>8}"
        f"{'gw CPU':>7}{'wrk':>6}{'redis':>6}{'other':>6}{'gw CPU/req':>12}",
    ]
    # /livez ran on the first run's gateway, with its publishers.
    rows = [
        ("GET  /livez", outcomes[0].mode.publishers, livez),
        *((o.mode.label, o.mode.publishers, o.mint) for o in outcomes),
    ]
    for name, publishers, run in rows:
        s = run.stats
        lines.append(
            f"  {name:<19}{publishers:>11,}{s.requests_per_sec:>8,.0f}{format_ms(s.latency.get('50')):>10}"
            f"{format_ms(s.latency.get('99')):>10}{s.non200:>8}{sum(s.socket_errors.values()):>8}"
            f"{share(run.gateway_cpu_seconds, run):>7}{share(run.wrk_cpu_seconds, run):>6}"
            f"{share(run.redis_cpu_seconds, run):>6}{share(run.other_cpu_seconds, run):>6}"
            f"{run.cpu_per_request * 1e6:>9.0f} us"
        )
    lines.append("")
    for o in outcomes:
        mint = o.mint
        ratio = mint.stats.requests_per_sec / livez.stats.requests_per_sec if livez.stats.requests_per_sec else 0.0
        cost = mint.cpu_per_request / livez.cpu_per_request if livez.cpu_per_request else 0.0
        # What one worker would do with a whole core to itself, from the CPU it spent per mint.
        per_worker = 1 / mint.cpu_per_request if mint.cpu_per_request else 0.0
        met = "met" if mint.stats.requests_per_sec >= o.mode.target else "NOT met"
        lines += [
            f"  {o.mode.run:<36}: target {o.mode.target:,} mints/s with {args.workers} worker(s): {met} "
            f"({mint.stats.requests_per_sec / o.mode.target:.0%})",
            f"  {'':<38}one worker on a whole core: ~{per_worker:,.0f}/s; mint/livez {ratio:.2f} by req/s; "
            f"a mint costs {cost:.1f}x a livez in gateway CPU",
        ]
    lines += comparisons(outcomes)
    lines += load_lines(outcomes)
    for o in outcomes:
        lua = o.mint.stats.lua
        if lua.get("statuses"):
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(lua["statuses"].items()))
            lines.append(f"  mint statuses ({o.mode.run}): {statuses}")
        if lua.get("exhausted"):
            lines.append(
                f"  WARNING: all {lua.get('tokens_available')} tokens of the run {o.mode.run} were used before "
                "it ended; its mint rate is a lower bound. Rerun with a higher --rate (more tokens)."
            )
    runs = [livez, *(o.mint for o in outcomes)]
    if max(run.other_cpu_seconds / run.wall_seconds for run in runs) > 0.15:
        lines.append("  NOTE: something else used the CPUs during the run; req/s is noisy, CPU/req less so.")
    return "\n".join(lines)


def comparisons(outcomes: Sequence[Outcome]) -> list[str]:
    """What more publishers cost a mint (against the store's first count), and what Redis adds (same count)."""
    lines = []
    for o in outcomes:
        first = next(b for b in outcomes if b.mode.name == o.mode.name)
        if first is not o:
            lines.append(difference(first, o))
        if o.mode.name != "redis":
            continue
        same_count = [b for b in outcomes if b.mode.name == "memory" and b.mode.publishers == o.mode.publishers]
        if same_count:
            line = difference(same_count[0], o)
            if o.mint.redis_cpu_seconds is not None and o.mint.stats.requests:
                line += f"; redis-server spends {o.mint.redis_cpu_seconds / o.mint.stats.requests * 1e6:.0f} us"
            lines.append(line)
    return lines


def difference(base: Outcome, other: Outcome) -> str:
    """What `other` costs a mint more than `base`, in gateway CPU and in mints/s."""
    extra = other.mint.cpu_per_request - base.mint.cpu_per_request
    line = f"  {other.mode.run} against {base.mode.run}: {extra * 1e6:+.0f} us of gateway CPU per mint"
    line += f" ({extra / base.mint.cpu_per_request:+.0%})" if base.mint.cpu_per_request else ""
    if base.mint.stats.requests_per_sec:
        line += f", {other.mint.stats.requests_per_sec / base.mint.stats.requests_per_sec:.0%} of the mints/s"
    return line


def load_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """Each publishers count's load time against issue 4's target (100,000 in under 2 s, so fewer in less)."""
    timed = [o for o in outcomes if o.load]
    if not timed:
        return []
    lines = [
        f"  startup: config.load + the Publishers index, best of {LOAD_REPEAT} fresh processes (target: "
        f"{LOAD_TARGET_PUBLISHERS:,} publishers in under {LOAD_TARGET_SECONDS:g} s)",
    ]
    for o in timed:
        assert o.load is not None
        best = min(o.load)
        if o.mode.publishers > LOAD_TARGET_PUBLISHERS:
            verdict = "no target for more than that"
        else:
            verdict = "met" if best < LOAD_TARGET_SECONDS else "NOT met"
            verdict += f" ({best / LOAD_TARGET_SECONDS:.0%} of the {LOAD_TARGET_SECONDS:g} s)"
        all_times = " / ".join(f"{t:.3f}" for t in o.load)
        lines.append(f"  {o.mode.publishers:>17,} publishers: {best:.3f} s ({all_times}): {verdict}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    # 32 keeps one worker saturated (64 gives the same req/s); at 64 each mint queues ~20 ms behind the others
    # and ~1% of them then meet loopback TCP loss-probe/RTO delays of ~200 ms, which is TCP, not the gateway.
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    default_publishers = ",".join(map(str, DEFAULT_PUBLISHERS))
    parser.add_argument(
        "--publishers", type=counts, metavar="N[,N...]", default=list(DEFAULT_PUBLISHERS), help="publishers in "
        f"publishers.toml (default {default_publishers}): the in-process mode runs once per count and the Redis "
        "mode with the first; each count's load time is measured in fresh processes",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=["both", "memory", "redis"], default="both", help="spend jtis in memory, in Redis, or "
        "both, one gateway after the other (default both)",
    )  # fmt: skip
    parser.add_argument(
        "--redis", metavar="auto|URL", default=AUTO, help="the Redis of the Redis mode: auto (default) starts a "
        "throwaway redis-server on a free port and stops it at the end; a URL is used as is",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=int, default=TARGET_RATE, help=f"mints/s to sign tokens for (default {TARGET_RATE}); "
        "tokens = rate x duration x 1.3 per mode",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=int, default=TARGET_RATE, help=f"mints/s the in-process mode should reach (default "
        f"{TARGET_RATE})",
    )  # fmt: skip
    parser.add_argument(
        "--redis-target", type=int, default=REDIS_TARGET_RATE, help="mints/s the Redis mode should reach "
        f"(default {REDIS_TARGET_RATE})",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, help="number of tokens to sign per mode (overrides --rate)")
    parser.add_argument(
        "--tokens-file", type=Path, help="keep tokens here (with a .meta.json sidecar) and reuse them on later "
        "runs instead of signing again; reuse needs the issuer port recorded in the sidecar to be free",
    )  # fmt: skip
    parser.add_argument("--sign-processes", type=int, default=os.cpu_count() or 1, help="signing processes")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up mints before measuring (default 20)")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="record each gateway with py-spy during its mint run (raw "
        "collapsed stacks in FILE with .memory/.redis before the suffix, loadable in speedscope) and print where "
        "each mint's time goes, side by side; slows the gateway a little",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output")
    return parser.parse_args(argv)


def counts(text: str) -> list[int]:
    """--publishers: positive counts, comma-separated, in the order given, each once."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 10,100000 (got {text!r})") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("every count must be at least 1 (the bench's own publisher)")
    return list(dict.fromkeys(values))


def preflight(args: argparse.Namespace) -> str | None:
    """Why this run cannot start, before anything is started or signed; None if it can."""
    if shutil.which("wrk") is None:
        return "wrk is not on PATH; install it with: apt-get install -y wrk"
    if args.profile and find_py_spy() is None:
        return "--profile needs py-spy: /work/venv/bin/pip install py-spy"
    if args.connections < args.threads:
        return "--connections must be at least --threads"
    if args.mode != "memory" and args.redis == AUTO and shutil.which("redis-server") is None:
        return (
            "the Redis mode needs redis-server on PATH (apt-get install -y redis-server); "
            "or pass --redis URL, or --mode memory"
        )
    if args.mode != "memory" and args.redis != AUTO and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        return "--redis takes auto or a redis://, rediss:// or unix:// URL"
    return None


def start_issuer_for(
    args: argparse.Namespace, needed: int, spent_in: str | None
) -> tuple[TestIssuer, RSAKey, TokenFile | None, bool]:
    """Start the issuer, with the key and port of a reusable tokens file if there is one; True if reusing.

    `spent_in` is a Redis that outlives this run, in which an earlier run may have spent the file's tokens.
    """
    token_file = TokenFile(args.tokens_file) if args.tokens_file else None
    meta = token_file.load_meta() if token_file else None
    problem = reuse_problem(meta, needed=needed, duration=args.duration, redis_url=spent_in)
    if token_file is not None and meta is not None and problem is None:
        if port_is_free(meta["issuer_port"]):
            key = RSAKey.import_key(meta["key"])
            return start_issuer(key, meta["issuer_port"]), key, token_file, True
        problem = f"the issuer port its tokens name ({meta['issuer_port']}) is taken"
    if token_file is not None:
        print(f"not reusing {token_file.path}: {problem}; signing new tokens")
    key = new_bench_key()
    return start_issuer(key), key, token_file, False


def prepare_tokens(
    args: argparse.Namespace,
    issuer: TestIssuer,
    key: RSAKey,
    token_file: TokenFile | None,
    directory: Path,
    needed: int,
) -> tuple[Path, str]:
    """Sign the run's tokens into the tokens file (or a temp one); returns its path and a line for the summary."""
    print(f"signing {needed:,} tokens with {args.sign_processes} process(es)...", flush=True)
    now = int(time.time())
    started = time.monotonic()
    tokens = sign_tokens(key, token_claims(issuer, now), needed, args.sign_processes)
    took = time.monotonic() - started
    summary = f"{needed:,} signed in {took:.1f} s ({needed / took:,.0f}/s, {args.sign_processes} processes)"
    if token_file is not None:
        token_file.save(tokens, key, issuer.port, now + TOKEN_LIFETIME)
        return token_file.path, summary
    path = directory / "tokens.txt"
    path.write_text("\n".join(tokens) + "\n")
    return path, summary


def start_profiler(py_spy: str, pid: int, args: argparse.Namespace, output: Path) -> subprocess.Popen[bytes]:
    command = [
        py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
        "--duration", str(args.duration), "--output", str(output),
    ]  # fmt: skip
    if args.workers > 1:
        command.append("--subprocesses")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_profiler(profiler: subprocess.Popen[bytes] | None, args: argparse.Namespace) -> bool:
    if profiler is None:
        return False
    _, errors = profiler.communicate(timeout=args.duration + 30)
    if profiler.returncode != 0:
        print(f"py-spy failed: {errors.decode(errors='replace')}", file=sys.stderr)
        return False
    return True


def benchmark(
    args: argparse.Namespace,
    issuer: TestIssuer,
    key: RSAKey,
    directory: Path,
    py_spy: str | None,
    mode: Mode,
    script_args: Sequence[str],
    *,
    with_livez: bool,
    with_load: bool,
) -> Outcome:
    """One run: write its config and time its load (if asked), start its gateway, measure it, stop it.

    The gateway is warmed up, then wrk measures /livez (if asked) and mint-token.
    """
    # Warm-up tokens share the key and claims but are never in the file, so no token is sent twice.
    assert key.kid is not None
    warm_tokens = TokenSigner(key.as_pem(private=True), key.kid).sign(
        token_claims(issuer, int(time.time())), args.warmup
    )
    # A directory per run: each gateway gets its own config and signing key, as a separate deployment would.
    directory = directory / mode.key
    directory.mkdir()
    port = free_port()
    config = write_config(directory, issuer, gateway_port=port, redis_url=mode.redis_url, publishers=mode.publishers)
    load = None
    if with_load:
        # Before the gateway starts: nothing of this run competes with the load for the CPUs.
        print(f"timing the load of {mode.publishers:,} publishers...", flush=True)
        load = time_load(config, mode.publishers)
    base = f"http://127.0.0.1:{port}"
    log = directory / "gateway.log"
    gateway = start_gateway(config, port=port, workers=args.workers, log=log)
    try:
        warm_up(base, warm_tokens)
        livez = None
        if with_livez:
            print(f"measuring GET {LIVEZ_PATH} for {args.duration} s...", flush=True)
            livez = measure(base, LIVEZ_PATH, gateway, args)
        profile = None
        if py_spy is not None and args.profile is not None:
            profile = args.profile.with_name(f"{args.profile.stem}.{mode.key}{args.profile.suffix}")
        profiler = None if profile is None or py_spy is None else start_profiler(py_spy, gateway.pid, args, profile)
        print(
            f"measuring POST {MINT_PATH} (jti store: {mode.where}, {mode.publishers:,} publishers) for "
            f"{args.duration} s...",
            flush=True,
        )
        mint = measure(base, MINT_PATH, gateway, args, script_args, redis_pid=mode.redis_pid)
        profiled = finish_profiler(profiler, args)
    finally:
        stop_gateway(gateway)
    if gateway.returncode not in (0, -signal.SIGINT):
        print(f"gateway exited with {gateway.returncode}:\n{tail(log)}", file=sys.stderr)
    return Outcome(mode, mint, livez, profile if profiled else None, load)


def describe(args: argparse.Namespace, modes: Sequence[Mode]) -> dict[str, str]:
    """The setup lines of the summary, before the tokens line."""
    order = ", then ".join(m.run for m in modes)
    setup = {"gateway": f"{args.workers} worker(s); a fresh gateway per run, in order: {order}"}
    setup["publishers"] = (
        "the bench's group/project among N - 1 others in publishers.toml, group{i % "
        f"{PUBLISHER_GROUPS}}}/project{{i}} with a project each; Redis runs with the first count only"
    )
    for m in modes:
        if m.redis_url is not None:
            whose = "started for this run" if m.redis_pid is not None else "given with --redis, used as is"
            setup["redis"] = f"Redis {m.redis_version} at {m.redis_url}, {whose}"
    setup["wrk"] = f"{args.threads} thread(s), {args.connections} connections, {args.duration} s per run"
    return setup


def results_json(
    info: dict[str, str], setup: dict[str, str], livez: Run, outcomes: Sequence[Outcome]
) -> dict[str, Any]:
    """--json: runs keyed by store then publishers count (`mint.memory.100000`), load times by count."""
    mint: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        mint.setdefault(o.mode.name, {})[str(o.mode.publishers)] = dataclasses.asdict(o.mint)
    return {
        "machine": info,
        "setup": setup,
        "livez": dataclasses.asdict(livez),
        "mint": mint,
        "load_seconds": {str(o.mode.publishers): o.load for o in outcomes if o.load},
        "target": {
            **{o.mode.name: o.mode.target for o in outcomes},
            "load_seconds": LOAD_TARGET_SECONDS,
            "load_publishers": LOAD_TARGET_PUBLISHERS,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    py_spy = find_py_spy() if args.profile else None

    info = machine_info()
    # Each run gets its own slice of `needed` tokens: a jti spent by one gateway is never sent to another.
    needed = args.tokens or math.ceil(args.rate * args.duration * 1.3)
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        modes = modes_for(args, stack, directory)
        setup = describe(args, modes)
        # A Redis this script did not start remembers what earlier runs spent in it; a fresh one, and memory, do not.
        spent_in = next((m.redis_url for m in modes if m.redis_url is not None and m.redis_pid is None), None)
        issuer, key, token_file, reuse = start_issuer_for(args, needed * len(modes), spent_in)
        stack.callback(issuer.stop)
        if reuse:
            assert token_file is not None
            tokens_path = token_file.path
            setup["tokens"] = f"reused from {tokens_path}"
        else:
            tokens_path, setup["tokens"] = prepare_tokens(args, issuer, key, token_file, directory, needed * len(modes))
        setup["tokens"] += f"; {needed:,} per run"
        timed: set[int] = set()
        for index, mode in enumerate(modes):
            if mode.redis_url is not None and mode.redis_url == spent_in and token_file is not None:
                # Before the run, not after: a run that fails halfway has spent some of them all the same.
                token_file.mark_spent(spent_in)
            script_args = [str(tokens_path), str(args.threads), str(index * needed), str(needed)]
            with_load = mode.publishers not in timed
            timed.add(mode.publishers)
            outcomes.append(
                benchmark(
                    args, issuer, key, directory, py_spy, mode, script_args, with_livez=index == 0, with_load=with_load
                )
            )

    livez = outcomes[0].livez
    assert livez is not None
    print()
    print(report(info, setup, livez, outcomes, args))
    profiles = {o.mode.key: (read_profile(o.profile), o.mint.cpu_per_request) for o in outcomes if o.profile}
    if profiles:
        print()
        print(summarize_profiles(profiles))
        paths = ", ".join(str(o.profile) for o in outcomes if o.profile)
        print(f"\n(raw stacks in {paths}; open them in https://www.speedscope.app)")
    if args.json:
        args.json.write_text(json.dumps(results_json(info, setup, livez, outcomes), indent=2) + "\n")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
