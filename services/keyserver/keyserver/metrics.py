"""The keyserver's Prometheus metrics (``/metrics``): key releases by outcome, and HTTP requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from fedhe.http_metrics import HttpMetrics

RELEASE_ACTION = "context.release_secret"


class KeyserverMetrics:
    """Every metric of one keyserver process, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.releases = Counter(
            "fedhe_key_releases",
            "Secret-context releases: granted, or refused with the refusal's code.",
            ["outcome"],
            registry=self.registry,
        )
        self.http = HttpMetrics(self.registry)

    def release(self, outcome: str) -> None:
        """Count one key-release attempt (``granted`` or the refusal's error code)."""
        self.releases.labels(outcome=outcome).inc()

    def refusal(self, action: str, reason: str) -> None:
        """Count a refused request; key releases are counted by outcome (``fedhe.refusals`` calls this)."""
        if action == RELEASE_ACTION:
            self.release(reason)

    def render(self) -> bytes:
        """The text exposition."""
        return generate_latest(self.registry)
