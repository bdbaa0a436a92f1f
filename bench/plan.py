"""What a benchmark measures: its targets (a server, a store, a publishers count) and what each one gave."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from .load import Run

__all__ = ["STORE_NAMES", "Measured", "Target"]

# How the report names where a jti is spent.
STORE_NAMES = {"memory": "in-process", "redis": "Redis", "sentinel": "Sentinel", "cluster": "Cluster"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One server to measure: the gateway or the peer, where it spends jtis, how many publishers it loads."""

    server: str  # "gateway" or "peer"
    store: str  # a key of STORE_NAMES
    publishers: int  # the gateway's publishers.toml; the peer has none (0)

    @property
    def key(self) -> str:
        """Names this target in --json, its directories and profile files: `gateway-memory-10`, `peer-redis`."""
        return f"{self.server}-{self.store}" + (f"-{self.publishers}" if self.server == "gateway" else "")

    @property
    def label(self) -> str:
        where = STORE_NAMES[self.store]
        if self.server == "peer":
            return f"peer, {where}" + (" (SET NX)" if self.store == "redis" else "")
        return f"gateway, {where}, {self.publishers:,} publ."


@dataclasses.dataclass
class Measured:
    """A target's runs: `repeat` at full load, and one paced at a fraction of their median rate."""

    target: Target
    runs: list[Run] = dataclasses.field(default_factory=list)
    paced: Run | None = None
    load: list[float] | None = None
    profile: Path | None = None
    # Why it has no runs: its server would not start (a gateway without Sentinel or Cluster support, say).
    skipped: str | None = None

    @property
    def median(self) -> Run:
        """The run with the median req/s (of an even count, the lower middle one): a real run, not a blend."""
        ordered = sorted(self.runs, key=lambda run: run.rate)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def rate(self) -> float:
        return statistics.median(run.rate for run in self.runs)

    @property
    def cpu_per_request(self) -> float:
        return statistics.median(run.cpu_per_request for run in self.runs)

    @property
    def failed(self) -> bool:
        runs = [*self.runs, *([self.paced] if self.paced else [])]
        return any(run.stats.errors or run.stats.exhausted for run in runs)
