"""Fault injection for end-to-end runs: a `sitecustomize.py` on the workers' PYTHONPATH
wraps the training loop's `run_step` in one rank, so the library carries no test hooks."""

from __future__ import annotations

import os
from pathlib import Path

_WRAPPER = """
import os, signal, time
if os.environ.get("RANK") in {ranks!r}:
    import instructpack.train.loop as loop
    real, calls = loop.run_step, []
    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) {when}:
            {action}
        return real(*args, **kwargs)
    loop.run_step = faulty
"""


def inject(monkeypatch, directory: Path, action: str, *, step: int | None = None, ranks=("1",)) -> None:
    """Before the `step`-th step of this launch (every step if None) of each rank in
    `ranks`, the workers run `action`: one Python statement, with os, signal and time
    imported (`os.kill(os.getpid(), signal.SIGKILL)`, `raise MemoryError(...)`)."""
    directory.mkdir(parents=True, exist_ok=True)
    when = ">= 1" if step is None else f"== {step}"
    (directory / "sitecustomize.py").write_text(_WRAPPER.format(ranks=tuple(ranks), when=when, action=action))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]))
