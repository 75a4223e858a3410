"""Process-local counters exposed in Prometheus text format at ``/metrics``."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters of one aggregator process (Prometheus sums them across replicas)."""

    updates_accepted: int = 0
    update_bytes_accepted: int = 0
    rounds_published: int = 0
    rounds_failed: int = 0
    updates_rejected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, code: str) -> None:
        """Count a refused upload by its error code."""
        with self._lock:
            self.updates_rejected[code] += 1

    def accept(self, num_bytes: int) -> None:
        """Count an accepted upload."""
        with self._lock:
            self.updates_accepted += 1
            self.update_bytes_accepted += num_bytes

    def observe(self, event_kind: str) -> None:
        """Count a committed round event."""
        with self._lock:
            if event_kind == "round.published":
                self.rounds_published += 1
            elif event_kind == "round.failed":
                self.rounds_failed += 1

    def render(self) -> str:
        """The counters in Prometheus text exposition format."""
        lines = [
            "# HELP fedhe_updates_accepted_total Encrypted updates accepted.",
            "# TYPE fedhe_updates_accepted_total counter",
            f"fedhe_updates_accepted_total {self.updates_accepted}",
            "# HELP fedhe_update_bytes_accepted_total Bytes of accepted encrypted updates.",
            "# TYPE fedhe_update_bytes_accepted_total counter",
            f"fedhe_update_bytes_accepted_total {self.update_bytes_accepted}",
            "# HELP fedhe_rounds_published_total Rounds published by this process.",
            "# TYPE fedhe_rounds_published_total counter",
            f"fedhe_rounds_published_total {self.rounds_published}",
            "# HELP fedhe_rounds_failed_total Rounds failed by this process.",
            "# TYPE fedhe_rounds_failed_total counter",
            f"fedhe_rounds_failed_total {self.rounds_failed}",
            "# HELP fedhe_updates_rejected_total Uploads refused, by error code.",
            "# TYPE fedhe_updates_rejected_total counter",
        ]
        lines += [
            f'fedhe_updates_rejected_total{{code="{code}"}} {n}' for code, n in sorted(self.updates_rejected.items())
        ]
        return "\n".join(lines) + "\n"
