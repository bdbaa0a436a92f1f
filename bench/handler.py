"""The mint handler alone, in this process: CPU per mint without HTTP, sockets or a load generator.

`python -m bench` measures what a client sees; this measures what one change to the exchange is worth, steadily
enough to compare two commits in a minute: the same gateway (`create_app`, the config `python -m bench` writes,
the audit line written by its writer thread to a file) is handed distinct real tokens straight through its ASGI
mint endpoint, and the process's CPU time (every thread's: the log writer's too) is divided by the mints.

    .venv/bin/python -m bench.handler --tokens-file /tmp/tokens.txt            # 20,000 mints, 3 rounds
    .venv/bin/python -m bench.handler --tokens-file /tmp/tokens.txt --profile  # and cProfile's top functions

The tokens file is one `python -m bench --tokens-file` wrote (signing is slow; its issuer's port must be free).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from joserfc.jwk import RSAKey

from gateway import config, logs
from gateway.app import create_app

from .servers import MINT_PATH, start_issuer, write_config
from .tokens import TokenFile


def callgrind_instrument(on: bool, pid: int | None = None) -> None:
    """Switch callgrind's counting on or off in a process valgrind runs (this one by default)."""
    pid = os.getpid() if pid is None else pid
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": MINT_PATH,
        "raw_path": MINT_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _mint_all(app: Any, bodies: Sequence[bytes]) -> tuple[float, float, float, int]:
    """Mint once per body through the app; (process CPU seconds, this thread's, wall seconds, non-200 answers)."""
    failures = 0

    async def one(body: bytes) -> None:
        nonlocal failures
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal failures
            if message["type"] == "http.response.start" and message["status"] != 200:
                failures += 1

        await app(_scope(body), receive, send)

    cpu, mine, wall = time.process_time(), time.thread_time(), time.perf_counter()
    for body in bodies:
        await one(body)
    # The audit lines of these mints are part of their cost: wait until the writer thread has written them.
    logs.flush()
    mine = time.thread_time() - mine
    return time.process_time() - cpu, mine, time.perf_counter() - wall, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handler", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-file", type=Path, required=True)
    parser.add_argument("--mints", type=int, default=20_000, help="mints per round (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is the figure (default 3)")
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--redis-url", help="spend in this Redis (a throwaway one: the bench's tokens land in it)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round and print its top functions")
    parser.add_argument("--sort", default="tottime", help="pstats order of the profile (default tottime)")
    parser.add_argument("--top", type=int, default=30)
    # Set by bench/callgrind.py, which runs this under valgrind: count instructions during the first round only.
    parser.add_argument("--callgrind", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    tokens = TokenFile(args.tokens_file)
    meta = tokens.load_meta()
    if meta is None:
        parser.error(f"{args.tokens_file}: no tokens file (write one with python -m bench --tokens-file)")
    every = args.tokens_file.read_text().split()
    rounds = args.repeat + (1 if args.profile else 0)
    needed = 20 + args.mints * rounds
    if len(every) < needed:
        parser.error(f"{args.tokens_file} holds {len(every)} tokens; {needed} are needed")
    issuer = start_issuer(RSAKey.import_key(meta["key"]), port=meta["issuer_port"])
    try:
        with tempfile.TemporaryDirectory() as directory, open(Path(directory) / "gateway.log", "w") as log:
            path = write_config(
                Path(directory), issuer, gateway_port=8000, redis_url=args.redis_url, publishers=args.publishers
            )
            settings = config.load(path)
            logs.configure(settings.log_level, settings.log_format)
            for handler in logging.getLogger().handlers:
                assert isinstance(handler, logs.QueuedStreamHandler)
                handler.setStream(log)
                if args.callgrind:
                    # Under valgrind a mint takes ~50x as long, so the writer would wake every mint or two and the
                    # count would move with the timing of its wake-ups; at full load a wake covers hundreds of
                    # lines. Lines wait for the flush at the end of the round instead: a fixed count.
                    handler._linger = 3600
            return asyncio.run(_run(create_app(settings), every, args))
    finally:
        issuer.stop()


async def _run(app: Any, every: list[str], args: argparse.Namespace) -> int:
    # As the server runs it: within the app's lifespan, whose start freezes the heap it holds (app.settle_heap).
    # Without that, every full collection walks the whole heap, and a change that allocates one object more per
    # mint moves the count by the collections it shifts rather than by what it costs.
    async with app.router.lifespan_context(app):
        return await _rounds(app, every, args)


async def _rounds(app: Any, every: list[str], args: argparse.Namespace) -> int:
    # The body as clients write it (json.dumps's spacing, as twine and `id` send it, and the load benchmark).
    bodies = [b'{"token": "' + token.encode() + b'"}' for token in every]
    *_, failures = await _mint_all(app, bodies[:20])  # fetches the issuer's keys
    used = 20
    per_mint: list[float] = []
    for round in range(args.repeat):
        if args.callgrind and round == 0:
            callgrind_instrument(True)
        cpu, mine, wall, failures = await _mint_all(app, bodies[used : used + args.mints])
        if args.callgrind and round == 0:
            callgrind_instrument(False)
        used += args.mints
        per_mint.append(cpu / args.mints * 1e6)
        print(
            f"round {round + 1}: {per_mint[-1]:.1f} us CPU per mint ({mine / args.mints * 1e6:.1f} in the event loop's "
            f"thread), {wall / args.mints * 1e6:.1f} us wall, "
            f"{failures} not 200",
            flush=True,
        )
        if failures:
            return 1
    print(
        f"median: {statistics.median(per_mint):.1f} us CPU per mint, best {min(per_mint):.1f} "
        f"(of {args.repeat} rounds)"
    )
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        await _mint_all(app, bodies[used : used + args.mints])
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
