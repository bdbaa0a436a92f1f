"""The benchmark's command line and the order it runs things in.

    python -m bench [--stores memory,redis,sentinel,cluster] [--publishers 10,100000] [--repeat 3] [--duration 10]

Everything is real: a TestIssuer serves discovery and JWKS over HTTPS, `gateway serve` and the peer
(bench/peer.py) run as subprocesses exactly as an operator starts them, each Redis deployment is the bench's own,
and every mint carries a distinct RS256 ID token signed ahead of time. The gateway and the peer get the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from joserfc.jwk import RSAKey

from gateway.testing import TestIssuer, free_port

from . import profiling
from .load import Run, measure
from .plan import STORE_NAMES, Measured, Target
from .report import Goals, render, results_json
from .servers import (
    LIVEZ_PATH,
    MINT_PATH,
    port_is_free,
    start_gateway,
    start_issuer,
    start_peer,
    stop_process,
    tail,
    time_load,
    warm_up,
    write_config,
)
from .stores import KINDS, RedisStore, start_store
from .tokens import TOKEN_LIFETIME, TokenFile, TokenSigner, new_bench_key, reuse_problem, sign_tokens, token_claims

__all__ = ["main"]

DEFAULT_PUBLISHERS = (10, 100_000)
# A paced run that lands further than this from its aim is run again once, its wait corrected by the latency
# it met (a busy machine answers slower, which slows a closed loop).
PACE_TOLERANCE = 0.1
# Tokens per run are --rate x duration x this: the fastest server must not run out.
TOKEN_MARGIN = 1.3


def targets_for(args: argparse.Namespace) -> list[Target]:
    """What --stores and --publishers ask for, in the order each round runs them.

    The gateway runs in-process once per publishers count; every other store with the first count (what a store
    adds per mint is a round trip whatever the count). The peer runs in-process and with plain Redis: the two
    stores issue 12 compares it on.
    """
    first = args.publishers[0]
    targets = []
    for store in args.stores:
        counts = args.publishers if store == "memory" else [first]
        targets.append(Target("gateway", store, first))
        # Right after the gateway it is compared with: the machine's slow spells last minutes, so the two runs
        # of a pair should be as close in time as they can be.
        if args.peer and store in ("memory", "redis"):
            targets.append(Target("peer", store, 0))
        targets += [Target("gateway", store, count) for count in counts[1:]]
    return targets


def run_once(
    args: argparse.Namespace,
    target: Target,
    issuer: TestIssuer,
    key: RSAKey,
    store: RedisStore | None,
    directory: Path,
    tokens: Path,
    *,
    livez: bool = False,
    profile: Path | None = None,
    delay_ms: int = 0,
) -> tuple[Run, Run | None, bool]:
    """Start the target's server (its store flushed), warm it up, measure it with wrk, stop it.

    Returns the mint run, the /livez run (if asked) and whether the profile was written.
    """
    if store is not None:
        # Forget the previous run's spends: every run sends the same tokens.
        store.flush()
    warm_tokens = TokenSigner.of(key).sign(token_claims(issuer, int(time.time())), args.warmup)
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{target.key}-", dir=directory))
    log = run_dir / "server.log"
    if target.server == "gateway":
        url = None if store is None else store.url
        config = write_config(run_dir, issuer, gateway_port=port, redis_url=url, publishers=target.publishers)
        server = start_gateway(config, port=port, workers=args.workers, log=log)
    else:
        server = start_peer(
            issuer, port=port, redis_url=None if store is None else store.plain_url, log=log, cwd=run_dir
        )
    base = f"http://127.0.0.1:{port}"
    wrk = {"duration": args.duration, "connections": args.connections, "threads": args.threads}
    profiled = False
    try:
        warm_up(base, warm_tokens)
        livez_run = measure(base + LIVEZ_PATH, server.pid, **wrk) if livez else None
        py_spy = profiling.find_py_spy() if profile else None
        profiler = None
        if py_spy is not None and profile is not None:
            profiler = profiling.start_profiler(
                py_spy, server.pid, duration=args.duration, workers=args.workers, output=profile
            )
        mint = measure(
            base + MINT_PATH,
            server.pid,
            **wrk,
            script_args=[str(tokens), str(args.threads)],
            redis_pids=store.pids if store else (),
            delay_ms=delay_ms,
        )
        if profiler is not None:
            profiled = profiling.finish_profiler(profiler, args.duration)
    finally:
        stop_process(server)
    if server.returncode not in (0, -signal.SIGINT):
        print(f"{target.key} exited with {server.returncode}:\n{tail(log)}", file=sys.stderr)
    return mint, livez_run, profiled


def pace_delay(connections: int, aim: float, latency: float) -> int:
    """Milliseconds each connection waits between an answer and its next request to make `aim` requests/s.

    A connection's cycle is its wait plus the answer's latency (seconds); wrk takes whole milliseconds, so the
    rate lands within a few percent of the aim, and the report says where it landed.
    """
    return max(1, math.floor((connections / aim - latency) * 1000)) if aim else 1


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
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        # "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer": the version is what matters.
        "wrk": wrk_version.partition(" Copyright")[0].strip() or "wrk",
    }


def prepare_tokens(args: argparse.Namespace, needed: int, directory: Path) -> tuple[TestIssuer, RSAKey, Path, str]:
    """Start the issuer and have `needed` tokens for it: reused from --tokens-file if it can be, else signed.

    Returns the issuer, the bench key, the tokens file and a line for the summary.
    """
    seconds = args.duration * args.repeat * 20
    token_file = TokenFile(args.tokens_file) if args.tokens_file else None
    meta = token_file.load_meta() if token_file else None
    problem = reuse_problem(meta, needed=needed, seconds=seconds)
    if token_file is not None and meta is not None and problem is None:
        if port_is_free(meta["issuer_port"]):
            key = RSAKey.import_key(meta["key"])
            return start_issuer(key, meta["issuer_port"]), key, token_file.path, f"reused from {token_file.path}"
        problem = f"the issuer port its tokens name ({meta['issuer_port']}) is taken"
    if token_file is not None:
        print(f"not reusing {token_file.path}: {problem}; signing new tokens")
    key = new_bench_key()
    issuer = start_issuer(key)
    print(f"signing {needed:,} tokens with {args.sign_processes} process(es)...", flush=True)
    now = int(time.time())
    started = time.monotonic()
    tokens = sign_tokens(key, token_claims(issuer, now), needed, args.sign_processes)
    took = time.monotonic() - started
    summary = f"{needed:,} signed in {took:.1f} s ({needed / took:,.0f}/s, {args.sign_processes} processes)"
    if token_file is not None:
        token_file.save(tokens, key, issuer.port, now + TOKEN_LIFETIME)
        return issuer, key, token_file.path, summary
    path = directory / "tokens.txt"
    path.write_text("\n".join(tokens) + "\n")
    return issuer, key, path, summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    goals = Goals(rate=args.target, redis_rate=args.redis_target, pace=args.pace)
    info = machine_info()
    targets = targets_for(args)
    measured = {target: Measured(target) for target in targets}
    needed = args.tokens or math.ceil(args.rate * args.duration * TOKEN_MARGIN)
    livez: Run | None = None
    setup = {
        "servers": f"{args.workers} worker(s) each; a fresh server per run, each round in the order: "
        + ", ".join(t.label for t in targets),
        "runs": f"{args.repeat} rounds at full load (the median is the figure), then one paced run per gateway "
        f"target at {args.pace:.0%} of its median (each connection waiting between requests)",
        "wrk": f"{args.threads} thread(s), {args.connections} connections, {args.duration} s per run",
    }
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        stores: dict[str, RedisStore] = {}
        for kind in KINDS:
            if kind in args.stores:
                print(f"starting {STORE_NAMES[kind]}...", flush=True)
                stores[kind] = stack.enter_context(start_store(kind, directory / kind))
                setup[kind] = stores[kind].description
        issuer, key, tokens, setup["tokens"] = prepare_tokens(args, needed, directory)
        stack.callback(issuer.stop)
        setup["tokens"] += f"; every run sends the same {needed:,} (each store is new or flushed)"

        for count in args.publishers:
            target = Target("gateway", "memory", count)
            if target in measured:
                # Before any server runs: nothing of the benchmark competes with the load for the CPUs.
                print(f"timing the load of {target.publishers:,} publishers...", flush=True)
                config_dir = Path(tempfile.mkdtemp(dir=directory))
                config = write_config(config_dir, issuer, gateway_port=1, redis_url=None, publishers=target.publishers)
                measured[target].load = time_load(config, target.publishers)
        for round_ in range(args.repeat):
            for index, target in enumerate(targets):
                if measured[target].skipped:
                    continue
                print(f"round {round_ + 1}/{args.repeat}: {target.label}...", flush=True)
                profile = None
                if args.profile and round_ == 0 and target.server == "gateway":
                    profile = args.profile.with_name(f"{args.profile.stem}.{target.key}{args.profile.suffix}")
                try:
                    mint, livez_run, profiled = run_once(
                        args, target, issuer, key, stores.get(target.store), directory, tokens,
                        livez=round_ == 0 and index == 0, profile=profile,
                    )  # fmt: skip
                except SystemExit as e:
                    if target.store not in ("sentinel", "cluster"):
                        raise
                    # A gateway from before redis+sentinel:// and redis+cluster:// refuses the URL: say so, go on.
                    measured[target].skipped = str(e).strip().splitlines()[-1]
                    print(f"{target.label}: not measured: {measured[target].skipped}", file=sys.stderr)
                    continue
                measured[target].runs.append(mint)
                livez = livez_run or livez
                if profiled:
                    measured[target].profile = profile
        for target in targets:
            # Issue 12's latency target is for the gateway in-process and with Redis, at its first count.
            paced = target.store in ("memory", "redis") and target.publishers == args.publishers[0]
            if target.server != "gateway" or not paced or args.pace <= 0:
                continue
            m = measured[target]
            # The full load's connections: more would send bigger bursts (all of them start at once, and a closed
            # loop keeps them in step), and the queue of a burst is latency the gateway does not cause.
            connections, aim = args.connections, args.pace * m.rate
            # First guess: an unqueued answer takes about 1/peak.
            delay = pace_delay(connections, aim, 1 / m.rate)
            for attempt in range(2):
                print(f"paced: {target.label} at ~{aim:,.0f}/s ({delay} ms between requests)...", flush=True)
                m.paced, _, _ = run_once(
                    args, target, issuer, key, stores.get(target.store), directory, tokens, delay_ms=delay
                )
                if attempt or abs(m.paced.rate / aim - 1) <= PACE_TOLERANCE:
                    break
                delay = pace_delay(connections, aim, m.paced.stats.latency.get("avg", 1 / m.rate))

    results = [m for m in measured.values() if m.runs]
    skipped = [m for m in measured.values() if m.skipped]
    print()
    print(render(info, setup, livez, results, goals))
    for m in skipped:
        print(f"  {m.target.label}: NOT measured, its server did not start: {m.skipped}")
    profiles = {
        m.target.key: (profiling.read_profile(m.profile), m.runs[0].cpu_per_request) for m in results if m.profile
    }
    if profiles:
        print()
        print(profiling.summarize_profiles(profiles))
        paths = ", ".join(str(m.profile) for m in results if m.profile)
        print(f"\n(raw stacks in {paths}; open them in https://www.speedscope.app)")
    if args.json:
        args.json.write_text(json.dumps(results_json(info, setup, livez, results, goals), indent=2) + "\n")
    return 1 if any(m.failed for m in results) or skipped else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stores", type=_stores, default=list(STORE_NAMES), metavar="S[,S...]", help="where jtis are spent, of "
        "memory, redis, sentinel, cluster (default all four)",
    )  # fmt: skip
    parser.add_argument(
        "--publishers", type=_counts, metavar="N[,N...]", default=list(DEFAULT_PUBLISHERS), help="publishers in "
        "the gateway's publishers.toml (default 10,100000): in-process runs once per count, the other stores with "
        "the first; each count's load time is measured in fresh processes",
    )  # fmt: skip
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="measure the gateway alone")
    parser.add_argument("--repeat", type=int, default=3, help="rounds at full load; the median is the figure (3)")
    parser.add_argument("--pace", type=float, default=0.8, help="share of the peak of the paced runs (0.8; 0: none)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    # 32 keeps one worker saturated (64 gives the same req/s); at 64 each mint queues ~20 ms behind the others
    # and ~1% of them then meet loopback TCP loss-probe/RTO delays of ~200 ms, which is TCP, not the gateway.
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each server (default 1)")
    parser.add_argument(
        "--rate", type=int, default=8000, help="mints/s to sign tokens for (default 8000): tokens = rate x "
        f"duration x {TOKEN_MARGIN}, sent again in every run",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, help="number of tokens to sign (overrides --rate)")
    parser.add_argument("--target", type=int, default=5000, help="mints/s the gateway should reach in-process")
    parser.add_argument("--redis-target", type=int, default=4000, help="mints/s the gateway should reach with Redis")
    parser.add_argument(
        "--tokens-file", type=Path, help="keep tokens here (with a .meta.json sidecar) and reuse them on later "
        "runs instead of signing again; reuse needs the issuer port recorded in the sidecar to be free",
    )  # fmt: skip
    parser.add_argument("--sign-processes", type=int, default=os.cpu_count() or 1, help="signing processes")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up mints before measuring (default 20)")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="record each gateway with py-spy during its first mint run "
        "(raw collapsed stacks in FILE with the target before the suffix) and print where each mint's time goes",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def _counts(text: str) -> list[int]:
    """--publishers: positive counts, comma-separated, in the order given, each once."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 10,100000 (got {text!r})") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("every count must be at least 1 (the bench's own publisher)")
    return list(dict.fromkeys(values))


def _stores(text: str) -> list[str]:
    values = list(dict.fromkeys(part.strip() for part in text.split(",")))
    unknown = [value for value in values if value not in STORE_NAMES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"stores are memory, redis, sentinel and cluster (got {text!r})")
    return values


def preflight(args: argparse.Namespace) -> str | None:
    """Why this run cannot start, before anything is started or signed; None if it can."""
    if shutil.which("wrk") is None:
        return "wrk is not on PATH; install it with: apt-get install -y wrk"
    if args.profile and profiling.find_py_spy() is None:
        return "--profile needs py-spy: .venv/bin/pip install py-spy"
    if args.connections < args.threads:
        return "--connections must be at least --threads"
    if args.repeat < 1:
        return "--repeat must be at least 1"
    if set(args.stores) - {"memory"} and shutil.which("redis-server") is None:
        return "Redis, Sentinel and Cluster need redis-server on PATH (apt-get install -y redis-server)"
    if "cluster" in args.stores and shutil.which("redis-cli") is None:
        return "the Cluster store needs redis-cli on PATH to create the cluster"
    return None
