"""The agent's heartbeat: alive, doing what, with which versions, having spent how much ε.

A daemon thread sends the current state every ``interval_s`` seconds and at once when it
changes, so the operator sees a site go from training to uploading to waiting, or to declined
with the reason, without waiting for a round's deadline. A heartbeat that fails is only logged:
the agent's work never waits for one.
"""

from __future__ import annotations

import logging
import threading

from fedhe.api_client import AggregatorClient
from fedhe.errors import FedheError
from fedhe.schemas import AgentState, Environment, HeartbeatCreate, PrivacyReport

logger = logging.getLogger("fedhe.agent")


class Heartbeat:
    """Holds the agent's reported state and sends it in the background."""

    def __init__(self, client: AggregatorClient, environment: Environment, interval_s: float):
        self._client = client
        self._environment = environment
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._report = HeartbeatCreate(state=AgentState.IDLE, environment=environment)
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedhe-heartbeat", daemon=True)

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

    def stop(self) -> None:
        """Send the last state once more and stop."""
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=10)

    def set_data_size(self, rows: int) -> None:
        """Say how many training rows the site has (weighted sampling draws by it), from the next beat on."""
        with self._lock:
            self._report = self._report.model_copy(update={"data_size": rows})

    def report(
        self,
        state: AgentState,
        *,
        job_id: str | None = None,
        round_number: int | None = None,
        message: str = "",
        privacy: PrivacyReport | None = None,
    ) -> None:
        """Set what the agent is doing; a new state is sent at once."""
        with self._lock:
            previous = self._report
            self._report = HeartbeatCreate(
                state=state,
                job_id=job_id,
                round=round_number,
                message=message[:500],
                environment=self._environment,
                privacy=privacy if privacy is not None else previous.privacy,
                data_size=previous.data_size,
            )
        if (previous.state, previous.job_id, previous.round) != (state, job_id, round_number):
            self._changed.set()

    def _run(self) -> None:
        while True:
            self._changed.wait(self._interval_s)
            self._changed.clear()
            with self._lock:
                report = self._report
            try:
                self._client.heartbeat(report)
            except FedheError as exc:
                logger.debug("heartbeat not delivered: %s", exc.code)
            if self._stop.is_set():
                return
