"""Stopping on request, for preemptible machines and schedulers (SLURM, Kubernetes).

SIGTERM or SIGUSR1 sent to a worker, or a stop file that the launcher writes when it
receives one of them, asks the run to stop; with on_demand_checkpointing also the other
signals of job.ON_DEMAND_SIGNALS and InstructLab's trigger file (job.checkpoint_trigger),
when it was written after this run started. The ranks agree at the end of every step (any
rank asking is enough), so all of them save the full training state after the same step
and exit cleanly; running the same job again resumes from there.
"""

from __future__ import annotations

import signal
from pathlib import Path

from .distributed import World, all_reduce
from .job import STOP_SIGNALS, stop_requested


class StopRequest:
    """`status_dir`: the job's status directory, where the launcher's stop request appears
    (job.request_stop); None: signals only. `trigger`: a file whose appearance (modified at
    or after `since`) also asks to stop."""

    def __init__(self, status_dir: str | Path | None = None, trigger: Path | None = None, since: float = 0.0):
        self.status_dir = status_dir
        self.trigger = trigger
        self.since = since
        self.signal: signal.Signals | None = None
        self._reason: str | None = None

    def install(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> StopRequest:
        """Catch the stop signals in this process (the main thread, before training)."""
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: the step under way finishes, and the loop checks between steps.
        self.signal = signal.Signals(signum)

    def requested(self) -> bool:
        """This process was asked to stop."""
        return self.signal is not None or self._launcher_request() is not None or self._triggered() is not None

    def _launcher_request(self) -> str | None:
        return stop_requested(self.status_dir) if self.status_dir is not None else None

    def _triggered(self) -> str | None:
        if self.trigger is None:
            return None
        try:
            fresh = self.trigger.stat().st_mtime >= self.since
        except OSError:
            return None
        return f"the checkpoint trigger {self.trigger}" if fresh else None

    def consume_trigger(self) -> None:
        """The trigger asked for this checkpoint, which is saved: removed, as InstructLab
        removes it (on each machine; its /dev/shm is its own)."""
        if self._triggered() is not None:
            self.trigger.unlink(missing_ok=True)

    def agreed(self, world: World) -> bool:
        """Some rank was asked to stop (a collective: every rank calls it after each step).
        The highest signal number and the highest rank that got it travel along, so every
        rank can say why the run stopped."""
        code = int(self.signal) if self.signal is not None else int(self.requested())  # 1: the stop file
        (agreed,) = all_reduce([float(code * world.world_size + world.rank)], world, op="max")
        code, rank = divmod(int(agreed), world.world_size)  # the highest code, and a rank that has it
        if code > 1:
            self._reason = f"{signal.Signals(code).name} to rank {rank}"
        elif code == 1:
            # the launcher writes what it received
            self._reason = self._launcher_request() or self._triggered() or "a stop request"
        return code > 0

    def reason(self) -> str:
        """Why the run stopped, once `agreed` said it does."""
        return self._reason or "a stop request"
