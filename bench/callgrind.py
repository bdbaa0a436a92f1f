"""Instructions per mint, counted by valgrind's callgrind: the same number for the same code, however busy the
machine is. Wall-clock runs on this shared 2-core VM move by 5-10% from one minute to the next; instruction counts
repeat to within 0.5%, so a change of 1% can be kept or dropped on evidence. Instructions are not time (a
cache miss costs more than an add), so the release figures stay `python -m bench`'s; this is for deciding.

    .venv/bin/python -m bench.callgrind handler --tokens-file /tmp/tokens.txt           # the mint endpoint alone
    .venv/bin/python -m bench.callgrind server --tokens-file /tmp/tokens.txt            # `gateway serve`, HTTP included
    .venv/bin/python -m bench.callgrind server --peer --tokens-file /tmp/tokens.txt     # the peer, the same way

`handler` runs bench/handler.py's driver (the app's ASGI mint endpoint, no sockets) and counts one round. `server`
starts the server under valgrind, warms it up, and counts N mints sent one after another over one keep-alive
connection (a fixed path through the event loop, unlike a concurrent load). Both count every thread of the
process (the log writer's too) and need `valgrind` and `callgrind_control` (Debian's valgrind package), and a
tokens file that `python -m bench --tokens-file` wrote, whose issuer port is free.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from joserfc.jwk import RSAKey

from gateway.testing import free_port

from .handler import callgrind_instrument
from .servers import AUDIENCE, MINT_PATH, _env, start_issuer, write_config
from .tokens import TokenFile

WARMUP = 40
_COLLECTED = re.compile(r"Collected : (\d+)")


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def _collected(log: str) -> int:
    counts = _COLLECTED.findall(log)
    if not counts:
        raise SystemExit(f"valgrind reported no instruction count:\n{log[-2000:]}")
    return int(counts[-1])


def _keep(directory: str, keep: Path | None) -> None:
    if keep is not None:
        shutil.copyfile(Path(directory) / "callgrind.out", keep)


def handler(tokens_file: Path, mints: int, *, keep: Path | None = None) -> int:
    """Instructions of `mints` exchanges through the app's mint endpoint (bench/handler.py, one round)."""
    with tempfile.TemporaryDirectory() as directory:
        command = [
            *_valgrind(Path(directory) / "callgrind.out"), sys.executable, "-m", "bench.handler",
            "--tokens-file", str(tokens_file), "--mints", str(mints), "--repeat", "1", "--callgrind",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            raise SystemExit(f"bench.handler failed under valgrind:\n{done.stdout}\n{done.stderr[-2000:]}")
        _keep(directory, keep)
        return _collected(done.stderr)


def server(
    tokens_file: Path, mints: int, *, peer: bool, redis_url: str | None = None, keep: Path | None = None
) -> int:
    """Instructions of `mints` sequential exchanges through `gateway serve` (or the peer) over one connection."""
    tokens = TokenFile(tokens_file)
    meta = tokens.load_meta()
    assert meta is not None
    every = tokens_file.read_text().split()
    issuer = start_issuer(RSAKey.import_key(meta["key"]), port=meta["issuer_port"])
    try:
        with tempfile.TemporaryDirectory() as name:
            directory, port = Path(name), free_port()
            config = write_config(directory, issuer, gateway_port=port, redis_url=redis_url, publishers=10)
            target = ["-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
            if peer:
                target = [
                    "-m", "bench.peer", "--issuer", issuer.url, "--ca-bundle", str(issuer.ca_path),
                    "--audience", AUDIENCE, "--port", str(port),
                ]  # fmt: skip
                if redis_url is not None:
                    target += ["--redis-url", redis_url]
            log = directory / "server.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [*_valgrind(directory / "callgrind.out"), sys.executable, *target],
                    stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=directory,
                )  # fmt: skip
            try:
                _wait_for(port, proc, log)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                for token in every[:WARMUP]:
                    _mint(connection, token)
                callgrind_instrument(True, proc.pid)
                for token in every[WARMUP : WARMUP + mints]:
                    _mint(connection, token)
                callgrind_instrument(False, proc.pid)
                connection.close()
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=300)
            _keep(name, keep)
            return _collected(log.read_text())
    finally:
        issuer.stop()


def _wait_for(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300  # a Python process starts ~50x slower under valgrind
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited during startup:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not answer /livez within 300 s under valgrind")


def _mint(connection: http.client.HTTPConnection, token: str) -> None:
    body = json.dumps({"token": token})
    connection.request("POST", MINT_PATH, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"a mint answered {response.status}; the count would measure an error path")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["handler", "server"])
    parser.add_argument("--tokens-file", type=Path, required=True)
    parser.add_argument("--mints", type=int, default=300, help="mints counted (default 300)")
    parser.add_argument("--peer", action="store_true", help="with server: the peer instead of the gateway")
    parser.add_argument(
        "--redis-url", help="with server: spend in this Redis (flushed first: use a throwaway one, never a real one)"
    )
    parser.add_argument(
        "--keep", type=Path, metavar="FILE", help="keep callgrind's output there, for callgrind_annotate or kcachegrind"
    )
    args = parser.parse_args(argv)
    if TokenFile(args.tokens_file).load_meta() is None:
        parser.error(f"{args.tokens_file}: no tokens file (write one with python -m bench --tokens-file)")
    if args.what == "handler":
        count = handler(args.tokens_file, args.mints, keep=args.keep)
    else:
        if args.redis_url:
            subprocess.run(["redis-cli", "-u", args.redis_url, "FLUSHDB"], check=True, capture_output=True)
        count = server(args.tokens_file, args.mints, peer=args.peer, redis_url=args.redis_url, keep=args.keep)
    name = "the peer" if args.peer else "the gateway"
    where = "its mint endpoint, in-process" if args.what == "handler" else "HTTP, one connection"
    if args.redis_url:
        where += ", Redis"
    print(f"{count / args.mints:,.0f} instructions per mint ({name}, {where}, {args.mints} mints)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
