"""The aggregator's Prometheus metrics (``/metrics``): counters of this process, gauges from the database.

Counters count what this replica did (Prometheus sums replicas); gauges are read from Postgres at
scrape time, so every replica reports the same state. No metric carries a site's data, a
credential or an identifier beyond a route template, an error code or a decline reason.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from aggregator.coordination import Event
from fedhe.http_metrics import HttpMetrics

ROUND_SECONDS_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """Every metric of one aggregator process, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.updates_accepted = Counter("fedhe_updates_accepted", "Encrypted updates accepted.", registry=r)
        self.update_bytes = Counter("fedhe_update_bytes_accepted", "Bytes of accepted encrypted updates.", registry=r)
        self.updates_rejected = Counter(
            "fedhe_updates_rejected", "Uploads refused, by error code.", ["code"], registry=r
        )
        self.updates_declined = Counter(
            "fedhe_updates_declined", "Rounds a site declined to upload to, by reason.", ["reason"], registry=r
        )
        self.rounds_published = Counter("fedhe_rounds_published", "Rounds published by this process.", registry=r)
        self.rounds_failed = Counter("fedhe_rounds_failed", "Rounds failed by this process.", registry=r)
        self.round_seconds = Histogram(
            "fedhe_round_duration_seconds",
            "Time from a round's opening to its publication.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        self.heartbeats = Counter("fedhe_heartbeats", "Agent heartbeats received.", registry=r)
        self.http = HttpMetrics(r)
        self.sites = Gauge("fedhe_sites", "Registered sites by status.", ["status"], registry=r)
        self.sites_online = Gauge(
            "fedhe_sites_online", "Sites whose agent sent a heartbeat within a minute.", registry=r
        )
        self.jobs = Gauge("fedhe_jobs", "Jobs by status.", ["status"], registry=r)

    def reject(self, code: str) -> None:
        """Count a refused upload by its error code."""
        self.updates_rejected.labels(code=code).inc()

    def accept(self, num_bytes: int) -> None:
        """Count an accepted upload."""
        self.updates_accepted.inc()
        self.update_bytes.inc(num_bytes)

    def observe(self, event: Event) -> None:
        """Count a committed round event."""
        kind = event["kind"]
        if kind == "round.published":
            self.rounds_published.inc()
            if isinstance(event.get("duration_s"), int | float):
                self.round_seconds.observe(event["duration_s"])
        elif kind == "round.failed":
            self.rounds_failed.inc()
        elif kind == "update.declined":
            self.updates_declined.labels(reason=str(event.get("reason"))).inc()

    def render(self, sites: dict[str, int], online: int, jobs: dict[str, int]) -> bytes:
        """The text exposition, with the gauges set from the database's current counts."""
        for status, count in sites.items():
            self.sites.labels(status=status).set(count)
        self.sites_online.set(online)
        for status, count in jobs.items():
            self.jobs.labels(status=status).set(count)
        return generate_latest(self.registry)
