"""Where a mint's time goes: py-spy on the gateway during a run, its samples tallied by step, area and function."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Profile", "find_py_spy", "finish_profiler", "read_profile", "start_profiler", "summarize_profiles"]


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


def start_profiler(py_spy: str, pid: int, *, duration: int, workers: int, output: Path) -> subprocess.Popen[bytes]:
    command = [
        py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
        "--duration", str(duration), "--output", str(output),
    ]  # fmt: skip
    if workers > 1:
        command.append("--subprocesses")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_profiler(profiler: subprocess.Popen[bytes], duration: int) -> bool:
    _, errors = profiler.communicate(timeout=duration + 30)
    if profiler.returncode != 0:
        print(f"py-spy failed: {errors.decode(errors='replace')}", file=sys.stderr)
        return False
    return True
