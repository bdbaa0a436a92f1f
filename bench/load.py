"""Load: wrk against one server, and the CPU the server, wrk, Redis and everything else used meanwhile."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Run", "WrkStats", "measure", "parse_wrk"]

LUA_SCRIPT = Path(__file__).resolve().parent / "mint.lua"


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

    @property
    def exhausted(self) -> bool:
        return bool(self.lua.get("exhausted"))


@dataclasses.dataclass
class Run:
    """One wrk run against one server."""

    stats: WrkStats
    wall_seconds: float
    server_cpu_seconds: float
    wrk_cpu_seconds: float
    # Our own Redis processes', when the run spends in them; else None.
    redis_cpu_seconds: float | None
    # Everything else the machine ran meanwhile (other people's jobs, this script): the noise in the numbers.
    other_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.stats.requests_per_sec

    @property
    def cpu_per_request(self) -> float:
        # Server CPU per answered request: much steadier than req/s when something else shares the machine.
        return self.server_cpu_seconds / self.stats.requests if self.stats.requests else 0.0

    def share(self, seconds: float | None) -> float | None:
        """`seconds` of CPU as a share of one core over this run."""
        return None if seconds is None else seconds / self.wall_seconds


def measure(
    url: str,
    server_pid: int,
    *,
    duration: int,
    connections: int,
    threads: int,
    script_args: Sequence[str] = (),
    redis_pids: Sequence[int] = (),
    delay_ms: int = 0,
) -> Run:
    """Run wrk against `url` and meter the server's process tree, the Redis processes and the whole machine.

    `delay_ms` paces it: each connection waits that long between an answer and its next request.
    """
    pids = _process_tree(server_pid)
    server_before, redis_before, machine_before = _cpu(pids), _cpu(redis_pids), _machine_busy()
    command = [
        "wrk", f"--threads={threads}", f"--connections={connections}", f"--duration={duration}s",
        "--latency", "--timeout=5s", f"--script={LUA_SCRIPT}", url,
    ]  # fmt: skip
    if script_args:
        command += ["--", *script_args]
    started = time.monotonic()
    env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)} if delay_ms else None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    # wait4 rather than wait: its rusage says how much of the cores the client itself took.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    server_used, machine_used = _cpu(pids) - server_before, _machine_busy() - machine_before
    redis_used = _cpu(redis_pids) - redis_before
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"wrk failed ({returncode}):\n{output}")
    wrk_used = usage.ru_utime + usage.ru_stime
    return Run(
        stats=parse_wrk(output),
        wall_seconds=wall,
        server_cpu_seconds=server_used,
        wrk_cpu_seconds=wrk_used,
        redis_cpu_seconds=redis_used if redis_pids else None,
        other_cpu_seconds=max(0.0, machine_used - server_used - redis_used - wrk_used),
    )


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


def _process_tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's worker processes when --workers > 1)."""
    pids, index = [pid], 0
    while index < len(pids):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return pids


def _cpu(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...; busy is all but idle and iowait.
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
