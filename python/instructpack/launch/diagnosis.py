"""Which rank failed first, and why, from what the workers recorded (train/job.py
FailureRecord) and torchrun's own summary of the processes it saw end."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from ..errors import TrainingError
from ..train.job import read_failures

_TORCHRUN_RANK = re.compile(r"rank\s*:\s*(\d+)")
_TORCHRUN_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


def diagnose(exit_code: int, status_dir: Path, tail: list[str], log_path: Path) -> TrainingError:
    """A worker that raised has recorded its error; one that died without a word (a signal:
    the kernel's out-of-memory killer sends SIGKILL) is named by torchrun's summary as the
    root cause, and comes first: the errors the others recorded (a peer gone from a
    collective) are its consequences."""
    records = read_failures(status_dir)
    rank, code = _root_cause(tail)
    if rank is not None and rank not in records:
        return TrainingError(rank, code if code is not None else exit_code, _death(code), tail, log_path)
    if records:
        first = min(records.values(), key=lambda r: r.time)
        code = code if first.rank == rank else None
        return TrainingError(first.rank, code if code is not None else exit_code, first.error, tail, log_path)
    return TrainingError(rank, code if code is not None else exit_code, _death(code), tail, log_path)


def _root_cause(lines: list[str]) -> tuple[int | None, int | None]:
    """Rank and exit code of the "Root Cause (first observed failure)" in torchrun's
    summary (else its last failure listed)."""
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), 0)
    section = lines[start:]
    rank = next((int(m.group(1)) for line in section if (m := _TORCHRUN_RANK.search(line))), None)
    code = next((int(m.group(1)) for line in section if (m := _TORCHRUN_EXIT.search(line))), None)
    return rank, code


def _death(code: int | None) -> str:
    if code is None or code >= 0:
        return "the worker exited without recording an error; see the log"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
    return f"killed by signal {name}{hint}"
