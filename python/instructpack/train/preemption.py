"""Stopping on request, for preemptible machines and schedulers (SLURM, Kubernetes).

SIGTERM or SIGUSR1 sent to a worker, or a stop file that the launcher writes when it
receives one of them, asks the run to stop. The ranks agree at the end of every step (any
rank asking is enough), so all of them save the full training state after the same step
and exit cleanly; running the same job again resumes from there.
"""

from __future__ import annotations

import signal
from pathlib import Path

from .distributed import World, all_reduce
from .job import STOP_SIGNALS


class StopRequest:
    def __init__(self, stop_file: str | Path | None = None):
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        """Catch the stop signals in this process (the main thread, before training)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: the step under way finishes, and the loop checks between steps.
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """This process was asked to stop."""
        return self.signal_name is not None or (self.stop_file is not None and self.stop_file.exists())

    def agreed(self, world: World) -> bool:
        """Some rank was asked to stop (a collective: every rank calls it after each step)."""
        (flag,) = all_reduce([float(self.requested())], world, op="max")
        return bool(flag)

    def reason(self) -> str:
        if self.signal_name is not None:
            return self.signal_name
        return "a stop request" if self.requested() else "another rank's stop request"
