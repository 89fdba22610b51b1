"""Background work for the workbench: a job runs in its own thread, reports the phase it is in,
and keeps its result or its error for the page that polls it."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import EngramError


@dataclass
class Job:
    kind: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"  # queued, running, done, error
    phase: str = ""
    step: int = 0
    steps: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def advance(self, phase: str) -> None:
        """Enter the next of ``steps`` phases (what the page's progress bar shows)."""
        self.phase, self.step = phase, self.step + 1

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "phase": self.phase,
                "step": self.step, "steps": self.steps, "result": self.result,
                "error": self.error, "seconds": round(time.time() - self.started, 1)}


class Jobs:
    """The jobs of one workbench, by id; at most ``keep`` finished ones are remembered."""

    def __init__(self, keep: int = 50) -> None:
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._guard = threading.Lock()

    def start(self, kind: str, steps: int, work: Callable[[Job], dict[str, Any]]) -> Job:
        job = Job(kind, steps=steps)
        with self._guard:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.state in ("done", "error")]
            for old in finished[:max(0, len(finished) - self.keep)]:
                del self._jobs[old.id]

        def run() -> None:
            job.state = "running"
            try:
                job.result = work(job)
                job.state = "done"
            except EngramError as e:  # the user's input: the message says what to change
                job.error, job.state = str(e), "error"
            except Exception as e:  # a bug: keep the trace for the server's log
                job.error, job.state = f"{type(e).__name__}: {e}", "error"
                traceback.print_exc()

        threading.Thread(target=run, name=f"engram-{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)
