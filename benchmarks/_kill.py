"""A training callback for `benchmarks gpu`'s resume check, in a module of its own: the
workers unpickle it by reference, and `benchmarks.gpu` itself must import before
instructpack is installed."""

from __future__ import annotations

import os
import signal

from instructpack import TrainerCallback


class KillAtStep(TrainerCallback):
    """SIGKILL to its own worker as step `step` begins (what the OOM killer does)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, context) -> None:
        if context.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
