"""A model worker's lifecycle: one phase, moved by any thread, waited on by any other.

```
LOADING ──> SERVING ──> CLOSING ──> (stays: the process is ending)
   ^           │           │
   │           v           v
   └──────  DRAINING ──> UNLOADED            FINISHED (lockstep: rank 0 said it is done)
  reload     unload       model dropped,
                          thread parked
```
"""

from __future__ import annotations

import enum
import threading


class Phase(enum.Enum):
    LOADING = "loading"  # the thread is loading a model; requests wait for it
    SERVING = "serving"  # loaded (or failed to load, which every request is told): jobs are taken
    CLOSING = "closing"  # the process is stopping: every job, running or sent later, is cancelled
    DRAINING = "draining"  # an unload was asked: no new jobs; the loop ends once the cancelled ones have
    UNLOADED = "unloaded"  # the model and its caches are dropped; the thread is parked until a reload
    FINISHED = "finished"  # under lockstep, rank 0 has said that it is done: the loop has ended for good


class Lifecycle:
    """The phase, and a condition to wait for one."""

    def __init__(self) -> None:
        self._phase = Phase.LOADING
        self._changed = threading.Condition()

    @property
    def phase(self) -> Phase:
        return self._phase

    def is_in(self, *phases: Phase) -> bool:
        return self._phase in phases

    def move(self, phase: Phase) -> None:
        with self._changed:
            self._phase = phase
            self._changed.notify_all()

    def move_from(self, current: tuple[Phase, ...], phase: Phase) -> bool:
        """Move to `phase` only from one of `current` (atomically); False where it was elsewhere."""
        with self._changed:
            if self._phase not in current:
                return False
            self._phase = phase
            self._changed.notify_all()
            return True

    def wait_for(self, *phases: Phase, timeout: float | None = None) -> bool:
        """Block until the phase is one of `phases`; False if `timeout` ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._phase in phases, timeout)
