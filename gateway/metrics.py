"""Prometheus metrics.

Each app has its own registry, so several apps in one process (tests, in-process replicas) never share counters.
With several worker processes, `gateway serve` points $PROMETHEUS_MULTIPROC_DIR at a shared directory before
the workers start: prometheus-client then keeps the values in files there, and /metrics (answered by any worker)
adds up every worker's.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.mints = self._counter(
            "gateway_mint_requests", "Token exchange attempts by issuer and outcome (success or the error code).",
            ["issuer", "outcome"],
        )  # fmt: skip
        self.latency = Histogram(
            "gateway_mint_seconds",
            "Time to answer a token exchange.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.fetches = self._counter(
            "gateway_upstream_fetches", "Issuer discovery + JWKS fetches by issuer and outcome (ok or error).",
            ["issuer", "outcome"],
        )  # fmt: skip
        self.key_lookups = self._counter(
            "gateway_key_lookups",
            "Issuer keys found per token, by the cache level that had them: memory (this process), redis "
            "(another replica's fetch) or upstream (a fetch by this process).",
            ["level"],
        )
        self.redis_errors = self._counter("gateway_redis_errors", "Redis calls that failed or timed out.", [])
        self.reloads = self._counter(
            "gateway_config_reloads", "Config reloads by outcome (failure: the previous config stayed in force).",
            ["outcome"],
        )  # fmt: skip
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def count(self, counter: Counter, *labels: str) -> None:
        # labels() builds and locks on every call; the children are few (issuers x outcomes), so keep them.
        child = self._children.get((counter, labels))
        if child is None:
            child = self._children[(counter, labels)] = counter.labels(*labels) if labels else counter
        child.inc()

    def mint(self, issuer: str, outcome: str, seconds: float) -> None:
        self.count(self.mints, issuer, outcome)
        self.latency.observe(seconds)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROCESS):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
