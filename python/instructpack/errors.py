"""Every exception instructpack raises on purpose, under one base, `InstructPackError`.

A caller catches `InstructPackError` for "the library refused or stopped, and says why";
anything else escaping it is a bug. Each class also keeps the built-in type its problem
has always been (ValueError for bad values, OSError for files, ImportError for a missing
package), so `except ValueError` written against an older release still works.

Nothing here imports anything heavy: the preprocessing command and the launcher use it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "InstructPackError", "ConfigError", "PathNotFoundError", "PathExistsError", "InputError", "SampleError",
    "TemplateError", "ChatTemplateError", "UnsafeTemplateError", "DatasetError", "PlanError", "WriteError",
    "DirectoryInUseError", "CheckpointError", "ResumeError", "MissingPackageError", "MissingSinkError",
    "MetricsFileError", "TrainingError", "TrainingStopped",
]

_NO_VALUE = object()


class InstructPackError(Exception):
    """Base of every error the library raises on purpose; the message names the culprit
    (a field, a file and line) and the fix."""


# ------------------------------------------------------------------ configuration

class ConfigError(InstructPackError, ValueError):
    """An invalid configuration. `field` is the dotted path of the culprit ("" for the
    whole file), `value` what was given, `problem` what is allowed, `source` the file."""

    def __init__(self, root: str, path: tuple[str, ...], problem: str,
                 value: Any = _NO_VALUE, source: str | None = None):
        self.root, self.path, self.problem, self.value, self.source = (
            root, path, problem, value, source)
        self.field = ".".join(p for p in (root, *path) if p)
        shown = self.field
        if value is not _NO_VALUE:
            text = repr(value)
            shown += " = " + (text if len(text) <= 80 else text[:77] + "...")
        super().__init__(": ".join(p for p in (source, shown, problem) if p))

    def nested(self, root: str, field: str) -> ConfigError:
        # A nested object only knows its own name; its parent knows where it sits.
        return type(self)(root, (field, *self.path), self.problem, self.value, self.source)

    def from_source(self, source: str) -> ConfigError:
        return type(self)(self.root, self.path, self.problem, self.value, source)


class PathNotFoundError(ConfigError, FileNotFoundError):
    """A path field names nothing that exists (or not the kind of thing it must be)."""


class PathExistsError(ConfigError, FileExistsError):
    """An output path field names something that is there and must not be replaced."""


# ------------------------------------------------------------------ input data

class InputError(InstructPackError, ValueError):
    """Bad input data: a line of the JSONL file (`line` set), or the file as a whole
    (`line` None). The message names the file, the line, what is wrong and the fix."""

    def __init__(self, path: str, line: int | None, reason: str):
        super().__init__(f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class SampleError(InstructPackError, ValueError):
    """Why one sample cannot be used; `kind` names the class of problem for reports.
    Preprocessing turns it into an InputError naming the line, or skips and counts it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class TemplateError(SampleError):
    """The chat template rejected a conversation, or rendered it in a way that cannot be aligned."""

    def __init__(self, message: str):
        super().__init__("chat_template", message)


class ChatTemplateError(InstructPackError, ValueError):
    """The chat template itself is broken (a syntax error, a bug that fails on any
    conversation): names the template and its line. Fatal for the whole dataset."""


class UnsafeTemplateError(InstructPackError, ValueError):
    """The chat template itself tried to escape its sandbox (read attributes it may not, call
    what it may not). Fatal for the whole dataset, whatever skip_invalid_lines says."""


# ------------------------------------------------------------------ datasets and plans

class DatasetError(InstructPackError, ValueError):
    """A dataset directory that cannot be used; the message names the file and the fix.
    The C++ shard reader's `ShardError` is one."""


class PlanError(InstructPackError, ValueError):
    """Settings the planner cannot honour for this dataset; the message names the setting and the fix."""


# ------------------------------------------------------------------ checkpoints and metrics

class WriteError(InstructPackError, OSError):
    """Output could not be written (a full disk, no permission); nothing incomplete is left
    where it would look whole, and what was there before is intact."""


class DirectoryInUseError(InstructPackError, OSError):
    """Another process works in this directory (another run, another preprocessing); names it."""

    def __init__(self, directory, holder: str, waited_s: float = 0.0):
        self.directory, self.holder = directory, holder
        waited = f" (after waiting {waited_s:.0f} s)" if waited_s else ""
        super().__init__(f"{directory} is in use by {holder}{waited}: wait for it to end or stop it, or use "
                         "another directory")


class CheckpointError(WriteError):
    """A checkpoint could not be written; the previous complete one is intact."""


class ResumeError(InstructPackError, ValueError):
    """The newest full-state checkpoint cannot be resumed by this run; says why and how to
    start fresh."""


class MissingPackageError(InstructPackError, ImportError):
    """A feature that was asked for needs a package that is not installed; says which."""


class MissingSinkError(MissingPackageError):
    """A metrics sink named in `training_args.logger_type` needs a package that is not installed."""


class MetricsFileError(InstructPackError, ValueError):
    """metrics.jsonl has a line that is not a JSON object."""


# ------------------------------------------------------------------ how a run ended

class TrainingError(InstructPackError, RuntimeError):
    """A worker failed. `rank` is the global rank that failed first (None if unknown)."""

    def __init__(self, rank: int | None, exit_code: int | None, reason: str, log_tail: list[str], log_path):
        self.rank, self.exit_code, self.reason, self.log_tail, self.log_path = (
            rank, exit_code, reason, log_tail, log_path)
        where = f"rank {rank}" if rank is not None else "a worker"
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        tail = "\n".join(f"  | {line}" for line in log_tail)
        super().__init__(f"training failed on {where}{code}: {reason}\nlast lines of {log_path}:\n{tail}")


class TrainingStopped(InstructPackError):
    """The run stopped early on request (SIGTERM/SIGUSR1) after saving its full state;
    running the same job again resumes it."""

    def __init__(self, reason: str, step: int | None = None, checkpoint: str | None = None):
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        if checkpoint is None:
            super().__init__(f"training stopped by {reason} before the training state was saved")
        else:
            super().__init__(f"training stopped by {reason} after step {step}; its full state is in {checkpoint}: "
                             "run the same job again to resume")
