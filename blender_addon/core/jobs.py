"""Job state on the client and the `seq` bookkeeping that makes catching up free of duplicates.

Events of a job carry `seq` 1, 2, 3… without gaps (PROTOCOL.md section 2). A client applies them in
order exactly once: repeats (seq at or below the last applied one) are dropped, and an event that
arrives ahead of a gap waits until the gap is filled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATES = ("done", "failed", "cancelled")
"""States after which a job sends no more events."""


@dataclass
class JobRecord:
    """What the client knows about one job it follows."""

    job_id: str
    """The server's id of the job."""
    kind: str = "generate"
    """"generate" or "refine_texture"."""
    prompt: str = ""
    """The job's prompt, for names and the job list."""
    state: str = "queued"
    """The newest `state` event: queued, running, done, failed or cancelled."""
    stage: str = ""
    """The current stage: coarse, geometry or texture ("" before the first)."""
    step: int = 0
    """The newest progress step within the stage."""
    steps: int = 0
    """The number of steps in the current stage."""
    eta_s: float | None = None
    """Seconds left in the stage by the server's estimate, or None when unknown."""
    error: str = ""
    """The server's message when the job failed."""
    last_seq: int = 0
    """The seq of the last event applied (0: none yet)."""
    preview_png: bytes | None = None
    """The newest preview render (PNG bytes) from a `progress` message."""
    held: dict[int, Any] = field(default_factory=dict)
    """Events that came ahead of a gap, by seq, waiting for the ones before them."""

    @property
    def finished(self) -> bool:
        """True once a terminal state event was applied."""
        return self.state in TERMINAL_STATES

    def accept(self, seq: int, event: Any) -> list[Any]:
        """Take one event; return the events now ready to apply, in seq order.

        Advances `last_seq` over every returned event: the caller applies them in that order.
        """
        if seq <= self.last_seq or seq in self.held:
            return []
        self.held[seq] = event
        ready = []
        while self.last_seq + 1 in self.held:
            self.last_seq += 1
            ready.append(self.held.pop(self.last_seq))
        return ready

    def apply_state(self, body: dict) -> None:
        """Update state, stage and error fields from a `state` or `stage` event body."""
        if body.get("event") == "state":
            self.state = str(body.get("state", self.state))
            if self.state == "failed":
                self.error = str(body.get("error") or "the job failed without a message")
        elif body.get("event") == "stage":
            self.stage = str(body.get("stage", self.stage))
            self.steps = int(body.get("steps") or 0)
            self.step = 0

    def apply_progress(self, body: dict, preview_png: bytes | None) -> None:
        """Update stage, step, steps and time left from a `progress` message."""
        self.stage = str(body.get("stage") or self.stage)
        self.step = int(body.get("step") or 0)
        self.steps = int(body.get("steps") or self.steps)
        eta = body.get("eta_s")
        self.eta_s = None if eta is None else float(eta)
        if preview_png is not None:
            self.preview_png = preview_png
