"""HTTP metrics every service exports: requests by route template, method and status, and latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HttpMetrics:
    """Request counters and latency histograms, registered in a service's own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "fedhe_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "fedhe_http_request_duration_seconds",
            "HTTP request duration by route template.",
            ["route"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=registry,
        )

    def request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """Count one request (``route`` is the template, never the raw path, so no identifier is a label)."""
        template = route or "<unmatched>"
        self.requests.labels(route=template, method=method, status=str(status)).inc()
        self.seconds.labels(route=template).observe(seconds)
