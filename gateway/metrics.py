from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """One registry per app, so several apps in one process (tests, replicas) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.mints = Counter(
            "gateway_mint_requests",
            "Token exchange attempts by issuer and outcome (success or the error code).",
            ["issuer", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_mint_seconds",
            "Time to answer a token exchange.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

        self.reloads = Counter(
            "gateway_config_reloads",
            "Config reloads by outcome (success, or failure: the previous config stayed in force).",
            ["outcome"],
            registry=self.registry,
        )
        self._outcomes: dict[tuple[str, str], Any] = {}

    def mint(self, issuer: str, outcome: str, seconds: float) -> None:
        # labels() builds and locks on every call; the children are few (issuers x codes), so keep them.
        child = self._outcomes.get((issuer, outcome))
        if child is None:
            child = self._outcomes[(issuer, outcome)] = self.mints.labels(issuer, outcome)
        child.inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
